"""Random ops: dropout's mask, drawn from a counter-based generator (Philox-4x32-10).

    dropout_mask(x)[e] = keep[e] / (1 - p),   keep[e] = [bits(e) >= ⌊p · 2^32⌋]

where bits(e) is word e mod 4 of Philox-4x32-10 (`lower/philox.py`) at
counter (e div 4 as two words, step, stream) under a 64-bit key: e is the
element's flat position in x (whose values are not read: x gives the
shape), `step` the training step, `stream` which dropout of the model this
is. A mask is therefore a pure function of (seed, step, stream, e): the same
at any thread count and whichever kernel computes it, and a new one each step.

The language's `dropout(x, p)` is `x * dropout_mask(x)` (`layers/dropout.py`):
the mask is computed in the store loop of the kernel producing x (a matmul's
epilogue), stored beside it, and read again by the backward pass's
`g * mask`. Regenerating it there instead (the mask is a pure function, and
dropout is linear, so its VJP could be the same op on the cotangent) was
measured slower on the MLP benchmark: two Philox evaluations per element
cost more than one store and one load (benchmarks/RESULTS.md, "Dropout").

Key and step come from the hyper-parameters (`optim.DROPOUT_KEY0`..
`DROPOUT_STEP`, written by `Net` before each training call), or, for tests,
from the op's `counters` attribute: fixed there, the mask is a
deterministic function that every entry computes. Without them the forward
entry (`passes.mode.inference`) replaces the mask by 1: dropout is off
outside training.

The mask multiplies x (rather than selecting), so NaN and ±inf propagate as
in numpy and PyTorch: a dropped NaN stays NaN.
"""
from __future__ import annotations

import numpy as np

from ..types import TensorType
from .base import Elementwise, Sample, expect

#: the step that draws no mask: every element kept and unscaled (training steps count from 1)
OFF = 0
#: an example counter triple (key word 0, key word 1, step) for the samples
SAMPLE_COUNTERS = (0x12345678, 0x9ABCDEF0, 7)


def threshold(p: float) -> int:
    """An element is kept when its 32 random bits are at least this: P(keep) = 1 - p
    to within 2^-32 (p * 2^32 is exact in float64, and below 2^32 for p < 1)."""
    return int(p * 2.0 ** 32)


def scale(p: float) -> float:
    """What kept elements are multiplied by: 1/(1-p), rounded to float32 as native code reads it."""
    return float(np.float32(1.0 / (1.0 - p)))


def keep_mask(size: int, p: float, key, step: int, stream: int) -> np.ndarray:
    """The reference mask of elements 0 .. size-1 (bool), from the numpy Philox."""
    from ..lower.philox import element_bits_numpy
    return element_bits_numpy(size, key, step, stream) >= threshold(p)


class DropoutMask(Elementwise):
    """keep / (1 - p) for each element of x's shape (see the module docstring)."""
    name = "dropout_mask"
    #: `indexed`: `emit` gets `index=`, the flat position of its first lane (`lower.fused`)
    #: `random`: reads the run's key and step (`Net` writes the step before each training call)
    traits = frozenset({"elementwise", "indexed", "random"})

    def shape(self, x: TensorType, *, p: float, stream: int = 0, counters: tuple | None = None) -> TensorType:
        expect(x.is_float, f"dropout takes a float tensor, got {x}")
        expect(isinstance(p, float) and 0.0 <= p < 1.0, f"p must be a number in [0, 1), got {p!r}")
        expect(isinstance(stream, int) and 0 <= stream < 2 ** 32, f"stream must be a uint32, got {stream!r}")
        expect(counters is None or (len(counters) == 3 and all(isinstance(c, int) and 0 <= c < 2 ** 32
                                                                 for c in counters)),
               f"counters must be None or three uint32 (key0, key1, step), got {counters!r}")
        return TensorType(x.shape, "f32")

    def vjp(self, b, g, out, x, *, p, stream=0, counters=None):
        return [None]       # the mask does not depend on x's values

    def inference(self, b, node):
        """Off outside training: a mask of ones (simplify then drops x * 1).
        Fixed counters make it a test's pure function, computed in every entry."""
        if node.attrs.get("counters") is None:
            return b.const(1.0)
        return None

    def reference(self, x, *, p, stream=0, counters=None):
        if counters is None:
            raise ValueError("dropout's mask depends on the run's seed and step, which only the compiled "
                             "training entry knows: evaluate it with fixed counters=(key0, key1, step)")
        shape = np.shape(x)
        if counters[2] == OFF:
            return np.ones(shape)
        keep = keep_mask(int(np.prod(shape, dtype=np.int64)), p, counters[:2], counters[2], stream)
        return np.where(keep, scale(p), 0.0).reshape(shape)

    def samples(self):
        # fixed counters make the mask a function; x is an input ("fixed"), as it has no gradient
        c = SAMPLE_COUNTERS
        return [Sample((((3, 5), "fixed"),), {"p": 0.5, "stream": 1, "counters": c}),
                Sample((((2, 7), "fixed"),), {"p": 0.5, "stream": 1, "counters": (1, 2, OFF)}),
                Sample((((37,), "fixed"),), {"p": 0.1, "stream": 0, "counters": c}),
                Sample((((4, 19), "fixed"),), {"p": 0.9, "stream": 2 ** 32 - 1, "counters": (1, 2, 2 ** 32 - 1)}),
                Sample(((((), "fixed")),), {"p": 0.3, "stream": 3, "counters": c})]

    def emit(self, cg, x, *, index, p, stream=0, counters=None):
        from llvmlite import ir

        from ..lower.codegen import I32, I64, lanes
        from .optim import DROPOUT_KEY0, DROPOUT_KEY1, DROPOUT_STEP
        b = cg.b
        if counters is None:    # the run's key and step: uint32 bits in float slots
            key0, key1, step = (b.zext(b.bitcast(cg.hyper(k), I32), I64)
                                for k in (DROPOUT_KEY0, DROPOUT_KEY1, DROPOUT_STEP))
        else:
            key0, key1, step = (cg.i64(c) for c in counters)
        n = lanes(x.type)
        if counters is not None and counters[2] == OFF:
            return cg.const(1.0, x)
        bits = cg.random_bits(index, step, cg.i64(stream), (key0, key1), n)
        t = threshold(p)
        keep = b.icmp_unsigned(">=", bits, cg.splat(ir.Constant(I32, t - (t >> 31 << 32)), n))  # as a signed i32
        mask = cg.select(keep, cg.const(scale(p), x), cg.const(0.0, x))
        if counters is None:    # step 0: a loss without dropout (`Net.loss`, held-out evaluation)
            mask = cg.select(b.icmp_unsigned("==", step, cg.i64(OFF)), cg.const(1.0, x), mask)
        return mask
