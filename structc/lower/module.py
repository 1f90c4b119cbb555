"""Lower planned graphs into one LLVM module with a C entry point per graph.

Every entry point has the same C signature:

    int32_t f(float *params, float *grads, float *state, void *workspace,
              void **inputs, void **outputs, const int64_t *dims,
              const float *hyper, int64_t mode);

and a companion `int64_t f_workspace(const int64_t *dims)` giving the bytes
of workspace a call needs for those dims (-1 when that overflows int64). The entry point lays out a
*frame* (buffer pointers, dims, hyper-parameters) on its stack and runs the
groups' kernels in order; each kernel is a function `void k(frame, lo, hi)`
over a range of its tasks, called directly or through the runtime's
`sc_parallel_for`, which splits the range across threads.
"""
from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass

from llvmlite import ir

from ..graph import Graph
from ..passes.plan import ALIGN, Plan
from .codegen import CG, I32, I64, NO_UNROLL, PTR, VOID, LocalSlots
from . import irtext
from .fused import MAX_REDUCTION_TASKS, FusedExpr, emit_elementwise_kernel
from .lowered import (RECORD_VERSION, LoweredKernels, NotCacheable, callees, close_group, kernel_key,
                      make_function, open_group, parse_type, slot_names, slot_of)

#: what `*_workspace` returns when the size for the given dims overflows int64
WORKSPACE_OVERFLOW = -1
#: the cost of a kernel that calls other entry points (a recursion's levels):
#: its entry never runs as a whole on the caller; the inner entries decide for themselves
NESTED_WORK = 1 << 40
KERNEL_TYPE = ir.FunctionType(VOID, [PTR, I64, I64])
ENTRY_ARGS = [PTR, PTR, PTR, PTR, PTR, PTR, PTR, PTR, I64]
ARENAS = ("params", "grads", "state")


@dataclass(frozen=True)
class Target:
    triple: str
    cpu: str
    features: str

    @property
    def vector_width(self) -> int:
        feats = set(self.features.split(","))
        if "+avx512f" in feats:
            return 16
        if "+avx2" in feats or "+avx" in feats:
            return 8
        return 4


class FrameLayout:
    """Slot numbers in an entry point's frame (8 bytes each).

    Dims, arenas and hyper-parameters come first; a buffer's slot is a fixed
    offset plus its node id. Graphs derived from one model share node ids, so
    a kernel that the forward and the training entry points both need is the
    same function, emitted once."""

    def __init__(self, plan: Plan, symbols: list[str], reductions: list[int] = ()):
        self.plan = plan
        self.dims = {s: k for k, s in enumerate(symbols)}
        base = len(symbols)
        self.arenas = {a: base + k for k, a in enumerate(ARENAS)}
        self.hyper_slot = base + len(ARENAS)
        self.mode_slot = self.hyper_slot + 1
        first = self.mode_slot + 1
        self.buffers = {nid: first + nid for nid in plan.storage}
        after = first + max(plan.storage, default=0) + 1
        # where each fused reduction keeps its per-task partial sums
        self.partials = {nid: after + k for k, nid in enumerate(sorted(reductions))}
        self.size = after + len(self.partials)

    def buffer_slot(self, nid: int) -> int:
        root = self.plan.root(nid)
        if root not in self.buffers:
            raise KeyError(f"%{nid} has no storage (is it fused away?)")
        return self.buffers[root]

    def dim_slot(self, name: str) -> int:
        return self.dims[name]


