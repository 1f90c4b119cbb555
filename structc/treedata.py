"""Tree-structured data sets for `structc train`: labelled trees in treebank form.

A `TreeDataset` feeds a model with one forest input: each batch is one
`Forest` (the trees parsed once, merged per batch), a target declared
`class[t.trees]` gets the roots' labels, one declared `class[t.nodes]` every
node's. Held-out accuracy is measured on the roots, from the forward output
of shape [t.trees, C].
"""
from __future__ import annotations

import gzip
import hashlib
import operator
from importlib.resources import files
from typing import Iterator

import numpy as np

from .datasets import class_output
from .forest import Forest, ForestPool, Vocab
from .heldout import Tally

LOGIC_SHA256 = "6cb7350105b54f40403d9808915069a982caaf8d23caed0e402e7e7b36c107d1"
LOGIC_WORDS = ["T", "F", "and", "or", "xor", "not"]
SENTIMENT_SHA256 = "a41f0c15e5ce6929d91da76781b03039f27ebdca138f5665c1bda8f93eb68539"


class TreeDataset:
    def __init__(self, name: str, train: list, test: list, vocab: dict, description: str = ""):
        """`train`, `test`: bracketed trees, or `Forest`s already parsed with `vocab`'s ids."""
        self.name, self.vocab, self.description = name, vocab, description
        self.train = _parsed(train, vocab)
        self.test = _parsed(test, vocab)
        self.forest = self.root_target = self.node_target = self.output = None
        self._pool: ForestPool | None = None
        self._held_out: tuple | None = None     # (the forests, batch, their batches joined): `held_out_batches`

    def pool(self) -> ForestPool:
        """The training forests as a `ForestPool` (a batch is then a few gathers), built
        once and again only when `train` no longer holds the same forests."""
        pool = self._pool
        if pool is None or not _same(pool.forests, self.train):
            pool = self._pool = ForestPool(self.train)
        return pool

    def __len__(self) -> int:
        return len(self.train)

    def held_out_count(self) -> int:
        """The examples `evaluate` measures (the held-out part)."""
        return len(self.test)

    def bind(self, net) -> "TreeDataset":
        forests = net.meta.get("forests", [])
        if len(forests) != 1:
            raise ValueError(f"data set '{self.name}' holds trees: model {net.name} must declare one forest input")
        spec = forests[0]
        self.forest = spec["name"]
        self.root_target = self.node_target = None      # this model's, not a model bound before
        arity = max(f.arity for f in self.train)
        if spec["arity"] < arity or spec.get("vocab") is None or spec["vocab"] < len(self.vocab):
            raise ValueError(f"data set '{self.name}' has trees of arity {arity} over {len(self.vocab)} words: "
                             f"declare `input {self.forest}: forest(arity={arity}) of word(vocab={len(self.vocab)})`")
        self._check_labelled()
        top = max(int(f.labels.max()) for f in self.train + self.test)
        roots = max(int(f.root_labels.max()) for f in self.train + self.test)
        for s in net.meta["inputs"]:
            if s["kind"] != "target":
                continue
            if s["shape"] == [f"{self.forest}.trees"]:
                self.root_target = s
            elif s["shape"] == [f"{self.forest}.nodes"]:
                self.node_target = s
            else:
                raise ValueError(f"data set '{self.name}': target '{s['name']}' must be class[{self.forest}.trees] "
                                 f"or class[{self.forest}.nodes]")
            if s["classes"] <= (top if s is self.node_target else 1):
                raise ValueError(f"data set '{self.name}': target '{s['name']}' needs more than "
                                 f"{s['classes']} classes")
            if s is self.root_target and s["classes"] <= roots:
                raise ValueError(f"data set '{self.name}' has root labels up to {roots}, but target '{s['name']}' "
                                 f"declares {s['classes']} classes")
        if self.root_target is None and self.node_target is None:
            raise ValueError(f"data set '{self.name}': the model declares no target")
        # accuracy on the roots: an output [trees, C] for the root (else node) target's C classes
        target = self.root_target or self.node_target
        self.output = class_output(net, {**target, "shape": [f"{self.forest}.trees"]})
        return self

    def _check_labelled(self) -> None:
        """Refuse forests without labels: a target needs every tree's (a forest made from
        tuples or ids alone has none)."""
        for part, forests in (("training", self.train), ("held-out", self.test)):
            bare = [k for k, f in enumerate(forests) if f.labels is None]
            if bare:
                raise ValueError(f"data set '{self.name}': {len(bare)} {part} forest(s) carry no labels "
                                 f"(the first: {part} forest {bare[0]}); a data set's trees need a label on "
                                 f"every node, as in Forest.from_brackets('(3 (2 good) (2 movie))') or "
                                 f"Forest.from_arrays(..., labels=...)")

    def feed(self, forest: Forest) -> dict:
        feed = {self.forest: forest}
        if self.root_target is not None:
            feed[self.root_target["name"]] = forest.root_labels
        if self.node_target is not None:
            feed[self.node_target["name"]] = forest.labels
        return feed

    def batches(self, batch: int, rng: np.random.Generator) -> Iterator[dict]:
        order = rng.permutation(len(self.train))
        pool = self.pool()
        for first in range(0, len(order), 16 * batch):      # 16 batches' forests assembled in one pass
            chunk = order[first:first + 16 * batch]
            yield from map(self.feed, pool.take_many([chunk[at:at + batch] for at in range(0, len(chunk), batch)]))

    def batch_count(self, batch: int) -> int:
        return (len(self.train) + batch - 1) // batch

    def held_out_batches(self, batch: int) -> list[Forest]:
        """The held-out forests joined `batch` at a time, joined once and again only when
        `test` no longer holds the same forests (every epoch evaluates them)."""
        kept = self._held_out
        if kept is None or kept[1] != batch or not _same(kept[0], self.test):
            joined = [Forest.concat(self.test[at:at + batch]) for at in range(0, len(self.test), batch)]
            kept = self._held_out = (list(self.test), batch, joined)
        return kept[2]

    def evaluate(self, net, batch: int = 512) -> dict:
        """Held-out accuracy on the roots (when the model outputs [trees, C]) and loss:
        each term of the loss weighed by what it is a mean over (trees, nodes), so it is
        one call's on every held-out tree however they are batched (`structc.heldout`)."""
        return self.held_out_tally(net, batch).metrics()

    def held_out_tally(self, net, batch: int = 512):
        """The held-out part's `structc.heldout.Tally`, `batch` examples a call."""
        tally = Tally(net, self.output)
        for part in self.held_out_batches(batch):
            tally.measure(self.feed(part), part.root_labels)     # one forward call
        return tally


