"""The Python face of a compiled model: `Net`.

It owns the parameter, gradient and optimiser-state arenas (numpy arrays
whose memory the native code reads and writes), checks every input before
native code runs, and calls the entry points through `_runtime.invoke`
(runtime/pymodule.c), which releases the GIL for the duration of the call.

Calls on one `Net` are serialised by a lock (the arenas and the
hyper-parameters are shared state); inputs are checked before it is taken,
so threads overlap their checking, and calls on different `Net`s run in
parallel. A forward call on ndarrays as declared is checked and run in C
(`_call_plan`); any other call takes the Python path (`_run`).
"""
from __future__ import annotations

import ctypes
import difflib
import functools
import itertools
import json
import math
import operator
import os
import struct
import sys
import threading
import warnings
import weakref
from collections.abc import Mapping
from numbers import Real
from pathlib import Path

import numpy as np

from . import _runtime, native
from .forest import ForestBinder
from .seqdata import SequenceBinder
from .graphs import Binder as GraphBinder
from .files import read_archive, write_atomically
from .init import initialize
from .ops.optim import (ADAM_STEP_SIZE, ADAM_V_SCALE, BETA1, BETA2, CLIP_NORM, DROPOUT_KEY0, DROPOUT_STEP, EPS,
                        LOSS_WEIGHT0, LR, MAX_LOSS_TERMS, TERM_OUTPUT,
                        MODES, MOMENTUM, N_FLOAT_HYPER, N_HYPER, VECTOR_DECAY, WEIGHT_DECAY)
from .passes.plan import check_workspace, physical_memory

_NP = {"f32": np.float32, "f64": np.float64, "i32": np.int32, "i64": np.int64}
_WORKSPACE = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p)
_FLOAT_HYPER = struct.Struct(f"={N_FLOAT_HYPER}f")     # the float hyper-parameters, stored in one call
#: what a step's float hyper-parameters start from: 1, but 0 in the loss terms' slots (1 - weight)
_HYPER_DEFAULTS = [0.0 if LOSS_WEIGHT0 <= k < LOSS_WEIGHT0 + MAX_LOSS_TERMS else 1.0 for k in range(N_FLOAT_HYPER)]


def _aligned_zeros(n: int, dtype=np.float32, align: int = 64) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    raw = np.zeros(n * itemsize + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + n * itemsize].view(dtype)


def _suggest(name, known, what: str) -> str:
    """`no <what> 'nme'` with the closest known names, for a KeyError or TypeError."""
    close = difflib.get_close_matches(str(name), list(known), n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"no {what} {name!r}{hint} ({what}s: {', '.join(known) or 'none'})"


def _checked_param(name: str, value, shape: tuple, where: str = "", what: str = "parameter") -> np.ndarray:
    """`value` as float32 of `shape`, or a clear error: complex and non-numeric
    values are refused, and so are values that are not finite in float32
    (NaN, infinity, or a float64 beyond float32's range). `what` names the
    array in the errors (the optimizer's state is checked so too)."""
    arr = np.asarray(value)
    if arr.dtype.kind == "c":
        raise TypeError(f"{where}{what} '{name}' is complex ({arr.dtype}); {what}s are real float32")
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{where}{what} '{name}' must be numbers, got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{where}{what} '{name}' has shape {arr.shape}, the model expects {shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        arr = arr.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        at = tuple(int(i) for i in np.unravel_index(bad[0], shape)) if shape else ()
        raise ValueError(f"{where}{what} '{name}' has {bad.size} value(s) that are not finite in float32 "
                         f"(the first at {at}: {np.asarray(value).reshape(-1)[bad[0]].item()!r})")
    return arr


class Params(Mapping):
    """`net.params`: numpy views of the native parameter arena, by name.

    Writing into a view (`net.params["w"][...] = v`) changes the running
    model; so does `net.params["w"] = v`, which copies `v` into the arena
    after checking its shape and values. The set of names is the model's:
    a parameter cannot be added or deleted."""

    def __init__(self, net: "Net", views: dict[str, np.ndarray]):
        self._net, self._views = net, views

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self._views[name]
        except (KeyError, TypeError):
            raise KeyError(_suggest(name, self._views, "parameter")) from None

    def __iter__(self):
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)

    def __setitem__(self, name: str, value) -> None:
        view = self[name]
        arr = _checked_param(name, value, view.shape)
        with self._net._lock:
            view[...] = arr

    def __delitem__(self, name: str) -> None:
        raise TypeError(f"cannot delete parameter {name!r}: a model's parameters are fixed by its source")

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k!r}: <f32{list(v.shape)}>" for k, v in self._views.items()) + "}"


class _Input:
    __slots__ = ("name", "kind", "dtype", "shape", "classes", "np_dtype", "ndim", "axes")

    def __init__(self, spec: dict):
        self.name = spec["name"]
        self.kind = spec["kind"]
        self.dtype = _NP[spec["dtype"]]
        self.shape = tuple(spec["shape"])
        self.classes = spec["classes"]
        # what `_bind` checks on every call, worked out once: the dtype (numpy's builtin
        # dtypes are singletons, so `is` settles the usual case), each axis and whether it is a size
        self.np_dtype = np.dtype(self.dtype)
        self.ndim = len(self.shape)
        self.axes = tuple((k, d, d.__class__ is int) for k, d in enumerate(self.shape))

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
        self.workspace_address = ctypes.cast(self.workspace_fn, ctypes.c_void_p).value   # `_runtime.workspace_size`
        self.output_shapes = [(name, shape, dtype, all(d.__class__ is int for d in shape))
                              for name, shape, dtype in self.outputs]
        # The leading inputs a binder makes from a Graph (`sealed`: nothing can change them)
        # and the last call's values of them, which `_bind` checked: (values, arrays, dims)
        sealed = net._sealed_inputs
        self.sealed = next((k for k, s in enumerate(self.inputs) if s.name not in sealed), len(self.inputs))
        self.sealed_names = tuple(s.name for s in self.inputs[:self.sealed])
        self.unsealed = tuple(self.inputs[self.sealed:])
        self.checked: tuple | None = None


class _NoPlan:
    """Stands in for a `_runtime.CallPlan` where every call takes the Python path."""
    calls = 0

    @staticmethod
    def run(inputs):
        return None

    call = run

    @staticmethod
    def train(inputs, bound, before):
        return None

    @staticmethod
    def set_workspace(owner, address: int, size: int) -> None:
        pass


_NO_PLAN = _NoPlan()
_PLAN_MAX_SYMBOLS = 64      # PLAN_MAX_SYMBOLS in runtime/pymodule.c


class BatchTooSmall(ValueError):
    """A training call batch normalisation cannot train on (one value per channel);
    raised before anything changes, so a training loop may skip the batch."""


def _check_batch_counts(counts: list, dims: Mapping[str, int]) -> None:
    """Batch normalisation's unbiased running variance divides by n - 1: refuse
    a training call with one value per channel (PyTorch refuses it too)."""
    for item in counts:
        n = 1
        for d in item["count"]:
            n *= d if isinstance(d, int) else dims[d]
        if n < 2:
            raise BatchTooSmall(f"{item['buffer']}: batch normalisation in training needs more than one value per "
                             f"channel, got {n} (a batch of one); train on larger batches")


#: parts compiled only for the entry they hold (the others are compiled together, on a first need)
_ON_DEMAND = {"update": "update", "evaluation": "eval_loss"}


def _part_wanted(part: str, kind: str) -> bool:
    """Whether a call needing entry `kind` compiles deferred `part` now."""
    if part in _ON_DEMAND:
        return _ON_DEMAND[part] == kind
    return kind not in _ON_DEMAND.values()


#: float32 holds every integer up to 2**24 exactly, and not every one beyond
_F32_EXACT = 2 ** 24