class KernelBuilder:
    """What an op's `lower` gets: the graph, the target, and `kernel()`."""

    def __init__(self, module: ir.Module, graph: Graph, layout: FrameLayout, entry: CG,
                 target: Target, prefix: str, shared: dict, export: bool = False,
                 lowered: LoweredKernels | None = None):
        self.module = module
        self.graph = graph
        self.layout = layout
        self.entry = entry
        self.target = target
        self.vector_width = target.vector_width
        self.prefix = prefix
        self.shared = shared        # kernel body text -> function, across entry points
        self.export = export        # kernels visible to other modules of the model (hidden), not internal
        self._names: set[str] = set()
        self.work = entry.i64(0)    # sum of the kernels' tasks x cost, computed in the entry block
        self.lowered = lowered      # kernels lowered before, by their lowering key (`lowered.py`)
        self._scope = None          # the group being lowered with `lowered`
        self._last_body = None      # the text of the kernel `_named_by_content` last named, as keyed in `shared`

    def _here(self, fn: ir.Function) -> ir.Function:
        """`fn`, or when another module defines it (and exports it: the forward
        part's kernels), its declaration in this one."""
        if fn.module is self.module:
            return fn
        declared = self.module.globals.get(fn.name)
        if declared is None:
            declared = ir.Function(self.module, KERNEL_TYPE, name=fn.name)
            declared.linkage = "hidden"
        return declared

    def after_kernel(self, action) -> None:
        """Run `action(entry_cg)` in the entry function once the last kernel returned."""
        action(self.entry)

    @contextmanager
    def kernel(self, name: str, tasks, cost=1, vector_code: bool = False, skippable: bool = False):
        """Define `void name(frame, lo, hi)`; the body handles tasks [lo, hi).
        `tasks` and `cost` (work per task, for the threading decision) are ints
        or functions of the entry point's CG.

        The kernel reads a frame of its own (`LocalSlots`: the entry's slots it
        uses, copied by the entry) and is named after its text
        (`sc_<hash>_<op>`), so a kernel is the same function wherever the same
        op, shapes and options occur: emitted once per model (repeated layers,
        the forward and training parts) and cached by content across models
        and edits. `shared.symbols` maps the name asked for to that symbol.
        `vector_code`: the body is explicit vector code already, so it gets the
        short LLVM pipeline (`VECTOR_CODE`), not O3's loop passes.

        With `lowered` (the module cache on), a kernel whose lowering key has a
        record is not built again (`lowered.py`): its recorded text stands in.
        `skippable`: the caller's body starts with `if cg is None: return` and
        the `with` is the last thing its function does, so the body is not even
        run then; other bodies run (and their function is dropped), which
        still saves naming and printing it."""
        full = f"{self.prefix}_{name}"
        assert full not in self._names, full
        self._names.add(full)
        scope, key, found = self._scope, None, None
        if scope is not None:
            key = kernel_key(self.lowered.salt, scope.spec, scope.ordinal, _stem(name), vector_code)
            scope.ordinal += 1
            found = self._usable(self.lowered.load(key))
            self.lowered.hits += found is not None
            self.lowered.misses += found is None
        if found is not None and skippable:
            scope.skipped = True
            yield None, None, None
            fn, used = self._from_record(found[0], name), found[1]
        else:
            fn = ir.Function(self.module, KERNEL_TYPE, name=full)
            fn.linkage = "hidden" if self.export else "internal"
            cg = CG(self.module, fn, scope.layout if scope is not None else self.layout, frame=fn.args[0])
            cg.slots = LocalSlots()
            yield cg, fn.args[1], fn.args[2]
            if found is not None:       # the helpers it made must be the record's too
                found = self._usable(found[0])
            if found is not None:       # built all the same: the record's text stands in for it
                del self.module.globals[full]
                fn, used = self._from_record(found[0], name), found[1]
            else:
                cg.b.ret_void()
                cg.finish()
                fn = self._named_by_content(fn, full, name)
                used = [(index, at, t) for index, (at, t) in cg.slots.used.items()]
                if key is not None:
                    self._record(key, full, vector_code, used)
        if vector_code:
            fn.structc_vector_code = True
        if isinstance(self.shared, SharedKernels):
            self.shared.symbols[full] = fn.name

        e = self.entry
        frame = e.eb.alloca(ir.ArrayType(I64, max(1, len(used))))
        frame.type = PTR     # slots hold pointers and integers alike
        for index, at, t in used:
            e.eb.store(e.slot(index, t), e.eb.gep(frame, [ir.Constant(I64, at)], source_etype=I64))
        n = tasks(e) if callable(tasks) else e.i64(tasks)
        c = cost(e) if callable(cost) else e.i64(cost)
        par = e.declare("sc_parallel_for", VOID, [PTR, PTR, I64, I64])
        e.b.call(par, [fn, frame, n, c])
        self._count_work(tasks, cost)

    def _count_work(self, tasks, cost) -> None:
        """Add this kernel's tasks x cost to `work`, in the entry block (before
        any kernel runs). Every kernel call of an entry is unconditional, so
        this computes nothing the body would not. Each term is clamped to 2^40
        so that the sum cannot wrap."""
        setup = CG.__new__(CG)
        setup.__dict__.update(self.entry.__dict__)
        setup.b = self.entry.eb
        n = tasks(setup) if callable(tasks) else setup.i64(tasks)
        c = cost(setup) if callable(cost) else setup.i64(cost)
        cap = setup.i64(1 << 31)
        term = setup.imin(setup.imul(setup.imin(n, cap), setup.imin(c, cap)), setup.i64(1 << 40))
        self.work = setup.iadd(self.work, term)

    def _named_by_content(self, fn: ir.Function, full: str, name: str) -> ir.Function:
        """`fn` renamed after its text, or the function of the same text already
        here (or exported by another module of the model: declared here)."""
        text = function_text(fn)
        body = text.replace(f'"{full}"', '"@kernel"', 1).replace("define hidden ", "define internal ", 1)
        symbol = _symbol(body, name)
        named = text.replace(f'"{full}"', f'"{symbol}"', 1)
        self._last_body = body if self._text(body, symbol) == named else None    # what a record may keep
        existing = self._existing(symbol, body)
        del self.module.globals[full]
        if existing is not None:
            return existing
        fn._name = self.module.scope.register(symbol)
        # llvmlite caches a value's reference and text once printed (function_text did)
        fn.__dict__.pop("_StringReferenceCaching__cached_refstr", None)
        fn._clear_string_cache()
        fn.structc_text = named     # printing is half of lowering's time
        self.module.globals[symbol] = fn
        self.shared.setdefault(body, fn)
        return fn

    def _existing(self, symbol: str, body: str) -> ir.Function | None:
        """The kernel of this text already in this module, or exported by another (declared here)."""
        existing = self.module.globals.get(symbol)
        found = self.shared.get(body)
        if existing is None and found is not None and found.module is not self.module and found.linkage == "hidden":
            existing = self._here(found)
        return existing

    # -- kernels lowered before (`lowered.py`) ------------------------------
    def _text(self, body: str, symbol: str) -> str:
        """A kernel's text from its body (as `_named_by_content` keeps it: named
        `@kernel`, internal), named `symbol`, with this builder's linkage."""
        text = body.replace('"@kernel"', f'"{symbol}"', 1)
        return text.replace("define internal ", "define hidden ", 1) if self.export else text

    def _record(self, key: str, full: str, vector_code: bool, used) -> None:
        """Note the kernel just built, to store under `key` if its group read nothing outside its spec."""
        body = self._last_body
        names = slot_names(self.layout, self._scope)
        try:
            if body is None:
                raise NotCacheable("a kernel text not remade from its body")
            if full in body or f"{self.prefix}_" in body:
                raise NotCacheable("a kernel whose text names its entry")
            if any(index not in names for index, _, _ in used):
                raise NotCacheable("a frame slot outside the spec")
            record = {"version": RECORD_VERSION, "body": body, "vector_code": vector_code,
                      "slots": [[names[index], at, str(t)] for index, at, t in used],
                      "callees": callees(body, self.module, self._helper_text)}
        except NotCacheable as e:
            self.lowered.refuse(str(e))
            return
        self._scope.pending.append((key, record))

    def _usable(self, record) -> tuple[dict, list] | None:
        """(record, the entry slots it reads) when it fits this module: the
        functions it calls absent or the same here, its slots in this frame."""
        if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
            return None
        try:
            for callee, _, declaration, definition, _ in record["callees"]:
                have = self.module.globals.get(callee)
                if have is None:
                    continue
                if not isinstance(have, ir.Function):
                    return None
                if (self._helper_text(have) != definition) if have.blocks else (str(have) != declaration):
                    return None
            used = [(slot_of(self.layout, self._scope, slot), at, parse_type(t)) for slot, at, t in record["slots"]]
        except (KeyError, IndexError, TypeError, ValueError, NotCacheable):
            return None
        return record, used

    def _helper_text(self, fn: ir.Function) -> str:
        """`function_text(fn)`, printed once per module (helpers are complete when made)."""
        texts = self.module.__dict__.setdefault("structc_helper_texts", {})
        if fn.name not in texts:
            texts[fn.name] = function_text(fn)
        return texts[fn.name]

    def _from_record(self, record: dict, name: str) -> ir.Function:
        """The recorded kernel in this module: its callees made where absent (a
        helper as a function carrying its text), then the kernel itself."""
        for callee, ftype, _, definition, vector_code in record["callees"]:
            if callee in self.module.globals:
                continue
            fn = make_function(self.module, callee, ftype)
            if definition is not None:
                fn.linkage = "internal"
                fn.append_basic_block()     # defined: `split_module` reads `structc_text`, never these blocks
                fn.structc_text = definition
                if vector_code:
                    fn.structc_vector_code = True
        body = record["body"]
        symbol = _symbol(body, name)
        existing = self._existing(symbol, body)
        if existing is not None:
            return existing
        fn = ir.Function(self.module, KERNEL_TYPE, name=symbol)
        fn.linkage = "hidden" if self.export else "internal"
        fn.append_basic_block()
        fn.structc_text = self._text(body, symbol)
        self.shared.setdefault(body, fn)
        return fn


