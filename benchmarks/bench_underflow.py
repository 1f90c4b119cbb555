"""Training steps as values underflow: does a step get slower the longer a model trains?

    python benchmarks/bench_underflow.py [--rounds 8] [--steps 1000]
    python benchmarks/bench_underflow.py --before ../base-venv/bin/python   # another checkout too

Two workloads, each in a fresh process (and with `--before`, the same in an
interpreter with another checkout of structc installed, alternating):

- `fit`: the graph_families GNN (`examples/graph_families.snet`, Adam, lr
  0.003, 1 thread) trained on one batch of 32 graphs over and over. As it
  fits them its gradients shrink towards float32's subnormal range, where
  every instruction that meets one may take a microcode assist on x86 (unless
  results are flushed to zero). Printed: ms per step of each round of
  `--steps` steps, after 3000 untimed ones.
- `update`: the same model's Adam update alone (`apply_update`, zero
  gradients) with every first moment at 4 * 2^-149, a subnormal that 0.9
  times rounds back to itself: where a moment decays to when its gradient
  stays 0. Printed: us per update.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBNORMAL = 4 * 2.0 ** -149


def _net():
    import structc
    from structc import datasets
    net = structc.compile(ROOT / "examples" / "graph_families.snet")
    data = datasets.load("graph_families")
    data.bind(net)
    net.set_optimizer("adam")
    return net, data


def worker(name: str, rounds: int, steps: int) -> dict:
    import numpy as np

    import structc
    from structc import distributed as dist
    structc.set_num_threads(1)
    net, data = _net()
    if name == "update":
        size = net.meta["param_size"]
        for g in net.grads.values():
            g[...] = 0.0
        times = []
        for _ in range(rounds):
            net._state_arena[:size] = np.float32(SUBNORMAL)
            t0 = time.perf_counter()
            for _ in range(steps):
                net.apply_update(0.0)
            times.append((time.perf_counter() - t0) / steps * 1e6)
        return {"us": times}
    feed = dist.feeder(data)(dist._train_items(data)[:32])
    for _ in range(3000):
        net.train_step(lr=0.003, **feed)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            net.train_step(lr=0.003, **feed)
        times.append((time.perf_counter() - t0) / steps * 1e3)
    return {"ms": times}


def run(python: str, name: str, rounds: int, steps: int) -> dict:
    out = subprocess.run([python, __file__, "--worker", name, "--rounds", str(rounds), "--steps", str(steps)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--before", help="a Python with another checkout of structc installed")
    ap.add_argument("--worker", choices=["fit", "update"])
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.rounds, args.steps)))
        return 0
    pythons = ([("before", args.before)] if args.before else []) + [("after" if args.before else "this", sys.executable)]
    for name, unit in (("fit", "ms"), ("update", "us")):
        for label, python in pythons:
            got = run(python, name, args.rounds, args.steps if name == "fit" else 20 * args.steps)[unit]
            print(f"{name:6s} {label:6s} median {statistics.median(got):8.3f} {unit}   rounds: "
                  + " ".join(f"{t:.3f}" for t in got))
    return 0


if __name__ == "__main__":
    sys.exit(main())
