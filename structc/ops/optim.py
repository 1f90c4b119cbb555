"""The optimiser step: one vectorised loop over the parameter arena.

Parameters and their gradients live in two arenas of one layout, so SGD,
momentum and Adam are each a single pass over three (or four) flat arrays.
The rule is chosen per call (`mode`), so `grad` and `train_step` share one
compiled function.
"""
from __future__ import annotations

import numpy as np

from ..types import TensorType
from .base import Op

MODES = {"none": 0, "sgd": 1, "momentum": 2, "adam": 3}
# hyper-parameter slots passed with every call
LR, MOMENTUM, BETA1, BETA2, EPS, ADAM_STEP_SIZE, ADAM_V_SCALE, WEIGHT_DECAY = range(8)
N_HYPER = 8
CHUNK = 1 << 14


class Update(Op):
    """params -= step(grads); its inputs are the gradients, read from the arena."""
    name = "update"
    traits = frozenset({"effect"})

    def shape(self, *grads, size: int) -> TensorType:
        return TensorType((), "f32")

    def reference(self, *grads, size):
        return np.zeros(())

    def lower(self, kb, node, epilogue):
        from ..lower.codegen import F32
        size = node.attrs["size"]
        vw = kb.vector_width
        with kb.kernel(f"update{node.id}", (size + CHUNK - 1) // CHUNK, cost=CHUNK * 4) as (cg, lo, hi):
            b = cg.b
            params, grads, state = (cg.arena(k) for k in ("params", "grads", "state"))
            mode = cg.mode()
            start = cg.imul(lo, CHUNK)
            stop = cg.imin(cg.imul(hi, CHUNK), cg.i64(size))
            h = {k: cg.splat(cg.hyper(k), vw) for k in range(N_HYPER)}
            one = cg.const(1.0, h[LR])

            def step(rule):
                with cg.loop(b.sdiv(b.sub(stop, start), cg.i64(vw)), name="u") as v:
                    j = cg.iadd(start, cg.imul(v, vw))
                    _apply(cg, rule, j, vw, params, grads, state, h, one, size)
                with cg.loop(stop, start=b.sub(stop, b.srem(b.sub(stop, start), cg.i64(vw))), name="ut") as j:
                    hs = {k: cg.hyper(k) for k in h}
                    _apply(cg, rule, j, 1, params, grads, state, hs, cg.const(1.0, F32), size)

            for rule in ("sgd", "momentum", "adam"):
                with cg.if_(b.icmp_signed("==", mode, cg.i64(MODES[rule]))):
                    step(rule)


def _apply(cg, rule, j, n, params, grads, state, h, one, size):
    p = cg.load(params, j, n=n)
    g = cg.add(cg.load(grads, j, n=n), cg.mul(h[WEIGHT_DECAY], p))
    if rule == "sgd":
        p = cg.sub(p, cg.mul(h[LR], g))
    elif rule == "momentum":
        v = cg.fma(h[MOMENTUM], cg.load(state, j, n=n), g)
        cg.store(v, state, j)
        p = cg.sub(p, cg.mul(h[LR], v))
    else:
        j2 = cg.iadd(j, size)
        m = cg.fma(h[BETA1], cg.load(state, j, n=n), cg.mul(cg.sub(one, h[BETA1]), g))
        v = cg.fma(h[BETA2], cg.load(state, j2, n=n), cg.mul(cg.sub(one, h[BETA2]), cg.mul(g, g)))
        cg.store(m, state, j)
        cg.store(v, state, j2)
        # PyTorch's form: lr / (1 - β1^t) · m / (√v / √(1 - β2^t) + ε)
        p = cg.sub(p, cg.div(cg.mul(h[ADAM_STEP_SIZE], m), cg.fma(cg.sqrt(v), h[ADAM_V_SCALE], h[EPS])))
    cg.store(p, params, j)
