"""Calls from several Python threads give exactly what the same calls give one after another."""
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

import structc
from test_trees import BINARY

MLP = """
model T {
  input  x: f32[N, 16]
  target y: class[N] of 4
  loss cross_entropy(dense(dense(x, 32) |> tanh, 4), y)
}
"""
THREADS, CALLS = 4, 1000


def batches(count=8, n=48):
    rng = np.random.default_rng(0)
    return [(rng.normal(size=(n, 16)).astype(np.float32), rng.integers(0, 4, n)) for _ in range(count)]


def plan(thread):
    """(operation, batch index) for each call of one thread."""
    rng = np.random.default_rng(100 + thread)
    return list(zip(rng.choice(["forward", "grad", "step0", "train"], CALLS).tolist(),
                    rng.integers(0, 8, CALLS).tolist()))


def run(op, k, shared, own, data):
    """One call: forward, grad and a zero-rate train_step on the shared Net,
    real training on the thread's own Net."""
    x, y = data[k]
    if op == "forward":
        return shared(x=x)
    if op == "grad":
        loss, grads = shared.grad(x=x, y=y)
        return loss, grads
    if op == "step0":
        return shared.train_step(x=x, y=y, lr=0.0)         # writes the gradient arena, leaves the weights
    return own.train_step(x=x, y=y, lr=0.05)


def same(a, b):
    if isinstance(a, tuple):
        return a[0] == b[0] and all(np.array_equal(a[1][n], b[1][n]) for n in a[1])
    return np.array_equal(a, b)


def test_threads_match_a_serial_run():
    data = batches()
    structc.set_num_threads(2)
    shared = structc.compile(MLP, seed=1)
    plans = [plan(t) for t in range(THREADS)]
    expected = []
    for t in range(THREADS):
        own = structc.compile(MLP, seed=10 + t)
        expected.append([run(op, k, shared, own, data) for op, k in plans[t]])
    shared = structc.compile(MLP, seed=1)
    owns = [structc.compile(MLP, seed=10 + t) for t in range(THREADS)]
    got = [[None] * CALLS for _ in range(THREADS)]
    start = threading.Barrier(THREADS)

    def worker(t):
        start.wait()
        for i, (op, k) in enumerate(plans[t]):
            got[t][i] = run(op, k, shared, owns[t], data)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    mismatches = [(t, i, plans[t][i][0]) for t in range(THREADS) for i in range(CALLS)
                  if not same(got[t][i], expected[t][i])]
    assert not mismatches, f"{len(mismatches)} mismatches, the first: {mismatches[:5]}"


def test_load_params_does_not_tear_a_concurrent_call(tmp_path):
    """load_params from one thread while another computes gradients: every
    loss is one of the two checkpoints' losses, never a mixture's."""
    x, y = batches(1, n=4096)[0]                        # a call long enough to be overlapped
    net = structc.compile(MLP, seed=1)
    paths = [tmp_path / "a.npz", tmp_path / "b.npz"]
    net.save_params(paths[0])
    net.init_params(2)
    net.save_params(paths[1])
    losses_ok = set()
    for path in paths:
        net.load_params(path)
        losses_ok.add(net.grad(x=x, y=y)[0])
    stop = threading.Event()
    loads, raised = [], []

    def writer():
        # a thread's exception only warns: without these, a writer that never
        # loaded anything would leave nothing to tear and the test would pass
        try:
            while not stop.is_set():
                for path in paths:
                    net.load_params(path)
                    loads.append(path)
        except BaseException as e:
            raised.append(repr(e))

    th = threading.Thread(target=writer)
    th.start()
    try:
        losses = {net.grad(x=x, y=y)[0] for _ in range(200)}
    finally:
        stop.set()
        th.join()
    assert not raised, raised
    assert len(loads) >= 2, "the writer loaded no checkpoint while the gradients ran"
    assert losses <= losses_ok


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    structc.set_num_threads(2)


# -- the thread pool's decisions: 2 threads give 1 thread's results --------------------

from structc import _runtime  # noqa: E402

WIDE = """
model W {
  input  x: f32[N, 256]
  target y: class[N] of 10
  loss cross_entropy(dense(dense(x, 256) |> relu, 10), y)
}
"""


def wide_batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 256)).astype(np.float32), rng.integers(0, 10, n)


def steps(net, threads, inputs, count=3):
    """Losses and parameters after `count` SGD steps from seed 0's weights, at `threads`."""
    structc.set_num_threads(threads)
    net.init_params(0)
    losses = [net.train_step(**inputs, lr=0.05) for _ in range(count)]
    return losses, {name: view.copy() for name, view in net.params.items()}


def handed_off(fn):
    """fn's result and the jobs it handed to the thread pool."""
    before = _runtime.handoffs()
    out = fn()
    return out, _runtime.handoffs() - before


def backed_off(fn):
    """fn's result, the jobs it handed to the pool, and how many of those ran
    on the caller because the pool was backing off."""
    before, serial = _runtime.handoffs(), _runtime.backoff_jobs()
    out = fn()
    return out, _runtime.handoffs() - before, _runtime.backoff_jobs() - serial


def test_two_threads_match_one_bitwise():
    """Each task computes the same elements in the same order whichever thread
    runs it, so the thread count changes nothing, to the bit."""
    net = structc.compile(WIDE, seed=0)
    x, y = wide_batch(512)
    one = steps(net, 1, {"x": x, "y": y})
    two, jobs = handed_off(lambda: steps(net, 2, {"x": x, "y": y}))
    assert jobs > 0, "the step never used the pool: this test would check nothing"
    assert one[0] == two[0]
    for name in one[1]:
        np.testing.assert_array_equal(one[1][name], two[1][name], err_msg=name)


