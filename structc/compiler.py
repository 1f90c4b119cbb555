"""The pipeline from source to machine code, top to bottom.

    .snet --parse--> AST --build--> forward graph --differentiate--> train graph
          --passes--> fused graphs --plan--> memory plans --lower--> LLVM IR
          --native--> object code + metadata

`compile_source` returns an `Artifact`: the object code and the metadata
(inputs, outputs, parameters, entry points) that `model.Net` needs to call
it. Any stage can be printed with `dump`.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from llvmlite import ir

from . import __version__
from .autodiff import differentiate, differentiate_checked, warn_gradient_flow, warning_entries
from .build import ModelDef, build_model
from .denominator import batch_statistic, loss_denominator, term_values, weigh_loss_terms
from .errors import Span
from .graph import Builder, Graph
from .lower.lowered import LoweredKernels, record_file, record_from_file
from .lower.module import SharedKernels, Target, defined_once, drop_bodies, helpers, lower_entry, split_module
from .native import compile_objects, compile_threads, compiling, host_target
from .ops.embedding import STRUCTURE_KINDS
from .ops.norm import batch_counts, freeze_statistics
from .ops.optim import N_HYPER, TERM_OUTPUT
from .passes import PIPELINE, run_pipeline
from .passes.message import PREPARE, prepare
from .passes.mode import inference
from .passes.plan import Plan, param_layout, plan_memory
from .syntax import Program, format_program, parse

#: bumped whenever the calling convention or the metadata of compiled code changes
ABI_VERSION = 4     # 2: 11 hyper-parameter slots (clipping, vectors' decay), the step writes slot 9
# 3: 14 slots, the last three dropout's key and step (uint32 bits)
# 4: 18 slots, four loss terms' weights (1 - slot) before dropout's three

STAGES = ["ast", "graph"] + [f"graph.{n}" for n, _ in PREPARE] + ["train"] + \
         [f"{entry}.{n}" for entry in ("forward", "train", "update") for n, _ in PIPELINE] + \
         ["plan", "llvm", "opt", "asm"]


#: entry points compiled together as one LLVM module (one object file). The
#: forward entry is a part of its own, so inference never waits for training
#: code, and the parts are optimised and code-generated in parallel threads.
PARTS = {"forward": ("forward",), "training": ("train",), "update": ("update",), "evaluation": ("eval_loss",)}
#: the parts compiled when none are named; the others only when a call needs them
#: (`update`: the optimizer step alone, which data-parallel training and `apply_update`
#: call; its kernel differs from the training entry's where a table's update reads the
#: step's ids, ~0.1 s of LLVM in a tree model's cold compile. `evaluation`: the loss in
#: inference form, of a model whose ops differ in training)
EAGER_PARTS = ("forward", "training")


@dataclass
class Artifact:
    """Metadata and object code: `objects` holds the object files of the parts
    compiled (`PARTS`; `meta["objects"]` gives each part's sizes, in order: a
    part is one object per module it was split into); `meta["deferred"]` lists
    the parts left for later."""
    meta: dict
    objects: tuple[bytes, ...]
    llvm_ir: str = ""
    timings: dict = field(default_factory=dict)
    jit: bool = True     # False: position-independent, for a shared library
    part_ir: tuple[str, ...] = ()   # each object's LLVM IR (`llvm_ir` is them together, to read)
    kernel_symbols: dict = field(default_factory=dict)   # `<entry>_<name>` of each kernel -> its symbol

    @property
    def object(self) -> bytes | tuple[bytes, ...]:
        """The object file, or the tuple of them when several parts were compiled
        (what `native.JitModule` and `ship` take either way)."""
        return self.objects[0] if len(self.objects) == 1 else self.objects


class Timings(dict):
    """Seconds per stage, in the order the stages ran (`structc compile --timings`);
    `cpu` holds the CPU seconds of the thread that ran each stage (on a loaded
    machine the steadier figure). `total` is the wall time since it was made:
    the LLVM stages of the modules overlap each other (threads), so the stages
    can add up to more; `llvm` is their wall time together."""

    def __init__(self):
        super().__init__()
        self.cpu: dict[str, float] = {}
        self.started = time.perf_counter()
        self.started_cpu = time.process_time()

    @contextmanager
    def stage(self, name: str):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0, time.thread_time() - c0)

    def add(self, name: str, seconds: float, cpu: float) -> None:
        self[name] = self.get(name, 0.0) + seconds
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu

    def finish(self) -> None:
        """Record `total`: the wall time and the process's CPU time since the start."""
        self.pop("total", None)
        self.add("total", time.perf_counter() - self.started, time.process_time() - self.started_cpu)
        self.cpu["total"] = time.process_time() - self.started_cpu

    def table(self) -> str:
        width = max(map(len, self), default=0)
        rows = [f"{'stage':<{width}}  {'wall ms':>9}  {'cpu ms':>9}"]
        rows += [f"{name:<{width}}  {seconds * 1000:9.1f}  {self.cpu.get(name, 0.0) * 1000:9.1f}"
                 for name, seconds in self.items()]
        return "\n".join(rows)


