"""Elementwise ops: arithmetic, activations, comparisons, constants.

Each `emit` computes one element (or one vector of elements) from already
loaded operands; the fused-loop emitter in `lower.fused` supplies loads,
stores and broadcasting, so these stay one line each.
"""
from __future__ import annotations

import numpy as np

from ..types import TensorType
from .base import Elementwise, Sample, unbroadcast


class Const(Elementwise):
    """A scalar constant, inlined wherever it is used."""
    name = "const"
    traits = frozenset({"elementwise", "inline"})

    def shape(self, *, value: float, dtype: str = "f32") -> TensorType:
        return TensorType((), dtype)

    def vjp(self, b, g, out, **attrs):
        return []

    def reference(self, *, value, dtype="f32"):
        return np.array(value, dtype=np.float64)

    def samples(self):
        return [Sample((), {"value": 2.5})]

    def emit(self, cg, *, value, dtype="f32"):
        from ..lower.codegen import F32
        return cg.const(value, F32)


class DimValue(Elementwise):
    """The runtime value of a symbolic dimension, as a float scalar.

    Means and averaged losses divide by it, so `N` stays symbolic."""
    name = "dim"
    traits = frozenset({"elementwise", "inline", "needs_dims"})

    def shape(self, *, dim: str) -> TensorType:
        return TensorType((), "f32")

    def vjp(self, b, g, out, **attrs):
        return []

    def reference(self, *, dim, dims):
        return np.array(float(dims[dim]))

    def samples(self):
        return []   # needs a symbolic dimension: covered by the mean and loss tests

    def emit(self, cg, *, dim):
        from ..lower.codegen import F32
        return cg.b.sitofp(cg.dim(dim), F32)


class LossWeight(Elementwise):
    """The weight of term `term` of a loss that adds means over different things,
    1 - its hyper-parameter slot: 1 unless data-parallel training sets it (then the
    rank's share of the term's examples, `structc.denominator.weigh_loss_terms`)."""
    name = "loss_weight"
    traits = frozenset({"elementwise", "inline"})

    def shape(self, *, term: int) -> TensorType:
        return TensorType((), "f32")

    def vjp(self, b, g, out, **attrs):
        return []

    def reference(self, *, term):
        return np.array(1.0)

    def samples(self):
        return [Sample((), {"term": 0})]

    def emit(self, cg, *, term):
        from ..lower.codegen import F32
        from ..lower.module import run_time_value
        from .optim import LOSS_WEIGHT0
        # the slot read at run time: the kernels of a loss's terms of the same shape
        # (two cross-entropies' gradients) are then one text, compiled once
        slot = LOSS_WEIGHT0 + term if cg.slots is None else run_time_value(cg, LOSS_WEIGHT0 + term)
        return cg.sub(cg.const(1.0, F32), cg.hyper(slot))


class Add(Elementwise):
    """x + y"""
    name = "add"
    traits = frozenset({"elementwise", "commutative"})

    def vjp(self, b, g, out, x, y):
        return [unbroadcast(b, g, x), unbroadcast(b, g, y)]

    def reference(self, x, y):
        return x + y

    def emit(self, cg, x, y):
        return cg.add(x, y)


class Sub(Elementwise):
    """x - y"""
    name = "sub"

    def vjp(self, b, g, out, x, y):
        return [unbroadcast(b, g, x), unbroadcast(b, b.neg(g), y)]

    def reference(self, x, y):
        return x - y

    def emit(self, cg, x, y):
        return cg.sub(x, y)


class Mul(Elementwise):
    """x * y"""
    name = "mul"
    traits = frozenset({"elementwise", "commutative"})

    def vjp(self, b, g, out, x, y):
        return [unbroadcast(b, g * y, x), unbroadcast(b, g * x, y)]

    def reference(self, x, y):
        return x * y

    def emit(self, cg, x, y):
        return cg.mul(x, y)


class Div(Elementwise):
    """x / y"""
    name = "div"
    sample_kind_rhs = "positive"

    def vjp(self, b, g, out, x, y):
        return [unbroadcast(b, g / y, x), unbroadcast(b, b.neg(g * out / y), y)]

    def reference(self, x, y):
        return x / y

    def emit(self, cg, x, y):
        return cg.div(x, y)


