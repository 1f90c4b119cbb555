"""The `gat` layer: graph attention (Veličković et al. 2018) over a graph's edges.

    h = elu(gat(h over g.edges, 16, heads=4))                # 4 heads of 16, concatenated: [g.nodes, 64]
    z = gat(h over g.edges, 4, heads=1, concat=false)        # heads averaged: [g.nodes, 4]

Per head, with Wh = h W split into heads of `width` features:
    e_ij = leaky_relu(a_src · Wh_j + a_dst · Wh_i, slope)     for each edge j -> i (and i -> i with self loops)
    α_ij = softmax of e_ij over i's incoming edges
    out_i = Σ_j α_ij Wh_j  (+ b), heads side by side (concat) or averaged
The scores a·Wh are computed once per node (as h·(W a), a matmul), then per
edge (`edge_score`);
the softmax and the weighted sum are the ops of `ops/attention.py`.

The graph's relation comes from the `over` argument through its
`snet_edges` hook (defined in `gnn.py`), so this module does not import the
graph front end. Not supported, and refused there: edge features, per-edge-type
weights (`per=g.type`), attention over `g.nodes` (a readout: use sum/mean/max).
"""
from __future__ import annotations

import math

from ..types import TensorType
from .context import show, surface


@surface("gat")
def gat(ctx, over=None, width=None, *, heads=1, concat=True, self_loops=True, slope=0.2, bias=True,
        init="glorot", name=None):
    """gat(h over g.edges, width, heads=1, concat=true, self_loops=true, slope=0.2): graph attention"""
    hook = getattr(over, "snet_edges", None)
    if hook is None:
        ctx.fail(f"gat: the first argument is `h over g.edges` (node features and the graph's edges), "
                 f"got {'nothing' if over is None else show(over)}")
    h, rel = hook(ctx, "gat")
    if width is None:
        ctx.fail("gat: give the features per head, e.g. gat(h over g.edges, 16, heads=4)")
    width = ctx.expect_int(width, "width")
    heads = ctx.expect_int(heads, "heads")
    concat, self_loops = ctx.expect_bool(concat, "concat"), ctx.expect_bool(self_loops, "self_loops")
    slope = _slope(ctx, slope)
    layer = ctx.layer_name("gat", name)
    b = ctx.b
    n = h.shape[0]
    fan_in = h.shape[1]
    w = ctx.param(f"{layer}.w", TensorType((fan_in, heads * width)), init)
    wh = b.matmul(h, w)
    heads_of_w = b.reshape(w, shape=(fan_in, heads, width))

    def node_scores(which):
        """a_h · (W_h^T h) = (W_h a_h) · h: fold a into W (fan_in x heads numbers,
        not nodes x heads x width), then one narrow matmul."""
        a = ctx.param(f"{layer}.{which}", TensorType((heads, width)), init)
        return b.matmul(h, b.sum(heads_of_w * a, axes=(2,)))           # [n, heads]
    s_src, s_dst = node_scores("a_src"), node_scores("a_dst")
    e = b.leaky_relu(b.edge_score(*rel, s_src, s_dst), alpha=slope)
    if self_loops:
        own = b.leaky_relu(s_src + s_dst, alpha=slope)
        alpha = b.segment_softmax(*rel, e, own, part="edges")
        out = b.attend(*rel, alpha, wh, b.segment_softmax(*rel, e, own, part="self"))
    else:
        out = b.attend(*rel, b.segment_softmax(*rel, e), wh)           # a node with no edges gets 0
    if not concat and heads > 1:
        out = b.sum(b.reshape(out, shape=(n, heads, width)), axes=(1,)) * (1.0 / heads)
    if ctx.expect_bool(bias, "bias"):
        out = out + ctx.param(f"{layer}.b", TensorType((out.shape[1],)), "zeros")
    return out


gat.over_edges = True      # build passes `h over g.edges` to it instead of aggregating


def _slope(ctx, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
        ctx.fail(f"gat: slope (LeakyReLU's for negative scores) must be a finite number >= 0, got {show(v)}")
    return float(v)
