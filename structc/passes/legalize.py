"""legalize: rewrite nodes into forms their kernels accept.

Each op says what it needs through `legalize(builder, node)`, returning a
replacement value or None (a matmul with a transposed right operand becomes
a transpose and a plain matmul, so the kernel always streams rows of B).
"""
from __future__ import annotations

from ..graph import Builder, Graph


def legalize(g: Graph) -> Graph:
    return rewrite_by_rule(g, "legalize")


def rewrite_by_rule(g: Graph, method: str) -> Graph:
    """Replace every node whose op has `method(builder, node)` by the value it
    returns (None: the node stays); `passes.mode` rewrites by "inference"."""
    for nid in g.topo():
        node = g.nodes[nid]
        rule = getattr(node.op, method, None)
        if rule is None:
            continue
        new = rule(Builder(g, node.span), node)
        if new is not None:
            g.replace_uses(nid, new.id)
            g.remove(nid)
    return g
