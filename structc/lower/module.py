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

import copy
import hashlib
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass

from llvmlite import ir

from ..graph import Graph, Group
from ..passes.plan import ALIGN, Plan
from .codegen import CG, I32, I64, NO_UNROLL, PTR, VOID, LocalSlots
from . import irtext
from .fused import MAX_REDUCTION_TASKS, FusedExpr, emit_elementwise_kernel
from .lowered import (RECORD_VERSION, LoweredKernels, NotCacheable, callees, close_group, kernel_key,
                      make_function, open_group, parse_type, slot_name, slot_names, slot_of)

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
        self.work_terms: dict = {}  # each kernel call's tasks x cost (`_count_work`) -> [term, calls]
        self.frame = None           # the kernels' frame (`_kernel_frame`)
        self.frame_slots: dict = {}
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
            # a light kernel keeps the exponential O1 compiles to O3's machine code (with the
            # shorter one, O3 unrolled a softmax's row loop: `CG._has_scalef`)
            cg.light = _stem(name) in LIGHT_KINDS
            yield cg, fn.args[1], fn.args[2]
            if found is not None:       # the helpers it made must be the record's too
                found = self._usable(found[0])
            if found is not None:       # built all the same: the record's text stands in for it
                del self.module.globals[full]
                drop_body(fn)
                fn, used = self._from_record(found[0], name), found[1]
            else:
                cg.b.ret_void()
                cg.finish()
                built = fn
                fn = self._named_by_content(fn, full, name)
                drop_body(built)
                used = [(index, at, t) for index, (at, t) in cg.slots.used.items()]
                if key is not None:
                    self._record(key, full, vector_code, used)
        if vector_code:
            fn.structc_vector_code = True
        if isinstance(self.shared, SharedKernels):
            self.shared.symbols[full] = fn.name

        e = self.entry
        frame = self._kernel_frame(len(used))
        for index, at, t in used:
            e.b.store(e.slot(index, t), self._frame_slot(at))
        n, c = self._count_work(tasks, cost)
        par = e.declare("sc_parallel_for", VOID, [PTR, PTR, I64, I64])
        e.b.call(par, [fn, frame, n, c])

    def _kernel_frame(self, slots: int):
        """The frame the entry passes its kernels: one for all of them, filled
        before each call (a call returns once its kernel is done), as long as
        the most slots a kernel reads."""
        if self.frame is None:
            self.frame = self.entry.eb.alloca(ir.ArrayType(I64, 1))
            self.frame.type = PTR     # slots hold pointers and integers alike
        if slots > self.frame.allocated_type.count:
            self.frame.allocated_type = ir.ArrayType(I64, slots)
        return self.frame

    def _frame_slot(self, at: int):
        """The address of slot `at` of the kernels' frame (in the entry block, once)."""
        if at not in self.frame_slots:
            self.frame_slots[at] = self.entry.eb.gep(self.frame, [ir.Constant(I64, at)], source_etype=I64)
        return self.frame_slots[at]

    def _count_work(self, tasks, cost):
        """Add this kernel's tasks x cost to `work`, in the entry block (before
        any kernel runs), and return (tasks, cost) for its call. Every kernel
        call of an entry is unconditional, so this computes nothing the body
        would not; the call uses these values unless computing them read
        memory (a kernel before this one may write it): then they are computed
        again in the body, where the call is. Each term is clamped to 2^40 so
        that the sum cannot wrap."""
        setup = self.entry.in_entry_block()
        made = len(setup.eb.block.instructions)
        n = tasks(setup) if callable(tasks) else setup.i64(tasks)
        c = cost(setup) if callable(cost) else setup.i64(cost)
        reads = any(isinstance(i, (ir.LoadInstr, ir.CallInstr)) and not getattr(i, "structc_slot", False)
                    for i in setup.eb.block.instructions[made:])
        term = _work_term(setup, n, c)
        self.work_terms.setdefault(_operand_key(term), [term, 0])[1] += 1
        if reads:
            e = self.entry
            return (tasks(e) if callable(tasks) else e.i64(tasks)), (cost(e) if callable(cost) else e.i64(cost))
        return n, c

    def work(self):
        """The sum of the kernel calls' tasks x cost, in the entry block: each
        distinct term times its number of calls (each term is at most 2^40)."""
        setup = self.entry.in_entry_block()
        total = setup.i64(0)
        for term, calls in self.work_terms.values():
            total = setup.iadd(total, setup.imul(term, calls))
        return total

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
            slots = [[slot_name(names, index), at, str(t)] for index, at, t in used]
            if any(name is None for name, _, _ in slots):
                raise NotCacheable("a frame slot outside the spec")
            record = {"version": RECORD_VERSION, "body": body, "vector_code": vector_code, "slots": slots,
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
                if (self._helper_text(have) != definition) if have.blocks else \
                        (self._declaration_text(have) != declaration):
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

    def _declaration_text(self, fn: ir.Function) -> str:
        """`str(fn)` of a declaration (an intrinsic, the runtime's functions),
        printed once per module: every record checks the ones it calls (a
        third of the time of reusing a record)."""
        texts = self.module.__dict__.setdefault("structc_declaration_texts", {})
        key = (fn.name, fn.linkage, tuple(sorted(fn.attributes)))
        hit = texts.get(key)
        if hit is None or hit[0] is not fn:
            hit = texts[key] = (fn, str(fn))
        return hit[1]

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


def _work_term(cg: CG, n, c):
    """min(min(n, 2^31) x min(c, 2^31), 2^40), the outer clamp left out when
    a constant cost (most are) shows the product cannot pass 2^40."""
    cap = cg.i64(1 << 31)
    product = cg.imul(cg.imin(n, cap), cg.imin(c, cap))
    known = _constants(c)
    if known is not None and 0 <= known[0] <= 1 << 9:
        return product
    return cg.imin(product, cg.i64(1 << 40))


class SharedKernels(dict):
    """Kernel text -> function, across the entry points and parts of a model;
    `symbols`: each kernel's name as asked for (`<entry>_<name>`) -> its symbol."""

    def __init__(self):
        super().__init__()
        self.symbols: dict[str, str] = {}


_I64_RANGE = range(-(1 << 63), 1 << 63)


def _constants(*values) -> list[int] | None:
    """The values as Python ints when every one is an int or an i64 constant."""
    out = []
    for v in values:
        if isinstance(v, ir.Constant) and v.type == I64 and isinstance(v.constant, int):
            v = v.constant
        if not isinstance(v, int):
            return None
        out.append(v)
    return out


def _fold(cg: CG, op, *values):
    """`op` of the values as an i64 constant when they are all constants and
    the result is exact in int64 (what the instruction would give); else None."""
    known = _constants(*values)
    if known is None:
        return None
    result = op(*known)
    return cg.i64(result) if result in _I64_RANGE else None


def _sdiv(a: int, b: int) -> int:
    """LLVM's sdiv: the quotient rounded towards zero."""
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


class EntryCG(CG):
    """Code generation for an entry point. Its frame slots (dims, arenas,
    buffers) are values of its entry block, each made when first read
    (`provide`), not a frame in memory stored and loaded back; arithmetic on
    constants is done here. An entry only sequences kernel calls, so that is
    most of its IR: the training entry of the GAT example was 3,469 lines,
    most of them frame stores and loads and arithmetic on constants."""

    def __init__(self, module: ir.Module, fn: ir.Function, layout):
        super().__init__(module, fn, layout)
        self.makers: dict = {}      # slot -> a function making its value in the entry block
        self.values: dict = {}
        numbered: dict = {}
        self.b = _NumberingBuilder(self.body, numbered, self.entry)
        self.eb = _NumberingBuilder(self.entry, numbered, self.entry)

    def provide(self, index: int, make) -> None:
        self.makers[index] = make

    def in_entry_block(self) -> "EntryCG":
        """This CG appending to the entry block (computed before any kernel runs),
        sharing its slots and numbered instructions."""
        setup = copy.copy(self)
        setup.b = self.eb
        return setup

    def slot(self, index, t: ir.Type):
        if isinstance(index, tuple):        # a kernel's `run_time_value`: the entry passes the constant
            return ir.Constant(t, index[1])
        key = ("slot", index, str(t))
        if key not in self._cache:
            if index not in self.values:
                made = len(self.eb.block.instructions)
                self.values[index] = self.makers[index]()
                for instr in self.eb.block.instructions[made:]:
                    instr.structc_slot = True       # reads what the caller passed: no kernel writes it
            value = self.values[index]
            self._cache[key] = value if value.type == t else _converted(self.eb, value, t)
        return self._cache[key]

    def imul(self, a, b):
        folded = _fold(self, lambda x, y: x * y, a, b)
        return folded if folded is not None else super().imul(a, b)

    def iadd(self, a, b):
        folded = _fold(self, lambda x, y: x + y, a, b)
        return folded if folded is not None else super().iadd(a, b)

    def imin(self, a, b):
        folded = _fold(self, min, a, b)
        return folded if folded is not None else super().imin(a, b)

    def ceil_div(self, a, k):
        folded = _fold(self, lambda x: _sdiv(x + k - 1, k), a) if isinstance(k, int) else None
        return folded if folded is not None else super().ceil_div(a, k)


class _NumberingBuilder(ir.IRBuilder):
    """A builder that gives back the integer instruction it made before for the
    same operation and operands, where that one is known to have run: in the
    entry block, or earlier in the block this builder appends to. Each kernel
    call of an entry computes its task count and work from the dims, and
    repeated layers compute the same ones: Dense200's training entry had ~11k
    lines of them in one block, and code generation's time grows faster than
    a block's length."""

    def __init__(self, block, numbered: dict, entry):
        super().__init__(block)
        self.numbered, self.entry_block = numbered, entry

    def _numbered(self, key, make):
        found = self.numbered.get(key)
        if found is not None and found.parent in (self.entry_block, self.block):
            return found
        made = self.numbered[key] = make()
        return made

    def _integer_op(op):
        def numbered(self, lhs, rhs, name="", flags=()):
            make = lambda: getattr(ir.IRBuilder, op)(self, lhs, rhs, name, flags)
            if not isinstance(lhs.type, ir.IntType) or name:
                return make()
            return self._numbered((op, tuple(flags), _operand_key(lhs), _operand_key(rhs)), make)
        return numbered

    add, sub, mul = _integer_op("add"), _integer_op("sub"), _integer_op("mul")
    sdiv, srem, and_, or_ = _integer_op("sdiv"), _integer_op("srem"), _integer_op("and_"), _integer_op("or_")
    del _integer_op

    def _icmp(self, prefix, cmpop, lhs, rhs, name):
        make = lambda: ir.IRBuilder._icmp(self, prefix, cmpop, lhs, rhs, name)
        if not isinstance(lhs.type, ir.IntType) or name:
            return make()
        return self._numbered(("icmp", prefix, cmpop, _operand_key(lhs), _operand_key(rhs)), make)

    def select(self, cond, lhs, rhs, name="", flags=()):
        make = lambda: ir.IRBuilder.select(self, cond, lhs, rhs, name, flags)
        if not isinstance(lhs.type, ir.IntType) or name:
            return make()
        return self._numbered(("select", tuple(flags), _operand_key(cond), _operand_key(lhs), _operand_key(rhs)),
                              make)


def _operand_key(v):
    """A value as part of a `_NumberingBuilder` key: constants by value, others
    by identity (the instruction kept beside the key holds them, so no other
    value takes their id while it is there)."""
    if isinstance(v, ir.Constant):
        return ("const", str(v.type), str(v.constant))
    return ("value", id(v))


def run_time_value(cg: CG, value: int) -> ir.Value:
    """The int64 `value`, read by a kernel from its frame, where the entry
    stores it before each call (`EntryCG.slot`), rather than a constant in the
    kernel's text: a kernel whose code only loops over `value` elements (the
    optimiser's update over the parameter arena) is then one text, so one
    function compiled once, whatever the model's sizes: an edit of a layer's
    width does not recompile it (issue 14, item 4)."""
    if cg.slots is None:
        raise ValueError("run_time_value is for a kernel's code (its frame is made by KernelBuilder.kernel)")
    return cg.slot(("value", int(value)), I64)


def run_time_numel(cg: CG, shape) -> ir.Value:
    """The number of elements of `shape` in a kernel's code, its constant factor
    (unless 1) read at run time (`run_time_value`): a loop over it has the same
    text at any size of the constant dims."""
    constant = math.prod(d for d in shape if isinstance(d, int))
    n = cg.i64(1) if constant == 1 else run_time_value(cg, constant)
    for d in shape:
        if not isinstance(d, int):
            n = cg.imul(n, cg.dim(d))
    return n


def _converted(b: ir.IRBuilder, value, t: ir.Type):
    """A slot's value read as another type (a pointer as an integer or back)."""
    if isinstance(t, ir.IntType) and isinstance(value.type, ir.PointerType):
        return b.ptrtoint(value, t)
    if isinstance(t, ir.PointerType) and isinstance(value.type, ir.IntType) and value.type.width == 64:
        return b.inttoptr(value, t)
    raise TypeError(f"frame slot of type {value.type} read as {t}")


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
        folded = _fold(self.cg, {"smul": lambda x, y: x * y, "sadd": lambda x, y: x + y}[name], a, b)
        if folded is not None:      # exact in int64: no overflow
            return folded
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
    counts: dict = {}       # Size -> its value: many buffers have the same size
    largest: dict = {}      # the same values -> their largest
    lines: dict = {}        # id(a largest) -> its bytes in whole 64-byte lines
    for sizes in plan.slots:
        offsets.append(at)
        for s in sizes:
            if s not in counts:
                n = cg.i64(s.coef)
                for sym in s.symbols:
                    n = arith.mul(n, cg.dim(sym))
                counts[s] = n
        biggest = _largest(cg, [counts[s] for s in sizes], largest)
        if id(biggest) not in lines:
            padded = arith.add(biggest, ALIGN - 1)
            rounded = _fold(cg, lambda x: _sdiv(x, ALIGN), padded)
            rounded = cg.b.sdiv(padded, cg.i64(ALIGN)) if rounded is None else rounded
            lines[id(biggest)] = arith.mul(rounded, ALIGN * 4)
        at = arith.add(at, lines[id(biggest)])
    return offsets, at


def _largest(cg: CG, values: list, made: dict):
    """The largest of `values` (signed): the constants compared here, each
    other value once, and the largest of the same values made once (`made`)."""
    known = [v for v in values if _constants(v) is not None]
    rest = list({id(v): v for v in values if _constants(v) is None}.values())
    if known:
        rest.append(cg.i64(max(_constants(*known))))
    key = frozenset(map(id, rest))
    if key not in made:
        biggest = rest[0]
        for n in rest[1:]:
            biggest = cg.b.select(cg.b.icmp_signed(">", n, biggest), n, biggest)
        made[key] = biggest
    return made[key]


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
    cg = EntryCG(module, fn, layout)
    eb = cg.eb

    def given(value):
        return lambda: value

    def loaded(table, index: int, t: ir.Type):
        return lambda: eb.load(eb.gep(table, [ir.Constant(I64, index)], source_etype=t), typ=t)

    def reduction_partials():
        partials = eb.alloca(ir.ArrayType(ir.FloatType(), MAX_REDUCTION_TASKS))
        partials.type = PTR
        return partials

    for k, sym in enumerate(symbols):
        cg.provide(layout.dims[sym], loaded(dims, k, I64))
    for arena, value in zip(ARENAS, (params, grads, state)):
        cg.provide(layout.arenas[arena], given(value))
    cg.provide(layout.hyper_slot, given(hyper))
    cg.provide(layout.mode_slot, given(mode))
    for r, slot in layout.partials.items():
        cg.provide(slot, reduction_partials)

    setup = cg.in_entry_block()
    offsets: list = []
    addresses: dict = {}    # workspace slot -> its address (buffers of disjoint lifetimes share slots)

    def in_workspace(index: int):
        if not offsets:     # on the first read of a workspace buffer
            offsets.extend(_slot_offsets(setup, plan)[0])
        if index not in addresses:
            addresses[index] = eb.gep(workspace, [offsets[index]], source_etype=ir.IntType(8))
        return addresses[index]

    def buffer(st):
        if st.kind in ("input", "output"):
            return loaded(inputs if st.kind == "input" else outputs, st.index, PTR)
        if st.kind in ("param", "grad"):
            base = params if st.kind == "param" else grads
            return lambda: eb.gep(base, [ir.Constant(I64, st.index * 4)], source_etype=ir.IntType(8))
        return lambda: in_workspace(st.index)

    for nid, slot in layout.buffers.items():
        cg.provide(slot, buffer(plan.storage[nid]))

    kb = KernelBuilder(module, graph, layout, cg, target, name, shared, export, lowered)
    for group in graph.groups:
        lower_group(kb, graph, group)
    # A small entry (its kernels' work summed) runs every kernel on the caller.
    begin = cg.declare("sc_entry_begin", I32, [I64])
    end = cg.declare("sc_entry_end", VOID, [I32])
    outer = cg.eb.call(begin, [kb.work()])       # last in the entry block: before any kernel
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
            anchor.op.lower(kb, anchor, _epilogue(graph, group))
        else:
            anchor.op.lower(kb, anchor, None)
    finally:
        if scope is not None:
            kb._kb._scope = None
    if scope is not None:
        close_group(kb._kb.lowered, scope)


def _epilogue(graph: Graph, group) -> FusedExpr:
    """The elementwise epilogue of a matmul's group. With a gate math in the
    group (`fuse`, rule 7), the epilogue is the rest, and `expr.gate` the gate
    node, which the matmul's kernel runs on each block of rows after its product."""
    if group.gate is None:
        return FusedExpr(graph, group, coalesce=False)
    gate = {group.gate} | {m for m in group.members if "part" in graph.nodes[m].op.traits
                           and graph.nodes[m].inputs[0] == group.gate}
    product = Group(group.id, group.kind, [m for m in group.members if m not in gate], group.anchor,
                    [m for m in group.outputs if m not in gate])
    expr = FusedExpr(graph, product, coalesce=False)
    expr.gate = graph.nodes[group.gate]
    return expr


# -- several modules from one, to compile in parallel -----------------------

_REFERENCE = re.compile(r'@"([^"]+)"')
#: first line of a module whose every function is explicit vector code (the matmul
#: micro-kernels: `fn.structc_vector_code`); `native.optimize` gives it a short pipeline
VECTOR_CODE = "; structc: vector code\n"
#: first line of a module of entry points alone (`lower_entry`: code that fills
#: frames and calls kernels, once per call); `native.optimize` gives it `ENTRY_PIPELINE`
ENTRY_CODE = "; structc: entry code\n"
#: first line of a module of memory-bound kernels alone (`MEMORY_KINDS`);
#: `native.optimize` gives it `native.MEMORY_TUNING`
MEMORY_CODE = "; structc: memory code\n"
#: kernels (by the op in their symbol, `kernel_kind`) that stream memory with
#: explicit vectors (fused elementwise code, sums): O3's
#: unrolling and interleaving of their loops cost LLVM half its time on them
#: and buy no speed (benchmarks/RESULTS.md, "a pipeline per kind of module").
#: Gathers, segment softmaxes and the attention kernels stay with O3: without
#: those passes the GAT and tree steps measured 2-5% slower. Max pooling, its
#: gradient's routing, the kernel flip and the clip's norm (a float sum, in
#: order either way) joined later: 20-40% less LLVM time, LeNet-5's step as fast.
#: The optimiser's update was one too; it is explicit vector code now, the short
#: pipeline (`ops/optim.py`: half the LLVM time, the same arithmetic; stop 43), as
#: are the sums over leading axes (`reduce._lower_column_blocks`; stop 47).
MEMORY_KINDS = frozenset({"ew", "ewsum", "sum", "sumparts", "maxpool", "route", "flip", "update_clip"})
#: first line of a module of `LIGHT_KINDS` kernels alone; `native.optimize` gives it `native.LIGHT_TUNING`
LIGHT_CODE = "; structc: light code\n"
#: kernels whose machine code O1 without unrolling and interleaving makes
#: identical to O3's (every such kernel of eight example models, assembly
#: compared instruction by instruction; one convolution differs by a signed
#: compare for an unsigned one), at 75-95% of O3's LLVM time: their loops are
#: explicit vector code O3's loop passes leave as they were (benchmarks/RESULTS.md,
#: "LLVM's time per module")
LIGHT_KINDS = frozenset({"conv", "softmax", "xent", "xentgrad", "xentrows", "xentrowsgrad"})
# not the tree levels and LSTM cells: their machine code per module compares equal, yet the
# Tree-LSTM step ran ~5-10% slower with them light (lead's A/B against 6fb5528, 1 thread)
#: below this much IR text a part stays one module (each module costs a parse and a target machine)
SPLIT_MIN_CHARS = 150_000
#: `split_module(by_unit=True)`: a kernel or helper of less IR text joins the other small ones of its pipeline
UNIT_MIN_CHARS = 10_000
#: `split_module(by_unit=True)`: the small units of a pipeline are cut into modules of about this many
#: (`stable_chunks`), so that an edit recompiles the few around the kernels it changed, not all of them
SMALL_CHUNK_UNITS = 4


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
    helper of at least `UNIT_MIN_CHARS` is a module of its own, and the small
    units are one module per pipeline (a module costs LLVM some 5 ms however
    small it is). `chunks` and `min_chars` are then ignored.

    In either mode, the entry points (which change with any edit) are one
    module, marked `ENTRY_CODE`; exported helpers that are explicit vector code
    (`fn.structc_vector_code`: the matmul micro-kernels) are modules of their
    own, marked `VECTOR_CODE`, for the short LLVM pipeline
    (`native.SHORT_PIPELINE`); memory-bound kernels (`MEMORY_KINDS`) too,
    marked `MEMORY_CODE`, and `LIGHT_KINDS`, marked `LIGHT_CODE`
    (`native.pipeline_of` reads the marks)."""
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

    def memory_code(name):
        return kernel_kind(name) in MEMORY_KINDS and not vector_code(name)

    def light_code(name):
        return kernel_kind(name) in LIGHT_KINDS and not vector_code(name)

    def spread(names):      # longest first, each to the lightest chunk: the chunks come out about even
        chunk_bins = [[0, [], set()] for _ in range(max(1, min(chunks, len(names))))]
        for name in sorted(names, key=lambda n: -len(texts[n])):
            lightest = min(chunk_bins, key=lambda b: b[0])
            need = closure(name) - lightest[2]
            lightest[0] += len(texts[name]) + sum(len(texts[h]) for h in need)
            lightest[1].append(name)
            lightest[2] |= need
        return chunk_bins
    # the entry points alone: a module of code that only calls kernels (the cheap pipeline)
    entry_bin = [0, [n for n in units if n in entries], set().union(*(closure(n) for n in entries))]
    units = [n for n in units if n not in entries]
    if by_unit:     # small units together by pipeline: vector code (the short one), memory-bound kernels, the rest
        small = [n for n in units if len(texts[n]) < UNIT_MIN_CHARS]
        small_vector = [n for n in small if vector_code(n)]
        small_memory = [n for n in small if memory_code(n)]
        small_light = [n for n in small if light_code(n)]
        small = [n for n in small if n not in small_vector and n not in small_memory and n not in small_light]
        grouped = set(small + small_vector + small_memory + small_light)
        order = _call_order(entries, texts)
        groups = [*stable_chunks(small, order)] + [[n] for n in units if n not in grouped] + \
            [*stable_chunks(small_vector, order), *stable_chunks(small_memory, order),
             *stable_chunks(small_light, order)]
        bins = [[0, names, set().union(*map(closure, names))] for names in groups]
    else:
        # exported micro-kernels in a module of their own, which gets the short pipeline;
        # memory-bound kernels in chunks of their own (`MEMORY_KINDS`)
        vector = [n for n in units if vector_code(n)]
        memory = [n for n in units if memory_code(n)]
        light = [n for n in units if light_code(n)]
        units = [n for n in units if n not in vector and n not in memory and n not in light]
        bins = spread(units) + (spread(memory) if memory else []) + (spread(light) if light else [])
        units += memory + light
        if vector:      # one module, or one each when every unit is a chunk (`--kernel-timings`)
            apart = chunks >= len(units) + len(vector)
            bins += [[0, names, set().union(*map(closure, names))] for names in ([[n] for n in vector] if apart
                                                                                 else [vector])]
            units += vector
    bins.insert(0, entry_bin)
    units = entry_bin[1] + units
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
        mark = VECTOR_CODE if all(vector_code(n) for n in mine) else ENTRY_CODE if set(names) <= set(entries) \
            else MEMORY_CODE if all(memory_code(n) for n in names) \
            else LIGHT_CODE if all(light_code(n) for n in names) else ""
        out.append(mark + _with_loop_ids("\n".join(text)))
    return out


def _call_order(entries: list[str], texts: dict[str, str]) -> dict[str, int]:
    """Each function's place in the order the entries first name it (their kernels,
    in the order they run them); the others (helpers) after them, by name."""
    order: dict[str, int] = {}
    for e in entries:
        for name in _REFERENCE.findall(texts[e]):
            order.setdefault(name, len(order))
    for name in sorted(texts):
        order.setdefault(name, len(order))
    return order


def stable_chunks(names: list[str], order: dict[str, int], size: int | None = None) -> list[list[str]]:
    """`names` in `order`, cut into runs of about `size` (`SMALL_CHUNK_UNITS`) by
    their content: a run ends after a name whose hash is 0 modulo `size` (or at
    twice `size`). Kernels are named after their text, so an edit that replaces
    some kernels changes only the runs that held them (and the next one when the
    old or the new name ends a run: odds 7 in 16 for a `size` of 4): the other
    runs are the same modules, found in the cache, as content-defined chunking
    keeps the unchanged blocks of a file."""
    size = size or SMALL_CHUNK_UNITS
    runs: list[list[str]] = [[]]
    for name in sorted(names, key=order.__getitem__):
        runs[-1].append(name)
        cut = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") % size == 0
        if cut or len(runs[-1]) >= 2 * size:
            runs.append([])
    return [run for run in runs if run]


_KIND = re.compile(r"sc_[0-9a-f]{16}_([a-z_][a-z0-9_]*)")


def kernel_kind(symbol: str) -> str | None:
    """The op a kernel's symbol names (`sc_<hash>_<kind>`: `ew`, `sum`, ...), or None."""
    m = _KIND.fullmatch(symbol)
    return m.group(1) if m else None


