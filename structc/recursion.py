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
"""
from __future__ import annotations

from dataclasses import dataclass

from . import syntax as S
from .errors import ShapeMismatch, SnetNameError, SnetShapeError, SnetTypeError, Span
from .graph import Builder, Graph, Value
from .ops import REGISTRY
from .types import TensorType

#: the most children a node can have: the node case gets arity x width inputs per node
MAX_ARITY = 64
ARRAYS = ("children", "level_end", "roots", "words", "features")
DIMS = ("nodes", "leaves", "trees", "levels")


@dataclass
class ForestDecl:
    name: str
    arity: int
    vocab: int | None         # word ids in [0, vocab) at the leaves, or
    features: int | None      # feature vectors of this length
    span: Span

    def sym(self, dim: str) -> str:
        return f"{self.name}.{dim}"

    def meta(self) -> dict:
        return {"name": self.name, "arity": self.arity, "vocab": self.vocab, "features": self.features}


# -- declarations ---------------------------------------------------------------

def declare_forest(mb, s: S.InputDecl) -> None:
    """`input t: forest(arity=A) of word(vocab=V)` or `... of f32[F]`."""
    from .build import InputSpec
    t = s.type
    if s.kind != "input":
        raise SnetTypeError("a forest is an input, not a target; label its trees with "
                            f"`target y: class[{s.name}.trees] of C`", t.span)
    arity = 2
    for opt in t.options:
        if opt.name != "arity":
            raise SnetTypeError(f"forest has no option '{opt.name}' (options: arity)", opt.span)
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
    decl = ForestDecl(s.name, arity, vocab, features, s.span)
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
    for k, ty in arrays.items():
        name = f"{s.name}.{k}"
        classes = vocab if k == "words" else 0
        nid = mb.graph.add(REGISTRY["input"], (), {"name": name, "kind": "forest", "type": ty, "classes": classes},
                           s.span, type=ty)
        mb.graph.inputs[name] = nid
        mb.inputs[name] = InputSpec(name, "forest", ty, classes, s.span)


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
    """`n` in the node case: `n.left`, `n.right`, `n.children`."""

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
            raise SnetTypeError(f"only leaves carry n.{name}: use it in the leaf case", span)
        raise SnetNameError(f"a node has no '{name}' (it has n.left, n.right, n.children)", span)


class RecFn:
    """`h` after `rec h(n) = ...`: h(t.nodes) is every node's state, h(t.root) each root's."""

    def __init__(self, name: str, states: Value, decl: ForestDecl):
        self.name, self.states, self.decl = name, states, decl

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
        if sel.which == "nodes":
            return self.states
        b = Builder(mb.graph, e.span)
        return b.gather_rows(self.states, forest_array(mb, self.decl, "roots"))


class RecSelf:
    """`h` inside its own node case: h(child) is a slice of the children's block."""

    def __init__(self, name: str, block: Value, width: int, arity: int):
        self.name, self.block, self.width, self.arity = name, block, width, arity

    def __repr__(self) -> str:
        return f"the recursion {self.name} (call it on a child: {self.name}(n.left))"

    def state(self, b: Builder, k: int) -> Value:
        return b.slice(self.block, axis=1, start=k * self.width, stop=(k + 1) * self.width)

    def snet_call(self, mb, e: S.Call):
        if len(e.args) != 1 or e.kwargs:
            raise SnetTypeError(f"{self.name} takes one child, e.g. {self.name}(n.left)", e.span)
        child = mb.eval(e.args[0])
        if isinstance(child, Children):
            raise SnetTypeError(f"{self.name}(n.children) is every child's state: use it in sum(...) "
                                "or concat(...)", e.span)
        if not isinstance(child, Child):
            raise SnetTypeError(f"inside the node case, {self.name} takes a child: {self.name}(n.left), "
                                f"{self.name}(n.children[k])", e.args[0].span)
        return self.state(Builder(mb.graph, e.span), child.k)


# -- rec h(n) = leaf: ... node: ... ------------------------------------------------

