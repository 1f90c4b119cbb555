"""Calls from several Python threads give exactly what the same calls give one after another."""
import threading

import numpy as np
import pytest

import structc

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

    def writer():
        while not stop.is_set():
            for path in paths:
                net.load_params(path)

    th = threading.Thread(target=writer)
    th.start()
    try:
        losses = {net.grad(x=x, y=y)[0] for _ in range(200)}
    finally:
        stop.set()
        th.join()
    assert losses <= losses_ok


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    structc.set_num_threads(2)
