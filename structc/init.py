"""Parameter initialisers: name and arguments -> a float32 array.

    glorot   U(±√(6 / (fan_in + fan_out)))      he       N(0, 2 / fan_in)
    normal(s) N(0, s²), s = 0.01 by default     uniform(a) U(±a), a = 0.05
    zeros, ones, constant(c)
"""
from __future__ import annotations

import numpy as np

# name -> (number of arguments allowed, defaults)
INITIALIZERS = {
    "glorot": (), "he": (), "zeros": (), "ones": (),
    "normal": (0.01,), "uniform": (0.05,), "constant": (0.0,),
}


def parse_init(name: str, args: tuple = ()) -> tuple:
    if name not in INITIALIZERS:
        raise ValueError(f"unknown initialiser '{name}'")
    defaults = INITIALIZERS[name]
    if len(args) > len(defaults):
        raise ValueError(f"initialiser {name} takes at most {len(defaults)} argument(s), got {len(args)}")
    args = tuple(float(a) for a in args) + defaults[len(args):]
    if name in ("normal", "uniform") and not args[0] >= 0:
        raise ValueError(f"{name}'s scale must not be negative, got {args[0]:g}")
    return (name, args)


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out): [in, out] for matrices, [out, in, *kernel] beyond."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = int(np.prod(shape[2:]))
    return shape[1] * receptive, shape[0] * receptive


def initialize(init: tuple, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    name, args = init
    fan_in, fan_out = fans(shape)
    if name == "glorot":
        a = np.sqrt(6.0 / (fan_in + fan_out))
        x = rng.uniform(-a, a, shape)
    elif name == "he":
        x = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif name == "normal":
        x = rng.normal(0.0, args[0], shape)
    elif name == "uniform":
        x = rng.uniform(-args[0], args[0], shape)
    elif name == "zeros":
        x = np.zeros(shape)
    elif name == "ones":
        x = np.ones(shape)
    else:  # constant
        x = np.full(shape, args[0])
    return x.astype(np.float32)
