"""Convolution as the seed defines it: a sum over input channels of 2-D
cross-correlations (the layers `conv2d`, `conv`, `conv1d`: `layers/conv.py`).

    z[n, o] = Σ_c  w[o, c] ⋆ x[n, c]          (⋆: 2-D cross-correlation)
    z[n, o, i, j] = Σ_c Σ_kh Σ_kw w[o, c, kh, kw] · X[n, c, i·sh + kh, j·sw + kw]

where X is x with `input_dilation - 1` zeros between its elements and
`padding` (top, bottom, left, right; negative values crop) around them.
Only the batch axis may be symbolic. The layer's bias and activation are
ordinary elementwise ops; `conv2d` has the `epilogue` trait, so the fuse
pass runs them in the convolution's store loop.

The backward pass is made of the same kind of ops, as the seed derives it:

  * the input gradient is a *full* cross-correlation of the delta with the
    flipped kernel: `conv2d(g, flip_kernel(w), padding = k - 1 - p)` (for a
    strided convolution the delta is dilated by the stride first, which is
    the `input_dilation` attribute, and the result read with stride
    `input_dilation`);
  * the kernel gradient is a cross-correlation of the input with the delta:
    `conv2d_kernel_grad(x, g)`, summed over the batch.

Both are ordinary graph nodes, so `--dump=train` shows them, CSE shares the
flipped kernel and the fuse pass gives the input-gradient convolution the
activation's derivative mask of the layer below as its epilogue.
"""
from __future__ import annotations

import numpy as np

from ..types import TensorType
from .base import Op, Sample, expect


# -- attributes ---------------------------------------------------------------

def pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1]))
    return (int(v), int(v))


def quad(v) -> tuple[int, int, int, int]:
    """Padding as (top, bottom, left, right)."""
    if isinstance(v, (tuple, list)):
        if len(v) == 2:
            return (int(v[0]), int(v[0]), int(v[1]), int(v[1]))
        return tuple(int(p) for p in v)
    return (int(v),) * 4


def out_size(n: int, k: int, s: int, lo: int, hi: int, d: int = 1) -> int:
    """Outputs of a cross-correlation of a length-n signal (dilated by d,
    padded by lo/hi) with a length-k kernel at stride s; < 1 if none fit."""
    span = (n - 1) * d + 1 + lo + hi - k
    return span // s + 1 if span >= 0 else 0


def _hw(t: TensorType, what: str) -> tuple[int, int]:
    expect(t.rank == 4, f"{what} must be [batch, channels, height, width], got {t}")
    expect(t.dtype == "f32", f"{what} must be f32, got {t}")
    expect(all(isinstance(d, int) for d in t.shape[1:]),
           f"{what} needs static channels, height and width, got {t}")
    return t.shape[2], t.shape[3]


def _fmt_pad(p) -> str:
    t, b, l, r = p
    if t == b == l == r:
        return str(t)
    return f"{t},{b},{l},{r}"


def conv_shape(x: TensorType, kernel, stride, padding, dilation) -> tuple[int, int]:
    H, W = _hw(x, "the input")
    kh, kw = kernel
    sh, sw = stride
    pt, pb, pl, pr = padding
    dh, dw = dilation
    expect(sh >= 1 and sw >= 1, f"strides must be positive, got {sh}x{sw}")
    expect(dh >= 1 and dw >= 1, f"input dilation must be positive, got {dh}x{dw}")
    Hd, Wd = (H - 1) * dh + 1 + pt + pb, (W - 1) * dw + 1 + pl + pr
    expect(kh <= Hd and kw <= Wd,
           f"kernel {kh}x{kw} is larger than the {'padded ' if any(padding) else ''}input "
           f"{Hd}x{Wd} ({x}" + (f", padding {_fmt_pad(padding)})" if any(padding) else ")"))
    return out_size(H, kh, sh, pt, pb, dh), out_size(W, kw, sw, pl, pr, dw)