def _stem(name: str) -> str:
    """A kernel's name without its node id (`matmul12_k0` -> `matmul_k0`)."""
    return re.sub(r"[0-9]+", "", name, count=1)


def _symbol(body: str, name: str) -> str:
    return f"sc_{hashlib.sha256(body.encode()).hexdigest()[:16]}_{_stem(name)}"


class SharedKernels(dict):
    """Kernel text -> function, across the entry points and parts of a model;
    `symbols`: each kernel's name as asked for (`<entry>_<name>`) -> its symbol."""

    def __init__(self):
        super().__init__()
        self.symbols: dict[str, str] = {}


class _Wrapping:
    """Plain int64 arithmetic: the entry point's offsets, computed only for
    dims the size function has accepted."""

    def __init__(self, cg: CG):
        self.cg = cg

    def mul(self, a, b):
        return self.cg.imul(a, b)

    def add(self, a, b):
        return self.cg.iadd(a, b)


class _Checked:
    """int64 arithmetic through llvm's *.with.overflow intrinsics; `overflow`
    (an i1) is set once any step wrapped."""

    def __init__(self, cg: CG):
        self.cg = cg
        self.overflow = ir.Constant(ir.IntType(1), 0)

    def _op(self, name, a, b):
        a, b = (self.cg.i64(v) if isinstance(v, int) else v for v in (a, b))
        full = f"llvm.{name}.with.overflow.i64"
        fn = self.cg.module.globals.get(full) or ir.Function(
            self.cg.module, ir.FunctionType(ir.LiteralStructType([I64, ir.IntType(1)]), [I64, I64]), name=full)
        pair = self.cg.b.call(fn, [a, b])
        self.overflow = self.cg.b.or_(self.overflow, self.cg.b.extract_value(pair, 1))
        return self.cg.b.extract_value(pair, 0)

    def mul(self, a, b):
        return self._op("smul", a, b)

    def add(self, a, b):
        return self._op("sadd", a, b)


