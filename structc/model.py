"""The Python face of a compiled model: `Net`.

It owns the parameter, gradient and optimiser-state arenas (numpy arrays
whose memory the native code reads and writes), checks every input before
native code runs, and calls the entry points through ctypes, which releases
the GIL for the duration of the call.
"""
from __future__ import annotations

import ctypes
import threading
from typing import Mapping

import numpy as np

from . import _runtime
from .forest import ForestBinder
from .graphs import Binder as GraphBinder
from .init import initialize
from .ops.optim import (ADAM_STEP_SIZE, ADAM_V_SCALE, BETA1, BETA2, EPS, LR, MODES, MOMENTUM,
                        N_HYPER, WEIGHT_DECAY)

_NP = {"f32": np.float32, "f64": np.float64, "i32": np.int32, "i64": np.int64}
_WORKSPACE = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p)


def _aligned_zeros(n: int, dtype=np.float32, align: int = 64) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    raw = np.zeros(n * itemsize + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + n * itemsize].view(dtype)


class _Input:
    __slots__ = ("name", "kind", "dtype", "shape", "classes")

    def __init__(self, spec: dict):
        self.name = spec["name"]
        self.kind = spec["kind"]
        self.dtype = _NP[spec["dtype"]]
        self.shape = tuple(spec["shape"])
        self.classes = spec["classes"]

    def describe(self) -> str:
        what = f"class labels in [0, {self.classes})" if self.classes else np.dtype(self.dtype).name
        return f"[{', '.join(map(str, self.shape))}] of {what}"


class _Entry:
    def __init__(self, net: "Net", meta: dict, address, workspace_address):
        self.name = meta["symbol"]
        self.inputs = [net._inputs[n] for n in meta["inputs"]]
        self.outputs = [(o["name"], tuple(o["shape"]), _NP[o["dtype"]]) for o in meta["outputs"]]
        self.address = address
        self.workspace_fn = _WORKSPACE(workspace_address)
        self.workspace_sizes: dict[tuple, int] = {}


