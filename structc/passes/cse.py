"""cse: merge nodes that compute the same thing, so each delta is stored once.

Autodiff emits a VJP per use; when two uses need the same product (a shared
transpose, a repeated mask, a duplicated constant), this pass makes them one
node. Commutative ops compare their operands unordered.
"""
from __future__ import annotations

from ..graph import Graph


def _freeze(v):
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, (int, float, str, bool, type(None))):
        return v
    return ("id", id(v))


def cse(g: Graph) -> Graph:
    seen: dict[tuple, int] = {}
    for nid in g.topo():
        node = g.nodes[nid]
        if "source" in node.op.traits or "effect" in node.op.traits:
            continue
        operands = tuple(sorted(node.inputs)) if "commutative" in node.op.traits else node.inputs
        key = (node.op.name, operands, _freeze(node.attrs), node.type)
        if key in seen:
            g.replace_uses(nid, seen[key])
            g.remove(nid)
        else:
            seen[key] = nid
    return g
