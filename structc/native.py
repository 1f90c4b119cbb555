"""LLVM IR text -> optimised machine code for the host, and the JIT that runs it.

Optimisation is the New Pass Manager for the host CPU and its features: O3,
O3 without unrolling for a module of memory-bound kernels, O1 without it for
kernels it compiles to O3's machine code, or a pass list of
its own for a module of entry points or of explicit vector code (`pipeline_of`,
by the module's mark). Machine code is kept as an object file: that is what the on-disk
cache stores, and what a later process loads without running LLVM at all.
"""
from __future__ import annotations

import ctypes
import functools
import operator
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import llvmlite.binding as llvm

from .lower.module import ENTRY_CODE, LIGHT_CODE, MEMORY_CODE, VECTOR_CODE, Target

# -- compiling and os.fork() ----------------------------------------------
# A forked child has only the thread that forked: whatever another thread held at
# that instant stays held in the child for ever (llvmlite's lock, which every call
# into LLVM takes; LLVM's own mutexes; a Net's lock on the part it compiles), so a
# child forked while another thread compiled hung at its first compile or training
# call. The fork hook (`structc.model`) waits for the compiles in flight, as it
# waits for calls on Nets (`hold_for_fork`); a child forked past that bounded wait
# refuses to compile instead of hanging.


class _InFlight:
    """The compiles (and other LLVM work) running in this process."""

    def __init__(self):
        self.lock = threading.Lock()        # taken as it is where an interrupt must not split the count
        self.changed = threading.Condition(self.lock)
        self.running = 0                    # `compiling()` regions, outermost ones, on every thread
        self.depth = threading.local()      # this thread's nesting of them (`n`)
        self.held = threading.local()       # what the forking thread holds over the fork
        self.refusal: str | None = None     # in a child forked mid-compile: why it may not compile


_IN_FLIGHT = _InFlight()


@contextmanager
def compiling():
    """A compile, or any other use of LLVM (also as a decorator): a fork waits
    for it to end. Refused in a child forked while one ran on another thread
    past the fork's wait: what that thread held may be held there for ever."""
    f = _IN_FLIGHT
    depth = getattr(f.depth, "n", 0)
    counted = False
    try:
        if depth == 0:
            with f.lock:
                if f.refusal is not None:
                    raise RuntimeError(f.refusal)
                f.running += 1
                counted = True
        f.depth.n = depth + 1
        yield
    finally:
        f.depth.n = depth
        if counted:
            with f.lock:
                f.running -= 1
                f.changed.notify_all()


def hold_for_fork(timeout: float) -> None:
    """Before `os.fork()`: wait up to `timeout` seconds for the compiles on other
    threads to end, then hold what a compile takes (this count's lock and
    llvmlite's) over the fork, so that the child gets LLVM between calls.
    `release_after_fork` lets go, in the parent and in the child."""
    f = _IN_FLIGHT
    deadline = time.monotonic() + timeout
    mine = 1 if getattr(f.depth, "n", 0) else 0     # forking from within a compile: wait for the others
    f.held.locks, f.held.settled, f.held.timeout = [], False, timeout
    f.changed.acquire()
    f.held.locks.append(f.changed)
    settled = f.changed.wait_for(lambda: f.running <= mine, timeout)
    lock = _llvmlite_lock()         # an LLVM call outside a compile (an engine freed on another thread)
    if lock is not None:
        if lock.acquire(True, max(0.0, deadline - time.monotonic())):
            f.held.locks.append(lock)
        else:
            settled = False
    f.held.settled = settled


