"""An LSTM's gate math in one pass over the gates: `lstm_gates` and its two gradients.

    lstm_gates(g [R, 4H], c [R, H]) -> [R, 2H] = [h', c']
        i, f, u, o = the four H-column blocks of g (torch.nn.LSTM's order)
        c' = σ(f) c + σ(i) tanh(u),   h' = σ(o) tanh(c')

Written with slices and elementwise ops, this is four slice kernels and a
dozen elementwise ones per step, and its gradient assembles dg from four
zero-padded concatenations; here it is one row kernel forward and one
backward. In training the forward kernel also writes the activations
A = [σ(i), σ(f), tanh(u), σ(o)] (`lstm_gates_acts`), and the gradients read
them, c and c' (one tanh left, not four exponentials again):

    D   = Gc + Gh σ(o) (1 - tanh²(c'))            G = [Gh, Gc], the cotangent of [h', c']
    dg  = [D tanh(u) σ'(i), D c σ'(f), D σ(i) (1 - tanh²(u)), Gh tanh(c') σ'(o)]
    dc  = D σ(f)

The gradients' own VJPs (second derivatives, for the registry's checks and
higher-order use) are built from primitive ops and differentiated by their
rules (`_composite_vjp`).
"""
from __future__ import annotations

import numpy as np

from ..types import TensorType
from .base import Op, Sample, expect


def _units(g, c) -> int:
    expect(g.rank == 2 and c.rank == 2 and g.dtype == "f32" and c.dtype == "f32",
           f"lstm gates are float matrices [rows, 4H] and [rows, H], got {g} and {c}")
    h = c.shape[1]
    expect(isinstance(h, int) and g.shape[1] == 4 * h, f"gates {g} must have 4 x {h} columns for a state {c}")
    expect(g.shape[0] == c.shape[0], f"gates {g} and state {c} have different rows")
    return h


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _parts(g, c):
    i, f, u, o = np.split(g, 4, axis=1)
    si, sf, tu, so = _sig(i), _sig(f), np.tanh(u), _sig(o)
    c2 = sf * c + si * tu
    return si, sf, tu, so, c2, np.tanh(c2)


def _acts(g):
    i, f, u, o = np.split(g, 4, axis=1)
    return np.concatenate([_sig(i), _sig(f), np.tanh(u), _sig(o)], axis=1)


def _grads(acts, c, out, G):
    """(dg, dc) from the gates' activations [σ(i), σ(f), tanh(u), σ(o)], the
    state c before and the cell's [h', c'] (whose c' gives tanh(c'))."""
    si, sf, tu, so = np.split(acts, 4, axis=1)
    h = c.shape[1]
    k = np.tanh(out[:, h:])
    gh, gc = G[:, :h], G[:, h:]
    d = gc + gh * so * (1 - k * k)
    dg = np.concatenate([d * tu * si * (1 - si), d * c * sf * (1 - sf), d * si * (1 - tu * tu),
                         gh * k * so * (1 - so)], axis=1)
    return dg, d * sf


# -- building the same maths from primitive ops (for the gradients' VJPs) ---------------

def _blocks(b, x, h: int, k: int):
    return [b.slice(x, axis=1, start=j * h, stop=(j + 1) * h) for j in range(k)]


