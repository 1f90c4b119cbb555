"""Which LLVM pipeline each module gets (issue 14 item 3), and the entry
points' IR: entry points are modules of their own with a cheap pipeline."""
import ctypes
import re

import numpy as np
import pytest
from llvmlite import ir

import structc
from structc import api, native
from structc.compiler import compile_source
from structc.lower import module as lower_module
from structc.lower.codegen import CG, I64, PTR
from structc.types import Size

MLP = ("model M {\n  input x: f32[N, 6]\n  target y: class[N] of 3\n"
       "  h = dense(x, 8) |> relu\n  loss cross_entropy(dense(h, 3), y)\n}\n")
X = np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6)
Y = np.array([0, 1, 2, 1])
ENTRY_NAMES = re.compile(r"^sc_(forward|train|update|eval_loss)(_workspace)?$")


def defined(text: str) -> list[str]:
    return re.findall(r'^define [^@]*@"([^"]+)"', text, re.M)


@pytest.fixture(scope="module")
def expected():
    """source -> (forward output, first training loss) of a fresh net, compiled once."""
    found = {}

    def of(src):
        if src not in found:
            net = structc.compile(src, cache=False, training=True)
            found[src] = (net(x=X), net.train_step(0.1, x=X, y=Y))
        return found[src]
    return of


def same_program(art, src, expected) -> None:
    net = structc.Net(art.meta, native.JitModule(art.object, native.host_target()))
    out, loss = expected(src)
    np.testing.assert_array_equal(net(x=X), out)
    assert net.train_step(0.1, x=X, y=Y) == loss


def check_entry_modules(texts) -> None:
    """Every entry point is in a module marked ENTRY_CODE, and such a module holds entry points only."""
    marked = [t for t in texts if t.startswith(lower_module.ENTRY_CODE)]
    assert marked
    for text in texts:
        names = defined(text)
        assert names
        assert (text in marked) == all(ENTRY_NAMES.match(n) for n in names), names
        assert (text in marked) == any(ENTRY_NAMES.match(n) for n in names), names


