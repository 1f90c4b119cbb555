"""The kernel profiler: `net.profile`, `structc profile`, its table and its trace."""
import ctypes
import dataclasses
import functools
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

import structc
from structc.cli import main
from structc.compiler import compile_source
from structc.native import assembly, named_target
from structc.profile import EVENT, FLOPS, _shim, fma_peak, peak_chains, peak_module, profile, profiled_net

pytestmark = pytest.mark.slow   # launches processes or compiles many models: not in the fast subset

ROOT = Path(__file__).parent.parent
MLP = ROOT / "examples" / "digits_mlp.snet"
PEAK = 100.0      # GFLOP/s: given, so that most tests do not measure it


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return {"x": rng.random((64, 64), dtype=np.float32), "y": rng.integers(0, 10, 64).astype(np.int32)}


@pytest.fixture(scope="module")
def report(batch):
    return structc.compile(MLP).profile(steps=3, peak=PEAK, **batch)


@functools.lru_cache(maxsize=1)
def mlp_llvm_ir() -> str:
    dumps = {}
    art = compile_source(MLP.read_text(), str(MLP), dump=lambda stage, text: dumps.__setitem__(stage, text))
    # kernels are named after their text; the report names each after the first layer that asked for it
    asked = {symbol: name for name, symbol in reversed(art.kernel_symbols.items())}
    return re.sub(r'@"(sc_[0-9a-f]{16}_[^"]*)"', lambda m: f'@"{asked[m.group(1)]}"', dumps["llvm"])


def kernels_called(entry: str) -> set[str]:
    """The kernels the entry point `entry` runs, read from the LLVM IR, but for
    the `_k0` ones, which have tasks only when a contraction is empty (no rows)."""
    body = re.search(rf'define i32 @"{entry}"\(.*?\n}}', mlp_llvm_ir(), re.S).group(0)
    return {k for k in re.findall(r'call void @"sc_parallel_for"\([^@]*@"([^"]+)"', body) if not k.endswith("_k0")}


def test_the_table_has_every_kernel_of_the_step(report):
    expected = kernels_called("sc_train")
    assert len(expected) > 10
    assert {r.kernel.name for r in report.rows} == expected
    table = report.table()
    for name in expected:
        assert name in table


def test_the_forward_pass_has_its_own_kernels(batch):
    net = structc.compile(MLP)
    report = net.profile(steps=2, forward=True, peak=PEAK, **batch)     # the targets are left out
    assert {r.kernel.name for r in report.rows} == kernels_called("sc_forward")
    assert report.kind == "forward"


def test_shares_sum_to_the_whole_step(report):
    total = sum(report.share(r.seconds) for r in report.rows if not r.nested) + report.share(report.outside_seconds)
    assert total == pytest.approx(100, abs=0.5)
    assert report.kernel_seconds <= report.step_seconds


def test_kernels_are_grouped_under_the_snet_line_of_their_layer(report):
    lines = dict(report.by_line())
    first_dense = MLP.read_text().splitlines().index("  h = dense(x, 128) |> relu") + 1
    names = [r.kernel.name for r in lines[first_dense]]
    assert any("matmul" in n for n in names), names
    table = report.table()
    assert f"{first_dense:4d}  h = dense(x, 128) |> relu" in table
    # the forward matmul of that layer: 2 * 64 rows * 128 columns * 64 inputs flops a call
    forward = next(r for r in lines[first_dense] if r.kernel.name.startswith("sc_forward_matmul"))
    assert forward.kernel.flop_count({"N": 64}) == 2 * 64 * 128 * 64
    assert forward.gflops > 0 and forward.percent_of(PEAK) > 0