# -- numpy references (float64 in tests) ---------------------------------------

def prepare(x: np.ndarray, padding, dilation) -> np.ndarray:
    """X: x dilated (zeros between elements) and padded (negative: cropped)."""
    dh, dw = dilation
    if dh > 1 or dw > 1:
        n, c, h, w = x.shape
        xd = np.zeros((n, c, (h - 1) * dh + 1, (w - 1) * dw + 1), x.dtype)
        xd[:, :, ::dh, ::dw] = x
        x = xd
    pt, pb, pl, pr = padding
    h, w = x.shape[2:]
    x = x[:, :, max(0, -pt):h - max(0, -pb), max(0, -pl):w - max(0, -pr)]
    return np.pad(x, ((0, 0), (0, 0), (max(0, pt), max(0, pb)), (max(0, pl), max(0, pr))))


def _patches(X, kh, kw, oh, ow, stride):
    sh, sw = stride
    return X[:, :, kh:kh + (oh - 1) * sh + 1:sh, kw:kw + (ow - 1) * sw + 1:sw]


def conv2d_reference(x, w, stride=(1, 1), padding=(0, 0, 0, 0), input_dilation=(1, 1)):
    X = prepare(x, quad(padding), pair(input_dilation))
    O, C, KH, KW = w.shape
    sh, sw = pair(stride)
    oh, ow = (X.shape[2] - KH) // sh + 1, (X.shape[3] - KW) // sw + 1
    out = np.zeros((x.shape[0], O, oh, ow), np.result_type(x, w))
    for kh in range(KH):
        for kw in range(KW):
            out += np.einsum("nchw,oc->nohw", _patches(X, kh, kw, oh, ow, (sh, sw)), w[:, :, kh, kw])
    return out


# -- ops ------------------------------------------------------------------------

class Conv2d(Op):
    """z[n, o, i, j] = Σ_c Σ_kh Σ_kw w[o, c, kh, kw] · X[n, c, i·sh + kh, j·sw + kw]."""
    name = "conv2d"
    floats_only = True
    traits = frozenset({"epilogue"})

    def shape(self, x, w, *, stride=(1, 1), padding=(0, 0, 0, 0), input_dilation=(1, 1)) -> TensorType:
        expect(w.rank == 4 and all(isinstance(d, int) for d in w.shape),
               f"the kernel must be a static [out, in, height, width] tensor, got {w}")
        _hw(x, "the input")
        expect(x.shape[1] == w.shape[1],
               f"the input has {x.shape[1]} channels but the kernel expects {w.shape[1]} ({x} vs kernel {w})")
        oh, ow = conv_shape(x, w.shape[2:], pair(stride), quad(padding), pair(input_dilation))
        return TensorType((x.shape[0], w.shape[0], oh, ow), "f32")

    def vjp(self, b, g, out, x, w, *, stride=(1, 1), padding=(0, 0, 0, 0), input_dilation=(1, 1)):
        attrs = dict(stride=pair(stride), padding=quad(padding), input_dilation=pair(input_dilation))
        # the kernel's gradient first: its nodes then come first among the ready ones in the
        # schedule, so the layer's input is freed before the input's gradient is stored
        dw = kernel_grad(b, x, g, tuple(w.shape[2:]), attrs)
        return [conv_input_grad(b, g, w, x.shape[2:], **attrs), dw]

    def reference(self, x, w, *, stride=(1, 1), padding=(0, 0, 0, 0), input_dilation=(1, 1)):
        return conv2d_reference(x, w, stride, padding, input_dilation)

    def samples(self):
        return [
            Sample(((2, 3, 7, 9), (4, 3, 3, 3))),                                 # valid, odd sizes
            Sample(((2, 2, 6, 19), (5, 2, 3, 2)), {"padding": (1, 1, 0, 1)}),       # explicit, asymmetric
            Sample(((1, 3, 5, 5), (2, 3, 5, 5))),                                 # kernel as large as the input
            Sample(((3, 4, 4, 6), (7, 4, 1, 1))),                                 # 1x1
            Sample(((2, 2, 9, 8), (3, 2, 3, 3)), {"stride": (2, 2), "padding": (1, 1, 1, 1)}),
            Sample(((1, 2, 4, 5), (3, 2, 3, 2)), {"input_dilation": (2, 2), "stride": (1, 2),
                                                  "padding": (2, 1, 1, -1)}),
        ]

    def describe(self, attrs: dict) -> str:
        parts = []
        if pair(attrs.get("stride", 1)) != (1, 1):
            parts.append("stride=%dx%d" % pair(attrs["stride"]))
        if any(quad(attrs.get("padding", 0))):
            parts.append(f"padding={_fmt_pad(quad(attrs['padding']))}")
        if pair(attrs.get("input_dilation", 1)) != (1, 1):
            parts.append("input_dilation=%dx%d" % pair(attrs["input_dilation"]))
        return ", ".join(parts)

    def lower(self, kb, node, epilogue):
        from ..lower.conv import emit_conv2d
        emit_conv2d(kb, node, epilogue)