@pytest.mark.parametrize("shape, axes", [((5000, 512), (0,)), ((2000, 64), (0,)), ((301, 37), (0,)),
                                         ((50, 300), (0,)), ((1, 100), (0,)), ((5, 4, 33), (0, 1)),
                                         ((9, 2, 3), (0,))])
def test_a_sum_over_leading_axes_adds_the_rows_in_order(shape, axes):
    """A bias gradient's sum: each column summed row by row from 0 (float32
    cumsum's last row, bitwise), and a max or min with a NaN as numpy's, at 1
    and 2 threads (the columns split into blocks across threads; the wide one
    hands off jobs: its work is above what an entry runs on the caller alone).
    A sum of many rows and few columns goes in parts (`Sum.legalize`): each
    part's rows in order, then the parts in order."""
    from structc.ops.matmul import MIN_PART_ROWS, PARTS
    from structc import _runtime
    from structc.ops import REGISTRY
    from structc.ops.base import Sample
    from structc.testing import op_net
    rng = np.random.default_rng(len(shape))
    x = rng.normal(size=shape).astype(np.float32)
    flat = x.reshape(int(np.prod(shape[:len(axes)])), -1)
    before = structc.native.get_num_threads()
    try:
        for op in ("sum", "max", "min"):
            data = x.copy()
            if op != "sum":
                data.reshape(-1)[rng.integers(0, x.size)] = np.nan
            want = np.cumsum(flat, axis=0, dtype=np.float32)[-1] if op == "sum" else \
                getattr(np, op)(data.reshape(flat.shape), axis=0)
            if op == "sum" and len(flat) >= PARTS * MIN_PART_ROWS and flat.shape[1] <= 512:
                cuts = [len(flat) * p // PARTS for p in range(PARTS + 1)]
                parts = [np.cumsum(flat[a:z], axis=0, dtype=np.float32)[-1] for a, z in zip(cuts, cuts[1:])]
                want = parts[0]
                for more in parts[1:]:
                    want = want + more
                assert not np.array_equal(want, np.cumsum(flat, axis=0, dtype=np.float32)[-1]), \
                    "the parts' sum has the bits of one pass: this case would not tell them apart"
            _, net = op_net(REGISTRY[op], Sample((shape,), {"axes": axes}), [data])
            net.params["p0"][...] = data
            for threads in (1, 2):
                structc.set_num_threads(threads)
                jobs = _runtime.handoffs()
                got = net.forward()["out"].reshape(-1)
                np.testing.assert_array_equal(got, want.reshape(-1), err_msg=f"{op} at {threads} thread(s)")
                if threads == 2 and op == "sum" and x.size > 1 << 21:     # above a call run on the caller
                    assert _runtime.handoffs() > jobs, "the wide sum never used the pool"
    finally:
        structc.set_num_threads(before)


def test_batch_one_forward_is_a_straight_call():
    """A small model's batch-1 forward runs every kernel on the caller: no job
    is handed to the pool (the matmul's work is its rows', not a full tile's)."""
    structc.set_num_threads(2)
    net = structc.compile(WIDE, seed=0)
    x1 = wide_batch(1)[0]
    net(x=x1)
    _, jobs = handed_off(lambda: [net(x=x1) for _ in range(20)])
    assert jobs == 0
    _, jobs = handed_off(lambda: net(x=wide_batch(512)[0]))
    assert jobs > 0                                 # a big batch still uses the second core


def test_pool_survives_many_short_calls():
    """Thousands of calls alternating pooled and straight ones keep giving the same answer."""
    structc.set_num_threads(2)
    net = structc.compile(WIDE, seed=0)
    small, big = wide_batch(1)[0], wide_batch(512)[0]
    want_small, want_big = net(x=small), net(x=big)
    _, jobs = handed_off(lambda: [np.testing.assert_array_equal(net(x=small), want_small) or
                                  np.testing.assert_array_equal(net(x=big), want_big) for _ in range(300)])
    assert jobs >= 300


def test_pooled_calls_from_several_python_threads():
    """Python threads, one Net each, calls big enough to use the pool: each
    gets what it gets alone (a call finding the pool busy runs on its caller)."""
    count = 3
    data = [{"x": x, "y": y} for x, y in (wide_batch(512, seed=s) for s in range(count))]
    nets = [structc.compile(WIDE, seed=0) for _ in range(count)]
    expected = [steps(nets[k], 2, data[k], count=10) for k in range(count)]
    got = [None] * count
    start = threading.Barrier(count)

    def worker(k):
        start.wait()
        nets[k].init_params(0)
        got[k] = [nets[k].train_step(**data[k], lr=0.05) for _ in range(10)]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(count)]

    def run_all():
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    _, jobs = handed_off(run_all)
    assert jobs > 0
    for k in range(count):
        assert got[k] == expected[k][0]
        for name, value in expected[k][1].items():
            np.testing.assert_array_equal(nets[k].params[name], value)


