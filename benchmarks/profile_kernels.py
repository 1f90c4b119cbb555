"""Where a training step's time goes: every kernel of the entry point, timed.

    python benchmarks/profile_kernels.py mlp            # or gnn, gat, trees, treelstm, lstm, lenet, conv
    python benchmarks/profile_kernels.py gnn --threads 2 --steps 400 --trace gnn.json
    python benchmarks/profile_kernels.py lenet --compare      # 1 against 2 threads, per kernel

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
    if name == "treelstm":
        import bench_treelstm as m
        trees, labels = m.batch(0)
        return m.SRC, {"t": structc.Forest.from_tuples(trees), "y": labels}
    if name == "lstm":
        import bench_lstm as m
        from structc.seqdata import Sequences
        x, lengths, y = m.batch("uniform")
        return m.SRC, {"s": Sequences.from_flat(x, np.concatenate([[0], np.cumsum(lengths)])), "y": y}
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
    raise SystemExit(f"unknown workload {name!r} (mlp, gnn, gat, trees, treelstm, lstm, lenet, conv)")


def compare(one, two) -> str:
    """Per kernel, 1- against 2-thread time, and where the second core is lost:
    the 2-thread step's time beyond half the 1-thread step's, split into kernels
    that ran on one thread (serial: below the work threshold, or single-task),
    pooled kernels short of 2x (hand-off, waiting at the end, imbalance,
    memory bandwidth) and time outside kernels (Python)."""
    at_two = {r.kernel.name: r for r in two.rows if not r.nested}
    out = [f"{one.model} {one.kind} step: 1 thread {one.step_seconds * 1e6:.1f} us, 2 threads "
           f"{two.step_seconds * 1e6:.1f} us: {one.step_seconds / two.step_seconds:.2f}x", "",
           f"{'kernel':40s} {'1 thr us':>9s} {'2 thr us':>9s} {'x':>5s} {'thr':>3s} {'lost us':>8s}"]
    serial = "kernels one thread ran"        # below the threshold, one task, or the worker got no core
    levels = "recursions (their levels' kernels)"   # one task on the caller, pooled kernels inside
    lost = {serial: 0.0, levels: 0.0, "pooled kernels short of 2x": 0.0}
    for r in sorted((r for r in one.rows if not r.nested), key=lambda r: -r.seconds):
        r2 = at_two.get(r.kernel.name)
        if r2 is None:
            continue
        excess = r2.seconds - r.seconds / 2
        kind = levels if r.kernel.op.startswith("tree_map") else serial if r2.threads <= 1 else \
            "pooled kernels short of 2x"
        lost[kind] += excess
        if r.seconds > 0.01 * one.step_seconds:
            out.append(f"{r.kernel.name[:40]:40s} {r.seconds * 1e6:9.1f} {r2.seconds * 1e6:9.1f} "
                       f"{r.seconds / max(r2.seconds, 1e-12):5.2f} {r2.threads:3d} {excess * 1e6:8.1f}")
    lost["outside kernels (Python)"] = two.outside_seconds - one.outside_seconds / 2
    total = two.step_seconds - one.step_seconds / 2
    out += ["", f"the 2-thread step beyond half the 1-thread step: {total * 1e6:.1f} us"]
    out += [f"  {what:30s} {us * 1e6:8.1f} us ({100 * us / total if total > 0 else 0:3.0f}%)"
            for what, us in lost.items()]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=["mlp", "gnn", "gat", "trees", "treelstm", "lstm", "lenet", "conv"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: about a second's worth)")
    ap.add_argument("--trace", help="also write a Chrome/Perfetto trace (JSON)")
    ap.add_argument("--compare", action="store_true", help="1 against 2 threads, kernel by kernel")
    ap.add_argument("--hidden", type=int, help="lstm: the cell's units (default: bench_lstm's, the issue's 128)")
    args = ap.parse_args(argv)
    if args.hidden is not None:
        if args.workload != "lstm":
            ap.error("--hidden is for the lstm workload")
        import bench_lstm
        bench_lstm.set_hidden(args.hidden)
    import structc
    from structc.profile import profile, profiled_net
    if args.compare:
        source, inputs = workload(args.workload)
        net = profiled_net(source, f"<{args.workload}>")
        reports = []
        for threads in (1, 2):
            structc.set_num_threads(threads)
            reports.append(profile(net, inputs, steps=args.steps, warmup=20))
        print(compare(*reports))
        return 0
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
