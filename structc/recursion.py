"""Forest inputs and recursive definitions in the language (the build side).

    input t: forest(arity=2) of word(vocab=1000)     # or: forest of f32[16]
    target y: class[t.trees] of 5                    # per tree; class[t.nodes] per node
    rec h(n) = leaf: E[n.word]
               node: tanh(dense(concat(h(n.left), h(n.right)), 64))
    loss cross_entropy(dense(h(t.root), 5), y)       # h(t.nodes): every node's state

A forest input is four integer arrays (`t.children`, `t.level_end`,
`t.roots`, and `t.words` or `t.features`; see `forest`) and four symbols
(`t.nodes`, `t.leaves`, `t.trees`, `t.levels`) bound per call. The leaf case
is built over the leaves like any expression; the node case is built into a
sub-graph, one row per node, whose input is the children's states side by
side. Inside it: `n.left`, `n.right`, `n.children[k]` name one child,
`sum(h(n.children))` and `concat(h(n.children))` all of them (a missing
child's state is zero). The two become one `tree_map` node (`ops.tree`).

    rec (h, c)(n) = leaf: { s = lstm_state(dense(E[n.word], 96), 0); (chunk(s, 0, 2), chunk(s, 1, 2)) }
                    node: { s = lstm_state(dense(sum(h(n.children)), 96),
                                           sum(sigmoid(dense(h(k), 32)) * c(k) for k in n.children));
                            (chunk(s, 0, 2), chunk(s, 1, 2)) }

Several states are one state per node, side by side (`State`: each name's
columns); `{ a = ...; value }` binds names in a case; a per-child term runs
over one row per child slot (`kids`), a missing child's row masked out.
With `forest(inner=true)` the node case reads its own `n.word` / `n.x`.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import syntax as S
from .errors import ShapeMismatch, SnetNameError, SnetShapeError, SnetTypeError, Span
from .graph import Builder, Graph, Value
from .leafwords import by_distinct_word
from .ops import REGISTRY
from .ops.tree import BODY_ROWS
from .types import TensorType

#: the most children a node can have: the node case gets arity x width inputs per node
MAX_ARITY = 64
ARRAYS = ("children", "level_end", "roots", "words", "features", "node_words", "node_features", "child_mask")
DIMS = ("nodes", "leaves", "trees", "levels")
#: a node case's row-aligned inputs -> the forest array holding them, one row per node
NODE_ARRAYS = {"word": "node_words", "x": "node_features", "@mask": "child_mask"}


@dataclass
class ForestDecl:
    name: str
    arity: int
    vocab: int | None         # word ids in [0, vocab) at the leaves, or
    features: int | None      # feature vectors of this length
    span: Span
    inner: bool = False       # inner nodes carry a word / feature vector too (`forest(inner=true)`)
    mask: bool = False        # the model reads `t.child_mask` (per-child terms: which slots hold a child)
    kinds: bool = False       # the leaf case runs per distinct word (`leafwords`): `t.leaf_words`, `t.leaf_kind`

    def sym(self, dim: str) -> str:
        return f"{self.name}.{dim}"

    def meta(self) -> dict:
        return {"name": self.name, "arity": self.arity, "vocab": self.vocab, "features": self.features,
                "inner": self.inner, "mask": self.mask, "kinds": self.kinds}


# -- declarations ---------------------------------------------------------------

def declare_forest(mb, s: S.InputDecl) -> None:
    """`input t: forest(arity=A) of word(vocab=V)` or `... of f32[F]`; `inner=true`:
    every node carries one (read as n.word / n.x in the node case too)."""
    t = s.type
    if s.kind != "input":
        raise SnetTypeError("a forest is an input, not a target; label its trees with "
                            f"`target y: class[{s.name}.trees] of C`", t.span)
    arity, inner = 2, False
    for opt in t.options:
        if opt.name == "inner":
            inner = _bool_option(opt)
            continue
        if opt.name != "arity":
            raise SnetTypeError(f"forest has no option '{opt.name}' (options: arity, inner)", opt.span)
        v = opt.value.value if isinstance(opt.value, S.Number) else None
        if not isinstance(v, int) or v < 1:
            raise SnetTypeError("arity must be a positive integer, e.g. forest(arity=3)", opt.span)
        if v > MAX_ARITY:       # the node case is built, and its children gathered, per child slot
            raise SnetTypeError(f"arity {v} is more children than a forest can have (at most {MAX_ARITY})", opt.span)
        arity = v
    vocab = features = None
    leaf = t.leaf
    if isinstance(leaf, S.Call) and leaf.func == "word":
        kw = {k.name: k.value for k in leaf.kwargs}
        v = kw.get("vocab", leaf.args[0] if len(leaf.args) == 1 else None)
        v = v.value if isinstance(v, S.Number) else None
        if not isinstance(v, int) or v < 1 or set(kw) - {"vocab"} or len(leaf.args) + len(kw) != 1:
            raise SnetTypeError("leaves carrying words are declared word(vocab=V), V a positive integer", leaf.span)
        from .build import MAX_CLASSES
        if v > MAX_CLASSES:     # word ids are int32
            raise SnetTypeError(f"a vocabulary of {v} words does not fit int32 word ids (at most 2**31 - 1)",
                                leaf.span)
        vocab = v
    elif isinstance(leaf, S.TensorTypeExpr) and leaf.dtype == "f32" and len(leaf.dims) == 1 \
            and isinstance(leaf.dims[0].value, int) and leaf.dims[0].value > 0:
        features = leaf.dims[0].value
    else:
        raise SnetTypeError("a forest's leaves carry words, word(vocab=V), or feature vectors, f32[F]", leaf.span)
    forests = mb.forests
    decl = ForestDecl(s.name, arity, vocab, features, s.span, inner)
    mb.define(s.name, s.name_span, ForestRef(decl), rebind=False)
    forests[s.name] = decl
    for d in DIMS:
        mb.symbols.add(decl.sym(d))
    n, l, tr, lv = (decl.sym(d) for d in DIMS)
    arrays = {"children": TensorType((n, arity), "i32"), "level_end": TensorType((lv,), "i32"),
              "roots": TensorType((tr,), "i32")}
    if vocab is not None:
        arrays["words"] = TensorType((l,), "i32")
    else:
        arrays["features"] = TensorType((l, features), "f32")
    if inner:       # every node's payload, in schedule order: the node case reads its level's rows
        arrays["node_words" if vocab is not None else "node_features"] = \
            TensorType((n,), "i32") if vocab is not None else TensorType((n, features), "f32")
    for k, ty in arrays.items():
        add_forest_array(mb, decl, k, ty, s.span)


def add_forest_array(mb, decl: ForestDecl, k: str, ty: TensorType, span: Span) -> None:
    """One of a forest's arrays as an input of the model (kind `forest`: `Net` binds it)."""
    from .build import InputSpec
    name = f"{decl.name}.{k}"
    if name in mb.graph.inputs:
        return
    classes = decl.vocab if k in ("words", "node_words") else 0
    nid = mb.graph.add(REGISTRY["input"], (), {"name": name, "kind": "forest", "type": ty, "classes": classes},
                       span, type=ty)
    mb.graph.inputs[name] = nid
    mb.inputs[name] = InputSpec(name, "forest", ty, classes, span)