class Neg(Elementwise):
    """-x"""
    name = "neg"

    def vjp(self, b, g, out, x):
        return [b.neg(g)]

    def reference(self, x):
        return -x

    def emit(self, cg, x):
        return cg.neg(x)


class Square(Elementwise):
    """x²"""
    name = "square"
    surface = True

    def vjp(self, b, g, out, x):
        return [g * x * 2.0]

    def reference(self, x):
        return x * x

    def emit(self, cg, x):
        return cg.mul(x, x)


class Exp(Elementwise):
    """e^x"""
    name = "exp"
    surface = True

    def vjp(self, b, g, out, x):
        return [g * out]

    def reference(self, x):
        return np.exp(x)

    def emit(self, cg, x):
        return cg.exp(x)


class Log(Elementwise):
    """ln x"""
    name = "log"
    surface = True
    sample_kind = "positive"

    def vjp(self, b, g, out, x):
        return [g / x]

    def reference(self, x):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(x)

    def emit(self, cg, x):
        return cg.log(x)


class Sqrt(Elementwise):
    """√x"""
    name = "sqrt"
    surface = True
    sample_kind = "positive"

    def vjp(self, b, g, out, x):
        return [g / (out * 2.0)]

    def reference(self, x):
        return np.sqrt(x)

    def emit(self, cg, x):
        return cg.sqrt(x)


class Relu(Elementwise):
    """max(0, x); the derivative 1(x > 0) is read off the output, so the
    pre-activation need not be kept for the backward pass."""
    name = "relu"
    surface = True

    def vjp(self, b, g, out, x):
        return [g * b.greater(out, 0.0)]

    def reference(self, x):
        return np.maximum(x, 0)

    def emit(self, cg, x):
        # ordered x <= 0 is false for NaN, so NaN passes through: one compare and
        # one blend, cheaper than llvm.maximum's signed-zero handling
        zero = cg.const(0.0, x)
        return cg.select(cg.b.fcmp_ordered("<=", x, zero), zero, x)


class Sigmoid(Elementwise):
    """1 / (1 + e^-x); σ' = σ(1 - σ)"""
    name = "sigmoid"
    surface = True

    def vjp(self, b, g, out, x):
        return [g * out * (1.0 - out)]

    def reference(self, x):
        return 1.0 / (1.0 + np.exp(-x))

    def emit(self, cg, x):
        return cg.sigmoid(x)


class Tanh(Elementwise):
    """tanh x; tanh' = 1 - tanh²"""
    name = "tanh"
    surface = True

    def vjp(self, b, g, out, x):
        return [g * (1.0 - out * out)]

    def reference(self, x):
        return np.tanh(x)

    def emit(self, cg, x):
        return cg.tanh(x)


class Threshold(Elementwise):
    """1(x ≥ 0), the seed's threshold unit (NaN stays NaN, as numpy's heaviside).

    Its derivative is 0 wherever it exists, so by default no gradient flows
    through it (`structc check` warns about the parameters this cuts off).
    With `grad=ste` the backward pass is the identity (the straight-through
    estimator): behind a threshold unit trained with mse, that is the classic
    perceptron rule, w += lr·(t - y)·x."""
    name = "threshold"
    surface = True
    no_gradient_hint = "threshold(x, grad=ste) passes the gradient straight through (a perceptron's rule)"
    GRADS = ("none", "ste")

    def shape(self, x, *, grad: str = "none") -> TensorType:
        from .base import expect
        expect(grad in self.GRADS, f"grad must be one of {', '.join(self.GRADS)}, got {grad!r}")
        return TensorType(x.shape, x.dtype)

    def vjp(self, b, g, out, x, *, grad="none"):
        return [g if grad == "ste" else None]

    def reference(self, x, *, grad="none"):
        return np.where(np.isnan(x), np.nan, x >= 0).astype(x.dtype)

    def emit(self, cg, x, *, grad="none"):
        return cg.select(cg.isnan(x), x, cg.bool_to_float(cg.ge(x, cg.const(0.0, x)), x))