def test_pool_works_in_a_forked_child():
    """A child forked after the pool ran has none of its parent's workers:
    the runtime starts its own there (without the fork handler it would count
    the parent's, which do not exist in the child, and never use a second core)."""
    import os
    structc.set_num_threads(2)
    net = structc.compile(WIDE, seed=0)
    x, y = wide_batch(512)
    want = steps(net, 2, {"x": x, "y": y})
    assert _runtime.pool_workers() >= 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # the child: report, never return into pytest
        code = 1
        try:
            fresh = _runtime.pool_workers() == 0
            got = steps(net, 2, {"x": x, "y": y})
            same = got[0] == want[0] and all(np.array_equal(got[1][n], want[1][n]) for n in want[1])
            code = 0 if fresh and same and _runtime.pool_workers() >= 1 else 2 + fresh + 2 * same
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    status = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert status == bytes([0]), f"child reported {status!r} (2 + fresh workers + 2 * same result)"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["lenet", "conv", "gnn", "gat", "trees"])
def test_benchmark_families_match_at_two_threads(family):
    """Every benchmark family's training step (its own model and inputs): the
    same losses and weights at 2 threads as at 1, to the bit, with jobs
    actually handed to the pool (each destination's sources are summed in
    their CSR order whichever thread owns the destination)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from profile_kernels import workload
    source, inputs = workload(family)
    net = structc.compile(source, seed=0)
    one = steps(net, 1, inputs, count=2)
    two, jobs = handed_off(lambda: steps(net, 2, inputs, count=2))
    assert jobs > 0
    assert one[0] == two[0]
    for name in one[1]:
        np.testing.assert_array_equal(one[1][name], two[1][name], err_msg=name)


@pytest.fixture
def backoff():
    """Set which signs start a back-off (resetting it; off in tests, conftest.py)."""
    before = _runtime.set_backoff(0)
    try:
        yield _runtime.set_backoff
    finally:
        _runtime.debug_hold_backoff(False)
        _runtime.set_backoff(before)


def assert_as_on_one_thread(net, batch, losses):
    """The losses and parameters of `len(losses)` steps are those of the same steps
    on one thread from the same start (`steps`)."""
    got = {name: view.copy() for name, view in net.params.items()}
    want = steps(net, 1, batch, count=len(losses))
    assert losses == want[0]
    for name in got:
        np.testing.assert_array_equal(got[name], want[1][name], err_msg=name)


def test_a_preempted_worker_makes_the_pool_back_off(backoff):
    """A worker that sleeps while it holds a chunk (as if preempted) makes the
    caller wait far longer than its own share: the pool then runs the next
    jobs on the caller (same results, to the bit), and after the back-off it
    hands jobs to the worker again."""
    import time
    net = structc.compile(WIDE, seed=0)
    x, y = wide_batch(512)
    structc.set_num_threads(2)
    net.init_params(0)
    backoff(1)                                          # only stalls: a loaded test machine preempts callers
    losses = [net.train_step(x=x, y=y, lr=0.05)]      # workers started and spinning
    stalls = _runtime.stalls()
    try:
        _runtime.debug_hold_backoff(True)               # the back-off outlasts slow test steps
        _runtime.debug_stall_worker(30_000_000)        # 30 ms in the worker's next chunk
        deadline = time.monotonic() + 10     # on a loaded machine the worker may miss many jobs before it claims
        while _runtime.stalls() == stalls and time.monotonic() < deadline:
            losses.append(net.train_step(x=x, y=y, lr=0.05))
        assert _runtime.stalls() > stalls, "the worker's sleep was not seen as a stall"
        _, jobs, serial = backed_off(lambda: losses.extend(net.train_step(x=x, y=y, lr=0.05) for _ in range(2)))
        assert jobs > 0 and serial == jobs, f"{jobs - serial} of {jobs} jobs were handed off after the stall"
    finally:
        _runtime.debug_stall_worker(0)
        _runtime.debug_hold_backoff(False)
    assert_as_on_one_thread(net, {"x": x, "y": y}, losses)
    structc.set_num_threads(2)
    time.sleep(0.3)                                     # past the longest back-off
    serial = _runtime.backoff_jobs()
    _, jobs = handed_off(lambda: net.train_step(x=x, y=y, lr=0.05))
    assert jobs > _runtime.backoff_jobs() - serial, "the pool never took jobs again"


def test_a_preempted_caller_makes_the_pool_back_off(backoff):
    """An entry whose calling thread was off the CPU for most of its run (here
    it sleeps, as a preempted thread would) means the cores are shared with
    other work: the next steps run on the caller, with the same results."""
    net = structc.compile(WIDE, seed=0)
    x, y = wide_batch(512)
    structc.set_num_threads(2)
    net.init_params(0)
    backoff(2)
    losses = [net.train_step(x=x, y=y, lr=0.05)]
    seen = _runtime.preemptions()
    try:
        # The back-off (2 ms) is held until released: on a loaded machine the
        # steps below could otherwise start after it ended (a flaky failure).
        _runtime.debug_hold_backoff(True)
        _runtime.debug_stall_caller(20_000_000)         # 20 ms asleep: more than a judging window
        losses.append(net.train_step(x=x, y=y, lr=0.05))
        assert _runtime.preemptions() > seen
        _, jobs, serial = backed_off(lambda: losses.extend(net.train_step(x=x, y=y, lr=0.05) for _ in range(2)))
        assert jobs > 0 and serial == jobs, f"{jobs - serial} of {jobs} jobs were handed off after the preemption"
    finally:
        _runtime.debug_stall_caller(0)
        _runtime.debug_hold_backoff(False)
    assert_as_on_one_thread(net, {"x": x, "y": y}, losses)


def test_the_update_of_a_large_arena_alone_uses_the_pool():
    """`apply_update` of 203,530 parameters is one entry of its own: counted at its
    real cost it is handed to the pool at 2 threads (it ran on the caller alone,
    reading the half of the gradient the other core had written: 122 us against
    75 pooled for an MLP of 235,000), with one thread's bits."""
    net = structc.compile(WIDE.replace("f32[N, 256]", "f32[N, 784]"), seed=0)
    x, y = wide_batch(64)
    x = np.tile(x, (1, 4))[:, :784]
    params = {}
    for threads in (1, 2):
        structc.set_num_threads(threads)
        net.init_params(0)
        net.grad_into_arena(x=x, y=y)
        _, jobs = handed_off(lambda: net.apply_update(lr=0.05))
        assert (jobs > 0) == (threads == 2), f"{jobs} jobs handed off at {threads} thread(s)"
        params[threads] = {name: view.copy() for name, view in net.params.items()}
    for name in params[1]:
        np.testing.assert_array_equal(params[1][name], params[2][name], err_msg=name)


