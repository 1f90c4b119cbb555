"""legalize: rewrite nodes into forms their kernels accept.

Each op says what it needs through `legalize(builder, node)`, returning a
replacement value or None (a matmul with a transposed right operand becomes
a transpose and a plain matmul, so the kernel always streams rows of B), or
{node id: value} when the rewrite replaces other nodes too (a convolution's
kernel gradient in parts, and the bias gradient its kernel computes with it).
"""
from __future__ import annotations

from ..graph import Builder, Graph


def legalize(g: Graph, vector_width: int = 16) -> Graph:
    """`vector_width`: the target's lanes (rules that depend on the target read
    it as `builder.vector_width`; a recursion's forward node case, made with
    the model before the target is known, is legalized for 16, its backward
    ones for the target)."""
    g = rewrite_by_rule(g, "legalize", vector_width)
    # then a bias gradient in parts becomes a result of its weight gradient's kernel
    # (both made by the rules above: `matmul_parts` and `sum_parts` of one cotangent)
    from ..ops.matmul import colsum_into_weight_gradients
    return _replaced(g, {old: value.id for old, value in colsum_into_weight_gradients(g).items()})


def rewrite_by_rule(g: Graph, method: str, vector_width: int = 16) -> Graph:
    """Replace every node whose op has `method(builder, node)` by the value it
    returns (None: the node stays); `passes.mode` rewrites by "inference".
    The uses move once at the end (a rule may read a node that an earlier one
    replaced: it is still there, with the same type)."""
    new_of: dict[int, int] = {}
    for nid in g.topo():
        node = g.nodes[nid]
        rule = getattr(node.op, method, None)
        if rule is None:
            continue
        new = rule(Builder(g, node.span, vector_width), node)
        if isinstance(new, dict):
            for old, value in new.items():
                assert old not in new_of, f"two {method} rules replace node %{old}"
                new_of[old] = value.id
        elif new is not None:
            assert nid not in new_of, f"two {method} rules replace node %{nid}"
            new_of[nid] = new.id
    return _replaced(g, new_of)


def _replaced(g: Graph, new_of: dict[int, int]) -> Graph:
    """g with each node `old` of new_of replaced by new_of[old] in its uses, and removed."""
    for old, new in new_of.items():     # a rule may return a node a later rule replaced
        while new in new_of:
            new = new_of[new]
        new_of[old] = new
    g.replace_all_uses(new_of)
    for old in new_of:
        g.remove(old)
    return g
