"""Where a step's time goes: every kernel of a model, timed, by `.snet` line.

    report = profile(net, {"x": x, "y": y}, steps=100)     # net from profiled_net()
    print(report.table()); report.write_trace("out.json")

Compiled code runs each kernel through the runtime's `sc_parallel_for`. A
profiled copy of the model is loaded while that symbol resolves to the
runtime's timing shim (`runtime/sc_profile.c`), so the machine code timed is
the code that runs, and no C compiler is needed. The shim records every call
(on the calling thread) and every chunk of tasks (on the thread that ran it):
calls give the table, chunks the trace's lanes. Which kernel came from which
fused group, hence which source lines, is noted while the copy is lowered.
Kernels run from inside another (each level of a recursion over trees) are
listed, marked, and counted once, in the kernel that runs them.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import _runtime
from .lower.codegen import vector_registers
from .ops.conv import pair, quad

#: one record of the shim (`sc_prof_event` in runtime/sc_profile.c)
EVENT = np.dtype([("fn", "<i8"), ("start", "<i8"), ("end", "<i8"), ("lo", "<i8"), ("hi", "<i8"),
                  ("lane", "<i4"), ("kind", "<i4"), ("depth", "<i4"), ("pad", "<i4")])
CALL, CHUNK = 0, 1
#: the trace keeps the events of this many steps (a long run would make a file too big to open)
TRACE_STEPS = 20
#: room for the events of the first step recorded (more is made if it does not fit)
PROBE_EVENTS = 1 << 16
#: entries of the buffer each thread takes at a time (`SC_PROF_BLOCK` in runtime/sc_profile.c)
BLOCK = 64
#: a profiled step this much slower than the same step unprofiled is pointed out under the table
OVERHEAD_NOTED = 1.05
_LOAD_LOCK = threading.Lock()     # the shim's symbol is process-wide while a copy loads
_RECORD_LOCK = threading.Lock()   # and so is its event buffer


@dataclass
class Kernel:
    """What the compiler knows of one kernel function."""
    name: str
    op: str                                  # the op of its group's anchor
    spans: list = field(default_factory=list)   # its group's source spans, the anchor's first
    flops: tuple | None = None               # factors (ints, symbols) of its flops per call
    #: the op of a gate math the kernel runs after its product (`fuse`, rule 7): its
    #: GFLOP/s count the product's flops over a time that includes that math
    gate: str | None = None
    #: the flops of the other layers this kernel is (one text, sizes read at run time)
    shared_flops: list = field(default_factory=list)

    @property
    def line(self) -> int | None:
        return self.spans[0].line if self.spans else None

    def flop_count(self, dims: dict) -> int | None:
        """Flops per call; None if unknown, or if the layers sharing the kernel
        differ in them (which call is whose is not recorded)."""
        counts = {_count(f, dims) for f in [self.flops, *self.shared_flops]}
        return counts.pop() if len(counts) == 1 else None


def _count(flops: tuple | None, dims: dict) -> int | None:
    if flops is None:
        return None
    total = 1
    for f in flops:
        f = dims.get(f) if isinstance(f, str) else f
        if not isinstance(f, int):
            return None      # a symbol bound inside the kernel (a recursion's rows)
        total *= f
    return total


# -- flop counts of the kernels the compiler knows the shapes of ---------------------------

def _matmul_flops(graph, node):
    a = graph.nodes[node.inputs[0]].shape
    k = a[0] if node.attrs.get("ta") else a[1]
    return (2, node.shape[0], node.shape[1], k)


def _matmul_parts_flops(graph, node):
    parts, m, n = node.shape
    return (2, m, n, graph.nodes[node.inputs[0]].shape[0])     # every part's k adds up to K


def _matmul_pair_flops(graph, node):
    w = graph.nodes[node.inputs[2]].shape
    k = w[1] if node.attrs.get("packed") else w[0]      # the rows of W: both operands' K
    return (2, node.shape[0], node.shape[1], k)


def _conv_flops(graph, node):
    w = graph.nodes[node.inputs[1]].shape               # [out, in, kh, kw]
    dilation = pair(node.attrs.get("input_dilation", 1))
    if dilation == (1, 1):
        return (2, *node.shape, *w[1:])                 # out: [N, out, oh, ow]
    # a strided convolution's input gradient: its kernel taps on the dilation's holes are
    # not work (the kernel skips them), those on input are the forward convolution's count
    x = graph.nodes[node.inputs[0]].shape
    pads = quad(node.attrs.get("padding", 0))
    taps = [_taps_on_input(x[2 + a], node.shape[2 + a], w[2 + a], pair(node.attrs.get("stride", 1))[a],
                           pads[2 * a], dilation[a]) for a in (0, 1)]
    return (2, *node.shape[:2], w[1], *taps)


def _taps_on_input(n: int, out: int, k: int, stride: int, pad: int, dilation: int) -> int:
    """The (output, kernel tap) pairs along one axis that read one of the n input
    elements dilated by `dilation` (not padding, not a hole between them)."""
    return sum(1 for o in range(out) for t in range(k)
               if 0 <= o * stride + t - pad <= (n - 1) * dilation and (o * stride + t - pad) % dilation == 0)


def _conv_kernel_grad_flops(graph, node):
    g = graph.nodes[node.inputs[1]].shape               # the delta [N, out, oh, ow]
    return (2, *g, *node.shape[1:])                     # out: [out, in, kh, kw]


def _conv_kernel_grad_parts_flops(graph, node):
    g = graph.nodes[node.inputs[1]].shape               # the delta [N, out, oh, ow], over all the parts
    return (2, *g, *node.shape[2:])                     # out: [parts, out, in, kh, kw]


FLOPS = {"matmul": _matmul_flops, "matmul_parts": _matmul_parts_flops, "matmul_pair": _matmul_pair_flops,
         "conv2d": _conv_flops,
         "conv2d_kernel_grad": _conv_kernel_grad_flops, "conv2d_kernel_grad_parts": _conv_kernel_grad_parts_flops}


# -- the copy of the model that runs through the shim --------------------------------------

@functools.lru_cache(maxsize=1)
def _shim() -> ctypes.CDLL:
    from .native import runtime_library
    lib = runtime_library()
    lib.sc_prof_start.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.sc_prof_stop.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    lib.sc_prof_stop.restype = ctypes.c_int64
    lib.sc_prof_now_ns.restype = ctypes.c_int64
    return lib


@contextlib.contextmanager
def _noting_kernels(kernels: dict[str, Kernel], tasks: dict[str, str] | None = None):
    """While lowering, note each kernel function's group, and in `tasks` the
    functions a recursion's kernel hands to the pool (a level's rows, a group
    of trees: `treemap._named_by_text`) with a name for them. The lowering has
    no hook for this, so its `lower_group`, `KernelBuilder.kernel` and that
    naming are wrapped for the duration (under _LOAD_LOCK: one profiled compile
    at a time)."""
    from .lower import module as lowering
    from .lower import treemap
    real_group, real_kernel, real_named = lowering.lower_group, lowering.KernelBuilder.kernel, treemap._named_by_text
    defined: list[str] = []
    mine = threading.get_ident()        # another thread compiling meanwhile is not noted

    def kernel(self, name, tasks, cost=1, **options):
        if threading.get_ident() == mine:
            defined.append(f"{self.prefix}_{name}")
        return real_kernel(self, name, tasks, cost, **options)

    def named(module, fn, what="level"):
        kernel = fn.name.removesuffix(f"_{what}")      # `_task_function` names it after its kernel
        named_fn = real_named(module, fn, what)
        if tasks is not None and threading.get_ident() == mine:
            # two kernels with the same task text share one function: the first one's name
            part = {"level": "a level's rows", "forest": "a group of trees"}.get(what, what)
            tasks.setdefault(named_fn.name, f"{kernel}: {part}")
        return named_fn

    def lower_group(kb, graph, group):
        start = len(defined)
        real_group(kb, graph, group)
        if threading.get_ident() != mine:
            return
        anchor = graph.nodes[group.anchor]
        members = [group.anchor] + [m for m in group.members if m != group.anchor]
        spans = []
        for m in members:
            span = graph.nodes[m].span
            if span is not None and all(s.line != span.line for s in spans):
                spans.append(span)
        count = FLOPS.get(anchor.op.name)
        for k, name in enumerate(defined[start:]):
            if name.startswith(f"{kb.prefix}_") and name not in kernels:
                # the first kernel of a matmul or convolution group is its loop nest
                flops = count(graph, anchor) if count and k == 0 else None
                gate = graph.nodes[group.gate].op.name if group.gate is not None else None
                kernels[name] = Kernel(name, anchor.op.name, spans, flops, gate if k == 0 else None)

    lowering.lower_group, lowering.KernelBuilder.kernel, treemap._named_by_text = lower_group, kernel, named
    try:
        yield
    finally:
        lowering.lower_group, lowering.KernelBuilder.kernel, treemap._named_by_text = \
            real_group, real_kernel, real_named


def profiled_net(source: str, file: str = "<source>", model: str | None = None, freeze=(), seed: int = 0):
    """A fresh `Net` of `model` whose kernels run through the timing shim
    (never from the cache: lowering it is how its kernels are named);
    `freeze` as `structc.compile` takes it."""
    import llvmlite.binding as llvm

    from .compiler import compile_program
    from .model import Net
    from .native import JitModule, _init, host_target, runtime_library
    from .syntax import parse
    program = parse(source, file)
    target = host_target()
    _init()
    kernels: dict[str, Kernel] = {}
    tasks: dict[str, str] = {}
    real = ctypes.cast(runtime_library().sc_parallel_for, ctypes.c_void_p).value
    with _LOAD_LOCK:
        with _noting_kernels(kernels, tasks):
            art = compile_program(program, model, target, freeze=freeze)
        # MCJIT resolves symbols as it loads: only this copy is bound to the shim.
        llvm.add_symbol("sc_parallel_for", ctypes.cast(_shim().sc_prof_parallel_for, ctypes.c_void_p).value)
        try:
            module = JitModule(art.object, target)
        finally:
            llvm.add_symbol("sc_parallel_for", real)
    net = Net(art.meta, module, seed=seed)

    def address(symbol: str) -> int:
        """The loaded function's address; 0 if the object lacks it (a body shared with another entry point)"""
        try:
            return module.engine.get_function_address(symbol)
        except Exception:  # noqa: BLE001
            return 0

    by_address = {}
    for name, kernel in kernels.items():
        addr = address(art.kernel_symbols.get(name, name))   # kernels are named after their text
        if addr:    # a kernel several layers share (same text): the first layer's name, every layer's line
            first = by_address.setdefault(addr, kernel)
            if first is not kernel:
                first.spans.extend(s for s in kernel.spans if all(s.line != t.line for t in first.spans))
                first.shared_flops.append(kernel.flops)
    net._profile_kernels = by_address
    # a recursion's task functions: their time is their kernel's, and the kernels they run
    # have rows of their own, so the table leaves them out; a trace names them
    net._profile_tasks = {addr: name for addr, name in ((address(sym), name) for sym, name in tasks.items()) if addr}
    net._profile_source = source
    return net


