"""Forests at run time: trees in, validated integer arrays and a level schedule out.

A `Forest` is a batch of trees (binary or n-ary, up to an arity) whose
leaves carry a word id or a feature row, and whose nodes may carry labels.
It is built from nested tuples, from bracketed treebank strings such as
`(3 (2 good) (2 movie))`, or from arrays, and validated once, when it is
built: indices in range, every node at most one parent, children before
parents (hence no cycles), the arity respected. Anything else raises
`ValueError`, long before native code runs.

Its nodes are kept in *schedule order*: by height (leaves, height 0, first),
then by tree, then by position in the tree. Each level is then a contiguous
range of rows, so the compiled code runs one batched dense per level over
`level_end[l-1]:level_end[l]`, and the leaves are rows `[0, leaves)`.
Per-node outputs and labels are in this order; `Forest.index[i]` is the row
of node i as the forest was given (`out[f.index]` puts per-node outputs in
that order): `from_arrays`' node i; for `from_tuples` and `from_brackets`,
each tree's nodes in post-order (children first, as brackets close), tree
after tree; for `concat` (and `ForestPool.take`), the parts' numbers, part
after part, so a concat is the very forest built from all the parts at once.

    children   i32[nodes, arity]  child positions, -1 for none
    words      i32[leaves]        word id of each leaf (or `features` f32[leaves, F])
    roots      i32[trees]         position of each tree's root, in tree order
    level_end  i32[levels]        end of each level's rows; level 0 is the leaves
    labels     i32[nodes]         per-node labels (-1 where a tree gave none), or None
    node_words i32[nodes]         a word at every node, inner ones too (`from_arrays(..., inner=True)`),
                                  or `node_features` f32[nodes, F]; None when only leaves carry one

Merging forests (`Forest.concat`) is vectorised numpy, so a data set parses
each tree once and forms batches cheaply.
"""
from __future__ import annotations

import difflib
import itertools
import re
import struct
import unicodedata
from typing import Iterable, Mapping, Sequence

import numpy as np

from . import _runtime

_I32 = np.int32
_I32_MAX = int(np.iinfo(np.int32).max)
_SIZES = struct.Struct("=10q")         # a Forest's `_sizes`: 10 int64 in native order, as numpy writes them


def _frozen(a: np.ndarray) -> np.ndarray:
    """A read-only copy that user code cannot make writeable again: a view of
    an immutable bytes object (an array owning its data could be)."""
    a = np.ascontiguousarray(a)
    return np.frombuffer(a.tobytes(), a.dtype).reshape(a.shape)


def _int64(value, what: str) -> np.ndarray:
    """Integers as int64, refusing what int64 cannot hold (uint64 above 2**63
    would wrap to negative numbers)."""
    arr = np.asarray(value)
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{what}: {int(arr.max())} is out of range (at most {_I32_MAX})")
    return arr.astype(np.int64)


def _check_int32(arr: np.ndarray, low: int, what: str) -> None:
    """Every value in [low, 2**31 - 1], so that narrowing to int32 is exact."""
    bad = (arr < low) | (arr > _I32_MAX)
    if bad.any():
        k = int(np.flatnonzero(bad.reshape(-1))[0])
        raise ValueError(f"{what}: {int(arr.reshape(-1)[k])} at position {k} is out of range "
                         f"[{low}, {_I32_MAX}]")