def _bool_option(opt) -> bool:
    v = opt.value
    word = v.id if isinstance(v, S.Name) else None
    if word not in ("true", "false"):
        raise SnetTypeError(f"forest option {opt.name} is true or false, got {S.unparse(v)}", opt.span)
    return word == "true"


def forest_array(mb, decl: ForestDecl, what: str) -> Value:
    return Builder(mb.graph).value(mb.graph.inputs[f"{decl.name}.{what}"])


def check_dim(mb, d: S.Dim) -> None:
    """A dimension written `t.nodes`: a forest's, declared before."""
    base, attr = d.value.split(".", 1)
    if base not in mb.forests:
        raise SnetNameError(f"'{base}' is not a forest input declared above, so '{d.value}' is not a dimension", d.span)
    if attr not in ("nodes", "trees", "leaves"):
        raise SnetNameError(f"a forest's dimensions are {base}.nodes, {base}.trees and {base}.leaves, "
                            f"not '{d.value}'", d.span)


# -- values the language sees -----------------------------------------------------

class ForestRef:
    """`t` in expressions: `t.root` / `t.roots` and `t.nodes`, arguments of a rec function."""

    def __init__(self, decl: ForestDecl):
        self.decl = decl

    def __repr__(self) -> str:
        return f"the forest {self.decl.name} (use h({self.decl.name}.root) or h({self.decl.name}.nodes))"

    def snet_attr(self, mb, e: S.Attr):
        name, span = e.name, e.span
        if name in ("root", "roots", "nodes"):
            return Select(self.decl, "nodes" if name == "nodes" else "roots", span)
        if name in ("trees", "leaves", "levels"):
            raise SnetTypeError(f"{self.decl.name}.{name} is a dimension; use it in a type, e.g. "
                                f"class[{self.decl.name}.{name}] of 2", span)
        raise SnetNameError(f"a forest has no '{name}': use {self.decl.name}.root (each tree's root) or "
                            f"{self.decl.name}.nodes (every node), as in h({self.decl.name}.root)", span)


