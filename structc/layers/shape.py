"""`flatten` and `reshape` in the language: a `reshape` op (`ops/shape.py`),
a view, with the dimensions checked and the model's symbols allowed."""
from __future__ import annotations

import numpy as np

from .context import surface


@surface("flatten")
def flatten(ctx, x):
    """flatten(x): [N, a, b, ...] -> [N, a*b*...]."""
    ctx.expect_tensor(x, "flatten")
    if x.type.rank < 2:
        ctx.fail(f"flatten expects at least 2 dimensions, got {x.type}")
    rest = x.shape[1:]
    if not all(isinstance(d, int) for d in rest):
        ctx.fail(f"flatten needs static dimensions after the first, got {x.type}")
    return ctx.b.reshape(x, shape=(x.shape[0], int(np.prod(rest))))


@surface("reshape")
def reshape(ctx, x, *dims):
    """reshape(x, d1, d2, ...) or reshape(x, (d1, d2, ...)): dims are numbers or the model's symbols."""
    ctx.expect_tensor(x, "reshape")
    if len(dims) == 1 and isinstance(dims[0], tuple):
        dims = dims[0]
    return ctx.b.reshape(x, shape=tuple(ctx.expect_dim(d) for d in dims))
