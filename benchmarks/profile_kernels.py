"""Where a training step's time goes: every kernel of the entry point, timed.

    python benchmarks/profile_kernels.py mlp            # or gnn, gat, trees, lenet, conv
    python benchmarks/profile_kernels.py gnn --threads 2 --steps 400 --trace gnn.json

The benchmarks' models on their inputs, through the package's profiler
(`structc.profile`, also `structc profile` and `net.profile`): each kernel
with its time, share, GFLOP/s and % of the FMA peak, by .snet line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def workload(name: str):
    """(source, the inputs of one training step) for a benchmark's model."""
    import numpy as np

    import structc
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    if name == "mlp":
        import bench_mlp as m
        x, y = m.data()
        return m.MLP, {"x": x, "y": y}
    if name == "gnn":
        import bench_gnn as m
        edge_index, x, y = m.problem()
        g = structc.Graph(edge_index, x=x)
        return m.MODEL, {"g": g, "y": y}
    if name == "gat":
        import bench_gat as m
        edge_index, x, y = m.problem()
        return m.MODEL, {"g": structc.Graph(edge_index, x=x), "y": y}
    if name == "trees":
        import bench_trees as m
        trees, labels = m.batch(0)
        forest = structc.Forest.from_tuples(trees)
        return m.SRC, {"t": forest, "y": labels}
    rng = np.random.default_rng(0)
    if name == "lenet":
        import bench_conv as m
        x = rng.random((64, 1, 28, 28), dtype=np.float32)
        y = rng.integers(0, 10, 64).astype(np.int32)
        return m.LENET.read_text(), {"x": x, "y": y}
    if name == "conv":
        import bench_conv as m
        x = rng.normal(size=(32, 32, 32, 32)).astype(np.float32)
        y = rng.integers(0, 10, 32).astype(np.int32)
        return m.CONV_STEP, {"x": x, "y": y}
    raise SystemExit(f"unknown workload {name!r} (mlp, gnn, gat, trees, lenet, conv)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=["mlp", "gnn", "gat", "trees", "lenet", "conv"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: about a second's worth)")
    ap.add_argument("--trace", help="also write a Chrome/Perfetto trace (JSON)")
    args = ap.parse_args(argv)
    import structc
    from structc.profile import profile, profiled_net
    structc.set_num_threads(args.threads)
    source, inputs = workload(args.workload)
    net = profiled_net(source, f"<{args.workload}>")
    report = profile(net, inputs, steps=args.steps, warmup=20)
    print(report.table())
    if args.trace:
        report.write_trace(args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
