"""Sequence inputs and recurrences over positions in the language (the build side).

    input s: sequence of f32[8]                      # or: sequence of word(vocab=1000)
    target y: class[s.sequences] of 10               # per sequence; class[s.positions] per position
    rec h(t) = first: tanh(dense(t.x, 64, name="in"))
               next:  gru_cell(t.x, h(t.prev), 64)   # forward: reads the previous position
    rec b(t) = last:  tanh(dense(t.x, 64))
               prev:  gru_cell(t.x, b(t.next), 64)   # backward: reads the next position
    loss cross_entropy(dense(concat(h(s.last), b(s.first)), 10), y)

`h(s.last)` is each sequence's last state (the end of a forward recursion),
`b(s.first)` the first (the end of a backward one), `h(s.steps)` every
position's state in the order the positions were given ([s.positions, d],
for per-position targets), `h(s.mean)` each sequence's mean state.

A recursion over a sequence is built as one over a chain-shaped forest
(`recursion.build_rec`, one `tree_map` node): position t is a node whose one
child is position t-1 (t+1 backward), the first position (last backward) a
leaf. The two directions are two forests over the same positions: the
arrays of `s` (`s.children`, `s.level_end`, `s.roots`, `s.words` or
`s.features`) and of `s.rev`, made at run time by `seqdata.chain_arrays`.
With `init:` in place of `first:` / `last:`, each sequence's chain starts
with a leaf of its own holding that state, so the step case runs at every
position (one cell, one set of weights, as torch.nn.LSTM does from h0 = 0):
the chains `s.init` and `s.rev.init`. The sizes are the symbols
`s.sequences`, `s.positions` and `s.longest`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import syntax as S
from .errors import SnetNameError, SnetTypeError, Span
from .graph import Builder, Value
from .ops import REGISTRY
from .recursion import ForestDecl
from .seqdata import CHAINS
from .types import TensorType

#: the sizes of a sequence input
DIMS = ("sequences", "positions", "longest")
#: the forest sizes of a chain: without a start leaf, and with one (`init:`) per sequence
_AS_FOREST = {False: {"nodes": "positions", "leaves": "sequences", "trees": "sequences", "levels": "longest"},
              True: {"nodes": "positions+sequences", "leaves": "sequences", "trees": "sequences",
                     "levels": "longest+1"}}
#: the neighbour a recursion's step case reads, by the word opening it
NEIGHBOURS = {"next": "prev", "prev": "next"}


@dataclass
class SequenceDecl:
    name: str
    vocab: int | None         # word ids in [0, vocab) at every position, or
    features: int | None      # feature vectors of this length
    span: Span
    arrays: dict = field(default_factory=lambda: {k: [] for k in CHAINS})     # declared, by chain

    def sym(self, dim: str) -> str:
        return f"{self.name}.{dim}"

    def prefix(self, chain: str) -> str:
        return self.name + CHAINS[chain][2]

    def meta(self) -> dict:
        return {"name": self.name, "vocab": self.vocab, "features": self.features,
                "arrays": {k: list(v) for k, v in self.arrays.items()}}


@dataclass
class ChainDecl(ForestDecl):
    """One chain of a sequence, as `recursion.build_rec` sees a forest:
    arity 1, its arrays under `name` (`s`, `s.rev`, ...), the sequence's sizes."""
    seq: SequenceDecl = None
    chain: str = "fwd"

    def sym(self, dim: str) -> str:
        return self.seq.sym(_AS_FOREST[CHAINS[self.chain][1]][dim])

    @property
    def direction(self) -> str:
        return "rev" if CHAINS[self.chain][0] else "fwd"


# -- declarations ---------------------------------------------------------------

