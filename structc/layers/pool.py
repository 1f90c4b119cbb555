"""The pooling layers of the language: `maxpool2d`, `avgpool2d` (ops in
`ops/pool.py`) and `global_avg_pool` (a mean over the spatial axes)."""
from __future__ import annotations

from ..ops.reduce import count
from .context import surface
from .conv import _ints


def _pool_layer(ctx, op, x, size, stride):
    ctx.expect_tensor(x, ctx.fname)
    if x.type.rank != 4:
        ctx.fail(f"{ctx.fname} expects a [batch, channels, height, width] input, got {x.type}")
    s = _ints(ctx, size, "size", 2)
    st = s if stride is None else _ints(ctx, stride, "stride", 2)
    return ctx.b.apply(op, x, size=s, stride=st)


@surface("maxpool2d")
def maxpool2d(ctx, x, size=2, *, stride=None):
    """maxpool2d(x, size=2, stride=size): the maximum of each size x size window"""
    return _pool_layer(ctx, "maxpool2d", x, size, stride)


@surface("avgpool2d")
def avgpool2d(ctx, x, size=2, *, stride=None):
    """avgpool2d(x, size=2, stride=size): the mean of each size x size window"""
    return _pool_layer(ctx, "avgpool2d", x, size, stride)


@surface("global_avg_pool")
def global_avg_pool(ctx, x):
    """global_avg_pool(x): [N, C, H, W] -> [N, C], the mean over each channel's plane"""
    ctx.expect_tensor(x, "global_avg_pool")
    if x.type.rank != 4:
        ctx.fail(f"global_avg_pool expects a [batch, channels, height, width] input, got {x.type}")
    return ctx.b.sum(x, axes=(2, 3)) / count(ctx.b, x.shape, (2, 3))