ADAPT_PERIOD = 4096     # runtime/structc_rt.c: an entry is measured again this many calls later


@pytest.fixture
def adaptive():
    """Entries of moderate work measured serial against pooled (off in tests, conftest.py)."""
    before = _runtime.set_adaptive(True)
    try:
        yield
    finally:
        _runtime.debug_adapt_pooled(0)
        _runtime.set_adaptive(before)


@pytest.mark.parametrize("env, name", [("STRUCTC_ADAPT", "sc_set_adaptive"), ("STRUCTC_FOREST_SPLIT", "sc_set_forest_split")])
def test_a_switch_set_before_first_use_returns_the_environments_setting(env, name):
    """`set_*(on)` returns the setting it replaces: the environment's when nothing has
    read it yet (returning "on" there left a test's fixture turning it on for good)."""
    code = ("import ctypes; from structc.native import runtime_library\n"
            f"assert getattr(runtime_library(), {name!r})(1) == 0, 'the environment said 0'\n"
            f"assert getattr(runtime_library(), {name!r})(0) == 1\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, env: "0"})


def test_an_entry_the_pool_slows_down_runs_on_the_caller(adaptive):
    """An entry of moderate work is timed pooled (3 calls, then a block of 5) and
    serial (a block of 5): here each timed pooled call counts 2 ms longer, so the
    entry then runs on the caller, handing off no job, with the same results as one
    thread, until it is measured again. Turned off, it uses the pool again."""
    net = structc.compile(WIDE, seed=0)
    x, y = wide_batch(64)                        # above ENTRY_SERIAL_WORK, below ADAPT_MAX_WORK
    structc.set_num_threads(2)
    net.init_params(0)
    losses = []
    _runtime.debug_adapt_pooled(2_000_000)
    for _ in range(8):
        _, per_call = handed_off(lambda: losses.append(net.train_step(x=x, y=y, lr=0.05)))
        assert per_call > 0, "a call before the serial block did not use the pool"
    for _ in range(5):
        _, jobs = handed_off(lambda: losses.append(net.train_step(x=x, y=y, lr=0.05)))
        assert jobs == 0, "the serial block used the pool"
    _, jobs = handed_off(lambda: losses.extend(net.train_step(x=x, y=y, lr=0.05) for _ in range(20)))
    assert jobs == 0, f"{jobs} jobs handed off after the pooled calls measured slower"
    # measured again ADAPT_PERIOD calls after the first: its 3 first calls as decided
    # (serial), then a block of 5 pooled ones
    _, again = handed_off(lambda: losses.extend(net.train_step(x=x, y=y, lr=0.05)
                                                 for _ in range(ADAPT_PERIOD + 3 + 5 - 33)))
    assert 0 < again <= 5 * per_call, f"{again} jobs while measuring again ({per_call} a pooled call)"
    assert_as_on_one_thread(net, {"x": x, "y": y}, losses)
    structc.set_num_threads(2)
    _runtime.set_adaptive(False)
    _, jobs = handed_off(lambda: net.train_step(x=x, y=y, lr=0.05))
    assert jobs > 0, "turned off, the entry still ran on the caller"


@pytest.mark.skipif(__import__("shutil").which("cc") is None and __import__("shutil").which("gcc") is None,
                    reason="no C compiler")
def test_the_pool_runs_every_task_once_and_each_thread_starts_on_its_share(tmp_path):
    """The runtime's pool built on its own with a driver: thousands of jobs
    of random sizes at 2-4 threads run every task exactly once; and each
    thread starts on its own contiguous share of a job (the caller at row 0,
    the worker at row n/2), so consecutive kernels over the same rows find
    them in the same thread's cache. (With one shared ticket the worker took
    the chunk after the caller's, row n/8.)"""
    import shutil
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    cc = shutil.which("cc") or shutil.which("gcc")
    exe = tmp_path / "pool_driver"
    subprocess.run([cc, "-O2", "-std=c11", "-pthread", f"-I{root / 'runtime'}", str(root / "tests/c/pool_driver.c"),
                    str(root / "runtime/structc_rt.c"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe), "1500"], capture_output=True, text=True, timeout=120,
                         env={"STRUCTC_BACKOFF": "0"}).stdout.split()
    assert out[0] == "ok", " ".join(out)
    right, tried = int(out[2]), int(out[3])
    assert right == tried, f"{tried - right} of {tried} jobs did not start each thread on its own share"


def test_tree_levels_too_small_to_split_are_not_handed_off():
    """A tree level of fewer rows than two shares of `gemm.same_sums_step`
    is one task, run by the caller: split in two, the caller's share was
    empty and it handed the whole level to the worker and waited. Levels
    of one row each (a caterpillar) hand nothing to the pool, 40 such trees
    still split their levels, and both give one thread's bits."""
    net = structc.compile(BINARY, seed=0)
    caterpillar = (((((1, 2), 3), 4), 5), 6)
    for trees in ([caterpillar], [caterpillar] * 40):
        f = structc.Forest.from_tuples(trees)
        y = np.zeros(len(trees), np.int32)
        results = {}
        for threads in (1, 2):
            structc.set_num_threads(threads)
            results[threads], jobs = handed_off(lambda: (net(t=f), net.grad(t=f, y=y)))
        assert (jobs == 0) == (len(trees) == 1), (len(trees), jobs)
        np.testing.assert_array_equal(results[1][0], results[2][0])
        assert results[1][1][0] == results[2][1][0]
        for name in results[1][1][1]:
            np.testing.assert_array_equal(results[1][1][1][name], results[2][1][1][name], err_msg=name)


def forest_parts(children, level_end, roots, threads):
    """The runtime's groups of whole trees for a forest's arrays at `threads`
    (`sc_forest_parts`): cuts [groups + 1, levels], or None when not split."""
    import ctypes

    from structc import native
    structc.set_num_threads(threads)
    fn = native.runtime_library().sc_forest_parts
    fn.restype = ctypes.c_void_p
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, ctypes.POINTER(i64)]
    ch, le, ro = (np.ascontiguousarray(a, np.int32) for a in (children, level_end, roots))
    parts = i64(0)
    got = fn(ch.ctypes.data, ch.shape[1], le.ctypes.data, len(le), ro.ctypes.data, len(ro), ch.shape[0],
             ctypes.byref(parts))
    if not got:
        assert parts.value == 1
        return None
    flat = np.ctypeslib.as_array(ctypes.cast(got, ctypes.POINTER(i64)), shape=((parts.value + 1) * len(le),))
    return flat.reshape(parts.value + 1, len(le)).copy()


