"""Node order and the second core (issue 14): the GNN benchmark's model on graphs
numbered at random, as given and `Graph.reordered()` (reverse Cuthill–McKee).

    python benchmarks/bench_locality.py [--rounds 5] [--steps 100]

Graphs of 2,000 nodes and 10,000 edges, 32 features, numbered at random:

    ring     each edge joins nodes at most 20 places apart around a ring: locality
             that the numbering hides and a reordering finds
    uniform  edges uniform at random (the GNN benchmark's): no locality to find

Each (graph, order, threads) runs in a fresh process, the rounds interleaved;
prints the median step time, the 2-thread speed-up, and how long `reordered()`
took. At two threads each thread aggregates a range of rows; on the ring
reordered, the rows it gathers are mostly ones it wrote itself.
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
NODES, EDGES, REACH = 2000, 10000, 20


def graph(kind: str, seed: int = 1):
    """(edge_index, x, y) of a `kind` graph, numbered at random."""
    import numpy as np
    sys.path.insert(0, str(HERE))
    import bench_gnn
    _, x, y = bench_gnn.problem()
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return rng.integers(0, NODES, (2, EDGES)), x, y
    place = rng.integers(0, NODES, EDGES)                   # around the ring
    ends = np.stack([place, (place + rng.integers(-REACH, REACH + 1, EDGES)) % NODES])
    return rng.permutation(NODES)[ends], x, y              # the nodes numbered at random


def worker(kind: str, reorder: bool, threads: int, steps: int) -> None:
    import structc
    sys.path.insert(0, str(HERE))
    import bench_gnn
    structc.set_num_threads(threads)
    edge_index, x, y = graph(kind)
    g = structc.Graph(edge_index, x=x)
    t = time.perf_counter()
    if reorder:
        g = g.reordered()
    reorder_s = time.perf_counter() - t
    net = structc.compile(bench_gnn.MODEL)
    for _ in range(20):
        net.train_step(lr=0.01, g=g, y=y)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(steps):
            net.train_step(lr=0.01, g=g, y=y)
        times.append((time.perf_counter() - t) / steps)
    print(json.dumps({"step_s": statistics.median(times), "reorder_s": reorder_s}))


def run(kind: str, reorder: bool, threads: int, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(threads), "--steps", str(steps)]
    if reorder:
        cmd.append("--reorder")
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, STRUCTC_NUM_THREADS=str(threads)),
                         timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--worker", choices=["ring", "uniform"])
    p.add_argument("--reorder", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.reorder, args.threads, args.steps)
    configs = [(kind, reorder, threads) for kind in ("ring", "uniform") for reorder in (False, True)
               for threads in (1, 2)]
    got = {c: [] for c in configs}
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    for r in range(args.rounds):
        for c in (configs if r % 2 == 0 else configs[::-1]):
            got[c].append(run(*c, args.steps))
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    print("| graph | order | 1 thread | 2 threads | speed-up | `reordered()` |\n|---|---|---|---|---|---|")
    for kind in ("ring", "uniform"):
        for reorder in (False, True):
            one, two = (statistics.median(v["step_s"] for v in got[(kind, reorder, t)]) for t in (1, 2))
            took = statistics.median(v["reorder_s"] for v in got[(kind, reorder, 1)])
            print(f"| {kind} | {'reordered' if reorder else 'as numbered'} | {1e3 * one:.3f} ms | {1e3 * two:.3f} ms "
                  f"| {one / two:.2f}x | {f'{1e3 * took:.1f} ms' if reorder else '-'} |")


if __name__ == "__main__":
    main()
