"""simplify: algebraic identities that autodiff and desugaring leave behind.

x*1, 1*x, x+0, x-0, x/1, neg(neg x), reshape or broadcast to the same
shape, sums over no axes, and arithmetic on constants folded. A transpose
read by a matmul becomes the matmul's flag (`x @ transpose(W)`, a tied
output layer; the matmul's VJP then reads W as it is), and a transposed
matmul the product of its operands swapped: (A B)^T = B^T A^T.
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


def _plain_matmul(g: Graph, nid: int) -> bool:
    """A matmul of two matrices as they are or transposed by its flags (not packed)."""
    node = g.nodes[nid]
    return node.op.name == "matmul" and not node.attrs.get("packed") and not node.attrs.get("tb_copied")


def _transposes_folded(g: Graph, nid: int):
    """(operands, flags) of the matmul this node equals with no transpose in
    between: a matmul reading a transpose, or a transpose of a matmul read by
    nothing else; else None."""
    node = g.nodes[nid]
    if node.op.name == "transpose" and _plain_matmul(g, node.inputs[0]) and len(g.users(node.inputs[0])) == 1 \
            and node.inputs[0] not in g.outputs.values():
        m = g.nodes[node.inputs[0]]
        a, b = m.inputs
        return (b, a), {"ta": not m.attrs.get("tb", False), "tb": not m.attrs.get("ta", False)}
    if not _plain_matmul(g, nid):
        return None
    ins, flags = list(node.inputs), {"ta": node.attrs.get("ta", False), "tb": node.attrs.get("tb", False)}
    for k, flag in enumerate(("ta", "tb")):
        operand = g.nodes[ins[k]]
        if operand.op.name == "transpose":
            ins[k], flags[flag] = operand.inputs[0], not flags[flag]
    return (tuple(ins), flags) if tuple(ins) != node.inputs else None


def simplify(g: Graph) -> Graph:
    from ..ops import REGISTRY
    for nid in g.topo():
        if nid not in g.nodes:
            continue
        target = _identity(g, nid)
        folded = _transposes_folded(g, nid) if target is None else None
        if folded is not None:
            node = g.nodes[nid]
            ins, flags = folded
            attrs = {k: v for k, v in flags.items() if v}
            target = g.add(REGISTRY["matmul"], ins, attrs, node.span)
            assert g.nodes[target].type == node.type, (g.nodes[target].type, node.type)
        elif target is None:
            value = _fold(g, nid)
            if value is None:
                continue
            node = g.nodes[nid]
            target = g.add(REGISTRY["const"], (), {"value": value, "dtype": "f32"}, node.span)
        g.replace_uses(nid, target)
        if nid not in g.outputs.values():
            g.remove(nid)
    return g