def _slot_offsets(cg: CG, plan: Plan, arith=None):
    """Byte offset of each workspace slot and the total, for this call's dims."""
    arith = arith or _Wrapping(cg)
    offsets, at = [], cg.i64(0)
    for sizes in plan.slots:
        offsets.append(at)
        biggest = None
        for s in sizes:
            n = cg.i64(s.coef)
            for sym in s.symbols:
                n = arith.mul(n, cg.dim(sym))
            biggest = n if biggest is None else cg.b.select(cg.b.icmp_signed(">", n, biggest), n, biggest)
        rounded = cg.b.sdiv(arith.add(biggest, ALIGN - 1), cg.i64(ALIGN))      # whole 64-byte lines
        at = arith.add(at, arith.mul(rounded, ALIGN * 4))
    return offsets, at


def lower_entry(module: ir.Module, graph: Graph, plan: Plan, symbols: list[str],
                name: str, target: Target, shared: dict, export: bool = False,
                lowered: LoweredKernels | None = None) -> None:
    """`shared`: kernel text -> function, across entry points (and modules: a
    kernel found there in another module is declared and called, not emitted
    again); `export`: make this entry's kernels visible to the model's other
    modules (hidden) rather than internal."""
    reductions = [r for gr in graph.groups for r in gr.reductions]
    layout = FrameLayout(plan, symbols, reductions)
    fn = ir.Function(module, ir.FunctionType(I32, ENTRY_ARGS), name=name)
    params, grads, state, workspace, inputs, outputs, dims, hyper, mode = fn.args
    cg = CG(module, fn, layout)
    eb = cg.eb
    frame = eb.alloca(ir.ArrayType(I64, layout.size))
    frame.type = PTR     # slots hold pointers and integers alike
    cg.frame = frame

    def put(slot: int, value) -> None:
        eb.store(value, eb.gep(frame, [ir.Constant(I64, slot)], source_etype=I64))

    for k, sym in enumerate(symbols):
        put(layout.dims[sym], eb.load(eb.gep(dims, [ir.Constant(I64, k)], source_etype=I64), typ=I64))
    for arena, value in zip(ARENAS, (params, grads, state)):
        put(layout.arenas[arena], value)
    put(layout.hyper_slot, hyper)
    put(layout.mode_slot, mode)
    for r, slot in layout.partials.items():
        put(slot, eb.alloca(ir.ArrayType(ir.FloatType(), MAX_REDUCTION_TASKS)))

    # Dims are in the frame now; the slot offsets read them from there.
    setup = CG.__new__(CG)
    setup.__dict__.update(cg.__dict__)
    setup.b = eb
    offsets, _ = _slot_offsets(setup, plan)
    for nid, slot in layout.buffers.items():
        st = plan.storage[nid]
        if st.kind in ("input", "output"):
            table = inputs if st.kind == "input" else outputs
            ptr = eb.load(eb.gep(table, [ir.Constant(I64, st.index)], source_etype=PTR), typ=PTR)
        elif st.kind in ("param", "grad"):
            base = params if st.kind == "param" else grads
            ptr = eb.gep(base, [ir.Constant(I64, st.index * 4)], source_etype=ir.IntType(8))
        else:
            ptr = eb.gep(workspace, [offsets[st.index]], source_etype=ir.IntType(8))
        put(slot, ptr)

    kb = KernelBuilder(module, graph, layout, cg, target, name, shared, export, lowered)
    for group in graph.groups:
        lower_group(kb, graph, group)
    # A small entry (its kernels' work summed) runs every kernel on the caller.
    begin = cg.declare("sc_entry_begin", I32, [I64])
    end = cg.declare("sc_entry_end", VOID, [I32])
    outer = cg.eb.call(begin, [kb.work])         # last in the entry block: before any kernel
    cg.b.call(end, [outer])
    cg.b.ret(ir.Constant(I32, 0))
    cg.finish()

    # The workspace size for given dims, or WORKSPACE_OVERFLOW when it does
    # not fit int64: the caller refuses the call then, before the entry runs.
    wfn = ir.Function(module, ir.FunctionType(I64, [PTR]), name=f"{name}_workspace")
    wcg = CG(module, wfn, _DimsFromArray(symbols), frame=wfn.args[0])
    checked = _Checked(wcg)
    _, total = _slot_offsets(wcg, plan, checked)
    wcg.b.ret(wcg.b.select(checked.overflow, wcg.i64(WORKSPACE_OVERFLOW), total))
    wcg.finish()