@pytest.mark.parametrize("mode", ["by_unit", "chunks", pytest.param("kernel_timings", marks=pytest.mark.slow)])
def test_entry_points_are_modules_of_their_own_marked_for_the_entry_pipeline(tmp_path, monkeypatch, mode, expected):
    monkeypatch.setenv("STRUCTC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("STRUCTC_COMPILE_THREADS", "2")
    if mode == "by_unit":       # what structc.compile does with the cache on
        art = api.compile_artifact(MLP, parts=["forward", "training"])
    else:
        art = compile_source(MLP, kernel_timings=mode == "kernel_timings")
    check_entry_modules(art.part_ir)
    pipelines = {native.pipeline_of(t) for t in art.part_ir}     # the MLP's kernels: short, memory, light
    assert "entry" in pipelines and len(pipelines) > 1
    same_program(art, MLP, expected)


def test_entry_modules_get_the_entry_pass_list_and_codegen_level(monkeypatch):
    ran, levels = [], {}
    real_list, real_tm = native._pass_list, native.new_target_machine
    monkeypatch.setattr(native, "_pass_list", lambda names: ran.append(tuple(names)) or real_list(names))

    def target_machine(target, jit=True, opt=3):
        levels.setdefault(opt, 0)
        levels[opt] += 1
        return real_tm(target, jit, opt)
    monkeypatch.setattr(native, "new_target_machine", target_machine)
    monkeypatch.setenv("STRUCTC_COMPILE_THREADS", "1")
    art = compile_source(MLP)
    entry = [t for t in art.part_ir if native.pipeline_of(t) == "entry"]
    assert len(entry) == 2      # one per part
    assert ran.count(native.ENTRY_PIPELINE) == len(entry)
    assert levels[native.ENTRY_CODEGEN_LEVEL] == len(entry) and levels[3] == len(art.part_ir) - len(entry)


def test_the_training_entry_keeps_no_frame_in_memory_and_one_for_its_kernels():
    """The entry's slots are values, not a frame it stores and loads back; its
    kernels share one frame, filled before each call."""
    art = compile_source(MLP)
    text = next(t for t in art.part_ir if '@"sc_train"(' in t)
    body = re.search(r'define i32 @"sc_train"\(.*?\n}\n', text, re.S).group(0)
    frames = re.findall(r'= alloca \[(\d+) x i64\]', body)
    assert len(frames) == 1 and int(frames[0]) <= 12, frames
    calls = body.count('call void @"sc_parallel_for"')
    assert calls >= 6 and len(body.splitlines()) < 40 * calls


# -- the entry's arithmetic --------------------------------------------------------------

def test_sdiv_rounds_towards_zero_as_llvm_does():
    assert [lower_module._sdiv(a, b) for a, b in ((7, 2), (-7, 2), (7, -2), (-7, -2), (0, 5))] == [3, -3, -3, 3, 0]


def test_folding_stops_where_int64_would_wrap():
    module = ir.Module()
    cg = CG(module, ir.Function(module, ir.FunctionType(ir.VoidType(), []), name="f"))
    assert lower_module._fold(cg, lambda a, b: a * b, 3, cg.i64(5)).constant == 15
    assert lower_module._fold(cg, lambda a, b: a * b, 1 << 40, 1 << 30) is None
    assert lower_module._fold(cg, lambda a, b: a * b, cg.i64(2), ir.Constant(ir.IntType(32), 3)) is None


SLOTS = [[Size(4, ("N",)), Size(32, ("N",)), Size(1088)], [Size(4, ("N",)), Size(32, ("N",))], [Size(136)],
         [Size(2, ("E", "N")), Size(4, ("N",)), Size(64)], [Size(32, ("N",)), Size(4, ("N",))], [Size(7)]]


def reference_workspace(dims: dict) -> int:
    """What the workspace function must return: each slot its largest size in
    whole 64-byte lines, or -1 when a step does not fit int64."""
    top, at = (1 << 63) - 1, 0
    for sizes in SLOTS:
        biggest = 0
        for s in sizes:
            n = s.coef
            for sym in s.symbols:
                n *= dims[sym]
                if n > top:
                    return -1
            biggest = max(biggest, n)
        if biggest + 15 > top:
            return -1
        lines = (biggest + 15) // 16 * 64
        at += lines
        if lines > top or at > top:
            return -1
    return at


def test_workspace_sizes_with_shared_and_constant_sizes_are_exact():
    """The slot offsets compute each size, and the largest of the same sizes,
    once, and constants in Python: the same bytes as the plain sum, and -1
    where int64 would wrap."""
    module = ir.Module()
    module.triple = native.host_target().triple
    fn = ir.Function(module, ir.FunctionType(I64, [PTR]), name="ws")
    symbols = ["E", "N"]
    cg = CG(module, fn, lower_module._DimsFromArray(symbols), frame=fn.args[0])
    checked = lower_module._Checked(cg)
    plan = type("Plan", (), {"slots": SLOTS})()
    _, total = lower_module._slot_offsets(cg, plan, checked)
    cg.b.ret(cg.b.select(checked.overflow, cg.i64(lower_module.WORKSPACE_OVERFLOW), total))
    cg.finish()
    text = str(module)
    assert text.count("smul.with.overflow.i64(") <= 5      # 4*N, 32*N, 2*E, 2*E*N: each once
    jit = native.JitModule(native.compile_object(text, native.host_target()), native.host_target())
    call = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p)(jit.address("ws"))
    for e, n in ((1, 1), (3, 100), (1000, 7), (1 << 20, 1 << 30), (1 << 40, 1 << 30), (1, 1 << 59)):
        dims = (ctypes.c_int64 * 2)(e, n)
        assert call(ctypes.addressof(dims)) == reference_workspace({"E": e, "N": n}), (e, n)