def declare_sequence(mb, s: S.InputDecl) -> None:
    """`input s: sequence of word(vocab=V)` or `... of f32[F]`."""
    from .build import MAX_CLASSES
    t = s.type
    if s.kind != "input":
        raise SnetTypeError("a sequence is an input, not a target; label its sequences with "
                            f"`target y: class[{s.name}.sequences] of C`", t.span)
    vocab = features = None
    item = t.item
    if isinstance(item, S.Call) and item.func == "word":
        kw = {k.name: k.value for k in item.kwargs}
        v = kw.get("vocab", item.args[0] if len(item.args) == 1 else None)
        v = v.value if isinstance(v, S.Number) else None
        if not isinstance(v, int) or v < 1 or set(kw) - {"vocab"} or len(item.args) + len(kw) != 1:
            raise SnetTypeError("positions carrying words are declared word(vocab=V), V a positive integer",
                                item.span)
        if v > MAX_CLASSES:
            raise SnetTypeError(f"a vocabulary of {v} words does not fit int32 word ids (at most 2**31 - 1)",
                                item.span)
        vocab = v
    elif isinstance(item, S.TensorTypeExpr) and item.dtype == "f32" and len(item.dims) == 1 \
            and isinstance(item.dims[0].value, int) and item.dims[0].value > 0:
        features = item.dims[0].value
    else:
        raise SnetTypeError("a sequence's positions carry words, word(vocab=V), or feature vectors, f32[F]",
                            item.span)
    decl = SequenceDecl(s.name, vocab, features, s.span)
    mb.define(s.name, s.name_span, SequenceRef(decl), rebind=False)
    sequences(mb)[s.name] = decl
    for d in DIMS:
        mb.symbols.add(decl.sym(d))


def sequences(mb) -> dict:
    """The model's sequence inputs by name (kept on the builder)."""
    if not hasattr(mb, "sequences"):
        mb.sequences = {}
    return mb.sequences


def array(mb, decl: SequenceDecl, chain: str, what: str) -> Value:
    """An input array of one chain of `decl`, declared on first use."""
    from .build import InputSpec
    name = f"{decl.prefix(chain)}.{what}"
    if name not in mb.graph.inputs:
        forest = ChainDecl(name, 1, None, None, decl.span, seq=decl, chain=chain)
        nodes, n, sq, lv = forest.sym("nodes"), decl.sym("positions"), decl.sym("sequences"), forest.sym("levels")
        types = {"children": TensorType((nodes, 1), "i32"), "level_end": TensorType((lv,), "i32"),
                 "roots": TensorType((sq,), "i32"), "rows": TensorType((n,), "i32"),
                 "words": TensorType((sq,), "i32"), "features": TensorType((sq, decl.features or 1), "f32"),
                 "node_words": TensorType((nodes,), "i32"),
                 "node_features": TensorType((nodes, decl.features or 1), "f32"),
                 "member_ptr": TensorType((f"{sq}+1",), "i32"), "member_ptr_t": TensorType((f"{nodes}+1",), "i32")}
        ty = types.get(what, TensorType((n,), "i32"))        # member_idx, _idx_t, _eid_t: one per position
        classes = decl.vocab if what in ("words", "node_words") else 0
        nid = mb.graph.add(REGISTRY["input"], (), {"name": name, "kind": "sequence", "type": ty,
                                                   "classes": classes}, decl.span, type=ty)
        mb.graph.inputs[name] = nid
        mb.inputs[name] = InputSpec(name, "sequence", ty, classes, decl.span)
        decl.arrays[chain].append(what)
        for sym in ty.shape:
            if isinstance(sym, str):
                mb.symbols.add(sym)
    return Builder(mb.graph).value(mb.graph.inputs[name])


def check_dim(mb, d: S.Dim) -> None:
    """A dimension written `s.sequences`: a sequence input's, declared before."""
    base, attr = d.value.split(".", 1)
    if attr not in ("sequences", "positions"):
        raise SnetNameError(f"a sequence's dimensions are {base}.sequences (one per sequence) and "
                            f"{base}.positions (one per position), not '{d.value}'", d.span)


# -- values the language sees -----------------------------------------------------

@dataclass
class Select:
    decl: SequenceDecl
    which: str                # "last" | "first" | "steps" | "mean"
    span: Span

    def __repr__(self) -> str:
        return f"{self.decl.name}.{self.which} (an argument of a recursion: h({self.decl.name}.{self.which}))"