class Forest:
    """A validated batch of trees in schedule order (see the module docstring)."""

    __slots__ = ("children", "words", "features", "roots", "level_end", "labels", "height", "index",
                 "tree_of", "max_word", "node_words", "node_features", "_bound", "_sizes", "_flat")

    def __init__(self, *args, **kwargs):
        raise TypeError("build a Forest with Forest.from_tuples, Forest.from_brackets, "
                        "Forest.from_arrays or Forest.concat")

    def __setattr__(self, name, value):
        # A forest is checked once, when it is built: it must stay as checked.
        raise AttributeError(f"a Forest is immutable (cannot set '{name}'); build a new one")

    def __reduce__(self):
        # pickle and copy rebuild through _restore, which seals the arrays again
        return (_restore, ({k: getattr(self, k) for k in Forest.__slots__ if k not in _DERIVED},))

    # -- properties --------------------------------------------------------
    @property
    def arity(self) -> int:
        return self.children.shape[1]

    @property
    def nodes(self) -> int:
        return self.children.shape[0]

    @property
    def leaves(self) -> int:
        return int(self.level_end[0])

    @property
    def trees(self) -> int:
        return self.roots.shape[0]

    @property
    def levels(self) -> int:
        return self.level_end.shape[0]

    @property
    def root_labels(self) -> np.ndarray:
        """The label of each tree's root, in tree order."""
        if self.labels is None:
            raise ValueError("this forest carries no labels")
        return self.labels[self.roots]

    def __len__(self) -> int:
        return self.trees

    def __repr__(self) -> str:
        leaf = f"features f32[{self.features.shape[1]}]" if self.features is not None else "words"
        return (f"<Forest {self.trees} trees, {self.nodes} nodes ({self.leaves} leaves), {self.levels} levels, "
                f"arity {self.arity}, {leaf}{', labelled' if self.labels is not None else ''}>")

    # -- construction ------------------------------------------------------
    @classmethod
    def _make(cls, children, height, words, features, labels, tree_of, index,
              node_words=None, node_features=None) -> "Forest":
        """Put nodes given children-before-parents, with their heights, in schedule order."""
        n = children.shape[0]
        order = np.lexsort((np.arange(n), tree_of, height))      # by height, then tree, then node
        pos = np.empty(n, np.int64)
        pos[order] = np.arange(n)
        ch = children[order]
        if n > _I32_MAX:
            raise ValueError(f"a forest of {n} nodes is too large for 32-bit indices")
        if words is not None:
            _check_int32(words, 0, "word ids")
        if labels is not None:
            _check_int32(labels, -1, "labels (-1 for none)")
        counts = np.bincount(height)
        has_parent = np.zeros(n, bool)
        has_parent[children[children >= 0]] = True
        root_nodes = np.flatnonzero(~has_parent)
        root_nodes = root_nodes[np.argsort(tree_of[root_nodes], kind="stable")]   # tree order
        leaves = order[: int(counts[0])]
        if node_words is not None:
            _check_int32(node_words, 0, "word ids")
        words = words[leaves] if words is not None else None
        return _assemble(children=np.where(ch >= 0, pos[np.maximum(ch, 0)], -1), height=height[order],
                         level_end=np.cumsum(counts), roots=pos[root_nodes], tree_of=tree_of[order], words=words,
                         features=features[leaves] if features is not None else None,
                         labels=labels[order] if labels is not None else None,
                         index=pos[index] if index is not None else pos,
                         max_word=_max_word(words, node_words),
                         node_words=node_words[order] if node_words is not None else None,
                         node_features=node_features[order] if node_features is not None else None)

    @classmethod
    def from_arrays(cls, children, words=None, *, features=None, labels=None, arity: int | None = None,
                    inner: bool = False) -> "Forest":
        """Trees given as arrays over nodes numbered children-before-parents:
        `children[i]` lists node i's children (-1 for none, a 1-D array for
        chains), `words[i]` (or `features[i]`) is leaf i's payload (ignored at
        inner nodes unless `inner`: then every node carries its own, for a model
        that declares `forest(inner=true)`), `labels[i]` optional. The roots are
        the nodes without a parent, in order; `forest.index[i]` is node i's position."""
        ch = np.asarray(children)
        if ch.dtype.kind not in "iu":
            raise ValueError(f"forest children must be integers, got dtype {ch.dtype}")
        if ch.ndim == 1:
            ch = ch[:, None]
        if ch.ndim != 2:
            raise ValueError(f"forest children must be a [nodes, arity] array, got shape {ch.shape}")
        n = ch.shape[0]
        if n == 0:
            raise ValueError("a forest needs at least one node")
        if arity is not None and ch.shape[1] > arity:
            raise ValueError(f"forest children has {ch.shape[1]} columns, more than the arity {arity}")
        ch = _int64(ch, "forest children")
        bad = (ch < -1) | (ch >= n)
        if bad.any():
            i, k = np.argwhere(bad)[0]
            raise ValueError(f"node {i}: child {ch[i, k]} is out of range [0, {n}) (use -1 for none)")
        rows = np.broadcast_to(np.arange(n)[:, None], ch.shape)
        later = (ch >= 0) & (ch >= rows)
        if later.any():
            i, k = np.argwhere(later)[0]
            raise ValueError(f"node {i}: child {ch[i, k]} does not come before its parent; nodes must be "
                             "numbered children before parents (which also rules out cycles)")
        kids = ch[ch >= 0]
        seen = np.bincount(kids, minlength=n)
        if (seen > 1).any():
            c = int(np.flatnonzero(seen > 1)[0])
            parents = sorted(set(np.flatnonzero((ch == c).any(axis=1)).tolist()))
            raise ValueError(f"node {c} has more than one parent ({', '.join(map(str, parents))}); "
                             "each node has at most one")
        is_leaf = (ch < 0).all(axis=1)
        if (words is None) == (features is None):
            raise ValueError("give the leaves' payload: words= (word ids) or features= (feature rows)")
        w = f = node_w = None
        if words is not None:
            w = np.asarray(words)
            if w.dtype.kind not in "iu" or w.shape != (n,):
                raise ValueError(f"words must be {n} integers (one per node), got {w.dtype} {w.shape}")
            w = _int64(w, "word ids")
            carries = np.ones(n, bool) if inner else is_leaf
            bad = carries & ((w < 0) | (w > _I32_MAX))
            if bad.any():
                raise ValueError(f"{'node' if inner else 'leaf'} {int(np.flatnonzero(bad)[0])} has word id "
                                 f"{int(w[bad][0])}; word ids are in [0, {_I32_MAX}]")
            node_w = w if inner else None
            w = np.where(is_leaf, w, 0)             # inner nodes' entries are ignored
        else:
            f = np.asarray(features)
            if f.dtype.kind not in "fiu":
                raise ValueError(f"features must be real numbers, got dtype {f.dtype}")
            f = f.astype(np.float32)
            if f.ndim != 2 or f.shape[0] != n:
                raise ValueError(f"features must be a [nodes, F] array with {n} rows, got shape {f.shape}")
            if not np.isfinite(f if inner else f[is_leaf]).all():
                raise ValueError(f"{'node' if inner else 'leaf'} features must be finite")
        lab = None
        if labels is not None:
            lab = np.asarray(labels)
            if lab.dtype.kind not in "iu" or lab.shape != (n,):
                raise ValueError(f"labels must be {n} integers (one per node), got {lab.dtype} {lab.shape}")
            lab = _int64(lab, "labels")
        height = _heights(ch)
        tree_of = _tree_of(ch)
        return cls._make(ch, height, w, f, lab, tree_of, np.arange(n), node_words=node_w,
                         node_features=f if inner else None)

    @classmethod
    def from_tuples(cls, trees, vocab: "Vocab | Mapping | None" = None, *, arity: int | None = None) -> "Forest":
        """Nested tuples: a leaf is a word (a string looked up in `vocab`, or
        an int id) or a feature vector (a numpy array); an inner node is a
        tuple or list of its children. One tree, or a list of trees. Nodes are
        numbered (`index`) as `from_brackets` numbers them: post-order, tree after tree."""
        if not isinstance(trees, list) or (trees and _is_leaf(trees)):
            trees = [trees]
        if not trees:
            raise ValueError("a forest needs at least one tree")
        ch, height, tree_of, items, leaf = _walk(trees)
        if arity is not None and ch.shape[1] > arity:
            k = int(tree_of[np.argmax((ch >= 0).sum(axis=1) > arity)])
            raise ValueError(f"tree {k} has a node with more than {arity} children; the arity is {arity}")
        words = features = None
        if any(isinstance(it, np.ndarray) for it in items):
            with np.errstate(over="ignore"):        # float64 beyond float32's range: inf, refused below
                vecs = [np.asarray(it, np.float32).ravel() if lf else None for it, lf in zip(items, leaf)]
            widths = {len(v) for v in vecs if v is not None}
            if len(widths) != 1 or not all(isinstance(it, np.ndarray) for it, lf in zip(items, leaf) if lf):
                raise ValueError("every leaf must carry a feature vector of the same length")
            d = widths.pop()
            features = np.stack([v if v is not None else np.zeros(d, np.float32) for v in vecs])
            finite = np.isfinite(features).all(axis=1)      # as from_arrays checks them (inner rows are 0)
            if not finite.all():
                raise ValueError(f"tree {int(tree_of[np.argmin(finite)])}: leaf features must be finite")
        else:
            words = np.array([_word_id(it, vocab) if lf else 0 for it, lf in zip(items, leaf)], np.int64)
        # `_walk` numbers the trees last to first; a tree's own nodes are in post-order, as brackets close
        return cls._make(ch, height, words, features, None, tree_of, np.argsort(tree_of, kind="stable"))

    @classmethod
    def from_brackets(cls, text, vocab: "Vocab | Mapping | None" = None, *, arity: int | None = None) -> "Forest":
        """Treebank strings such as `(3 (2 good) (2 movie))`: `(label child ...)`
        with the label optional, a leaf written `(label word)` or as a bare
        word. One string (it may hold several trees) or a list of strings."""
        acc, _ = _parse_each([text] if isinstance(text, str) else list(text), vocab, each=False)
        if not acc.words:
            raise ValueError("a forest needs at least one tree")
        n = len(acc.words)
        kids = np.array(acc.kids, np.int64).reshape(-1, 3)          # (parent, slot, child) rows
        a = int(kids[:, 1].max()) + 1 if len(kids) else 1
        if arity is not None and a > arity:
            bad = int(kids[kids[:, 1] >= arity][0, 0])
            raise ValueError(f"tree {acc.tree_of[bad]} has a node with more than {arity} children; "
                             f"the arity is {arity}")
        ch = np.full((n, a), -1, np.int64)
        ch[kids[:, 0], kids[:, 1]] = kids[:, 2]
        return cls._make(ch, np.array(acc.height, np.int64), np.array(acc.words, np.int64), None,
                         np.array(acc.labels, np.int64), np.array(acc.tree_of, np.int64), None)

    @classmethod
    def each_from_brackets(cls, texts: Sequence[str], vocab: "Vocab | Mapping | None" = None) -> list["Forest"]:
        """`[Forest.from_brackets(t, vocab) for t in texts]`, the same forests
        array for array, parsed in one pass and put in schedule order all at
        once (a data set's thousands of one-tree lines: building each forest
        alone was two thirds of the time). A string may hold several trees."""
        texts = list(texts)
        if not texts:
            return []
        acc, ends = _parse_each(texts, vocab)
        n, count = len(acc.words), len(texts)
        starts = np.concatenate([[0], ends[:-1]])
        text_of = np.repeat(np.arange(count), ends - starts)
        height, tree_of = np.array(acc.height, np.int64), np.array(acc.tree_of, np.int64)
        words, labels = np.array(acc.words, np.int64), np.array(acc.labels, np.int64)
        _check_int32(words, 0, "word ids")
        _check_int32(labels, -1, "labels (-1 for none)")
        kids = np.array(acc.kids, np.int64).reshape(-1, 3)          # (parent, slot, child) rows
        # each string's arity, as from_brackets finds it: its widest node (1 for a lone leaf)
        arity = np.ones(count, np.int64)
        np.maximum.at(arity, text_of[kids[:, 0]], kids[:, 1] + 1)
        ch = np.full((n, int(arity.max())), -1, np.int64)
        ch[kids[:, 0], kids[:, 1]] = kids[:, 2]
        # `_make`'s order (height, then tree, then node) within each string, strings in turn:
        # a string's nodes keep its own row range, so a node's row there is its rank less the start
        order = np.lexsort((np.arange(n), tree_of, height, text_of))
        pos = np.empty(n, np.int64)
        pos[order] = np.arange(n) - starts[text_of[order]]
        children = np.where(ch[order] >= 0, pos[np.maximum(ch[order], 0)], -1)
        root_nodes = np.flatnonzero(np.bincount(kids[:, 2], minlength=n) == 0)   # a tree's root closes it
        root_end = np.searchsorted(root_nodes, ends)
        levels = np.zeros(count, np.int64)
        np.maximum.at(levels, text_of, height + 1)
        counts = np.zeros((count, int(levels.max())), np.int64)
        np.add.at(counts, (text_of, height), 1)
        level_end = np.cumsum(counts, axis=1)
        leaf = height[order] == 0
        words_sched = words[order]
        max_word = np.full(count, -1, np.int64)
        np.maximum.at(max_word, text_of[order][leaf], words_sched[leaf])
        tree_sched = tree_of[order] - tree_of[starts][text_of[order]]
        roots, height_sched, labels_sched = pos[root_nodes], height[order], labels[order]
        fields = []                                  # each forest's, in `_INT_FIELDS` order
        for j, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
            r0 = int(root_end[j - 1]) if j else 0
            fields.append((children[a:b, :int(arity[j])], height_sched[a:b], level_end[j, :int(levels[j])],
                           roots[r0:int(root_end[j])], tree_sched[a:b], words_sched[a:a + int(counts[j, 0])],
                           labels_sched[a:b], pos[a:b]))
        return _sealed_each(fields, arity.tolist(), max_word.tolist())

    @classmethod
    def concat(cls, forests: Sequence["Forest"]) -> "Forest":
        """One forest holding the trees of several, in order (vectorised); node i
        of part k is node `sum(parts[:k].nodes) + i` of the union (`index`)."""
        forests = list(forests)
        if not forests:
            raise ValueError("a forest needs at least one tree")
        if not all(map(isinstance, forests, itertools.repeat(Forest))):      # no Python loop per forest
            raise TypeError("Forest.concat takes Forest objects")
        if len(forests) == 1:
            return forests[0]
        sizes = np.frombuffer(b"".join([f._sizes for f in forests]), np.int64).reshape(len(forests), -1)
        lengths, (nodes, levels, trees) = sizes[:, :8], sizes.T[1:4]
        arity, max_word, has_words, labelled = sizes[:, 8], sizes[:, 9], sizes[:, 5] > 0, sizes[:, 6] > 0
        if has_words.min() != has_words.max():
            raise ValueError("every forest's leaves must carry the same kind of payload (words or features)")
        n = int(nodes.sum())
        if n > _I32_MAX:
            raise ValueError(f"a forest of {n} nodes is too large for 32-bit indices")
        first_node, first_tree = np.cumsum(nodes) - nodes, np.cumsum(trees) - trees     # each part's in the union
        got = _gather(forests, lengths)
        height = got["height"]
        # Each part is in schedule order (by height, then tree, then position), so a
        # stable sort by height alone merges them level by level into the union's.
        order = np.argsort(height.astype(np.int16) if levels.max() <= 2**15 else height, kind="stable")
        pos = np.empty(n, _I32)                                   # a part's node -> its position in the union
        pos[order] = np.arange(n, dtype=_I32)
        a = int(arity.max())
        children = got["children"].reshape(n, a) if arity.min() == a else _widened(got["children"], nodes, arity, a)
        children = np.where(children >= 0, pos[children + np.repeat(first_node, nodes)[:, None]], -1)
        tree_of = got["tree_of"]
        tree_of += np.repeat(first_tree.astype(_I32), nodes)
        roots = got["roots"]
        roots += np.repeat(first_node.astype(_I32), trees)
        labels = None
        if labelled.any():
            labels = got["labels"]
            if not labelled.all():                               # -1 (none) on the nodes of unlabelled parts
                labels = np.full(n, -1, _I32)
                labels[np.repeat(labelled, nodes)] = got["labels"]
            labels = labels[order]
        # The leaves (height 0) come first, part after part: the parts' payloads in order.
        words = got["words"] if has_words[0] else None
        features = None if has_words[0] else np.concatenate([f.features for f in forests])
        node_words = node_features = None
        if all(f.node_words is not None for f in forests):       # every node's payload: in the union's order
            node_words = np.concatenate([f.node_words for f in forests])[order]
        if all(f.node_features is not None for f in forests):
            node_features = np.concatenate([f.node_features for f in forests])[order]
        # node i of part k (as that part numbers it) is node first_node[k] + i of the union
        index = pos[got["index"] + np.repeat(first_node, nodes)]
        return _assemble(node_words=node_words, node_features=node_features, children=children[order], height=height[order], level_end=np.cumsum(np.bincount(height)),
                         roots=pos[roots], tree_of=tree_of[order], words=words, features=features, labels=labels,
                         index=index, max_word=int(max_word.max()))

    # -- as compiled code wants it ------------------------------------------
    def check(self, name: str, arity: int, vocab: int | None, features: int | None, inner: bool = False) -> None:
        """Does this forest fit an input declared with this arity and leaf kind
        (and, with `inner`, a payload at every node)?"""
        if inner and self.node_words is None and self.node_features is None:
            raise ValueError(f"input '{name}': the model reads a word or feature vector at every node "
                             "(forest(inner=true)); this forest has them at its leaves only: build it with "
                             "Forest.from_arrays(..., inner=True)")
        if self.arity > arity:
            raise ValueError(f"input '{name}': a node has up to {self.arity} children, but the model "
                             f"declares arity {arity}")
        if vocab is not None:
            if self.words is None:
                raise ValueError(f"input '{name}': the model expects word ids at the leaves, the forest has "
                                 "feature vectors")
            if self.max_word >= vocab:
                words, what = (self.node_words, "node") if self.node_words is not None else (self.words, "leaf")
                k = int(np.argmax(words >= vocab))
                raise ValueError(f"input '{name}': {what} {k} has word id {int(words[k])}, out of range "
                                 f"[0, {vocab})")
        if features is not None:
            if self.features is None:
                raise ValueError(f"input '{name}': the model expects feature vectors at the leaves, the forest "
                                 "has word ids")
            if inner and self.node_features is None:
                raise ValueError(f"input '{name}': the model expects feature vectors at every node, the forest "
                                 "has word ids")
            if self.features.shape[1] != features:
                raise ValueError(f"input '{name}': leaves carry {self.features.shape[1]} features, the model "
                                 f"expects {features}")

    def arrays(self, arity: int, inner: bool = False, mask: bool = False,
               kinds: bool = False) -> dict[str, np.ndarray]:
        """The arrays a compiled model reads, children padded to `arity` columns;
        with `inner` every node's payload, with `mask` which child slots hold a child,
        with `kinds` the leaves' distinct words (`leaf_words`) and each leaf's
        place among them (`leaf_kind`)."""
        ch = self.children
        if ch.shape[1] < arity:
            ch = np.pad(ch, ((0, 0), (0, arity - ch.shape[1])), constant_values=-1)
            ch = _frozen(ch)        # handed to native code: nobody may write it
        out = {"children": ch, "roots": self.roots, "level_end": self.level_end}
        out["words" if self.words is not None else "features"] = \
            self.words if self.words is not None else self.features
        if inner:
            if self.node_words is not None:
                out["node_words"] = self.node_words
            else:
                out["node_features"] = self.node_features
        if mask:
            out["child_mask"] = _frozen((ch >= 0).astype(np.float32))
        if kinds:
            out["leaf_words"], out["leaf_kind"] = distinct_words(self.words, self.max_word + 1)
        return out