_PAUSE_LOCK = threading.Lock()
_PAUSED = [0, False]     # compiles under way, whether the collector was on before the first


@contextmanager
def collector_paused():
    """Python's cyclic garbage collector off while a model compiles. Lowering
    makes tens of thousands of llvmlite objects that all stay alive until the
    IR text is made; each generation-2 collection walks every one of them,
    which was half of the Python time of a compile (LeNet-5: 0.89 -> 0.45 s of
    CPU). Nothing is freed later than it would be: the collector runs again,
    as usual, after the compile. Nested and concurrent compiles (a training
    part compiled in a thread) turn it back on only when the last one ends,
    and only if it was on before the first. Every compile is a
    `native.compiling()` region: a fork waits for it, so a child is not forked
    with the collector off for good."""
    with compiling():
        with _PAUSE_LOCK:
            if _PAUSED[0] == 0:
                _PAUSED[1] = gc.isenabled()
                gc.disable()
            _PAUSED[0] += 1
        try:
            yield
        finally:
            with _PAUSE_LOCK:
                _PAUSED[0] -= 1
                if _PAUSED[0] == 0 and _PAUSED[1]:
                    gc.enable()


def compiler_fingerprint() -> str:
    """Version plus a hash of the compiler's own sources, so a changed
    compiler never reuses another's cached code."""
    return _fingerprint()


def _fingerprint_uncached() -> str:
    from pathlib import Path
    h = hashlib.sha256(__version__.encode())
    root = Path(__file__).resolve().parent
    files = sorted(root.rglob("*.py"))
    for extra in ("grammar", "runtime"):
        try:
            from importlib.resources import files as res
            d = Path(str(res(f"structc.{extra}")))
        except (ModuleNotFoundError, TypeError):
            d = root.parent / extra
        files += sorted(p for p in d.glob("*") if p.suffix in (".lark", ".c", ".h"))
    for p in files:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return f"{__version__}+{h.hexdigest()[:16]}"


_FP: list[str] = []


def _fingerprint() -> str:
    if not _FP:
        _FP.append(_fingerprint_uncached())
    return _FP[0]


def forward_graph(mdef: ModelDef) -> Graph:
    """The model as used: its named outputs (the loss if it has none), each
    op in its inference form (`passes.mode`: dropout off, running statistics)."""
    g = mdef.graph.copy()
    named = {k: v for k, v in g.outputs.items() if k != "loss"}
    g.outputs = named or {"loss": g.outputs["loss"]}
    return inference(g)


def float_arithmetic_inputs(g: Graph) -> list[str]:
    """The integer inputs whose values reach float32 arithmetic (elementwise ops
    convert integer operands: exact only up to 2**24), through ops that keep
    integers as they are; `Net` refuses larger values in them. Indices (gathers,
    labels) read integers exactly and do not count."""
    found = []
    for name, nid in g.inputs.items():
        if g.nodes[nid].type.is_float:
            continue
        stack, seen = [nid], {nid}
        while stack and name not in found:
            for u in g.users(stack.pop()):
                user = g.nodes[u]
                moves_ints = "moves_data" in user.op.traits and not user.type.is_float
                if "elementwise" in user.op.traits and not moves_ints:
                    found.append(name)
                    break
                if not user.type.is_float and u not in seen:
                    seen.add(u)
                    stack.append(u)
    return found


#: inputs a binder makes (and checks) from a forest, graph or batch of sequences
_BOUND_KINDS = STRUCTURE_KINDS


def index_inputs(g: Graph) -> dict[str, list]:
    """The caller's integer inputs whose values are row ids (an op's `index_bounds`),
    read directly or through ops that only move them (views, `moves_data`: copies,
    broadcasts, concat, slice, transpose), with the rows each use picks from (ints
    or size symbols): kernels clamp an id outside, which would silently be another
    row, so `Net` refuses such an id at the call. Uses that read only a block of
    the input (`chunk(k, 1, 2)`) are in `index_inputs_in_part`."""
    return row_id_uses(g)[0]


def computed_positions(g: Graph) -> list[str]:
    """The size symbols positions along which ops compute (`argmax` over a graph's
    nodes gives rows): a reordered graph's rows hold other nodes, so its binder
    refuses one whose nodes are among them (`graphs.Binder`)."""
    found = {n.op.id_range(g, n) for n in g.nodes.values()}
    return sorted(d for d in found if isinstance(d, str))