def test_a_kernel_gradient_in_parts_counts_every_image_once():
    """conv2d_kernel_grad_parts' flops are the whole batch's, whatever the parts."""
    src = ("model C {\n  input x: f32[N, 2, 8, 8]\n  target y: class[N] of 3\n"
           "  h = conv(x, 4, kernel=3) |> relu\n  loss cross_entropy(dense(flatten(h), 3), y)\n}\n")
    net = structc.compile(src, cache=False)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 2, 8, 8)).astype(np.float32), rng.integers(0, 3, 6).astype(np.int32)
    report = net.profile(steps=2, peak=PEAK, x=x, y=y)
    grad = next(r for r in report.rows if "convk" in r.kernel.name)
    assert grad.kernel.flop_count({"N": 6}) == 2 * 6 * 4 * 6 * 6 * 2 * 3 * 3
    assert grad.gflops > 0


@pytest.mark.parametrize("stride, padding, kernel, width", [(2, 1, 3, 16), (2, 0, 2, 15), (3, 2, 5, 20), (2, 2, 4, 11)])
def test_a_strided_convolutions_input_gradient_counts_taps_on_input_only(stride, padding, kernel, width):
    """Its kernel runs over the delta dilated by the stride and skips the holes: the
    flops counted are the products with a real delta element, as many as a
    convolution of ones finds (two flops each), not every tap of the dilated plane."""
    from types import SimpleNamespace as NS

    from structc.ops.conv import conv2d_reference, conv_input_grad
    x, w = (2, 3, 9, width), (4, 3, kernel, kernel)
    out = conv2d_reference(np.zeros(x), np.zeros(w), stride=(stride, stride), padding=(padding,) * 4)
    made = {}

    class Recorder:         # the VJP's builder, recording the convolution it asks for
        def flip_kernel(self, w):
            return w

        def conv2d(self, g, w, **attrs):
            made.update(attrs)
    conv_input_grad(Recorder(), NS(shape=out.shape), NS(shape=w), x[2:], stride=(stride, stride),
                    padding=(padding,) * 4, input_dilation=(1, 1))
    ones = conv2d_reference(np.ones(out.shape), np.ones(w).transpose(1, 0, 2, 3), **made)
    assert ones.shape == x
    graph = NS(nodes={0: NS(shape=out.shape), 1: NS(shape=(3, 4, kernel, kernel))})
    count = FLOPS["conv2d"](graph, NS(inputs=(0, 1), shape=x, attrs=made))
    assert np.prod(count) == 2 * ones.sum()


def test_a_kernel_two_layers_share_is_listed_under_both_lines():
    """Two layers of one shape compile to one kernel (named by its text): the
    report files it under the first layer's line and names the second's too,
    rather than counting both layers' time against the first alone."""
    src = ("model Twin {\n  input x: f32[N, 16]\n  target y: class[N] of 4\n"
           "  h = dense(x, 16) |> relu\n  h = dense(h, 16) |> relu\n  h = dense(h, 16) |> relu\n"
           "  loss cross_entropy(dense(h, 4), y)\n}\n")
    rng = np.random.default_rng(0)
    x, y = rng.random((32, 16), dtype=np.float32), rng.integers(0, 4, 32).astype(np.int32)
    report = structc.compile(src, cache=False).profile(steps=2, forward=True, peak=PEAK, x=x)
    shared = [r for r in report.rows if len({s.line for s in r.kernel.spans}) >= 3]
    assert shared, report.table()
    assert "(+ lines 5,6)" in report.table()


