"""The `dense` layer: x @ W + b, a `matmul` (`ops/matmul.py`) and a bias;
with `per=g.type`, one weight and bias per edge type of a graph input."""
from __future__ import annotations

from ..errors import SnetTypeError
from ..graph import Value
from ..types import TensorType
from .context import surface


@surface("dense")
def dense(ctx, x, units, *, bias=True, init="glorot", name=None, per=None):
    """dense(x, units): x @ W + b with W: [in, units] and b: [units]; per=g.type: one W, b per edge type."""
    if per is not None:
        return _per_type(ctx, x, units, per, bias=bias, init=init, name=name)
    ctx.expect_tensor(x, "dense")
    if x.type.rank != 2:
        ctx.fail(f"dense expects a [batch, features] input, got {x.type}; use flatten(x) first")
    units = ctx.expect_int(units, "units")
    layer = ctx.layer_name("dense", name)
    w = ctx.param(f"{layer}.w", TensorType((x.shape[1], units)), init)
    y = ctx.b.matmul(x, w)
    if ctx.expect_bool(bias, "bias"):
        y = y + ctx.param(f"{layer}.b", TensorType((units,)), "zeros")
    return y


def _per_type(ctx, x, units, per, *, bias, init, name):
    """`per=g.type`: the value given builds the layer itself (`gnn.EdgeTypes.snet_dense`),
    so this library does not import the graph front end."""
    hook = getattr(per, "snet_dense", None)
    if hook is None:
        shown = f"a tensor {per.type}" if isinstance(per, Value) else repr(per)
        raise SnetTypeError(f"dense: per= takes a graph's edge types (per=g.type), got {shown}", ctx.span)
    return hook(ctx, x, units, bias=bias, init=init, name=name)