def row_id_uses(g: Graph) -> tuple[dict[str, list], dict[str, list], list[str]]:
    """`index_inputs`; the uses that read a block of an input only, `{name: [[rows,
    block]]}`, block one `[start, stop]` or None (all of it) per axis of the input
    (`k`'s second column is `chunk(k, 1, 2)`'s ids, the first may hold anything);
    and the inputs whose ids are also used otherwise (`index_inputs_as_values`:
    arithmetic, an output, labels; a graph's binder renumbers node ids into the
    rows of a reordered graph, which those uses would see too)."""
    whole: dict[str, list] = {}
    parts: dict[str, list] = {}
    as_values: list[str] = []
    outputs = set(g.outputs.values())
    for name, nid in g.inputs.items():
        node = g.nodes[nid]
        if node.type.is_float or node.attrs.get("kind") in _BOUND_KINDS:
            continue
        # (node, block of the input its values come from, where its axes lie in the input: `_moved_block`)
        stack = [(nid, None, tuple((k, 0) for k in range(len(node.shape))))]
        seen, other = set(stack), False
        while stack:
            v, block, axes = stack.pop()
            other = other or v in outputs
            for u in g.users(v):
                user = g.nodes[u]
                index = {pos for pos in user.op.index_bounds(g, user) if user.inputs[pos] == v}
                for pos, rows in user.op.index_bounds(g, user).items():
                    use = rows if block is None else [rows, [list(b) if b else None for b in block]]
                    into = whole if block is None else parts
                    if pos in index and use not in into.setdefault(name, []):
                        into[name].append(use)
                moves = user.op.traits & {"view", "moves_data"} and not user.type.is_float
                if moves:
                    for state in _moved_block(g, user, v, block, axes, node.shape):
                        if state not in seen:
                            seen.add(state)
                            stack.append(state)
                elif len(index) < user.inputs.count(v):
                    other = True
        if other:
            as_values.append(name)
    for found in (whole, parts):        # labels are checked against their classes already
        for name, uses in found.items():
            classes = g.nodes[g.inputs[name]].attrs.get("classes") or 0
            rows_of = (lambda use: use) if found is whole else (lambda use: use[0])
            uses[:] = [use for use in uses if not (classes and rows_of(use).__class__ is int
                                                   and rows_of(use) >= classes)]
            if found is parts:          # a block of ids the whole input's check covers already
                uses[:] = [use for use in uses if use[0] not in whole.get(name, ())]
    whole = {name: rows for name, rows in whole.items() if rows}
    parts = {name: uses for name, uses in parts.items() if uses}
    return whole, parts, [name for name in as_values if name in whole or name in parts]


def _moved_block(g: Graph, user, v: int, block, axes, dims: tuple) -> list[tuple]:
    """The walk's states at `user`, an op that moves v's values, one per operand
    that is v: `(user, block, axes)`, with `block` the part of the input (a
    `(start, stop)` or None per input axis) the values come from and `axes` where
    v's axes lie in the input: `(input axis, offset)` per axis, index i along it
    being the input's i - offset, or None once a move mixes axes. A copy keeps the
    axes, a transpose swaps them, a concat shifts its axis by the operands before;
    a slice of known axes narrows the block (nothing, when it lies wholly in other
    operands: `chunk(concat(a, k, axis=1), 1, 2)` reads no id of a); any other
    move (reshape, broadcast) keeps the block, as a bound on where the values come
    from, but not the axes. `dims`: the input's shape."""
    shape, name = g.nodes[v].shape, user.op.name
    if axes is None:
        return [(user.id, block, None)]
    if name == "slice":
        ax = user.attrs["axis"] % len(shape)
        origin, offset = axes[ax]
        start, stop = user.attrs["start"] - offset, user.attrs["stop"] - offset
        lo, hi = (0, dims[origin]) if block is None or block[origin] is None else block[origin]
        start, stop = max(start, lo), min(stop, hi) if isinstance(hi, int) else stop
        if start >= stop:
            return []
        whole = block is None and (start, stop) == (0, dims[origin])   # all of it: checked as a whole input
        block = None if whole else tuple((start, stop) if k == origin else (None if block is None else block[k])
                      for k in range(len(dims)))
        return [(user.id, block, tuple((o, off - user.attrs["start"]) if k == ax else (o, off)
                                       for k, (o, off) in enumerate(axes)))]
    if name == "transpose":
        return [(user.id, block, axes[::-1])]
    if name == "concat":
        ax = user.attrs.get("axis", -1) % len(shape)
        states, before = [], 0
        for operand in user.inputs:
            if operand == v:
                states.append((user.id, block, tuple((o, off + before) if k == ax else (o, off)
                                                     for k, (o, off) in enumerate(axes))))
            before += g.nodes[operand].shape[ax]
        return states
    if user.shape == shape and "elementwise" in user.op.traits:
        return [(user.id, block, axes)]
    return [(user.id, block, None)]


def eval_loss_graph(mdef: ModelDef) -> Graph:
    """The loss and the model's named outputs in inference form (running statistics,
    dropout off): what held-out evaluation measures, in one call with no backward
    pass, so the loss agrees with the forward entry's predictions. A loss that adds
    means over different things also gives each one (`loss_term:<j>`), which held-out
    evaluation weighs by its own denominator (`structc.heldout`)."""
    g = mdef.graph.copy()
    terms = {f"{TERM_OUTPUT}{j}": nid for j, nid in enumerate(term_values(g))}
    g.outputs = {"loss": g.outputs["loss"], **terms, **{k: v for k, v in g.outputs.items() if k != "loss"}}
    return inference(g)