def conv_input_grad(b, g, w, hw, *, stride, padding, input_dilation):
    """∂E/∂x: the full cross-correlation of the (stride-dilated) delta with
    the flipped kernel, read at stride `input_dilation`."""
    KH, KW = w.shape[2:]
    OH, OW = g.shape[2:]
    pads = []
    for n, k, s, lo, d, on in ((hw[0], KH, stride[0], padding[0], input_dilation[0], OH),
                               (hw[1], KW, stride[1], padding[2], input_dilation[1], OW)):
        pads.append((k - 1 - lo, (n - 1) * d - (on - 1) * s + lo))
    return b.conv2d(g, b.flip_kernel(w), stride=tuple(input_dilation),
                    padding=(pads[0][0], pads[0][1], pads[1][0], pads[1][1]), input_dilation=tuple(stride))


class FlipKernel(Op):
    """w[o, c, kh, kw] -> w[c, o, KH-1-kh, KW-1-kw]: the kernel of the input
    gradient (in and out channels swapped, rotated by 180°)."""
    name = "flip_kernel"

    def shape(self, w) -> TensorType:
        expect(w.rank == 4, f"flip_kernel needs an [out, in, height, width] kernel, got {w}")
        o, c, kh, kw = w.shape
        return TensorType((c, o, kh, kw), w.dtype)

    def vjp(self, b, g, out, w):
        return [b.flip_kernel(g)]

    def reference(self, w):
        return np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])

    def samples(self):
        return [Sample(((3, 2, 3, 4),))]

    def lower(self, kb, node, epilogue):
        from ..lower.conv import emit_flip
        emit_flip(kb, node)