class Greater(Elementwise):
    """1(x > y) as a float mask, NaN where x or y is NaN: the derivative mask of
    relu, maximum and abs, which must not turn a NaN into a zero gradient."""
    name = "greater"

    def vjp(self, b, g, out, x, y):
        return [None, None]

    def reference(self, x, y):
        mask = (x > y).astype(np.result_type(x, y))
        return np.where(np.isnan(x) | np.isnan(y), np.nan, mask).astype(mask.dtype)

    def emit(self, cg, x, y):
        unordered = cg.b.fcmp_unordered("uno", x, y)
        return cg.select(unordered, cg.const(float("nan"), x), cg.bool_to_float(cg.gt(x, y), x))


class Maximum(Elementwise):
    """max(x, y); the gradient goes to the larger operand."""
    name = "maximum"
    surface = True

    def vjp(self, b, g, out, x, y):
        mask = b.greater(x, y)
        return [unbroadcast(b, g * mask, x), unbroadcast(b, g * (1.0 - mask), y)]

    def reference(self, x, y):
        return np.maximum(x, y)

    def emit(self, cg, x, y):
        return cg.max(x, y)


class BroadcastTo(Elementwise):
    """x stretched to `shape` (the VJP of a sum)."""
    name = "broadcast_to"
    traits = frozenset({"elementwise", "needs_dims", "moves_data"})

    def shape(self, x, *, shape) -> TensorType:
        from ..types import broadcast_shapes
        from .base import expect
        expect(broadcast_shapes(x.shape, tuple(shape)) == tuple(shape),
               f"cannot broadcast {x} to [{', '.join(map(str, shape))}]")
        return TensorType(tuple(shape), x.dtype)

    def vjp(self, b, g, out, x, *, shape):
        return [unbroadcast(b, g, x)]

    def reference(self, x, *, shape, dims=None):
        target = tuple(d if isinstance(d, int) else dims[d] for d in shape)
        return np.broadcast_to(x, target).copy()

    def samples(self):
        return [Sample(((4,),), {"shape": (3, 4)}), Sample(((3, 1),), {"shape": (3, 17)}),
                Sample(((),), {"shape": (2, 3)})]

    def emit(self, cg, x, *, shape):
        return x


class Abs(Elementwise):
    """|x|; the gradient is sign(x) (0 at 0)."""
    name = "abs"
    surface = True

    def vjp(self, b, g, out, x):
        return [g * (b.greater(x, 0.0) - b.greater(0.0, x))]

    def reference(self, x):
        return np.abs(x)

    def emit(self, cg, x):
        return cg.abs(x)


# -- activations models use (issue 11 item 5) ------------------------------

class LeakyRelu(Elementwise):
    """x for x > 0, alpha·x elsewhere (PyTorch's default alpha = 0.01)."""
    name = "leaky_relu"
    surface = True

    def shape(self, x, *, alpha: float = 0.01) -> TensorType:
        return TensorType(x.shape, x.dtype)

    def vjp(self, b, g, out, x, *, alpha=0.01):
        mask = b.greater(x, 0.0)            # NaN at a NaN input: the gradient stays NaN
        return [g * (mask + (1.0 - mask) * float(alpha))]

    def reference(self, x, *, alpha=0.01):
        return np.where(x > 0, x, x * alpha)

    def samples(self):
        return super().samples() + [Sample((((4, 7), "away"),), {"alpha": 0.2})]

    def emit(self, cg, x, *, alpha=0.01):
        # ordered x > 0 is false for NaN, and alpha·NaN is NaN: NaN passes
        return cg.select(cg.gt(x, cg.const(0.0, x)), x, cg.mul(x, cg.const(alpha, x)))


