"""What a model's loss is a mean over: its denominator, read off the forward graph.

Data-parallel training (`structc.distributed`) needs it: rank r computes the
gradient of its shard's loss, (1/D_r) Σ_{i in r} ∇l_i, and the gradient of
the whole batch is Σ_r D_r g_r / Σ_r D_r only when D_r is what that loss
divided by. The forms, as JSON in the artifact's `loss_denominator`:

    {"kind": "mean", "dims": ["N"], "factor": 10.0}   factor · Π dims (cross_entropy, mse, mean)
    {"kind": "weights", "input": "train"}             Σ of a float input (masked_cross_entropy)
    {"kind": "sum"}                                   a plain sum: the ranks' gradients add up
    {"kind": "unsupported", "why": "..."}             anything else, with the reason

Terms that read parameters only (a weight penalty) may be added to a mean:
Σ_r (D_r/D) ∇R = ∇R; not to a plain sum, whose ranks' gradients add (the
penalty's would be counted once per rank, and once per held-out batch).
Terms with different denominators (a mean over trees plus a mean over nodes,
a sum plus a penalty) have no single weight per rank: the compiler
then weighs each term by a hyper-parameter (`weigh_loss_terms`, 1 unless set)
and records

    {"kind": "terms", "terms": [<a form above, or {"kind": "params"}>, ...]}

Data-parallel training sets term j's weight on rank r to D_jr / D_j (its share
of the term's examples; a plain sum's to 1 on every rank with examples; a
penalty's to 1 on one rank, 0 on the others), so the
ranks' gradients simply add up to Σ_j (1/D_j) Σ_i ∇l_ij. Anything else is
"unsupported", with the reason, rather than silently wrong.
"""
from __future__ import annotations

from .graph import Graph

_PARAMS_ONLY = {"kind": "params"}     # a term no input reaches


class _Unsupported(Exception):
    pass


def loss_denominator(g: Graph) -> dict:
    """The denominator of `g.outputs["loss"]` in the forms above."""
    reader = _Reader(g)
    weighed = _weighed_terms(g)
    if weighed is not None:
        return {"kind": "terms", "terms": [reader.term(t) for t in weighed]}
    try:
        found = reader.term(g.outputs["loss"])
    except _Unsupported as e:
        return {"kind": "unsupported", "why": str(e)}
    if found is _PARAMS_ONLY:
        return {"kind": "unsupported", "why": "the loss reads no input, so there is nothing to split"}
    return found


def batch_statistic(g: Graph) -> str | None:
    """Why the loss's per-example terms are not independent of each other, or None:
    a value they read combines rows of the batch (`Op.pooled_dims`: a sum or mean
    over the examples, a product contracting them, batch norm's training form).
    Each rank of a data-parallel step would compute that statistic over its own
    shard, so its gradient would not be the whole batch's, however it is weighed."""
    reader = _Reader(g)
    try:
        for term in _weighed_terms(g) or [g.outputs["loss"]]:
            reader.term(term)
    except _Unsupported:
        pass
    return reader.pooled[0] if reader.pooled else None


def weigh_loss_terms(g: Graph) -> bool:
    """When the loss adds terms with different denominators (each a form above), make
    it Σ_i loss_weight(j_i) * term_i, in place, terms over the same things sharing a
    weight j; returns whether it did. A loss of more than `MAX_LOSS_TERMS` different
    denominators, or of terms without a form, is left as it is (and reported
    "unsupported")."""
    from .graph import Builder
    from .ops.optim import MAX_LOSS_TERMS
    reader = _Reader(g)
    try:
        reader.term(g.outputs["loss"])
        return False                          # one denominator (or unsupported for another reason)
    except _Unsupported:
        pass
    terms = _summands(g, g.outputs["loss"])
    try:
        forms = [reader.term(nid) for _, nid in terms]
    except _Unsupported:
        return False
    groups = []                               # one weight per denominator: terms over the same things share it
    for form in forms:
        if form not in groups:
            groups.append(form)
    if len(groups) > MAX_LOSS_TERMS:
        return False
    b = Builder(g, g.nodes[g.outputs["loss"]].span)
    total = None
    for (sign, nid), form in zip(terms, forms):
        part = b.value(nid) * b.apply("loss_weight", term=groups.index(form))
        total = (part if sign > 0 else -part) if total is None else (total + part if sign > 0 else total - part)
    g.outputs["loss"] = total.id
    return True