def uneven_forest(seed=3, count=50, arity=2, vocab=20):
    from test_trees import random_tree
    rng = np.random.default_rng(seed)
    return structc.Forest.from_tuples([random_tree(rng, int(rng.integers(1, 30)), vocab, arity)
                                       for _ in range(count)])


def test_a_forest_is_cut_into_groups_of_whole_trees():
    """At 2 threads a forest of uneven trees is cut into two groups of
    consecutive trees: in every level (the leaves too) each group's rows are
    one block, first group first, and the groups' inner nodes are about equal.
    At one thread nothing is cut."""
    f = uneven_forest()
    assert forest_parts(f.children, f.level_end, f.roots, 1) is None
    cuts = forest_parts(f.children, f.level_end, f.roots, 2)
    assert cuts is not None and cuts.shape == (3, len(f.level_end))
    starts = np.concatenate([[0], f.level_end[:-1]])
    np.testing.assert_array_equal(cuts[0], starts)
    np.testing.assert_array_equal(cuts[2], f.level_end)
    assert (cuts[0] <= cuts[1]).all() and (cuts[1] <= cuts[2]).all()
    rows = [np.concatenate([np.arange(cuts[p, l], cuts[p + 1, l]) for l in range(len(starts))]) for p in (0, 1)]
    assert f.tree_of[rows[0]].max() < f.tree_of[rows[1]].min()      # whole trees, in order
    inner = [int((r >= f.level_end[0]).sum()) for r in rows]
    sizes = np.bincount(f.tree_of[f.level_end[0]:])
    assert abs(inner[0] - inner[1]) <= sizes.max(), (inner, sizes.max())


def test_a_forest_not_laid_out_by_trees_is_not_cut():
    """No cut where a group could not run alone: levels out of tree order (the
    roots listed backwards), a child with two parents, a child in its parent's
    level, one tree holding most of the nodes, or fewer trees than threads."""
    f = uneven_forest()
    args = (f.children, f.level_end, f.roots)
    assert forest_parts(*args, 2) is not None
    assert forest_parts(f.children, f.level_end, f.roots[::-1], 2) is None
    inner = np.flatnonzero((f.children >= 0).sum(axis=1) >= 2)
    shared = f.children.copy()
    shared[inner[-1], 0] = shared[inner[0], 0]                       # a child with two parents
    assert forest_parts(shared, f.level_end, f.roots, 2) is None
    level = f.children.copy()
    top = int(f.level_end[-2])
    level[top, 0] = top                                             # its own child
    assert forest_parts(level, f.level_end, f.roots, 2) is None
    from test_trees import random_tree
    rng = np.random.default_rng(0)
    big = structc.Forest.from_tuples([random_tree(rng, 300, 20)] + [random_tree(rng, 5, 20) for _ in range(3)])
    assert forest_parts(big.children, big.level_end, big.roots, 2) is None
    one = structc.Forest.from_tuples([random_tree(rng, 300, 20)])
    assert forest_parts(one.children, one.level_end, one.roots, 2) is None


def test_groups_of_trees_give_one_threads_bits():
    """A forest of uneven trees at 2 threads runs each pass over its levels as
    one job of two groups of trees, and its outputs
    and gradients are one thread's, to the bit: a row's sums do not depend on
    where its level was cut (the bodies' matmuls are row-stable), and a group
    running ahead of the other (another level at the same time) has scratch
    rows of its own. Repeated, since that overlap depends on timing."""
    from test_trees import NARY
    for src, arity, vocab, target in ((BINARY, 2, 20, ("y", "trees")), (NARY, 3, 12, ("s", "nodes"))):
        net = structc.compile(src, seed=0)
        f = uneven_forest(arity=arity, vocab=vocab, count=400)
        labels = {target[0]: np.arange(getattr(f, target[1])) % 3}
        assert forest_parts(f.children, f.level_end, f.roots, 2) is not None      # the kernels' own cut
        structc.set_num_threads(1)
        want = net.forward(t=f), net.grad(t=f, **labels)
        structc.set_num_threads(2)
        for _ in range(12):
            got, jobs = handed_off(lambda: (net.forward(t=f), net.grad(t=f, **labels)))
            assert jobs > 0
            for name in want[0]:
                np.testing.assert_array_equal(want[0][name], got[0][name], err_msg=name)
            assert want[1][0] == got[1][0]
            for name in want[1][1]:
                np.testing.assert_array_equal(want[1][1][name], got[1][1][name], err_msg=name)