def profile_copy(net, seed: int = 0):
    """A profiled copy of `net` (compiled by `structc.compile`) with its
    parameters, optimizer, frozen parameters and vocabulary: profiling trains
    the copy, never `net`."""
    origin = getattr(net, "_compiled_from", None)
    if origin is None:
        raise ValueError(f"{net.name}: only a model compiled by structc.compile in this process can be "
                         f"profiled (its source is needed); compile it from its .snet file")
    copy = profiled_net(*origin, seed=seed)
    with net._lock:
        for name, value in net.params.items():
            copy.params[name][...] = value
        copy._state_arena[...] = net._state_arena
        copy.optimizer, copy._opt, copy._step = net.optimizer, dict(net._opt), net._step
    if net.vocab is not None:
        copy.vocab = net.vocab
    return copy


# -- the peak ------------------------------------------------------------------------------

def peak_chains(vw: int) -> int:
    """Independent FMA chains for the peak: enough to hide the FMA's latency at
    two a cycle, few enough to stay in registers (24 of AVX-512's 32; 12 of
    AVX2's 16: 24 there spill, and measured a Zen 1 at 29 GFLOP/s against 42)."""
    return vector_registers(vw) * 3 // 4


def peak_module(target, chains: int) -> str:
    """LLVM IR of `peak(iters)`: `chains` independent chains of vector FMAs, `iters` times."""
    from llvmlite import ir
    vw = target.vector_width
    f32, i64 = ir.FloatType(), ir.IntType(64)
    vt = ir.VectorType(f32, vw)
    mod = ir.Module("peak")
    mod.triple = target.triple
    fma = ir.Function(mod, ir.FunctionType(vt, [vt, vt, vt]), f"llvm.fma.v{vw}f32")
    fn = ir.Function(mod, ir.FunctionType(f32, [i64]), "peak")
    entry, loop, done = (fn.append_basic_block(n) for n in ("entry", "loop", "done"))
    b = ir.IRBuilder(entry)
    mul = ir.Constant(vt, [ir.Constant(f32, 0.999999)] * vw)
    add = ir.Constant(vt, [ir.Constant(f32, 1e-7)] * vw)
    b.branch(loop)
    b.position_at_end(loop)
    i = b.phi(i64)
    i.add_incoming(ir.Constant(i64, 0), entry)
    accs = []
    for k in range(chains):
        phi = b.phi(vt)
        phi.add_incoming(ir.Constant(vt, [ir.Constant(f32, k * 0.01)] * vw), entry)
        accs.append(phi)
    new = [b.call(fma, [a, mul, add]) for a in accs]
    for phi, v in zip(accs, new):
        phi.add_incoming(v, loop)
    nxt = b.add(i, ir.Constant(i64, 1))
    i.add_incoming(nxt, loop)
    b.cbranch(b.icmp_signed("<", nxt, fn.args[0]), loop, done)
    b.position_at_end(done)
    total = new[0]
    for v in new[1:]:
        total = b.fadd(total, v)
    b.ret(b.extract_element(total, ir.Constant(ir.IntType(32), 0)))
    return str(mod)


