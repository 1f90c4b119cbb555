"""What interop costs: a forward call fed a numpy array, a torch tensor or a jax array
(DLPack, in place), and reading a table or treebank file whole or streamed.

    python benchmarks/bench_interop.py [--calls 2000] [--rows 50000] [--trees 20000]

Call times are medians over --calls calls (the three kinds alternating call by call,
so the shared machine's load falls on all alike). File times: one read, then one
epoch of batches (the data pipeline only: no training), best of two.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import structc
from structc import readers, streams

TINY = "model Tiny { input x: f32[N, 16]  output y = dense(x, 4) }"


def call_times(calls: int) -> dict[str, float]:
    net = structc.compile(TINY)
    x = np.random.default_rng(0).random((8, 16), dtype=np.float32)
    kinds = {"numpy": x}
    try:
        import torch
        kinds["torch"] = torch.from_numpy(x.copy())
    except ImportError:
        pass
    try:
        import jax.numpy as jnp
        kinds["jax"] = jnp.asarray(x)
    except ImportError:
        pass
    times = {k: [] for k in kinds}
    for _ in range(calls):
        for kind, value in kinds.items():
            t = time.perf_counter()
            net(x=value)
            times[kind].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def make_files(folder: Path, rows: int, trees: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 16)).round(4)
    table = folder / "table.csv"
    np.savetxt(table, np.column_stack([x, x[:, 0] > 0]), fmt="%g", delimiter=",")
    words = [f"w{k}" for k in range(200)]
    bank = folder / "bank.txt"
    with open(bank, "w") as f:
        for _ in range(trees):
            a, b, c = rng.choice(words, 3)
            f.write(f"({rng.integers(2)} ({rng.integers(2)} ({rng.integers(2)} {a}) ({rng.integers(2)} {b})) "
                    f"({rng.integers(2)} {c}))\n")
    return table, bank


TABLE_MODEL = "model T { input x: f32[N, 16]  target y: class[N] of 2\n loss cross_entropy(dense(x, 2), y) }"
TREE_MODEL = """model B {
  input t: forest(arity=2) of word(vocab=200)  target y: class[t.trees] of 2
  param E: embedding(200, 8)
  rec h(n) = leaf: E[n.word]
             node: tanh(dense(concat(h(n.children)), 8))
  loss cross_entropy(dense(h(t.root), 2), y)
}"""


def file_times(path: Path, source: str) -> dict[str, tuple[float, float]]:
    net = structc.compile(source)
    out = {}
    for how, read in (("whole", lambda: readers.read(path, stream=False)), ("streamed", lambda: readers.read(path, stream=True))):
        best_read = best_epoch = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            data = read().bind(net)
            best_read = min(best_read, time.perf_counter() - t)
            t = time.perf_counter()
            for _ in data.batches(64, np.random.default_rng(0)):
                pass
            best_epoch = min(best_epoch, time.perf_counter() - t)
        out[how] = (best_read, best_epoch)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=50000)
    ap.add_argument("--trees", type=int, default=20000)
    args = ap.parse_args()
    print(f"load average at the start: {os.getloadavg()[0]:.2f}")
    for kind, t in call_times(args.calls).items():
        print(f"forward call, batch 8, input from {kind:5s}: {t * 1e6:7.2f} us")
    with tempfile.TemporaryDirectory() as tmp:
        table, bank = make_files(Path(tmp), args.rows, args.trees)
        for name, path, source in (("table", table, TABLE_MODEL), ("treebank", bank, TREE_MODEL)):
            times = file_times(path, source)
            for how, (read, epoch) in times.items():
                print(f"{name:8s} {path.stat().st_size / 2**20:5.1f} MiB {how:8s}: read {read:6.2f} s, "
                      f"one epoch of batches {epoch:6.2f} s")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