def release_after_fork(child: bool) -> None:
    """After `os.fork()`: let go of what `hold_for_fork` held. In a child forked
    while a compile was still running on another thread, compiling is refused."""
    f = _IN_FLIGHT
    locks, settled, timeout = getattr(f.held, "locks", []), getattr(f.held, "settled", True), \
        getattr(f.held, "timeout", 0.0)
    f.held.locks = []
    if child:
        f.running = 1 if getattr(f.depth, "n", 0) else 0      # the other threads' compiles are not here
        if not settled:
            f.refusal = (f"this process was forked while another thread was compiling a model (or using LLVM) "
                         f"and still was {timeout:g} s later (structc.model.FORK_WAIT): what that thread "
                         "held stays held in this process, so compiling here would wait for it for ever. "
                         "Compile before forking (a training='background' compile is done once a training call "
                         "has returned), or start processes with multiprocessing's 'spawn' or 'forkserver' method")
    for lock in reversed(locks):
        lock.release()


def _llvmlite_lock():
    """The lock llvmlite takes around every call into LLVM (behind
    `_UnlessOwnContext` once that is installed); None if llvmlite has no such lock."""
    from llvmlite.binding import ffi
    lock = getattr(getattr(getattr(ffi, "lib", None), "_lock", None), "_lock", None)
    if isinstance(lock, _UnlessOwnContext):
        lock = lock.lock
    return lock if hasattr(lock, "acquire") and hasattr(lock, "release") else None


@functools.lru_cache(maxsize=1)
def _init() -> None:
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    _register_runtime()


@compiling()
def host_target() -> Target:
    _init()
    return Target(llvm.get_process_triple(), llvm.get_host_cpu_name(),
                  llvm.get_host_cpu_features().flatten())


_V2 = ["sse3", "ssse3", "sse4.1", "sse4.2", "popcnt", "cx16", "sahf"]
_V3 = _V2 + ["avx", "avx2", "bmi", "bmi2", "f16c", "fma", "lzcnt", "movbe", "xsave"]
_V4 = _V3 + ["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"]
NAMED_TARGETS = {"generic": ("x86-64", []), "x86-64-v2": ("x86-64-v2", _V2),
                 "x86-64-v3": ("x86-64-v3", _V3), "x86-64-v4": ("x86-64-v4", _V4)}


@compiling()
def named_target(name: str | None) -> Target:
    """`native` (or None): this machine; `generic`, `x86-64-v2/v3/v4`: those
    feature levels, for modules that must run on other machines."""
    if name in (None, "native", "host"):
        return host_target()
    if name not in NAMED_TARGETS:
        raise ValueError(f"unknown target CPU '{name}' (choose native, {', '.join(NAMED_TARGETS)})")
    _init()
    cpu, feats = NAMED_TARGETS[name]
    return Target(llvm.get_process_triple(), cpu, ",".join(f"+{f}" for f in feats))


@compiling()
def missing_features(target: Target) -> list[str]:
    """CPU features `target` requires that this machine lacks."""
    _init()
    have = {f[1:] for f in llvm.get_host_cpu_features().flatten().split(",") if f.startswith("+")}
    need = {f[1:] for f in target.features.split(",") if f.startswith("+")}
    return sorted(need - have)


@functools.lru_cache(maxsize=8)
def target_machine(target: Target, jit: bool = True, opt: int = 3):
    return new_target_machine(target, jit, opt)


@compiling()
def new_target_machine(target: Target, jit: bool = True, opt: int = 3):
    _init()
    t = llvm.Target.from_triple(target.triple)
    return t.create_target_machine(cpu=target.cpu, features=target.features, opt=opt,
                                   reloc="pic" if not jit else "default",
                                   codemodel="jitdefault" if jit else "small")


def pipeline_of(ir_text: str) -> str:
    """Which pipeline a module gets, by the mark on its first line: `entry`
    (`ENTRY_CODE`: `ENTRY_PIPELINE`, code generation at `ENTRY_CODEGEN_LEVEL`),
    `memory` (`MEMORY_CODE`: O3 with `MEMORY_TUNING`), `light` (`LIGHT_CODE`:
    `LIGHT_TUNING`), `short` (`VECTOR_CODE`: `SHORT_PIPELINE`) or `O3` (every
    other module)."""
    if ir_text.startswith(ENTRY_CODE):
        return "entry"
    if ir_text.startswith(MEMORY_CODE):
        return "memory"
    if ir_text.startswith(LIGHT_CODE):
        return "light"
    return "short" if ir_text.startswith(VECTOR_CODE) else "O3"