def test_lane_masks_set_the_lanes_under_any_count():
    """`CG.lane_mask(remaining, n)` sets lanes [0, remaining) for any i64 count: the
    count is clamped before it is compared in 32-bit lanes, so a count past 2^31 or
    far below zero (whose low 32 bits alone would read as a small count) sets all
    lanes or none; a constant count gives the same lanes."""
    module = ir.Module()
    module.triple = native.host_target().triple
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64, PTR, PTR]), name="masked")
    cg = CG(module, fn)
    count, src, dst = fn.args
    cg.store(cg.load(src, cg.i64(0), n=8, mask=cg.lane_mask(count, 8)), dst, cg.i64(0))
    cg.store(cg.load(src, cg.i64(0), n=8, mask=cg.lane_mask(cg.i64(-(1 << 40) + 3), 8)), dst, cg.i64(8))
    cg.store(cg.load(src, cg.i64(0), n=8, mask=cg.lane_mask(cg.i64(5), 8)), dst, cg.i64(16))
    cg.b.ret_void()
    cg.finish()
    jit = native.JitModule(native.compile_object(str(module), native.host_target()), native.host_target())
    call = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p)(jit.address("masked"))
    src_values = np.arange(1, 9, dtype=np.float32)
    for remaining in (-(1 << 40) + 3, -(1 << 33), -1, 0, 1, 5, 8, 9, 1 << 31, (1 << 32) + 3, (1 << 62)):
        out = np.full(24, -1.0, np.float32)
        call(remaining, src_values.ctypes.data, out.ctypes.data)
        lanes = min(max(remaining, 0), 8)
        np.testing.assert_array_equal(out[:8], np.where(np.arange(8) < lanes, src_values, 0), err_msg=str(remaining))
        np.testing.assert_array_equal(out[8:16], np.zeros(8, np.float32))
        np.testing.assert_array_equal(out[16:], np.where(np.arange(8) < 5, src_values, 0))


# -- a kernel's task count is computed where the call is when it reads memory -------------

class _Slots:
    def __init__(self):
        self.dims = {"N": 0}

    def dim_slot(self, name):
        return self.dims[name]


def _entry_with_kernel(tasks):
    module = ir.Module()
    fn = ir.Function(module, ir.FunctionType(ir.IntType(32), lower_module.ENTRY_ARGS), name="sc_t")
    cg = lower_module.EntryCG(module, fn, _Slots())
    cg.provide(0, lambda: cg.eb.load(fn.args[6], typ=I64))
    cg.provide(1, lambda: fn.args[0])
    kb = lower_module.KernelBuilder(module, None, cg.layout, cg, native.host_target(), "sc_t",
                                    lower_module.SharedKernels())
    with kb.kernel("k", tasks, cost=1000) as (kcg, lo, hi):
        kcg.slot(1, PTR)
    call = [i for i in cg.body.instructions if isinstance(i, ir.CallInstr)][0]
    return cg, call.args[2]


def test_a_task_count_that_reads_no_memory_is_computed_once_in_the_entry_block():
    cg, n = _entry_with_kernel(lambda e: e.imul(e.dim("N"), 3))
    assert n.parent is cg.entry


def test_a_task_count_that_reads_memory_is_computed_again_before_its_call():
    """A kernel before this one may write what it reads: the entry block
    (before every kernel) is too early for the call's count."""
    cg, n = _entry_with_kernel(lambda e: e.b.load(e.slot(1, PTR), typ=I64))
    assert n.parent is cg.body


def test_constant_task_counts_and_costs_fold():
    cg, n = _entry_with_kernel(lambda e: e.ceil_div(e.imul(e.i64(100), 4), 64))
    assert isinstance(n, ir.Constant) and n.constant == 7


# -- memory-bound kernels ---------------------------------------------------------------

