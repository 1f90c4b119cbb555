"""The optimiser step: one vectorised loop over the parameter arena.

Parameters and their gradients live in two arenas of one layout, so SGD,
momentum and Adam are each a single pass over three (or four) flat arrays.
The rule is chosen per call (`mode`), so `grad` and `train_step` share one
compiled function. Clipping by global norm is a first, one-task kernel that
sums the squared gradients and writes the scale min(1, c / norm) into the
hyper-parameters, which the update then reads: still one native call.
"""
from __future__ import annotations

import numpy as np

from ..types import TensorType
from .base import Op

MODES = {"none": 0, "sgd": 1, "momentum": 2, "adam": 3}
# hyper-parameter slots passed with every call
(LR, MOMENTUM, BETA1, BETA2, EPS, ADAM_STEP_SIZE, ADAM_V_SCALE, WEIGHT_DECAY, CLIP_NORM, CLIP_SCALE,
 VECTOR_DECAY) = range(11)
#: a loss that adds means over different things (trees and nodes) weighs each of its
#: terms by 1 - slot (zero, the default: weight 1); data-parallel training sets them
#: (`structc.denominator`, `structc.distributed`)
LOSS_WEIGHT0, MAX_LOSS_TERMS = 11, 4
#: held-out evaluation's output of term j's unweighted value: `loss_term:<j>` (`structc.heldout`)
TERM_OUTPUT = "loss_term:"
DROPOUT_KEY0, DROPOUT_KEY1, DROPOUT_STEP = 15, 16, 17
N_HYPER = 18     # CLIP_SCALE is written by native code (1 when CLIP_NORM is 0: no clipping)
N_FLOAT_HYPER = 15   # the slots from DROPOUT_KEY0 on hold uint32 bits, not floats: dropout's
# generator key (from the seed) and the step counter its masks are drawn at (`ops/random.py`)
# VECTOR_DECAY: the weight decay of the parameters from `decay_end` on (rank <= 1: biases and
# normalisations' scales and shifts, laid out after the matrices), 0 for `decay_biases=False`
CHUNK = 1 << 14
UPDATE_COST = 16    # the update's work per element, for the threading decision (`Update.lower`)


