"""Rewrites of message passing, run on the forward graph before it is differentiated.

sink_gathers: row-wise work on a tensor read per edge is done per node instead,

    dense(h[g.src], k) = dense(h, k)[g.src],    f(h[g.src]) = f(h)[g.src]  (f elementwise)

and a dense layer over a concatenation with such parts is split by the weight's rows,

    dense(concat(h[g.src], h[g.dst], e), k) = dense(h, k; W1)[g.src] + (h W2)[g.dst] + e W3

(an edge network's message from both ends and its edge features: the two products
over h run over the nodes, not the edges; 5,000 nodes and 40,000 edges of 144 -> 64
took 19 ms forward and 19 ms for the weight gradient per edge, bench_zoo_structured),

and a sum into destinations of a tensor read at sources is one sparse-dense
product: sum_edges(x[g.src]) = spmm(x). So `sum(dense(h[g.src], 64) over
g.edges)` becomes the same code as `sum(dense(h, 64) over g.edges)`, and no
message is stored per edge for it. (This assumes no more nodes than edges,
the usual case: a dense layer then costs less per node than per edge.)

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
from .patches import patch_convs


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


def _gather_of(g: Graph, nid: int):
    node = g.nodes[nid]
    if node.op.name == "gather_edges" and _single_use(g, nid):
        return node
    return None


def _concat_with_gathers(g: Graph, nid: int):
    """The parts of `nid` when it is a concat of 2-D tensors along their columns, used
    once, with a part read per edge (`dense(concat(h[g.src], h[g.dst], g.e), k)`)."""
    node = g.nodes[nid]
    if node.op.name != "concat" or len(node.shape) != 2 or not _single_use(g, nid) \
            or node.attrs.get("axis", -1) not in (1, -1):
        return None
    if not any(g.nodes[i].op.name == "gather_edges" and _single_use(g, i) for i in node.inputs):
        return None
    return list(node.inputs)


def _row_constant(g: Graph, nid: int, rows) -> bool:
    """Does this operand broadcast along the rows (a scalar, a bias [k], [1, k])?"""
    shape = g.nodes[nid].shape
    return len(shape) < 2 or (len(shape) == 2 and shape[0] == 1)


def sink_gathers(g: Graph) -> Graph:
    changed = True
    while changed:
        changed = False
        for nid in g.topo():
            node = g.nodes.get(nid)
            if node is None:
                continue
            b = Builder(g, node.span)
            new = None
            if node.op.name == "matmul" and not node.attrs.get("ta") and not node.attrs.get("tb"):
                gather = _gather_of(g, node.inputs[0])
                parts = _concat_with_gathers(g, node.inputs[0])
                if parts is not None:
                    # concat(a, b, ...) @ W = a @ W[rows of a] + b @ W[rows of b] + ...: each
                    # gathered part's product then moves to the nodes (the rule below)
                    w, start, terms = b.value(node.inputs[1]), 0, []
                    for part in parts:
                        width = g.nodes[part].shape[1]
                        terms.append(b.matmul(b.value(part), b.slice(w, axis=0, start=start, stop=start + width)))
                        start += width
                    new = sum(terms[1:], terms[0])
                elif gather is not None:
                    inner = b.matmul(b.value(gather.inputs[-1]), b.value(node.inputs[1]))
                    new = b.gather_edges(*(b.value(i) for i in gather.inputs[:-1]), inner, **gather.attrs)
            elif "elementwise" in node.op.traits and node.inputs and not node.op.traits & {"inline", "indexed"}:
                # (an `indexed` op, dropout's mask, differs per position: per node it would repeat per edge)
                gathers = [i for i in node.inputs if _gather_of(g, i) is not None]
                if len(gathers) == 1 and len(node.shape) == 2 and all(
                        i == gathers[0] or _row_constant(g, i, node.shape[0]) for i in node.inputs):
                    gather = g.nodes[gathers[0]]
                    if tuple(g.nodes[gather.inputs[-1]].shape[1:]) == tuple(node.shape[1:]):
                        args = [b.value(gather.inputs[-1]) if i == gathers[0] else b.value(i) for i in node.inputs]
                        inner = b.apply(node.op.name, *args, **node.attrs)
                        new = b.gather_edges(*(b.value(i) for i in gather.inputs[:-1]), inner, **gather.attrs)
            elif node.op.name == "sum_edges" and node.attrs.get("end", "dst") == "dst":
                gather = _gather_of(g, node.inputs[-1])
                if gather is not None and gather.attrs.get("end", "src") == "src" \
                        and tuple(gather.inputs[:-1]) == tuple(node.inputs[:-1]):
                    new = b.spmm(*(b.value(i) for i in node.inputs[:-1]), b.value(gather.inputs[-1]))
            if new is not None:
                g.replace_uses(nid, new.id)
                changed = True
                break       # the graph changed under the walk: start again
        if changed:
            g = dce(g)
    return g


# Passes over the forward graph before differentiation, in order.
PREPARE = [("sink_gathers", sink_gathers), ("aggregate_first", aggregate_first), ("patch_convs", patch_convs)]


def prepare(g: Graph, dump=None, vector_width: int = 16) -> Graph:
    """The PREPARE passes; `patch_convs` rewrites by the vector width the code is for."""
    for name, pass_ in PREPARE:
        g = pass_(g, vector_width) if pass_ is patch_convs else pass_(g)
        g.verify()
        if dump is not None:
            dump(name, g)
    return g