def _same(kept: list, now: list) -> bool:
    """Whether `now` holds the very forests `kept` was made from, in order."""
    return len(kept) == len(now) and all(map(operator.is_, kept, now))


def _parsed(trees: list, vocab) -> list[Forest]:
    """Each of `trees` a Forest: the strings parsed together (`Forest.each_from_brackets`)."""
    trees = list(trees)
    strings = [k for k, t in enumerate(trees) if not isinstance(t, Forest)]     # their positions
    for k, f in zip(strings, Forest.each_from_brackets([trees[k] for k in strings], vocab)):
        trees[k] = f
    return trees


def _shipped_lines(name: str, sha256: str) -> list[str]:
    """The lines of a treebank shipped in structc/data, its checksum checked."""
    raw = files("structc.data").joinpath(f"{name}.txt.gz").read_bytes()
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise RuntimeError(f"structc's copy of the {name} data is damaged (checksum mismatch); reinstall structc")
    return gzip.decompress(raw).decode().split("\n")[:-1]


def load_logic() -> TreeDataset:
    """Boolean formulas with their truth at every node (see data/make_logic.py)."""
    lines = _shipped_lines("logic", LOGIC_SHA256)
    return TreeDataset("logic", lines[:6000], lines[6000:], Vocab.build(LOGIC_WORDS),
                       description="boolean formulas (T, F, and, or, xor, not), truth at every node; "
                                   "6,000 training / 2,000 held-out trees")


def load_sentiment() -> TreeDataset:
    """Sentences about films with SST's five-point sentiment at every phrase, made by
    a documented grammar (see data/make_sentiment.py)."""
    from .data.make_sentiment import WORDS
    lines = _shipped_lines("sentiment", SENTIMENT_SHA256)
    return TreeDataset("sentiment", lines[:6000], lines[6000:], Vocab.build(WORDS),
                       description="binary parse trees of sentences about films, sentiment 0-4 at every "
                                   "phrase (SST's form); 6,000 training / 2,000 held-out sentences")