def distinct_words(words: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct ids of `words` in ascending order, each word's index among
    them), both int32 and read-only. A table of the vocabulary's size when that
    is small against the words (one pass each way), a sort otherwise."""
    if vocab <= 8 * len(words) + 1024:
        seen = np.zeros(vocab, np.bool_)
        seen[words] = True
        kinds = np.flatnonzero(seen).astype(np.int32)
        place = np.cumsum(seen, dtype=np.int32)
        kind = place[words] - 1
    else:
        kinds, kind = np.unique(words, return_inverse=True)
    return _frozen(kinds.astype(np.int32)), _frozen(kind.astype(np.int32).reshape(-1))


class ForestPool:
    """Forests parsed once and batched many times (a data set's items):
    `pool.take(items)` is `Forest.concat([forests[k] for k in items])`, the
    same arrays bit for bit, assembled in C from arrays built once here (one
    pass over the batch's nodes: a batch's cost follows its nodes, not the
    count of forests). Every forest must carry the same kind of payload (words
    or features)."""

    __slots__ = ("forests", "_items", "_width", "_height", "_block", "_roots", "_features",
                 "_node_features")

    def __init__(self, forests: Sequence[Forest]):
        forests = list(forests)
        if not forests:
            raise ValueError("a forest needs at least one tree")
        if not all(map(isinstance, forests, itertools.repeat(Forest))):
            raise TypeError("Forest.concat takes Forest objects")
        sizes = np.frombuffer(b"".join([f._sizes for f in forests]), np.int64).reshape(len(forests), -1)
        lengths, (nodes, levels, trees) = sizes[:, :8], sizes.T[1:4]
        arity, has_words = sizes[:, 8], sizes[:, 5] > 0
        if has_words.min() != has_words.max():
            raise ValueError("every forest's leaves must carry the same kind of payload (words or features)")
        got = _gather(forests, lengths)
        n, a = int(nodes.sum()), int(arity.max())
        children = got["children"].reshape(n, a) if arity.min() == a else _widened(got["children"], nodes, arity, a)
        node_start, tree_start = np.cumsum(nodes) - nodes, np.cumsum(trees) - trees
        rows = np.arange(n) - np.repeat(node_start, nodes)                      # each node's number in its forest
        height = got["height"]
        is_leaf = height == 0
        labelled = sizes[:, 6] > 0
        has_node_words, node_words = _per_node(forests, "node_words", _I32)
        has_node_features, self._node_features = _per_node(forests, "node_features", np.float32)
        self.forests = forests
        # Per forest, one row (a batch sums or reduces them column by column, in C):
        # nodes, trees, leaves (summed); labels, words at every node, features at every
        # node (any, all); arity, largest word (max); its first node and tree here.
        self._items = np.column_stack([nodes, trees, np.add.reduceat(is_leaf.astype(np.int64), node_start),
                                       labelled, has_node_words, has_node_features, arity, sizes[:, 9],
                                       node_start, tree_start]).astype(np.int64)
        self._width = a
        self._height = height.astype(np.int16) if levels.max() <= 2**15 else height
        self._roots = got["roots"] + np.repeat(node_start, trees)                # the roots' rows here
        self._features = None if has_words[0] else np.concatenate([f.features for f in forests])
        labels = np.full(n, -1, _I32)
        labels[np.repeat(labelled, nodes)] = got["labels"]
        leaf = np.zeros(n, _I32)             # at a leaf its word id (words) or its row among all leaves (features)
        leaf[is_leaf] = got["words"] if has_words[0] else np.arange(int(is_leaf.sum()))
        given = np.empty(n, np.int64)         # each row's node number as its forest was given (`index`'s inverse)
        given[got["index"] + np.repeat(node_start, nodes)] = rows
        # Per node, one row: each child as how many rows before its parent it is (a
        # forest numbers children first; 0 for none, so a batch's row minus it is the
        # child's row in the batch), its tree here, the label, the leaf's payload, its
        # number as given, the node's word.
        columns = [np.where(children >= 0, rows[:, None] - children, 0), got["tree_of"] + np.repeat(tree_start, nodes),
                   labels, leaf, given]
        self._block = np.column_stack(columns + ([node_words] if node_words is not None else [])).astype(_I32)

    def __len__(self) -> int:
        return len(self.forests)

    def take(self, items) -> Forest:
        """One forest of these items' trees, in this order (`Forest.concat` of them)."""
        idx = self._checked(items)
        if len(idx) == 1:
            return self.forests[idx[0]]
        return self._assembled(idx)

    def take_many(self, batches: Sequence) -> list[Forest]:
        """`[self.take(items) for items in batches]`, every batch checked before any
        is made (an epoch's batches, a chunk at a time)."""
        checked = [self._checked(b) for b in batches]
        return [self.forests[idx[0]] if len(idx) == 1 else self._assembled(idx) for idx in checked]

    def _assembled(self, idx: np.ndarray) -> Forest:
        """The batch of items `idx` (checked), made in C (runtime/sc_pools.c: a stable
        counting sort by height, then each node's fields at its place), its integer
        arrays in one sealed buffer laid out as `_assemble` lays them out."""
        features = self._features is not None
        sealed, leaf_rows, node_words, rows, n, t, leaves, levels, a, labelled, max_word = _runtime.forest_take(
            self._items, self._height, self._block, self._roots, idx, self._width, not features)
        sizes = (n * a, n, levels, t, n, 0 if features else leaves, n if labelled else 0, n)
        return _sealed(np.frombuffer(sealed, _I32), sizes, a, max_word,
                       features=_frozen(self._features[np.frombuffer(leaf_rows, _I32)]) if features else None,
                       node_words=np.frombuffer(node_words, _I32) if node_words is not None else None,
                       node_features=(_frozen(self._node_features[np.frombuffer(rows, np.int64)])
                                      if rows is not None else None))

    def _checked(self, items) -> np.ndarray:
        """`items` as int64 positions (a clear error otherwise; the C side checks each
        against the pool, so only a single item, taken as it is, is checked here)."""
        idx = _positions(items, "a forest needs at least one tree")
        if len(idx) == 1 and not 0 <= idx[0] < len(self.forests):
            raise ValueError(f"item {int(idx[0])} is outside the pool's [0, {len(self.forests)})")
        return idx


def _positions(items, empty: str) -> np.ndarray:
    """`items`, a 1-D array of positions, as int64 (TypeError, or ValueError(`empty`))."""
    idx = items if items.__class__ is np.ndarray else np.asarray(items)
    if idx.size == 0:
        raise ValueError(empty)
    if idx.dtype.kind not in "iu" or idx.ndim != 1:
        raise TypeError(f"items are a 1-D array of positions in the pool, got {idx.dtype} {idx.shape}")
    if idx.dtype != np.int64:
        if idx.dtype == np.uint64 and idx.max() > _I32_MAX:      # no pool is that large (past 2**63: negative)
            raise ValueError(f"item {int(idx.max())} is outside the pool")
        idx = idx.astype(np.int64)
    return np.ascontiguousarray(idx)          # C reads it as a buffer (a slice with a step is not one)


def _per_node(forests: list[Forest], field: str, dtype) -> tuple[np.ndarray, np.ndarray | None]:
    """Which forests carry a payload at every node (`field`), and those payloads
    over all of their nodes (zeros for forests without), or None when none does."""
    have = np.array([getattr(f, field) is not None for f in forests])
    if not have.any():
        return have, None
    width = next(getattr(f, field) for f in forests if getattr(f, field) is not None).shape[1:]
    return have, np.concatenate([getattr(f, field) if getattr(f, field) is not None
                                 else np.zeros((f.nodes, *width), dtype) for f in forests])


_INT_FIELDS = ("children", "height", "level_end", "roots", "tree_of", "words", "labels", "index")
_DERIVED = ("_bound", "_sizes", "_flat")         # rebuilt by _assemble, not pickled


def _assemble(**fields) -> Forest:
    """A Forest from its fields (integers already checked to fit int32): the
    integer arrays sealed as views of one immutable bytes object (one copy for
    all: a seal per array cost more than the arrays in a batch), the features
    on their own."""
    given = [(k, fields[k]) for k in _INT_FIELDS if fields[k] is not None]
    # one cast-and-join (a batch's fields come as int16, int32 and int64 arrays)
    flat = np.concatenate([v.reshape(-1) for _, v in given], dtype=_I32, casting="unsafe")
    sealed, at = np.frombuffer(flat.tobytes(), _I32), 0
    sizes = dict.fromkeys(_INT_FIELDS, 0)
    for k, v in given:
        size = sizes[k] = v.size
        fields[k], at = sealed[at:at + size].reshape(v.shape), at + size
    if fields["features"] is not None:
        fields["features"] = _frozen(np.asarray(fields["features"], np.float32))
    fields.setdefault("node_words", None)
    fields.setdefault("node_features", None)
    if fields["node_words"] is not None:       # own buffers: _flat's layout is what concat reads of a part
        fields["node_words"] = _frozen(np.asarray(fields["node_words"], _I32))
    if fields["node_features"] is not None:
        fields["node_features"] = _frozen(np.asarray(fields["node_features"], np.float32))
    # What Forest.concat reads of a part: the lengths of its fields in `_flat` (0
    # where absent), its arity and largest word id, as int64 bytes (it joins them).
    sizes = [*sizes.values(), fields["children"].shape[1], fields["max_word"]]
    fields.update(_bound={}, _sizes=np.array(sizes, np.int64).tobytes(), _flat=sealed)
    f = object.__new__(Forest)
    for k, v in fields.items():
        object.__setattr__(f, k, v)
    return f


def _parse_each(texts: list, vocab, each: bool = True) -> tuple["_Parsed", np.ndarray]:
    """Every string's trees into one accumulator; each string's end (its nodes).
    `each`: every string must hold a tree (it is a forest of its own)."""
    acc, ends = _Parsed(), []
    for k, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"tree {k}: expected a bracketed string, got {type(t).__name__}")
        before = acc.trees
        _parse_brackets(t, vocab, k, acc)
        if each and acc.trees == before:
            raise ValueError(f"tree {k}: a forest needs at least one tree")
        ends.append(len(acc.words))
    return acc, np.array(ends, np.int64)


