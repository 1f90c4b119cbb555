"""What a model's loss is a mean over: its denominator, read off the forward graph.

Data-parallel training (`structc.distributed`) needs it: rank r computes the
gradient of its shard's loss, (1/D_r) Σ_{i in r} ∇l_i, and the gradient of
the whole batch is Σ_r D_r g_r / Σ_r D_r only when D_r is what that loss
divided by. The forms, as JSON in the artifact's `loss_denominator`:

    {"kind": "mean", "dims": ["N"], "factor": 10.0}   factor · Π dims (cross_entropy, mse, mean)
    {"kind": "weights", "input": "train"}             Σ of a float input (masked_cross_entropy)
    {"kind": "sum"}                                   a plain sum: the ranks' gradients add up
    {"kind": "unsupported", "why": "..."}             anything else, with the reason

Terms that read parameters only (a weight penalty) may be added to any of
them: Σ_r (D_r/D) ∇R = ∇R. Terms with different denominators (a mean over
trees plus a mean over nodes) have no single weight per rank, so they are
"unsupported" rather than silently wrong.
"""
from __future__ import annotations

from .graph import Graph

_PARAMS_ONLY = {"kind": "params"}     # a term no input reaches


class _Unsupported(Exception):
    pass


def loss_denominator(g: Graph) -> dict:
    """The denominator of `g.outputs["loss"]` in the forms above."""
    try:
        found = _Reader(g).term(g.outputs["loss"])
    except _Unsupported as e:
        return {"kind": "unsupported", "why": str(e)}
    if found is _PARAMS_ONLY:
        return {"kind": "unsupported", "why": "the loss reads no input, so there is nothing to split"}
    return found


def evaluate(denominator: dict, dims: dict, inputs: dict) -> float:
    """The value of `denominator` for one call: its bound dims and given inputs."""
    kind = denominator["kind"]
    if kind == "mean":
        value = float(denominator["factor"])
        for d in denominator["dims"]:
            value *= dims[d]
        return value
    if kind == "weights":
        import numpy as np
        return float(np.sum(np.asarray(inputs[denominator["input"]], dtype=np.float64)))
    if kind == "sum":
        return 1.0
    raise ValueError(f"this loss cannot be split across ranks exactly: {denominator['why']}")


class _Reader:
    def __init__(self, g: Graph):
        self.g = g
        self.data = set(g.inputs.values())

    def _where(self, nid: int) -> str:
        span = self.g.nodes[nid].span
        return f" (line {span.line})" if span is not None else ""

    def _reads_data(self, nid: int) -> bool:
        return nid in self.data or bool(self.data & self.g.ancestors(nid))

    def term(self, nid: int) -> dict:
        if not self._reads_data(nid):
            return _PARAMS_ONLY
        node = self.g.nodes[nid]
        op = node.op.name
        if op == "cross_entropy":
            return self._mean(self.g.nodes[node.inputs[0]].shape[:-1], 1.0)
        if op in ("add", "sub"):
            return self._same(nid, *(self.term(i) for i in node.inputs))
        if op == "neg":
            return self.term(node.inputs[0])
        if op == "mul":
            a, b = node.inputs
            for term, scale in ((a, b), (b, a)):
                if self._constant(scale) is not None:
                    return self.term(term)
        if op == "div":
            top, bottom = node.inputs
            if self.g.nodes[top].op.name == "sum" and self._reads_data(top):
                count = self._count(bottom)
                if count is not None:
                    return count
        if op == "sum":
            return {"kind": "sum"}
        raise _Unsupported(f"the loss's `{op}`{self._where(nid)} is not a sum, or a sum divided by a count "
                           f"of examples or by a sum of weights")

    def _same(self, nid: int, *terms: dict) -> dict:
        data = [t for t in terms if t is not _PARAMS_ONLY]
        if not data:
            return _PARAMS_ONLY
        if any(t != data[0] for t in data[1:]):
            raise _Unsupported(f"the loss adds terms with different denominators{self._where(nid)}: "
                               f"{' and '.join(_describe(t) for t in data)}; no single weight per rank makes "
                               f"their sum exact")
        return data[0]

    def _mean(self, shape, factor: float) -> dict:
        dims = []
        for d in shape:
            if isinstance(d, int):
                factor *= d
            else:
                dims.append(d)
        return {"kind": "mean", "dims": dims, "factor": factor}

    def _constant(self, nid: int) -> float | None:
        node = self.g.nodes[nid]
        return node.attrs["value"] if node.op.name == "const" else None

    def _count(self, nid: int) -> dict | None:
        """A count of elements (consts and dims multiplied) or max(Σ weights, tiny)."""
        node = self.g.nodes[nid]
        op = node.op.name
        if op == "const":
            return self._mean((), node.attrs["value"])
        if op == "dim":
            return self._mean((node.attrs["dim"],), 1.0)
        if op == "mul":
            parts = [self._count(i) for i in node.inputs]
            if all(p is not None and p["kind"] == "mean" for p in parts):
                return {"kind": "mean", "dims": parts[0]["dims"] + parts[1]["dims"],
                        "factor": parts[0]["factor"] * parts[1]["factor"]}
            return None
        if op == "maximum":
            total, floor = node.inputs
            weights = self.g.nodes[total]
            if self._constant(floor) is not None and weights.op.name == "sum" and weights.inputs[0] in self.data:
                name = next(k for k, v in self.g.inputs.items() if v == weights.inputs[0])
                return {"kind": "weights", "input": name}
        return None


def _describe(term: dict) -> str:
    if term["kind"] == "mean":
        return "a mean over " + (" x ".join(term["dims"]) or "a constant")
    if term["kind"] == "weights":
        return f"a mean weighted by input '{term['input']}'"
    return "a plain sum"