def _composite_acts(b, g):
    """[σ(i), σ(f), tanh(u), σ(o)] written with primitive ops."""
    i, f, u, o = _blocks(b, g, g.shape[1] // 4, 4)
    return (b.concat(b.sigmoid(i), b.sigmoid(f), b.tanh(u), b.sigmoid(o), axis=1),)


def _composite_grads(b, acts, c, out, G):
    """(dg, dc) written with primitive ops."""
    h = c.shape[1]
    si, sf, tu, so = _blocks(b, acts, h, 4)
    gh, gc = _blocks(b, G, h, 2)
    k = b.tanh(_blocks(b, out, h, 2)[1])
    d = gc + gh * so * (1.0 - k * k)
    dg = b.concat(d * tu * si * (1.0 - si), d * c * sf * (1.0 - sf), d * si * (1.0 - tu * tu),
                  gh * k * so * (1.0 - so), axis=1)
    return dg, d * sf


def _composite_vjp(b, cot, which: int, build, *operands):
    """The VJP of output `which` of `build(b, *operands)` (primitive ops): build
    it, then run each new node's own VJP rule in reverse (a local reverse sweep)."""
    graph = b.graph
    first = max(graph.nodes) + 1
    out = build(b, *operands)[which]
    parts = {out.id: [cot]}
    for nid in sorted((n for n in graph.nodes if n >= first), reverse=True):
        got = parts.pop(nid, None)
        if got is None:
            continue
        total = got[0]
        for extra in got[1:]:
            total = total + extra
        node = graph.nodes[nid]
        grads = node.op.vjp(b, total, b.value(nid), *(b.value(i) for i in node.inputs), **node.attrs)
        for i, gi in zip(node.inputs, grads):
            if gi is not None:
                parts.setdefault(i, []).append(gi)

    def summed(v):
        got = parts.get(v.id)
        if not got:
            return None
        total = got[0]
        for extra in got[1:]:
            total = total + extra
        return total
    return [summed(v) for v in operands]


# -- lowering: one row kernel, H columns in vectors -------------------------------------

#: registers' worth of lanes the gate kernels take at a time: each value is a chain
#: of exponentials and divisions about 150 cycles long, and one vector's chain
#: alone leaves the core waiting; two interleaved (each IR operation becomes two
#: instructions side by side) run about 10% faster
GATE_VECTORS = 2

class GateMath:
    """A cell's gate math a vector of one row at a time: the body of its own
    row kernel, or run by the matmul computing its gates on each block of rows
    after that block's product (`gemm.emit_gemm(gate=...)`).
    `blocks` gate blocks of `units` columns each; `bind(cg)` gives
    `at(r, j, mask)`, which emits the math for row r's columns [j, j + lanes)
    of every block (`lanes` = GATE_VECTORS vectors)."""

    def __init__(self, blocks: int, units: int, lanes: int, bind):
        self.blocks, self.units, self.lanes, self.bind = blocks, units, lanes, bind


def _row_math(kb, node, emit, first: int = 0, also=()) -> GateMath:
    """emit(cg, load(k, block), store(block, value, out=0)) as a GateMath: load
    reads operand `first + k`; store writes the node (out 0) or the nodes in
    `also` (out 1, 2, ...: results of the same kernel)."""
    g = kb.graph
    inputs = node.inputs[first:]
    h = g.nodes[inputs[1]].shape[1]
    outs = [node.id, *also]
    widths = [g.nodes[i].shape[1] for i in inputs] + [g.nodes[o].shape[1] for o in outs]
    lanes = GATE_VECTORS * kb.vector_width

    def bind(cg):
        ptrs = [cg.ptr(i) for i in inputs] + [cg.ptr(o) for o in outs]

        def at(r, j, mask):
            offs = [cg.imul(r, w) for w in widths]

            def load(k, block):
                return cg.load(ptrs[k], cg.iadd(offs[k], cg.iadd(j, cg.i64(block * h))), n=lanes, mask=mask)

            def store(block, value, out=0):
                at_ = len(inputs) + out
                cg.store(value, ptrs[at_], cg.iadd(offs[at_], cg.iadd(j, cg.i64(block * h))), mask=mask)
            emit(cg, load, store)
        return at
    return GateMath(widths[0] // h, h, lanes, bind)


def row_kernel(kb, node, name: str, math: GateMath) -> None:
    """The gate math as a row kernel of its own: one task per row, the units in vectors."""
    from ..lower.treemap import _row_op
    h = math.units
    rows = kb.graph.nodes[node.id].shape[0]
    with kb.kernel(f"{name}{node.id}", tasks=lambda cg: cg.numel((rows,)), cost=40 * h) as (cg, lo, hi):
        at = math.bind(cg)
        with cg.loop(hi, start=lo, name="row") as r:
            # a loop at run time past two vectors: unrolled, the gate math's code is long to compile
            _row_op(cg, h if h <= 2 * kb.vector_width else cg.i64(h), math.lanes, lambda j, m: at(r, j, m))


def _lower_rows(kb, node, name: str, emit, first: int = 0, also=()) -> None:
    """`emit` (see `_row_math`) as a row kernel of its own."""
    row_kernel(kb, node, name, _row_math(kb, node, emit, first, also))


def gate_tanh(cg, x):
    """tanh(x) = 2σ(2x) - 1 in the fused gate kernels: one exponential and one
    division, where `CG.tanh` also evaluates its small-argument polynomial and
    selects (about a third fewer instructions; within about 1e-7 of tanh,
    which is all an LSTM's states need; ±1 at ±inf, NaN stays NaN)."""
    return cg.fma(cg.const(2.0, x), cg.sigmoid(cg.add(x, x)), cg.const(-1.0, x))


def _gates(cg, load):
    si, sf = cg.sigmoid(load(0, 0)), cg.sigmoid(load(0, 1))
    tu, so = gate_tanh(cg, load(0, 2)), cg.sigmoid(load(0, 3))
    c = load(1, 0)
    c2 = cg.fma(sf, c, cg.mul(si, tu))
    return si, sf, tu, so, c, c2, gate_tanh(cg, c2)


def _stored(cg, load):
    """The gradients' operands (acts, c, [h', c'], G): the activations as the
    forward kernel wrote them, c, and k = tanh(c') (the one exponential left)."""
    si, sf, tu, so = (load(0, k) for k in range(4))
    return si, sf, tu, so, load(1, 0), gate_tanh(cg, load(2, 1))


def _delta(cg, load, so, k):
    """D = Gc + Gh σ(o) (1 - k²), and Gh (G is the gradients' operand 3)."""
    one = cg.const(1.0, k)
    gh = load(3, 0)
    return cg.add(load(3, 1), cg.mul(cg.mul(gh, so), cg.sub(one, cg.mul(k, k)))), gh


def _samples():
    # 3, 16, 19 columns: part of a vector, one, two (unrolled); 40: past two vectors (a loop at run time)
    return [Sample(((5, 12), (5, 3))), Sample(((2, 64), (2, 16))), Sample(((3, 4 * 19), (3, 19))),
            Sample(((2, 4 * 40), (2, 40)))]


class LstmGates(Op):
    """[h', c'] from an LSTM's gates g = [i, f, u, o] and state c (see the module docstring).
    In training its kernel also writes the activations (`lstm_gates_acts`), which
    the gradients read instead of evaluating four exponentials again."""
    name = "lstm_gates"

    def shape(self, g, c) -> TensorType:
        h = _units(g, c)
        return TensorType((g.shape[0], 2 * h), "f32")

    def vjp(self, b, G, out, g, c):
        acts = b.lstm_gates_acts(out, g, c)             # written by this cell's kernel
        dg = b.lstm_gates_dg(acts, c, out, G)
        return [dg, b.lstm_gates_dc(dg, acts, c, out, G)]     # dc: written by dg's kernel (one pass)

    def reference(self, g, c):
        *_, so, c2, k = _parts(g, c)
        return np.concatenate([so * k, c2], axis=1)

    def samples(self):
        return _samples()

    def lower(self, kb, node, epilogue):
        row_kernel(kb, node, "lstmgates", self.gate_math(kb, node))

    def gate_math(self, kb, node) -> GateMath:
        """[h', c'] (and the activations, when its group has them) a vector at a
        time: this node's kernel, or the epilogue of the product of its gates
        (`fuse`, rule 7)."""
        acts = kernel_parts(kb, node, "lstm_gates_acts")

        def emit(cg, load, store):
            si, sf, tu, so, _c, c2, k = _gates(cg, load)
            store(0, cg.mul(so, k))
            store(1, c2)
            for p in range(1, len(acts) + 1):
                for block, v in enumerate((si, sf, tu, so)):
                    store(block, v, out=p)
        return _row_math(kb, node, emit, also=acts)


class LstmGatesActs(Op):
    """[σ(i), σ(f), tanh(u), σ(o)]: the activations of an LSTM's gates. Its
    first operand is the cell's `lstm_gates` [h', c']: that kernel writes them
    on its way (the `part` trait puts both in one group; a recursion keeps
    them for its backward); otherwise it is a kernel of its own."""
    name = "lstm_gates_acts"
    traits = frozenset({"part"})

    def shape(self, out, g, c) -> TensorType:
        h = _units(g, c)
        expect(out.shape == (g.shape[0], 2 * h), f"lstm_gates_acts: {out} is not the [h', c'] of the gates {g}")
        return g

    def reference(self, out, g, c):
        return _acts(g)

    def vjp(self, b, cot, out, state, g, c):
        return [None, _composite_vjp(b, cot, 0, _composite_acts, g)[0], None]

    def samples(self):
        return [Sample((((s.inputs[0][0], 2 * s.inputs[1][1]), "fixed"), s.inputs[0], (s.inputs[1], "fixed")))
                for s in _samples()]

    def lower(self, kb, node, epilogue):
        def emit(cg, load, store):
            si, sf, tu, so = cg.sigmoid(load(0, 0)), cg.sigmoid(load(0, 1)), gate_tanh(cg, load(0, 2)), \
                cg.sigmoid(load(0, 3))
            for block, v in enumerate((si, sf, tu, so)):
                store(block, v)
        _lower_rows(kb, node, "lstmacts", emit, first=1)


class _LstmGatesGrad(Op):
    def shape(self, acts, c, out, G) -> TensorType:
        h = c.shape[1] if c.rank == 2 else None
        expect(acts.rank == 2 and isinstance(h, int) and acts.shape[1] == 4 * h and out.shape == G.shape
               and G.shape == (acts.shape[0], 2 * h),
               f"lstm gates' gradient: activations {acts}, state {c}, output {out}, cotangent {G} do not match")
        return self.result(acts, c)

    def reference(self, acts, c, out, G):
        return _grads(acts, c, out, G)[self.which]

    def vjp(self, b, cot, result, acts, c, out, G):
        return _composite_vjp(b, cot, self.which, _composite_grads, acts, c, out, G)

    def samples(self):
        return [Sample((*s.inputs, (s.inputs[0][0], 2 * s.inputs[1][1]), (s.inputs[0][0], 2 * s.inputs[1][1])))
                for s in _samples()]


class LstmGatesDg(_LstmGatesGrad):
    """dg, the gradient of lstm_gates with respect to its gates (see the module docstring),
    from the activations its kernel wrote, the state c and [h', c']."""
    name = "lstm_gates_dg"
    which = 0

    def result(self, acts, c):
        return acts

    def lower(self, kb, node, epilogue):
        def emit(cg, load, store):
            si, sf, tu, so, c, k = _stored(cg, load)
            d, gh = _delta(cg, load, so, k)
            one = cg.const(1.0, k)
            store(0, cg.mul(cg.mul(d, tu), cg.mul(si, cg.sub(one, si))))
            store(1, cg.mul(cg.mul(d, c), cg.mul(sf, cg.sub(one, sf))))
            store(2, cg.mul(cg.mul(d, si), cg.sub(one, cg.mul(tu, tu))))
            store(3, cg.mul(cg.mul(gh, k), cg.mul(so, cg.sub(one, so))))
            for p in range(1, len(parts) + 1):
                store(0, cg.mul(d, sf), out=p)
        parts = _dc_parts(kb, node)
        _lower_rows(kb, node, "lstmdg", emit, also=parts)


class LstmGatesDc(_LstmGatesGrad):
    """dc, the gradient of lstm_gates with respect to the state c: D σ(f).
    Its first operand is the `lstm_gates_dg` of the same gates: that kernel
    computes D on its way to dg and writes dc too (the `part` trait puts both
    in one group); otherwise (dg from elsewhere) it is a kernel of its own."""
    name = "lstm_gates_dc"
    which = 1
    traits = frozenset({"part"})

    def shape(self, dg, acts, c, out, G) -> TensorType:
        expect(dg.shape == acts.shape, f"lstm_gates_dc: the gates' gradient {dg} is not shaped like the gates {acts}")
        return super().shape(acts, c, out, G)

    def result(self, acts, c):
        return c

    def reference(self, dg, acts, c, out, G):
        return super().reference(acts, c, out, G)

    def vjp(self, b, cot, result, dg, acts, c, out, G):
        return [None, *super().vjp(b, cot, result, acts, c, out, G)]

    def samples(self):
        return [Sample(((s.inputs[0], "fixed"), *s.inputs)) for s in super().samples()]

    def lower(self, kb, node, epilogue):
        def emit(cg, load, store):
            _si, sf, _tu, so, _c, k = _stored(cg, load)
            store(0, cg.mul(_delta(cg, load, so, k)[0], sf))
        _lower_rows(kb, node, "lstmdc", emit, first=1)


def kernel_parts(kb, node, op: str) -> list:
    """The `op` nodes (parts whose first operand is `node`) this node's kernel
    writes too: its group's, stored for readers outside it. Read from the
    group alone (not the graph's users), so the kernel stays in the lowered
    kernels' cache (`lower/lowered.py`)."""
    g = kb.graph
    mine = next((gr for gr in g.groups if node.id in gr.members), None)
    if mine is None:
        return []
    return [m for m in mine.members if g.nodes[m].op.name == op and g.nodes[m].inputs[0] == node.id
            and m in mine.outputs]


def _dc_parts(kb, node) -> list:
    """The `lstm_gates_dc` nodes this `lstm_gates_dg` kernel writes (its group's)."""
    return kernel_parts(kb, node, "lstm_gates_dc")