class _DimsFromArray:
    """Layout for `*_workspace`, whose frame is just the dims array."""

    def __init__(self, symbols):
        self.dims = {s: k for k, s in enumerate(symbols)}

    def dim_slot(self, name):
        return self.dims[name]


def lower_group(kb: KernelBuilder, graph: Graph, group) -> None:
    """Lower one group; with `kb.lowered`, the op sees the graph and the builder
    through views that note reads outside the group's spec (`lowered.py`)."""
    scope = open_group(kb, graph, group, kb.layout) if kb.lowered is not None else None
    kb._scope = scope
    try:
        if scope is not None:
            kb, graph = scope.builder, scope.graph
        anchor = graph.nodes[group.anchor]
        if group.kind == "elementwise":
            emit_elementwise_kernel(kb, graph, group)
        elif group.kind == "epilogue":
            anchor.op.lower(kb, anchor, FusedExpr(graph, group, coalesce=False))
        else:
            anchor.op.lower(kb, anchor, None)
    finally:
        if scope is not None:
            kb._kb._scope = None
    if scope is not None:
        close_group(kb._kb.lowered, scope)


# -- several modules from one, to compile in parallel -----------------------

_REFERENCE = re.compile(r'@"([^"]+)"')
#: first line of a module whose every function is explicit vector code (the matmul
#: micro-kernels: `fn.structc_vector_code`); `native.optimize` gives it a short pipeline
VECTOR_CODE = "; structc: vector code\n"
#: below this much IR text a part stays one module (each module costs a parse and a target machine)
SPLIT_MIN_CHARS = 150_000
#: `split_module(by_unit=True)`: a kernel or helper of less IR text joins the entry points' module
UNIT_MIN_CHARS = 10_000


