"""Losses of the language built from ops: `mse`, `binary_cross_entropy`,
`masked_cross_entropy` (`cross_entropy` and `softmax` are ops themselves:
`ops/loss.py`). For a model with no output each loss implies a prediction
(`build.PREDICTIONS`)."""
from __future__ import annotations

from ..ops.loss import check_labels, declared_classes
from ..ops.reduce import count
from .context import surface


@surface("mse")
def mse(ctx, pred, target):
    """mse(pred, target): mean of the squared differences."""
    ctx.expect_tensor(pred, "mse")
    ctx.expect_tensor(target, "mse")
    if pred.shape != target.shape:
        ctx.fail(f"mse: prediction {pred.type} and target {target.type} differ in shape")
    d = pred - target
    axes = tuple(range(len(pred.shape)))
    return ctx.b.sum(ctx.b.square(d), axes=axes) / count(ctx.b, pred.shape, axes)


@surface("binary_cross_entropy")
def binary_cross_entropy(ctx, logits, target):
    """binary_cross_entropy(z, t): mean of -t log σ(z) - (1-t) log(1-σ(z)), from logits z,
    computed as max(z, 0) - z t + log(1 + e^{-|z|}) so it never overflows."""
    ctx.expect_tensor(logits, "binary_cross_entropy")
    ctx.expect_tensor(target, "binary_cross_entropy")
    if logits.shape != target.shape:
        ctx.fail(f"binary_cross_entropy: logits {logits.type} and target {target.type} differ in shape")
    classes = declared_classes(target)
    if classes > 2:     # class labels as targets: only 0 and 1 mean anything here
        ctx.fail(f"binary_cross_entropy: the targets are labels of {classes} classes; it needs 0/1 targets "
                 "(class[...] of 2 or floats in [0, 1]); use cross_entropy for more classes")
    b = ctx.b
    per = b.relu(logits) - logits * target + b.log(b.exp(b.neg(b.abs(logits))) + 1.0)
    axes = tuple(range(len(logits.shape)))
    return b.sum(per, axes=axes) / count(b, logits.shape, axes)


@surface("masked_cross_entropy")
def masked_cross_entropy(ctx, logits, labels, mask):
    """masked_cross_entropy(z, y, mask): mean cross-entropy over the rows where mask is 1
    (mask: f32[rows], weights in general: Σ mask·loss / Σ mask)."""
    ctx.expect_tensor(logits, "masked_cross_entropy")
    ctx.expect_tensor(labels, "masked_cross_entropy")
    ctx.expect_tensor(mask, "masked_cross_entropy")
    per_row = ctx.checked(lambda: ctx.b.cross_entropy_rows(logits, labels))
    check_labels(ctx, logits, labels)
    if tuple(mask.shape) != tuple(per_row.shape) or not mask.type.is_float:
        ctx.fail(f"masked_cross_entropy: the mask must be f32[{', '.join(map(str, per_row.shape))}] "
                 f"(one weight per row), got {mask.type}")
    b = ctx.b
    axes = tuple(range(len(per_row.shape)))
    total = b.sum(per_row * mask, axes=axes)
    return total / b.maximum(b.sum(mask, axes=axes), 1e-12)
