"""Where values come from: the model's inputs and its parameters."""
from __future__ import annotations

from ..types import TensorType
from .base import Op


class Input(Op):
    """A tensor passed in at call time (`input` or `target`)."""
    name = "input"
    traits = frozenset({"source"})

    def shape(self, *, name: str, kind: str = "input", type: TensorType, classes: int = 0) -> TensorType:
        return type

    def describe(self, attrs: dict) -> str:
        extra = f", classes={attrs['classes']}" if attrs.get("classes") else ""
        return f"{attrs['name']}, {attrs['kind']}{extra}"


class Param(Op):
    """A trained parameter, stored in the parameter arena."""
    name = "param"
    traits = frozenset({"source"})

    def shape(self, *, name: str, type: TensorType, init: tuple = ("glorot", ())) -> TensorType:
        return type

    def describe(self, attrs: dict) -> str:
        name, args = attrs["init"]
        init = f"{name}({', '.join(f'{a:g}' for a in args)})" if args else name
        return f"{attrs['name']}, init={init}"
