"""Rewrites of message passing, run on the forward graph before it is differentiated.

aggregate_first: a dense layer inside a sum over edges moves out of it,

    A (x W + b)  =  (A x) W + (A 1) b

where A is the aggregation (spmm, with its self loops and normalisation), so
the sparse product runs on the narrower side (x has fewer columns than xW)
and the backward pass, derived from the rewritten graph, inherits the same
saving: its adjoint product runs on [nodes, in] instead of [nodes, out].
Either way no message is stored per edge; this decides only which side of
the dense layer the aggregation happens on. It applies when the layer's
output feeds nothing else and `in <= out`.

Running before autodiff (rather than in `passes.PIPELINE`) is the point: the
gradient of the rewritten forward is cheaper than the rewritten gradient of
the original. `structc compile --dump=graph.aggregate_first` shows the result.
"""
from __future__ import annotations

from ..graph import Builder, Graph
from .dce import dce


def _single_use(g: Graph, nid: int) -> bool:
    return len(g.users(nid)) == 1 and nid not in g.outputs.values()


def _plain_matmul(g: Graph, nid: int) -> bool:
    node = g.nodes[nid]
    return node.op.name == "matmul" and not node.attrs.get("ta") and not node.attrs.get("tb") \
        and _single_use(g, nid)


def _linear(g: Graph, nid: int):
    """(matmul, bias or None) when `nid` is x @ W or x @ W + b with b: [units]."""
    if not _single_use(g, nid):
        return None
    node = g.nodes[nid]
    if _plain_matmul(g, nid):
        return nid, None
    if node.op.name == "add":
        for mm, bias in (node.inputs, node.inputs[::-1]):
            if mm != bias and _plain_matmul(g, mm) and tuple(g.nodes[bias].shape) == (node.shape[1],):
                return mm, bias
    return None


def aggregate_first(g: Graph) -> Graph:
    changed = False
    for nid in g.topo():
        node = g.nodes.get(nid)
        if node is None or node.op.name != "spmm" or node.attrs.get("transpose"):
            continue
        found = _linear(g, node.inputs[-1])
        if found is None:
            continue
        mm, bias = found
        x, w = g.nodes[mm].inputs
        if g.nodes[x].shape[1] > g.nodes[w].shape[1]:
            continue        # the message is narrower than its input: aggregate it as it is
        b = Builder(g, node.span)
        rel = [b.value(i) for i in node.inputs[:-1]]
        new = b.matmul(b.spmm(*rel, b.value(x), **node.attrs), b.value(w))
        if bias is not None:
            ones = b.broadcast_to(b.const(1.0), shape=(g.nodes[x].shape[0], 1))
            new = new + b.spmm(*rel, ones, **node.attrs) * b.value(bias)
        g.replace_uses(nid, new.id)
        changed = True
    return dce(g) if changed else g


# Passes over the forward graph before differentiation, in order.
PREPARE = [("aggregate_first", aggregate_first)]


def prepare(g: Graph, dump=None) -> Graph:
    for name, pass_ in PREPARE:
        g = pass_(g)
        g.verify()
        if dump is not None:
            dump(name, g)
    return g
