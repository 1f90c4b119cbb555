"""Normalisation layers: `layer_norm` and `batch_norm`, built from ordinary ops.

layer_norm(x) normalises each row over the last axis, the same in training
and inference:  y = (x - μ)/√(σ² + ε) · g + b,  μ, σ² (biased) over x's last
axis; params `<layer>.g` (ones), `<layer>.b` (zeros), shaped like that axis.

batch_norm(x) normalises each channel (axis 1: features of [N, F], channels
of [N, C, H, W]) over the batch and the other axes. Training uses the batch's
statistics and updates the running ones (`<layer>.mean`, `<layer>.var`:
buffers, in the parameter arena but never trained); inference uses the
running ones (`ops/norm.py` has the two forms and the update).
"""
from __future__ import annotations

from ..ops.norm import channel_shape, channel_sum
from ..ops.reduce import count
from ..types import TensorType
from .context import show, surface


def _float(ctx, v, what: str, low: float, high: float | None = None) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > low and (high is None or v <= high)
    if not ok:
        bound = f"in ({low:g}, {high:g}]" if high is not None else f"greater than {low:g}"
        ctx.fail(f"{ctx.fname}: {what} must be a number {bound}, got {show(v)}")
    return float(v)


def _expect_float(ctx, x) -> None:
    if x.type.dtype != "f32":     # statistics of integers: convert them first, on purpose
        ctx.fail(f"{ctx.fname} expects f32 values, got {x.type}")


@surface("layer_norm")
def layer_norm(ctx, x, *, eps=1e-5, name=None):
    """layer_norm(x, eps=1e-5): x normalised over its last axis, times g plus b (learned)"""
    ctx.expect_tensor(x, "layer_norm")
    _expect_float(ctx, x)
    eps = _float(ctx, eps, "eps", 0.0)
    if x.type.rank < 1 or not isinstance(x.shape[-1], int):
        ctx.fail(f"layer_norm needs a static last axis, got {x.type}")
    b = ctx.b
    axis = (x.type.rank - 1,)
    width = float(x.shape[-1])
    layer = ctx.layer_name("ln", name)
    g = ctx.param(f"{layer}.g", TensorType((x.shape[-1],)), "ones")
    beta = ctx.param(f"{layer}.b", TensorType((x.shape[-1],)), "zeros")
    centred = x - b.sum(x, axes=axis, keepdims=True) / width
    var = b.sum(centred * centred, axes=axis, keepdims=True) / width
    return centred / b.sqrt(var + eps) * g + beta


@surface("batch_norm")
def batch_norm(ctx, x, *, eps=1e-5, momentum=0.1, name=None):
    """batch_norm(x, eps=1e-5, momentum=0.1): per channel (axis 1), batch statistics in training, running ones after"""
    ctx.expect_tensor(x, "batch_norm")
    _expect_float(ctx, x)
    eps = _float(ctx, eps, "eps", 0.0)
    momentum = _float(ctx, momentum, "momentum", 0.0, 1.0)
    if x.type.rank < 2 or not isinstance(x.shape[1], int):
        ctx.fail(f"batch_norm expects [batch, features] or [batch, channels, ...] with static channels, got {x.type}")
    if not all(isinstance(d, int) for d in x.shape[2:]):
        ctx.fail(f"batch_norm needs static sizes after the channels, got {x.type}")
    b = ctx.b
    channels = x.shape[1]
    axes = tuple(k for k in range(x.type.rank) if k != 1)
    layer = ctx.layer_name("bn", name)
    vec = TensorType((channels,))
    gamma = ctx.param(f"{layer}.g", vec, "ones")
    beta = ctx.param(f"{layer}.b", vec, "zeros")
    running_mean = ctx.buffer(f"{layer}.mean", vec, "zeros")
    running_var = ctx.buffer(f"{layer}.var", vec, "ones")

    def per_channel(v):      # [C] broadcast along axis 1
        return v if x.type.rank == 2 else b.reshape(v, shape=channel_shape(x.type.rank, channels))

    n = count(b, x.shape, axes)
    mean = channel_sum(b, x) / n
    centred = x - per_channel(mean)
    var = channel_sum(b, centred * centred) / n           # biased: what normalises
    y = centred * per_channel(gamma / b.sqrt(var + eps)) + per_channel(beta)
    counted = tuple(x.shape[k] for k in axes)
    effects = [b.running_average(running_mean, mean, momentum=momentum),
               b.running_average(running_var, var, momentum=momentum, count=counted)]
    return b.batch_norm_mode(y, x, gamma, beta, running_mean, running_var, mean, var, *effects, eps=eps)