def term_values(g: Graph) -> list[int]:
    """For a loss `weigh_loss_terms` weighed: node j (added to `g`) is the unweighted
    sum of the terms of weight j, so that the loss is Σ_j loss_weight(j) * node j;
    [] for another loss. Held-out evaluation outputs them (`loss_term:<j>`) to weigh
    each by its own denominator (`structc.heldout`)."""
    from .graph import Builder
    if _weighed_terms(g) is None:
        return []
    b = Builder(g, g.nodes[g.outputs["loss"]].span)
    found: dict[int, object] = {}
    for sign, nid in _summands(g, g.outputs["loss"]):
        node = g.nodes[nid]
        weight = next(i for i in node.inputs if g.nodes[i].op.name == "loss_weight")
        term = b.value(next(i for i in node.inputs if i != weight))
        term = term if sign > 0 else -term
        j = g.nodes[weight].attrs["term"]
        found[j] = term if j not in found else found[j] + term
    return [found[j].id for j in range(len(found))]


def _summands(g: Graph, nid: int, sign: int = 1) -> list[tuple[int, int]]:
    """(sign, node) of each term of a sum of adds, subtractions and negations."""
    node = g.nodes[nid]
    if node.op.name == "add":
        return [t for i in node.inputs for t in _summands(g, i, sign)]
    if node.op.name == "sub":
        return _summands(g, node.inputs[0], sign) + _summands(g, node.inputs[1], -sign)
    if node.op.name == "neg":
        return _summands(g, node.inputs[0], -sign)
    return [(sign, nid)]


def _weighed_terms(g: Graph) -> list | None:
    """One term of each weight `weigh_loss_terms` gave, in the order of the weights
    (the terms of a weight share its denominator), or None."""
    found = {}
    for sign, nid in _summands(g, g.outputs["loss"]):
        node = g.nodes[nid]
        weights = [i for i in node.inputs if g.nodes[i].op.name == "loss_weight"] if node.op.name == "mul" else []
        if len(weights) != 1:
            return None
        found.setdefault(g.nodes[weights[0]].attrs["term"], next(i for i in node.inputs if i != weights[0]))
    if sorted(found) != list(range(len(found))):
        return None
    return [found[j] for j in range(len(found))]


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
    if kind in ("sum", "terms"):        # terms: each weighed in the graph, the weighted sums add up
        return 1.0
    if kind == "params":
        return 0.0
    raise ValueError(f"this loss cannot be split across ranks exactly: {denominator['why']}")


class _Reader:
    def __init__(self, g: Graph):
        self.g = g
        self.data = set(g.inputs.values())
        self.pooled: list[str] = []       # statistics over the batch that per-example terms read

    def _per_example(self, *nids: int) -> None:
        """Note any statistic over the batch among `nids` and what they read."""
        for i in sorted(set(nids).union(*(self.g.ancestors(n) for n in nids))):
            node = self.g.nodes[i]
            dims = node.op.pooled_dims(self.g, node)
            if dims:
                line = f", line {node.span.line}" if node.span is not None else ""
                self.pooled.append(f"the loss reads a statistic over the batch (`{node.op.name}` over "
                                   f"{', '.join(sorted(map(str, dims)))}{line}), which each rank would "
                                   "compute over its own shard alone")

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
            self._per_example(*node.inputs)
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
                    self._per_example(*self.g.nodes[top].inputs)
                    return count
        if op == "sum":
            self._per_example(*node.inputs)
            return {"kind": "sum"}
        raise _Unsupported(f"the loss's `{op}`{self._where(nid)} is not a sum, or a sum divided by a count "
                           f"of examples or by a sum of weights")

    def _same(self, nid: int, *terms: dict) -> dict:
        data = [t for t in terms if t is not _PARAMS_ONLY]
        if not data:
            return _PARAMS_ONLY
        if data[0]["kind"] == "sum" and len(data) < len(terms):    # its parts add: the penalty must not
            raise _Unsupported(f"the loss adds a plain sum and a term on parameters alone{self._where(nid)}: "
                               "summed over ranks or batches, the penalty would count once for each")
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