def split_module(module: ir.Module, chunks: int, min_chars: int | None = None, *,
                 export_helpers: bool = False, provided: dict | None = None, by_unit: bool = False) -> list[str]:
    """The module as the LLVM IR text of up to `chunks` modules that, compiled
    separately and loaded (or linked) together, are the same program, so that
    LLVM can work on them in parallel. The units are the functions an entry
    point calls (kernels) and the entry points; a kernel another chunk calls is
    exported (hidden: never visible outside the model), and a helper that
    kernels call directly (the matmul micro-kernels) is copied into each chunk
    that calls it, so its name stays private to that chunk. A module of less
    than `min_chars` (default `SPLIT_MIN_CHARS`) of text stays one chunk.

    Across parts: `export_helpers` places each helper in one chunk and exports
    it (the forward part, whose helpers the training part may call);
    `provided` (name -> text of another part's exported helpers, `helpers()`)
    drops the helpers defined there with the same text and calls those.

    `by_unit` (to cache each module's object by its text): every kernel or
    helper of at least `UNIT_MIN_CHARS` is a module of its own; the entry
    points, which change with any edit, and the small units are one module
    (a module costs LLVM some 5 ms however small it is). `chunks` and
    `min_chars` are then ignored.

    Exported helpers that are explicit vector code (`fn.structc_vector_code`:
    the matmul micro-kernels) are modules of their own in either mode, marked
    `VECTOR_CODE`, for the short LLVM pipeline (`native.SHORT_PIPELINE`)."""
    defined = [f for f in module.functions if f.blocks]
    by_name = {f.name: f for f in defined}
    texts = {f.name: function_text(f) for f in defined}
    min_chars = SPLIT_MIN_CHARS if min_chars is None else min_chars
    assert not module.get_identified_types() and all(isinstance(g, ir.Function) for g in module.globals.values())
    outside = {name: text for name, text in (provided or {}).items() if texts.get(name) == text}
    for name in outside:
        del texts[name]
    if sum(map(len, texts.values())) < min_chars:
        chunks = 1
    calls = {name: set(_REFERENCE.findall(text)) - {name} for name, text in texts.items()}
    entries = [f.name for f in defined if f.linkage not in ("internal", "hidden") and f.name in texts]
    kernels = sorted({c for e in entries for c in calls[e] if c in texts})
    units = entries + [k for k in kernels if k not in entries]
    helpers = [name for name in texts if name not in units]
    if export_helpers:      # but a helper of the same name as another part's, with another text, stays private
        clashing = [name for name in helpers if name in (provided or {})]
        units, helpers = units + [h for h in helpers if h not in clashing], clashing

    def closure(name):      # the helpers a unit needs, copied into its chunk
        seen, todo = set(), [name]
        while todo:
            for callee in calls[todo.pop()]:
                if callee in helpers and callee not in seen:
                    seen.add(callee)
                    todo.append(callee)
        return seen
    def vector_code(name):
        return getattr(by_name[name], "structc_vector_code", False)
    if by_unit:     # small micro-kernels together: a module of vector code (the short pipeline)
        small = [n for n in units if n in entries or len(texts[n]) < UNIT_MIN_CHARS]
        small_vector = [n for n in small if vector_code(n) and n not in entries]
        small = [n for n in small if n not in small_vector]
        grouped = set(small + small_vector)
        groups = [small] + [[n] for n in units if n not in grouped] + [small_vector]
        bins = [[0, names, set().union(*map(closure, names))] for names in groups]
    else:   # longest first, each to the lightest chunk: the chunks come out about even
        # exported micro-kernels in a module of their own, which gets the short pipeline
        vector = [n for n in units if vector_code(n)]
        units = [n for n in units if n not in vector]
        bins = [[0, [], set()] for _ in range(max(1, min(chunks, len(units))))]
        for name in sorted(units, key=lambda n: -len(texts[n])):
            lightest = min(bins, key=lambda b: b[0])
            need = closure(name) - lightest[2]
            lightest[0] += len(texts[name]) + sum(len(texts[h]) for h in need)
            lightest[1].append(name)
            lightest[2] |= need
        if vector:      # one module, or one each when every unit is a chunk (`--kernel-timings`)
            apart = chunks >= len(units) + len(vector)
            bins += [[0, names, set().union(*map(closure, names))] for names in ([[n] for n in vector] if apart
                                                                                 else [vector])]
            units += vector
    home = {name: k for k, b in enumerate(bins) for name in b[1]}
    exported = {n for n in units if n not in entries and
                (export_helpers or any(n in calls[c] and home[c] != home[n] for c in units))}
    declared = {f.name: str(f) for f in module.functions if not f.blocks}
    out = []
    for _, names, needed in bins:
        if not names:
            continue
        mine = set(names) | needed
        # only what the chunk calls: its text (its cache key) then depends on nothing else
        used = {c for n in mine for c in calls[n]}
        text = [f'target triple = "{module.triple}"', *(d for name, d in declared.items() if name in used)]
        for other in sorted({c for n in mine for c in calls[n] if c not in mine and (c in texts or c in outside)}):
            text.append(_prototype(texts.get(other) or outside[other]))
        for name in names:
            body = texts[name]
            text.append(_exported(body) if name in exported else body)
        text += [texts[h] for h in sorted(needed)]
        mark = VECTOR_CODE if all(vector_code(n) for n in mine) else ""
        out.append(mark + _with_loop_ids("\n".join(text)))
    return out