@dataclass
class Select:
    decl: ForestDecl
    which: str                # "roots" | "nodes"
    span: Span

    def __repr__(self) -> str:
        return f"{self.decl.name}.{'root' if self.which == 'roots' else 'nodes'} (an argument of a recursion: h(...))"


class LeafRef:
    """`n` in the leaf case: `n.word`, `n.x`."""

    def __init__(self, decl: ForestDecl, mb):
        self.decl, self.mb = decl, mb

    def __repr__(self) -> str:
        return "a leaf n (use n.word or n.x)"

    def snet_attr(self, mb, e: S.Attr):
        name, span = e.name, e.span
        if name == "word":
            if self.decl.vocab is None:
                raise SnetTypeError(f"the leaves of '{self.decl.name}' carry feature vectors: use n.x", span)
            return forest_array(self.mb, self.decl, "words")
        if name in ("x", "features"):
            if self.decl.features is None:
                raise SnetTypeError(f"the leaves of '{self.decl.name}' carry words: use n.word", span)
            return forest_array(self.mb, self.decl, "features")
        if name in ("left", "right", "children"):
            raise SnetTypeError(f"a leaf has no children: n.{name} belongs in the node case", span)
        raise SnetNameError(f"a leaf has no '{name}' (it has n.word or n.x)", span)


@dataclass
class Child:
    k: int

    def __repr__(self) -> str:
        return "a child of n (an argument of the recursion: h(n.left))"


class Children:
    """`n.children`: one child with `[k]`, all of them inside sum or concat."""

    def __init__(self, arity: int):
        self.arity = arity

    def __repr__(self) -> str:
        return "n.children (use h(n.children) in sum(...) or concat(...))"

    def snet_subscript(self, mb, e: S.Index):
        k = mb.eval(e.index)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.arity:
            raise SnetTypeError(f"a child is picked by a number in [0, {self.arity}), got {S.unparse(e.index)}",
                                e.index.span)
        return Child(k)


class NodeRef:
    """`n` in the node case: `n.left`, `n.right`, `n.children`; `n.word` or
    `n.x` (this node's own, when the forest is declared `inner=true`)."""

    def __init__(self, decl: ForestDecl):
        self.decl = decl

    def __repr__(self) -> str:
        return "a node n (use h(n.left), h(n.right), h(n.children))"

    def snet_attr(self, mb, e: S.Attr):
        name, span = e.name, e.span
        a = self.decl.arity
        if name in ("left", "right"):
            if a < 2:
                raise SnetTypeError(f"n.{name} needs trees of arity 2 or more; this forest has arity {a}", span)
            return Child(0 if name == "left" else 1)
        if name == "children":
            return Children(a)
        if name in ("word", "x", "features"):
            if not self.decl.inner:
                raise SnetTypeError(f"only leaves carry n.{name}: use it in the leaf case, or declare "
                                    f"`forest(inner=true)` for a word or vector at every node", span)
            if name == "word" and self.decl.vocab is None:
                raise SnetTypeError(f"the nodes of '{self.decl.name}' carry feature vectors: use n.x", span)
            if name != "word" and self.decl.features is None:
                raise SnetTypeError(f"the nodes of '{self.decl.name}' carry words: use n.word", span)
            return mb.node_input("word" if name == "word" else "x")
        raise SnetNameError(f"a node has no '{name}' (it has n.left, n.right, n.children)", span)


@dataclass(frozen=True)
class State:
    """One state of a recursion: its columns [at, at + width) of each node's row."""
    name: str
    at: int
    width: int
    total: int      # the row's width: every state side by side

    def columns(self, b: Builder, x: Value, base: int = 0) -> Value:
        if base == 0 and x.shape[1] == self.width:
            return x
        return b.slice(x, axis=1, start=base + self.at, stop=base + self.at + self.width)


class RecFn:
    """`h` after `rec h(n) = ...`: h(t.nodes) is every node's state, h(t.root) each root's."""

    def __init__(self, name: str, states: Value, decl: ForestDecl, state: State | None = None):
        self.name, self.states, self.decl = name, states, decl
        w = states.shape[1]
        self.state = state or State(name, 0, w, w)

    def __repr__(self) -> str:
        return f"the recursion {self.name} (call it: {self.name}({self.decl.name}.root))"

    def snet_call(self, mb, e: S.Call):
        if len(e.args) != 1 or e.kwargs:
            raise SnetTypeError(f"{self.name} takes one argument, e.g. {self.name}({self.decl.name}.root)", e.span)
        sel = mb.eval(e.args[0])
        if not isinstance(sel, Select) or sel.decl is not self.decl:
            raise SnetTypeError(f"{self.name} applies to the nodes of forest '{self.decl.name}': "
                                f"{self.name}({self.decl.name}.root) or {self.name}({self.decl.name}.nodes)",
                                e.args[0].span)
        b = Builder(mb.graph, e.span)
        if sel.which == "nodes":
            return self.state.columns(b, self.states)
        # the roots' rows first, then the state's columns: the copy is [trees, .], not [nodes, .],
        # and the cotangent reaches the recursion as the roots' alone (`tree_map`'s from_roots)
        return self.state.columns(b, b.gather_rows(self.states, forest_array(mb, self.decl, "roots")))