def test_two_recursions_in_one_call_are_cut_each_its_own_way():
    """A model reading two recursions (a sequence forward and backward: two
    forests in one call) keeps the runtime's cut of each apart (it is kept for
    the rest of the call, by the forest's arrays), and a Python thread per
    net cutting its own forests at once (each thread's cut is its own) still
    gives one thread's bits."""
    from test_sequences import BOTH_WAYS, ragged
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 40, 120)
    seqs = ragged(rng, lengths)
    targets = {"y": np.arange(len(lengths)) % 4, "z": np.arange(int(lengths.sum())) % 4}
    count = 3
    nets = [structc.compile(BOTH_WAYS, seed=k) for k in range(count)]
    structc.set_num_threads(1)
    want = [(net.forward(s=seqs), net.grad(s=seqs, **targets)) for net in nets]
    structc.set_num_threads(2)
    got = [None] * count
    start = threading.Barrier(count)

    def worker(k):
        start.wait()
        got[k] = [(nets[k].forward(s=seqs), nets[k].grad(s=seqs, **targets)) for _ in range(5)]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(count)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    from structc import native
    lib = native.runtime_library()
    _, cut = handed_off(lambda: nets[0].grad(s=seqs, **targets))
    lib.sc_set_forest_split(0)
    try:
        _, by_levels = handed_off(lambda: nets[0].grad(s=seqs, **targets))
    finally:
        lib.sc_set_forest_split(1)
    assert 0 < cut < by_levels, (cut, by_levels)         # the forests were cut: a job a pass, not a level
    for k in range(count):
        for out, (loss, grads) in got[k]:
            for name in want[k][0]:
                np.testing.assert_array_equal(out[name], want[k][0][name], err_msg=name)
            assert loss == want[k][1][0]
            for name in grads:
                np.testing.assert_array_equal(grads[name], want[k][1][1][name], err_msg=name)


def test_a_training_step_refused_under_the_lock_releases_it():
    """`train_step` runs through the C call plan, which sets the step's
    hyper-parameters holding the Net's lock: when that refuses them (Adam's
    step size overflowing float32) the error reaches the caller, the lock is
    free for another thread, and the next step runs through the plan."""
    net = structc.compile(MLP, seed=0)
    x, y = batches(count=1)[0]
    y = y.astype(np.int32)
    net.train_step(x=x, y=y, lr=0.05)
    net.train_step(x=x, y=y, lr=0.05)
    net.set_optimizer("adam")
    calls = net._train_plan.calls
    assert calls > 0
    with pytest.raises(ValueError, match="overflow float32"):
        net.train_step(x=x, y=y, lr=3e38)
    got = []
    other = threading.Thread(target=lambda: got.append(net._lock.acquire(timeout=5) and net._lock.release()))
    other.start()
    other.join()
    assert got == [None], "the lock was left held"
    assert np.isfinite(net.train_step(x=x, y=y, lr=0.01)) and net._train_plan.calls == calls + 1



def test_a_thread_count_beyond_a_c_int_is_capped_not_wrapped():
    """`set_num_threads(2**32)` asks for more threads than there are: the runtime's
    cap, as for 10**6, not the low 32 bits (1: one thread, silently)."""
    try:
        capped = structc.set_num_threads(10 ** 6)
        for n in (2 ** 31, 2 ** 32, 2 ** 32 + 1, 2 ** 70):
            assert structc.set_num_threads(n) == capped == structc.get_num_threads(), n
    finally:
        structc.set_num_threads(2)


@pytest.mark.parametrize("n", [np.int64(3), np.int32(3), np.uint8(3), np.array(3)[()]])
def test_a_thread_count_may_be_a_numpy_integer(n):
    """`set_num_threads(np.int64(3))` (a count worked out with numpy) sets 3 threads, as 3 does."""
    try:
        assert structc.set_num_threads(n) == 3 == structc.get_num_threads()
        assert type(structc.set_num_threads(n)) is int
    finally:
        structc.set_num_threads(2)


@pytest.mark.parametrize("n, error", [(True, TypeError), (np.True_, TypeError), (2.0, TypeError),
                                      (np.float64(2), TypeError), ("2", TypeError), (None, TypeError),
                                      (0, ValueError), (np.int64(-1), ValueError)])
def test_a_thread_count_that_is_not_a_positive_integer_is_refused(n, error):
    """Bools and floats are not counts (True is not one thread, 2.0 not two), nor is 0."""
    try:
        structc.set_num_threads(2)
        with pytest.raises(error, match="the number of threads must be"):
            structc.set_num_threads(n)
        assert structc.get_num_threads() == 2
    finally:
        structc.set_num_threads(2)


#: STRUCTC_NUM_THREADS: decimal digits, at least 1; a count past MAX_THREADS (or a C int) is capped
ENV_COUNTS = [("4294967296", 256), ("3", 3), ("003", 3), ("256", 256), ("257", 256)]
ENV_JUNK = ["abc", "0", "00", "2x", " 2", "2 ", "+2", "-1", "2_0", "2.0", "\u0662"]     # U+0662: Arabic-Indic 2


@pytest.mark.parametrize("value, first", [(v, "get_num_threads") for v, _ in ENV_COUNTS] +
                         [(v, "get_num_threads") for v in ENV_JUNK] +
                         [(v, "compile") for v in ("4294967296", "abc", "0", "2x")])
