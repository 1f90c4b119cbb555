"""Data-parallel training of a model with a large embedding: its gradient summed
by rows (`structc.rowsum`) against summed whole, and one process.

The tree network of bench_trees.py over a vocabulary of --vocab words of --dim
floats (random binary trees of 25 leaves, --batch trees a step, 6 batches in
turn), SGD. Three runs, each a fresh process (or two, under `mpiexec -n 2`),
1 thread each:

    one process        the whole batch a step (`Net.train_step`)
    2 ranks, whole     `DataParallel` with the table summed whole, as before stop 40
                       (`rowsum.SPARSE_SUM_BYTES` past the table's size: the record of
                       rows off, so each step zeroes, weighs, sums, divides and
                       updates the whole table)
    2 ranks, by rows   `DataParallel` as it is: the union of the ranks' records of
                       rows, the table's gradient summed by those rows

prints the median step time of each (rank 0's, after a barrier, --steps steps
after 10 untimed). Needs mpi4py and an `mpiexec` on PATH (`pip install mpi4py mpich`).

    python benchmarks/bench_rowsum.py                       # 20,000 x 256
    python benchmarks/bench_rowsum.py --vocab 100000 --dim 128 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(vocab: int, dim: int, batch: int, steps: int, mode: str) -> dict:
    import numpy as np

    import structc
    sys.path.insert(0, str(HERE))
    from bench_trees import source
    structc.set_num_threads(1)
    rng = np.random.default_rng(0)

    def tree(leaves):
        if leaves == 1:
            return int(rng.integers(vocab))
        k = int(rng.integers(1, leaves))
        return tree(k), tree(leaves - k)
    batches = [[tree(25) for _ in range(batch)] for _ in range(6)]
    labels = [rng.integers(0, 5, batch).astype(np.int32) for _ in range(6)]
    net = structc.compile(source(vocab, dim), seed=0)
    if mode == "single":
        feeds = [{"t": structc.Forest.from_tuples(b), "y": y} for b, y in zip(batches, labels)]
        step, barrier, rank = (lambda f: net.train_step(lr=0.01, **f)), (lambda: None), 0
    else:
        from mpi4py import MPI

        from structc import rowsum
        from structc.distributed import DataParallel
        comm = MPI.COMM_WORLD
        rank = comm.Get_rank()
        if mode == "whole":
            rowsum.SPARSE_SUM_BYTES = 4 * vocab * dim + 1
        dp = DataParallel(net, comm)
        assert (dp._rows is not None) == (mode == "rows")
        half = slice(0, batch // 2) if rank == 0 else slice(batch // 2, batch)
        feeds = [{"t": structc.Forest.from_tuples(b[half]), "y": y[half]} for b, y in zip(batches, labels)]
        step, barrier = (lambda f: dp.train_step(lr=0.01, **f)), comm.Barrier
    for k in range(10):
        step(feeds[k % len(feeds)])
    times = []
    for k in range(steps):
        barrier()
        t = time.perf_counter()
        step(feeds[k % len(feeds)])
        times.append(time.perf_counter() - t)
    return {"rank": rank, "ms": 1e3 * statistics.median(times)}


def launch(args, mode: str) -> float:
    cmd = [sys.executable, __file__, "--worker", mode, "--vocab", str(args.vocab), "--dim", str(args.dim),
           "--batch", str(args.batch), "--steps", str(args.steps)]
    if mode != "single":
        cmd = ["mpiexec", "-n", "2"] + cmd
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, STRUCTC_NUM_THREADS="1"),
                         timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-2000:]}")
    found = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return next(r["ms"] for r in found if r["rank"] == 0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64, help="trees a step (the global batch)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=1, help="each mode this many times, interleaved")
    ap.add_argument("--worker", choices=["single", "whole", "rows"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        found = run(args.vocab, args.dim, args.batch, args.steps, args.worker)
        if found["rank"] == 0:
            print(json.dumps(found))
        return
    modes = {"single": "one process", "whole": "2 ranks, table summed whole", "rows": "2 ranks, by rows"}
    found = {m: [] for m in modes}
    for _ in range(args.rounds):
        for m in modes:
            found[m].append(launch(args, m))
    print(f"vocabulary {args.vocab:,} x {args.dim}, {args.batch} trees a step, median of {args.steps} steps, "
          f"{args.rounds} round(s): median of rounds (each round's)")
    single = statistics.median(found["single"])
    for m, name in modes.items():
        ms = statistics.median(found[m])
        print(f"  {name:30s} {ms:8.3f} ms   {single / ms:5.2f}x one process'   "
              f"({', '.join(f'{x:.3f}' for x in found[m])})")


if __name__ == "__main__":
    main()
