"""`log_softmax` in the language: built from ops (`ops/reduce.py`'s max and
sum, elementwise exp and log), stable: the row maximum is subtracted first."""
from __future__ import annotations

from ..ops.reduce import normalize_axes
from .context import surface


@surface("log_softmax")
def log_softmax(ctx, x, *, axis=-1):
    """log_softmax(x, axis=-1): x - log(sum(exp(x))) along axis, computed stably"""
    ctx.expect_tensor(x, "log_softmax")
    ax = ctx.checked(lambda: normalize_axes(axis, x.type.rank))
    b = ctx.b
    # the maximum's gradient cancels exactly (the result does not depend on it)
    z = x - b.max(x, axes=ax, keepdims=True)
    return z - b.log(b.sum(b.exp(z), axes=ax, keepdims=True))
