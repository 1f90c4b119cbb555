"""legalize: rewrite nodes into forms their kernels accept.

Each op says what it needs through `legalize(builder, node)`, returning a
replacement value or None (a matmul with a transposed right operand becomes
a transpose and a plain matmul, so the kernel always streams rows of B).
"""
from __future__ import annotations

from ..graph import Builder, Graph


def legalize(g: Graph) -> Graph:
    for nid in g.topo():
        node = g.nodes[nid]
        rule = getattr(node.op, "legalize", None)
        if rule is None:
            continue
        b = Builder(g, node.span)
        new = rule(b, node)
        if new is not None:
            g.replace_uses(nid, new.id)
            g.remove(nid)
    return g