def test_the_trace_is_chrome_trace_json_with_a_lane_per_thread(report, tmp_path):
    path = report.write_trace(tmp_path / "trace.json")
    trace = json.loads(path.read_text())
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    for e in complete:
        assert {"name", "ph", "ts", "dur", "pid", "tid"} <= set(e)
        assert isinstance(e["tid"], int) and e["dur"] >= 0
    named = {e["name"] for e in complete}
    assert {r.kernel.name for r in report.rows} <= named          # >= 1 event per kernel
    lanes = {e["tid"] for e in complete}
    assert 0 in lanes and lanes == set(range(len(lanes)))        # the caller first, then workers
    threads = [e for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"]
    assert {e["tid"] for e in threads} == lanes
    steps = [e for e in complete if e.get("cat") == "step"]
    assert len(steps) == 3 and all(e["tid"] == 0 for e in steps)


def test_profiling_leaves_the_model_as_it_was(batch):
    net = structc.compile(MLP)
    net.train_step(lr=0.1, **batch)
    before = {k: v.copy() for k, v in net.params.items()}
    net.profile(steps=3, peak=PEAK, lr=0.5, **batch)
    for name, value in net.params.items():
        np.testing.assert_array_equal(value, before[name])
    assert net._step == 1


def test_the_profiled_copy_freezes_what_the_model_freezes(batch):
    # the copy was compiled without the model's freeze, so a profile of a model with
    # frozen layers timed their weight gradients, which its training never computes
    from structc.profile import profile_copy
    net = structc.compile(MLP, freeze=["dense1"])
    copy = profile_copy(net)
    assert copy.meta["frozen"] == net.meta["frozen"] and "dense1.w" in copy.meta["frozen"]
    report = net.profile(steps=2, peak=PEAK, **batch)
    assert report.table()


def test_models_loaded_after_profiling_do_not_run_through_the_shim(batch):
    profiled_net(MLP.read_text(), str(MLP))
    net = structc.compile(MLP, cache=False)
    buffer = np.zeros(1024, EVENT)
    lost = ctypes.c_int64(0)
    _shim().sc_prof_start(buffer.ctypes.data, len(buffer))
    try:
        net.train_step(**batch)
    finally:
        written = _shim().sc_prof_stop(ctypes.byref(lost))
    assert written == 0 and lost.value == 0


def test_bad_arguments_are_refused_before_anything_is_compiled(batch, monkeypatch):
    net = structc.compile(MLP)
    monkeypatch.setattr("structc.profile.profile_copy", lambda net: pytest.fail("compiled a copy"))
    with pytest.raises(ValueError, match="steps"):
        net.profile(steps=0, peak=PEAK, **batch)
    with pytest.raises(ValueError, match="peak"):
        net.profile(steps=1, peak=-1.0, **batch)
    with pytest.raises(ValueError, match="input 'x'"):
        net.profile(steps=1, peak=PEAK, x=batch["x"][:, :10], y=batch["y"])
    with pytest.raises(ValueError, match="peak"):
        net.profile(steps=1, peak=True, **batch)
    with pytest.raises(ValueError, match="profiled_net"):
        profile(net, batch, steps=1, peak=PEAK)


def test_the_measured_peak_is_a_positive_rate_and_leaves_llvm_usable(batch, monkeypatch):
    assert fma_peak() > 1.0
    # measured once a process: a second profile does not compile and time the loop again
    monkeypatch.setattr("structc.native.optimize", lambda *a, **k: pytest.fail("measured the peak again"))
    assert fma_peak() > 1.0
    monkeypatch.undo()
    # the peak's engine must not free the target machine later compiles share
    net = structc.compile(MLP, cache=False)
    assert np.isfinite(net.train_step(**batch))


@pytest.mark.parametrize("target", ["x86-64-v3", "x86-64-v4"])
def test_the_peak_s_chains_stay_in_registers(target):
    # a chain spilled to the stack runs at a load and a store's pace, not the FMA's:
    # 24 chains on AVX2's 16 registers measured a Zen 1 at 29 GFLOP/s against 42
    tg = named_target(target)
    asm = assembly(peak_module(tg, peak_chains(tg.vector_width)), tg)
    assert asm.count("vfmadd") >= peak_chains(tg.vector_width)
    assert "(%rsp)" not in asm
    if tg.vector_width == 8:
        assert "(%rsp)" in assembly(peak_module(tg, 24), tg)      # the guard can fail


def test_cli_profile_prints_the_table_and_writes_the_trace(tmp_path, capsys):
    trace = tmp_path / "t.json"
    assert main(["profile", str(MLP), "--data", "digits", "--steps", "2", "--batch", "16", "--peak", "50",
                 "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "h = dense(x, 128) |> relu" in out and "sc_train_matmul" in out
    assert json.loads(trace.read_text())["traceEvents"]


def test_cli_profile_refuses_a_trace_it_cannot_write(tmp_path, capsys):
    assert main(["profile", str(MLP), "--data", "digits", "--trace", str(tmp_path / "no" / "t.json")]) == 2
    assert "cannot write the trace" in capsys.readouterr().err


def test_version_names_the_compiler_and_llvm(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    from structc.compiler import compiler_fingerprint
    assert compiler_fingerprint() in out
    assert re.search(r"llvmlite \d+\.\d+.*LLVM \d+\.\d+", out)
    assert "CPU" in out


def test_a_first_step_too_big_for_the_probe_buffer_is_recorded_again(batch, monkeypatch):
    monkeypatch.setattr("structc.profile.PROBE_EVENTS", 4)
    report = profile(profiled_net(MLP.read_text(), str(MLP)), batch, steps=2, peak=PEAK)
    assert {r.kernel.name for r in report.rows} == kernels_called("sc_train")


def test_kernels_run_inside_a_recursion_are_marked_and_counted_once(capsys):
    assert main(["profile", str(ROOT / "examples" / "logic_tree.snet"), "--data", "logic", "--steps", "2",
                 "--batch", "4", "--peak", "50"]) == 0
    out = capsys.readouterr().out
    assert "(inside) sc_h_node" in out and "sc_train_treemap" in out
    assert "rec h(n) = leaf" in out


@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_inside_a_recursion_at_two_threads_say_their_times_are_summed(threads):
    """At 2 threads a forest's groups run a level's kernels on both threads at
    once: their rows add both threads' times, and the table says so."""
    from structc.forest import Forest
    from test_trees import BINARY, random_tree
    rng = np.random.default_rng(0)
    f = Forest.from_tuples([random_tree(rng, 25, 20) for _ in range(32)])
    before = structc.get_num_threads()
    try:
        structc.set_num_threads(threads)
        # steps back to back keep the worker spinning: a sleeping one would find its share
        # taken by the caller, and the levels would run on one thread
        report = profile(profiled_net(BINARY, "<t>"), {"t": f, "y": (np.arange(32) % 3).astype(np.int32)},
                         steps=40, warmup=40, peak=PEAK)
    finally:
        structc.set_num_threads(before)
    nested = [r for r in report.rows if r.nested]
    both = any(r.threads > 1 for r in nested)
    assert nested and ("the sum of their times" in report.table()) is both
    if threads == 2 and not both:       # the worker never got a core (a loaded or one-core machine)
        pytest.skip("the recursion's levels ran on one thread")
    assert both is (threads == 2)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_recursions_task_functions_are_named_in_the_trace_not_rows_of_the_table(threads):
    """The functions a recursion's kernel hands to the pool (a level's rows; at 2
    threads a group of trees) hold the time of the kernels they run, which have
    rows of their own: the table leaves them out (no row is a bare address) and
    the trace names them after their kernel."""
    from structc.forest import Forest
    from test_trees import BINARY, random_tree
    rng = np.random.default_rng(1)
    f = Forest.from_tuples([random_tree(rng, 25, 20) for _ in range(32)])
    before = structc.get_num_threads()
    try:
        structc.set_num_threads(threads)
        net = profiled_net(BINARY, "<t>")
        report = profile(net, {"t": f, "y": (np.arange(32) % 3).astype(np.int32)}, steps=5, peak=PEAK)
    finally:
        structc.set_num_threads(before)
    assert net._profile_tasks and all(": " in name for name in net._profile_tasks.values())
    assert not [r.kernel.name for r in report.rows if r.kernel.name.startswith("0x")]
    assert sum(r.seconds for r in report.rows if not r.nested) <= 1.02 * report.step_seconds
    names = {e["name"] for e in report.trace()["traceEvents"]}
    assert not [n for n in names if n.startswith("0x")]
    assert any(n.startswith("sc_train_treemap") and n.endswith(("a level's rows", "a group of trees"))
               for n in names)


def test_the_event_bound_covers_the_pools_most_claims():
    """The buffer is sized by _events_bound: it must cover the most chunks the
    runtime's pool can make of a call (runtime/structc_rt.c: one share of
    ceil-split tasks per thread; its owner claims (r + 3) // 4 of the r left,
    a thief (r + 1) // 2 from the back), in whatever order the threads come.
    (The bound of the shared-ticket pool, 8 x threads + 1, lost events.)"""
    from structc.profile import CALL, EVENT, _events_bound

    @functools.lru_cache(maxsize=None)
    def most_claims(left):
        if left == 0:
            return 0
        return 1 + max(most_claims(left - (left + 3) // 4), most_claims(left - (left + 1) // 2))

    for threads in (2, 3, 4):
        for n in [1, 2, 3, 7, 16, 100, 125, 768, 4608, 9216, 100_000]:
            probe = np.zeros(1, EVENT)
            probe["kind"], probe["hi"] = CALL, n
            shares = [n * (s + 1) // threads - n * s // threads for s in range(threads)]
            worst = sum(most_claims(m) for m in shares) + 1
            assert _events_bound(probe, threads) - 64 >= worst, (threads, n)


def test_the_table_gives_the_step_unprofiled_too(report):
    """The same step timed with nothing recorded stands beside the profiled one,
    and a profiled step clearly slower than it is pointed out (at 2 threads the
    tree network's step ran 250 us profiled, 228 us unprofiled)."""
    assert report.unprofiled_seconds > 0
    assert f"({report.unprofiled_seconds * 1e6:.1f} unprofiled)" in report.table().splitlines()[0]
    slow = dataclasses.replace(report, step_seconds=1.2 * report.unprofiled_seconds)
    assert "profiled, the step ran 20% slower than unprofiled" in slow.table()
    same = dataclasses.replace(report, step_seconds=report.unprofiled_seconds)
    assert "slower than unprofiled" not in same.table()


def test_each_thread_records_into_its_own_block_and_no_empty_entry_is_reported(batch):
    """At 2 threads each thread takes a block of the event buffer at a time (no
    shared counter per event: the tree network's profiled 2-thread step ran 10%
    slower than unprofiled with one, 6% without). The entries a thread leaves
    unwritten are not events: every event returned names a kernel of the model."""
    before = structc.get_num_threads()
    try:
        structc.set_num_threads(2)
        report = profile(profiled_net(MLP.read_text(), str(MLP)), batch, steps=20, warmup=20, peak=PEAK)
    finally:
        structc.set_num_threads(before)
    events = report.events
    assert len(events) and (events["fn"] != 0).all()
    assert set(events["fn"].tolist()) <= set(report._kernels)
    if len(set(events["lane"].tolist())) < 2:       # the worker never got a core (a loaded machine)
        pytest.skip("every event came from one thread")


def test_a_kernel_layers_of_different_sizes_share_has_no_flop_rate():
    """dense(x, 16) over N rows and dense(z, 16) over M rows compile to one
    matmul kernel (its rows are read at run time): one flop count cannot stand
    for both calls, so the row gives no GFLOP/s (it gave the M layer's count
    for both calls, 30 times too few flops here)."""
    src = ("model S {\n  input x: f32[N, 16]\n  input z: f32[M, 16]\n  target y: class[N] of 4\n"
           "  h = dense(x, 16) |> relu\n  k = dense(z, 16) |> relu\n"
           "  loss cross_entropy(dense(h + sum(k, axes=(0,), keepdims=true), 4), y)\n}\n")
    rng = np.random.default_rng(0)
    x, z = rng.random((256, 16), dtype=np.float32), rng.random((8, 16), dtype=np.float32)
    report = structc.compile(src, cache=False).profile(steps=2, peak=PEAK, x=x, z=z, y=np.zeros(256, np.int32))
    shared = [r for r in report.rows if r.kernel.op.startswith("matmul") and {5, 6} <= {s.line for s in r.kernel.spans}]
    assert shared, report.table()
    assert all(r.gflops is None for r in shared), report.table()
    assert any(r.gflops for r in report.rows if r.kernel.line == 7 and r.kernel.op == "matmul")   # not shared



def test_a_kernel_run_both_inside_a_recursion_and_outside_is_two_rows():
    """The weight gradient of a recursion's dense layer and of a top-level
    layer of the same sizes are one kernel: its calls inside the recursion are
    an (inside) row, counted once in the recursion's kernel, not again in the
    step's sum (the outside-kernels row was short by their time)."""
    from structc.forest import Forest
    from structc.profile import CALL
    from test_trees import random_tree
    src = ("model M {\n  input t: forest(arity=2) of word(vocab=6)\n  target y: class[t.trees] of 3\n"
           "  param E: embedding(6, 8) = normal(0.3)\n"
           "  rec h(n) = leaf: E[n.word]\n             node: tanh(dense(concat(h(n.children)), 8))\n"
           "  r = h(t.root)\n  q = tanh(dense(concat(r, r), 8))\n  loss cross_entropy(dense(q, 3), y)\n}\n")
    rng = np.random.default_rng(0)
    f = Forest.from_tuples([random_tree(rng, 25, 6) for _ in range(32)])
    before = structc.get_num_threads()
    try:
        structc.set_num_threads(1)
        report = profile(profiled_net(src, "<t>"), {"t": f, "y": (np.arange(32) % 3).astype(np.int32)},
                         steps=3, peak=PEAK)
    finally:
        structc.set_num_threads(before)
    calls = report.events[report.events["kind"] == CALL]
    address = {id(k): a for a, k in report._kernels.items()}
    both = 0
    for r in report.rows:
        mine = calls[calls["fn"] == address[id(r.kernel)]]
        depths = set(mine["depth"].tolist())
        both += len(depths) > 1
        at = mine[(mine["depth"] > 0) == r.nested]
        assert r.calls == len(at) / report.steps, r.kernel.name
        assert r.seconds == pytest.approx(float((at["end"] - at["start"]).sum()) / 1e9 / report.steps)
    assert both, report.table()      # the model still has such a kernel


def test_a_profile_taken_while_the_pool_backed_off_says_so(batch):
    """On a busy machine the pool backs off after a stall or a preemption and runs
    its jobs on the calling thread (the runtime's STRUCTC_BACKOFF): a trees step
    profiled "at 2 threads" then ran 423 us a step, its 1-thread time, against
    251 us with the back-off off, and nothing in the table said why. The report
    now gives the share of jobs run so; a profile with no back-off has none."""
    from structc import _runtime
    net = profiled_net(MLP.read_text(), str(MLP))
    before, mode = structc.get_num_threads(), _runtime.set_backoff(0)
    try:
        structc.set_num_threads(2)
        plain = profile(net, batch, steps=5, warmup=5, peak=PEAK)
        _runtime.set_backoff(2)                         # preemptions of the caller start one
        _runtime.debug_hold_backoff(True)               # ... held until released
        seen = _runtime.preemptions()
        _runtime.debug_stall_caller(20_000_000)         # 20 ms asleep, as if preempted
        deadline = time.monotonic() + 10                # the window that judges it may take a few calls
        while _runtime.preemptions() == seen and time.monotonic() < deadline:
            net.train_step(lr=0.01, **batch)
        assert _runtime.preemptions() > seen, "the caller's sleep was not seen as a preemption"
        held = profile(net, batch, steps=5, warmup=5, peak=PEAK)
    finally:
        _runtime.debug_stall_caller(0)
        _runtime.debug_hold_backoff(False)
        _runtime.set_backoff(mode)
        structc.set_num_threads(before)
    assert plain.backed_off == 0 and "backed off" not in plain.table()
    assert held.backed_off == 1.0
    assert "the pool backed off for 100% of its jobs" in held.table()
    one = dataclasses.replace(held, threads=1)
    assert "backed off" not in one.table()
