"""Tensor types with symbolic dimensions.

A dimension is an `int` or the name of a symbol (`"N"`) bound when the
compiled model is called. Sizes of buffers are `Size` monomials over those
symbols so the memory plan can be evaluated for any binding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Union

from .errors import ShapeMismatch

Dim = Union[int, str]

#: the most elements a tensor may have from its static dims alone (2**40 floats
#: are 4 TiB); far below what the int64 sizes and offsets of the ABI hold, so
#: a product with a few symbols bound at call time is checked there, not wrapped
MAX_ELEMENTS = 2 ** 40
#: the most parameters a model may have in all (an 8 GiB arena, allocated up front)
MAX_PARAMS = 2 ** 31

DTYPES = {"f32": "float32", "f64": "float64", "i32": "int32", "i64": "int64"}


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str = "f32"

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith("f")

    def size(self) -> "Size":
        return Size.of(self.shape)

    def static_elements(self) -> int:
        """The product of the static dims (what a symbol multiplies)."""
        return math.prod(d for d in self.shape if isinstance(d, int))

    def concrete(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(bind_dim(d, dims) for d in self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"


def bind_dim(d: Dim, dims: Mapping[str, int]) -> int:
    return d if isinstance(d, int) else dims[d]


def scalar(dtype: str = "f32") -> TensorType:
    return TensorType((), dtype)


def broadcast_shapes(*shapes: tuple[Dim, ...]) -> tuple[Dim, ...]:
    """numpy broadcasting over symbolic dims: equal symbols match, 1 stretches."""
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for axis in range(rank):
        dim: Dim = 1
        for s in shapes:
            k = axis - (rank - len(s))
            if k < 0:
                continue
            d = s[k]
            if d == 1:
                continue
            if dim == 1:
                dim = d
            elif d != dim:
                raise ShapeMismatch(
                    "cannot broadcast shapes "
                    + " and ".join("[" + ", ".join(map(str, s)) + "]" for s in shapes))
        out.append(dim)
    return tuple(out)


def broadcast_strides(shape: tuple[Dim, ...], out_shape: tuple[Dim, ...]) -> tuple[bool, ...]:
    """Per axis of `out_shape`: does an operand of `shape` vary along it?"""
    lead = len(out_shape) - len(shape)
    return tuple(
        k >= lead and not (shape[k - lead] == 1 and out_shape[k] != 1)
        for k in range(len(out_shape)))


@dataclass(frozen=True)
class Size:
    """coef * prod(symbols): the element count of a tensor with symbolic dims."""
    coef: int
    symbols: tuple[str, ...] = ()

    @staticmethod
    def of(shape: tuple[Dim, ...]) -> "Size":
        coef = math.prod(d for d in shape if isinstance(d, int))
        return Size(coef, tuple(sorted(d for d in shape if isinstance(d, str))))

    def eval(self, dims: Mapping[str, int]) -> int:
        return self.coef * math.prod(dims[s] for s in self.symbols)

    def __str__(self) -> str:
        return "*".join([str(self.coef), *self.symbols]) if self.symbols else str(self.coef)