def _sealed_each(fields: list, arity: list, max_word: list) -> list[Forest]:
    """Forests of word leaves from their integer fields (each forest's in
    `_INT_FIELDS` order, checked to fit int32), all sealed in one buffer."""
    flat = np.concatenate([v.reshape(-1) for one in fields for v in one], dtype=_I32, casting="unsafe")
    flat = np.frombuffer(flat.tobytes(), _I32)
    forests, at = [], 0
    for one, a, top in zip(fields, arity, max_word):
        sizes = [v.size for v in one]
        forests.append(_sealed(flat[at:at + sum(sizes)], sizes, a, top))
        at += sum(sizes)
    return forests


def _sealed(flat: np.ndarray, sizes, arity: int, max_word: int, *, features=None, node_words=None,
            node_features=None) -> Forest:
    """A Forest whose integer fields are `flat` (sealed int32), laid out as `_assemble`
    lays them out with these sizes (0: the field is absent)."""
    f, at = object.__new__(Forest), 0
    for name, size in zip(_INT_FIELDS, sizes):
        object.__setattr__(f, name, flat[at:at + size] if size else None)
        at += size
    object.__setattr__(f, "children", f.children.reshape(sizes[1], arity))
    for name, value in (("features", features), ("node_words", node_words), ("node_features", node_features),
                        ("max_word", max_word), ("_bound", {}), ("_sizes", _SIZES.pack(*sizes, arity, max_word)),
                        ("_flat", flat)):
        object.__setattr__(f, name, value)
    return f


