"""Batch normalisation's two ops: the switch between its training and
inference forms, and the in-place update of its running statistics.

The layer (`layers/norm.py`) builds the training form from ordinary ops,

    μ = mean(x over batch and space),  σ² = mean((x - μ)²)        (per channel)
    y = (x - μ) · γ/√(σ² + ε) + β

and hands it to `batch_norm_mode`, a view of y in the graph as written (so the
training entry and every gradient see the batch statistics), whose VJP gives
x, γ and β their gradients in closed form (fewer passes over the activations
than the ops that build y would take). Its inference
form (`passes.mode`, the forward entry) reads the running statistics,

    y = x · s + t,  s = γ/√(running var + ε),  t = β - running mean · s

a per-channel scale and shift that the fuse pass puts into the epilogue of
the convolution or matmul that computes x. `running_average` (an effect, like
the optimiser's update) writes PyTorch's rule into the parameter arena,

    running ← (1 - m) · running + m · c · stat

with c = n / (n - 1) for the variance (the unbiased batch variance, n values
per channel) and c = 1 for the mean. Its results are operands of `batch_norm_mode`, so the
training entry keeps them; the forward entry drops them with the training form.
"""
from __future__ import annotations

import numpy as np

from ..types import TensorType
from .base import Op, expect


def channel_shape(rank: int, channels: int) -> tuple[int, ...]:
    """A per-channel vector's shape for broadcasting along axis 1 of a rank-`rank` tensor."""
    return (channels,) + (1,) * (rank - 2)


class BatchNormMode(Op):
    """y in training (a view: no data moves); x·s + t with the running statistics in inference.
    Operands: y, x, γ, β, running mean and variance, batch mean and variance, the effects."""
    name = "batch_norm_mode"
    traits = frozenset({"view"})

    def shape(self, y, x, gamma, beta, mean, var, batch_mean, batch_var, *effects, eps: float) -> TensorType:
        expect(y.shape == x.shape, f"the normalised value {y} and the input {x} differ in shape")
        for t in (gamma, beta, mean, var, batch_mean, batch_var):
            expect(t.shape == (x.shape[1],), f"per-channel operands must be [{x.shape[1]}], got {t}")
        return y

    def vjp(self, b, g, out, y, x, gamma, beta, mean, var, batch_mean, batch_var, *effects, eps):
        """The training form's VJP in closed form (fewer passes over the activations
        than differentiating the ops that build y, which therefore get no cotangent):
        x̂ = (x - μ)·r, r = 1/√(σ² + ε), sums over the n values of each channel,
            dβ = Σ g,  dγ = Σ g·x̂,  dx = γ·r·(g - dβ/n - x̂·dγ/n)."""
        from .reduce import count
        axes = tuple(k for k in range(len(x.shape)) if k != 1)
        r = 1.0 / b.sqrt(batch_var + eps)
        xhat = (x - _per_channel(b, batch_mean, x)) * _per_channel(b, r, x)
        dbeta = channel_sum(b, g)
        dgamma = channel_sum(b, g * xhat)
        n = count(b, x.shape, axes)
        centred_g = g - _per_channel(b, dbeta / n, x) - xhat * _per_channel(b, dgamma / n, x)
        dx = centred_g * _per_channel(b, gamma * r, x)
        return [None, dx, dgamma, dbeta] + [None] * (4 + len(effects))

    def reference(self, y, *rest, eps):
        return y

    def inference(self, b, node):
        y, x, gamma, beta, mean, var = (b.value(i) for i in node.inputs[:6])
        s = gamma / b.sqrt(var + node.attrs["eps"])
        t = beta - mean * s
        return x * _per_channel(b, s, x) + _per_channel(b, t, x)