class Kid:
    """`k` in `sum(... for k in n.children)`: every child slot at once (one row each)."""

    def __repr__(self) -> str:
        return "a child of n in a per-child term (an argument of the recursion: h(k))"


class RecSelf:
    """`h` inside its own node case: h(child) is a slice of the children's block."""

    def __init__(self, name: str, block: Value, state: State, arity: int, kids):
        self.name, self.block, self.st, self.arity = name, block, state, arity
        self.width = state.width
        self.kids = kids            # () -> the block viewed as one row per child slot

    def __repr__(self) -> str:
        return f"the recursion {self.name} (call it on a child: {self.name}(n.left))"

    def state(self, b: Builder, k: int) -> Value:
        return self.st.columns(b, self.block, base=k * self.st.total)

    def snet_call(self, mb, e: S.Call):
        if len(e.args) != 1 or e.kwargs:
            raise SnetTypeError(f"{self.name} takes one child, e.g. {self.name}(n.left)", e.span)
        child = mb.eval(e.args[0])
        if isinstance(child, Children):
            raise SnetTypeError(f"{self.name}(n.children) is every child's state: use it in sum(...) "
                                f"or concat(...), or write sum(... {self.name}(k) ... for k in n.children)", e.span)
        b = Builder(mb.graph, e.span)
        if isinstance(child, Kid):
            return self.st.columns(b, self.kids())
        if not isinstance(child, Child):
            raise SnetTypeError(f"inside the node case, {self.name} takes a child: {self.name}(n.left), "
                                f"{self.name}(n.children[k])", e.args[0].span)
        return self.state(b, child.k)


