"""The convolution layers of the language: `conv2d` (alias `conv`) and
`conv1d`, a weight, an optional bias and one `conv2d` op (`ops/conv.py`).
Options arrive as numbers, tuples, words or strings ("3x5")."""
from __future__ import annotations

from ..errors import SnetTypeError
from ..ops.conv import conv_shape
from ..types import TensorType
from .context import Word, show, surface


def _ints(ctx, v, what: str, count: int, allow_zero: bool = False) -> tuple[int, ...]:
    """An option given as a number, a tuple (3, 5), or a string "3x5" / "1,2,1,2"."""
    text = v.text if isinstance(v, Word) else v
    if isinstance(text, bool):
        text = None
    if isinstance(text, int):
        vals = (text,) * count
    elif isinstance(text, tuple):
        ok = all(isinstance(p, int) and not isinstance(p, bool) for p in text)
        vals = (text * count if len(text) == 1 else text) if ok else ()
    elif isinstance(text, str):
        sep = "x" if "x" in text else ","
        try:
            vals = tuple(int(p) for p in text.split(sep))
        except ValueError:
            vals = ()
        if len(vals) == 1:
            vals = vals * count
    else:
        vals = ()
    low = 0 if allow_zero else 1
    if len(vals) != count or any(p < low for p in vals):
        like = {1: "", 2: " or a pair (height, width) such as (3, 5)",
                4: " or (top, bottom, left, right)"}[count]
        raise SnetTypeError(f"{ctx.fname}: {what} must be a{' non-negative' if allow_zero else ' positive'} "
                            f"integer{like}, got {show(v)}", ctx.span)
    return vals


def _padding(ctx, v, kernel, stride, hw) -> tuple[int, int, int, int]:
    """valid | same | n | (h, w) | (top, bottom, left, right), or the strings "hxw" / "t,b,l,r"."""
    text = v.text if isinstance(v, Word) else v
    if text == "valid":
        return (0, 0, 0, 0)
    if text == "same":
        pads = []
        for n, k, s in zip(hw, kernel, stride):
            total = max((-(-n // s) - 1) * s + k - n, 0)     # output ceil(n / s), as TensorFlow
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    if (isinstance(text, str) and text.count(",") == 3) or (isinstance(text, tuple) and len(text) == 4):
        return _ints(ctx, text, "padding", 4, allow_zero=True)
    if isinstance(text, str) and not any(ch.isdigit() for ch in text):
        raise SnetTypeError(f"{ctx.fname}: padding must be valid, same, a number, (h, w) or "
                            f"(top, bottom, left, right), got {show(v)}", ctx.span)
    ph, pw = _ints(ctx, text, "padding", 2, allow_zero=True)
    return (ph, ph, pw, pw)


def _conv_layer(ctx, x, channels, kernel, stride, padding, bias, init, name):
    ctx.expect_tensor(x, ctx.fname)
    if x.type.rank != 4:
        ctx.fail(f"{ctx.fname} expects a [batch, channels, height, width] input, got {x.type}")
    if not all(isinstance(d, int) for d in x.shape[1:]):
        ctx.fail(f"{ctx.fname} needs static channels, height and width, got {x.type}")
    channels = ctx.expect_int(channels, "channels")
    k = _ints(ctx, kernel, "kernel", 2)
    s = _ints(ctx, stride, "stride", 2)
    p = _padding(ctx, padding, k, s, x.shape[2:])
    ctx.checked(lambda: conv_shape(x.type, k, s, p, (1, 1)))     # reported in the caller's words
    layer = ctx.layer_name("conv", name)
    w = ctx.param(f"{layer}.w", TensorType((channels, x.shape[1], *k)), init)
    y = ctx.b.conv2d(x, w, stride=s, padding=p)
    if ctx.expect_bool(bias, "bias"):
        bv = ctx.param(f"{layer}.b", TensorType((channels,)), "zeros")
        y = y + ctx.b.reshape(bv, shape=(channels, 1, 1))
    return y


@surface("conv2d")
def conv2d(ctx, x, channels, *, kernel=3, stride=1, padding="valid", bias=True, init="he", name=None):
    """conv2d(x, channels, kernel=3, stride=1, padding=valid|same|n|(h, w)|(t, b, l, r), bias=true, init=he)"""
    return _conv_layer(ctx, x, channels, kernel, stride, padding, bias, init, name)


@surface("conv")
def conv(ctx, x, channels, *, kernel=3, stride=1, padding="valid", bias=True, init="he", name=None):
    """conv(x, channels, kernel=3, ...): the same as conv2d"""
    return _conv_layer(ctx, x, channels, kernel, stride, padding, bias, init, name)


@surface("conv1d")
def conv1d(ctx, x, channels, *, kernel=3, stride=1, padding="valid", bias=True, init="he", name=None):
    """conv1d(x, channels, kernel=3, stride=1, padding=valid|same|n|(l, r), bias=true, init=he) on [N, C, L]"""
    ctx.expect_tensor(x, "conv1d")
    if x.type.rank != 3:
        ctx.fail(f"conv1d expects a [batch, channels, length] input, got {x.type}")
    if not all(isinstance(d, int) for d in x.shape[1:]):
        ctx.fail(f"conv1d needs static channels and length, got {x.type}")
    n, c, length = x.shape
    channels = ctx.expect_int(channels, "channels")
    (k,) = _ints(ctx, kernel, "kernel", 1)
    (s,) = _ints(ctx, stride, "stride", 1)
    text = padding.text if isinstance(padding, Word) else padding
    if (isinstance(text, str) and "," in text) or (isinstance(text, tuple) and len(text) == 2):
        lo, hi = _ints(ctx, text, "padding", 2, allow_zero=True)
    elif text in ("valid", "same"):
        _, _, lo, hi = _padding(ctx, text, (1, k), (1, s), (1, length))
    else:
        (lo,) = _ints(ctx, text, "padding", 1, allow_zero=True)
        hi = lo
    if k > length + lo + hi:
        ctx.fail(f"conv1d: kernel {k} is larger than the {'padded ' if lo or hi else ''}input length "
                 f"{length + lo + hi} ({x.type})")
    layer = ctx.layer_name("conv", name)
    w = ctx.param(f"{layer}.w", TensorType((channels, c, k)), init)
    x4 = ctx.b.reshape(x, shape=(n, c, 1, length))
    w4 = ctx.b.reshape(w, shape=(channels, c, 1, k))
    y = ctx.b.conv2d(x4, w4, stride=(1, s), padding=(0, 0, lo, hi))
    if ctx.expect_bool(bias, "bias"):
        bv = ctx.param(f"{layer}.b", TensorType((channels,)), "zeros")
        y = y + ctx.b.reshape(bv, shape=(channels, 1, 1))
    return ctx.b.reshape(y, shape=(n, channels, y.shape[3]))
