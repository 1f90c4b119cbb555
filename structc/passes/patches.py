"""patch_convs: a convolution whose kernel is its stride runs as its input's
patches followed by a 1x1 convolution, rewritten on the forward graph before
it is differentiated:

    conv2d(x, w, stride=k) = conv2d(patches(x, kernel=k, stride=k), reshape(w, [O, C·KH·KW, 1, 1]))

A 16x16 convolution at stride 16 (a ViT's patch embedding) read each input
row by loads and shuffles, 16 loads and 15 shuffles a vector of 16 useful
lanes: its forward ran at 46% of the FMA peak and its kernel gradient at
21%, where a 1x1 convolution runs at 85-91% forward. `patches` is then a copy
(a permutation: no element twice), and the backward pass, derived from the
rewritten graph, is the 1x1 convolution's (its kernel gradient over P,
reshaped back) plus, only where x needs a gradient, `patches_grad`.

The weight keeps its name and [O, C, KH, KW] shape (a reshape is a view), and
every new node the convolution's span. Not rewritten so: padded convolutions,
input dilations (those are gradients, and none is in a forward graph a user
wrote), and overlapping or gapped patches (kernel != stride): an 11x11
convolution at stride 4 on 3 channels (an AlexNet stem) measured no faster as
patches (P is 3.7x the input; see benchmarks/RESULTS.md).

A row stride s >= 3 (2 in code for AVX2 or SSE: `PHASE_STRIDE`) with a kernel
KW about a whole number of strides wide runs
over the input's s column phases instead (`_phased`): with Q = ceil(KW / s),

    conv2d(x, w, stride=(sh, s)) = conv2d(patches(x, kernel=(1, s), stride=(1, s)),
                                          patches(w, kernel=(1, s), stride=(1, s)), stride=(sh, 1))

x'[n, c s + r, h, j] = x[n, c, h, j s + r] and w'[o, c s + r, kh, q] = w[o, c, kh, q s + r]
(0 past KW): a stride-1 convolution along the rows over s C channels, the
taps q s + r >= KW multiplying zeros (`PHASE_WASTE`). A strided row read s
loads and s - 1 shuffles a vector for every kernel column; the stem's forward
and kernel gradient ran at 40% of the FMA peak, as phases at 85% and 80% of
it (12 taps for 11). x' is a permutation of x (padded), so its gradient,
where x needs one, is `patches_grad` storing each element once; w''s
gradient goes back through `patches_grad` of the weight (a small tensor).
The profiler counts the zero taps as work.
`structc compile --dump=graph.patch_convs` shows the result.
"""
from __future__ import annotations

from ..graph import Builder, Graph
from ..ops.conv import pair, quad
from .dce import dce


def _rewritten(g: Graph, nid: int) -> bool:
    """Whether conv2d node `nid` runs as patches and a 1x1 convolution."""
    node = g.nodes[nid]
    kernel = tuple(g.nodes[node.inputs[1]].shape[2:])
    return (pair(node.attrs.get("input_dilation", 1)) == (1, 1) and not any(quad(node.attrs.get("padding", 0)))
            and kernel == pair(node.attrs.get("stride", 1)) and kernel != (1, 1))


#: a row stride runs over the input's column phases when the kernel, widened to a
#: whole number of strides, has at most this many times its taps (11 wide at stride 4:
#: 12 / 11; 7 at 3: 9 / 7, no)
PHASE_WASTE = 1.25
#: the least row stride run over phases, by the vector width the code is for. With
#: AVX-512 a stride of 2 reads its rows by 2 loads and 1 shuffle a vector, 75-85% of
#: the FMA peak as it is (bench_zoo's strided_cnn). AVX2 has no one-instruction
#: shuffle of two vectors: a 7x7 stride-2 stem's step (bench_zoo's stem_7x7) ran 25%
#: faster over phases on a Zen 1 (SSE: unmeasured, as AVX2)
PHASE_STRIDE = {16: 3, 8: 2, 4: 2}


def _phases(g: Graph, nid: int, vector_width: int) -> int:
    """The row stride s if conv2d node `nid` runs over its input's s column phases, else 0."""
    node = g.nodes[nid]
    KW = g.nodes[node.inputs[1]].shape[3]
    s = pair(node.attrs.get("stride", 1))[1]
    if pair(node.attrs.get("input_dilation", 1)) != (1, 1) or min(quad(node.attrs.get("padding", 0))) < 0:
        return 0
    return s if s >= PHASE_STRIDE[vector_width] and -(-KW // s) * s <= PHASE_WASTE * KW else 0


def _phased(b: Builder, g: Graph, node, s: int):
    """conv2d `node` over the s column phases of its input (the module's docstring)."""
    x, w = node.inputs
    W = g.nodes[x].shape[3]
    KW = g.nodes[w].shape[3]
    OW = node.shape[3]
    sh = pair(node.attrs.get("stride", 1))[0]
    pt, pb, pl, _ = quad(node.attrs.get("padding", 0))
    Q = -(-KW // s)
    cols = OW + Q - 1                       # the phase columns the output reads
    # zeros past the row (its right padding, and the last phase columns' ends); a row
    # longer than `cols` phase columns never happens: floor((W + pl) / s) - floor((W +
    # pl + pr - KW) / s) <= Q (checked by brute force over widths, kernels, strides, paddings)
    xp = b.patches(b.value(x), kernel=(1, s), stride=(1, s), padding=(0, 0, pl, max(0, cols * s - W - pl)))
    assert xp.shape[3] == cols, (xp.shape, cols)
    wp = b.patches(b.value(w), kernel=(1, s), stride=(1, s), padding=(0, 0, 0, Q * s - KW))
    return b.conv2d(xp, wp, stride=(sh, 1), padding=(pt, pb, 0, 0))


def _as_patches(b: Builder, g: Graph, node):
    """conv2d `node`, whose kernel is its stride, as patches and a 1x1 convolution."""
    x, w = node.inputs
    O, C, KH, KW = g.nodes[w].shape
    p = b.patches(b.value(x), kernel=(KH, KW), stride=(KH, KW), padding=(0, 0, 0, 0))
    return b.conv2d(p, b.reshape(b.value(w), shape=(O, C * KH * KW, 1, 1)))


def patch_convs(g: Graph, vector_width: int = 16) -> Graph:
    """The rewrites above, for code of this vector width (`PHASE_STRIDE`)."""
    changed = False
    for nid in g.topo():
        node = g.nodes[nid]
        if node.op.name != "conv2d":
            continue
        b = Builder(g, node.span)
        if _rewritten(g, nid):
            new = _as_patches(b, g, node)
        elif s := _phases(g, nid, vector_width):
            new = _phased(b, g, node, s)
        else:
            continue
        g.replace_uses(nid, new.id)
        changed = True
    return dce(g) if changed else g