#: LLVM's CPU time per character of IR text, by pipeline (`pipeline_of`), roughly as
#: measured on the example models' modules (microseconds): what `compile_cost` weighs
COST_PER_CHAR = {"O3": 2.0, "memory": 2.0, "light": 0.4, "short": 0.6, "entry": 0.25}


def compile_cost(ir_text: str) -> float:
    """An estimate of a module's LLVM time (its text's length by its pipeline's cost
    per character), to start the longest modules first when they compile in parallel."""
    return len(ir_text) * COST_PER_CHAR[pipeline_of(ir_text)]


def codegen_level(ir_text: str) -> int:
    return ENTRY_CODEGEN_LEVEL if pipeline_of(ir_text) == "entry" else 3


@compiling()
def optimize(ir_text: str, target: Target, jit: bool = True, tm=None, context=None):
    """Parse, verify and run the module's pipeline (`pipeline_of`); returns
    (module, target machine). Threads compiling at once each pass their own
    `tm` and `context` (LLVM's contexts and target machines are not shared
    between threads)."""
    _init()
    mod = llvm.parse_assembly(ir_text, context)
    mod.triple = target.triple
    tm = tm or target_machine(target, jit, codegen_level(ir_text))
    mod.data_layout = str(tm.target_data)
    mod.verify()
    pipeline = pipeline_of(ir_text)
    tuning = {"memory": MEMORY_TUNING, "light": LIGHT_TUNING}.get(pipeline, {})
    pto = llvm.create_pipeline_tuning_options(speed_level=tuning.get("speed_level", 3))
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    for option, value in tuning.items():
        if option != "speed_level":
            setattr(pto, option, value)
    pb = llvm.create_pass_builder(tm, pto)
    if pipeline in ("O3", "memory", "light"):
        pb.getModulePassManager().run(mod, pb)
    else:
        (_short_pipeline() if pipeline == "short" else _pass_list(ENTRY_PIPELINE)).run(mod, pb)
    return mod, tm


#: the passes explicit vector code needs (`lower.module.VECTOR_CODE`: the matmul
#: micro-kernels): registers for the accumulators (SROA), folding, CSE and the
#: clean-up. O3's loop passes (unrolling, vectorisers, unswitching) leave their
#: k loop as it was at 2-3x the time (LeNet-5: 20-35 ms of LLVM per micro-kernel
#: against 12-20); loop-invariant code is hoisted by code generation's own LICM.
SHORT_PIPELINE = ("sroa", "instruction_combine", "simplify_cfg", "new_gvn", "instruction_combine",
                  "simplify_cfg", "dead_store_elimination", "aggressive_dce")


#: the passes of entry points (`lower.module.ENTRY_CODE`): code run once per
#: call that fills the kernels' frame and calls them, with no loops to speak
#: of. On the GAT example's entries (~110 kB of IR) O3 took ~60 ms and code
#: generation at level 3 ~100; simplifycfg (one block: fewer values for the
#: fast register allocator to spill) takes ~6, and code generation at level 0
#: (the fast instruction selector and register allocator) ~12, the calls as
#: fast (the entry is a few hundred instructions a step).
ENTRY_PIPELINE = ("simplify_cfg",)
#: code generation's optimisation level for entry points
ENTRY_CODEGEN_LEVEL = 0
#: the pipeline of memory-bound kernels (`lower.module.MEMORY_CODE`): O3 without
#: unrolling and interleaving (PipelineTuningOptions)
MEMORY_TUNING = {"speed_level": 3, "loop_unrolling": False, "loop_interleaving": False}
#: the pipeline of `lower.module.LIGHT_CODE` (`LIGHT_KINDS`: convolutions, softmax,
#: cross-entropy): O1 without unrolling and interleaving, the same machine code as O3
LIGHT_TUNING = {"speed_level": 1, "loop_unrolling": False, "loop_interleaving": False}


