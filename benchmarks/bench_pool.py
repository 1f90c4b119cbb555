"""What the thread pool costs a job (issue 14): `sc_parallel_for` alone, in C.

    python benchmarks/bench_pool.py                          # this checkout's runtime
    python benchmarks/bench_pool.py --against ../base        # and another checkout's, alternated

A C program built from `runtime/structc_rt.c` runs jobs of T tasks (each task
updates its own 1 KB of floats: about 25 ns of work on a core) 20,000 times
at 2 threads and at 1, seven rounds each; it prints the best round's time per
job and the hand-off's cost: the 2-thread time beyond half the 1-thread one,
what a job loses to the pool (publishing it, the worker's start, the claims,
the wait for the last task). A training step hands off 5 jobs (the tree
network) to about 40 (LeNet-5), so each 0.1 us a job is 0.5-4 us a step.
Builds with `cc` (or `gcc`); the checkouts alternate, `--rounds` times.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = (8, 24, 64, 128)

DRIVER = r"""
#include "structc_rt.h"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static float data[128 * 256];

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void task(void *frame, int64_t lo, int64_t hi) {
    float *d = frame;
    for (int64_t i = lo; i < hi; i++)
        for (int k = 0; k < 256; k++) d[i * 256 + k] = d[i * 256 + k] * 0.5f + 1.0f;
}

static double best_job(int threads, int tasks) {
    sc_set_num_threads(threads);
    double best = 1e9;
    for (int round = 0; round < 8; round++) {       /* the first round warms up */
        double t = now();
        for (int i = 0; i < 20000; i++) sc_parallel_for(task, data, tasks, 1 << 20);
        double per = (now() - t) / 20000;
        if (round > 0 && per < best) best = per;
    }
    return best;
}

int main(int argc, char **argv) {
    for (int k = 1; k < argc; k++) {
        int tasks = atoi(argv[k]);
        double two = best_job(2, tasks), one = best_job(1, tasks);
        printf("%d %.3f %.3f\n", tasks, two * 1e6, one * 1e6);
    }
    return 0;
}
"""


def build(cc: str, driver: Path, checkout: Path, exe: Path) -> Path:
    """`driver` linked with `checkout`'s runtime, as `exe`."""
    subprocess.run([cc, "-O2", "-std=c11", "-pthread", f"-I{checkout / 'runtime'}", str(driver),
                    str(checkout / "runtime" / "structc_rt.c"), "-o", str(exe)], check=True)
    return exe


def run(exe: Path) -> dict[int, tuple[float, float]]:
    out = subprocess.run([str(exe), *map(str, TASKS)], capture_output=True, text=True, check=True,
                         env={"STRUCTC_BACKOFF": "0"}).stdout
    return {int(t): (float(two), float(one)) for t, two, one in (line.split() for line in out.splitlines())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", type=Path, help="another checkout (its runtime/structc_rt.c), alternated")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    sides = {"this": ROOT} | ({"other": args.against.resolve()} if args.against else {})
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("bench_pool needs a C compiler (cc or gcc)")
    with tempfile.TemporaryDirectory() as tmp:
        driver = Path(tmp) / "driver.c"
        driver.write_text(DRIVER)
        exes = {name: build(cc, driver, path, Path(tmp) / f"pool_{name}") for name, path in sides.items()}
        best: dict[str, dict[int, tuple[float, float]]] = {name: {} for name in sides}
        for _ in range(args.rounds):
            for name, exe in exes.items():
                for t, (two, one) in run(exe).items():
                    old = best[name].get(t)
                    best[name][t] = (min(two, old[0]), min(one, old[1])) if old else (two, one)
    print("| runtime | tasks | 2 threads us | 1 thread us | hand-off us (2 threads - 1 thread / 2) |")
    print("|---|---|---|---|---|")
    for name, path in sides.items():
        for t in TASKS:
            two, one = best[name][t]
            print(f"| {name} ({path.name}) | {t} | {two:.2f} | {one:.2f} | {two - one / 2:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
