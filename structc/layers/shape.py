"""`flatten` and `reshape` in the language: a `reshape` op (`ops/shape.py`),
a view, with the dimensions checked and the model's symbols allowed; `chunk`,
a block of columns (a `slice`)."""
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


@surface("chunk")
def chunk(ctx, x, k, n):
    """chunk(x, k, n): the k-th of n equal blocks of x's last axis (gates from one dense: chunk(g, 0, 3))"""
    ctx.expect_tensor(x, "chunk")
    n = ctx.expect_int(n, "n")
    if isinstance(k, bool) or not isinstance(k, int):
        ctx.fail(f"chunk: k must be a block number, got {k!r}")
    width = x.shape[-1] if x.type.rank else None
    if not isinstance(width, int) or n < 1 or width % n:
        ctx.fail(f"chunk: the last axis of {x.type} does not split into {n} equal blocks")
    if not 0 <= k < n:
        ctx.fail(f"chunk: block {k} of {n} does not exist (blocks 0 to {n - 1})")
    d = width // n
    return ctx.b.slice(x, axis=-1, start=k * d, stop=(k + 1) * d)
