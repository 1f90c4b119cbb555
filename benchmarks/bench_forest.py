"""Tree levels by groups of whole trees against level by level, in one process.

    python benchmarks/bench_forest.py                       # trees, treelstm, lstm at 2 threads
    python benchmarks/bench_forest.py --workloads trees --blocks 16 --threads 2

At two threads or more a forest is cut into groups of whole trees, each
running all its levels with no barrier between them (`treemap.ForestTasks`,
the runtime's `sc_forest_parts`); `sc_set_forest_split(0)` turns that off
(the level by level path, one hand-off per level). Each workload's training
step is timed with the cut on and off in alternated blocks of steps in the
same process: on this shared VM a fresh process runs fast or slow for its
whole life, so two processes' times say less than one process's blocks.
Workloads are `profile_kernels.py`'s; the ratio is on / off (below 1: the
cut is faster), median and best blocks.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = {"trees": 300, "treelstm": 20, "lstm": 10}


def measure(name: str, steps: int, blocks: int, threads: int) -> tuple[list, list]:
    """Seconds per step of blocks with the cut on and off, alternated (ABBA)."""
    sys.path.insert(0, str(HERE))
    import structc
    from profile_kernels import workload
    from structc import native
    lib = native.runtime_library()
    source, inputs = workload(name)
    net = structc.compile(source, seed=0)
    structc.set_num_threads(threads)
    times = {0: [], 1: []}
    for _ in range(steps):
        net.train_step(**inputs, lr=0.01)
    try:
        for b in range(blocks):
            for on in ((1, 0) if b % 2 == 0 else (0, 1)):
                lib.sc_set_forest_split(on)
                for _ in range(max(2, steps // 10)):
                    net.train_step(**inputs, lr=0.01)
                t0 = time.perf_counter()
                for _ in range(steps):
                    net.train_step(**inputs, lr=0.01)
                times[on].append((time.perf_counter() - t0) / steps)
    finally:
        lib.sc_set_forest_split(1)
    return times[1], times[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="trees,treelstm,lstm")
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    print(f"threads {args.threads}, {args.blocks} blocks each way; ms per step, median (best)")
    print("| workload | groups of trees | level by level | ratio (best) |\n|---|---|---|---|")
    for name in args.workloads.split(","):
        on, off = measure(name, STEPS[name], args.blocks, args.threads)
        m_on, m_off = statistics.median(on), statistics.median(off)
        print(f"| {name} | {1e3 * m_on:.3f} ({1e3 * min(on):.3f}) | {1e3 * m_off:.3f} ({1e3 * min(off):.3f}) | "
              f"{m_on / m_off:.3f} ({min(on) / min(off):.3f}) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