class Elu(Elementwise):
    """x for x > 0, alpha·(e^x - 1) elsewhere; for x ≤ 0 the derivative
    alpha·e^x is out + alpha, read off the output."""
    name = "elu"
    surface = True

    def shape(self, x, *, alpha: float = 1.0) -> TensorType:
        return TensorType(x.shape, x.dtype)

    def vjp(self, b, g, out, x, *, alpha=1.0):
        mask = b.greater(x, 0.0)
        return [g * (mask + (1.0 - mask) * (out + float(alpha)))]

    def reference(self, x, *, alpha=1.0):
        with np.errstate(over="ignore", invalid="ignore"):
            return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))

    def samples(self):
        return super().samples() + [Sample((((4, 7), "away"),), {"alpha": 0.5})]

    def emit(self, cg, x, *, alpha=1.0):
        neg = cg.mul(cg.const(alpha, x), cg.expm1(x, nonpositive=True))     # used at x <= 0 only
        return cg.select(cg.gt(x, cg.const(0.0, x)), x, neg)


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _erfc_abs(cg, x):
    """erfc |x|, Abramowitz & Stegun 7.1.26 (erf to 1.5e-7 absolute; erfc's
    relative error 0.15% at |x| = 3.5, where it is 7e-7); NaN propagates,
    ±inf gives 0."""
    a = cg.abs(x)
    one = cg.const(1.0, x)
    t = cg.div(one, cg.fma(a, cg.const(0.3275911, x), one))
    p = cg.const(1.061405429, x)
    for c in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        p = cg.fma(p, t, cg.const(c, x))
    return cg.mul(cg.mul(p, t), cg.exp_nonpositive(cg.neg(cg.mul(a, a))))    # -a² <= 0


def _normal_cdf_ref(x):
    from math import erf
    return 0.5 * (1.0 + np.vectorize(erf, otypes=[np.float64])(x * _SQRT_HALF))


class NormalCdf(Elementwise):
    """Φ(x) = (1 + erf(x/√2)) / 2, the standard normal distribution function
    (gelu's gate); Φ' = e^(-x²/2)/√(2π)."""
    name = "normal_cdf"

    def vjp(self, b, g, out, x):
        return [g * b.exp(x * x * -0.5) * _INV_SQRT_2PI]

    def reference(self, x):
        return _normal_cdf_ref(x).astype(x.dtype)

    def emit(self, cg, x):
        # Φ(x) = erfc(-x/√2)/2: the tail computed directly for x < 0 (1 - erf
        # would cancel: Φ(-5) = 2.9e-7 is below float32's spacing near 1)
        tail = cg.mul(cg.const(0.5, x), _erfc_abs(cg, cg.mul(x, cg.const(_SQRT_HALF, x))))
        return cg.select(cg.lt(x, cg.const(0.0, x)), tail, cg.sub(cg.const(1.0, x), tail))


class Gelu(Elementwise):
    """x·Φ(x) with the exact (erf) Φ, as PyTorch's default approximate='none';
    gelu' = Φ(x) + x·φ(x)."""
    name = "gelu"
    surface = True

    def vjp(self, b, g, out, x):
        return [g * (b.normal_cdf(x) + x * b.exp(x * x * -0.5) * _INV_SQRT_2PI)]

    def reference(self, x):
        with np.errstate(invalid="ignore"):
            return (x * _normal_cdf_ref(x)).astype(x.dtype)

    def emit(self, cg, x):
        return cg.mul(x, NormalCdf.emit(self, cg, x))


class Softplus(Elementwise):
    """log(1 + e^x), computed as max(x, 0) + log1p(e^-|x|) (no overflow);
    its derivative is sigmoid(x)."""
    name = "softplus"
    surface = True

    def vjp(self, b, g, out, x):
        return [g * b.sigmoid(x)]

    def reference(self, x):
        return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))

    def emit(self, cg, x):
        tail = _log1p(cg, cg.exp_nonpositive(cg.neg(cg.abs(x))))     # -|x| <= 0
        return cg.add(cg.max(x, cg.const(0.0, x)), tail)


def _log1p(cg, u):
    """log(1 + u) accurate for tiny u (Goldberg's trick: log(w)·u/(w - 1) with
    w = 1 + u rounded): softplus(-30) is 9.4e-14, not 0."""
    one = cg.const(1.0, u)
    w = cg.add(u, one)
    # a plain fsub: the fast-math flags could fold (u + 1) - 1 back to u
    scaled = cg.div(cg.mul(cg.log(w), u), cg.b.fsub(w, one))
    return cg.select(cg.b.fcmp_ordered("==", w, one), u, scaled)