@pytest.mark.parametrize("mode", ["by_unit", "chunks"])
def test_memory_bound_kernels_are_modules_of_their_own_with_o3_untuned(tmp_path, monkeypatch, mode, expected):
    """Fused elementwise kernels and sums (`MEMORY_KINDS`) are modules marked
    MEMORY_CODE, which O3 runs without unrolling and interleaving; no other
    kernel is in such a module. The optimiser's update and the sums over
    leading axes (the biases' gradients) are explicit vector code (the short
    pipeline: O3 left their arithmetic as it was, at twice the time)."""
    monkeypatch.setenv("STRUCTC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("STRUCTC_COMPILE_THREADS", "2")
    tunings = []
    real = native.llvm.create_pass_builder
    monkeypatch.setattr(native.llvm, "create_pass_builder",
                        lambda tm, pto: tunings.append((pto.loop_unrolling, pto.loop_interleaving)) or real(tm, pto))
    src = MLP.replace("|> relu", "|> relu\n  h = h * h + 1")      # an elementwise kernel of its own
    art = api.compile_artifact(src, parts=["forward", "training"]) if mode == "by_unit" else compile_source(src)
    kinds = {t: {lower_module.kernel_kind(n) for n in defined(t)} for t in art.part_ir}
    memory = [t for t in art.part_ir if native.pipeline_of(t) == "memory"]
    assert memory and set().union(*(kinds[t] for t in memory)) >= {"ew"}
    for text in art.part_ir:
        if kinds[text] <= lower_module.MEMORY_KINDS:
            assert native.pipeline_of(text) in ("memory", "short"), kinds[text]
        else:
            assert text not in memory, kinds[text]
    for kind in ("update", "sum"):
        explicit = [t for t in art.part_ir if kind in kinds[t]]
        assert explicit and all(native.pipeline_of(t) == "short" for t in explicit), kind
    if mode == "chunks":    # compiled here (the cache may hold the other mode's objects)
        light = [t for t in art.part_ir if native.pipeline_of(t) == "light"]    # untuned too (`LIGHT_TUNING`)
        assert tunings.count((False, False)) == len(memory) + len(light) and tunings.count((True, True)) >= 1
    same_program(art, src, expected)


@pytest.mark.parametrize("shape", [(84, 10), (3, 48)])
def test_a_transpose_with_a_side_under_the_vector_width_emits_no_block(shape):
    """With a side (known) under the vector width no vw x vw block is ever
    whole: the block's 64 shuffles were emitted anyway, never ran, and cost
    LLVM ~20 ms per transpose (LeNet-5's 84 x 10). Its edge loop does it all."""
    rows, cols = shape
    src = f"model T {{\n  input x: f32[{rows}, {cols}]\n  output y = transpose(x)\n}}\n"
    art = compile_source(src, target=native.named_target("x86-64-v4"), jit=False)   # 16 lanes, whatever the host
    [text] = [t for t in art.part_ir if re.search(r'^define [^@]*@"sc_[0-9a-f]+_transpose"', t, re.M)]
    assert "shufflevector" not in text
    x = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    np.testing.assert_array_equal(structc.compile(src, cache=False)(x=x), x.T)



def test_a_transpose_of_sizes_read_at_run_time_is_numpys():
    """Sizes read at run time: whole vw x vw blocks in registers, the blocks cut
    by the right or bottom edge element by element. Whatever the sizes (under,
    at and past the vector width) and threads, the result is numpy's."""
    net = structc.compile("model T {\n  input x: f32[N, M]\n  output y = transpose(x)\n}\n", cache=False)
    rng = np.random.default_rng(0)
    before = structc.native.get_num_threads()
    try:
        for threads in (1, 2):
            structc.set_num_threads(threads)
            for n in (1, 3, 15, 16, 17, 33, 300):
                for m in (1, 5, 16, 17, 40, 120):
                    x = rng.normal(size=(n, m)).astype(np.float32)
                    np.testing.assert_array_equal(net(x=x), x.T, err_msg=f"{n} x {m}, {threads} thread(s)")
    finally:
        structc.set_num_threads(before)


@pytest.mark.parametrize("n,m", [(16, 16), (64, 48), (200, 37), (65, 300), (7, 70)])
def test_a_large_transposes_tasks_of_several_blocks_are_numpys(monkeypatch, n, m):
    """Sizes known at compile time and large enough (the limit lowered here to 1
    byte) give tasks of TRANSPOSE_BLOCKS blocks of rows, column block by column
    block: a last task of fewer blocks (200, 65 rows), a last block cut by the
    bottom edge and a ragged right edge, fewer rows than a block (7), at 1 and
    2 threads; the result is numpy's."""
    import structc.ops.matmul as matmul
    monkeypatch.setattr(matmul, "TRANSPOSE_STACKED_BYTES", 1)
    net = structc.compile(f"model T {{\n  input x: f32[{n}, {m}]\n  output y = transpose(x)\n}}\n", cache=False)
    x = np.random.default_rng(n * m).normal(size=(n, m)).astype(np.float32)
    before = structc.native.get_num_threads()
    try:
        for threads in (1, 2):
            structc.set_num_threads(threads)
            np.testing.assert_array_equal(net(x=x), x.T, err_msg=f"{threads} thread(s)")
    finally:
        structc.set_num_threads(before)

# -- kernels O1 compiles to O3's machine code ------------------------------------------

CONV = ("model C {\n  input x: f32[N, 1, 12, 12]\n  target y: class[N] of 3\n"
        "  h = conv(x, 4, kernel=3) |> relu\n  loss cross_entropy(dense(flatten(h), 3), y)\n}\n")


_FAMILY = re.compile(r"\t(v?p?cmp|cmov|j|set|add)")


def _fixed_target() -> native.Target:
    """Zen 4 with x86-64-v4's features, whatever the host: the machine code
    compared below must not depend on the machine the tests run on."""
    return native.Target(native.host_target().triple, "znver4", native.named_target("x86-64-v4").features)


def _instructions(text: str, pipeline: str) -> list[str]:
    """The module's machine instructions under `pipeline` ("O3" or the module's own)."""
    if pipeline == "O3":
        text = "\n".join(text.split("\n")[1:]) if text.startswith("; structc:") else text
    asm = native.assembly(text, _fixed_target())
    return [line for line in asm.splitlines() if line.startswith("\t") and not line.startswith("\t.")]


def same_machine_code(ours: list[str], o3: list[str]) -> bool:
    """As many instructions, each the same but for the twin of a compare
    (signed for unsigned: O1 and O3 may test a non-negative bound either way)
    or an add of another width: the same work."""
    def family(line):
        m = _FAMILY.match(line)
        return m.group(1) if m else None
    return len(ours) == len(o3) and all(a == b or (family(a) is not None and family(a) == family(b))
                                        for a, b in zip(ours, o3))


@pytest.mark.parametrize("mode", ["by_unit", "chunks"])
def test_light_kernels_are_modules_of_their_own_at_o1_with_o3s_machine_code(tmp_path, monkeypatch, mode):
    """Convolutions and cross-entropy (`LIGHT_KINDS`) are modules marked
    LIGHT_CODE, optimised at O1 without unrolling and interleaving; what
    comes out is O3's machine code, instruction for instruction (why they
    may have it: it costs LLVM less), and no other kernel is in such a module."""
    monkeypatch.setenv("STRUCTC_CACHE_DIR", str(tmp_path))
    levels = []
    real = native.llvm.create_pass_builder
    monkeypatch.setattr(native.llvm, "create_pass_builder",
                        lambda tm, pto: levels.append((pto.speed_level, pto.loop_unrolling)) or real(tm, pto))
    target = _fixed_target()
    art = api.compile_artifact(CONV, parts=["forward", "training"], target=target) if mode == "by_unit" \
        else compile_source(CONV, target=target)
    kinds = {t: {lower_module.kernel_kind(n) for n in defined(t)} for t in art.part_ir}
    light = [t for t in art.part_ir if native.pipeline_of(t) == "light"]
    assert light and set().union(*(kinds[t] for t in light)) >= {"conv", "xent", "xentgrad"}
    for text in art.part_ir:
        assert (text in light) == (kinds[text] <= lower_module.LIGHT_KINDS), kinds[text]
    levels.clear()
    for text in light:
        assert same_machine_code(_instructions(text, "light"), _instructions(text, "O3"))
    assert levels.count((1, False)) == len(light)


def test_the_empty_contraction_kernel_gets_the_short_pipeline():
    """A weight gradient's `_k0` kernel runs only when its K (a batch, the
    edges of a graph) is 0: explicit vector code, for the short pipeline, not
    O3 (~10 ms of LLVM each). test_gnn's no-edges case runs one. (A weight
    gradient of a few tasks is computed in parts, which need none: this one,
    [200, 96], is six.)"""
    wide = MLP.replace("f32[N, 6]", "f32[N, 200]").replace("dense(x, 8)", "dense(x, 96)")
    art = compile_source(wide, parts=["forward", "training"])
    k0 = [t for t in art.part_ir if any(lower_module.kernel_kind(n) == "matmul_k0" for n in defined(t))]
    assert k0 and all(native.pipeline_of(t) == "short" for t in k0)


def test_pooling_kernels_get_the_memory_pipeline():
    """Max pooling, its gradient's routing, the kernel flip and the clip's norm are memory-bound
    (`MEMORY_KINDS`): O3 without unrolling, their modules marked MEMORY_CODE."""
    src = CONV.replace("|> relu", "|> relu |> maxpool2d(2)\n  h = conv(h, 4, kernel=3)")   # a flip: dx of conv 2
    art = api.compile_artifact(src, parts=["forward", "training"], cache=False)
    kinds = {lower_module.kernel_kind(n): native.pipeline_of(t) for t in art.part_ir for n in defined(t)}
    assert {kinds["maxpool"], kinds["route"], kinds["flip"], kinds["update_clip"]} == {"memory"}


def test_transposes_folded_into_products_give_numpys_gradients():
    """A tied output layer `h @ transpose(W)` and a transposed product of a
    transpose (`simplify` folds both into matmul flags): the loss and every
    gradient numpy's, in float64, at 1 and 2 threads; of the training graph's
    six transposes one is left."""
    source = """model T { input x: f32[N, 6]
      input u: f32[5, 4]
      target y: class[N] of 7
      target t: f32[4, 6]
      param W: f32[7, 6] = normal(0.3)
      param P: f32[5, 6] = normal(0.3)
      loss cross_entropy(x @ transpose(W), y) + mse(transpose(transpose(P) @ u), t) }"""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(9, 6)).astype(np.float32)
    u = rng.normal(size=(5, 4)).astype(np.float32)
    y = rng.integers(0, 7, 9).astype(np.int32)
    t = rng.normal(size=(4, 6)).astype(np.float32)
    net = structc.compile(source, cache=False, seed=1)
    W, P = (net.params[k].astype(np.float64) for k in ("W", "P"))
    z = x @ W.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = (p - np.eye(7)[y]) / len(x)
    e = u.T @ P - t
    want_loss = -np.log(p[np.arange(len(x)), y]).mean() + (e ** 2).mean()
    want = {"W": dz.T @ x, "P": u @ (2 * e / e.size)}
    from test_gemm import _at_1_and_2_threads
    for loss, grads in _at_1_and_2_threads(net.grad, x=x, u=u, y=y, t=t).values():
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
        for k, v in want.items():
            np.testing.assert_allclose(grads[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
    stages = {}
    compile_source(source, dump=lambda name, text: stages.__setitem__(name, text))
    count = lambda stage: stages[stage].count("= transpose(")
    # six in the training graph (the source's three and the VJPs'), one left: the
    # kernel's B of x @ W^T, which legalize makes
    assert (count("train"), count("train.legalize")) == (6, 1)