def _check_exact_in_float32(names: frozenset, entry: _Entry, arrays: list) -> None:
    """Refuse integers float32 arithmetic would round: a word id over 16.7 M added to
    something would silently become another number."""
    for spec, arr in zip(entry.inputs, arrays):
        if spec.name in names and arr.size:
            low, high = int(arr.min()), int(arr.max())
            if max(-low, high) > _F32_EXACT:
                bad = high if high > _F32_EXACT else low
                raise ValueError(f"input '{spec.name}': {bad} is beyond 2**24 = {_F32_EXACT}; the model computes "
                                 "on this integer input in float32, which would round it (use values of at most "
                                 "2**24 in magnitude, or only index with them)")


def _check_indices(bounds: Mapping[str, list], parts: Mapping[str, list], entry: _Entry, arrays: list,
                   dims: Mapping[str, int]) -> None:
    """Refuse row ids outside the rows they pick from (`compiler.index_inputs`): the
    kernels clamp them, so `E[k]` of a k past E's rows would silently be another row.
    `parts`: ids read from a block of an input (`compiler.row_id_uses`), checked there."""
    for spec, arr in zip(entry.inputs, arrays):
        rows = bounds.get(spec.name)
        if rows is not None:
            _check_block(spec.name, arr, (), min(r if r.__class__ is int else dims.get(r, 1) for r in rows))
    _check_blocks(parts, dict(zip([s.name for s in entry.inputs], arrays)), dims)


def _check_blocks(parts: Mapping[str, list], given: Mapping[str, object], dims: Mapping[str, int] | None) -> None:
    """The ids in blocks of inputs (`compiler.row_id_uses`), each against its rows.
    Also run before a C call plan (`dims` None), which checks an input against one
    limit only: an input it would not take (not an ndarray of integers of the rank
    declared) is left to the Python path, which checks it here once converted, as
    are rows counted at run time (a model with such rows has no plan)."""
    for name, uses in parts.items():
        arr = given.get(name)
        if arr.__class__ is not np.ndarray or arr.dtype.kind != "i" or arr.ndim != len(uses[0][2]):
            continue
        for rows, where, corner in uses:
            if dims is None and rows.__class__ is not int:
                continue
            _check_block(name, np.ascontiguousarray(arr[where]), corner,
                         rows if rows.__class__ is int else dims.get(rows, 1))


def _blocks(parts: Mapping[str, list]) -> dict[str, list]:
    """The metadata's `index_inputs_in_part` as (rows, the block's index, its first corner)."""
    return {name: [(rows, tuple(slice(None) if b is None else slice(*b) for b in block),
                    tuple(0 if b is None else b[0] for b in block)) for rows, block in uses]
            for name, uses in parts.items()}


def _check_block(name: str, arr: np.ndarray, corner: tuple, n: int) -> None:
    bad = _runtime.first_out_of_range(arr, 0, n)
    if bad >= 0:
        where = tuple(int(i) + (corner[k] if corner else 0) for k, i in enumerate(np.unravel_index(bad, arr.shape)))
        raise ValueError(f"input '{name}': id {arr.reshape(-1)[bad]} at position {where} is outside "
                         f"[0, {n}), the rows it picks from (native code would clamp it to another row)")


#: what every part of a model must agree on: its entries share the arena, the inputs and the dims
_SHARED_META = ("params", "param_size", "frozen", "inputs", "forests", "graphs", "sequences", "symbols")


class _Entries(dict):
    """The entry points by kind. Asking for one that is not there yet (`get`
    or `[]`) first compiles the parts the model deferred."""

    def __init__(self, load_deferred):
        super().__init__()
        self._load_deferred = load_deferred

    def __missing__(self, kind):
        if self._load_deferred(kind) and dict.__contains__(self, kind):
            return dict.__getitem__(self, kind)
        raise KeyError(kind)

    def get(self, kind, default=None):
        try:
            return self[kind]
        except KeyError:
            return default


# -- fork --------------------------------------------------------------------
#: every live Net by its creation number (the order a fork takes their locks in)
_NETS: "weakref.WeakValueDictionary[int, Net]" = weakref.WeakValueDictionary()
_NET_NUMBERS = itertools.count()
_FORK = threading.local()        # the Nets a forking thread holds
#: seconds a fork waits for the compiles in flight on other threads, and then for
#: each Net's call in flight. Bounded: a thread holding a Net's lock may itself be
#: waiting for the forking thread (a feed generator reading what that thread makes),
#: and the fork would then wait for ever
FORK_WAIT = 10.0


def _hold_nets_for_fork() -> None:
    """Before `os.fork()`: wait for the compiles in flight on other threads
    (a training part compiled in the background: `native.hold_for_fork`), then
    for each Net's call in flight, and hold their locks, so that the child gets
    LLVM and every Net between calls. Else it inherits locks held by a thread
    it does not have (its first compile, or its first call on that Net, waits
    forever) and arenas that call was half way through writing. In creation
    order, so that two threads forking at once take them alike. A compile still
    running after FORK_WAIT makes the child refuse to compile; a Net still busy
    is left as it is (the child must not use it)."""
    native.hold_for_fork(FORK_WAIT)
    _FORK.held = []
    for _, net in sorted(_NETS.items()):
        if net._lock.acquire(timeout=FORK_WAIT):
            _FORK.held.append(net)


def _release_nets_after_fork(child: bool) -> None:
    """After `os.fork()`, in the parent and in the child (whose forking thread holds them)."""
    for net in reversed(getattr(_FORK, "held", ())):
        net._lock.release()
    _FORK.held = []
    native.release_after_fork(child)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_hold_nets_for_fork, after_in_parent=functools.partial(_release_nets_after_fork, False),
                        after_in_child=functools.partial(_release_nets_after_fork, True))


