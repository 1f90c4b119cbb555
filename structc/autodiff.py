"""Reverse-mode differentiation of a graph, symbolically.

Input: a forward graph with a scalar output `loss`. Output: one graph
holding the forward pass and, for every parameter, `grad:<name>`. Nodes are
visited in reverse topological order; each node's cotangent is the sum of
the contributions from its users, formed once and then read by every VJP
that needs it: the stored deltas of backpropagation. The VJPs are ordinary
ops, so the backward graph is optimised like the forward one.
"""
from __future__ import annotations

import networkx as nx

from .graph import Builder, Graph, Value


def differentiate(forward: Graph, loss: str = "loss") -> Graph:
    g = forward.copy()
    loss_id = g.outputs[loss]
    order = g.topo()
    # Only nodes between a parameter and the loss carry a gradient.
    upstream = nx.ancestors(g.nx, loss_id) | {loss_id}
    from_params = set(g.params.values())
    for p in g.params.values():
        from_params |= nx.descendants(g.nx, p)
    active = upstream & from_params

    b = Builder(g)
    contributions: dict[int, list[Value]] = {loss_id: [b.const(1.0)]}
    cotangent: dict[int, Value] = {}
    for nid in reversed(order):
        parts = contributions.pop(nid, None)
        if parts is None or nid not in active:
            continue
        node = g.nodes[nid]
        b.span = node.span
        total = parts[0]
        for extra in parts[1:]:
            total = total + extra
        cotangent[nid] = total
        if "source" in node.op.traits:
            continue
        grads = node.op.vjp(b, total, b.value(nid), *(b.value(i) for i in node.inputs), **node.attrs)
        assert len(grads) == len(node.inputs), f"{node.op.name}: vjp returned {len(grads)} for {len(node.inputs)} inputs"
        for i, gi in zip(node.inputs, grads):
            if gi is None or i not in active:
                continue
            if gi.shape != g.nodes[i].shape:
                raise AssertionError(f"{node.op.name}: gradient for %{i} has shape {gi.type}, "
                                     f"expected {g.nodes[i].type}")
            contributions.setdefault(i, []).append(gi)

    outputs = {loss: loss_id}
    for name, pid in g.params.items():
        grad = cotangent.get(pid)
        if grad is None:
            b.span = g.nodes[pid].span
            grad = b.broadcast_to(b.const(0.0), shape=g.nodes[pid].shape)
        outputs[f"grad:{name}"] = grad.id
    g.outputs = outputs
    return g