def _pass_list(names):
    mpm = llvm.create_new_module_pass_manager()
    for name in names:
        getattr(mpm, f"add_{name}_pass")()
    return mpm


def _short_pipeline():
    return _pass_list(SHORT_PIPELINE)


def compile_object(ir_text: str, target: Target, jit: bool = True) -> bytes:
    return compile_object_timed(ir_text, target, jit)[0]


@compiling()
def compile_object_timed(ir_text: str, target: Target, jit: bool = True) -> tuple[bytes, dict]:
    """The object code and the (wall, CPU) seconds spent optimising and generating it.
    Safe to call from several threads at once: each call has its own LLVM
    context and target machine, and runs past llvmlite's global lock
    (`_own_context`), so the calls of several threads run in parallel."""
    _init()
    with _own_context():
        t0, c0 = time.perf_counter(), time.thread_time()
        context = llvm.create_context()
        mod, tm = optimize(ir_text, target, jit, new_target_machine(target, jit, codegen_level(ir_text)), context)
        t1, c1 = time.perf_counter(), time.thread_time()
        obj = tm.emit_object(mod)
        del mod, tm       # disposed here, before their context
    return obj, {"opt": (t1 - t0, c1 - c0), "codegen": (time.perf_counter() - t1, time.thread_time() - c1)}


def compile_threads() -> int:
    """Threads LLVM may use for one model: the cores this process may run on
    (`$STRUCTC_COMPILE_THREADS` overrides; 1 compiles every module in turn)."""
    env = os.environ.get("STRUCTC_COMPILE_THREADS")
    if env:
        if not (env.isascii() and env.isdigit()) or int(env) < 1:     # "²" is a digit to isdigit, not to int
            raise ValueError(f"STRUCTC_COMPILE_THREADS must be a positive integer, got {env!r}")
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def compile_objects(texts: list[str], target: Target, jit: bool = True,
                    threads: int | None = None) -> list[tuple[bytes, dict]]:
    """`compile_object_timed` of each module, on `threads` (default `compile_threads()`) threads."""
    threads = min(len(texts), threads or compile_threads())
    if threads <= 1:
        return [compile_object_timed(text, target, jit) for text in texts]
    _init()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda text: compile_object_timed(text, target, jit), texts))


# -- compiling in parallel ------------------------------------------------
# llvmlite wraps every call into LLVM in one process-wide lock, because LLVM
# objects (contexts, modules, target machines) must not be used by two threads
# at once. A thread that creates and uses only objects of its own (a context,
# the module parsed into it, a target machine) shares none of them, which is
# how LLVM itself compiles in parallel; such a thread goes past the lock.
_OWN = threading.local()


class _UnlessOwnContext:
    """Stands in for llvmlite's lock: taken by every thread but one compiling in its own context."""

    def __init__(self, lock):
        self.lock = lock

    def acquire(self, *args, **kwargs):
        return True if getattr(_OWN, "active", False) else self.lock.acquire(*args, **kwargs)

    def release(self):
        if not getattr(_OWN, "active", False):
            self.lock.release()


@functools.lru_cache(maxsize=1)
def _install_lock() -> bool:
    """Whether llvmlite's lock is the one this module knows how to stand in for
    (otherwise every call keeps taking it: correct, just serial)."""
    from llvmlite.binding import ffi
    outer = getattr(getattr(ffi, "lib", None), "_lock", None)
    inner = getattr(outer, "_lock", None)
    if inner is None or not (hasattr(inner, "acquire") and hasattr(inner, "release")):
        return False
    outer._lock = _UnlessOwnContext(inner)
    return True


@contextmanager
def _own_context():
    if not _install_lock():
        yield
        return
    _OWN.active = True
    try:
        yield
    finally:
        _OWN.active = False


def assembly(ir_text: str, target: Target) -> str:
    mod, tm = optimize(ir_text, target)
    return tm.emit_assembly(mod)


def optimized_ir(ir_text: str, target: Target) -> str:
    mod, _ = optimize(ir_text, target)
    return str(mod)