class Unborn:
    """A state inside the leaf case, which defines it: using it is an error."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"the state {self.name}, which this leaf case defines"

    def snet_call(self, mb, e: S.Call):
        raise SnetNameError(f"{self.name} is used before it is defined: the leaf case defines a leaf's "
                            f"{self.name}, so it cannot read it (only the node case reads its children's)",
                            e.span)


# -- rec h(n) = leaf: ... node: ...  (or rec (h, c)(n)) ---------------------------

def build_rec(mb, s: S.RecDecl, cases: tuple = ("leaf", "node")) -> None:
    """`cases`: the words that opened the two cases, for messages (a sequence's
    `init:` / `next:` are built as a chain's leaf and node cases)."""
    from .ops.tree import _tags, fold_concat_of_slices, is_block, prepare
    from .passes.dce import dce
    forests = mb.forests
    names = s.names or (s.name,)
    spans = s.name_spans or (s.name_span,)
    if len(forests) != 1:
        raise SnetTypeError("a recursive definition needs exactly one forest input declared before it "
                            f"(found {len(forests)})", s.name_span)
    decl = next(iter(forests.values()))
    for k, (name, span) in enumerate(zip(names, spans)):
        if name in mb.env:
            raise SnetNameError(f"'{name}' is already defined (line {mb.defined_at[name].line})", span)
        if name in names[:k]:
            raise SnetNameError(f"'{name}' names two states of this recursion", span)

    # The leaf case: ordinary graph work over the leaves.
    saved = {k: mb.env.get(k) for k in (s.param, *names)}
    mb.env[s.param] = LeafRef(decl, mb)
    mb.env.update({name: Unborn(name) for name in names})
    try:
        leaf = [_leaf_value(mb, v, e) for v, e in _case_values(mb, s.leaf, names, cases[0])]
    finally:
        for k, v in saved.items():
            _restore(mb.env, k, v)
    widths = [v.shape[1] for v in leaf]
    total = sum(widths)
    states = [State(n, sum(widths[:k]), w, total) for k, (n, w) in enumerate(zip(names, widths))]
    leaf = _joined(mb.graph, leaf) or Builder(mb.graph, s.leaf.span).concat(*leaf, axis=1)
    if type(decl) is ForestDecl:        # (a sequence's chain: its leaves are its sequences' first positions)
        leaf = by_distinct_word(mb, decl, leaf)

    # The node case: a sub-graph over one row per node.
    body = Graph(f"{s.name}.node")
    ct = TensorType((BODY_ROWS, decl.arity * total))
    cin = body.add(REGISTRY["input"], (), {"name": "children", "kind": "input", "type": ct, "classes": 0},
                   s.node.span, type=ct)
    body.inputs["children"] = cin
    bb = BodyBuilder(mb, body, s, decl, Builder(body).value(cin), states)
    outs = []
    for st, (out, e) in zip(states, _case_values(bb, s.node, names, cases[1])):
        if not isinstance(out, Value) or not out.type.is_float:
            raise SnetTypeError(f"the {cases[1]} case must give a float vector per node, got {_what(out)}", e.span)
        if out.type.rank == 1 and isinstance(out.shape[0], int):
            out = Builder(body, e.span).broadcast_to(out, shape=(BODY_ROWS, out.shape[0]))
        if out.shape != (BODY_ROWS, st.width):
            got = ", ".join(map(str, out.shape[1:])) if out.shape[:1] == (BODY_ROWS,) else str(out.type)
            what = "states" if len(states) == 1 else st.name
            raise SnetShapeError(f"the node case gives {what} of shape [{got}], the leaf case [{st.width}]: "
                                 "a node's state must have one shape", e.span)
        outs.append(out)
    out = outs[0] if len(outs) == 1 else Builder(body, s.node.span).concat(*outs, axis=1)
    _check_rows_stay_apart(body, set(body.inputs.values()), s.node.span)
    body.outputs["h"] = out.id
    fold_concat_of_slices(body)
    dce(body)
    blocks = split_state_blocks(body, states, decl.arity)
    if blocks:
        fold_concat_of_slices(body)
        dce(body)
    try:
        fwd = prepare(body, f"{s.name}.node", decl.arity)
    except ShapeMismatch as err:
        raise SnetShapeError(str(err), s.node.span) from None

    b = Builder(mb.graph, s.span)
    nodes = decl.sym("nodes")
    sr = b.scratch(shape=(nodes, decl.arity * total + fwd.rows_floats), tag=next(_tags))
    sf = b.scratch(shape=(max(fwd.fixed_floats, 16),), tag=next(_tags))
    params = [b.value(mb.graph.params[p]) for p in body.params]
    node_inputs = tuple(k for k in body.inputs if not is_block(k))
    if "@mask" in node_inputs:
        decl.mask = True
        add_forest_array(mb, decl, "child_mask", TensorType((nodes, decl.arity)), s.span)
    rows = [forest_array(mb, decl, NODE_ARRAYS[k]) for k in node_inputs]
    # leaves that are rows of a table (E[n.word], or a state per distinct word): the
    # kernel copies each leaf's row into H itself, with no gathered copy in between
    gathered = mb.graph.nodes[leaf.id]
    indexed = gathered.op.name == "gather_rows" and not mb.graph.users(leaf.id)
    if indexed:
        table, ids = gathered.inputs
        leaf, rows = b.value(table), [b.value(ids), *rows]
    H = b.tree_map(forest_array(mb, decl, "children"), forest_array(mb, decl, "level_end"),
                   forest_array(mb, decl, "roots"), leaf, sr, sf, *rows, *params,
                   body=body, fwd=fwd, arity=decl.arity, width=total, rec=s.name, node_inputs=node_inputs,
                   blocks=blocks, indexed=indexed)
    for st, span in zip(states, spans):
        mb.env[st.name] = RecFn(st.name, H, decl, st)
        mb.defined_at[st.name] = span


def split_state_blocks(body: Graph, states: list, arity: int) -> tuple:
    """Give the node case each state of the children in a block of its own:
    input `children.<k>` [rows, A*w_k] (`ops.tree.child_blocks`) instead of
    slices of `children` [rows, A*total]. A child's state is then a view of
    its block over the child slots (`h(k)` in a per-child term), the block
    itself in a chain (`h(t.prev)`), or a slice of the smaller block: the
    copies of a state's columns per level go, and so do their VJPs' padded
    concats in the backward. Done when the node case reads `children` only
    through whole states (what `h(...)` builds); returns ((k, at, w), ...)
    for the states it reads, or () when it keeps the one block."""
    cin = body.inputs.get("children")
    if len(states) < 2 or cin is None:
        return ()
    total = states[0].total
    by_columns = {(st.at, st.at + st.width): k for k, st in enumerate(states)}
    found = []      # (node to replace, state, child slot or None for the slots' view)
    for u in body.users(cin):
        node = body.nodes[u]
        if node.op.name == "slice" and node.attrs["axis"] % 2 == 1:
            a, at = divmod(node.attrs["start"], total)
            k = by_columns.get((at, at + node.attrs["stop"] - node.attrs["start"]))
            if k is None:
                return ()
            found.append((u, k, a))
        elif node.op.name == "tree_kids" and node.attrs["arity"] == arity:
            for v in body.users(u):
                view = body.nodes[v]
                if view.op.name != "slice" or view.attrs["axis"] % 2 != 1:
                    return ()
                k = by_columns.get((view.attrs["start"], view.attrs["stop"]))
                if k is None:
                    return ()
                found.append((v, k, None))
        else:
            return ()
    span = body.nodes[cin].span
    inputs = {}
    for k in sorted({k for _, k, _ in found}):
        t = TensorType((BODY_ROWS, arity * states[k].width))
        name = f"children.{k}"
        inputs[k] = body.add(REGISTRY["input"], (), {"name": name, "kind": "input", "type": t, "classes": 0},
                             span, type=t)
        body.inputs[name] = inputs[k]
    views = {}
    for nid, k, a in found:
        b = Builder(body, body.nodes[nid].span)
        block, w = b.value(inputs[k]), states[k].width
        if a is None:
            if k not in views:
                views[k] = b.tree_kids(block, arity=arity)
            new = views[k]
        else:
            new = block if arity == 1 else b.slice(block, axis=1, start=a * w, stop=(a + 1) * w)
        body.replace_uses(nid, new.id)
    del body.inputs["children"]
    from .passes.dce import dce
    dce(body)
    if cin in body.nodes:
        body.remove(cin)
    return tuple((k, states[k].at, states[k].width) for k in sorted(inputs))


def _case_values(mb, e, names, case: str) -> list:
    """A case's (value, expression) for each state, its local names bound
    first: a tuple of as many values as there are states (written, or
    returned by a layer such as lstm_cell)."""
    if isinstance(e, S.CaseBlock):
        saved = {}
        try:
            for a in e.bindings:
                # (a, ac) = lstm_cell(...), or a = ...: local names, which may shadow the model's
                # (examples/logic_treelstm.snet binds s, its target, in both cases)
                unpack = isinstance(a, S.Unpack)
                targets = list(zip(a.names, a.name_spans)) if unpack else [(a.name, a.name_span)]
                for name, span in targets:
                    if name in names:
                        raise SnetNameError(f"'{name}' is a state of this recursion: the {case} case gives it "
                                            "as its value, it cannot bind it", span)
                values = mb.unpack(a) if unpack else [mb.eval(a.value)]
                for (name, _), v in zip(targets, values):
                    saved.setdefault(name, mb.env.get(name))
                    mb.env[name] = v
            return _case_values(mb, e.value, names, case)
        finally:
            for k, v in saved.items():
                _restore(mb.env, k, v)
    if isinstance(e, S.Tuple) and len(names) > 1:
        values = [(mb.eval(x), x) for x in e.items]
    else:
        v = mb.eval(e)
        values = [(x, e) for x in v] if isinstance(v, tuple) and len(v) > 1 else [(v, e)]
    if len(values) != len(names):
        got = len(values)
        raise SnetTypeError(f"the {case} case gives {got} value{'s' if got != 1 else ''} for {len(names)} "
                            f"state{'s' if len(names) != 1 else ''} ({', '.join(names)})"
                            + (f": write them as a tuple, ({', '.join(names)})" if len(names) > 1 else
                               ": declare as many states, rec (h, c)(n) = ..."), e.span)
    return values


def _joined(graph: Graph, values: list) -> Value | None:
    """The one tensor `values` are (one value, or the column blocks of a tensor
    in order: chunk(s, 0, 2), chunk(s, 1, 2)), so that no copy joins them."""
    if len(values) == 1:
        return values[0]
    nodes = [graph.nodes[v.id] for v in values]
    if not all(n.op.name == "slice" and n.attrs["axis"] % 2 == 1 for n in nodes):
        return None
    src = nodes[0].inputs[0]
    at = 0
    for n in nodes:
        if n.inputs[0] != src or n.attrs["start"] != at:
            return None
        at = n.attrs["stop"]
    whole = Builder(graph).value(src)
    return whole if whole.shape[1] == at else None


def _leaf_value(mb, v, e) -> Value:
    """A leaf case's value for one state: [leaves, d] (a constant vector is broadcast)."""
    nl = next(iter(mb.forests.values())).sym("leaves")
    if not isinstance(v, Value) or not v.type.is_float:
        raise SnetTypeError(f"the leaf case must give a float vector per leaf, got {_what(v)}", e.span)
    if v.type.rank == 1 and isinstance(v.shape[0], int):
        v = Builder(mb.graph, e.span).broadcast_to(v, shape=(nl, v.shape[0]))
    if v.type.rank != 2 or v.shape[0] != nl or not isinstance(v.shape[1], int):
        raise SnetShapeError(f"the leaf case must give one vector per leaf, f32[{nl}, d], got {v.type}", e.span)
    return v


def _check_rows_stay_apart(body: Graph, inputs: set, span: Span) -> None:
    """Every value computed from the children (or the node's own inputs) must
    keep one row per node (or per child slot, in a per-child term). A value of
    parameters and constants alone (transpose(W)) is the same for every node:
    it is allowed, and lowering hoists it out of the recursion."""
    from .ops.tree import BODY_KIDS
    per_node = set(inputs)
    for nid in sorted(body.nodes):          # ids grow with building: inputs come first
        node = body.nodes[nid]
        if not any(i in per_node for i in node.inputs):
            continue
        per_node.add(nid)
        if node.type.rank == 0 and "elementwise" in node.op.traits:
            continue
        if not node.shape or node.shape[0] not in (BODY_ROWS, BODY_KIDS):
            raise SnetShapeError(f"the node case must compute each node's state from its own children; "
                                 f"{node.op.name} here mixes nodes ({node.type})", node.span or span)


def _restore(env, key, saved):
    if saved is None:
        env.pop(key, None)
    else:
        env[key] = saved


def _what(v) -> str:
    if isinstance(v, Value):
        return f"a tensor {v.type}"
    return type(v).__name__.lower() if not isinstance(v, (int, float)) else f"the number {v}"


def _body_builder_class():
    from .build import ModelBuilder

    class BodyBuilder(ModelBuilder):
        """Builds a node case into its own graph; parameters it creates or uses
        are the model's, mirrored by param nodes of the body."""

        def __init__(self, parent, graph: Graph, s: S.RecDecl, decl: ForestDecl, block: Value, states):
            self.__dict__.update(parent.__dict__)
            self.parent = parent
            self.graph = graph
            self.b = Builder(graph)
            self.env = dict(parent.env)
            self.env[s.param] = NodeRef(decl)
            self.recs = {st.name: RecSelf(st.name, block, st, decl.arity, self.kid_rows) for st in states}
            self.env.update(self.recs)
            self.implied_outputs = {}
            self.rec = self.recs[s.names[0] if s.names else s.name]
            self.decl = decl
            self.block = block
            self.kid_mode = 0           # > 0 inside a per-child term
            self._kids = None
            self._repeated = {}

        def kid_rows(self) -> Value:
            """The gathered children's block as one row per child slot (a view)."""
            if self._kids is None:
                self._kids = Builder(self.graph).tree_kids(self.block, arity=self.decl.arity)
            return self._kids

        def node_input(self, name: str) -> Value:
            """This node's row of a [nodes, ...] array of the forest: a body input."""
            if name not in self.graph.inputs:
                d = self.decl
                t, classes = {"word": (TensorType((BODY_ROWS,), "i32"), d.vocab),
                              "x": (TensorType((BODY_ROWS, d.features or 1)), 0),
                              "@mask": (TensorType((BODY_ROWS, d.arity)), 0)}[name]
                self.graph.inputs[name] = self.graph.add(
                    REGISTRY["input"], (), {"name": name, "kind": "input", "type": t, "classes": classes},
                    self.decl.span, type=t)
            return self.b.value(self.graph.inputs[name])

        def eval(self, e):
            v = super().eval(e)
            if self.kid_mode and isinstance(v, Value) and v.b.graph is self.graph and v.type.is_float \
                    and v.type.rank == 2 and v.shape[0] == BODY_ROWS:
                v = self._per_slot(v)   # a node's own value, seen by each of its children
            return v

        def _per_slot(self, v: Value) -> Value:
            if v.id not in self._repeated:
                self._repeated[v.id] = Builder(self.graph, v.node.span).tree_repeat(v, arity=self.decl.arity)
            return self._repeated[v.id]

        def add_param(self, name, t, init, span, name_span=None, buffer=False) -> int:
            if buffer:      # a body has no training/inference switch, and each level would be a batch
                raise SnetTypeError(f"a node case cannot keep running statistics ('{name}', as batch_norm "
                                    f"does): each tree level would be a batch of its own; use layer_norm", span)
            self.parent.add_param(name, t, init, span, name_span)
            return self.body_param(name)

        def body_param(self, name: str) -> int:
            if name not in self.graph.params:
                spec = self.parent.params[name]
                self.graph.params[name] = self.graph.add(
                    REGISTRY["param"], (), {"name": name, "type": spec.type, "init": spec.init}, spec.span,
                    type=spec.type)
            return self.graph.params[name]

        def eval_Name(self, e: S.Name):
            v = super().eval_Name(e)
            if isinstance(v, Value) and v.b.graph is not self.graph:
                if v.node.op.name == "param":
                    return self.b.value(self.body_param(v.node.attrs["name"]))
                raise SnetTypeError(f"the node case of '{self.rec.name}' can use parameters and the node's "
                                    f"children, not '{e.id}', a tensor of the model", e.span)
            if isinstance(v, (ForestRef, RecFn)):
                raise SnetTypeError(f"the node case of '{self.rec.name}' sees one node, n, not '{e.id}'", e.span)
            return v

        def eval_PerChild(self, e: S.PerChild):
            raise SnetTypeError("a per-child term is summed: sum(... for k in n.children)", e.span)

        def eval_Call(self, e: S.Call):
            if any(isinstance(a, S.PerChild) for a in e.args):
                return self._per_child_sum(e)
            if e.func == "mean" and any(self._all_children(a) for a in e.args):
                raise SnetTypeError(f"mean({self.rec.name}(n.children)) is not defined: a node may have fewer "
                                    "children than the arity (missing ones are zero); use sum(...)", e.span)
            if e.func in ("sum", "concat") and any(self._all_children(a) for a in e.args):
                rec = self.recs[next(a.func for a in e.args if self._all_children(a))]
                if len(e.args) != 1:
                    raise SnetTypeError(f"{e.func}({rec.name}(n.children)) takes no other tensor", e.span)
                kw = {k.name for k in e.kwargs}
                if kw - ({"axis"} if e.func == "concat" else set()):
                    raise SnetTypeError(f"{e.func}({rec.name}(n.children)) takes no options", e.span)
                for k in e.kwargs:      # the states are joined along the feature axis, nothing else
                    axis = self.eval(k.value)
                    if type(axis) is not int or axis not in (1, -1):
                        raise SnetTypeError(f"concat({rec.name}(n.children)) joins the children's states "
                                            f"along axis 1 (or -1), got axis={S.unparse(k.value)}", k.span)
                b = Builder(self.graph, e.span)
                if e.func == "sum" and rec.arity > 1:     # one pass over the slots' rows, no column copies
                    return b.tree_sum_kids(rec.st.columns(b, rec.kids()), arity=rec.arity)
                states = [rec.state(b, k) for k in range(rec.arity)]
                if e.func == "concat":
                    return b.concat(*states, axis=1)
                total = states[0]
                for st in states[1:]:
                    total = total + st
                return total
            return super().eval_Call(e)

        def _per_child_sum(self, e: S.Call):
            """sum(f(k) for k in n.children): f over one row per child slot, a
            missing child's row masked out, summed per node."""
            term = e.args[0]
            if e.func != "sum" or len(e.args) != 1 or e.kwargs or not isinstance(term, S.PerChild):
                raise SnetTypeError("a per-child term is summed on its own: sum(... for k in n.children)", e.span)
            if self.kid_mode:
                raise SnetTypeError("per-child terms do not nest", e.span)
            if not isinstance(self.eval(term.domain), Children):
                raise SnetTypeError("a per-child term runs over the node's children: for k in n.children",
                                    term.domain.span)
            saved = self.env.get(term.var)
            self.env[term.var] = Kid()
            self.kid_mode += 1
            try:
                v = self.eval(term.value)
            finally:
                self.kid_mode -= 1
                _restore(self.env, term.var, saved)
            from .ops.tree import BODY_KIDS
            if not isinstance(v, Value) or not v.type.is_float or v.type.rank != 2 or v.shape[0] != BODY_KIDS:
                raise SnetTypeError(f"a per-child term must give a float vector per child (use {term.var}, "
                                    f"as in {self.rec.name}({term.var})), got {_what(v)}", term.value.span)
            b = Builder(self.graph, e.span)
            present = b.tree_kids(self.node_input("@mask"), arity=self.decl.arity)   # [kids, 1]
            return b.tree_sum_kids(v * present, arity=self.decl.arity)

        def _all_children(self, a) -> bool:
            return (isinstance(a, S.Call) and a.func in self.recs and len(a.args) == 1
                    and isinstance(a.args[0], S.Attr) and a.args[0].name == "children")

    return BodyBuilder


def BodyBuilder(parent, graph, s, decl, block, states):  # noqa: N802 (a class, made on first use: build imports us)
    return _body_builder_class()(parent, graph, s, decl, block, states)
