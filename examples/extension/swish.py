"""A user's op, defined outside structc: swish(x) = x·σ(x) (also called SiLU).

Importing this module registers `swish`; `.snet` files compiled afterwards can
call `swish(x)`. Check it as structc checks its own ops:

    import swish, structc.testing
    structc.testing.check_op("swish")
"""
import numpy as np

from structc.ops import Elementwise


class Swish(Elementwise):
    """x·σ(x); swish' = σ(x) + x·σ(x)(1 - σ(x)) = out + σ(x)(1 - out)."""
    name = "swish"          # a name registers the op
    surface = True          # callable from .snet as swish(x)

    # shape: an elementwise op's output has its (broadcast) operand's shape

    def vjp(self, b, g, out, x):                # written with other ops
        s = b.sigmoid(x)
        return [g * (out + s * (1.0 - out))]

    def reference(self, x):                     # plain numpy: the meaning
        return x / (1.0 + np.exp(-x))

    def emit(self, cg, x):                      # native code: one element or a vector of them
        return cg.mul(x, cg.sigmoid(x))

    # samples(): Elementwise gives a few shapes (a matrix, an odd-sized vector, a scalar)
