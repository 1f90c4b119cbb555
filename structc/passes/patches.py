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
every new node the convolution's span. Not rewritten: padded convolutions,
input dilations (those are gradients, and none is in a forward graph a user
wrote), and overlapping or gapped patches (kernel != stride): an 11x11
convolution at stride 4 on 3 channels (an AlexNet stem) measured no faster as
patches (P is 3.7x the input; see benchmarks/RESULTS.md).
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


def patch_convs(g: Graph) -> Graph:
    changed = False
    for nid in g.topo():
        node = g.nodes[nid]
        if node.op.name != "conv2d" or not _rewritten(g, nid):
            continue
        x, w = node.inputs
        O, C, KH, KW = g.nodes[w].shape
        b = Builder(g, node.span)
        p = b.patches(b.value(x), kernel=(KH, KW), stride=(KH, KW), padding=(0, 0, 0, 0))
        new = b.conv2d(p, b.reshape(b.value(w), shape=(O, C * KH * KW, 1, 1)))
        g.replace_uses(nid, new.id)
        changed = True
    return dce(g) if changed else g
