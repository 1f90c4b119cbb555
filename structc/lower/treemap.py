"""Lower `tree_map` and `tree_map_grad`: loops over levels, one batched body call per level.

Nodes are in schedule order, so level l is the rows [level_end[l-1],
level_end[l]) of H and the leaves are its first rows. Forward:

    H[0:leaves] = leaf states
    for l = 1 .. levels-1:                    (dynamic batching)
        C = gather of the children's rows of H     [B, A*d], zero for a missing child
        H[level] = body(C)                    one call of the body's own entry point:
                                              its matmul is the tiled gemm with bias and
                                              activation in the epilogue, over all B rows
Backward (levels in reverse; dH is stored once per node and reused):

    dH = gH
    for l = levels-1 .. 1:
        dC = body_vjp_children(dH[level], H[level])   [B, A*d]
        dH[child rows] += dC
    dθ = body_vjp_params(C_all, dH[inner], H[inner])  once, over all inner nodes

The bodies are compiled by the ordinary pipeline into entry points of their
own (`sc_<rec>_...`, symbol `rows` = B) and called from these kernels with
pointers into H, dH and the scratch buffers, so they run with the same
fusion, tiled matmul and threads as any model. Every index read from a
forest array is also range-checked here, so native code never leaves its
buffers even if an array were altered after validation.
"""
from __future__ import annotations

import hashlib

from llvmlite import ir

from ..ops.loss import _each_vector
from ..ops.tree import BODY_KIDS, BODY_ROWS, body_plan, child_blocks, cotangent_names
from ..passes.plan import aligned, param_layout
from .codegen import CG, F32, I32, I64, PTR
from .gemm import same_sums_step
from .module import KERNEL_TYPE, NESTED_WORK, drop_body, function_text

# A level's rows are split across threads for the whole body program (one
# hand-off per level, every kernel of the body on each thread's rows) at
# multiples of `gemm.same_sums_step`: each row's sums then run in the same
# order however the level is split, so results are bitwise the same at any
# thread count. A level of fewer than two shares' rows is one task, which the
# caller runs (`sc_row_tasks`: no hand-off of the level; its kernels are then
# pooled by their own size, as outside a level).
#
# With several threads a big enough forest is rather cut into groups of
# whole trees, one per thread (`ForestTasks`): each runs all its levels with
# no barrier between them (a node's children are its own tree's), one
# hand-off per pass instead of one per level. A level's rows are then cut
# anywhere, so the bodies' matmuls are row-stable (`gemm.stable_rows`).
LEVEL_COST = 1 << 30       # a level's task is worth a hand-off (the pool's threshold)


# -- row helpers (also used by the embedding ops) -------------------------------

def load_index(cg: CG, ptr, i, dtype: str, last):
    """An integer element as i64, clamped to [0, last] when `last` is given."""
    v = cg.load(ptr, i, t=I32 if dtype == "i32" else I64)
    if dtype == "i32":
        v = cg.b.sext(v, I64)
    if last is not None:
        b = cg.b
        v = b.select(b.icmp_signed("<", v, cg.i64(0)), cg.i64(0), v)
        v = b.select(b.icmp_signed(">", v, last), last, v)
    return v


#: vectors of a row of known width that `_row_op` writes out one by one; a wider
#: row (a whole parameter zeroed as one row: W [192, 512] is 6,144 vectors, 3 MB
#: of IR and a second of O3 when unrolled) is a loop
UNROLLED_VECTORS = 32