@functools.lru_cache(maxsize=4)
def fma_peak(iters: int = 2_000_000, tries: int = 10) -> float:
    """GFLOP/s of one core running independent chains of vector FMAs
    (`peak_chains`; as benchmarks/bench_conv.py measures it): the most a kernel could reach."""
    import llvmlite.binding as llvm

    from .native import host_target, new_target_machine, optimize
    target = host_target()
    chains = peak_chains(target.vector_width)
    m, _ = optimize(peak_module(target, chains), target)
    # the engine frees its target machine: never hand it optimize's shared one
    engine = llvm.create_mcjit_compiler(m, new_target_machine(target))
    engine.finalize_object()
    call = ctypes.CFUNCTYPE(ctypes.c_float, ctypes.c_int64)(engine.get_function_address("peak"))
    best = float("inf")
    for _ in range(tries):   # the best of several: another process may take the core for a while
        t = time.perf_counter()
        call(iters)
        best = min(best, time.perf_counter() - t)
    return iters * chains * target.vector_width * 2 / best / 1e9


# -- running and recording -----------------------------------------------------------------

@dataclass
class Row:
    kernel: Kernel
    seconds: float          # per step
    calls: float            # per step
    tasks: int              # of its last call
    nested: bool
    gflops: float | None
    threads: int            # threads that ran some of its tasks

    def percent_of(self, peak: float) -> float:
        """GFLOP/s as a percentage of the peak of the cores that ran the kernel."""
        return 100 * self.gflops / (peak * self.threads) if self.gflops else 0.0