class SequenceRef:
    """`s` in expressions: `s.last`, `s.first`, `s.steps`, `s.mean`, arguments of a recursion."""

    def __init__(self, decl: SequenceDecl):
        self.decl = decl

    def __repr__(self) -> str:
        return f"the sequence input {self.decl.name} (use h({self.decl.name}.last) or h({self.decl.name}.steps))"

    def snet_attr(self, mb, e: S.Attr):
        if e.name in ("last", "first", "steps", "mean"):
            return Select(self.decl, e.name, e.span)
        if e.name in DIMS:
            raise SnetTypeError(f"{self.decl.name}.{e.name} is a dimension; use it in a type, e.g. "
                                f"class[{self.decl.name}.{e.name}] of 2", e.span)
        raise SnetNameError(f"a sequence has no '{e.name}': use {self.decl.name}.last (each sequence's last "
                            f"state), {self.decl.name}.first, {self.decl.name}.steps (every position) or "
                            f"{self.decl.name}.mean, as in h({self.decl.name}.last)", e.span)


class SeqRecFn:
    """`h` after `rec h(t) = ...`: h(s.last), h(s.first), h(s.steps), h(s.mean)."""

    def __init__(self, name: str, states: Value, chain: ChainDecl, state):
        self.name, self.states, self.chain, self.state = name, states, chain, state

    def __repr__(self) -> str:
        return f"the recursion {self.name} (call it: {self.name}({self.chain.seq.name}.steps))"

    def snet_call(self, mb, e: S.Call):
        seq, chain, direction = self.chain.seq, self.chain.chain, self.chain.direction
        end = "last" if direction == "fwd" else "first"
        if len(e.args) != 1 or e.kwargs:
            raise SnetTypeError(f"{self.name} takes one argument, e.g. {self.name}({seq.name}.{end})", e.span)
        sel = mb.eval(e.args[0])
        if not isinstance(sel, Select) or sel.decl is not seq:
            raise SnetTypeError(f"{self.name} applies to the positions of sequence '{seq.name}': "
                                f"{self.name}({seq.name}.{end}), {self.name}({seq.name}.steps) or "
                                f"{self.name}({seq.name}.mean){_stacking_hint(mb, self, sel)}", e.args[0].span)
        b = Builder(mb.graph, e.span)
        # the rows first, then this state's columns (one of several): the column copy is over the rows
        # read, and h(s.last)'s cotangent reaches the recursion as the roots' alone (`tree_map`'s from_roots)
        if sel.which == end:        # where the recursion ends: its roots
            return self.state.columns(b, b.gather_rows(self.states, array(mb, seq, chain, "roots")))
        if sel.which == "steps":
            return self.state.columns(b, b.gather_rows(self.states, array(mb, seq, chain, "rows")))
        states = self.state.columns(b, self.states)
        if sel.which == "mean":
            rel = [array(mb, seq, chain, f"member_{k}") for k in ("ptr", "idx", "ptr_t", "idx_t", "eid_t")]
            return b.spmm(*rel, b.degree(rel[0], power=-1.0), states, norm="mean")
        where = "forward" if direction == "fwd" else "backward"
        raise SnetTypeError(f"{self.name} runs {where}, so it ends at {seq.name}.{end}: "
                            f"{self.name}({seq.name}.{sel.which}) is its first case; use "
                            f"{self.name}({seq.name}.{end}), .steps or .mean", e.args[0].span)


def _stacking_hint(mb, lower: SeqRecFn, sel) -> str:
    """For `h1(t)` in another recursion's case (a second layer reading the first at its
    own position): one recursion can carry both layers, in one direction."""
    from .recursion import Child, Kid, LeafRef, NodeRef
    if not isinstance(sel, (Child, Kid, LeafRef, NodeRef)):
        return ""
    upper = getattr(getattr(mb, "rec", None), "name", "h2")
    h1, h2 = lower.name, upper
    return (f"; a recursion cannot read another at its own position, but layers stacked in one direction "
            f"are one recursion carrying both states: rec ({h1}, {h2})(t) = init: (zeros(H), zeros(H)) "
            f"next: {{ a = gru_cell(t.x, {h1}(t.prev), H); (a, gru_cell(a, {h2}(t.prev), H)) }} "
            f"(an LSTM layer unpacks its cell: (a, ac) = lstm_cell(...))")


# -- rec h(t) = first: ... next: ... ------------------------------------------------

