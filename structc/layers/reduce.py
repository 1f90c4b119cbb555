"""`mean`: a sum (`ops/reduce.py`) divided by the number of elements summed."""
from __future__ import annotations

from ..ops.reduce import count, normalize_axes
from .context import surface


@surface("mean")
def mean(ctx, x, *, axes=None, keepdims=False):
    """mean(x, axes=...): the sum divided by the number of elements summed."""
    ctx.expect_tensor(x, "mean")
    ax = ctx.checked(lambda: normalize_axes(axes, x.type.rank))
    return ctx.b.sum(x, axes=ax, keepdims=keepdims) / count(ctx.b, x.shape, ax)