_LOOP_REF = re.compile(r"!llvm\.loop !\d+")
_LOOP_MARK = "!llvm.loop !no_unroll"


def drop_body(fn: ir.Function) -> None:
    """Free a kernel's instructions once its text is kept (`structc_text`) or it
    is dropped: llvmlite's instructions and blocks refer to each other (and a
    loop's phi to values after it), so without this they wait for the cyclic
    collector, which `collector_paused` holds off until the compile ends and
    then walks them all at once (a Tree-LSTM's 112,000 objects: 70 ms at the
    end of its compile). Its blocks stay, emptied, so the function still reads
    as defined (`fn.blocks`); nothing prints it again."""
    for block in fn.blocks:
        for instruction in block.instructions:
            if isinstance(instruction, ir.PhiInstr):
                instruction.incomings.clear()
        block.instructions.clear()
        block.terminator = None     # a branch, whose targets are blocks: a loop's refer back


def drop_bodies(module: ir.Module) -> None:
    """`drop_body` of every function of a part's module once its text is made
    (and its helpers' texts taken): the entry points and helpers, whose
    instructions would otherwise wait for the collector too."""
    for fn in module.functions:
        drop_body(fn)


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


_HIDDEN_DEFINITION = re.compile(r'^define hidden [^\n]*?@"([^"]+)"\(.*?^}\n?', re.M | re.S)
#: the same names, searched as a literal line start (`^` with re.M tries every position: 20x slower)
_HIDDEN_NAME = re.compile(r'\ndefine hidden [^\n]*?@"([^"]+)"\(')