def train_graph(mdef: ModelDef, update_size: int, frozen: frozenset[str] = frozenset(),
                decay_end: int | None = None, differentiated: Graph | None = None,
                vector_width: int = 16) -> Graph:
    """Forward, backward and update. `update_size`: the floats the update
    covers, the trainable parameters laid out first; `decay_end`: where the
    vectors (biases, norms) start among them (`arena_layout`); `differentiated`:
    the loss's graph differentiated already (`differentiate_checked`), to extend;
    `vector_width`: the target's lanes (see `differentiate`)."""
    g = differentiated
    if g is None:
        g = mdef.graph.copy()
        g.outputs = {"loss": g.outputs["loss"]}
        g = differentiate(g, frozen=frozen, vector_width=vector_width)
    grads = [g.outputs[f"grad:{p}"] for p in mdef.params if p not in frozen]
    # A gradient that is a scatter of rows (an embedding's) is zero outside the rows its
    # ids name: SGD may then update those rows alone (`ops/optim.py`). The ids are
    # operands of the update, so they stay alive until it runs.
    tables = [(k, g.nodes[i].inputs[1]) for k, i in enumerate(grads) if g.nodes[i].op.name == "scatter_rows"]
    for k, _ in tables:     # ... and zeroed where the last step wrote, not whole (`ops/embedding.py`)
        g.nodes[grads[k]].attrs["record"] = True
    sparse = tuple((k, len(grads) + j) for j, (k, _) in enumerate(tables))   # (gradient, ids) operands
    # A recursion's parameter gradient that is its parameter program's scatter alone (E[t.word] in a
    # step case): that scatter keeps the record of its rows, which the update reads (no ids: -1)
    sparse += tuple((k, -1) for k, i in enumerate(grads) if _recorded_in_recursion(g, i))
    b = Builder(g)
    g.outputs["update"] = b.update(*(b.value(i) for i in grads + [ids for _, ids in tables]),
                                   size=update_size, decay_end=decay_end, sparse=sparse).id
    return g


def _recorded_in_recursion(g: Graph, nid: int) -> bool:
    """Whether gradient `nid` is a tree_grad_part whose parameter program gives it as
    one scatter of rows; marks that scatter to keep its record (`embedding.keeps_record`)."""
    node = g.nodes[nid]
    if node.op.name != "tree_grad_part":
        return False
    program = g.nodes[node.inputs[0]].attrs["bwd_par"].graph
    scatter = program.nodes.get(program.outputs.get(f"d:{node.attrs['param']}"))
    if scatter is None or scatter.op.name != "scatter_rows":
        return False
    scatter.attrs["record"] = True
    return True


def row_tables(mdef: ModelDef, train: Graph, frozen: frozenset[str] = frozenset()) -> list[str]:
    """The parameters whose gradient the training entry writes as a scatter of
    rows that keeps the runtime's record of them (`ops/embedding.py`): the
    update's `sparse` tables, by name."""
    trainable = [p for p in mdef.params if p not in frozen]
    return [trainable[k] for k, _ in train.nodes[train.outputs["update"]].attrs.get("sparse", ())]


def update_graph(mdef: ModelDef, update_size: int, decay_end: int | None = None, spans: tuple = ()) -> Graph:
    """The optimiser step alone, reading the gradient arena as it is: data-parallel
    training sums the ranks' gradients between `sc_train` (mode none) and this.
    `spans`: (offset, rows, width) of the tables whose record of rows the update
    may read (`row_tables`; data-parallel training keeps it across the sum)."""
    g = Graph(f"{mdef.name}.update")
    g.outputs["update"] = Builder(g).update(size=update_size, decay_end=decay_end, spans=tuple(spans)).id
    return g


def resolve_frozen(params, freeze) -> frozenset[str]:
    """The parameter names `freeze` selects: each entry is a parameter's name
    (`conv2.w`) or a layer's prefix (`conv1` selects `conv1.w` and `conv1.b`).
    An entry that selects nothing is an error naming the parameters."""
    if isinstance(freeze, str):
        raise TypeError(f"freeze must be a list of names, got the string {freeze!r} (write [{freeze!r}])")
    names = list(params)
    chosen: set[str] = set()
    for entry in freeze or ():
        if not isinstance(entry, str):
            raise TypeError(f"freeze: expected parameter names, got {type(entry).__name__} {entry!r}")
        hits = [n for n in names if n == entry or n.startswith(entry + ".")]
        if not hits:
            raise ValueError(f"freeze: no parameter or layer {entry!r} (parameters: {', '.join(names) or 'none'})")
        chosen.update(hits)
    return frozenset(chosen)


def arena_layout(mdef: ModelDef, frozen: frozenset[str]) -> tuple[dict[str, int], int, int, int]:
    """Arena offsets in three groups: trainable matrices (rank >= 2), trainable
    vectors (biases, normalisations' scales and shifts), frozen parameters.
    The update is one pass over the first two, so it never touches a frozen
    one (not even by weight decay), and `decay_biases=False` is a second decay
    for a range. (offsets, arena size, update size, where the vectors start)."""
    shapes = {name: p.type.shape for name, p in mdef.params.items()}
    groups = ([n for n, s in shapes.items() if n not in frozen and len(s) >= 2],
              [n for n, s in shapes.items() if n not in frozen and len(s) < 2],
              [n for n in shapes if n in frozen])
    offsets, param_size = param_layout({n: shapes[n] for group in groups for n in group})
    update_size = offsets[groups[2][0]] if groups[2] else param_size
    decay_end = offsets[groups[1][0]] if groups[1] else update_size
    return offsets, param_size, update_size, decay_end