class Update(Op):
    """params -= step(grads); its inputs are the gradients, read from the arena."""
    name = "update"
    traits = frozenset({"effect"})

    def shape(self, *grads, size: int, decay_end: int | None = None) -> TensorType:
        return TensorType((), "f32")

    def reference(self, *grads, size, decay_end=None):
        return np.zeros(())

    def lower(self, kb, node, epilogue):
        from ..lower.module import run_time_value
        size_attr = node.attrs["size"]
        decay_attr = node.attrs.get("decay_end")
        decay_attr = size_attr if decay_attr is None else decay_attr
        vw = kb.vector_width
        _clip_scale_kernel(kb, node, size_attr)
        # The sizes are read at run time (`run_time_value`): the kernels' text is the
        # same for every model, so an edit of a layer's width never recompiles them.
        # Its cost is its time in the runtime's units (~100 a ns): SGD took 2.2 us a
        # chunk on one core. At 4 an element, `apply_update` of an MLP of 235,000
        # parameters counted as less work than ENTRY_SERIAL_WORK and ran on the caller
        # alone: after a 2-thread `grad_into_arena` it read half the arena from the
        # other core's cache, 122 us against 75 pooled.
        with kb.kernel(f"update{node.id}", (size_attr + CHUNK - 1) // CHUNK, cost=CHUNK * UPDATE_COST) as (cg, lo, hi):
            b = cg.b
            size, decay_end = run_time_value(cg, size_attr), run_time_value(cg, decay_attr)
            params, grads, state = (cg.arena(k) for k in ("params", "grads", "state"))
            mode = cg.mode()
            start = cg.imul(lo, CHUNK)
            stop = cg.imin(cg.imul(hi, CHUNK), size)
            h = {k: cg.splat(cg.hyper(k), vw) for k in range(N_HYPER)}
            one = cg.const(1.0, h[LR])

            def step(rule, lo_j, hi_j, decay):
                whole = b.sdiv(b.sub(hi_j, lo_j), cg.i64(vw))
                with cg.loop(whole, name="u") as v:
                    j = cg.iadd(lo_j, cg.imul(v, vw))
                    _apply(cg, rule, j, vw, params, grads, state, h, one, size, decay)
                # the last (< vw) elements: one masked step. A scalar loop there is what O3's
                # loop vectoriser takes on, versioned for aliasing now that `size` (Adam's v
                # after m) is a run-time value: 4x the LLVM time of the whole kernel
                rest = b.sub(b.sub(hi_j, lo_j), cg.imul(whole, vw))
                with cg.if_(b.icmp_signed(">", rest, cg.i64(0))):
                    _apply(cg, rule, b.sub(hi_j, rest), vw, params, grads, state, h, one, size, decay,
                           mask=cg.lane_mask(rest, vw))

            for rule in ("sgd", "momentum", "adam"):
                with cg.if_(b.icmp_signed("==", mode, cg.i64(MODES[rule]))):
                    # matrices, then vectors (either range empty in a chunk on the other side, or
                    # in a model without one kind): one copy of the code for both ranges
                    with cg.loop(2, name="range", unroll=False) as r:
                        matrices = b.icmp_signed("==", r, cg.i64(0))
                        lo_j = b.select(matrices, start, _imax(cg, start, decay_end))
                        hi_j = b.select(matrices, cg.imin(stop, decay_end), stop)
                        step(rule, lo_j, hi_j, b.select(matrices, h[WEIGHT_DECAY], h[VECTOR_DECAY]))


def _clip_scale_kernel(kb, node, size_attr):
    """hyper[CLIP_SCALE] = min(1, c / ||grads||) when clipping (c = hyper[CLIP_NORM] > 0) in a
    training mode, else 1. One task: the update's tasks all need the global norm."""
    from ..lower.codegen import F32, F64, PTR
    from ..lower.module import run_time_value
    vw = kb.vector_width
    with kb.kernel(f"update{node.id}_clip", 1, cost=1) as (cg, lo, hi):
        b = cg.b
        size = run_time_value(cg, size_attr)
        hyper = cg.slot(cg.layout.hyper_slot, PTR)
        clip = cg.hyper(CLIP_NORM)
        scale = cg.var(F32, cg.const(1.0, F32))
        training = b.icmp_signed("!=", cg.mode(), cg.i64(MODES["none"]))
        wanted = b.and_(training, b.fcmp_ordered(">", clip, cg.const(0.0, F32)))
        with cg.if_(wanted):
            grads = cg.arena("grads")
            # f64 partial sums: a million squares summed in f32 would lose digits
            acc = cg.var(_vec(F64, vw), cg.const(0.0, _vec(F64, vw)))
            vectors = b.sdiv(size, cg.i64(vw))
            with cg.loop(vectors, name="n") as v:
                g = b.fpext(cg.load(grads, cg.imul(v, vw), n=vw), _vec(F64, vw))
                b.store(cg.fma(g, g, b.load(acc)), acc)
            # the last (< vw) squares: one masked vector (not a scalar loop, which the loop
            # vectoriser would take on: the size is a run-time value)
            rest = b.sub(size, cg.imul(vectors, vw))
            g = b.fpext(cg.load(grads, cg.imul(vectors, vw), n=vw, mask=cg.lane_mask(rest, vw)), _vec(F64, vw))
            norm = cg.sqrt(b.fadd(cg.hsum(b.load(acc)), cg.hsum(b.fmul(g, g))))
            c64 = b.fpext(clip, F64)
            with cg.if_(b.fcmp_ordered(">", norm, c64)):
                b.store(b.fptrunc(cg.div(c64, norm), F32), scale)
        cg.store(b.load(scale), hyper, cg.i64(CLIP_SCALE))


def _vec(t, n):
    from llvmlite import ir
    return ir.VectorType(t, n) if n > 1 else t


def _any_bits(cg, v):
    """Whether any lane of the float vector v is not +0.0 (its bits not all zero)."""
    from llvmlite import ir
    b = cg.b
    n = v.type.count if isinstance(v.type, ir.VectorType) else 1
    it = ir.IntType(32 * n)         # the lanes' bits as one integer: zero iff every lane is +0.0
    return b.icmp_unsigned("!=", b.bitcast(v, it), ir.Constant(it, 0))


def _imax(cg, a, b):
    return cg.b.select(cg.b.icmp_signed(">", a, b), a, b)


def _apply(cg, rule, j, n, params, grads, state, h, one, size, decay, mask=None):
    """The rule on elements [j, j + n) (the lanes of `mask` only: the others read 0, stored
    nowhere); `decay`: the weight decay of these elements (a vector of n)."""
    p = cg.load(params, j, n=n, mask=mask)
    g = cg.fma(h[CLIP_SCALE], cg.load(grads, j, n=n, mask=mask), cg.mul(decay, p))
    if rule == "sgd":
        # A step of +0 in every lane leaves p as it is, bit for bit: no store, so the
        # rows of an embedding that no word of the batch used stay clean in every cache.
        with cg.if_(_any_bits(cg, g)):
            cg.store(cg.sub(p, cg.mul(h[LR], g)), params, j, mask=mask)
        return
    if rule == "momentum":
        v = cg.fma(h[MOMENTUM], cg.load(state, j, n=n, mask=mask), g)
        cg.store(v, state, j, mask=mask)
        p = cg.sub(p, cg.mul(h[LR], v))
    else:
        j2 = cg.iadd(j, size)
        m = cg.fma(h[BETA1], cg.load(state, j, n=n, mask=mask), cg.mul(cg.sub(one, h[BETA1]), g))
        v = cg.fma(h[BETA2], cg.load(state, j2, n=n, mask=mask), cg.mul(cg.sub(one, h[BETA2]), cg.mul(g, g)))
        cg.store(m, state, j, mask=mask)
        cg.store(v, state, j2, mask=mask)
        # PyTorch's form: lr / (1 - β1^t) · m / (√v / √(1 - β2^t) + ε)
        p = cg.sub(p, cg.div(cg.mul(h[ADAM_STEP_SIZE], m), cg.fma(cg.sqrt(v), h[ADAM_V_SCALE], h[EPS])))
    cg.store(p, params, j, mask=mask)