def channel_sum(b, v):
    """Σ over every axis but 1, as [C]. With spatial axes, in two steps: over
    them first ([N, C] rows, split across threads), then over the batch."""
    if v.type.rank == 2:
        return b.sum(v, axes=(0,))
    return b.sum(b.sum(v, axes=tuple(range(2, v.type.rank))), axes=(0,))


def _per_channel(b, v, like):
    """A [C] value broadcast along axis 1 of `like`."""
    return v if like.type.rank == 2 else b.reshape(v, shape=channel_shape(like.type.rank, like.shape[1]))


class RunningAverage(Op):
    """running ← (1 - m)·running + m·c·stat in place; c = n/(n - 1) when `count` (the
    dims n is the product of) is given, else 1. One small task: a vector per layer."""
    name = "running_average"
    traits = frozenset({"effect"})

    def shape(self, running, stat, *, momentum: float, count=None) -> TensorType:
        expect(running.shape == stat.shape, f"running statistic {running} and batch statistic {stat} differ")
        return TensorType((), "f32")

    def reference(self, running, stat, *, momentum, count=None):
        return np.zeros(())

    def lower(self, kb, node, epilogue):
        from ..lower.codegen import F32
        running, stat = node.inputs
        size = kb.graph.nodes[running].type.size().eval({})
        m = float(node.attrs["momentum"])
        count = node.attrs.get("count")
        with kb.kernel(f"running_average{node.id}", 1, cost=size) as (cg, lo, hi):
            b = cg.b
            r, s = cg.ptr(running), cg.ptr(stat)
            factor = cg.const(m, F32)
            if count is not None:
                n = cg.i64(1)
                for d in count:
                    n = cg.imul(n, cg.dim(d))
                nf = b.sitofp(n, F32)
                # n / (n - 1); n = 1 is refused before native code runs (`Net`)
                factor = cg.mul(factor, cg.div(nf, cg.sub(nf, cg.const(1.0, F32))))
            keep = cg.const(1.0 - m, F32)
            with cg.loop(size, name="ra") as j:
                cg.store(cg.fma(factor, cg.load(s, j), cg.mul(keep, cg.load(r, j))), r, j)


def batch_counts(g) -> list[dict]:
    """For each running variance of `g`: its buffer and the dims whose product is
    the values per channel (the metadata's `batch_counts`)."""
    return [{"buffer": g.nodes[node.inputs[0]].attrs["name"], "count": list(node.attrs["count"])}
            for node in g.nodes.values() if node.op.name == "running_average" and node.attrs.get("count")]


def freeze_statistics(g, frozen) -> None:
    """Batch norm whose running statistics are in `frozen` (what a compile's
    `freeze` selects: the layer, `"bn1"`, or both `bn1.mean` and `bn1.var`; or
    the buffers of a layer declared `frozen=true`), in place: it normalises with
    them in training too (its inference form, as a BatchNorm in PyTorch's
    `eval()` mode does), and their `running_average` updates are removed, so a
    frozen layer computes what the loaded model computes. Its scale and shift
    frozen alone (`bn1.g`, `bn1.b`), the statistics still follow the batches.
    One statistic without the other is an error: the layer reads them as a pair."""
    from ..graph import Builder
    new_of, dropped = {}, []
    for node in list(g.nodes.values()):
        if node.op.name != "batch_norm_mode":
            continue
        stats = [g.nodes[i].attrs["name"] for i in node.inputs[4:6]]
        held = [s for s in stats if s in frozen]
        if held and len(held) < 2:
            other = next(s for s in stats if s not in frozen)
            raise ValueError(f"freeze: {held[0]} is one of batch norm's running statistics, read with "
                             f"{other}: freeze both to keep them")
        if held:
            new_of[node.id] = node.op.inference(Builder(g, node.span), node).id
            dropped += [i for i in node.inputs[6:] if g.nodes[i].op.name == "running_average"]
    g.replace_all_uses(new_of)
    for nid in [*new_of, *dropped]:      # the training form's view, then its updates (no users left)
        g.remove(nid)