def test_the_environments_thread_count_is_read_whole(value, first):
    """STRUCTC_NUM_THREADS too: a count past a C int is capped, junk refused naming the
    variable, whatever reads the count first. (Read before a first compile, by the C
    runtime's atoi, "2x" was 2 threads and "abc" every core, silently.)"""
    action = "structc.compile(" + repr(MLP) + ")" if first == "compile" else "structc.get_num_threads()"
    code = ("import structc\n"
            "try:\n    " + action + "\n"
            "except ValueError as e:\n    print(e)\n"
            "else:\n    print('threads', structc.get_num_threads())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "STRUCTC_NUM_THREADS": value})
    counts = dict(ENV_COUNTS)
    expect = f"threads {counts[value]}" if value in counts else \
        f"STRUCTC_NUM_THREADS must be a positive integer, got {value!r}"
    assert out.stdout.strip() == expect, out.stdout + out.stderr


@pytest.mark.parametrize("value", ["0", "2x", "\u00b2", "\u0662"])     # superscript 2, Arabic-Indic 2
def test_the_compile_thread_count_is_decimal_digits(monkeypatch, value):
    """STRUCTC_COMPILE_THREADS likewise: junk refused naming the variable ("²" passed
    str.isdigit and int() then raised its own message; "٢" was 2 threads)."""
    monkeypatch.setenv("STRUCTC_COMPILE_THREADS", value)
    with pytest.raises(ValueError, match=f"STRUCTC_COMPILE_THREADS must be a positive integer, got '{value}'"):
        structc.native.compile_threads()
    monkeypatch.setenv("STRUCTC_COMPILE_THREADS", "3")
    assert structc.native.compile_threads() == 3


def test_the_c_runtime_reads_the_environments_thread_count_as_python_does(tmp_path):
    """A library shipped to C reads STRUCTC_NUM_THREADS in the runtime: the same counts
    as Python, and junk (which Python refuses) is said so on stderr, with every core
    used; atoi made "2x" 2 threads and " 2" 2, silently."""
    import shutil
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    exe = tmp_path / "threads_driver"
    subprocess.run([shutil.which("cc") or shutil.which("gcc"), "-O1", "-std=c11", "-pthread", f"-I{root / 'runtime'}",
                    str(root / "tests/c/threads_driver.c"), str(root / "runtime/structc_rt.c"), "-o", str(exe)],
                   check=True)

    def run(value):
        env = {} if value is None else {"STRUCTC_NUM_THREADS": value}
        out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, env=env)
        return int(out.stdout), out.stderr
    cores, quiet = run(None)
    assert cores == min(os.cpu_count(), 256) and quiet == ""
    assert run("") == (cores, "")
    for value, count in ENV_COUNTS:
        assert run(value) == (count, ""), value
    for value in ENV_JUNK:
        assert run(value) == (cores, f"structc: STRUCTC_NUM_THREADS must be a positive integer, got '{value}'; "
                                     f"using {cores} threads (every core)\n"), value


# The fork scripts' wait for a child: its exit code, or None when it has not ended after
# `seconds` (it is then killed, so that a hung child fails its test, not the whole run).
WAIT_FOR_CHILD = """
def wait_for_child(pid, seconds):
    deadline = time.monotonic() + seconds
    while not (done := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0]:
        return os.waitstatus_to_exitcode(done[1])
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None
"""

FORK_WHILE_TRAINING = """
import os, sys, threading, time
import numpy as np, structc
""" + WAIT_FOR_CHILD + """
src = sys.argv[1]
rng = np.random.default_rng(0)
x, y = rng.normal(size=(48, 16)).astype(np.float32), rng.integers(0, 4, 48)
net, replay = (structc.compile(src, seed=0, training=True) for _ in range(2))   # no compiling at the fork
net.set_optimizer("adam")
replay.set_optimizer("adam")
stop = threading.Event()
raised = []

def train():                # a thread's exception only warns: report it, or the children check 0 steps
    try:
        for _ in iter(stop.is_set, True):
            net.train_step(x=x, y=y, lr=0.01)
    except BaseException as e:
        raised.append(repr(e))

busy = threading.Thread(target=train)
busy.start()
time.sleep(0.1)
codes = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:            # the child: its copy of net is at a step's end, and it can call it
        code = 3
        try:
            steps, params = net._step, {k: v.copy() for k, v in net.params.items()}
            for _ in range(steps):
                replay.train_step(x=x, y=y, lr=0.01)
            whole = all(np.array_equal(params[k], replay.params[k]) for k in params)
            np.testing.assert_array_equal(net(x=x), replay(x=x))
            net.train_step(x=x, y=y, lr=0.01)
            code = 0 if whole and steps > 0 else 2     # forked between steps, not before the first
        finally:
            os._exit(code)
    code = wait_for_child(pid, 10)
    codes.append("hung" if code is None else code)
stop.set()
busy.join()
print(codes, raised)
"""