def _entry_meta(g: Graph, plan: Plan, symbol: str) -> dict:
    outputs = []
    for name in plan.output_names:
        t = g.nodes[g.outputs[name]].type
        outputs.append({"name": name, "shape": list(t.shape), "dtype": t.dtype})
    return {"symbol": symbol, "workspace": f"{symbol}_workspace",
            "inputs": plan.input_names, "outputs": outputs}


#: LLVM modules this process has optimised and code-generated (found in the cache: not counted)
MODULE_COUNT = 0
#: kernels this process took from their records (`lower/lowered.py`) or built, with the cache on;
#: `refused`: why a kernel built was not recorded (reason -> count)
KERNEL_RECORDS = {"reused": 0, "built": 0, "refused": {}}


def module_key(text: str, target: Target, jit: bool) -> str:
    """The cache key of one LLVM module's object code: its IR text (kernels
    are named after their text and read frames of their own, so the same op,
    shapes and options give the same text in any model), the compiler (its
    pipeline), llvmlite and LLVM, the target CPU and the relocation model."""
    h = hashlib.sha256()
    for part in ("module", compiler_fingerprint(), _toolchain(), target.triple, target.cpu, target.features,
                 "jit" if jit else "pic", text):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def lowered_kernels(target: Target) -> LoweredKernels:
    """Kernels' records in the disk cache by their lowering key (`lower/lowered.py`),
    salted with what their text depends on besides their group: the compiler's
    sources, users' ops as loaded, llvmlite and LLVM (the printer), the target."""
    from . import cache
    from .ops.base import extension_fingerprint
    salt = "\0".join((compiler_fingerprint(), extension_fingerprint(), _toolchain(), target.triple, target.cpu,
                       target.features))

    def load(key: str) -> dict | None:
        hit = cache.load(key, None, "lowered")
        return record_from_file(*hit) if hit is not None else None

    def store(records: dict) -> None:
        cache.store_many([(key, *record_file(record)) for key, record in records.items()], "lowered")
    return LoweredKernels(salt, load, store)


class _ModuleObjects:
    """(object, LLVM timings) of each module, in the order added: from the disk
    cache by content when `cached` (an entry that fails its check is
    recompiled, never loaded), the others compiled and stored. With more than
    one thread, a part's modules start compiling as soon as they are added,
    while Python lowers the next part (LLVM runs outside the GIL and
    llvmlite's lock): on two idle cores the forward part's LLVM work overlaps
    the training part's lowering."""

    def __init__(self, target: Target, jit: bool, threads: int | None, cached: bool, times: Timings):
        from concurrent.futures import ThreadPoolExecutor
        self.target, self.jit, self.cached, self.times = target, jit, cached, times
        threads = threads or compile_threads()
        self.pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
        self.jobs: list = []      # per module: [text, cache key, (object, timings) | future | None, cache hit]

    def add(self, texts: list[str]) -> None:
        from . import cache
        from .native import compile_cost
        added = []
        for text in texts:
            key, found = None, None
            if self.cached:
                with self.times.stage("cache.modules"):
                    key = module_key(text, self.target, self.jit)
                    hit = cache.load(key, None, "object")
                    found = (hit[1], {}) if hit is not None and hit[1] else None
            added.append([text, key, found, found is not None])
        if self.pool is not None:
            # the longest first: the threads then finish together, not waiting on a long
            # module started last (LeNet-5-BN's kernel gradient, ~0.15 s, came 17th of 27)
            for job in sorted((job for job in added if not job[3]), key=lambda job: -compile_cost(job[0])):
                job[2] = self.pool.submit(self._compile, job[0])
        self.jobs += added

    def _compile(self, text: str) -> tuple[bytes, dict]:
        return compile_objects([text], self.target, self.jit, threads=1)[0]

    def results(self) -> list[tuple[bytes, dict]]:
        global MODULE_COUNT
        from concurrent.futures import Future

        from . import cache
        serial = [job for job in self.jobs if job[2] is None]
        for job, result in zip(serial, compile_objects([job[0] for job in serial], self.target, self.jit, threads=1)):
            job[2] = result
        made = []
        for job in self.jobs:
            text, key, found, hit = job
            if hit:
                continue
            job[2] = found.result() if isinstance(found, Future) else found
            MODULE_COUNT += 1
            made.append((key, {}, job[2][0]))
        if self.cached:
            with self.times.stage("cache.modules"):     # one opening of the folder for them all
                cache.store_many(made, "object")
        return [job[2] for job in self.jobs]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


