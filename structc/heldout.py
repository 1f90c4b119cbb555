"""Held-out metrics measured in parts (batches, a streamed file's chunks, ranks'
shares) and combined exactly: the loss of the whole held-out part as one call on it
gives it, whatever way it was cut.

A loss is Σ_j S_j / D_j: each term j a sum over its examples divided by what it is
a mean over, D_j (examples, roots, nodes, graphs, a mask's sum; a plain sum divides
by nothing; `structc.denominator` reads each off the graph and records it in the
metadata). Part b's term is S_jb / D_jb, so the whole part's is
(Σ_b S_jb) / (Σ_b D_jb): a `Tally` keeps Σ_b S_jb and Σ_b D_jb per term, and
the examples and correct predictions (accuracy). Tallies add up (`add`; across
ranks, an `Allreduce` of `sums`). A loss that adds means over different things
(a mean over trees plus one over nodes) gets each term's value from the
evaluation entry (`Net.evaluate_terms`); weighing the whole loss by one
denominator was off by 4% at a batch of one tree of mixed sizes.

A loss of no such form (or from a library compiled without the terms' outputs)
is weighed by examples, and says once that its held-out loss then depends on
how it was cut (`HeldOutLossWarning`) rather than differ silently.
"""
from __future__ import annotations

import warnings

import numpy as np

from .errors import HeldOutLossWarning

_WARNED: set[tuple[str, str]] = set()     # (model, why): said once per process


def loss_terms(net) -> list[dict]:
    """The denominator form of each term of `net`'s loss, in the evaluation entry's
    order; [] when the loss cannot be split (`unsupported`)."""
    found = net.meta.get("loss_denominator")
    if found is None:
        raise TypeError(f"model {net.name} declares no loss, so it has no held-out loss")
    if found["kind"] == "terms":
        return found["terms"]
    return [] if found["kind"] == "unsupported" else [found]


EMPTY_PART = ("the held-out part has no examples: there is nothing to measure the loss (or accuracy) on; "
              "give the data a held-out part (an .npz's x_test and y_test, a split that leaves some out)")


def refuse_empty(data) -> None:
    """Refuse, before any training, a data set whose held-out part has no examples (one
    without `held_out_count`, a user's own, is refused when it is measured)."""
    count = getattr(data, "held_out_count", None)
    if count is not None and count() == 0:
        raise ValueError(EMPTY_PART)


class Tally:
    """Sums of held-out parts: per loss term its weighted values and its denominators,
    then the loss weighed by examples (used only for a loss that cannot be split),
    the parts that could not be split, the correct predictions, the examples.
    `output`: the forward output whose argmax predicts the classes (None: no accuracy)."""

    def __init__(self, net, output: str | None):
        self.net, self.output = net, output
        self.terms = loss_terms(net)
        self.sums = np.zeros(2 * len(self.terms) + 4)      # float64: every rank's the same length

    def measure(self, feed: dict, truth: np.ndarray) -> None:
        """One part: `feed` evaluated in one call (`Net.evaluate_terms`); `truth`, its
        examples' classes (their count is the part's examples)."""
        net, sums, terms = self.net, self.sums, self.terms
        outs, loss, values = net.evaluate_terms(**feed)
        examples = len(truth)
        if self.output is not None:
            sums[-2] += int(np.sum(np.argmax(outs[self.output], axis=-1) == truth))
        sums[-1] += examples
        sums[-4] += loss * examples
        if values is None and len(terms) == 1:
            values = [loss]
        if values is None or len(values) != len(terms):
            sums[-3] += 1                      # this part's loss is not split
            return
        from .denominator import evaluate
        dims = net.feed_dims(**feed)
        for j, (term, value) in enumerate(zip(terms, values)):
            count = _count(term, evaluate, dims, feed)
            sums[2 * j] += value if count is None else value * count
            sums[2 * j + 1] += count or 0.0

    def add(self, other: "Tally") -> "Tally":
        self.sums += other.sums
        return self

    def metrics(self) -> dict[str, float]:
        """`loss` (and `accuracy`) of every part measured, as one call on all of them."""
        sums, n = self.sums, self.sums[-1]
        if not n:       # its NaN loss and accuracy read as a model gone wrong, and were logged as such
            raise ValueError(EMPTY_PART)
        if sums[-3]:
            self._warn_unsplit()
            loss = sums[-4] / n
        else:
            loss = sum(_combined(term, sums[2 * j], sums[2 * j + 1]) for j, term in enumerate(self.terms))
        result = {"loss": float(loss)}
        if self.output is not None:
            result["accuracy"] = float(sums[-2] / n)
        return result

    def _warn_unsplit(self) -> None:
        found = self.net.meta["loss_denominator"]
        why = (found["why"] if found["kind"] == "unsupported" else
               "this library's evaluation entry does not give the loss's terms (compile it again)")
        key = (self.net.name, why)
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(f"model {self.net.name}: the held-out loss is each batch's loss weighed by its "
                          f"examples, so it depends on the batch size: {why}", HeldOutLossWarning, stacklevel=3)


def _count(term: dict, evaluate, dims: dict, feed: dict) -> float | None:
    """What term `term`'s value is a mean over in one part: None for a plain sum (the
    parts' values add), 1 for a term on parameters alone (the same value in every part,
    so their mean is it)."""
    kind = term["kind"]
    if kind == "params":
        return 1.0
    if kind == "sum":
        return None
    return evaluate(term, dims, feed)


def _combined(term: dict, total: float, count: float) -> float:
    """A term's value over every part from its sums: a plain sum adds, a mean divides
    (by max(Σ weights, tiny) as the compiled mean does: 0 when no weight is set)."""
    if term["kind"] == "sum":
        return total
    return total / count if count else 0.0