@dataclass
class Report:
    model: str
    kind: str               # "train" or "forward"
    steps: int
    threads: int
    step_seconds: float
    peak: float             # GFLOP/s of one core
    rows: list[Row]
    source_lines: list[str]
    events: np.ndarray      # the recorded events of the traced steps
    step_spans: list        # (start, end) ns of each traced step
    caller_lane: int
    unprofiled_seconds: float | None = None    # the same step timed with nothing recorded
    backed_off: float = 0.0     # share of the pool's jobs the caller ran alone while the pool backed off

    @property
    def kernel_seconds(self) -> float:
        return sum(r.seconds for r in self.rows if not r.nested)

    @property
    def outside_seconds(self) -> float:
        """Python, input checks: the step's time spent in no kernel."""
        return max(self.step_seconds - self.kernel_seconds, 0.0)

    def share(self, seconds: float) -> float:
        return 100 * seconds / self.step_seconds if self.step_seconds > 0 else 0.0

    def by_line(self) -> list[tuple[int | None, list[Row]]]:
        """The rows under the source line of their group's anchor, lines in order."""
        lines: dict[int | None, list[Row]] = {}
        for r in sorted(self.rows, key=lambda r: -r.seconds):
            lines.setdefault(r.kernel.line, []).append(r)
        return sorted(lines.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))

    def table(self) -> str:
        plain = f" ({self.unprofiled_seconds * 1e6:.1f} unprofiled)" if self.unprofiled_seconds else ""
        out = [f"{self.model} {self.kind} step: {self.steps} steps at {self.threads} thread(s), "
               f"{self.step_seconds * 1e6:.1f} us per step{plain}; peak {self.peak:.1f} GFLOP/s per core "
               f"(%peak: of the threads that ran the kernel)", "",
               f"{'line / kernel':54s} {'us/step':>9s} {'share':>6s} {'calls':>6s} {'tasks':>6s} "
               f"{'thr':>3s} {'GFLOP/s':>8s} {'%peak':>6s}"]
        for line, rows in self.by_line():
            text = self.source_lines[line - 1].strip() if line and line <= len(self.source_lines) else ""
            head = f"{line:4d}  {text}" if line else "   -  (no source line: the optimizer update, copies)"
            out.append(head[:100])
            for r in rows:
                name = ("(inside) " if r.nested else "") + r.kernel.name
                if r.kernel.gate:
                    name += f" + {r.kernel.gate}"
                others = [s.line for s in r.kernel.spans[1:]]
                if others:
                    name += f" (+ line{'s' if len(others) > 1 else ''} {','.join(map(str, others))})"
                rate = f"{r.gflops:8.2f} {r.percent_of(self.peak):5.1f}%" if r.gflops else ""
                out.append(f"      {name:48s} {r.seconds * 1e6:9.1f} {self.share(r.seconds):5.1f}% "
                           f"{r.calls:6.0f} {r.tasks:6d} {r.threads:3d} {rate}".rstrip())
        out.append(f"{'      outside kernels (Python, input checks)':54s} {self.outside_seconds * 1e6:9.1f} "
                   f"{self.share(self.outside_seconds):5.1f}%")
        if self.unprofiled_seconds and self.step_seconds > OVERHEAD_NOTED * self.unprofiled_seconds:
            out.append(f"\nprofiled, the step ran {100 * (self.step_seconds / self.unprofiled_seconds - 1):.0f}% "
                       "slower than unprofiled: every chunk of tasks is timed and recorded (more of them with "
                       "several threads; a busy machine moves both figures), and the kernels' times include it")
        if self.threads > 1 and self.backed_off > 0:
            out.append(f"\nthe pool backed off for {100 * self.backed_off:.0f}% of its jobs: after a stall or a "
                       "preemption (a busy machine) it runs them on the calling thread for a while, so those "
                       "steps timed one thread; STRUCTC_BACKOFF=0 measures the threads regardless")
        if any(r.percent_of(self.peak) > 100 for r in self.rows):
            out.append("\nabove 100% of peak: the peak was measured while the machine was busy; give it (--peak)")
        if any(r.nested for r in self.rows):
            out.append("\n(inside): run by another kernel (a recursion's levels); its time is part of that kernel's"
                       + ("; with several threads, the sum of their times (its share can pass the wall time's)"
                          if any(r.nested and r.threads > 1 for r in self.rows) else ""))
        return "\n".join(out)

    def trace(self) -> dict:
        """The traced steps in the Chrome trace event format (chrome://tracing, ui.perfetto.dev):
        one lane (tid) per thread, the calling thread first; steps, kernel calls and chunks as
        complete ("X") events, times in microseconds."""
        names = {**self._tasks, **{addr: k.name for addr, k in self._kernels.items()}}
        lanes = {self.caller_lane: 0}
        for lane in self.events["lane"]:
            lanes.setdefault(int(lane), len(lanes))
        t0 = self.step_spans[0][0] if self.step_spans else 0
        events = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid,
                   "args": {"name": "caller" if tid == 0 else f"worker {tid}"}} for tid in lanes.values()]
        for k, (a, b) in enumerate(self.step_spans):
            events.append({"name": f"{self.kind} step {k}", "cat": "step", "ph": "X", "ts": (a - t0) / 1e3,
                           "dur": (b - a) / 1e3, "pid": 1, "tid": 0})
        for e in self.events:
            name = names.get(int(e["fn"]), hex(int(e["fn"])))
            chunk = e["kind"] == CHUNK
            events.append({"name": name, "cat": "chunk" if chunk else "kernel", "ph": "X",
                           "ts": (int(e["start"]) - t0) / 1e3, "dur": (int(e["end"]) - int(e["start"])) / 1e3,
                           "pid": 1, "tid": lanes[int(e["lane"])],
                           "args": {"tasks": [int(e["lo"]), int(e["hi"])]} if chunk else {"tasks": int(e["hi"])}})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def write_trace(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.trace()))
        return path