@collector_paused()
def compile_model(mdef: ModelDef, target: Target | None = None,
                  dump: Callable[[str, str], None] | None = None, jit: bool = True, freeze=(),
                  parts=None, timings: Timings | None = None, kernel_timings: bool = False,
                  module_cache: bool = False) -> Artifact:
    """`jit=False` makes position-independent code for a shared library;
    `freeze`: parameter names or layer prefixes that training leaves alone;
    `parts`: which of `PARTS` to compile (default: the `EAGER_PARTS` the model has),
    the others are listed in `meta["deferred"]` and can be compiled later with
    the same arguments; `timings` receives the seconds of each stage, and
    with `kernel_timings` LLVM's per kernel too (each kernel is then a module
    of its own, compiled one at a time: a slower compile, to read);
    `module_cache`: each kernel, helper and entry point is a module of its
    own, its object cached on disk by its text (`module_key`), so an edit
    recompiles only the kernels it changed."""
    frozen = resolve_frozen(mdef.params, freeze) | {name for name, p in mdef.params.items() if p.frozen}
    target = target or host_target()
    times = timings if timings is not None else Timings()
    # Rewrites that must precede differentiation (message passing: aggregate first).
    with times.stage("prepare"):
        forward = prepare(mdef.graph.copy(), (lambda name, gr: dump(f"graph.{name}", str(gr))) if dump else None,
                          target.vector_width)
        # a frozen batch norm layer normalises with its running statistics, and keeps them
        freeze_statistics(forward, resolve_frozen(mdef.params, freeze) | {n for n, p in mdef.params.items() if p.kept})
        if mdef.has_loss:       # means over different things: a weight per term, for data-parallel training
            weigh_loss_terms(forward)
    mdef = dataclasses.replace(mdef, graph=forward)
    offsets, param_size, update_size, decay_end = arena_layout(mdef, frozen)
    # evaluation: held-out loss and outputs in one forward call (compiled on its first use)
    available = ["forward", "training", "update", "evaluation"] if mdef.has_loss else ["forward"]
    wanted = [p for p in available if p in (EAGER_PARTS if parts is None else parts)]
    trains = "training" in wanted or "update" in wanted

    with times.stage("forward.inference"):
        graphs = {"forward": forward_graph(mdef)}
    warnings: list = []
    tables: list[str] = []      # `row_tables`, once the training graph is made

    def differentiate_once() -> list[dict]:
        """The gradient warnings every part's metadata keeps, and the training
        part's graph, from one differentiation; made once the forward part is
        lowered (unless dumping), so that LLVM starts on it sooner."""
        if warnings:
            return warnings[0]
        differentiated, found = None, []
        with times.stage("train.autodiff" if trains else "gradient_warnings"):
            if mdef.has_loss:
                differentiated, found = differentiate_checked(mdef.graph, frozen=frozen, model_span=mdef.span,
                                                              vector_width=target.vector_width)
        with times.stage("gradient_warnings"):
            warnings.append(warning_entries(found))
        if "forward" in wanted:     # once per model: not again when its training part is compiled later
            warn_gradient_flow(warnings[0])
        if trains:      # the update entry too: its tables are the training entry's
            with times.stage("train.autodiff"):
                graphs["train"] = train_graph(mdef, update_size, frozen, decay_end, differentiated)
                tables.extend(row_tables(mdef, graphs["train"], frozen))
                graphs["update"] = update_graph(mdef, update_size, decay_end, [
                    (offsets[t], *mdef.params[t].type.shape) for t in tables])
            if dump:
                dump("train", str(graphs["train"]))
        return warnings[0]
    if dump:        # the stages in their order
        differentiate_once()
    if "evaluation" in wanted:
        graphs["eval_loss"] = eval_loss_graph(mdef)
    entries, plans, texts = {}, {}, {}
    # Kernel text -> function, across entries and parts: the training part calls the
    # kernels it shares with the forward part (which exports them) instead of
    # emitting them again, so the forward part is lowered even when not compiled.
    shared = SharedKernels()
    provided: dict = {}      # the forward part's helpers (matmul micro-kernels), which it exports
    defined: set[str] = set()   # hidden functions the parts so far define (`defined_once`)
    llvm_jobs = _ModuleObjects(target, jit, 1 if kernel_timings else None, module_cache and not kernel_timings,
                               times)
    lowered = lowered_kernels(target) if module_cache and not kernel_timings else None
    try:
        for part in ["forward"] + [p for p in wanted if p != "forward"]:
            if part != "forward":
                differentiate_once()
            module = ir.Module(name=f"{mdef.name}.{part}")
            module.triple = target.triple
            module.structc_avx512 = target.vector_width == 16     # `CG.exp` scales by vscalefps
            for kind in PARTS[part]:
                g = run_pipeline(graphs[kind], _pass_timer(times, kind, dump if part in wanted else None),
                                 target.vector_width)
                with times.stage(f"{kind}.plan"):
                    plan = plan_memory(g, offsets)
                symbol = f"sc_{kind}"
                with times.stage(f"{kind}.lower"):
                    lower_entry(module, g, plan, mdef.symbols, symbol, target, shared, export=part == "forward",
                                lowered=lowered)
                if part in wanted:
                    plans[kind] = (g, plan)
                    entries[kind] = _entry_meta(g, plan, symbol)
            if part in wanted:
                with times.stage(f"{part}.ir_text"):
                    per_unit = kernel_timings or module_cache
                    chunks, least = (10 ** 6, 0) if per_unit else (compile_threads(), None)
                    texts[part] = defined_once(
                        split_module(module, chunks, least, export_helpers=per_unit or part == "forward",
                                     provided=provided, by_unit=module_cache and not kernel_timings), defined)
                llvm_jobs.add(texts[part])      # LLVM starts on them while the next part is lowered
            if part == "forward":
                provided = helpers(module)
            drop_bodies(module)     # its texts are made: its instructions go now, not in a collection at the end
        blocked = differentiate_once()
        if lowered is not None:
            _count_records(lowered)
            with times.stage("cache.lowered"):
                lowered.flush()
        with times.stage("llvm"):
            compiled = llvm_jobs.results()
    finally:
        llvm_jobs.close()
    flat = [text for part in wanted for text in texts[part]]
    objects, sizes = [], {}
    asked = {symbol: name for name, symbol in reversed(shared.symbols.items())}
    for (part, text), (obj, llvm_times) in zip([(p, t) for p in wanted for t in texts[p]], compiled):
        objects.append(obj)
        sizes.setdefault(part, []).append(len(obj))
        for stage, (seconds, cpu) in llvm_times.items():
            times.add(f"{part}.llvm.{stage}", seconds, cpu)
        if kernel_timings:       # named after the module's first function: the kernel, or the entry point
            first = re.search(r'^define [^@]*@"([^"]+)"', text, re.M).group(1)
            first = asked.get(first, first)     # the name the kernel was asked for, not its text's hash
            times.add(f"{part}.llvm.kernel {first}", *map(sum, zip(*llvm_times.values())))
    times.finish()
    llvm_ir = "\n".join(f"; ---- part {part}, module {k} ----\n{text}"
                        for part in wanted for k, text in enumerate(texts[part]))
    if dump:
        dump("plan", "\n".join(f"# {k}\n{p.describe(g)}" for k, (g, p) in plans.items()))
        dump("llvm", llvm_ir)
        from .native import assembly, optimized_ir
        dump("opt", "\n".join(optimized_ir(text, target) for text in flat))
        dump("asm", "\n".join(assembly(text, target) for text in flat))

    row_ids, row_ids_in_part, ids_as_values = row_id_uses(forward)
    meta = {
        "structc": compiler_fingerprint(),
        "abi": ABI_VERSION,
        "model": mdef.name,
        "file": mdef.file,
        "target": {"triple": target.triple, "cpu": target.cpu, "features": target.features},
        "symbols": mdef.symbols,
        "inputs": [{"name": s.name, "kind": s.kind, "dtype": s.type.dtype, "shape": list(s.type.shape),
                    "classes": s.classes} for s in mdef.inputs.values()],
        "params": [{"name": p.name, "shape": list(p.type.shape), "offset": offsets[p.name],
                    "init": [p.init[0], list(p.init[1])]} for p in mdef.params.values()],
        "param_size": param_size,
        "frozen": sorted(n for n in frozen if not mdef.params[n].buffer),
        "buffers": sorted(n for n, p in mdef.params.items() if p.buffer),   # written by the training entry
        "batch_counts": batch_counts(forward),      # `Net` refuses to train with one value per channel
        "float_arithmetic_inputs": float_arithmetic_inputs(forward),   # `Net` refuses values beyond 2**24
        "index_inputs": row_ids,                    # `Net` refuses ids outside the rows they pick from
        "index_inputs_in_part": row_ids_in_part,    # ... in the block of the input that picks them
        "index_inputs_as_values": ids_as_values,    # a graph's binder cannot renumber those
        "computed_positions": computed_positions(forward),     # nor positions computed along its nodes
        "graphs": [spec.meta() for spec in mdef.graphs.values()],
        "n_hyper": N_HYPER,
        "random": any("random" in n.op.traits for n in mdef.graph.nodes.values()),    # dropout: Net writes the step
        "entries": entries,
        "parts": wanted,
        "objects": sizes,      # part -> the sizes of its object files, in order
        "deferred": [p for p in available if p not in wanted],
        "gradient_warnings": blocked,   # re-issued when the model is loaded from the cache
        "loss_denominator": loss_denominator(forward) if mdef.has_loss else None,
        "batch_statistic": batch_statistic(forward) if mdef.has_loss else None,    # data-parallel: refused
    }
    if trains:      # data-parallel training keeps these tables' records of rows across its sum
        meta["row_tables"] = tables
    if mdef.forests:
        meta["forests"] = mdef.forests
    if mdef.sequences:
        meta["sequences"] = mdef.sequences
    return Artifact(meta, tuple(objects), llvm_ir, times, jit, tuple(flat), shared.symbols)


