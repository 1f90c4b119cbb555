"""materialize: give every entry-point output a buffer of its own.

An output that is an input, a parameter, a constant, a view, or the same
node as another output gets a `copy`, so the memory plan can place each
output in the caller's array (or the gradient arena) and nowhere else.
"""
from __future__ import annotations

from ..graph import Builder, Graph


def materialize(g: Graph) -> Graph:
    taken: set[int] = set()
    for name, nid in list(g.outputs.items()):
        traits = g.nodes[nid].op.traits
        if nid in taken or traits & {"source", "inline", "view", "effect"}:
            if "effect" in traits:
                continue
            b = Builder(g, g.nodes[nid].span)
            nid = b.copy(b.value(nid)).id
            g.outputs[name] = nid
        taken.add(nid)
    return g