def _forward_inputs(net, inputs: dict) -> dict:
    """The inputs the forward pass takes (a training batch also carries targets)."""
    names = net.meta["entries"]["forward"]["inputs"]
    return {k: v for k, v in inputs.items() if any(n == k or n.startswith(k + ".") for n in names)}


def _checked(net, inputs: dict, steps, forward: bool, peak) -> tuple[dict, dict]:
    """The inputs of the step and its dims, or a ValueError/TypeError for a bad argument."""
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if peak is not None and (isinstance(peak, bool) or not isinstance(peak, (int, float))
                             or not np.isfinite(peak) or peak <= 0):
        raise ValueError(f"peak must be a positive number of GFLOP/s, got {peak!r}")
    if not forward and net._entries.get("train") is None:      # compiles the training part if it was deferred
        raise ValueError(f"model {net.name} declares no loss, so it has no training step to profile; "
                         f"profile its forward pass (--forward, forward=True)")
    given = _forward_inputs(net, inputs) if forward else dict(inputs)
    _, dims = net._bind(net._entries["forward" if forward else "train"], given)
    return given, dims


def profile_model(net, inputs: dict, *, steps: int | None = None, forward: bool = False, lr: float = 0.01,
                  peak: float | None = None) -> Report:
    """`net.profile`: the arguments checked on `net`, then a profiled copy timed."""
    _checked(net, inputs, steps, forward, peak)     # before the copy is compiled
    return profile(profile_copy(net), inputs, steps=steps, forward=forward, lr=lr, peak=peak)