def _row_op(cg: CG, n, vw: int, body) -> None:
    """body(j, mask) over [0, n) in vectors, the last one masked; n a Python
    int (unrolled up to `UNROLLED_VECTORS`: rows of a known width) or a runtime value."""
    if not isinstance(n, int):
        _each_vector(cg, n, vw, body)
        return
    full = n - n % vw
    if full > UNROLLED_VECTORS * vw:
        with cg.loop(cg.i64(full // vw), name="rv") as v:
            body(cg.imul(v, vw), None)
    else:
        for j in range(0, full, vw):
            body(cg.i64(j), None)
    if n % vw:
        body(cg.i64(full), cg.lane_mask(cg.i64(n % vw), vw))


def copy_row(cg: CG, src, s_off, dst, d_off, n, vw: int) -> None:
    """dst[d_off : d_off+n] = src[s_off : s_off+n]"""
    _row_op(cg, n, vw, lambda j, m: cg.store(cg.load(src, cg.iadd(s_off, j), n=vw, mask=m), dst,
                                             cg.iadd(d_off, j), mask=m))


def add_row(cg: CG, src, s_off, dst, d_off, n, vw: int) -> None:
    """dst[d_off : d_off+n] += src[s_off : s_off+n]"""
    sum_rows(cg, src, s_off, dst, d_off, dst, d_off, n, vw)


def sum_rows(cg: CG, a, a_off, b, b_off, dst, d_off, n, vw: int) -> None:
    """dst[d_off : d_off+n] = a[a_off : a_off+n] + b[b_off : b_off+n]"""
    _row_op(cg, n, vw, lambda j, m: cg.store(cg.add(cg.load(a, cg.iadd(a_off, j), n=vw, mask=m),
                                                    cg.load(b, cg.iadd(b_off, j), n=vw, mask=m)),
                                             dst, cg.iadd(d_off, j), mask=m))


def zero_row(cg: CG, dst, d_off, n, vw: int) -> None:
    zero = ir.Constant(ir.VectorType(F32, vw), [ir.Constant(F32, 0.0)] * vw)
    _row_op(cg, n, vw, lambda j, m: cg.store(zero, dst, cg.iadd(d_off, j), mask=m))


def zero_rows(cg: CG, dst, lo, hi, width, vw: int) -> None:
    with cg.loop(hi, start=lo, name="z") as r:
        zero_row(cg, dst, cg.imul(r, width), width, vw)


# -- bodies as entry points ------------------------------------------------------

def body_entry(kb, program):
    """The body's entry point (emitted once per module) and its memory plan."""
    from .module import lower_entry
    key = ("tree-body", id(program), id(kb.module))     # `shared` spans the model's modules: one body per module
    if key not in kb.shared:
        g = kb.graph
        # the model's layout (frozen parameters come last), not declaration order
        offsets = kb.layout.plan.param_offsets or \
            param_layout({name: g.nodes[nid].shape for name, nid in g.params.items()})[0]
        plan = body_plan(program, offsets)
        name = "sc_" + program.name.replace(".", "_").replace("@", "") + f"_{len(kb.shared)}"
        lower_entry(kb.module, program.graph, plan, [BODY_ROWS, BODY_KIDS], name, kb.target, kb.shared)
        fn = kb.module.globals[name]
        kb.shared[key] = (fn, plan, program)
    return kb.shared[key]


def call_body(cg: CG, entry, inputs: dict, outputs: dict, fixed_base, rows, workspace) -> None:
    """Call a body entry point on `rows` rows: inputs and outputs by name."""
    fn, plan, program = entry
    b = cg.b
    ins = cg.var(ir.ArrayType(PTR, max(1, len(plan.input_names))))
    ins.type = PTR      # opaque pointers: slots are addressed with gep over ptr
    for k, name in enumerate(plan.input_names):
        b.store(inputs[name], b.gep(ins, [cg.i64(k)], source_etype=PTR))
    n_out = len(plan.output_names)
    outs = cg.var(ir.ArrayType(PTR, max(1, n_out + len(program.fixed))))
    outs.type = PTR
    for k, name in enumerate(plan.output_names):
        b.store(outputs[name], b.gep(outs, [cg.i64(k)], source_etype=PTR))
    for k, nid in enumerate(sorted(program.fixed)):
        b.store(cg.gep(fixed_base, cg.i64(program.fixed[nid])), b.gep(outs, [cg.i64(n_out + k)], source_etype=PTR))
    dims = cg.var(ir.ArrayType(I64, 2))
    dims.type = PTR
    b.store(rows, dims)
    b.store(cg.imul(rows, program.arity), b.gep(dims, [cg.i64(1)], source_etype=I64))
    hyper = cg.slot(cg.layout.hyper_slot, PTR)
    b.call(fn, [cg.arena("params"), cg.arena("grads"), cg.arena("state"), workspace, ins, outs, dims, hyper,
                cg.mode()])


def hoisted(kb, cg: CG, program, fixed) -> dict:
    """Run a body's hoisted part (what depends on parameters only) once;
    returns its values, by input name, for the per-level calls."""
    if program.pre is None:
        return {}
    base = cg.gep(fixed, cg.i64(program.pre_base))
    values = hoisted_values(cg, program, fixed)
    call_body(cg, body_entry(kb, program.pre), {}, values, base, cg.i64(1), base)
    return values


def hoisted_values(cg: CG, program, fixed) -> dict:
    """Where the hoisted part left its values (by input name)."""
    return {name: cg.gep(fixed, cg.i64(off)) for name, off in (program.inv or {}).items()}


def splittable(program) -> bool:
    """Whether a level's calls of `program` can run on disjoint row ranges at
    once: no buffer of its own outside the rows (a fixed-size one would be
    shared), and a per-row workspace whose row ranges stay 64-byte aligned."""
    return not program.fixed and program.rows_floats % 16 == 0


class LevelTasks:
    """The work of one level as `void f(frame, lo, hi)` over tasks that split
    the level's rows: `emit(cg, l, slot, a, b)` writes the code for rows
    [a, b) of level l, whose per-level scratch starts at row `slot` (their
    place in the level), in the task function's CG,
    whose frame slots are the kernel's own. `run(l, tasks)` calls it through
    the thread pool from the kernel."""

    def __init__(self, kb, cg: CG, le, nodes_d, emit):
        self.cg, self.le, self.nodes_d = cg, le, nodes_d
        self.step = same_sums_step(kb.vector_width)
        self.frame, fn, t, (l, tasks) = _task_function(kb, cg, "level", (I64, I64))
        nodes = t.dim(nodes_d)
        start, stop = _level_bounds(t, t.ptr(le), l, nodes)
        rows = t.b.sub(stop, start)
        a = t.iadd(start, _task_row(t, fn.args[1], tasks, rows, self.step))
        b = t.iadd(start, _task_row(t, fn.args[2], tasks, rows, self.step))
        with t.if_(t.b.icmp_signed("<", a, b)):        # a thread's share of a small level may be empty
            emit(t, l, t.b.sub(a, start), a, b)
        t.b.ret_void()
        t.finish()
        self.fn = _named_by_text(kb.module, fn)

    def run(self, l, split: bool) -> None:
        cg = self.cg
        b = cg.b
        tasks = cg.i64(1)
        if split:       # one task per thread, none empty: a small level runs on the caller (no hand-off)
            start, stop = _level_bounds(cg, cg.ptr(self.le), l, cg.dim(self.nodes_d))
            tasks = b.call(cg.declare("sc_row_tasks", I64, [I64, I64]), [b.sub(stop, start), cg.i64(self.step)])
        b.store(l, b.gep(self.frame, [cg.i64(1)], source_etype=I64))
        b.store(tasks, b.gep(self.frame, [cg.i64(2)], source_etype=I64))
        par = cg.declare("sc_parallel_for", ir.VoidType(), [PTR, PTR, I64, I64])
        b.call(par, [self.fn, self.frame, tasks, cg.i64(LEVEL_COST)])


def rows_function(kb, cg: CG, emit):
    """`emit(cg, l, slot, a, b)` (a level's rows, see `LevelTasks`) as one
    function of the kernel `cg`'s, `void rows(frame, l, slot, a, b)`, and a
    function that calls it from a task function's CG: the level by level
    and the forest task functions share its code (a Tree-LSTM's backward
    rows are a few hundred lines of IR: twice cost ~0.1 s of compile)."""
    fn = ir.Function(kb.module, ir.FunctionType(ir.VoidType(), [PTR, I64, I64, I64, I64]),
                     name=f"{cg.fn.name}_rows")
    fn.linkage = "internal"
    t = CG(kb.module, fn, cg.layout)
    t.slots = cg.slots          # the kernel's frame: the same slots
    t.frame = fn.args[0]
    emit(t, *fn.args[1:])
    t.b.ret_void()
    t.finish()
    fn = _named_by_text(kb.module, fn, "rows")
    return lambda c, l, slot, a, b: c.b.call(fn, [c.frame, l, slot, a, b])


def _task_function(kb, cg: CG, what: str, fields):
    """A pool task function of the kernel `cg`'s: (the frame the kernel passes
    it, in its entry block: the kernel's frame then `fields`; the function;
    its CG, with the kernel's frame slots; the fields as it reads them)."""
    frame = cg.eb.alloca(ir.ArrayType(I64, 1 + len(fields)))
    frame.type = PTR
    cg.eb.store(cg.frame, cg.eb.gep(frame, [cg.i64(0)], source_etype=I64))
    fn = ir.Function(kb.module, KERNEL_TYPE, name=f"{cg.fn.name}_{what}")
    fn.linkage = "internal"
    t = CG(kb.module, fn, cg.layout)
    t.slots = cg.slots          # the kernel's frame: the same slots
    arg = fn.args[0]
    t.frame = t.eb.load(t.eb.gep(arg, [t.i64(0)], source_etype=I64), typ=PTR)
    read = [t.eb.load(t.eb.gep(arg, [t.i64(k + 1)], source_etype=I64), typ=typ) for k, typ in enumerate(fields)]
    return frame, fn, t, read


class ForestTasks:
    """A pass over a forest's levels as `void f(frame, lo, hi)` over groups
    of whole trees (`sc_forest_parts`): task p runs rows [cuts[p, l],
    cuts[p + 1, l]) of every level l, bottom up (`down`: top down), with
    `emit(cg, l, slot, a, b)` as `LevelTasks` calls it (slot: from the
    group's own scratch rows, which it reuses level after level), after
    `leaves(cg, a, b)` on its rows of the leaves. `run_or(otherwise)` runs it, or
    `otherwise()` when the forest is not split (one thread, a small or
    uneven forest)."""

    def __init__(self, kb, cg: CG, inputs, nodes_d, emit, down: bool, leaves=None):
        children, self.arity, le, roots, self.trees_d = inputs
        self.cg, self.kb, self.nodes_d, self.ptrs = cg, kb, nodes_d, (children, le, roots)
        self.frame, fn, t, (cuts, levels, parts) = _task_function(kb, cg, "forest", (PTR, I64, I64))
        nodes = t.dim(nodes_d)
        b = t.b
        with t.loop(fn.args[2], start=fn.args[1], name="part") as part:
            base = t.load(cuts, t.iadd(t.imul(t.iadd(parts, 1), levels), part), t=I64)    # its scratch rows
            if leaves is not None:
                a = t.load(cuts, t.imul(part, levels), t=I64)
                leaves(t, a, t.load(cuts, t.imul(t.iadd(part, 1), levels), t=I64))
            with t.loop(b.sub(levels, t.i64(1)), name="lv") as k:
                l = b.sub(b.sub(levels, t.i64(1)), k) if down else t.iadd(k, 1)
                start, stop = _level_bounds(t, t.ptr(le), l, nodes)
                first = t.load(cuts, t.iadd(t.imul(part, levels), l), t=I64)
                a = t.iclamp(first, start, stop)
                z = t.iclamp(t.load(cuts, t.iadd(t.imul(t.iadd(part, 1), levels), l), t=I64), a, stop)
                with t.if_(b.icmp_signed("<", a, z)):
                    emit(t, l, t.iadd(base, b.sub(a, first)), a, z)
        b.ret_void()
        t.finish()
        self.fn = _named_by_text(kb.module, fn, "forest")

    def run_or(self, otherwise) -> None:
        cg = self.cg
        b = cg.b
        children, le, roots = (cg.ptr(p) for p in self.ptrs)
        nodes, levels = cg.dim(self.nodes_d), cg.dim(self.kb.graph.nodes[self.ptrs[1]].shape[0])
        parts = cg.var(I64, cg.i64(1))
        split = cg.declare("sc_forest_parts", PTR, [PTR, I64, PTR, I64, PTR, I64, I64, PTR])
        cuts = b.call(split, [children, cg.i64(self.arity), le, levels, roots, cg.dim(self.trees_d), nodes, parts])
        n = b.load(parts)
        with b.if_else(b.icmp_signed(">", n, cg.i64(1))) as (by_trees, by_levels):
            with by_trees:
                b.store(cuts, b.gep(self.frame, [cg.i64(1)], source_etype=I64))
                b.store(levels, b.gep(self.frame, [cg.i64(2)], source_etype=I64))
                b.store(n, b.gep(self.frame, [cg.i64(3)], source_etype=I64))
                par = cg.declare("sc_parallel_for", ir.VoidType(), [PTR, PTR, I64, I64])
                b.call(par, [self.fn, self.frame, n, cg.i64(LEVEL_COST)])
            with by_levels:
                otherwise()


def run_levels(kb, cg: CG, forest, nodes_d, emit, *, down: bool, split: bool, leaves=None) -> None:
    """Every level's rows, `emit(cg, l, slot, a, b)`, bottom up (`down`: top
    down), after `leaves(cg, a, b)` on the leaves' rows: by groups of whole
    trees when `split` and the runtime cuts the forest (`ForestTasks`), else
    level by level (`LevelTasks`; `split`: each level's rows cut between
    threads). `forest`: (children, arity, level_end, roots, trees) as node
    ids, arity and the trees' dimension. The runtime keeps a forest's cut for
    the rest of the call, found by the arrays' addresses: right for arrays no
    kernel writes while the call runs, the model's inputs; a forest made by
    the model itself (none today) would run level by level."""
    children, _, le, roots, _ = forest
    g = kb.graph
    rows = rows_function(kb, cg, emit)
    level = LevelTasks(kb, cg, le, nodes_d, rows)

    def by_levels():
        b = cg.b
        if leaves is not None:
            leaves(cg, cg.i64(0), cg.dim(nodes_d))
        levels = cg.dim(g.nodes[le].shape[0])
        if down:
            with cg.loop(b.sub(levels, cg.i64(1)), name="level") as k:
                level.run(b.sub(b.sub(levels, cg.i64(1)), k), split)       # levels-1 down to 1
        else:
            with cg.loop(levels, start=1, name="level") as l:
                level.run(l, split)
    if split and all(g.nodes[i].op.name == "input" for i in (children, le, roots)):
        ForestTasks(kb, cg, forest, nodes_d, rows, down=down, leaves=leaves).run_or(by_levels)
    else:
        by_levels()


def _task_row(cg: CG, task, tasks, rows, step: int):
    """First row (from the level's start) of task `task` of `tasks`: the rows
    split about evenly at multiples of `step`; task `tasks` ends the level."""
    b = cg.b
    even = b.sdiv(cg.imul(task, rows), tasks)
    at = cg.imul(b.sdiv(even, cg.i64(step)), step)
    return b.select(b.icmp_signed(">=", task, tasks), rows, at)


def _named_by_text(module, fn, what: str = "level"):
    """`fn` renamed after its text (the same level task in two entries of a
    model is one function, and its kernel's text, the cache key, stays the same)."""
    text = function_text(fn).replace(f'"{fn.name}"', f'"@{what}"', 1)
    symbol = f"sc_{hashlib.sha256(text.encode()).hexdigest()[:16]}_{what}"
    existing = module.globals.get(symbol)
    del module.globals[fn.name]
    if existing is not None:
        drop_body(fn)
        return existing
    fn._name = module.scope.register(symbol)
    fn.__dict__.pop("_StringReferenceCaching__cached_refstr", None)
    fn._clear_string_cache()
    module.globals[symbol] = fn
    return fn


def _gather(cg: CG, children, H, regions, start, stop, arity, width, nodes, vw) -> None:
    """Each block's row r - start = [H[child_0(r)], ..., H[child_A-1(r)]]'s
    columns [at, at + w), for r in [start, stop); `regions`: [(pointer, at, w)]."""
    b = cg.b
    with cg.loop(stop, start=start, name="gr") as r:
        for a in range(arity):
            k = load_index(cg, children, cg.iadd(cg.imul(r, arity), a), "i32", None)
            ok = b.and_(b.icmp_signed(">=", k, cg.i64(0)), b.icmp_signed("<", k, nodes))
            dsts = [cg.iadd(cg.imul(b.sub(r, start), arity * w), a * w) for _, _, w in regions]
            with b.if_else(ok) as (then, otherwise):
                with then:
                    for (p, at, w), dst in zip(regions, dsts):
                        copy_row(cg, H, cg.iadd(cg.imul(k, width), at), p, dst, w, vw)
                with otherwise:
                    for (p, at, w), dst in zip(regions, dsts):
                        zero_row(cg, p, dst, w, vw)


def _uncovered(blocks, width: int) -> list:
    """[(at, w)]: the column ranges of a node's state in no block."""
    gaps, at = [], 0
    for _, start, w in sorted(blocks, key=lambda x: x[1]):
        if start > at:
            gaps.append((at, start - at))
        at = max(at, start + w)
    return gaps + ([(at, width - at)] if at < width else [])


def block_regions(cg: CG, base, rows, first, arity: int, blocks) -> list:
    """[(pointer to row `first`, at, w)] of each block in memory of `rows`
    rows laid out block after block ([rows, A*w] each) from `base`."""
    return [(cg.gep(base, cg.iadd(cg.imul(rows, arity * at), cg.imul(first, arity * w))), at, w)
            for _, at, w in blocks]


def _level_bounds(cg: CG, level_end, l, nodes):
    """[start, stop) of level l's rows, clamped to [0, nodes]."""
    b = cg.b
    start = load_index(cg, level_end, b.sub(l, cg.i64(1)), "i32", nodes)
    stop = load_index(cg, level_end, l, "i32", nodes)
    return start, b.select(b.icmp_signed("<", stop, start), start, stop)


def _row_inputs(kb, cg: CG, node, first: int):
    """The body's row-aligned inputs (operands from `first` on, named by
    `node_inputs`): a function of a start row giving {name: pointer to that row}."""
    g = kb.graph
    names = node.attrs.get("node_inputs", ())
    found = []
    for name, nid in zip(names, node.inputs[first:first + len(names)]):
        t = g.nodes[nid].type
        width = 1 if t.rank == 1 else t.shape[1]
        found.append((name, cg.ptr(nid), width, I32 if t.dtype == "i32" else F32))
    return lambda start: {name: cg.gep(p, cg.imul(start, w), et) for name, p, w, et in found}


def _kept_blocks(cg: CG, blocks):
    """The kept values' blocks ([nodes, w] each, named `@keep<k>` in the
    body programs): a function of a start row giving {name: pointer to that row}."""
    found = [(f"@keep{k}", cg.ptr(n.id), n.shape[1]) for k, n in enumerate(blocks)]
    return lambda start: {name: cg.gep(p, cg.imul(start, w)) for name, p, w in found}


def lower_tree_map(kb, node) -> None:
    g = kb.graph
    children, level_end, roots, leaves, s_rows, s_fixed = node.inputs[:6]
    indexed = node.attrs.get("indexed", False)
    leaf_ids = node.inputs[6] if indexed else None     # leaf i's state: row leaf_ids[i] of `leaves`
    arity, width = node.attrs["arity"], node.attrs["width"]
    cw = arity * width          # a gathered row: the children side by side
    blocks = child_blocks(node.attrs.get("blocks", ()), width)
    vw = kb.vector_width
    nodes_d = node.shape[0]
    leaves_d = g.nodes[leaf_ids if indexed else leaves].shape[0]
    # Training keeps every level's gathered block for the backward pass.
    kept = [u for u in g.users(node.id) if g.nodes[u].op.name == "tree_children" and u in kb.layout.buffers]
    # ... and the forward values its programs read instead of recomputing them (`tree_kept`)
    values = sorted((g.nodes[u] for u in g.users(node.id) if g.nodes[u].op.name == "tree_kept"),
                    key=lambda n: n.attrs["index"])
    assert all(v.id in kb.layout.buffers for v in values), "a kept block without memory"
    program = values[0].attrs["keep"] if values else node.attrs["fwd"]
    entry = body_entry(kb, program)
    split = splittable(program)
    with kb.kernel(f"treemap{node.id}", 1, cost=NESTED_WORK) as (cg, lo, hi):
        hoisted(kb, cg, program, cg.ptr(s_fixed))

        def leaf_rows(t: CG, a, z):
            """H's rows [a, z) of the leaves (clamped to them) = the leaf states."""
            last = t.imin(t.imin(t.dim(leaves_d), t.dim(nodes_d)), z)
            a = t.iclamp(a, t.i64(0), last)
            if not indexed:
                copy_row(t, t.ptr(leaves), t.imul(a, width), t.ptr(node.id), t.imul(a, width),
                         t.imul(t.b.sub(last, a), width), vw)
                return
            table, ids = t.ptr(leaves), t.ptr(leaf_ids)
            top = t.b.sub(t.dim(g.nodes[leaves].shape[0]), t.i64(1))      # ids clamped to the table
            with t.loop(last, start=a, name="leaf") as r:
                k = load_index(t, ids, r, g.nodes[leaf_ids].type.dtype, top)
                copy_row(t, table, t.imul(k, width), t.ptr(node.id), t.imul(r, width), width, vw)

        def rows_ab(t: CG, l, slot, a, stop):
            """Gather and run the body on rows [a, stop) of level l (scratch rows from `slot`)."""
            nodes = t.dim(nodes_d)
            H, C, fixed = t.ptr(node.id), t.ptr(s_rows), t.ptr(s_fixed)
            ws = t.gep(C, t.iadd(t.imul(nodes, cw), t.imul(slot, program.rows_floats)))
            # every node's gathered row kept for the backward (tree_children), or one level's in the scratch
            regions = block_regions(t, t.ptr(kept[0]), nodes, a, arity, blocks) if kept else \
                block_regions(t, C, t.b.sub(stop, a), t.i64(0), arity, blocks)
            if not kept:        # this share's rows of the scratch
                regions = [(t.gep(p, t.imul(slot, cw)), at, w) for p, at, w in regions]
            _gather(t, t.ptr(children), H, regions, a, stop, arity, width, nodes, vw)
            gathered = {name: p for (name, _, _), (p, _, _) in zip(blocks, regions)}
            call_body(t, entry, {**gathered, **_row_inputs(kb, t, node, 6 + indexed)(a),
                                 **hoisted_values(t, program, fixed)},
                      {"h": t.gep(H, t.imul(a, width)), **_kept_blocks(t, values)(a)}, fixed, t.b.sub(stop, a), ws)
        forest = (children, arity, level_end, roots, g.nodes[roots].shape[0])
        run_levels(kb, cg, forest, nodes_d, rows_ab, down=False, split=split, leaves=leaf_rows)


def lower_tree_map_grad(kb, node) -> None:
    g = kb.graph
    children, level_end, roots, Hn, seed, c_all, s_rows, s_fixed = node.inputs[:8]
    n_kept = node.attrs.get("kept", 0)
    first_param = 8 + len(node.attrs.get("node_inputs", ()))
    params = node.inputs[first_param:len(node.inputs) - n_kept]
    kept = [g.nodes[k] for k in node.inputs[len(node.inputs) - n_kept:]]
    from_roots = node.attrs.get("from_roots", False)
    arity, width = node.attrs["arity"], node.attrs["width"]
    cw = arity * width          # a gathered row: the children side by side
    cblocks = child_blocks(node.attrs.get("blocks", ()), width)
    c_names = [cotangent_names(name) for name, _, _ in cblocks]      # (@C..., dC...) per block
    e_in = body_entry(kb, node.attrs["bwd_in"])
    e_par = body_entry(kb, node.attrs["bwd_par"])
    names = [k[2:] for k in node.attrs["bwd"].outputs if k.startswith("d:")]
    parts = {g.nodes[u].attrs["param"]: u for u in g.users(node.id) if g.nodes[u].op.name == "tree_grad_part"}
    vw = kb.vector_width
    nodes_d = node.shape[0]
    trees_d = g.nodes[roots].shape[0]
    par_fixed = e_par[2].fixed_floats

    def _grad_blocks(cg: CG) -> dict:
        """The blocks of the scratch (per node: dC, dH when no one reads it,
        the shared cotangents, the bodies' workspace)."""
        nodes, dC = cg.dim(nodes_d), cg.ptr(s_rows)
        spare_rows = cw + width
        cot_at = {}                                 # cotangents both programs need: written once, per level
        for name, w in node.attrs.get("cots", ()):
            cot_at[name] = (cg.gep(dC, cg.imul(nodes, spare_rows)), w)
            spare_rows += aligned(w)
        ws = cg.gep(dC, cg.imul(nodes, spare_rows))
        if node.id in kb.layout.buffers:
            dH = cg.ptr(node.id)
        else:       # no one reads the leaves' cotangent: dH is working memory only
            dH = cg.gep(dC, cg.imul(nodes, cw))
        return {"cot": cot_at, "ws": ws, "dH": dH}

    with kb.kernel(f"treemapgrad{node.id}", 1, cost=NESTED_WORK) as (cg, lo, hi):
        b = cg.b
        nodes = cg.dim(nodes_d)
        H, G, le, R = cg.ptr(Hn), cg.ptr(seed), cg.ptr(level_end), cg.ptr(roots)
        C = cg.ptr(c_all)               # the children's states, gathered by the forward pass
        blocks = _grad_blocks(cg)
        cot_at, dH, ws = blocks["cot"], blocks["dH"], blocks["ws"]
        fixed = cg.ptr(s_fixed)
        # dH is written once per node: at a root from the seed, elsewhere when
        # its (only) parent's level sends it its part of dC.
        last = b.sub(nodes, cg.i64(1))
        with cg.loop(cg.dim(trees_d), name="root") as k:
            r = load_index(cg, R, k, "i32", last)
            copy_row(cg, G, cg.imul(k if from_roots else r, width), dH, cg.imul(r, width), width, vw)
        bwd_in = node.attrs["bwd_in"]
        hoisted(kb, cg, bwd_in, fixed)
        rows_of = _row_inputs(kb, cg, node, 8)
        kept_of = _kept_blocks(cg, kept)

        def rows_ab(t: CG, l, slot, a, stop):
            """Children's cotangents of rows [a, stop) of level l (scratch rows from `slot`), sent to the children's dH."""
            b, nodes = t.b, t.dim(nodes_d)
            H, G, ch, C, fixed = t.ptr(Hn), t.ptr(seed), t.ptr(children), t.ptr(c_all), t.ptr(s_fixed)
            blocks = _grad_blocks(t)
            # this share's rows of dC, block after block
            dC = block_regions(t, t.gep(t.ptr(s_rows), t.imul(slot, cw)), b.sub(stop, a), t.i64(0), arity, cblocks)
            ws = t.gep(blocks["ws"], t.imul(slot, bwd_in.rows_floats))
            at = t.imul(a, width)
            cot_rows = {name: t.gep(p, t.imul(a, w)) for name, (p, w) in blocks["cot"].items()}
            dH = blocks["dH"]
            gathered = {c_in: p for (c_in, _), (p, _, _) in zip(c_names, block_regions(t, C, nodes, a, arity, cblocks))}
            d_out = {c_out: p for (_, c_out), (p, _, _) in zip(c_names, dC)}
            call_body(t, e_in, {**gathered, "@g": t.gep(dH, at), "@h": t.gep(H, at),
                                **_row_inputs(kb, t, node, 8)(a), **_kept_blocks(t, kept)(a),
                                **hoisted_values(t, bwd_in, fixed)}, {**d_out, **cot_rows}, fixed,
                      b.sub(stop, a), ws)
            with t.loop(stop, start=a, name="sc") as r:
                for k in range(arity):
                    kid = load_index(t, ch, t.iadd(t.imul(r, arity), k), "i32", None)
                    ok = b.and_(b.icmp_signed(">=", kid, t.i64(0)), b.icmp_signed("<", kid, nodes))
                    with t.if_(ok):
                        for at_b, w in _uncovered(cblocks, width):     # states no node case reads: no dC
                            at_kid = t.iadd(t.imul(kid, width), at_b)
                            if from_roots:
                                zero_row(t, dH, at_kid, w, vw)
                            else:
                                copy_row(t, G, at_kid, dH, at_kid, w, vw)
                        for p, at_b, w in dC:
                            src = t.iadd(t.imul(b.sub(r, a), arity * w), k * w)
                            at_kid = t.iadd(t.imul(kid, width), at_b)
                            if from_roots:
                                copy_row(t, p, src, dH, at_kid, w, vw)
                            else:
                                sum_rows(t, p, src, G, at_kid, dH, at_kid, w, vw)
        run_levels(kb, cg, (children, arity, level_end, roots, trees_d), nodes_d, rows_ab, down=True,
                   split=splittable(bwd_in))
        # Parameter gradients: one call over every inner node.
        first = load_index(cg, le, cg.i64(0), "i32", nodes)
        inner = b.sub(nodes, first)
        outs, spare = {}, par_fixed
        for name, p in zip(names, params):
            if name in parts:
                outs[f"d:{name}"] = cg.ptr(parts[name])
            else:                                          # nothing reads it: a spare buffer
                outs[f"d:{name}"] = cg.gep(fixed, cg.i64(spare))
                spare += aligned(g.nodes[p].type.size().coef)
        cot_rows = {name: cg.gep(p, cg.imul(first, w)) for name, (p, w) in cot_at.items()}
        with b.if_else(b.icmp_signed(">", inner, cg.i64(0))) as (then, otherwise):
            with then:
                at = cg.imul(first, width)
                inv = hoisted(kb, cg, node.attrs["bwd_par"], fixed)
                gathered = {c_in: p for (c_in, _), (p, _, _) in
                            zip(c_names, block_regions(cg, C, nodes, first, arity, cblocks))}
                call_body(cg, e_par, {**gathered, "@g": cg.gep(dH, at), "@h": cg.gep(H, at),
                                      **rows_of(first), **kept_of(first), **cot_rows, **inv}, outs, fixed, inner, ws)
            with otherwise:                                # no inner node: nothing to differentiate
                for name, p in zip(names, params):
                    n = g.nodes[p].type.size().coef
                    zero_rows(cg, outs[f"d:{name}"], cg.i64(0), cg.i64(1), n, vw)