def _max_word(words, node_words) -> int:
    top = [int(w.max()) for w in (words, node_words) if w is not None and w.size]
    return max(top, default=-1)


def _gather(forests: list[Forest], lengths: np.ndarray) -> dict[str, np.ndarray]:
    """The parts' children (flat), height, roots, tree_of, words, labels and index,
    each concatenated over the parts: one gather from the parts' sealed buffers, whose
    fields have these lengths ([parts, _INT_FIELDS])."""
    starts = (np.cumsum(lengths) - lengths.ravel()).reshape(lengths.shape)     # in the buffers, concatenated
    wanted = [0, 1, 3, 4, 5, 6, 7]
    take, at = lengths[:, wanted].T.ravel(), starts[:, wanted].T.ravel()        # field by field, part by part
    lands = np.cumsum(take) - take
    flat = np.concatenate([f._flat for f in forests])[np.repeat(at - lands, take) + np.arange(int(take.sum()))]
    ends = np.cumsum(take.reshape(len(wanted), -1).sum(axis=1)).tolist()
    names = ("children", "height", "roots", "tree_of", "words", "labels", "index")
    return {name: flat[lo:hi] for name, lo, hi in zip(names, [0] + ends[:-1], ends)}


def _widened(flat: np.ndarray, nodes: np.ndarray, arity: np.ndarray, a: int) -> np.ndarray:
    """Children tables of several widths (flat, part after part) as one table of
    `a` columns, padded with -1."""
    width = np.repeat(arity, nodes)                           # of each node's row
    rows = np.repeat(np.arange(len(width)), width)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(width) - width, width)
    out = np.full((len(width), a), -1, _I32)
    out[rows, cols] = flat
    return out


