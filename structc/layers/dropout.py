"""`dropout(x, p)` in the language: x times the `dropout_mask` op
(`ops/random.py`) drawn from this call's stream, checked. Training zeroes each element with probability p
and scales the rest by 1/(1-p); outside training (`net(...)`, `forward`, the
shipped library) it is the identity."""
from __future__ import annotations

from .context import show, surface


@surface("dropout")
def dropout(ctx, x, p=None):
    """dropout(x, p): each element zeroed with probability p in training, the rest times 1/(1-p); the identity otherwise"""
    x = ctx.expect_tensor(x, "dropout")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        ctx.fail(f"dropout: p must be a number in [0, 1), got {'nothing' if p is None else show(p)}")
    if not x.type.is_float:
        ctx.fail(f"dropout: expects a float tensor, got {x.type}")
    if getattr(ctx.mb, "rec", None) is not None:
        # a body runs once per tree level on rows numbered from 0: every level would draw the same mask
        ctx.fail("dropout: not available inside a recursion body (apply it to the recursion's result)")
    if p == 0:
        return x
    # which dropout of the model this is: its masks are drawn from a stream of their own
    stream = sum(1 for node in ctx.mb.graph.nodes.values() if node.op.name == "dropout_mask")
    return x * ctx.checked(lambda: ctx.b.dropout_mask(x, p=float(p), stream=stream))
