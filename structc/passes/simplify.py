"""simplify: algebraic identities that autodiff and desugaring leave behind.

x*1, 1*x, x+0, x-0, x/1, neg(neg x), reshape or broadcast to the same
shape, sums over no axes, and arithmetic on constants folded.
"""
from __future__ import annotations

from ..graph import Graph


def _const(g: Graph, nid: int):
    node = g.nodes[nid]
    return node.attrs["value"] if node.op.name == "const" else None


def _identity(g: Graph, nid: int):
    """The node this one equals, if it is an identity of one of its operands."""
    node = g.nodes[nid]
    name, ins = node.op.name, node.inputs
    same = lambda i: g.nodes[i].type == node.type
    if name in ("reshape", "broadcast_to") and same(ins[0]):
        return ins[0]
    if name == "sum" and node.attrs.get("axes") == () and same(ins[0]):
        return ins[0]
    if name == "neg" and g.nodes[ins[0]].op.name == "neg" and same(g.nodes[ins[0]].inputs[0]):
        return g.nodes[ins[0]].inputs[0]
    if name in ("mul", "add", "sub", "div"):
        a, b = ins
        ca, cb = _const(g, a), _const(g, b)
        unit = 1.0 if name in ("mul", "div") else 0.0
        if cb == unit and same(a):
            return a
        if ca == unit and name in ("mul", "add") and same(b):
            return b
    return None


def _fold(g: Graph, nid: int):
    node = g.nodes[nid]
    if node.op.name not in ("add", "sub", "mul", "div", "neg") or node.type.rank != 0:
        return None
    vals = [_const(g, i) for i in node.inputs]
    if any(v is None for v in vals):
        return None
    if node.op.name == "div" and vals[1] == 0:
        return None
    import numpy as np
    return float(node.op.reference(*(np.float32(v) for v in vals)))


def simplify(g: Graph) -> Graph:
    from ..ops import REGISTRY
    for nid in g.topo():
        if nid not in g.nodes:
            continue
        target = _identity(g, nid)
        if target is None:
            value = _fold(g, nid)
            if value is None:
                continue
            node = g.nodes[nid]
            target = g.add(REGISTRY["const"], (), {"value": value, "dtype": "f32"}, node.span)
        g.replace_uses(nid, target)
        if nid not in g.outputs.values():
            g.remove(nid)
    return g
