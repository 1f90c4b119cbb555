"""Gated recurrent cells: `gru_cell` and `lstm_cell`, one step of a recurrence.

Each is built from ops, so it works wherever its operands are rows of
states: the next case of a recursion over a sequence (`gru_cell(t.x,
h(t.prev), 64)`), a tree's node case, or plain tensors. All gates come from
one matmul over concat(x, h), computed as x @ W[:F] + (h @ W[F:] + b) (no
concat copied); the gate math after it is elementwise, which
the fuse pass joins to the matmul's epilogue where it can (the LSTM's is
one op, `lstm_gates`: one row kernel instead of a dozen small ones; as a
recursion's states (h, c) its two halves are read in place).

    lstm_cell(x, h, c, H) -> (h', c')    g = [x, h] @ W + b, W: [F+H, 4H], gates i, f, u, o
        c' = σ(f) c + σ(i) tanh(u),   h' = σ(o) tanh(c')          (torch.nn.LSTM's gates and order)
    gru_cell(x, h, H) -> h'              [r, z] = σ([x, h] @ Wg + bg),  Wg: [F+H, 2H]
        n = tanh([x, r h] @ Wn + bn),   h' = (1 - z) n + z h    (Cho et al. 2014)

A GRU's candidate reads r·h, so it needs a second matmul after the gates
(the same arithmetic as one of width 3H).
"""
from __future__ import annotations

from ..graph import Value
from ..types import TensorType
from .context import surface


def _operands(ctx, x, h, units, fname: str):
    ctx.expect_tensor(x, fname)
    ctx.expect_tensor(h, fname)
    units = ctx.expect_int(units, "units")
    for v, what in ((x, "input x"), (h, "state h")):
        if v.type.rank != 2 or not v.type.is_float:
            ctx.fail(f"{fname}: the {what} must be rows of vectors [rows, features], got {v.type}")
    if h.shape[1] != units:
        ctx.fail(f"{fname}: the state h has {h.shape[1]} features, the cell {units} units")
    return units


def _gates(ctx, x: Value, h: Value, width: int, layer: str, suffix: str, init) -> Value:
    """[x, h] @ W + b with W: [F+H, width] (one parameter, torch's layout),
    computed as x @ W[:F] + (h @ W[F:] + b). In a recursion both halves run
    per level: lifting x's half out of the levels (one matmul over every node,
    read back per level) made the LSTM step 10-20% slower on this machine
    (benchmarks/RESULTS.md, "Stop 16")."""
    f = x.shape[1]
    w = ctx.param(f"{layer}.w{suffix}", TensorType((f + h.shape[1], width)), init)
    bias = ctx.param(f"{layer}.b{suffix}", TensorType((width,)), "zeros")
    b = ctx.b
    wx, wh = b.slice(w, axis=0, start=0, stop=f), b.slice(w, axis=0, start=f, stop=f + h.shape[1])
    return ctx.checked(lambda: b.matmul(x, wx) + (b.matmul(h, wh) + bias))


def _part(ctx, g: Value, k: int, units: int) -> Value:
    return ctx.b.slice(g, axis=1, start=k * units, stop=(k + 1) * units)


@surface("gru_cell")
def gru_cell(ctx, x, h, units, *, init="glorot", name=None):
    """gru_cell(x, h, units): the next state of a GRU from input rows x and state rows h"""
    units = _operands(ctx, x, h, units, "gru_cell")
    layer = ctx.layer_name("gru", name)
    b = ctx.b
    rz = b.sigmoid(_gates(ctx, x, h, 2 * units, layer, "g", init))
    r, z = _part(ctx, rz, 0, units), _part(ctx, rz, 1, units)
    n = b.tanh(_gates(ctx, x, r * h, units, layer, "n", init))
    return n + z * (h - n)          # (1 - z) n + z h, one multiply


@surface("lstm_cell")
def lstm_cell(ctx, x, h, c, units, *, init="glorot", name=None):
    """lstm_cell(x, h, c, units): the next (h, c) of an LSTM from input rows x and state rows h, c"""
    units = _operands(ctx, x, h, units, "lstm_cell")
    ctx.expect_tensor(c, "lstm_cell")
    if c.type != h.type:
        ctx.fail(f"lstm_cell: the cell state c must have the shape of h, {h.type}, got {c.type}")
    layer = ctx.layer_name("lstm", name)
    b = ctx.b
    g = _gates(ctx, x, h, 4 * units, layer, "", init)
    hc = b.lstm_gates(g, c)         # one row kernel for the gate math (ops/recurrent.py), [h', c']
    return _part(ctx, hc, 0, units), _part(ctx, hc, 1, units)


lstm_cell.gives = ("h", "c")    # its values, named in build's unpacking errors: `(h, c) = lstm_cell(...)`


@surface("zeros")
def zeros(ctx, units):
    """zeros(units): a vector of zeros, e.g. a recurrence's initial state (init: zeros(64))"""
    units = ctx.expect_int(units, "units")
    return ctx.b.broadcast_to(ctx.b.const(0.0), shape=(units,))