class Clip(Elementwise):
    """x limited to [lo, hi] (numpy's clip: NaN stays NaN); the gradient
    passes where lo < x < hi. The language's `clip` is `layers/activation.py`
    (lo and hi given by position or by name)."""
    name = "clip"

    def shape(self, x, *, lo: float, hi: float) -> TensorType:
        from .base import expect
        for k, v in (("lo", lo), ("hi", hi)):
            expect(isinstance(v, (int, float)) and not isinstance(v, bool),
                   f"clip's {k} must be a number, got {v!r}")
        expect(lo <= hi, f"clip needs lo <= hi, got lo={lo}, hi={hi}")
        return TensorType(x.shape, x.dtype)

    def vjp(self, b, g, out, x, *, lo, hi):
        return [g * b.greater(x, float(lo)) * b.greater(float(hi), x)]

    def reference(self, x, *, lo, hi):
        return np.clip(x, lo, hi)

    def samples(self):
        return [Sample((((3, 5), "float"),), {"lo": -0.5, "hi": 0.7}),
                Sample((((37,), "float"),), {"lo": -1, "hi": 0.3}), Sample(((((), "float")),), {"lo": 0.0, "hi": 1.0})]

    def emit(self, cg, x, *, lo, hi):
        low, high = cg.const(lo, x), cg.const(hi, x)
        # ordered compares are false for NaN, so NaN passes through both selects
        x = cg.select(cg.lt(x, low), low, x)
        return cg.select(cg.gt(x, high), high, x)


class Comparison(Elementwise):
    """1.0 where the comparison holds, 0.0 elsewhere, as numpy's comparisons
    cast to float: a NaN operand compares false (true for `not_equal`). No
    gradient flows through a comparison: use it as `where`'s condition.
    `greater`/`greater_equal` of the language are `less`/`less_equal` with
    the operands swapped (`layers/compare.py`): the `greater` op is the
    NaN-propagating derivative mask."""
    predicate = ""
    numpy = None
    unordered = False      # llvm's unordered predicate (true when an operand is NaN)

    def vjp(self, b, g, out, x, y):
        return [None, None]

    def samples(self):
        # inputs, not parameters: no gradient is meant to reach them
        return [Sample(tuple((s, "fixed") for s, _ in sample.inputs)) for sample in super().samples()]

    def reference(self, x, y):
        return type(self).numpy(x, y).astype(np.result_type(x, y, np.float32))

    def emit(self, cg, x, y):
        cmp = cg.b.fcmp_unordered if self.unordered else cg.b.fcmp_ordered
        return cg.bool_to_float(cmp(self.predicate, x, y), x)


class Less(Comparison):
    """1(x < y)"""
    name, surface, predicate, numpy = "less", True, "<", np.less


class LessEqual(Comparison):
    """1(x ≤ y)"""
    name, surface, predicate, numpy = "less_equal", True, "<=", np.less_equal


class Equal(Comparison):
    """1(x = y)"""
    name, surface, predicate, numpy = "equal", True, "==", np.equal


class NotEqual(Comparison):
    """1(x ≠ y): true when either is NaN"""
    name, surface, predicate, numpy, unordered = "not_equal", True, "!=", np.not_equal, True


class Where(Elementwise):
    """a where c is nonzero, b elsewhere (numpy's where: a NaN condition counts
    as true); the gradient goes to the operand chosen, none to the condition."""
    name = "where"
    surface = True

    def shape(self, c, a, b) -> TensorType:
        t = super().shape(c, a, b)
        dtype = next((x.dtype for x in (a, b) if x.is_float), a.dtype)
        return TensorType(t.shape, dtype)

    def vjp(self, b, g, out, c, x, y):
        return [None, unbroadcast(b, b.where(c, g, 0.0), x), unbroadcast(b, b.where(c, 0.0, g), y)]

    def reference(self, c, a, b):
        return np.where(c != 0, a, b)

    def samples(self):
        return [Sample((((3, 5), "mask"), (3, 5), (3, 5))),
                Sample((((4, 1), "mask"), (19,), (4, 19))),
                Sample((((17,), "mask"), (), (17,)))]

    def emit(self, cg, c, a, b):
        # unordered != is true for NaN, as numpy's truth value of NaN
        return cg.select(cg.b.fcmp_unordered("!=", c, cg.const(0.0, c)), a, b)