class Net:
    """A compiled model. Build one with `structc.compile` or `structc.load`."""

    def __init__(self, meta: dict, module, seed: int = 0, deferred=None):
        """`deferred(part)`: the (metadata, object files) of a part listed in
        `meta["deferred"]` (the training entries of a model compiled for
        inference first), called on the first call that needs one of its
        entries; they are loaded into `module` (they call its kernels)."""
        self.meta = meta = dict(meta, entries=dict(meta["entries"]), deferred=list(meta.get("deferred", ())))
        self.name = meta["model"]
        self._module = module            # keeps the machine code alive
        self._compile_deferred = deferred
        self._deferred_lock = threading.Lock()
        self._symbols = list(meta["symbols"])
        self._inputs = {s["name"]: _Input(s) for s in meta["inputs"]}
        size = max(1, meta["param_size"])
        self._param_arena = _aligned_zeros(size)
        # four floats past the gradients, which data-parallel training sums in the same
        # Allreduce (structc.distributed): the loss denominator and the loss, then a
        # small hash of the step's update settings and its square (the ranks' check)
        self._grad_arena = _aligned_zeros(size + 4)
        self._state_arena = _aligned_zeros(2 * size)
        self._lock = threading.RLock()   # one native call (or parameter write) at a time
        _NETS[next(_NET_NUMBERS)] = self
        views: dict[str, np.ndarray] = {}
        self._grad_views: dict[str, np.ndarray] = {}
        for p in meta["params"]:
            n = int(np.prod(p["shape"], dtype=np.int64))
            shape = tuple(p["shape"])
            views[p["name"]] = self._param_arena[p["offset"]:p["offset"] + n].reshape(shape)
            self._grad_views[p["name"]] = self._grad_arena[p["offset"]:p["offset"] + n].reshape(shape)
        # Until the gradient arena is handed out, only this net's training entry writes
        # it: an embedding's gradient is then zeroed where the last step wrote, not whole
        # (`ops/embedding.py`, `sc_rows_record`). `_expose_grads` ends that.
        _runtime.rows_arena(self._grad_arena.ctypes.data, self._grad_arena.nbytes)
        self._rows_kept = weakref.finalize(self, _runtime.rows_forget, self._grad_arena.ctypes.data)
        self.params = Params(self, views)
        self._hyper = _aligned_zeros(N_HYPER)
        self._hyper_addr = self._hyper.ctypes.data
        self._hyper_bits = self._hyper.view(np.uint32)     # dropout's key and step slots hold bits
        self._random = bool(meta.get("random"))             # only then is the step written (each write costs)
        self.init_params(seed)
        # Structured inputs (forests, graphs) become arrays and dims before the checks.
        self._forests = ForestBinder.from_meta(meta)
        self._binders = [b for b in (self._forests, GraphBinder.from_meta(meta), SequenceBinder.from_meta(meta))
                         if b is not None]
        self._sealed_inputs = frozenset().union(*(getattr(b, "sealed", ()) for b in self._binders))
        self._entries = _Entries(self._load_deferred)
        self._add_entries(meta["entries"], module)
        self._arena_addrs = tuple(a.ctypes.data for a in (self._param_arena, self._grad_arena, self._state_arena))
        self._workspace_buf, self._workspace_addr = None, 0   # grown under the lock, shared by calls
        self._update_call: tuple | None = None               # apply_update's, made on its first call
        self._restorers = tuple(b.restore for b in self._binders if hasattr(b, "restore"))
        self._batch_counts = meta.get("batch_counts", [])   # batch norm: values per channel in training
        self._float_ints = frozenset(meta.get("float_arithmetic_inputs", ()))   # integers computed on in f32
        self._index_ids = meta.get("index_inputs", {})     # integers used as row ids: checked against the rows
        self._index_parts = _blocks(meta.get("index_inputs_in_part", {}))     # ... a block of them (chunk(k, 1, 2))
        self._forward_plan = self._call_plan("forward", 0)      # `net(x=x)` on ndarrays: checked in C
        self._train_plan = None         # `train_step`'s, made on its first call (the entry may be deferred)
        #: raise FloatingPointError from `train_step` when the loss is not finite (off: the loss is returned)
        self.check_finite = False
        self.optimizer = "sgd"
        self._opt = {k: _option_value(k, v) for k, v in _OPTION_DEFAULTS.items()}
        self._step = 0
        self.schedule: dict | None = None    # see set_schedule
        #: the learning rate of the last update (the schedule applied)
        self.last_lr: float | None = None

    # -- deferred entries ----------------------------------------------------
    def _add_entries(self, entries: dict, module) -> None:
        for kind, e in entries.items():
            dict.__setitem__(self._entries, kind, _Entry(self, e, module.address(e["symbol"]),
                                                         module.address(e["workspace"])))

    def _load_deferred(self, kind: str) -> bool:
        """Compile (or load from the cache) the deferred parts, the first time
        an entry they hold is asked for; whether there were any."""
        if self._compile_deferred is None:
            return False
        if not self.meta["deferred"]:       # nothing left to compile (`loss` asks on every call of an old library)
            return kind in self._entries
        with native.compiling(), self._deferred_lock:      # a fork waits for the part, lock and all
            if kind in self._entries or not self.meta["deferred"]:
                return kind in self._entries
            for part in [p for p in self.meta["deferred"] if _part_wanted(p, kind)]:
                meta, objects = self._compile_deferred(part)
                differ = [k for k in _SHARED_META if meta.get(k) != self.meta.get(k)]
                if differ:      # its entries would read the arena and the inputs laid out otherwise
                    raise RuntimeError(f"model {self.name}: the {part} part compiled now does not match the parts "
                                       f"loaded before ({', '.join(differ)} differ); compile the model again")
                self._module.add(objects)
                self._add_entries(meta["entries"], self._module)
                self.meta["entries"].update(meta["entries"])
                if "row_tables" in meta:
                    self.meta["row_tables"] = meta["row_tables"]
                self.meta["deferred"].remove(part)
                self.meta["parts"] = self.meta.get("parts", []) + [part]
            return True

    def _missing_entry(self) -> str:
        if self.meta["deferred"]:
            return (f"model {self.name} was compiled for inference only (its training entries are not in "
                    "this library): compile it without --inference to train it")
        return f"model {self.name} declares no loss, so it cannot be trained"

    # -- parameters --------------------------------------------------------
    def init_params(self, seed: int = 0) -> None:
        """(Re)initialise every parameter with its declared initialiser, restart
        the step counter, and seed dropout with the same seed (`set_seed`): the
        same seed gives the same training run."""
        rng = np.random.default_rng(seed)
        with self._lock:
            for p in self.meta["params"]:
                self.params[p["name"]][...] = initialize((p["init"][0], tuple(p["init"][1])), tuple(p["shape"]), rng)
            self._state_arena[:] = 0
            self._step = 0
            self._draws = 0      # training calls so far: dropout's step counter
            self.set_seed(seed)

    def set_seed(self, seed) -> None:
        """Seed dropout's generator (Philox-4x32-10, keyed by 64 bits drawn from
        `np.random.SeedSequence(seed)`), leaving the parameters alone. The mask of
        a training call is a function of this key, the call's number (every
        `train_step`, `grad` and `grad_into_arena` draws the next one; `loss`
        draws none) and each element's position, so it does not depend on the
        thread count, and a resumed run (which restores the count with the
        optimizer's state) continues the sequence. `init_params` restarts the
        count; it is taken mod 2^32."""
        key = _dropout_key(seed)
        with self._lock:
            self._hyper_bits[DROPOUT_KEY0:DROPOUT_KEY0 + 2] = key
            self.seed = seed

    def save_params(self, path):
        """Write every parameter to an `.npz` archive; returns the path written
        (numpy adds `.npz` to a name without it)."""
        with self._lock:
            arrays = {name: np.array(v) for name, v in self.params.items()}
        return _save_archive(path, arrays)

    #: how the data these parameters were trained on was numbered (`load_params`)
    numbering: dict | None = None
    _numbered_vocab = None          # the vocabulary `load_params` took from a numbering file

    def load_params(self, path) -> None:
        """Replace every parameter with those saved in `path` (`.npz` may be
        left out). Everything is checked before anything is copied: the names,
        shapes, and values (complex or non-finite values are refused).

        `structc train` saves beside them how it numbered its data
        (`NAME.numbering.json`: a treebank's words, a TU set's labels). When
        that file is there and belongs to these very parameters, its words
        become `net.vocab` and the whole of it `net.numbering`; one written for
        other parameters is ignored with a warning."""
        path = _params_path(path)
        data = _read_params(path)
        from .checkpoint import HEADER
        if HEADER in data:
            raise ValueError(f"{path}: a training checkpoint written by save_checkpoint: load it with "
                             f"load_checkpoint (parameters, optimizer state and counters)")
        checked = self._checked_params(data, f"{path}: ")
        with self._lock:
            for name, view in self.params.items():
                view[...] = checked[name]
        self._take_numbering(path, data)

    def _checked_params(self, data: Mapping[str, object], where: str) -> dict[str, np.ndarray]:
        """Every parameter of this model from `data` (by name), checked as `load_params`
        checks them (the same names, the shapes, finite values), changing nothing."""
        missing = [n for n in self.params if n not in data]
        extra = [n for n in data if n not in self.params]
        if missing or extra:
            raise ValueError(f"{where}parameters do not match model {self.name}: "
                             f"missing {missing or 'none'}, unexpected {extra or 'none'}")
        return {name: _checked_param(name, data[name], view.shape, where) for name, view in self.params.items()}

    def _take_numbering(self, path, params: dict) -> None:
        """The numbering saved beside parameter file `path` (see `load_params`). A
        vocabulary an earlier numbering file set leaves with its parameters: its
        ids would not be these parameters'."""
        from .train import NumberingWarning, load_numbering, numbering_path
        numbering, problem = (load_numbering(path, params) if isinstance(path, (str, os.PathLike))
                              else (None, ""))
        if problem:
            warnings.warn(problem, NumberingWarning, stacklevel=3)
        self._use_numbering(numbering, numbering_path(path).name if numbering else "")

    def _use_numbering(self, numbering: dict | None, source: str) -> None:
        """`numbering` (from `source`, a numbering file or a library) as these parameters':
        its words become `net.vocab`, in place of those an earlier numbering gave."""
        from .forest import Vocab
        from .train import NumberingWarning
        words = (numbering or {}).get("words")
        if self.vocab is not None and self.vocab is self._numbered_vocab:
            self.vocab = None
        if words is not None and self._forests is not None:
            vocab = Vocab.from_numbering(numbering)
            if self.vocab is not None and dict(self.vocab) != vocab:
                warnings.warn(f"net.vocab replaced by the {len(vocab)} words {source} "
                              f"gives these parameters", NumberingWarning, stacklevel=4)
            try:
                self.vocab = vocab
            except (TypeError, ValueError) as e:
                warnings.warn(f"{source}'s words are not used: {e}", NumberingWarning, stacklevel=4)
                vocab = None
            self._numbered_vocab = vocab
        self.numbering = numbering

    # -- vocabulary ----------------------------------------------------------
    @property
    def vocab(self):
        """word -> id for forests given as bracketed strings or tuples of words (None: ids only)."""
        return self._forests.vocab if self._forests is not None else None

    @vocab.setter
    def vocab(self, vocab) -> None:
        if self._forests is None:
            raise TypeError(f"model {self.name} has no forest input, so it takes no vocabulary")
        self._forests.set_vocab(vocab)

    # -- calling -------------------------------------------------------------
    def _bind(self, entry: _Entry, given: Mapping[str, object]) -> tuple[list, dict]:
        """Check inputs; return the arrays (converted where lossless) and the dims."""
        given, dims = self._expanded(given)
        if len(given) != len(entry.inputs) or not given.keys() <= self._inputs.keys():
            for name in given:
                if name not in self._inputs:
                    known = ", ".join(self._passed_names()) or "none"
                    raise TypeError(f"{self.name} has no input '{name}' (inputs: {known})")
        arrays = []
        get, bound = given.get, dims.get
        inputs = entry.inputs
        checked = entry.checked
        if checked is not None and all(map(operator.is_, map(get, entry.sealed_names), checked[0])):
            arrays = list(checked[1])        # the same sealed values as last call: checked then
            dims.update(checked[2])
            inputs = entry.unsealed
        for spec in inputs:
            value = get(spec.name)
            if value is None:
                raise TypeError(f"missing input '{spec.name}': expected {spec.describe()}")
            arr = value
            if (type(arr) is not np.ndarray or (arr.dtype is not spec.np_dtype and arr.dtype != spec.dtype)
                    or not (arr.flags.c_contiguous and arr.flags.aligned)):
                arr = _as_array(spec, value)
            shape = arr.shape
            if len(shape) != spec.ndim:
                raise ValueError(f"input '{spec.name}': expected shape {spec.describe()}, "
                                 f"got an array of shape {shape}")
            for k, d, fixed in spec.axes:
                n = shape[k]
                if fixed:
                    if d != n:
                        raise ValueError(f"input '{spec.name}': expected shape {spec.describe()}, "
                                         f"got {shape} (axis {k} should be {d})")
                    continue
                seen = bound(d)
                if seen is not None:
                    if seen != n:
                        raise ValueError(f"input '{spec.name}': axis {k} is {d} = {seen} from the "
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
        if entry.sealed and inputs is entry.inputs:
            k = entry.sealed
            entry.checked = (tuple(map(get, entry.sealed_names)), tuple(arrays[:k]),
                             {d: dims[d] for s in entry.inputs[:k] for _, d, fixed in s.axes if not fixed})
        return arrays, dims

    def _passed_names(self) -> list[str]:
        """The inputs as a caller names them: each forest, graph or sequence input
        once, not the arrays its binder makes of it (`t.children`, `s.rev.roots`, ...)."""
        made = {"forest", "graph", "sequence"}
        return [spec["name"] for b in self._binders for spec in b.specs] + \
            [name for name, spec in self._inputs.items() if spec.kind not in made]

    def _workspace_size(self, entry: _Entry, dims: tuple) -> int:
        """The workspace `entry` needs for these dims (called in C on every call:
        forests and graphs bind new dims each batch, so a cache would only grow)."""
        need = _runtime.workspace_size(entry.workspace_address, dims)
        if need < 0 or need > _physical_memory():
            check_workspace(need, dict(zip(self._symbols, dims)))     # overflow (-1) or absurd: refuse
        return need

    def _workspace(self, need: int) -> int:
        """The workspace's address, grown to `need` bytes; call holding the lock
        (a call still running in it keeps it until it returns)."""
        ws = self._workspace_buf
        if ws is None or ws.size < need:
            ws = self._workspace_buf = _aligned_zeros(max(need, 64), np.uint8)
            self._workspace_addr = ws.ctypes.data
            self._forward_plan.set_workspace(ws, self._workspace_addr, ws.size)
            if self._train_plan is not None:
                self._train_plan.set_workspace(ws, self._workspace_addr, ws.size)
        return self._workspace_addr

    def _call_plan(self, kind: str, mode: int, expanded: bool = False):
        """The C call plan of entry `kind` (`_runtime.CallPlan`): `_bind`'s checks of
        ndarray inputs, in C, for the calls that need no conversion; the others it
        leaves to `_run`, which raises the usual errors. `_NO_PLAN` for models
        whose inputs always need Python: integers computed on in float32 (the
        2**24 check), and forests, graphs, sequences (binders) unless `expanded`
        (the caller runs the binders first and gives the plan the dims they bound)."""
        entry = dict.get(self._entries, kind)
        if (entry is None or (self._binders and not expanded) or any(s.name in self._float_ints for s in entry.inputs)
                or len(self._symbols) > _PLAN_MAX_SYMBOLS):
            return _NO_PLAN
        symbol = {name: k for k, name in enumerate(self._symbols)}
        bound = {d for s in entry.inputs for d in s.shape if d.__class__ is not int}

        def coded(shape):      # a size, or a symbol as -1 - its index
            return tuple(d if d.__class__ is int else -1 - symbol[d] for d in shape)
        if any(d.__class__ is not int and d not in bound for _, shape, _ in entry.outputs for d in shape):
            return _NO_PLAN     # an output axis no input binds: `_run` says so
        limits = {}         # the plan checks labels and row ids alike: every value in [0, limit)
        for s in entry.inputs:
            rows = self._index_ids.get(s.name, ())
            if any(r.__class__ is not int for r in [*rows, *(r for r, *_ in self._index_parts.get(s.name, ()))]):
                return _NO_PLAN     # ids into rows counted at run time: `_run` checks them
            limits[s.name] = min(list(rows) + ([s.classes] if s.classes else []), default=0)
        # sealed: a binder's array of a Graph, which the plan takes again unchecked when it is the last one
        inputs = [(sys.intern(s.name), memoryview(np.empty(0, s.dtype)).format, np.dtype(s.dtype).itemsize,
                   np.dtype(s.dtype).alignment, coded(s.shape), limits[s.name],
                   expanded and s.name in self._sealed_inputs) for s in entry.inputs]
        outputs = [(sys.intern(name), np.dtype(dtype), np.dtype(dtype).itemsize, coded(shape))
                   for name, shape, dtype in entry.outputs]
        pa, ga, sa = self._arena_addrs
        return _runtime.call_plan(entry.address, entry.workspace_address, pa, ga, sa, self._hyper_addr, mode,
                                  len(self._symbols), inputs, outputs, self.name, np.ndarray, np.empty, self._lock,
                                  tuple(self._symbols), frozenset(self._inputs))

    def _make_train_plan(self):
        """`train_step`'s call plan: `_run`'s work after the binders, in C (its Python
        runs after a native step, with cold caches, on one thread). None of the
        Python path's extra checks may apply: batch norm's batch counts, per-edge
        outputs to put back in the given order, per-node ones in node order."""
        entry = self._entries.get("train")      # compiles a deferred training part
        restored = {n for b in self._binders for outs in (getattr(b, "edge_outputs", ()), getattr(b, "node_outputs", ()))
                    for n in outs}
        plan = _NO_PLAN
        if entry is not None and not self._batch_counts and not restored & {o[0] for o in entry.outputs}:
            plan = self._call_plan("train", 0, expanded=True)
        with self._lock:
            if self._workspace_buf is not None:
                plan.set_workspace(self._workspace_buf, self._workspace_addr, self._workspace_buf.size)
            self._train_plan = plan
        return plan

    def _run(self, kind: str, given: Mapping[str, object], mode, before=None, after=None, dims_out=None,
             check_batch: bool = True):
        """Check the inputs, then (holding the lock) `before()`, the native
        call and `after()`; returns the outputs and what `after` returned.
        Nothing that runs Python comes between `before()` and the call.
        `mode` may be a function, read under the lock too; `dims_out`, a dict,
        receives the bound dims."""
        entry = dict.get(self._entries, kind) or self._entries.get(kind)   # the C lookup first: every call
        if entry is None:
            raise TypeError(self._missing_entry())
        arrays, dims = self._bind(entry, given)
        if kind == "train" and self._batch_counts and check_batch:
            _check_batch_counts(self._batch_counts, dims)
        if self._float_ints:
            _check_exact_in_float32(self._float_ints, entry, arrays)
        if self._index_ids or self._index_parts:
            _check_indices(self._index_ids, self._index_parts, entry, arrays, dims)
        if dims_out is not None:
            dims_out.update(dims)
        dvals = tuple([dims.get(s, 1) for s in self._symbols])
        need = self._workspace_size(entry, dvals)      # first: it refuses sizes that overflow or cannot fit
        outs = {name: np.empty(shape if fixed else tuple([d if d.__class__ is int else dims[d] for d in shape]),
                               dtype)
                for name, shape, dtype, fixed in entry.output_shapes}
        pa, ga, sa = self._arena_addrs
        # `with`, not acquire() then try: an interrupt pending while the call waited
        # for the lock is raised as acquire() returns, before the try, and kept it held
        with self._lock:
            if callable(mode):
                mode = mode()
            workspace, results = self._workspace(need), list(outs.values())
            if before is not None:      # last: it may count the step (`_begin_step`), which runs next
                before()
            status = _runtime.invoke(entry.address, pa, ga, sa, workspace, arrays, results, dvals, self._hyper_addr,
                                     mode)
            extra = after() if after is not None and status == 0 else None
        if status != 0:
            raise RuntimeError(f"{self.name}: native code reported error {status}")
        for restore in self._restorers:             # per-edge rows back in the given edge order, per-node in node order
            outs = restore(outs)
        return outs, extra

    def forward(self, **inputs) -> dict[str, np.ndarray]:
        """All declared outputs, by name."""
        if self._index_parts and self._forward_plan is not _NO_PLAN:    # the plan checks whole inputs only
            _check_blocks(self._index_parts, inputs, None)
        outs = self._forward_plan.run(inputs)      # ndarrays as declared: checked and run in C
        if outs is None:
            outs = self._run("forward", inputs, 0)[0]
        return outs

    def __call__(self, **inputs):
        """The forward pass: the output array (a dict when there are several)."""
        if self._index_parts and self._forward_plan is not _NO_PLAN:
            _check_blocks(self._index_parts, inputs, None)
        out = self._forward_plan.call(inputs)      # the array itself when there is one output
        if out is not None:
            return out
        outs = self._run("forward", inputs, 0)[0]
        return next(iter(outs.values())) if len(outs) == 1 else outs

    @property
    def grads(self) -> dict[str, np.ndarray]:
        """Every parameter's gradient as the last training call left it: views of the
        gradient arena, which you may write (data-parallel training sums into it)."""
        self._expose_grads()
        return self._grad_views

    def _expose_grads(self) -> None:
        """From now on the gradient arena may be written by others than the training
        entry: an embedding's gradient is zeroed whole every step again, as no record
        of the rows the last step wrote can be trusted (`ops/embedding.py`)."""
        if self._rows_kept.alive:
            with self._lock:        # not while a native call may read the records
                self._rows_kept()

    def grad(self, **inputs) -> tuple[float, dict[str, np.ndarray]]:
        """The loss and a copy of every parameter's gradient, in one native call.
        Like every training call, it updates batch norm's running statistics (a
        frozen layer's excepted)."""
        outs, grads = self._run("train", inputs, MODES["none"], before=self._begin_draw,
                                after=lambda: {name: g.copy() for name, g in self._grad_views.items()})
        return float(outs["loss"]), grads

    def loss(self, **inputs) -> float:
        """The loss of a batch as the model is used, changing nothing: dropout
        off (it would make a held-out loss random and too high), batch norm
        normalising with its running statistics (as the forward entry does, so
        the loss agrees with the predictions; a batch of one is fine), no
        update. What held-out evaluation and early stopping's val_loss report:
        the evaluation entry (`evaluate_batch`); a library compiled before it
        existed runs its training entry with dropout off (the gradient arena
        is overwritten)."""
        if self._entries.get("eval_loss") is not None:     # compiled on its first use
            return float(self._run("eval_loss", inputs, 0)[0]["loss"])
        if self.meta.get("buffers"):        # batch norm: only the inference-form entry gives that loss
            if "training" not in self.meta["parts"] + self.meta["deferred"]:
                raise TypeError(self._missing_entry())
            raise TypeError(f"model {self.name} has batch normalisation and this library has no held-out "
                            "loss entry (eval_loss): compile it again with all its parts (structc compile -o)")
        # a library built without the evaluation part: the training entry, dropout off
        saved: dict[str, np.ndarray] = {}

        def keep():
            saved.update((name, self.params[name].copy()) for name in self.meta.get("buffers", ()))
            if self._random:      # step 0: dropout off (each training call writes its own step)
                self._hyper_bits[DROPOUT_STEP] = 0

        def restore():
            for name, value in saved.items():
                self.params[name][...] = value
        outs, _ = self._run("train", inputs, MODES["none"], before=keep, after=restore, check_batch=False)
        return float(outs["loss"])

    def evaluate_batch(self, **inputs) -> tuple[dict[str, np.ndarray], float]:
        """The model's outputs and loss on a batch, as held-out evaluation measures them:
        one forward call in inference form (dropout off, batch norm's running
        statistics), no backward pass, nothing written."""
        outs, loss, _ = self.evaluate_terms(**inputs)
        return outs, loss

    def evaluate_terms(self, **inputs) -> tuple[dict[str, np.ndarray], float, list[float] | None]:
        """`evaluate_batch`, and the value of each term of a loss that adds means over
        different things (`meta["loss_denominator"]["terms"]`, in order: what held-out
        evaluation weighs by each one's denominator, `structc.heldout`); None for another
        loss, or a library compiled without them."""
        if self._entries.get("eval_loss") is None:      # a library built without it: two calls
            targets = {s["name"] for s in self.meta["inputs"] if s["kind"] == "target"}
            return self.forward(**{k: v for k, v in inputs.items() if k not in targets}), self.loss(**inputs), None
        outs = self._run("eval_loss", inputs, 0)[0]
        named = sorted((int(k[len(TERM_OUTPUT):]), k) for k in outs if k.startswith(TERM_OUTPUT))
        terms = [float(outs.pop(k)) for _, k in named]
        return outs, float(outs.pop("loss")), terms or None

    def grad_into_arena(self, **inputs) -> tuple[float, float]:
        """The first half of `train_step`: the loss, with its gradient left in the
        gradient arena (`net.grads`) and no update; `apply_update` is the second
        half. Also returns the loss's denominator for these inputs (what its mean
        divides by: examples, roots, graphs, the mask's sum; `structc.denominator`),
        which data-parallel training weights each rank's gradient with."""
        plan = self._train_plan or self._make_train_plan()
        if plan is not _NO_PLAN:                # as `train_step`: checked and run in C, mode none
            given, dims = self._expanded(inputs)
            if self._index_parts:               # ids in a block of an input: the plan checks whole inputs
                _check_blocks(self._index_parts, given, None)

            def before():                       # under the lock
                mode = MODES["none"]
                self._begin_draw()
                return mode, None
            ran = plan.train(given, dims, before)
            if ran is not None:
                return float(ran[0]["loss"]), self.loss_denominator(self._denominator_dims(given, dims), inputs)
        dims = {}
        outs, _ = self._run("train", inputs, MODES["none"], before=self._begin_draw, dims_out=dims)
        return float(outs["loss"]), self.loss_denominator(dims, inputs)

    def feed_dims(self, **inputs) -> dict[str, int]:
        """The sizes these training inputs bind (`t.trees`, `N`, ...), without running
        anything; the inputs are not checked here (a call on them checks them)."""
        return self._array_dims(*self._expanded(inputs))

    def _expanded(self, given: Mapping[str, object]) -> tuple[Mapping[str, object], dict]:
        """The inputs with each forest, graph or batch of sequences replaced by its arrays,
        and the sizes those bind."""
        dims: dict[str, int] = {}
        for binder in self._binders:
            given = binder.expand(given, dims)
        return given, dims

    def _denominator_dims(self, given: Mapping[str, object], dims: dict) -> dict:
        """`dims`, with the array inputs' sizes too unless the loss denominator's dims
        are all there already (a forest's trees, a graph batch's graphs: the binders
        bound them), which saves reading every input's shape on each step."""
        needed = (self.meta.get("loss_denominator") or {}).get("dims", ())
        return dims if all(d in dims for d in needed) else self._array_dims(given, dims)

    def _array_dims(self, given: Mapping[str, object], dims: dict) -> dict:
        """`dims` (a binder's sizes) and the symbols the array inputs of the training
        (or evaluation) entry bind, read off the arrays' shapes (as `_bind` binds
        them). A loaded entry is read first: held-out evaluation must not compile
        the training part to learn a batch's sizes."""
        entry = dict.get(self._entries, "train") or self._entries.get("eval_loss") or self._entries.get("train")
        for spec in entry.inputs:
            value = given.get(spec.name)
            if value is None:
                continue
            shape = np.shape(value)
            for k, d in enumerate(spec.shape):
                if d.__class__ is not int and d not in dims and k < len(shape):
                    dims[d] = shape[k]
        return dims

    def loss_denominator(self, dims: Mapping[str, int], inputs: Mapping[str, object]) -> float:
        """What the loss's mean divides by for a call with these bound dims and inputs."""
        found = self.meta.get("loss_denominator")
        if found is None:
            raise TypeError(f"model {self.name} declares no loss, so it has no loss denominator")
        return _evaluate_denominator()(found, dims, inputs)

    def apply_update(self, lr: float = 0.01) -> None:
        """The second half of `train_step`: one step of the optimizer from the
        gradient arena as it is now (SGD, momentum or Adam, with weight decay)."""
        lr = _hyper_value("lr", lr)
        address, need, dvals = self._update_call or self._prepare_update()
        pa, ga, sa = self._arena_addrs
        with self._lock:
            workspace, mode = self._workspace(need), MODES[self.optimizer]
            self._begin_step(lr, draw=False)
            status = _runtime.invoke(address, pa, ga, sa, workspace, (), (), dvals, self._hyper_addr, mode)
        if status != 0:
            raise RuntimeError(f"{self.name}: native code reported error {status}")

    def _prepare_update(self) -> tuple:
        """The update entry's address, workspace size and dims, worked out on the first
        `apply_update` (it runs every data-parallel step, always with the same ones)."""
        entry = self._entries.get("update")
        if entry is None:
            raise TypeError(f"model {self.name} has no update entry: it declares no loss, or it was "
                            "compiled by an older structc (compile it again)")
        dvals = (1,) * len(self._symbols)        # the update reads no dims
        self._update_call = (entry.address, self._workspace_size(entry, dvals), dvals)
        return self._update_call

    def set_optimizer(self, name: str | None = None, **options) -> None:
        """Choose sgd, momentum or adam (None, the default: keep the one in use, sgd at first,
        so `set_optimizer(clip_norm=1.0)` adds clipping to it); options: momentum, beta1, beta2, eps, weight_decay, and
        clip_norm: when > 0, every gradient is scaled by min(1, clip_norm / global L2 norm of all
        gradients) before the update, inside the compiled step (0: no clipping); decay_biases: False
        applies weight_decay to the matrices only, not to parameters of rank <= 1 (biases,
        normalisations' scales and shifts) (default: True, every parameter decays). Weight decay
        is L2 added to the clipped gradient (g + weight_decay * p, as PyTorch's SGD and Adam), not
        AdamW's decoupled decay. Options not given keep their last values, across optimizers too
        (at first: momentum 0.9, beta1 0.9, beta2 0.999, eps 1e-8, weight_decay 0, clip_norm 0,
        decay_biases True); another optimizer restarts the moments and the step counter."""
        name = self.optimizer if name is None else name
        if name not in ("sgd", "momentum", "adam"):
            raise ValueError(f"unknown optimizer '{name}' (choose sgd, momentum or adam)")
        for k in options:
            if k not in self._opt:
                raise TypeError(f"unknown optimizer option '{k}' (options: {', '.join(self._opt)})")
        checked = {k: _option_value(k, v) for k, v in options.items()}
        with self._lock:
            if name != self.optimizer:
                self._state_arena[:] = 0
                self._step = 0
            self.optimizer = name
            self._opt.update(checked)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The optimizer's state, as the named arrays a checkpoint holds (copies):
        `optimizer` (sgd, momentum or adam), `optimizer_options` (JSON: every option
        of `set_optimizer`), `optimizer_state` (float32 [2 * arena]: momentum's
        velocity, or Adam's m then v), `optimizer_step` (the updates made: Adam's
        bias correction and the schedule count them) and `dropout_draws` (the
        training calls made: dropout's next masks are drawn at this count).
        `set_optimizer_state` puts them back; `save_checkpoint` saves them with the
        parameters, the seed and the schedule."""
        with self._lock:
            return {"optimizer": np.array(self.optimizer), "optimizer_options": np.array(json.dumps(self._opt)),
                    "optimizer_state": self._state_arena.copy(), "optimizer_step": np.int64(self._step),
                    "dropout_draws": np.int64(self._draws)}

    def set_optimizer_state(self, state: Mapping[str, object]) -> None:
        """Continue from `optimizer_state()`'s arrays (of this model, or another `Net`
        of it): the optimizer, its options (an option the JSON leaves out keeps its
        value, as with `set_optimizer`), the moments, the step and draw counts. All is
        checked before anything changes."""
        self._restore_optimizer(self._checked_optimizer_state(state))

    def _checked_optimizer_state(self, state: Mapping[str, object], where: str = "") -> tuple:
        """`state` (`optimizer_state`'s arrays) checked against this model, as
        (name, options, moments, step, draws); a clear error otherwise."""
        missing = [k for k in _OPTIMIZER_STATE if k not in state]
        if missing:
            raise ValueError(f"{where}no optimizer state: {', '.join(missing)} missing")
        name = str(np.asarray(state["optimizer"]))
        if name not in MODES or name == "none":
            raise ValueError(f"{where}unknown optimizer {name!r} (sgd, momentum or adam)")
        try:
            options = json.loads(str(np.asarray(state["optimizer_options"])))
            if not isinstance(options, dict):
                raise ValueError(f"a JSON object of options, got {options!r}")
            for k in options:
                if k not in self._opt:
                    raise ValueError(f"unknown option {k!r} (options: {', '.join(self._opt)})")
            options = {k: _option_value(k, v) for k, v in options.items()}
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}optimizer_options: {e}") from None
        moments = _checked_param("optimizer_state", state["optimizer_state"], self._state_arena.shape, where,
                                 what="optimizer array")
        step, draws = (_count(state[k], k, where) for k in ("optimizer_step", "dropout_draws"))
        return name, options, moments, step, draws

    def _restore_optimizer(self, checked: tuple) -> None:
        """Put a `_checked_optimizer_state` in place."""
        name, options, moments, step, draws = checked
        with self._lock:
            self.optimizer = name
            self._opt.update(options)
            self._state_arena[...] = moments
            self._step, self._draws = step, draws

    def save_checkpoint(self, path):
        """Write what training needs to go on exactly where it is to one `.npz`
        archive (replaced in one rename; `.npz` added to a name without it, and
        the name written returned): every parameter (frozen ones and batch norm's
        running statistics too), the optimizer, its options and moments, the step
        and dropout draw counts, dropout's key (from the seed), the lr schedule,
        the vocabulary (`vocab`, `numbering`), and the model's name and parameter
        layout. A model without a loss has
        nothing to train: refused (TypeError; `save_params` saves its parameters)."""
        from .checkpoint import save
        return save(self, path)

    def load_checkpoint(self, path) -> None:
        """Continue from a `save_checkpoint` archive: training on from here is the
        run that wrote it, bit for bit. The checkpoint wins over this net's own
        settings: its optimizer and options, schedule and dropout seed replace
        those set here, and its vocabulary another (with a CheckpointWarning).
        Everything is checked before anything changes: a file of another model
        (its name, parameters, frozen set or arena), a parameter file
        (`save_params`: no optimizer state; use `load_params`), a damaged archive and
        values that are not finite are refused with a ValueError naming the file."""
        from .checkpoint import load
        load(self, path)

    def set_schedule(self, kind: str | None = "constant", *, warmup: int = 0, decay_steps: int | None = None,
                     gamma: float = 0.1, floor: float = 0.0) -> None:
        """Scale the lr given to each step by a schedule of the step counter
        (`structc.schedules`): `step` (times gamma every decay_steps steps),
        `cosine` (to lr * floor over decay_steps steps) or `constant`, after a
        linear warm-up of `warmup` steps. `None` (or constant without warm-up)
        turns it off. The counter is the optimizer's: `init_params` and a
        change of optimizer restart it, a resumed run continues it."""
        from .schedules import check_schedule
        spec = None if kind is None else check_schedule(kind, warmup=warmup, decay_steps=decay_steps,
                                                         gamma=gamma, floor=floor)
        if spec is not None and spec["kind"] == "constant" and spec["warmup"] == 0:
            spec = None
        with self._lock:
            self.schedule = spec

    def train_step(self, lr: float = 0.01, *, check_finite: bool | None = None, **inputs) -> float:
        """Forward, backward and parameter update in one native call; returns the loss.

        With `check_finite` (default: `net.check_finite`, off) a loss that is
        NaN or infinite raises FloatingPointError instead of being returned."""
        lr = _hyper_value("lr", lr)
        plan = self._train_plan or self._make_train_plan()
        ran = None
        if plan is not _NO_PLAN:
            given, dims = self._expanded(inputs)
            if self._index_parts:
                _check_blocks(self._index_parts, given, None)

            def hyper():                        # under the lock, as `_run`'s before, mode and after
                mode = MODES[self.optimizer]
                return mode, self._begin_step(lr, draw=True)
            ran = plan.train(given, dims, hyper)
        if ran is not None:
            outs, (_, step) = ran
        else:                                   # anything to convert or refuse: the Python path
            outs, step = self._run("train", inputs, lambda: MODES[self.optimizer],
                                   before=lambda: self._begin_step(lr, draw=True), after=lambda: self._step)
        loss = float(outs["loss"])
        if (self.check_finite if check_finite is None else check_finite) and not np.isfinite(loss):
            raise FloatingPointError(f"{self.name}: the loss is {loss} at step {step} (lr={lr}); this step's "
                                     "update has been applied, so reload or re-initialise the parameters")
        return loss

    def _begin_step(self, lr: float, draw: bool) -> int:
        """Write the next step's hyper-parameters (and, with `draw`, dropout's
        next draw), then count them; returns the step's number. Called holding
        the lock, just before the native call, with no Python in between: the
        counts change last, in one statement, so an exception before it (a
        KeyboardInterrupt too) leaves them as they were. A step counted but not
        run would shift Adam's bias correction, the schedule, and every later
        dropout mask, against a run that was not interrupted."""
        step, used = self._set_hyper(lr)
        draws = self._next_dropout_step() if draw and self._random else self._draws
        self._step, self.last_lr, self._draws = step, used, draws
        return step

    def _begin_draw(self) -> None:
        """`_begin_step` of a training call that updates nothing (`grad`,
        `grad_into_arena`): dropout's next draw alone."""
        if self._random:
            draws = self._next_dropout_step()
            self._draws = draws

    def _set_hyper(self, lr: float) -> tuple[int, float]:
        """Write the hyper-parameters of the next step (called holding the lock);
        returns its number and learning rate, for the caller to count
        (`_begin_step`). Plain Python floats, checked against float32's range,
        then one store: this runs before every step, so it stays a few
        microseconds."""
        o = self._opt
        step = self._step + 1
        if self.schedule is not None:
            from .schedules import lr_factor
            lr = lr * lr_factor(self.schedule, self._step)
        beta1, beta2, decay = o["beta1"], o["beta2"], o["weight_decay"]
        try:
            step_size = lr / (1 - beta1 ** step)
            v_scale = 1 / math.sqrt(1 - beta2 ** step)
        except (OverflowError, ZeroDivisionError):
            step_size = v_scale = math.inf
        values = _HYPER_DEFAULTS.copy()        # CLIP_SCALE stays 1 unless the step clips; loss terms weigh 1
        values[LR], values[MOMENTUM], values[BETA1], values[BETA2] = lr, o["momentum"], beta1, beta2
        values[EPS] = o["eps"]
        values[ADAM_STEP_SIZE], values[ADAM_V_SCALE], values[WEIGHT_DECAY] = step_size, v_scale, decay
        values[CLIP_NORM], values[VECTOR_DECAY] = o["clip_norm"], decay if o["decay_biases"] else 0.0
        if not all(map(_F32_OVERFLOW.__gt__, map(abs, values))):     # lr=1e39 is finite in float64 only
            raise ValueError(f"the hyper-parameters overflow float32 at step {step}: lr={lr}, "
                             + ", ".join(f"{k}={v}" for k, v in o.items()))
        _FLOAT_HYPER.pack_into(self._hyper, 0, *values)    # as numpy's float32 cast: round to nearest
        return step, lr          # lr as computed; native code reads it rounded to float32

    def _next_dropout_step(self) -> int:
        """Write the next draw's number, for a training call's new masks (called
        holding the lock), and return it for the caller to count. Not in
        `_set_hyper`: `apply_update` runs no forward pass, so it draws none."""
        draws = self._draws + 1
        self._hyper_bits[DROPOUT_STEP] = draws & 0xFFFFFFFF or 1     # 0 is dropout off (`loss`)
        return draws

    def profile(self, *, steps: int | None = None, forward: bool = False, lr: float = 0.01,
                peak: float | None = None, trace=None, **inputs):
        """Time every kernel of a training step (or the forward pass) on these
        inputs, in a copy of this model (its parameters are left as they are);
        returns a `structc.profile.Report` (`.table()`, `.write_trace(path)`).
        `trace`: also write a Chrome/Perfetto trace there."""
        from .profile import profile_model
        report = profile_model(self, inputs, steps=steps, forward=forward, lr=lr, peak=peak)
        if trace is not None:
            report.write_trace(trace)
        return report

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


#: float32's smallest normal number: Adam's eps is at least this, since its denominator
#: sqrt(v) + eps must not be 0 where v has underflowed (native code flushes subnormals)
_F32_TINY = 1.1754943508222875e-38
_HYPER_RANGES = {"lr": (0.0, None), "momentum": (0.0, 1.0), "beta1": (0.0, 1.0), "beta2": (0.0, 1.0),
                 "eps": (_F32_TINY, None), "weight_decay": (0.0, None), "clip_norm": (0.0, None)}


def _dropout_key(seed) -> np.ndarray:
    """Two uint32 words for Philox's key: from `SeedSequence(seed)` (any
    non-negative int, however large, or None for fresh entropy), or drawn
    from the generator default_rng makes of anything else it takes."""
    try:
        return np.random.SeedSequence(seed).generate_state(2, np.uint32)
    except TypeError:
        return np.random.default_rng(seed).integers(0, 2 ** 32, 2, dtype=np.uint32)


#: set_optimizer's options before any is given (checked and rounded as given ones are, by `_option_value`)
_OPTION_DEFAULTS = {"momentum": 0.9, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
                    "clip_norm": 0.0, "decay_biases": True}


def _option_value(name: str, value):
    """An optimizer option, checked: a flag or a hyper-parameter."""
    if name == "decay_biases":
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"decay_biases must be True or False, got {value!r}")
        return bool(value)
    v = _hyper_value(name, value)
    # native code weighs the moments with float32's betas; Adam's bias correction, computed
    # here, must use the same ones to undo that weighting (0.999999 is 0.99999899 in float32)
    return float(np.float32(v)) if name in ("beta1", "beta2") else v