def build_rec(mb, s: S.RecDecl) -> None:
    from .ops.tree import fold_concat_of_slices, prepare, _tags
    from .passes.dce import dce
    forests = mb.forests
    if len(forests) != 1:
        raise SnetTypeError("a recursive definition needs exactly one forest input declared before it "
                            f"(found {len(forests)})", s.name_span)
    decl = next(iter(forests.values()))
    if s.name in mb.env:
        raise SnetNameError(f"'{s.name}' is already defined (line {mb.defined_at[s.name].line})", s.name_span)

    # The leaf case: ordinary graph work over the leaves.
    saved = mb.env.get(s.param)
    mb.env[s.param] = LeafRef(decl, mb)
    try:
        leaf = mb.eval(s.leaf)
    finally:
        _restore(mb.env, s.param, saved)
    if not isinstance(leaf, Value) or not leaf.type.is_float:
        raise SnetTypeError(f"the leaf case must give a float vector per leaf, got {_what(leaf)}", s.leaf.span)
    nl = decl.sym("leaves")
    if leaf.type.rank == 1 and isinstance(leaf.shape[0], int):
        leaf = Builder(mb.graph, s.leaf.span).broadcast_to(leaf, shape=(nl, leaf.shape[0]))
    if leaf.type.rank != 2 or leaf.shape[0] != nl or not isinstance(leaf.shape[1], int):
        raise SnetShapeError(f"the leaf case must give one vector per leaf, f32[{nl}, d], got {leaf.type}",
                             s.leaf.span)
    width = leaf.shape[1]

    # The node case: a sub-graph over one row per node.
    body = Graph(f"{s.name}.node")
    ct = TensorType(("rows", decl.arity * width))
    cin = body.add(REGISTRY["input"], (), {"name": "children", "kind": "input", "type": ct, "classes": 0},
                   s.node.span, type=ct)
    body.inputs["children"] = cin
    bb = BodyBuilder(mb, body, s, decl, RecSelf(s.name, Builder(body).value(cin), width, decl.arity))
    out = bb.eval(s.node)
    if not isinstance(out, Value) or not out.type.is_float:
        raise SnetTypeError(f"the node case must give a float vector per node, got {_what(out)}", s.node.span)
    if out.type.rank == 1 and isinstance(out.shape[0], int):
        out = Builder(body, s.node.span).broadcast_to(out, shape=("rows", out.shape[0]))
    if out.shape != ("rows", width):
        got = ", ".join(map(str, out.shape[1:])) if out.shape[:1] == ("rows",) else str(out.type)
        raise SnetShapeError(f"the node case gives states of shape [{got}], the leaf case [{width}]: "
                             "a node's state must have one shape", s.node.span)
    _check_rows_stay_apart(body, cin, s.node.span)
    body.outputs["h"] = out.id
    fold_concat_of_slices(body)
    dce(body)
    try:
        fwd = prepare(body, f"{s.name}.node")
    except ShapeMismatch as err:
        raise SnetShapeError(str(err), s.node.span) from None

    b = Builder(mb.graph, s.span)
    nodes = decl.sym("nodes")
    sr = b.scratch(shape=(nodes, decl.arity * width + fwd.rows_floats), tag=next(_tags))
    sf = b.scratch(shape=(max(fwd.fixed_floats, 16),), tag=next(_tags))
    params = [b.value(mb.graph.params[p]) for p in body.params]
    H = b.tree_map(forest_array(mb, decl, "children"), forest_array(mb, decl, "level_end"),
                   forest_array(mb, decl, "roots"), leaf, sr, sf, *params,
                   body=body, fwd=fwd, arity=decl.arity, width=width, rec=s.name)
    mb.env[s.name] = RecFn(s.name, H, decl)
    mb.defined_at[s.name] = s.name_span


def _check_rows_stay_apart(body: Graph, children: int, span: Span) -> None:
    """Every value computed from the children must keep one row per node. A
    value of parameters and constants alone (transpose(W)) is the same for
    every node: it is allowed, and lowering hoists it out of the recursion."""
    per_node = {children}
    for nid in sorted(body.nodes):          # ids grow with building: inputs come first
        node = body.nodes[nid]
        if not any(i in per_node for i in node.inputs):
            continue
        per_node.add(nid)
        if node.type.rank == 0 and "elementwise" in node.op.traits:
            continue
        if not node.shape or node.shape[0] != "rows":
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

        def __init__(self, parent, graph: Graph, s: S.RecDecl, decl: ForestDecl, rec: RecSelf):
            self.__dict__.update(parent.__dict__)
            self.parent = parent
            self.graph = graph
            self.b = Builder(graph)
            self.env = dict(parent.env)
            self.env[s.param] = NodeRef(decl)
            self.env[s.name] = rec
            self.implied_outputs = {}
            self.rec = rec

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

        def eval_Call(self, e: S.Call):
            if e.func == "mean" and any(self._all_children(a) for a in e.args):
                raise SnetTypeError(f"mean({self.rec.name}(n.children)) is not defined: a node may have fewer "
                                    "children than the arity (missing ones are zero); use sum(...)", e.span)
            if e.func in ("sum", "concat") and any(self._all_children(a) for a in e.args):
                if len(e.args) != 1:
                    raise SnetTypeError(f"{e.func}({self.rec.name}(n.children)) takes no other tensor", e.span)
                kw = {k.name for k in e.kwargs}
                if kw - ({"axis"} if e.func == "concat" else set()):
                    raise SnetTypeError(f"{e.func}({self.rec.name}(n.children)) takes no options", e.span)
                for k in e.kwargs:      # the states are joined along the feature axis, nothing else
                    axis = self.eval(k.value)
                    if type(axis) is not int or axis not in (1, -1):
                        raise SnetTypeError(f"concat({self.rec.name}(n.children)) joins the children's states "
                                            f"along axis 1 (or -1), got axis={S.unparse(k.value)}", k.span)
                b = Builder(self.graph, e.span)
                states = [self.rec.state(b, k) for k in range(self.rec.arity)]
                if e.func == "concat":
                    return b.concat(*states, axis=1)
                total = states[0]
                for st in states[1:]:
                    total = total + st
                return total
            return super().eval_Call(e)

        def _all_children(self, a) -> bool:
            return (isinstance(a, S.Call) and a.func == self.rec.name and len(a.args) == 1
                    and isinstance(a.args[0], S.Attr) and a.args[0].name == "children")

    return BodyBuilder


def BodyBuilder(parent, graph, s, decl, rec):  # noqa: N802 (a class, made on first use: build imports us)
    return _body_builder_class()(parent, graph, s, decl, rec)
