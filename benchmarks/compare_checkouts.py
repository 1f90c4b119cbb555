"""structc against itself: the structc workers of bench_mlp.py and bench_conv.py
for two checkouts, alternating, so both see the same machine.

    python benchmarks/compare_checkouts.py --before ../base/venv/bin/python:../base \\
        --after .venv/bin/python:. --rounds 5

Each side is an interpreter with that checkout installed (`pip install -e`)
and the checkout's folder. One thread, a fresh process per worker; each figure
is the median over rounds of the workers' per-round medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

JOBS = {"bench_mlp.py": ["mlp_step", "call_overhead"], "bench_conv.py": ["lenet_train", "lenet_infer"]}


def side(text: str) -> tuple[str, str]:
    python, _, root = text.partition(":")
    if not root:
        raise argparse.ArgumentTypeError("give PYTHON:CHECKOUT")
    return python, os.path.abspath(root)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=side, required=True, metavar="PYTHON:CHECKOUT")
    ap.add_argument("--after", type=side, required=True, metavar="PYTHON:CHECKOUT")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    env = dict(os.environ, STRUCTC_NUM_THREADS="1", OMP_NUM_THREADS="1",
               MALLOC_MMAP_THRESHOLD_="1073741824", MALLOC_TRIM_THRESHOLD_="1073741824")
    found: dict = {}
    for _ in range(args.rounds):
        for name, (python, root) in (("before", args.before), ("after", args.after)):
            for script, cases in JOBS.items():
                done = subprocess.run([python, os.path.join(root, "benchmarks", script), "--worker", "structc",
                                       "--threads", "1", "--cases", ",".join(cases)],
                                      env=env, capture_output=True, text=True, cwd=root)
                if done.returncode:
                    sys.exit(f"{name} {script} failed:\n{done.stderr[-2000:]}")
                for case, (median, _best) in json.loads(done.stdout.strip().splitlines()[-1]).items():
                    found.setdefault((case, name), []).append(median)
    print(f"{args.rounds} rounds, load average {os.getloadavg()[0]:.1f} at the end")
    for case in [c for cases in JOBS.values() for c in cases]:
        b, a = statistics.median(found[(case, "before")]), statistics.median(found[(case, "after")])
        print(f"{case:14s} before {b * 1e6:9.1f} us  after {a * 1e6:9.1f} us  after/before {a / b:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
