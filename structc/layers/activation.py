"""`log_softmax` and `clip` in the language. log_softmax is built from ops
(`ops/reduce.py`'s max and sum, elementwise exp and log), stable: the row
maximum is subtracted first; clip is the `clip` op, its bounds given by
position or by name."""
from __future__ import annotations

from ..ops.reduce import normalize_axes
from .context import show, surface


@surface("log_softmax")
def log_softmax(ctx, x, *, axis=-1):
    """log_softmax(x, axis=-1): x - log(sum(exp(x))) along axis, computed stably"""
    ctx.expect_tensor(x, "log_softmax")
    ax = ctx.checked(lambda: normalize_axes(axis, x.type.rank))
    b = ctx.b
    # the maximum's gradient cancels exactly (the result does not depend on it)
    z = x - b.max(x, axes=ax, keepdims=True)
    return z - b.log(b.sum(b.exp(z), axes=ax, keepdims=True))


@surface("clip")
def clip(ctx, x, lo=None, hi=None):
    """clip(x, lo, hi): x limited to [lo, hi] (numbers; NaN stays NaN)"""
    ctx.expect_tensor(x, "clip")
    for what, v in (("lo", lo), ("hi", hi)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            ctx.fail(f"clip: {what} must be a number, got {'nothing' if v is None else show(v)}")
    return ctx.checked(lambda: ctx.b.clip(x, lo=float(lo), hi=float(hi)))
