"""Patches (im2col in NCHW) and their adjoint, the ops a convolution becomes
when it runs as a rearrangement of its input followed by a 1x1 convolution
(`passes/patches.py`):

    P[n, (c, kh, kw), i, j] = X[n, c, i·sh + kh, j·sw + kw]      (X: x padded by zeros)

P is [N, C·KH·KW, OH, OW], its channel index c·KH·KW + kh·KW + kw, so that

    conv2d(x, w, stride, padding) = conv2d(P, reshape(w, [O, C·KH·KW, 1, 1]))

With the kernel equal to the stride and no padding, every element of x lands
in P at most once (a space-to-depth permutation; the rows and columns past
the last whole patch are dropped, as the convolution drops them). The adjoint,
`patches_grad` (col2im), adds each element of P back where it was read from:
a scatter-add where patches overlap, a permutation where they do not.
"""
from __future__ import annotations

import numpy as np

from ..types import TensorType
from .base import Op, Sample, expect
from .conv import _fmt_pad, _hw, conv_shape, pair, prepare, quad


def _check_attrs(kernel, stride, padding) -> None:
    expect(min(pair(kernel)) >= 1, f"a patch must be at least 1x1, got {pair(kernel)}")
    expect(min(pair(stride)) >= 1, f"strides must be positive, got {pair(stride)}")
    expect(min(quad(padding)) >= 0, f"patches pad with zeros only (no cropping), got padding {quad(padding)}")


def patches_reference(x, *, kernel, stride=(1, 1), padding=(0, 0, 0, 0)):
    KH, KW = pair(kernel)
    sh, sw = pair(stride)
    X = prepare(x, quad(padding), (1, 1))
    oh, ow = (X.shape[2] - KH) // sh + 1, (X.shape[3] - KW) // sw + 1
    taps = [X[:, :, kh:kh + (oh - 1) * sh + 1:sh, kw:kw + (ow - 1) * sw + 1:sw]
            for kh in range(KH) for kw in range(KW)]
    n, c = x.shape[:2]
    return np.stack(taps, axis=2).reshape(n, c * KH * KW, oh, ow)


class Patches(Op):
    """P[n, (c, kh, kw), i, j] = X[n, c, i·sh + kh, j·sw + kw], X: x zero-padded."""
    name = "patches"
    floats_only = True

    def shape(self, x, *, kernel, stride=(1, 1), padding=(0, 0, 0, 0)) -> TensorType:
        _hw(x, "the input")
        _check_attrs(kernel, stride, padding)
        KH, KW = pair(kernel)
        oh, ow = conv_shape(x, (KH, KW), pair(stride), quad(padding), (1, 1))
        return TensorType((x.shape[0], x.shape[1] * KH * KW, oh, ow), "f32")

    def vjp(self, b, g, out, x, *, kernel, stride=(1, 1), padding=(0, 0, 0, 0)):
        return [b.patches_grad(g, kernel=pair(kernel), stride=pair(stride), padding=quad(padding),
                               plane=tuple(x.shape[2:]))]

    def reference(self, x, *, kernel, stride=(1, 1), padding=(0, 0, 0, 0)):
        return patches_reference(x, kernel=kernel, stride=stride, padding=padding)

    def samples(self):
        return [
            Sample(((2, 3, 8, 8),), {"kernel": (4, 4), "stride": (4, 4)}),              # space to depth
            Sample(((2, 2, 9, 11),), {"kernel": (2, 3), "stride": (2, 3)}),             # edges dropped
            Sample(((1, 2, 13, 14),), {"kernel": (5, 5), "stride": (3, 4), "padding": (1, 2, 2, 0)}),
            Sample(((2, 1, 6, 21),), {"kernel": (3, 2), "padding": (1, 1, 1, 1)}),      # stride 1: rows
            Sample(((1, 2, 7, 37),), {"kernel": (2, 3), "stride": (1, 2)}),             # overlapping
        ]

    def describe(self, attrs: dict) -> str:
        text = "kernel=%dx%d, stride=%dx%d" % (pair(attrs["kernel"]) + pair(attrs.get("stride", 1)))
        if any(quad(attrs.get("padding", 0))):
            text += f", padding={_fmt_pad(quad(attrs['padding']))}"
        return text

    def lower(self, kb, node, epilogue):
        from ..lower.patches import emit_patches
        emit_patches(kb, node)


class PatchesGrad(Op):
    """dx[n, c, h, w] = Σ P[n, (c, kh, kw), i, j] over the (kh, kw, i, j) with
    i·sh + kh - pt = h and j·sw + kw - pl = w: `patches`' adjoint (col2im)."""
    name = "patches_grad"
    floats_only = True
    traits = frozenset({"epilogue"})        # the activation's derivative mask below, as its planes are stored

    def shape(self, p, *, kernel, stride, padding, plane) -> TensorType:
        _check_attrs(kernel, stride, padding)
        KH, KW = pair(kernel)
        expect(p.rank == 4 and isinstance(p.shape[1], int) and p.shape[1] % (KH * KW) == 0,
               f"patches_grad needs [N, C·{KH}·{KW}, OH, OW] patches, got {p}")
        x = TensorType((p.shape[0], p.shape[1] // (KH * KW), *plane), "f32")
        oh, ow = conv_shape(x, (KH, KW), pair(stride), quad(padding), (1, 1))
        expect(tuple(p.shape[2:]) == (oh, ow),
               f"patches {p} are not those of a {plane[0]}x{plane[1]} plane (expected {oh}x{ow} of them)")
        return x

    def vjp(self, b, h, out, p, *, kernel, stride, padding, plane):
        return [b.patches(h, kernel=kernel, stride=stride, padding=padding)]

    def reference(self, p, *, kernel, stride, padding, plane):
        KH, KW = pair(kernel)
        sh, sw = pair(stride)
        pt, pb, pl, pr = quad(padding)
        n, ckk, oh, ow = p.shape
        X = np.zeros((n, ckk // (KH * KW), plane[0] + pt + pb, plane[1] + pl + pr), p.dtype)
        taps = p.reshape(n, ckk // (KH * KW), KH, KW, oh, ow)
        for kh in range(KH):
            for kw in range(KW):
                X[:, :, kh:kh + (oh - 1) * sh + 1:sh, kw:kw + (ow - 1) * sw + 1:sw] += taps[:, :, kh, kw]
        return X[:, :, pt:pt + plane[0], pl:pl + plane[1]]

    def samples(self):
        return [Sample(((n, c * kh * kw, *hw),), {"kernel": (kh, kw), "stride": s, "padding": p, "plane": plane})
                for n, c, kh, kw, hw, s, p, plane in (
                    (2, 3, 4, 4, (2, 2), (4, 4), (0, 0, 0, 0), (8, 8)),
                    (2, 2, 2, 3, (4, 3), (2, 3), (0, 0, 0, 0), (9, 11)),
                    (1, 2, 5, 5, (4, 3), (3, 4), (1, 2, 2, 0), (13, 14)),
                    (2, 1, 3, 2, (6, 22), (1, 1), (1, 1, 1, 1), (6, 21)),
                    (1, 2, 2, 3, (6, 18), (1, 2), (0, 0, 0, 0), (7, 37)))]

    def describe(self, attrs: dict) -> str:
        return Patches().describe(attrs) + ", plane=%dx%d" % tuple(attrs["plane"])

    def lower(self, kb, node, epilogue):
        from ..lower.patches import emit_patches_grad
        emit_patches_grad(kb, node, epilogue)