def _restore(fields: dict) -> Forest:
    """A Forest from the fields `__reduce__` gave (unpickling, copying)."""
    ints = {k: np.asarray(fields[k]) for k in _INT_FIELDS if fields[k] is not None}
    if any(v.dtype != _I32 for v in ints.values()):
        raise ValueError("a pickled Forest's index arrays must be int32")
    fields.update(ints)
    return _assemble(**fields)         # sealed again


def as_forest(value, arity: int | None = None, vocab=None) -> Forest:
    """A Forest from what a user may pass: a Forest, bracketed strings, nested tuples."""
    if isinstance(value, Forest):
        return value
    if isinstance(value, str) or (isinstance(value, (list, tuple)) and value and
                                  all(isinstance(v, str) and v.lstrip().startswith("(") for v in value)):
        return Forest.from_brackets(value, vocab, arity=arity)
    if isinstance(value, (list, tuple)):
        return Forest.from_tuples(list(value) if isinstance(value, list) else value, vocab, arity=arity)
    raise TypeError(f"expected a Forest, bracketed tree strings or nested tuples, got {type(value).__name__}")


# -- one tree at a time (parsing) ----------------------------------------------

def _walk(trees: list):
    """One pre-order walk over every tree: (children, height, tree number,
    items, is-leaf), nodes numbered children before parents."""
    items, parent, slot, leaf, tree_of = [], [], [], [], []
    lists: set[int] = set()
    stack = [(t, -1, 0, k) for k, t in reversed(list(enumerate(trees)))]
    while stack:
        item, up, j, k = stack.pop()
        idx = len(items)
        is_leaf = _is_leaf(item)
        items.append(item)
        parent.append(up)
        slot.append(j)
        leaf.append(is_leaf)
        tree_of.append(k)
        if not is_leaf:
            if not isinstance(item, (tuple, list)) or len(item) == 0:
                raise ValueError(f"tree {k}: a node must be a non-empty tuple of children or a leaf, got {item!r}")
            if isinstance(item, list):        # a list can hold itself: one list, one node
                if id(item) in lists:
                    raise ValueError(f"tree {k}: the same list is a node twice (a cycle, or a shared subtree)")
                lists.add(id(item))
            stack.extend([(child, idx, i, k) for i, child in enumerate(item)])
    n = len(items)
    h = [0] * n                               # by pre-order index: children come after parents
    for i in range(n - 1, -1, -1):
        p = parent[i]
        if p >= 0 and h[p] <= h[i]:
            h[p] = h[i] + 1
    arity = max([len(it) for it, lf in zip(items, leaf) if not lf], default=1)
    up = np.array(parent, np.int64)
    inner = up >= 0
    new = n - 1 - np.arange(n)                # reversed pre-order: children before parents
    ch = np.full((n, arity), -1, np.int64)
    ch[new[up[inner]], np.array(slot, np.int64)[inner]] = new[inner]
    items.reverse()
    leaf.reverse()
    return ch, np.array(h[::-1], np.int64), np.array(tree_of[::-1], np.int64), items, leaf


def _is_leaf(x) -> bool:
    return isinstance(x, (str, int, np.integer, np.ndarray)) and not isinstance(x, bool)