class JitModule:
    """Machine code loaded into this process; addresses by symbol name."""

    @compiling()
    def __init__(self, obj: bytes | tuple[bytes, ...], target: Target):
        """`obj`: an object file, or several (an `Artifact`'s parts)."""
        # The engine owns (and frees) its target machine: never hand it a shared one.
        tm = new_target_machine(target)
        self.engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), tm)
        self.add(obj)

    @compiling()
    def add(self, obj: bytes | tuple[bytes, ...]) -> None:
        """Load more object files into this engine: they may call functions of
        those loaded before (a training part calls the forward part's kernels)."""
        for one in (obj,) if isinstance(obj, bytes) else obj:
            self.engine.add_object_file(llvm.ObjectFileRef.from_data(one))
        self.engine.finalize_object()

    @compiling()
    def address(self, name: str) -> int:
        addr = self.engine.get_function_address(name)
        if not addr:
            raise RuntimeError(f"symbol {name} missing from compiled module")
        return addr


# -- the runtime ---------------------------------------------------------

RUNTIME_SYMBOLS = ("sc_parallel_for", "sc_set_num_threads", "sc_get_num_threads", "sc_entry_begin", "sc_entry_end",
                   "sc_row_tasks", "sc_forest_parts", "sc_scratch", "sc_rows_record",
                   "sc_rows_find")


@functools.lru_cache(maxsize=1)
def runtime_library() -> ctypes.CDLL:
    """The runtime, its thread count set: `STRUCTC_NUM_THREADS` (junk refused
    here, before anything reads the count), else every core. Set from Python
    before any other use, so that the runtime never reads the variable itself."""
    from . import _runtime
    lib = ctypes.CDLL(_runtime.__file__)
    lib.sc_set_num_threads.argtypes = [ctypes.c_int]
    lib.sc_set_num_threads.restype = ctypes.c_int
    lib.sc_get_num_threads.restype = ctypes.c_int
    threads = environment_threads()
    if threads is not None:
        lib.sc_set_num_threads(min(threads, _C_INT_MAX))
    else:
        lib.sc_set_num_threads(lib.sc_get_num_threads())    # every core, fixed now
    return lib


def environment_threads() -> int | None:
    """`STRUCTC_NUM_THREADS` as a count (None when unset or empty): decimal
    digits, at least 1; anything else is refused naming the variable. The
    runtime reads it alike (`environment_threads` in runtime/structc_rt.c) in a
    library shipped to C, where nothing sets the count before."""
    env = os.environ.get("STRUCTC_NUM_THREADS")
    if not env:
        return None
    if not (env.isascii() and env.isdigit()) or int(env) < 1:
        raise ValueError(f"STRUCTC_NUM_THREADS must be a positive integer, got {env!r}")
    return int(env)


def _register_runtime() -> None:
    lib = runtime_library()
    for name in RUNTIME_SYMBOLS:
        llvm.add_symbol(name, ctypes.cast(getattr(lib, name), ctypes.c_void_p).value)


_C_INT_MAX = 2 ** 31 - 1


def set_num_threads(n: int) -> int:
    """Threads the compiled kernels may use (the calling thread included); the
    runtime caps the count at its MAX_THREADS and returns the count it set.
    `n`: an int, or an integer of another type (numpy's: anything `operator.index`
    takes), not a bool or a float."""
    try:
        count = None if isinstance(n, bool) else operator.index(n)
    except TypeError:
        count = None
    if count is None:
        raise TypeError(f"the number of threads must be an integer, got {n!r} ({type(n).__name__})")
    if count < 1:
        raise ValueError(f"the number of threads must be a positive integer, got {n!r}")
    n = min(count, _C_INT_MAX)      # ctypes keeps a bigger int's low 32 bits (2**32: 0, so one thread)
    from .ship import propagate_num_threads
    propagate_num_threads(n)
    return runtime_library().sc_set_num_threads(n)


def get_num_threads() -> int:
    return runtime_library().sc_get_num_threads()