class Conv2dKernelGrad(Op):
    """∂E/∂w[o, c, kh, kw] = Σ_n Σ_i Σ_j g[n, o, i, j] · X[n, c, i·sh + kh, j·sw + kw]:
    the cross-correlation of the input with the delta."""
    name = "conv2d_kernel_grad"
    traits = frozenset({"siblings"})

    def shape(self, x, g, *, kernel, stride=(1, 1), padding=(0, 0, 0, 0),
              input_dilation=(1, 1)) -> TensorType:
        oh, ow = conv_shape(x, pair(kernel), pair(stride), quad(padding), pair(input_dilation))
        expect(g.rank == 4 and tuple(g.shape[2:]) == (oh, ow) and g.shape[0] == x.shape[0],
               f"the delta {g} does not match the convolution of {x} (expected [{x.shape[0]}, _, {oh}, {ow}])")
        expect(isinstance(g.shape[1], int), f"the delta needs static channels, got {g}")
        return TensorType((g.shape[1], x.shape[1], *pair(kernel)), "f32")

    def vjp(self, b, h, out, x, g, *, kernel, stride=(1, 1), padding=(0, 0, 0, 0), input_dilation=(1, 1)):
        # bilinear in (x, g): the cotangent h plays the kernel
        attrs = dict(stride=pair(stride), padding=quad(padding), input_dilation=pair(input_dilation))
        return [conv_input_grad(b, g, h, x.shape[2:], **attrs), b.conv2d(x, h, **attrs)]

    def reference(self, x, g, *, kernel, stride=(1, 1), padding=(0, 0, 0, 0), input_dilation=(1, 1)):
        X = prepare(x, quad(padding), pair(input_dilation))
        KH, KW = pair(kernel)
        oh, ow = g.shape[2:]
        out = np.zeros((g.shape[1], x.shape[1], KH, KW), np.result_type(x, g))
        for kh in range(KH):
            for kw in range(KW):
                out[:, :, kh, kw] = np.einsum("nohw,nchw->oc", g, _patches(X, kh, kw, oh, ow, pair(stride)))
        return out

    def samples(self):
        return [
            Sample(((2, 3, 7, 9), (2, 4, 5, 7)), {"kernel": (3, 3)}),
            Sample(((2, 2, 6, 19), (2, 5, 6, 19)), {"kernel": (3, 2), "padding": (1, 1, 0, 1)}),
            Sample(((2, 2, 9, 8), (2, 3, 5, 4)), {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1, 1, 1)}),
            Sample(((1, 2, 4, 5), (1, 3, 8, 4)), {"kernel": (3, 2), "input_dilation": (2, 2), "stride": (1, 2),
                                                  "padding": (2, 1, 1, -1)}),
            # two padded rows a vector, their kernel columns shuffled out of the input rows
            Sample(((2, 3, 6, 6), (2, 4, 6, 6)), {"kernel": (3, 3), "padding": (1, 1, 1, 1)}),
            # (last: tests/test_conv.py reads it) a plane of many vector rows: the kernel
            # reduces image by image (`lower.conv.INNER_IMAGE_ROWS`)
            Sample(((2, 2, 12, 20), (2, 3, 10, 18)), {"kernel": (3, 3)}),
        ]

    def describe(self, attrs: dict) -> str:
        rest = Conv2d.describe(self, attrs)
        return "kernel=%dx%d" % pair(attrs["kernel"]) + (f", {rest}" if rest else "")

    def siblings(self, graph, nid):
        """The bias gradient Σ_{n,i,j} g[n, o, i, j], summed while the delta is read."""
        from ..lower.conv import bias_sibling
        s = bias_sibling(graph, nid)
        return [] if s is None else [s]

    def lower(self, kb, node, epilogue):
        from ..lower.conv import emit_kernel_grad
        emit_kernel_grad(kb, node)


#: images a part of a kernel gradient gets at least (a smaller static batch stays one product)
MIN_PART_IMAGES = 2


def kernel_grad(b, x, g, kernel, attrs):
    """The kernel's gradient over a batch of images: in PARTS ranges of images
    (`conv2d_kernel_grad_parts`), summed over the parts. As tasks over output
    channels, each thread read every image's delta, half of it from the other
    core's cache (the pooling's routing before splits by images); by images
    each reads what it wrote. The parts add in a fixed order: the same bits on
    any number of threads. Made here, where autodiff places the gradient, not
    in `legalize`: a node made there comes last among the ready ones in the
    schedule (see `Conv2d.vjp`)."""
    from .matmul import PARTS
    images = x.shape[0]
    if isinstance(images, int) and images < PARTS * MIN_PART_IMAGES:
        return b.conv2d_kernel_grad(x, g, kernel=kernel, **attrs)
    return b.sum(b.conv2d_kernel_grad_parts(x, g, parts=PARTS, kernel=kernel, **attrs), axes=(0,))