def _record(step, steps: int, capacity: int):
    """Run `steps` steps recording; returns (events, step spans in ns, events lost).
    One recording at a time: the shim has one buffer."""
    shim = _shim()
    buffer = np.zeros(capacity, EVENT)
    spans = []
    lost = ctypes.c_int64(0)
    with _RECORD_LOCK:
        shim.sc_prof_start(buffer.ctypes.data, capacity)
        try:
            for _ in range(steps):
                a = shim.sc_prof_now_ns()
                step()
                spans.append((a, shim.sc_prof_now_ns()))
        finally:
            n = shim.sc_prof_stop(ctypes.byref(lost))
    events = buffer[:n]
    return events[events["fn"] != 0], spans, lost.value      # not the rest of each thread's last block


def _slack(threads: int) -> int:
    """Entries a recording may leave unwritten: the rest of each thread's last
    block (every thread of the pool, and one more)."""
    return (threads + 1) * BLOCK


def _unprofiled_seconds(step, steps: int, blocks: int = 3) -> float:
    """Seconds per step with nothing recorded (the shim passes each call straight
    on): what the step costs without the profiler's clock reads. The middle of
    `blocks` blocks of `steps` steps."""
    per_step = []
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        per_step.append((time.perf_counter() - t) / steps)
    return sorted(per_step)[blocks // 2]


def _events_bound(probe: np.ndarray, threads: int) -> int:
    """At most how many events a step like `probe` makes: a call, and a chunk per
    claim. The runtime cuts n tasks into one share of m = ceil(n / threads) per
    thread, and every claim from a share (its owner's, a quarter of what is
    left; a thief's, half) leaves at most 3/4 of it: at most log_{4/3} m + 2
    claims a share, and never more than a task each."""
    n = probe[probe["kind"] == CALL]["hi"].astype(np.float64)
    share = np.maximum(np.ceil(n / threads), 1.0)
    claims = threads * (np.floor(np.log(share) / np.log(4 / 3)) + 2)
    return int(np.minimum(n, claims).sum()) + len(n) + 64


def profile(net, inputs: dict, *, steps: int | None = None, forward: bool = False, lr: float = 0.01,
            peak: float | None = None, warmup: int = 3) -> Report:
    """Time every kernel of `net`'s training step (or forward pass) on `inputs`.
    `net` comes from `profiled_net` or `profile_copy`; `steps` defaults to
    about a second's worth; `peak` (GFLOP/s of one core) is measured if not given."""
    from .native import get_num_threads
    by_address = getattr(net, "_profile_kernels", None)
    if by_address is None:
        raise ValueError("profile() needs a net from structc.profile.profiled_net or profile_copy "
                         "(use net.profile(...) on a compiled model)")
    given, dims = _checked(net, inputs, steps, forward, peak)
    kind = "forward" if forward else "train"
    if forward:
        def step():
            net.forward(**given)
    else:
        def step():
            net.train_step(lr=lr, **given)
    for _ in range(warmup):
        step()
    threads = get_num_threads()
    probe, spans, lost = _record(step, 1, PROBE_EVENTS)      # one step sizes the buffer
    while lost:
        probe, spans, lost = _record(step, 1, 2 * (len(probe) + lost) + _slack(threads))
    if steps is None:
        steps = max(5, min(2000, int(1.0 / max((spans[0][1] - spans[0][0]) / 1e9, 1e-6))))
    capacity = _events_bound(probe, threads) * steps + _slack(threads)
    jobs_before, alone_before = _runtime.handoffs(), _runtime.backoff_jobs()
    events, spans, lost = _record(step, steps, capacity)
    if lost:
        raise RuntimeError(f"the profiler lost {lost} of {capacity + lost} events: steps differ from the first "
                           f"in the kernels they run; profile fewer steps")
    step_seconds = sum(b - a for a, b in spans) / steps / 1e9
    unprofiled = _unprofiled_seconds(step, max(2, steps // 12))     # a quarter of the steps again
    jobs, alone = _runtime.handoffs() - jobs_before, _runtime.backoff_jobs() - alone_before
    tasks = getattr(net, "_profile_tasks", {})
    rows = _rows(events, by_address, dims, steps, tasks)
    traced_end = spans[min(steps, TRACE_STEPS) - 1][1]
    outer = events[(events["kind"] == CALL) & (events["depth"] == 0)]
    caller = int(outer["lane"][-1]) if len(outer) else 0
    report = Report(net.name, kind, steps, threads, step_seconds, peak or fma_peak(), rows,
                    net._profile_source.splitlines(), events[events["start"] <= traced_end],
                    spans[:TRACE_STEPS], caller, unprofiled, alone / jobs if jobs else 0.0)
    report._kernels = by_address
    report._tasks = tasks
    return report


def _rows(events: np.ndarray, by_address: dict, dims: dict, steps: int, tasks: dict) -> list[Row]:
    """A row per kernel; none for a recursion's task functions (`tasks`)."""
    calls = events[events["kind"] == CALL]
    chunks = events[events["kind"] == CHUNK]
    rows = []
    # a kernel run both inside another and on its own (one text: a recursion's layer and a
    # top-level one of the same sizes) has a row for each, so that its nested calls, part
    # of the time of the kernel that runs them, are not counted in the step's sum again
    for fn, nested in sorted({(int(f), bool(d > 0)) for f, d in zip(calls["fn"], calls["depth"])}):
        if fn in tasks:
            continue
        mine = calls[(calls["fn"] == fn) & ((calls["depth"] > 0) == nested)]
        if not (mine["hi"] > 0).any():
            continue             # a kernel with no tasks for these shapes (an empty contraction's)
        kernel = by_address.get(fn) or Kernel(hex(fn), "?")
        seconds = float((mine["end"] - mine["start"]).sum()) / 1e9
        flops = kernel.flop_count(dims)
        gflops = flops * len(mine) / seconds / 1e9 if flops and seconds > 0 else None
        theirs = chunks[chunks["fn"] == fn]
        if len(mine) < (calls["fn"] == fn).sum():      # run both ways: the chunks within these calls
            theirs = theirs[_within(theirs["start"], mine["start"], mine["end"])]
        lanes = len(np.unique(theirs["lane"]))
        rows.append(Row(kernel, seconds / steps, len(mine) / steps, int(mine["hi"][-1]),
                        nested, gflops, max(lanes, 1)))
    return rows


def _within(times: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Which of `times` fall in one of the spans [starts, ends] (a chunk's depth does not
    tell: a worker that takes a nested call's tasks runs them at its own depth)."""
    order = np.argsort(starts, kind="stable")
    starts, reach = starts[order], np.maximum.accumulate(ends[order])
    at = np.searchsorted(starts, times, side="right") - 1
    return (at >= 0) & (times <= reach[np.maximum(at, 0)])