#: the smallest magnitude that rounds to infinity in float32 (half an ulp above its largest finite value)
_F32_OVERFLOW = 3.4028235677973366e38


def _hyper_value(name: str, value) -> float:
    """A hyper-parameter as a float that is finite in float32 (what native code
    reads) and within its range: lr, weight_decay >= 0; eps at least float32's
    smallest normal number; momentum and betas in [0, 1)."""
    if value.__class__ is not float and (isinstance(value, bool) or not isinstance(value, Real)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    v = float(value)
    low, high = _HYPER_RANGES[name]
    finite = abs(v) < _F32_OVERFLOW
    # the bound compared in float32, as native code reads it: momentum=0.99999999 is 1.0 there
    if not finite or v < low or (high is not None and float(np.float32(v)) >= high):
        where = f"[{low:g}, {high:g})" if high is not None else f">= {low:g}"
        why = (" (Adam divides by sqrt(v) + eps, and a v that underflows is 0 in native code)"
               if name == "eps" else f" ({value!r} is 1.0 in float32, as native code reads it)"
               if finite and high is not None and v < high else "")
        raise ValueError(f"{name} must be a finite float32 number {where}, got {value!r}{why}")
    return v


#: the arrays of `Net.optimizer_state`
_OPTIMIZER_STATE = ("optimizer", "optimizer_options", "optimizer_state", "optimizer_step", "dropout_draws")


def _count(value, name: str, where: str = "") -> int:
    """A saved counter (a step or draw count): one integer >= 0."""
    arr = np.asarray(value)
    if arr.shape != () or arr.dtype.kind not in "iu" or int(arr) < 0:
        raise ValueError(f"{where}{name} must be one integer >= 0, got {arr!r}")
    return int(arr)


@functools.cache
def _physical_memory() -> int:
    """This machine's memory (bytes), read once: every call compares its workspace with it."""
    return physical_memory()


@functools.cache
def _evaluate_denominator():
    """`structc.denominator.evaluate`, imported on first use (it imports networkx)."""
    from .denominator import evaluate
    return evaluate


def _params_path(path):
    """`path`, or `path.npz` when only that exists (numpy's `savez` adds the suffix)."""
    if isinstance(path, (str, os.PathLike)):
        name = os.fspath(path)
        if not os.path.exists(name) and os.path.exists(name + ".npz"):
            return name + ".npz"
    return path


def _read_params(path, what: str = "parameter file", writer: str = "save_params") -> dict[str, np.ndarray]:
    """Every array of an `.npz` archive, or one ValueError naming the file and the problem
    (`what`, written by `writer`: a parameter file, or a checkpoint)."""
    try:
        return read_archive(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}") from None
    except OSError as e:
        raise ValueError(f"{path}: not a {what} written by {writer} (an .npz archive): {e}") from None
    except ValueError as e:
        raise ValueError(f"{path}: not a {what} written by {writer}: {e}") from None


def _save_archive(path, arrays: dict[str, np.ndarray]):
    """`arrays` as an `.npz` archive at `path`, replaced in one rename; returns the path
    written (`.npz` added to a name without it, as numpy's `savez` adds it). A file
    object is written as it is: the caller owns it."""
    if not isinstance(path, (str, os.PathLike)):
        np.savez(path, **arrays)
        return path
    written = os.fspath(path) if os.fspath(path).endswith(".npz") else os.fspath(path) + ".npz"
    write_atomically(written, lambda f: np.savez(f, **arrays))
    return written if isinstance(path, str) else Path(written)


def _as_array(spec: _Input, value) -> np.ndarray:
    """The input as a C-contiguous array of the declared dtype, converting
    only within a kind (float64 -> float32, int64 -> int32)."""
    if not isinstance(value, np.ndarray) and hasattr(value, "__dlpack__"):
        return _from_dlpack(spec, value)
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
            with np.errstate(over="ignore"):
                converted = arr.astype(spec.dtype)
            if kind == "f" and arr.dtype.itemsize > 4 and np.isinf(converted).any():
                bad = np.flatnonzero(np.isinf(converted) & np.isfinite(arr))
                if bad.size:        # finite, but beyond float32's range: it would become an infinity
                    where = tuple(int(i) for i in np.unravel_index(bad[0], arr.shape))
                    raise ValueError(f"input '{spec.name}': {arr.reshape(-1)[bad[0]].item()!r} at position "
                                     f"{where} is beyond float32's range (the model's inputs are float32)")
            arr = converted
    return _contiguous_aligned(arr)


def _contiguous_aligned(arr: np.ndarray) -> np.ndarray:
    """`arr`, or a copy that is C-contiguous and aligned to its dtype: native
    code reads whole elements (ascontiguousarray returns a contiguous but
    misaligned view as it is, so a misaligned one is copied)."""
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    if not arr.flags.aligned:
        arr = arr.copy()
    return arr


_DLPACK_DEVICES = {1: "cpu", 2: "cuda", 3: "cuda_host", 4: "opencl", 7: "vulkan", 8: "metal", 10: "rocm",
                   13: "cuda_managed", 14: "oneapi"}


def _from_dlpack(spec: _Input, tensor) -> np.ndarray:
    """Another library's tensor (torch, jax, ...) shared through DLPack: no copy when it is
    on the CPU, of the declared dtype and C-contiguous. Otherwise a copy only where the
    values stay the same (a strided view; integer labels that fit int32); a tensor on
    another device or of another dtype is refused: casting floats would change values."""
    try:
        arr = np.from_dlpack(tensor)     # refuses memory the CPU cannot read (asking the device first costs µs)
    except (BufferError, RuntimeError, TypeError, ValueError) as e:
        raise TypeError(_dlpack_refusal(spec, tensor, e)) from None
    want = np.dtype(spec.dtype)
    if arr.dtype != want:
        if not (want.kind == "i" and arr.dtype.kind in "iu"):
            raise TypeError(f"input '{spec.name}': the {_kind_of(tensor)} has dtype "
                            f"{getattr(tensor, 'dtype', arr.dtype)}, the model expects {spec.describe()} "
                            f"({want.name}); convert it yourself (structc does not cast a tensor's values)")
        return _as_array(spec, arr)          # integers: a copy, checked to fit, values unchanged
    return _contiguous_aligned(arr)


def _kind_of(tensor) -> str:
    return f"{type(tensor).__module__}.{type(tensor).__qualname__}"


def _dlpack_refusal(spec: _Input, tensor, error: Exception) -> str:
    """Why numpy cannot read `tensor`: its device when it is not the CPU, else numpy's reason."""
    try:
        device = int(tensor.__dlpack_device__()[0])
    except Exception:            # noqa: BLE001 - an exporter without a device: numpy's reason is all there is
        device = 1
    if device != 1:
        return (f"input '{spec.name}': the {_kind_of(tensor)} is on device {_DLPACK_DEVICES.get(device, device)}; "
                f"structc runs on the CPU: move it there first (e.g. tensor.cpu())")
    if getattr(tensor, "requires_grad", False):     # torch's own advice (detach) would cut the gradient unsaid
        return (f"input '{spec.name}': the {_kind_of(tensor)} requires grad, and structc is not part of torch's "
                f"autograd: no gradient would flow back through this call to what made it. Pass "
                f"{spec.name}.detach() only if none should (net.grad gives the parameters' gradients) [{error}]")
    return (f"input '{spec.name}': cannot share the {_kind_of(tensor)} (dtype {getattr(tensor, 'dtype', '?')}) "
            f"with numpy through DLPack: {error}")