def build_seq_rec(mb, s: S.SeqRecDecl) -> None:
    """Translate the recursion into one over the chain-shaped forest of its
    direction (`t.prev` / `t.next` -> `t.children[0]`) and build that."""
    from .recursion import build_rec
    seqs = sequences(mb)
    if len(seqs) != 1:
        raise SnetTypeError("a recursion over positions needs exactly one sequence input declared before it "
                            f"(found {len(seqs)})", s.name_span)
    decl = next(iter(seqs.values()))
    neighbour = NEIGHBOURS[s.then]
    _check_cases(s, decl, neighbour, NEIGHBOURS[neighbour])
    key = ("rev" if s.then == "prev" else "fwd") + ("_init" if s.start == "init" else "")
    chain = ChainDecl(decl.prefix(key), 1, decl.vocab, decl.features, decl.span, inner=True, seq=decl, chain=key)
    word = decl.vocab is not None
    payload = () if s.start == "init" else ("words" if word else "features",)
    if any(_is_param_attr(e, s.param, ("x", "word")) for e in _walk(s.step)):     # x_t in the step case
        payload += ("node_words" if word else "node_features",)
    for what in ("children", "level_end", "roots", *payload):
        array(mb, decl, key, what)
    rec = S.RecDecl(s.name, s.param, s.init, _to_child(s.step, s.param, neighbour), s.span, s.name_span,
                    s.param_span, s.names, s.name_spans)
    saved = mb.forests
    mb.forests = {chain.name: chain}        # build_rec reads the one forest of the model
    try:
        build_rec(mb, rec, cases=(s.start, s.then))
    finally:
        mb.forests = saved
    for name in s.names or (s.name,):       # each state: its columns of the one tree_map
        fn = mb.env[name]
        mb.env[name] = SeqRecFn(name, fn.states, chain, fn.state)


def _check_cases(s: S.SeqRecDecl, decl: SequenceDecl, neighbour: str, other: str) -> None:
    """What the translation would report in a forest's words, said in a sequence's."""
    then = s.then
    for e in _walk(s.init):
        if s.start == "init" and isinstance(e, S.Name) and e.id == s.param:
            raise SnetTypeError(f"'init:' is the state before the first step, the same for every sequence: "
                                f"it reads no position (use {s.param} in the '{then}:' case)", e.span)
        if _is_param_attr(e, s.param, ("prev", "next")):
            raise SnetTypeError(f"the {s.start} position has no {s.param}.{e.name}: it belongs in the "
                                f"'{then}:' case", e.span)
        if isinstance(e, S.Call) and e.func in (s.names or (s.name,)):
            raise SnetTypeError(f"'{s.start}:' gives the state at the {s.start} position, before any "
                                f"{e.func}: call {e.func} in the '{then}:' case", e.span)
    for e in _walk(s.step):
        if _is_param_attr(e, s.param, (other,)):
            where = "forward (... next: ...) reads" if then == "next" else "backward (... prev: ...) reads"
            raise SnetTypeError(f"this recursion runs {where} {s.param}.{neighbour}, not {s.param}.{other}",
                                e.span)
        if _is_param_attr(e, s.param, ("x", "word")):
            kind = "x" if decl.features is not None else "word"
            if e.name != kind:
                raise SnetTypeError(f"the positions of '{decl.name}' carry "
                                    f"{'feature vectors' if kind == 'x' else 'words'}: use {s.param}.{kind}",
                                    e.span)


def _is_param_attr(e, param: str, names) -> bool:
    return isinstance(e, S.Attr) and isinstance(e.base, S.Name) and e.base.id == param and e.name in names


def _walk(e):
    """Every AST node under e (expressions are dataclasses holding others)."""
    stack = [e]
    while stack:
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(x)
        elif dataclasses.is_dataclass(x) and not isinstance(x, Span):
            yield x
            stack.extend(getattr(x, f.name) for f in dataclasses.fields(x))


def _to_child(e, param: str, neighbour: str):
    """`t.prev` (or `t.next`) -> `t.children[0]`: the chain's one child."""
    if _is_param_attr(e, param, (neighbour,)):
        return S.Index(S.Attr(e.base, "children", e.span), S.Number(0, e.span), e.span)
    if isinstance(e, list):
        return [_to_child(x, param, neighbour) for x in e]
    if dataclasses.is_dataclass(e) and not isinstance(e, Span):
        return dataclasses.replace(e, **{f.name: _to_child(getattr(e, f.name), param, neighbour)
                                         for f in dataclasses.fields(e) if f.name != "span"})
    return e