_LOOP_REF = re.compile(r"!llvm\.loop !\d+")
_LOOP_MARK = "!llvm.loop !no_unroll"


def function_text(fn: ir.Function) -> str:
    """A function's LLVM IR text, the same whatever module it is in: its loop
    metadata (`CG.loop(unroll=False)`, numbered per module) as one mark that
    `_with_loop_ids` turns into metadata of the chunk's own. A kernel's text
    is kept from when it was named (`KernelBuilder._named_by_content`)."""
    kept = getattr(fn, "structc_text", None)
    return kept if kept is not None else _LOOP_REF.sub(_LOOP_MARK, irtext.function_text(fn))


def _with_loop_ids(text: str) -> str:
    """`text` with each loop's mark made a distinct, self-referential loop ID
    that disables unrolling (what LLVM reads), the definitions appended."""
    count = text.count(_LOOP_MARK)
    if not count:
        return text
    ids = iter(range(1, count + 1))
    text = re.sub(re.escape(_LOOP_MARK), lambda _: f"!llvm.loop !{next(ids)}", text)
    defs = [f"!{k} = distinct !{{!{k}, !0}}" for k in range(1, count + 1)]
    return "\n".join([text, f'!0 = !{{!"{NO_UNROLL}"}}', *defs, ""])


def helpers(module: ir.Module) -> dict[str, str]:
    """name -> text of the module's internal functions that are not kernels
    (the matmul micro-kernels): what `split_module(export_helpers=True)` exports."""
    return {f.name: function_text(f) for f in module.functions if f.blocks and f.linkage == "internal"}


def _exported(definition: str) -> str:
    """An internal function's definition, made hidden (visible to the model's other chunks only)."""
    if definition.startswith("define hidden "):
        return definition
    assert definition.startswith("define internal "), definition[:60]
    return "define hidden " + definition[len("define internal "):]


def _prototype(definition: str) -> str:
    """The declaration of a function another chunk defines (hidden if it was internal)."""
    head = definition.split("\n", 1)[0].rstrip().removesuffix("{").rstrip()
    if head.startswith("define internal "):
        return "declare hidden " + head[len("define internal "):]
    assert head.startswith("define "), head
    return "declare " + head[len("define "):]