def test_a_child_forked_while_another_thread_trains_gets_the_net_between_steps():
    """A fork while another thread is in a call on a Net: the child (a
    multiprocessing worker, a forked server) can use that Net, whose
    parameters are those after a whole number of steps. Without waiting for
    the call, the child inherited the Net's lock held by a thread it does not
    have, and hung on its first call; its parameters were any mix of the
    step's old and new values."""
    out = subprocess.run([sys.executable, "-c", FORK_WHILE_TRAINING, MLP], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "[0, 0, 0] []", out.stdout + out.stderr


FORK_WHILE_A_HOLDER_WAITS = """
import os, sys, threading
import structc
from structc import model
model.FORK_WAIT = 0.5
net = structc.compile(sys.argv[1], seed=0)
forked = threading.Event()

def fork_then_say_so():           # a producer thread that starts a worker process
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    forked.set()

with net._lock:                   # a call in flight (a feed generator) waiting for what that thread makes
    threading.Thread(target=fork_then_say_so).start()
    print("forked" if forked.wait(30) else "stuck")
"""


def test_a_fork_waits_a_bounded_time_for_a_call_that_waits_for_the_forking_thread():
    """The fork hook waits for calls in flight; one whose thread waits for the forking
    thread would make it wait for ever. It gives up after `model.FORK_WAIT`."""
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", FORK_WHILE_A_HOLDER_WAITS, MLP],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "forked", out.stdout + out.stderr


FORK_WHILE_COMPILING = """
import os, sys, threading, time
import numpy as np, structc
from llvmlite.binding import ffi
from structc import api, model
""" + WAIT_FOR_CHILD + """
src, model.FORK_WAIT, slow = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
x, y = np.zeros((4, 16), np.float32), np.zeros(4, np.int64)
net = structc.compile(src, seed=0)          # the forward part; training's is deferred
compiling, real = threading.Event(), net._compile_deferred

def slow_compile(part):     # a compile that is in LLVM (holding llvmlite's lock) for `slow` seconds
    with ffi.lib._lock:
        compiling.set()
        time.sleep(slow)
    return real(part)

net._compile_deferred = slow_compile
threading.Thread(target=api._compile_quietly, args=(net,), daemon=True).start()   # training="background"
compiling.wait()
start = time.monotonic()
pid = os.fork()
if pid == 0:                # the child: train (compiles, unless the parent's compile ended first), compile, call
    said = []
    for what, call in [("train", lambda: net.train_step(x=x, y=y)), ("forward", lambda: net(x=x)),
                       ("compile", lambda: structc.compile(src.replace("x, 32", "x, 24")))]:
        try:
            call()
            said.append(what + " ok")
        except RuntimeError as e:
            said.append(what + (" refused" if "forked while another thread was compiling" in str(e) else repr(e)))
    print(", ".join(said), flush=True)
    os._exit(0)
waited = time.monotonic() - start
if wait_for_child(pid, 30) is None:
    print("child hung")
net.train_step(x=x, y=y)
print(f"parent trains; the fork waited {waited:.2f} s", flush=True)
"""


@pytest.mark.parametrize("wait, slow, child, waited", [
    (10.0, 0.5, "train ok, forward ok, compile ok", (0.45, 10.0)),            # the compile's end
    pytest.param(0.3, 4.0, "train refused, forward ok, compile refused", (0.25, 2.0),   # FORK_WAIT, not the compile
                 marks=pytest.mark.slow)])     # its compile is held 4 s
def test_a_child_forked_while_another_thread_compiles_does_not_hang(wait, slow, child, waited):
    """A fork while another thread compiles (a Net's training part compiled in the
    background, here held in LLVM for `slow` seconds): the fork waits for the compile
    (up to `model.FORK_WAIT`), and the child trains and compiles. Past that wait the
    child refuses to compile, saying why, and its Nets' calls still run. Before, the
    child inherited llvmlite's lock and the Net's lock on its deferred part held by a
    thread it does not have, and its first compile or training call hung for ever."""
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", FORK_WHILE_COMPILING, MLP, str(wait), str(slow)],
                         capture_output=True, text=True, timeout=180)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0] == child, out.stdout + out.stderr
    seconds = float(re.fullmatch(r"parent trains; the fork waited (\S+) s", lines[1])[1])
    assert waited[0] <= seconds < waited[1], out.stdout


FORK_WHILE_THE_COLLECTOR_IS_PAUSED = """
import gc, os, sys, threading, time
from structc.compiler import compile_source
compiling = threading.Thread(target=compile_source, args=(sys.argv[1],))
compiling.start()
while gc.isenabled() and compiling.is_alive():      # until the compile has paused the collector
    time.sleep(0.001)
paused = not gc.isenabled()
pid = os.fork()
if pid == 0:
    os._exit(0 if gc.isenabled() else 1)
child = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
compiling.join()
print(paused, child, gc.isenabled())
"""


def test_a_child_forked_while_another_thread_compiles_has_the_collector_on():
    """A compile pauses Python's cyclic collector until it ends; a child forked
    mid-compile (through `compiler.compile_source`, as `structc compile --dump` does)
    never saw that end and kept the collector off for good. The fork waits for it."""
    out = subprocess.run([sys.executable, "-c", FORK_WHILE_THE_COLLECTOR_IS_PAUSED, MLP], capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == "True 0 True", out.stdout + out.stderr


INTERRUPTED_WAITING = """
import signal, sys, threading, time
import numpy as np, structc
net = structc.compile(sys.argv[1], seed=0, training=True)
x, y = np.zeros((4, 16)), np.zeros(4, np.int64)       # converted: `grad` takes the Python path
holding, waited = threading.Event(), []

def hold():                  # another thread's call, as long as it takes the interrupt to arrive
    with net._lock:
        holding.set()
        time.sleep(0.3)

def wait_for_the_lock():
    waited.append(net._lock.acquire(timeout=5))

other = threading.Thread(target=hold)
other.start()
holding.wait()
# a SIGINT delivered to another thread: the one waiting for the lock is not woken, and
# meets the KeyboardInterrupt as soon as it has the lock (a Ctrl-C lands on any thread)
threading.Timer(0.1, lambda: signal.pthread_kill(other.ident, signal.SIGINT)).start()
try:
    net.grad(x=x, y=y)
except KeyboardInterrupt:
    pass
other.join()
after = threading.Thread(target=wait_for_the_lock)
after.start()
after.join()
print("free" if waited == [True] else "held")
"""


def test_an_interrupt_that_arrives_while_a_call_waits_for_the_lock_frees_it():
    """A KeyboardInterrupt met by a call right after it took the Net's lock (it
    was waiting for another thread's call) leaves the lock free: it was raised
    before the `try` whose `finally` releases it, and the interrupted thread held
    the lock for good, so every other thread's next call on the Net waited forever."""
    out = subprocess.run([sys.executable, "-c", INTERRUPTED_WAITING, MLP], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "free", out.stdout + out.stderr
