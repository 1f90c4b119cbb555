"""Reverse-mode differentiation of a graph, symbolically.

Input: a forward graph with a scalar output `loss`. Output: one graph
holding the forward pass and, for every parameter, `grad:<name>`. Nodes are
visited in reverse topological order; each node's cotangent is the sum of
the contributions from its users, formed once and then read by every VJP
that needs it: the stored deltas of backpropagation. The VJPs are ordinary
ops, so the backward graph is optimised like the forward one.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from .errors import GradientWarning, Span
from .graph import Builder, Graph, Value


def differentiate(forward: Graph, loss: str = "loss", frozen: frozenset[str] = frozenset(),
                   vector_width: int = 16) -> Graph:
    """`frozen` parameters get no `grad:<name>` output, and no node is
    differentiated only for their sake. `vector_width`: the target's lanes,
    for the VJPs that run the pass pipeline on a program of their own (a
    recursion's backward node cases, `ops/tree.py`)."""
    return _differentiate(forward, loss, frozen, vector_width)[0]


def _differentiate(forward: Graph, loss: str, frozen: frozenset[str] = frozenset(),
                   vector_width: int = 16) -> tuple[Graph, list[tuple[int, int]], list[str]]:
    """The train graph; the (node, input) pairs whose VJP gives no gradient
    although the input lies between a parameter and the loss (where gradients
    stop); and the parameters no cotangent reached (their gradient is zero)."""
    g = forward.copy()
    loss_id = g.outputs[loss]
    order = g.topo()
    # Only nodes between a trainable parameter and the loss carry a gradient.
    upstream = g.reachable([loss_id], backwards=True)
    trainable = [pid for name, pid in g.params.items() if name not in frozen]
    from_params = g.reachable(trainable)      # one walk: not one per parameter
    active = upstream & from_params

    b = Builder(g, vector_width=vector_width)
    contributions: dict[int, list[Value]] = {loss_id: [b.const(1.0)]}
    cotangent: dict[int, Value] = {}
    stops: list[tuple[int, int]] = []
    for nid in reversed(order):
        parts = contributions.pop(nid, None)
        if parts is None or nid not in active:
            continue
        node = g.nodes[nid]
        b.span = node.span
        total = parts[0]
        for extra in parts[1:]:
            total = total + extra
        cotangent[nid] = total
        if "source" in node.op.traits:
            continue
        grads = _checked_vjp(node.op, node.op.vjp(b, total, b.value(nid), *(b.value(i) for i in node.inputs),
                                                  **node.attrs), len(node.inputs))
        for i, gi in zip(node.inputs, grads):
            if gi is None and i in active:
                stops.append((nid, i))
            if gi is None or i not in active:
                continue
            if gi.shape != g.nodes[i].shape:
                raise AssertionError(f"{node.op.name}: gradient for %{i} has shape {gi.type}, "
                                     f"expected {g.nodes[i].type}")
            contributions.setdefault(i, []).append(gi)

    outputs = {loss: loss_id}
    unreached = []
    for name, pid in g.params.items():
        if name in frozen:
            continue
        grad = cotangent.get(pid)
        if grad is None:
            unreached.append(name)
            b.span = g.nodes[pid].span
            grad = b.broadcast_to(b.const(0.0), shape=g.nodes[pid].shape)
        outputs[f"grad:{name}"] = grad.id
    g.outputs = outputs
    return g, stops, unreached


def _checked_vjp(op, grads, inputs: int) -> list:
    """The VJP's result if it is one Value (or None) per input; else the
    mistake, named (a user's op that forgot its `return` would otherwise fail
    in `len(None)`, and a list one short would drop a gradient silently
    under `python -O`)."""
    ok = isinstance(grads, (list, tuple)) and len(grads) == inputs
    if not ok or not all(gi is None or isinstance(gi, Value) for gi in grads):
        got = (f"a {type(grads).__name__} of {len(grads)}: {[type(gi).__name__ for gi in grads]}"
               if isinstance(grads, (list, tuple)) else repr(grads) if grads is None else type(grads).__name__)
        raise AssertionError(f"{op.name}.vjp must return a list with one Value (or None) per input "
                             f"({inputs} here), got {got}")
    return list(grads)


#: the update decays every parameter it covers, a blocked one too (PyTorch skips one whose
#: .grad is None): under weight decay, Adam moves it by about lr a step toward 0
_DECAY_NOTE = " but weight decay, which shrinks {it} toward 0 (freeze {it} to keep {it})"


@dataclass(frozen=True)
class Blocked:
    """Parameters no gradient reaches, and why: the ops on every path from
    them to the loss that pass no gradient (`stops`, as (op name, span)), or
    none when the loss does not read them at all."""
    params: tuple[str, ...]
    span: Span | None
    stops: tuple[tuple[str, Span | None], ...]
    hint: str = ""

    def message(self) -> str:
        one = len(self.params) == 1
        what = f"parameter{'' if one else 's'} {', '.join(self.params)}"
        it = "it" if one else "them"
        where = f"{self.span}: " if self.span else ""
        if not self.stops:
            return (f"{where}{what} {'does' if one else 'do'} not affect the loss: the gradient is "
                    f"always zero, so training will not change {it}{_DECAY_NOTE.format(it=it)}")
        ops = ", ".join(f"{op} at {span}" if span else op for op, span in self.stops)
        text = (f"{where}no gradient reaches {what}: every path from {it} to the loss passes an op "
                f"whose derivative is zero wherever it exists ({ops}), so training will not change {it}"
                f"{_DECAY_NOTE.format(it=it)}")
        return text + (f"; {self.hint}" if self.hint else "")


@dataclass(frozen=True)
class Untrainable:
    """A model with a loss and no parameter that training changes: it declares
    none, or every one is frozen. Training runs, reports its epochs and saves,
    and changes nothing."""
    model: str
    span: Span | None
    frozen: tuple[str, ...]

    def message(self) -> str:
        where = f"{self.span}: " if self.span else ""
        why = f"its parameters ({', '.join(self.frozen)}) are all frozen" if self.frozen else "it declares none"
        return (f"{where}model {self.model} has no parameter that training changes ({why}): its loss depends "
                f"on nothing training updates, so training will do nothing")


def blocked_params(forward: Graph, loss: str = "loss", frozen: frozenset[str] = frozenset(),
                   model_span: Span | None = None) -> list[Blocked | Untrainable]:
    """Parameters whose gradient is structurally zero: the loss does not read
    them, or every path to it passes an op whose VJP gives no gradient (a
    threshold, a comparison). Such a model trains forever with zero gradients.
    A model with no parameter to train at all is one `Untrainable`, at `model_span`
    (the model's name; without it, the loss)."""
    if loss not in forward.outputs:
        return []
    return differentiate_checked(forward, loss, frozen, model_span)[1]


def differentiate_checked(forward: Graph, loss: str = "loss", frozen: frozenset[str] = frozenset(),
                          model_span: Span | None = None,
                          vector_width: int = 16) -> tuple[Graph, list[Blocked | Untrainable]]:
    """`differentiate` of the loss alone, and `blocked_params`, from one
    differentiation: a compile needs both (the warnings in every part's
    metadata, the train graph for the training part), and differentiating
    twice was a tenth of the Python time of a deep model's compile."""
    # (_differentiate works on a copy, whose outputs it sets: the loss and the gradients)
    train, stops, unreached = _differentiate(forward, loss, frozen, vector_width)   # frozen ones are meant not to change
    found: list = _blocked(train, loss, forward.outputs[loss], stops, unreached)
    if not set(forward.params) - set(frozen):
        span = model_span or forward.nodes[forward.outputs[loss]].span
        found.append(Untrainable(forward.name, span, tuple(sorted(forward.params))))
    return train, found


def _blocked(g: Graph, loss: str, loss_id: int, stops, unreached) -> list[Blocked]:
    """`blocked_params` from a differentiation's stops and unreached parameters."""
    upstream = g.reachable([loss_id], backwards=True) - {loss_id}
    groups: dict[tuple[int, ...], list[str]] = {}
    for name in unreached:
        pid = g.params[name]
        if pid not in upstream:
            groups.setdefault((), []).append(name)
            continue
        below = g.reachable([pid])
        key = tuple(sorted({nid for nid, i in stops if i in below}))
        groups.setdefault(key, []).append(name)
    found = []
    for key, names in groups.items():
        if not key:
            for name in names:
                found.append(Blocked((name,), g.nodes[g.params[name]].span, ()))
            continue
        nodes = [g.nodes[nid] for nid in key]
        hints = sorted({getattr(n.op, "no_gradient_hint", "") for n in nodes} - {""})
        found.append(Blocked(tuple(names), nodes[-1].span, tuple((n.op.name, n.span) for n in nodes),
                             "; ".join(hints)))
    return found


def gradient_warnings(forward: Graph, loss: str = "loss", frozen: frozenset[str] = frozenset(),
                      model_span: Span | None = None) -> list[dict]:
    """`blocked_params` as plain data (message, file, line), kept in an
    artifact's metadata so a cached model warns as a fresh compile does."""
    return warning_entries(blocked_params(forward, loss, frozen, model_span))


def warning_entries(blocked: list[Blocked | Untrainable]) -> list[dict]:
    """`Blocked` items as `gradient_warnings` gives them."""
    return [{"message": item.message(), "file": item.span.file if item.span else "<model>",
             "line": item.span.line if item.span else 0} for item in blocked]


def refiled(entries: list[dict], file: str) -> list[dict]:
    """`gradient_warnings` entries kept with a cached model, naming `file`, the source
    being compiled now: the cache's key is the program's text, so the entries may come
    from the same text compiled from another file, and named that one."""
    out = []
    for entry in entries:
        old = entry["file"]
        if old in (file, "<model>"):
            out.append(entry)
            continue
        message = re.sub(rf"(?:^|(?<=\s)){re.escape(old)}:(?=\d)", lambda m: f"{file}:", entry["message"])
        out.append(dict(entry, file=file, message=message))
    return out


def warn_gradient_flow(entries: list[dict]) -> None:
    """One `GradientWarning` per entry, attributed to its .snet line (Python
    prints that line of the source under the message)."""
    for entry in entries:
        warnings.warn_explicit(entry["message"], GradientWarning, entry["file"], entry["line"])