class Net:
    """A compiled model. Build one with `structc.compile` or `structc.load`."""

    def __init__(self, meta: dict, module, seed: int = 0):
        self.meta = meta
        self.name = meta["model"]
        self._module = module            # keeps the machine code alive
        self._symbols = list(meta["symbols"])
        self._inputs = {s["name"]: _Input(s) for s in meta["inputs"]}
        size = max(1, meta["param_size"])
        self._param_arena = _aligned_zeros(size)
        self._grad_arena = _aligned_zeros(size)
        self._state_arena = _aligned_zeros(2 * size)
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        for p in meta["params"]:
            n = int(np.prod(p["shape"], dtype=np.int64))
            shape = tuple(p["shape"])
            self.params[p["name"]] = self._param_arena[p["offset"]:p["offset"] + n].reshape(shape)
            self.grads[p["name"]] = self._grad_arena[p["offset"]:p["offset"] + n].reshape(shape)
        self.init_params(seed)
        self._entries = {kind: _Entry(self, e, module.address(e["symbol"]), module.address(e["workspace"]))
                         for kind, e in meta["entries"].items()}
        self._arena_addrs = tuple(a.ctypes.data for a in (self._param_arena, self._grad_arena, self._state_arena))
        self._hyper = _aligned_zeros(N_HYPER)
        self._hyper_addr = self._hyper.ctypes.data
        self._local = threading.local()
        # Structured inputs (forests, graphs) become arrays and dims before the checks.
        self._binders = [b for b in (ForestBinder.from_meta(meta), GraphBinder.from_meta(meta)) if b is not None]
        self.optimizer = "sgd"
        self._opt = {"momentum": 0.9, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
        self._step = 0

    # -- parameters --------------------------------------------------------
    def init_params(self, seed: int = 0) -> None:
        """(Re)initialise every parameter with its declared initialiser."""
        rng = np.random.default_rng(seed)
        for p in self.meta["params"]:
            self.params[p["name"]][...] = initialize((p["init"][0], tuple(p["init"][1])), tuple(p["shape"]), rng)
        self._state_arena[:] = 0
        self._step = 0

    def save_params(self, path) -> None:
        np.savez(path, **{name: np.array(v) for name, v in self.params.items()})

    def load_params(self, path) -> None:
        with np.load(path) as data:
            missing = [n for n in self.params if n not in data.files]
            extra = [n for n in data.files if n not in self.params]
            if missing or extra:
                raise ValueError(f"{path}: parameters do not match model {self.name}: "
                                 f"missing {missing or 'none'}, unexpected {extra or 'none'}")
            for name, arr in self.params.items():
                if data[name].shape != arr.shape:
                    raise ValueError(f"{path}: parameter {name} has shape {data[name].shape}, "
                                     f"the model expects {arr.shape}")
            for name, arr in self.params.items():
                arr[...] = data[name]

    # -- calling -------------------------------------------------------------
    def _bind(self, entry: _Entry, given: Mapping[str, object]) -> tuple[list, dict]:
        """Check inputs; return the arrays (converted where lossless) and the dims."""
        dims: dict[str, int] = {}
        for binder in self._binders:            # a forest or a graph becomes its arrays and sizes
            given = binder.expand(given, dims)
        if len(given) != len(entry.inputs) or any(name not in self._inputs for name in given):
            for name in given:
                if name not in self._inputs:
                    known = ", ".join(self._inputs) or "none"
                    raise TypeError(f"{self.name} has no input '{name}' (inputs: {known})")
        arrays = []
        for spec in entry.inputs:
            value = given.get(spec.name)
            if value is None:
                raise TypeError(f"missing input '{spec.name}': expected {spec.describe()}")
            arr = value
            if type(arr) is not np.ndarray or arr.dtype != spec.dtype or not arr.flags.c_contiguous:
                arr = _as_array(spec, value)
            shape = arr.shape
            if len(shape) != len(spec.shape):
                raise ValueError(f"input '{spec.name}': expected shape {spec.describe()}, "
                                 f"got an array of shape {shape}")
            for k, d in enumerate(spec.shape):
                n = shape[k]
                if d.__class__ is int:
                    if d != n:
                        raise ValueError(f"input '{spec.name}': expected shape {spec.describe()}, "
                                         f"got {shape} (axis {k} should be {d})")
                elif d in dims:
                    if dims[d] != n:
                        raise ValueError(f"input '{spec.name}': axis {k} is {d} = {dims[d]} from the "
                                         f"other inputs, got {n} (shape {shape})")
                elif n < 1:
                    raise ValueError(f"input '{spec.name}': {d} must be at least 1, got shape {shape}")
                else:
                    dims[d] = n
            if spec.classes:
                bad = _runtime.first_out_of_range(arr, 0, spec.classes)
                if bad >= 0:
                    where = tuple(int(i) for i in np.unravel_index(bad, shape))
                    raise ValueError(f"input '{spec.name}': class {arr.reshape(-1)[bad]} at position "
                                     f"{where} is out of range [0, {spec.classes})")
            arrays.append(arr)
        return arrays, dims

    def _workspace(self, entry: _Entry, dims: tuple) -> int:
        need = entry.workspace_sizes.get(dims)
        if need is None:
            arr = (ctypes.c_int64 * max(1, len(dims)))(*dims)
            need = entry.workspace_sizes[dims] = entry.workspace_fn(ctypes.addressof(arr))
        local = self._local
        ws = getattr(local, "workspace", None)
        if ws is None or ws.size < need:
            ws = local.workspace = _aligned_zeros(max(need, 64), np.uint8)
            local.address = ws.ctypes.data
        return local.address

    def _run(self, kind: str, given: Mapping[str, object], mode: int) -> dict[str, np.ndarray]:
        entry = self._entries.get(kind)
        if entry is None:
            raise TypeError(f"model {self.name} declares no loss, so it cannot be trained")
        arrays, dims = self._bind(entry, given)
        dvals = tuple([dims.get(s, 1) for s in self._symbols])
        outs = {}
        for name, shape, dtype in entry.outputs:
            outs[name] = np.empty(tuple([d if d.__class__ is int else dims[d] for d in shape]), dtype)
        ws = self._workspace(entry, dvals)
        pa, ga, sa = self._arena_addrs
        status = _runtime.invoke(entry.address, pa, ga, sa, ws, arrays, list(outs.values()), dvals,
                                 self._hyper_addr, mode)
        if status != 0:
            raise RuntimeError(f"{self.name}: native code reported error {status}")
        for binder in self._binders:
            restore = getattr(binder, "restore", None)  # per-edge rows back in the given edge order
            if restore is not None:
                outs = restore(outs)
        return outs

    def forward(self, **inputs) -> dict[str, np.ndarray]:
        """All declared outputs, by name."""
        return self._run("forward", inputs, 0)

    def __call__(self, **inputs):
        """The forward pass: the output array (a dict when there are several)."""
        outs = self.forward(**inputs)
        return next(iter(outs.values())) if len(outs) == 1 else outs

    def grad(self, **inputs) -> tuple[float, dict[str, np.ndarray]]:
        """The loss and a copy of every parameter's gradient, in one native call."""
        outs = self._run("train", inputs, MODES["none"])
        return float(outs["loss"]), {name: g.copy() for name, g in self.grads.items()}

    def set_optimizer(self, name: str = "sgd", **options) -> None:
        """Choose sgd, momentum or adam; options: momentum, beta1, beta2, eps, weight_decay."""
        if name not in ("sgd", "momentum", "adam"):
            raise ValueError(f"unknown optimizer '{name}' (choose sgd, momentum or adam)")
        for k in options:
            if k not in self._opt:
                raise TypeError(f"unknown optimizer option '{k}' (options: {', '.join(self._opt)})")
        if name != self.optimizer:
            self._state_arena[:] = 0
            self._step = 0
        self.optimizer = name
        self._opt.update({k: float(v) for k, v in options.items()})

    def train_step(self, lr: float = 0.01, **inputs) -> float:
        """Forward, backward and parameter update in one native call; returns the loss."""
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not np.isfinite(lr) or lr < 0:
            raise ValueError(f"lr must be a finite non-negative number, got {lr!r}")
        self._step += 1
        h, o = self._hyper, self._opt
        h[LR], h[MOMENTUM], h[BETA1], h[BETA2] = lr, o["momentum"], o["beta1"], o["beta2"]
        h[EPS], h[WEIGHT_DECAY] = o["eps"], o["weight_decay"]
        h[ADAM_STEP_SIZE] = lr / (1 - o["beta1"] ** self._step)
        h[ADAM_V_SCALE] = 1 / np.sqrt(1 - o["beta2"] ** self._step)
        outs = self._run("train", inputs, MODES[self.optimizer])
        return float(outs["loss"])

    @property
    def input_names(self) -> list[str]:
        graphs = [g["name"] for g in self.meta.get("graphs", [])]
        return graphs + [name for name, s in self._inputs.items() if s.kind != "graph"]

    def __repr__(self) -> str:
        n = sum(p.size for p in self.params.values())
        graphs = [f"{g['name']}: graph(" + ", ".join(f"{k}={g[k]}" for k in ("features", "edge_features", "edge_types")
                                                   if g[k]) + ")" for g in self.meta.get("graphs", [])]
        ins = ", ".join(graphs + [f"{s.name}: {s.describe()}" for s in self._inputs.values() if s.kind != "graph"])
        return f"<structc.Net {self.name}({ins}); {n} parameters>"


def _as_array(spec: _Input, value) -> np.ndarray:
    """The input as a C-contiguous array of the declared dtype, converting
    only within a kind (float64 -> float32, int64 -> int32)."""
    arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    kind = arr.dtype.kind
    if spec.classes or np.dtype(spec.dtype).kind == "i":
        if kind not in "iu":
            raise TypeError(f"input '{spec.name}': expected integer {spec.describe()}, got dtype {arr.dtype}")
        if arr.dtype != spec.dtype:
            info = np.iinfo(spec.dtype)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise ValueError(f"input '{spec.name}': values do not fit {np.dtype(spec.dtype).name}")
            arr = arr.astype(spec.dtype)
    else:
        if kind not in "fiu":
            raise TypeError(f"input '{spec.name}': expected a float array {spec.describe()}, "
                            f"got dtype {arr.dtype}")
        if arr.dtype != spec.dtype:
            arr = arr.astype(spec.dtype)
    if not arr.flags.c_contiguous or not arr.flags.aligned:
        arr = np.ascontiguousarray(arr)
    return arr