def _word_id(w, vocab) -> int:
    """The id of a leaf's word: an int as it is, a string looked up in `vocab`
    (unknown words map to `vocab.unk` when the vocabulary has one)."""
    if isinstance(w, (int, np.integer)):
        return _checked_id(int(w), w)
    if vocab is None:
        if w.isdigit() and w.isascii():        # '²' is a digit to str.isdigit, not to int
            return _checked_id(int(w), w)
        raise ValueError(f"word {w!r} is not a number and no vocabulary was given: pass one to "
                         "Forest.from_brackets(text, vocab) / from_tuples, or set net.vocab")
    try:
        i = vocab[w]
    except KeyError:
        unk = getattr(vocab, "unk", None)
        if unk is not None:
            return _checked_id(int(unk), w)
        raise ValueError(f"word {w!r} is not in the vocabulary{_near(w, vocab)}; give the vocabulary an "
                         "unknown-word id (Vocab.build(words, unk='<unk>')) to map such words to it") from None
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)):    # 1.7 or "1" would read as another word's id
        raise ValueError(f"vocabulary: word {w!r} has id {i!r}; ids are integers")
    return _checked_id(int(i), w)


def _near(w: str, vocab) -> str:
    """What an unknown word's error adds: the vocabulary's word that differs from it only
    in Unicode form or case (words are matched exactly), else its close words."""
    words = [k for k in vocab if isinstance(k, str)]
    for how, norm in (("another Unicode form", lambda s: unicodedata.normalize("NFC", s)),
                      ("another case", lambda s: unicodedata.normalize("NFC", s).casefold())):
        same = [k for k in words if norm(k) == norm(w)]
        if same:
            return f" (it has {ascii(same[0])}, the same word in {how}: words are matched exactly)"
    close = difflib.get_close_matches(w, words, n=3)
    return f" (close: {', '.join(map(repr, close))})" if close else ""


def _checked_id(i: int, word) -> int:
    if not 0 <= i <= _I32_MAX:
        raise ValueError(f"word {word!r}: id {i} is out of range [0, {_I32_MAX}]")
    return i


_TOKEN = re.compile(r"\(|\)|[^\s()]+")


class _Parsed:
    """Nodes parsed so far, numbered children before parents across trees."""

    def __init__(self):
        self.kids: list[int] = []       # flat (parent, slot, child) triples
        self.words: list[int] = []      # per node (0 at inner nodes)
        self.labels: list[int] = []     # per node, -1 where none was given
        self.height: list[int] = []
        self.tree_of: list[int] = []
        self.trees = 0
        self.known: dict[str, int] = {}  # each word's id, looked up once (the vocabulary is one call's)


def _parse_brackets(text: str, vocab, tree_no: int, acc: _Parsed) -> None:
    """Every tree in one string, into `acc`. A node is `(label child ...)`;
    `(label word)` is a labelled leaf, a bare word an unlabelled one. (The
    lists and the word ids are held in locals: a data set is 10^5 nodes.)"""
    tokens = _TOKEN.findall(text)
    ntok = len(tokens)
    words, labels, height, tree_of, kids, known = acc.words, acc.labels, acc.height, acc.tree_of, acc.kids, acc.known
    k = 0
    while k < ntok:
        if tokens[k] == ")":
            raise ValueError(f"tree {tree_no}: unbalanced brackets (an extra ')')")
        if tokens[k] != "(":
            raise ValueError(f"tree {tree_no}: expected '(' at {tokens[k]!r}")
        frames: list[tuple[int | None, list[int]]] = []   # (label, child ids) of open nodes
        tree = acc.trees
        while True:
            if k >= ntok:
                raise ValueError(f"tree {tree_no}: unbalanced brackets (a '(' is never closed)")
            tok = tokens[k]
            k += 1
            if tok == "(":
                label = None
                if k + 1 < ntok and _is_int(tokens[k]) and tokens[k + 1] != ")":
                    label = int(tokens[k])
                    if not 0 <= label <= _I32_MAX:
                        raise ValueError(f"tree {tree_no}: label {tokens[k]} is out of range [0, {_I32_MAX}]")
                    k += 1
                frames.append((label, []))
                continue
            if tok == ")":
                if not frames:
                    raise ValueError(f"tree {tree_no}: unbalanced brackets (an extra ')')")
                label, ids = frames.pop()
                if not ids:
                    raise ValueError(f"tree {tree_no}: empty brackets '()'")
                if len(ids) == 1 and ids[0] < 0:        # (label word): a labelled leaf
                    node = -ids[0] - 1
                else:
                    ids = [i if i >= 0 else -i - 1 for i in ids]
                    node = len(words)
                    words.append(0)
                    labels.append(-1)
                    height.append(1 + max(map(height.__getitem__, ids)))
                    tree_of.append(tree)
                    for slot, c in enumerate(ids):
                        kids += (node, slot, c)
                labels[node] = -1 if label is None else label
                if not frames:
                    break
                frames[-1][1].append(node)
                continue
            if not frames:
                raise ValueError(f"tree {tree_no}: word {tok!r} outside brackets")
            word = known.get(tok)
            if word is None:
                word = known[tok] = _word_id(tok, vocab)
            frames[-1][1].append(-len(words) - 1)        # a bare word: marked until its node closes
            words.append(word)
            labels.append(-1)
            height.append(0)
            tree_of.append(tree)
        acc.trees += 1


def _is_int(tok: str) -> bool:
    digits = tok[1:] if tok[:1] == "-" else tok
    return digits.isdigit() and digits.isascii()


def _heights(ch: np.ndarray) -> np.ndarray:
    """Height of every node (leaves 0), in one pass: children come before parents."""
    h = [0] * ch.shape[0]
    for i, kids in enumerate(ch.tolist()):
        for k in kids:
            if k >= 0 and h[k] >= h[i]:
                h[i] = h[k] + 1
    return np.array(h, np.int64)


def _tree_of(ch: np.ndarray) -> np.ndarray:
    """The tree number (the rank of its root among the roots) of every node."""
    n = ch.shape[0]
    up = np.arange(n)
    rows = np.broadcast_to(np.arange(n)[:, None], ch.shape)
    up[ch[ch >= 0]] = rows[ch >= 0]          # parent, or itself at a root
    while True:                              # pointer jumping: log2(depth) sweeps
        nxt = up[up]
        if np.array_equal(nxt, up):
            break
        up = nxt
    rank = np.cumsum(up == np.arange(n)) - 1
    return rank[up]