def defined_once(texts: list[str], defined: set[str]) -> list[str]:
    """A part's modules, with each hidden function that an earlier part of the
    same compile defines declared instead of defined again, and this part's
    hidden functions added to `defined`; a module left with nothing to define
    is dropped. Kernels are named after their text,
    so the two definitions are the same function; a shared library must link
    each symbol once (the evaluation part repeats the training part's loss
    kernels, which the forward part, the only one that exports, lacks)."""
    out, mine = [], set()

    def once(match):
        return match.group(0) if match.group(1) not in defined else _prototype(match.group(0)) + "\n"
    for text in texts:
        names = _HIDDEN_NAME.findall("\n" + text)
        mine.update(names)
        if not defined.intersection(names):
            out.append(text)        # the whole definitions matched only where one is to go (most modules: none)
            continue
        kept = _HIDDEN_DEFINITION.sub(once, text)
        if "\ndefine " in "\n" + kept:
            out.append(kept)        # a module left with declarations only is not compiled at all
    defined |= mine
    return out


def _prototype(definition: str) -> str:
    """The declaration of a function another chunk defines (hidden if it was internal)."""
    head = definition.split("\n", 1)[0].rstrip().removesuffix("{").rstrip()
    if head.startswith("define internal "):
        return "declare hidden " + head[len("define internal "):]
    assert head.startswith("define "), head
    return "declare " + head[len("define "):]