def _image_parts(n: int, parts: int) -> list:
    """The images [n p / parts, n (p + 1) / parts) of each part."""
    return [range(n * p // parts, n * (p + 1) // parts) for p in range(parts)]


class Conv2dKernelGradParts(Op):
    """out[p] = `conv2d_kernel_grad` over the images [N p / parts, N (p + 1) / parts)
    only: a kernel gradient in parts (`kernel_grad`, from `Conv2d.vjp`), summed
    over axis 0. No gradient of its own: nothing differentiates a gradient
    (a training graph is differentiated once)."""
    name = "conv2d_kernel_grad_parts"

    def shape(self, x, g, *, parts, **attrs) -> TensorType:
        expect(isinstance(parts, int) and parts >= 1, f"parts must be a positive int, got {parts!r}")
        return TensorType((parts, *Conv2dKernelGrad().shape(x, g, **attrs).shape), "f32")

    def reference(self, x, g, *, parts, **attrs):
        grad = Conv2dKernelGrad().reference
        return np.stack([grad(x[r], g[r], **attrs) for r in _image_parts(x.shape[0], parts)])

    def samples(self):
        # an empty part (one image), a ragged split, the image-by-image and images-inside loops
        return [Sample((((n, *xs), "fixed"), ((n, *gs), "fixed")), {"parts": p, **attrs})
                for n, xs, gs, p, attrs in (
                    (1, (2, 6, 6), (3, 4, 4), 2, {"kernel": (3, 3)}),
                    (3, (3, 7, 9), (4, 5, 7), 2, {"kernel": (3, 3)}),
                    (5, (2, 12, 20), (3, 10, 18), 2, {"kernel": (3, 3)}),
                    (4, (2, 9, 8), (3, 5, 4), 3, {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1, 1, 1)}))]

    def describe(self, attrs: dict) -> str:
        rest = {k: v for k, v in attrs.items() if k != "parts"}
        return f"parts={attrs['parts']}, " + Conv2dKernelGrad().describe(rest)

    def legalize(self, b, node):
        """Its bias sibling, Σ_{n,i,j} g[n, o, i, j], becomes the sum of parts the
        same kernel computes while it reads the delta (`conv2d_bias_grad_parts`)."""
        from ..lower.conv import bias_sibling
        bias = bias_sibling(b.graph, node.id)
        if bias is None:
            return None
        parts = node.attrs["parts"]
        return {bias: b.sum(b.conv2d_bias_grad_parts(b.value(node.id), b.value(node.inputs[1]), parts=parts),
                            axes=(0,))}

    def lower(self, kb, node, epilogue):
        from ..lower.conv import emit_kernel_grad
        emit_kernel_grad(kb, node, parts=node.attrs["parts"])


class Conv2dBiasGradParts(Op):
    """out[p, o] = Σ g[n, o, i, j] over the images n of part p: the bias gradient's
    parts. Its first operand is the `conv2d_kernel_grad_parts` of the same
    delta, whose kernel sums them while it reads the delta (the `part` trait
    puts both in one group); otherwise a kernel of its own."""
    name = "conv2d_bias_grad_parts"
    traits = frozenset({"part"})

    def shape(self, kparts, g, *, parts) -> TensorType:
        expect(g.rank == 4 and kparts.rank == 5 and kparts.shape[:2] == (parts, g.shape[1]),
               f"conv2d_bias_grad_parts: {kparts} is not the kernel gradient's parts of the delta {g}")
        return TensorType((parts, g.shape[1]), "f32")

    def reference(self, kparts, g, *, parts):
        return np.stack([g[r].sum(axis=(0, 2, 3)) for r in _image_parts(g.shape[0], parts)]).astype(np.float32)

    def samples(self):      # the kernel gradient's parts are read for their place in the group only
        return [Sample((((2, 3, 2, 3, 3), "fixed"), ((n, 3, 5, 7), "fixed")), {"parts": 2}) for n in (1, 5)]

    def lower(self, kb, node, epilogue):
        from ..lower.conv import emit_bias_grad_parts
        emit_bias_grad_parts(kb, node)
