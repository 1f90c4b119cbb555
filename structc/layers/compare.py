"""`greater` and `greater_equal` in the language: numpy's comparisons (a NaN
operand compares false), built as `less`/`less_equal` (`ops/elementwise.py`)
with the operands swapped. The `greater` op itself is the derivative mask
that keeps NaN, so the language's name is taken here."""
from __future__ import annotations

from .context import surface


def _swapped(ctx, op: str, x, y):
    if not any(hasattr(v, "type") for v in (x, y)):
        ctx.fail(f"{ctx.fname} compares tensors: give at least one tensor operand")
    for v in (x, y):
        if not hasattr(v, "type") and not (isinstance(v, (int, float)) and not isinstance(v, bool)):
            ctx.fail(f"{ctx.fname} takes tensors or numbers, got {v!r}")
    return ctx.checked(lambda: ctx.b.apply(op, y, x))


@surface("greater")
def greater(ctx, x, y):
    """greater(x, y): 1.0 where x > y, else 0.0 (NaN compares false), a condition for where(...)"""
    return _swapped(ctx, "less", x, y)


@surface("greater_equal")
def greater_equal(ctx, x, y):
    """greater_equal(x, y): 1.0 where x >= y, else 0.0 (NaN compares false)"""
    return _swapped(ctx, "less_equal", x, y)