def _count_records(lowered: LoweredKernels) -> None:
    KERNEL_RECORDS["reused"] += lowered.hits
    KERNEL_RECORDS["built"] += lowered.misses
    for reason, count in lowered.refused.items():
        KERNEL_RECORDS["refused"][reason] = KERNEL_RECORDS["refused"].get(reason, 0) + count


def _pass_timer(times: Timings, kind: str, dump):
    """The pipeline's after-each-pass hook: times each pass (with its check of
    the graph) as the time since the previous call, and dumps the graph."""
    last = [time.perf_counter(), time.thread_time()]

    def after(name, graph):
        times.add(f"{kind}.{name}", time.perf_counter() - last[0], time.thread_time() - last[1])
        if dump:
            dump(f"{kind}.{name}", str(graph))
        last[:] = time.perf_counter(), time.thread_time()
    return after


@collector_paused()
def compile_source(source: str, file: str = "<source>", model: str | None = None,
                   target: Target | None = None, dump=None, jit: bool = True, freeze=(), parts=None,
                   kernel_timings: bool = False) -> Artifact:
    times = Timings()
    with times.stage("parse"):
        program = parse(source, file)
    return compile_program(program, model, target, dump, jit, freeze, parts, times, kernel_timings)


@collector_paused()
def compile_program(program: Program, model: str | None = None, target: Target | None = None,
                    dump=None, jit: bool = True, freeze=(), parts=None, timings: Timings | None = None,
                    kernel_timings: bool = False, module_cache: bool = False) -> Artifact:
    times = timings if timings is not None else Timings()
    if dump:
        dump("ast", format_program(program))
    with times.stage("build"):
        mdef = build_model(program, model)
    if dump:
        dump("graph", str(mdef.graph))
    art = compile_model(mdef, target, dump, jit, freeze, parts, times, kernel_timings, module_cache)
    art.meta["program"] = model_digest(program, mdef.name)
    return art


