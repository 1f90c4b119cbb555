"""What the layer library and the front end share: the `Context` a layer
function is called with, the `Word` a bare option value arrives as, and the
registry of layer functions (`@surface`).

`structc.build` creates a `Context` per call and looks functions up in
`SURFACE`; the layer modules (`structc/layers/*.py`) register into it. This
module imports neither side, so the import graph stays one way:
`build -> layers -> ops`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import ShapeMismatch, SnetNameError, SnetShapeError, SnetTypeError, Span
from ..graph import Builder, Value
from ..ops.base import LAYER_NAMES, REGISTRY
from ..types import TensorType

SURFACE: dict[str, Callable] = {}   # language-level functions that are not single ops


def surface(name: str):
    """Register a language-level function built from ops: f(ctx, *args, **kw)."""
    def deco(fn):
        assert name not in SURFACE, f"surface function {name} defined twice"
        op = REGISTRY.get(name)
        if op is not None and op.surface:       # the op's calls would reach the layer
            raise ValueError(f"layer {name!r} has the name of the op {type(op).__module__}."
                             f"{type(op).__qualname__}, which .snet calls: choose another name")
        SURFACE[name] = fn
        LAYER_NAMES[name] = f"{fn.__module__}.{fn.__qualname__}"
        return fn
    return deco


@dataclass
class Word:
    """A bare word used as an option value (`init=he`, `bias=false`)."""
    text: str
    span: Span


class Context:
    """What a surface function sees: the builder and checked helpers.

    `builder` is the front end's model builder (`build.ModelBuilder`); a
    layer reaches it only through these methods, so layers never import
    the front end."""

    def __init__(self, builder, span: Span, fname: str):
        self.mb = builder
        self.span = span
        self.fname = fname
        self.b = Builder(builder.graph, span)

    def fail(self, message: str):
        raise SnetShapeError(message, self.span)

    def checked(self, fn):
        try:
            return fn()
        except ShapeMismatch as e:
            raise SnetShapeError(f"{self.fname}: {e}", self.span) from None

    def expect_tensor(self, v, what: str) -> Value:
        if isinstance(v, Word):
            raise self.mb.unknown_name(v)
        if not isinstance(v, Value):
            raise SnetTypeError(f"{what} expects a tensor here, got {show(v)}{states_hint(v)}", self.span)
        return v

    def expect_int(self, v, what: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise SnetTypeError(f"{self.fname}: {what} must be a positive integer, got {show(v)}", self.span)
        return v

    def expect_bool(self, v, what: str) -> bool:
        if isinstance(v, bool):
            return v
        raise SnetTypeError(f"{self.fname}: {what} must be true or false, got {show(v)}", self.span)

    def expect_dim(self, v):
        if isinstance(v, Word) and v.text in self.mb.symbols:
            return v.text
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
        raise SnetTypeError(f"{self.fname}: a dimension must be a positive integer or one of the "
                            f"model's symbols ({', '.join(sorted(self.mb.symbols)) or 'none'}), got {show(v)}",
                            self.span)

    def layer_name(self, kind: str, explicit) -> str:
        if explicit is not None:
            if isinstance(explicit, Word):
                explicit = explicit.text
            if not isinstance(explicit, str) or not explicit.isidentifier():
                raise SnetTypeError(f"{self.fname}: name must be an identifier, got {show(explicit)}", self.span)
            if self.mb.repeat_path:     # inside `repeat`: one layer per iteration
                explicit = explicit + "".join(f"_{k}" for k in self.mb.repeat_path)
            if explicit in self.mb.layer_names:
                raise SnetNameError(f"a layer named '{explicit}' already exists", self.span)
            self.mb.layer_names.add(explicit)
            return explicit
        k = self.mb.layer_counts.get(kind, 1)      # where the last search for this kind stopped: linear
        while f"{kind}{k}" in self.mb.layer_names:
            k += 1
        name = f"{kind}{k}"
        self.mb.layer_counts[kind] = k + 1
        self.mb.layer_names.add(name)
        return name

    def param(self, name: str, type: TensorType, init) -> Value:
        return self.b.value(self.mb.add_param(name, type, init, self.span))

    def buffer(self, name: str, type: TensorType, init) -> Value:
        """A parameter no gradient or update touches, written by an effect of the
        training entry (running statistics); saved and loaded with the others."""
        return self.b.value(self.mb.add_param(name, type, init, self.span, buffer=True))

    def predicts(self, value: Value, name: str) -> None:
        """Record the prediction a loss implies (the default forward output)."""
        self.mb.implied_outputs.setdefault(name, value.id)


def states_hint(v) -> str:
    """For a tuple of tensors where one tensor is wanted (a cell's `(h, c)` indexed or
    passed on whole): how its values are named, or where such a tuple goes."""
    if not (isinstance(v, tuple) and len(v) > 1 and all(isinstance(x, Value) for x in v)):
        return ""
    return ("; a tuple of tensors, such as lstm_cell's (h, c), is unpacked into names, "
            "`(h, c) = lstm_cell(x, h0, c0, H)`, or is the states of a recursion's case: "
            "`rec (h, c)(t) = init: ... next: lstm_cell(t.x, h(t.prev), c(t.prev), H)`")


def show(v) -> str:
    if isinstance(v, Word):
        return v.text
    if isinstance(v, tuple):
        return "(" + ", ".join(show(x) for x in v) + (",)" if len(v) == 1 else ")")
    if isinstance(v, Value):
        return f"a tensor {v.type}"
    if isinstance(v, (int, float, str, bool)) or type(v).__repr__ is not object.__repr__:
        return repr(v)
    return f"a {type(v).__name__}"      # no address in a message