class Vocab(dict):
    """word -> id, built from tokens in order of first appearance. `unk`, when
    not None, is the id unknown words get (otherwise they are an error)."""

    unk: int | None = None

    def __init__(self, words=(), /, **more):
        """As dict's. A vocabulary given as `words` passes on its unknown-word id:
        `Vocab(v)` is `v`'s copy, not one that refuses the words `v` maps to its unk."""
        super().__init__(words, **more)
        self.unk = getattr(words, "unk", None)

    @classmethod
    def build(cls, tokens: Iterable[str], unk: str | None = None) -> "Vocab":
        """The vocabulary of `tokens`; with `unk` (e.g. "<unk>"), that token
        (added last if absent) stands for every unknown word."""
        if isinstance(tokens, (str, bytes)):      # iterating it would give a vocabulary of letters
            raise TypeError(f"Vocab.build takes a list of words, got the {type(tokens).__name__} "
                            f"{_shown(tokens)}; split it first: Vocab.build(text.split())")
        if isinstance(tokens, Mapping):           # its words would be numbered anew, in its order, not by its ids
            raise TypeError(f"Vocab.build numbers a list of words; this {type(tokens).__name__} already maps "
                            f"words to ids: Vocab(it) keeps its ids (and its unknown-word id)")
        v = cls()
        for t in tokens:
            if t not in v:
                v[t] = len(v)
        if unk is not None:
            v.setdefault(unk, len(v))
            v.unk = v[unk]
        return v

    def copy(self) -> "Vocab":
        """A Vocab with the same words and unknown-word id (dict.copy would give a
        plain dict, without `unk`: unknown words would then be refused)."""
        return type(self)(self)

    def __or__(self, other):
        """`v | more`: a Vocab with `v`'s unknown-word id (dict's `|` gives a plain dict)."""
        if not isinstance(other, Mapping):
            return NotImplemented
        v = self.copy()
        v.update(other)
        return v

    def numbering(self) -> dict:
        """Its words in id order (and the unknown-word id), as a numbering file keeps them."""
        return {"words": sorted(self, key=self.__getitem__), **({"unk": self.unk} if self.unk is not None else {})}

    @classmethod
    def from_numbering(cls, numbering: dict) -> "Vocab":
        """The vocabulary a numbering (`numbering()`, a numbering file) gives: word k has id k."""
        v = cls((w, i) for i, w in enumerate(numbering["words"]))
        v.unk = numbering.get("unk")
        return v


def _shown(text) -> str:
    """`text`'s repr, cut short."""
    return repr(text) if len(text) <= 40 else repr(text[:37]) + "..."


def checked_vocab(vocab, size: int | None):
    """`vocab` if it maps strings to ids in [0, size), else a clear error."""
    if vocab is None:
        return None
    if not isinstance(vocab, Mapping):
        raise TypeError(f"a vocabulary maps words to ids (a dict or structc.forest.Vocab), "
                        f"got {type(vocab).__name__}")
    limit = _I32_MAX + 1 if size is None else size
    for word, i in vocab.items():
        if not isinstance(word, str):
            raise TypeError(f"vocabulary keys are words (strings), got {word!r}")
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < limit:
            raise ValueError(f"vocabulary: word {word!r} has id {i!r}, outside [0, {limit})"
                             + (" (the model's vocab)" if size is not None else ""))
    unk = getattr(vocab, "unk", None)
    if unk is not None and not 0 <= unk < limit:
        raise ValueError(f"vocabulary: the unknown-word id {unk} is outside [0, {limit})")
    return vocab


def bind_forest(name: str, value, spec: dict, vocab=None) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The arrays of forest input `name` (as `Net` passes them to native code)
    and its dimensions, from a Forest, bracketed strings or nested tuples
    (words looked up in `vocab`), checked against the model's declaration
    `spec` (arity, vocab or features). A Forest remembers the result: its
    arrays are read-only."""
    return _ForestSpec(dict(spec, name=name)).bind(value, vocab)


class _ForestSpec:
    """One forest input's declaration, with what binding a forest to it needs
    worked out once (names, the cache key), not at every call."""

    __slots__ = ("name", "arity", "vocab", "features", "inner", "mask", "kinds", "key", "names", "dims")

    def __init__(self, spec: dict):
        self.name, self.arity = spec["name"], spec["arity"]
        self.vocab, self.features = spec.get("vocab"), spec.get("features")
        self.inner, self.mask = spec.get("inner", False), spec.get("mask", False)
        self.kinds = spec.get("kinds", False)
        self.key = (self.name, self.arity, self.vocab, self.features, self.inner, self.mask, self.kinds)
        self.names = {k: f"{self.name}.{k}" for k in ("children", "roots", "level_end", "words", "features",
                                                      "node_words", "node_features", "child_mask",
                                                      "leaf_words", "leaf_kind")}
        self.dims = tuple(f"{self.name}.{k}" for k in ("nodes", "leaves", "trees", "levels")
                          + (("leaf_words",) if self.kinds else ()))

    def bind(self, value, vocab) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        f = value if value.__class__ is Forest else as_forest(value, arity=self.arity, vocab=vocab)
        bound = f._bound.get(self.key)
        if bound is None:
            f.check(self.name, self.arity, self.vocab, self.features, self.inner)
            made = f.arrays(self.arity, self.inner, self.mask, self.kinds)
            arrays = {self.names[k]: v for k, v in made.items()}
            leaves = made.get("words", made.get("features"))
            sizes = (made["children"].shape[0], leaves.shape[0], made["roots"].shape[0], made["level_end"].shape[0])
            if self.kinds:
                sizes += (made["leaf_words"].shape[0],)
            bound = f._bound[self.key] = (arrays, dict(zip(self.dims, sizes)))
        return bound


class ForestBinder:
    """Expands forest inputs in a call's keyword arguments (a `Net` binder):
    each forest becomes its validated arrays, and its dimensions are bound."""

    def __init__(self, specs: list[dict]):
        self.specs = specs
        self._bound = [_ForestSpec(s) for s in specs]
        self.vocab = None       # word -> id for forests given as strings or tuples of words

    @classmethod
    def from_meta(cls, meta: dict) -> "ForestBinder | None":
        specs = meta.get("forests") or []
        return cls(specs) if specs else None

    def set_vocab(self, vocab) -> None:
        self.vocab = self.check_vocab(vocab)

    def check_vocab(self, vocab):
        """`vocab` if this model's forests can take it (ids inside every word embedding), else why not."""
        sizes = [s.get("vocab") for s in self.specs]
        if vocab is not None and all(v is None for v in sizes):
            raise TypeError("this model's forests carry feature vectors, not words: it takes no vocabulary")
        return checked_vocab(vocab, min(v for v in sizes if v is not None) if vocab is not None else None)

    def expand(self, given: Mapping[str, object], dims: dict) -> dict:
        out = dict(given)
        for spec in self._bound:
            name = spec.name
            if name not in out:
                raise TypeError(f"missing input '{name}': expected a forest (structc.Forest, "
                                "bracketed tree strings or nested tuples)")
            arrays, sizes = spec.bind(out.pop(name), self.vocab)
            out.update(arrays)
            dims.update(sizes)      # bound even where no array of this entry point shows them
        return out