def model_digest(program: Program, name: str) -> str:
    """A digest of model `name`'s definition in its canonical form (`canonical_program`:
    comments and layout left out), kept in the metadata: a source given later for
    this model (to export it, or to resume its training) is checked against it, as
    parameters with the same names and shapes may mean other things."""
    model = next(m for m in program.models if m.name == name)
    return hashlib.sha256(canonical_program(model).encode()).hexdigest()[:16]


# Fields that hold the program's layout, not its meaning: the key ignores them.
_LAYOUT_FIELDS = {(Program, "source"), (Program, "file")}


class _Mark(str):
    """Structure text in the canonical form, as opposed to a value to quote."""


def canonical_program(program: Program) -> str:
    """The parsed program with every field but source positions, as text: a
    comment or a change of layout leaves it unchanged, any change of a name,
    number or option changes it. Walked with an explicit stack, so deep
    expressions cannot exhaust Python's recursion limit."""
    out: list[str] = []
    stack: list = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, Span):      # a field of spans (a recursion's states' names): positions too
            continue
        if isinstance(item, _Mark):
            out.append(item)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            parts: list = [_Mark(f"({type(item).__name__}")]
            for f in dataclasses.fields(item):
                value = getattr(item, f.name)
                if isinstance(value, Span) or (type(item), f.name) in _LAYOUT_FIELDS:
                    continue
                parts += [_Mark(f" {f.name}="), value]
            stack.extend(reversed(parts + [_Mark(")")]))
        elif isinstance(item, (list, tuple)):
            parts = [_Mark("[")]
            for element in item:
                parts += [element, _Mark(",")]
            stack.extend(reversed(parts + [_Mark("]")]))
        elif item is None or isinstance(item, (str, int, float)):
            out.append(f"{type(item).__name__}:{item!r}")    # 1 and 1.0 differ; strings are quoted
        else:   # a new kind of AST value: extend this walk rather than key on its repr
            raise TypeError(f"canonical_program cannot key on a {type(item).__name__}")
    return "".join(out)


def _toolchain() -> str:
    """llvmlite and LLVM versions: another LLVM may generate other code."""
    import llvmlite
    from llvmlite import binding
    return f"llvmlite {llvmlite.__version__}, LLVM {'.'.join(map(str, binding.llvm_version_info))}"


def cache_key(program: Program, model: str | None, target: Target, options: dict | None = None) -> str:
    """The cache key of `model` of `program` compiled for `target`: the
    canonical program (not its bytes), the compiler (version and sources),
    llvmlite and LLVM, the target CPU and the options (such as `jit`)."""
    return canonical_key(canonical_program(program), model, target, options)


def source_key(source: str, model: str | None, target: Target, options: dict | None = None) -> str:
    """The key of the source text itself, bytes and all: the cache keeps under
    it the canonical program the text parses to, so that a warm load need not
    build the parser (most of its time) to find the entry."""
    return canonical_key("source text\0" + source, model, target, options)


def canonical_key(canonical: str, model: str | None, target: Target, options: dict | None = None) -> str:
    """`cache_key` of a program already in its canonical form (`canonical_program`)."""
    h = hashlib.sha256()
    from .ops.base import extension_fingerprint      # users' ops: their definitions, not just their names
    for part in (compiler_fingerprint(), extension_fingerprint(), _toolchain(), canonical, model or "",
                 target.triple, target.cpu, target.features, json.dumps(options or {}, sort_keys=True)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]
