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
    traits = frozenset({"elementwise", "needs_dims"})

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
