"""Batch assembly: `structc.batch` of 32 `graph_families` graphs and `Forest.concat`
of 64 `logic` forests, this checkout against an earlier revision's code.

The earlier revision's `structc/graphs.py` and `structc/forest.py` are read with
`git show` and loaded as modules beside the current ones; the same parts (copied
into each module's classes) are assembled by both, alternately, call by call, so
the shared machine's load falls on both alike. Each figure is the median of
--calls calls (wall time and this process's CPU time, in ms); the results of the
two are compared array by array first.

    python benchmarks/bench_batching.py [--before bca8b3b] [--calls 200]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import types
from pathlib import Path

import numpy as np

import structc
from structc.forest import Forest
from structc.graph_datasets import load_graph_families
from structc.graphs import batch
from structc.treedata import load_logic

ROOT = Path(__file__).resolve().parent.parent


def module_at(rev: str, path: str) -> types.ModuleType:
    """`path` as it was at `rev`, loaded as a module of its own."""
    source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    module = types.ModuleType(f"before_{Path(path).stem}")
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def as_old_graph(old, g):
    return old._restore({**g.__dict__, "arrays": dict(g.arrays)})


def as_old_forest(old, f):
    return old._restore({k: getattr(f, k) for k in old.Forest.__slots__ if k != "_bound"})


def same_graph(a, b) -> bool:
    fields = ("num_nodes", "num_edges", "num_graphs", "max_type")
    arrays = [(a.arrays[k], b.arrays[k]) for k in a.arrays] + [(a.order, b.order), (a.x, b.x)]
    return (all(getattr(a, k) == getattr(b, k) for k in fields) and set(a.arrays) == set(b.arrays)
            and all(np.array_equal(u, v) and u.dtype == v.dtype for u, v in arrays))


def same_forest(a, b) -> bool:
    names = [k for k in type(a).__slots__ if not k.startswith("_")]
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in names)


def race(calls: int, pick, before, after) -> dict:
    """Median wall and CPU ms of `before(parts)` and `after(parts)`, alternated."""
    times = {"before": ([], []), "after": ([], [])}
    for k in range(calls):
        parts = pick(k)
        order = (("before", before), ("after", after)) if k % 2 else (("after", after), ("before", before))
        for name, fn in order:
            w, c = time.perf_counter(), time.process_time()
            fn(parts[name])
            times[name][1].append(time.process_time() - c)
            times[name][0].append(time.perf_counter() - w)
    return {name: (statistics.median(w) * 1e3, statistics.median(c) * 1e3) for name, (w, c) in times.items()}


def back_to_back(calls: int, pick, before, after, rounds: int = 5) -> dict:
    """Mean ms per call of each over all the batches in a row (best of `rounds`):
    the caches then hold the assembly's own code and data, not the other's."""
    best = {"before": float("inf"), "after": float("inf")}
    batches = {name: [pick(k)[name] for k in range(calls)] for name in best}
    for _ in range(rounds):
        for name, fn in (("before", before), ("after", after)):
            w = time.perf_counter()
            for parts in batches[name]:
                fn(parts)
            best[name] = min(best[name], (time.perf_counter() - w) / calls * 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="bca8b3b", help="the revision to compare with (default: %(default)s)")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--graphs", type=int, default=32)
    ap.add_argument("--forests", type=int, default=64)
    args = ap.parse_args()
    old_graphs = module_at(args.before, "structc/graphs.py")
    old_forest = module_at(args.before, "structc/forest.py")
    rng = np.random.default_rng(0)

    graphs = load_graph_families().graphs
    old_g = [as_old_graph(old_graphs, g) for g in graphs]
    picks = [rng.choice(len(graphs), args.graphs, replace=False) for _ in range(args.calls)]

    def graph_parts(k):
        return {"before": [old_g[i] for i in picks[k]], "after": [graphs[i] for i in picks[k]]}

    assert all(same_graph(old_graphs.batch(graph_parts(k)["before"]), batch(graph_parts(k)["after"]))
               for k in range(10)), "the two revisions' batches differ"
    g = race(args.calls, graph_parts, old_graphs.batch, batch)
    g_loop = back_to_back(args.calls, graph_parts, old_graphs.batch, batch)

    trees = load_logic().train
    old_t = [as_old_forest(old_forest, f) for f in trees]
    tpicks = [rng.choice(len(trees), args.forests, replace=False) for _ in range(args.calls)]

    def forest_parts(k):
        return {"before": [old_t[i] for i in tpicks[k]], "after": [trees[i] for i in tpicks[k]]}

    assert all(same_forest(old_forest.Forest.concat(forest_parts(k)["before"]), Forest.concat(forest_parts(k)["after"]))
               for k in range(10)), "the two revisions' forests differ"
    f = race(args.calls, forest_parts, old_forest.Forest.concat, Forest.concat)
    f_loop = back_to_back(args.calls, forest_parts, old_forest.Forest.concat, Forest.concat)

    print(f"structc {structc.__file__}, before = {args.before}, median of {args.calls} calls, ms (wall / CPU)")
    for what, r, loop in ((f"batch() of {args.graphs} graph_families graphs", g, g_loop),
                          (f"Forest.concat of {args.forests} logic forests", f, f_loop)):
        (bw, bc), (aw, ac) = r["before"], r["after"]
        print(f"{what:45s} before {bw:.3f} / {bc:.3f}   after {aw:.3f} / {ac:.3f}   {bw / aw:.1f}x")
        print(f"{'  the same batches back to back, mean':45s} before {loop['before']:.3f}{'':8s}   after "
              f"{loop['after']:.3f}{'':8s}   {loop['before'] / loop['after']:.1f}x")


if __name__ == "__main__":
    main()
