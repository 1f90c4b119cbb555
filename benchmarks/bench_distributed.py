"""Data-parallel training on MPI against one process: time per epoch over the same data.

    python benchmarks/bench_distributed.py [--repeats 3] [--epochs 3] [--batch 256] [--per-rank]
    python benchmarks/bench_distributed.py --feed [--repeats 5]     # the feeds alone, old way against the pool
    python benchmarks/bench_distributed.py --costs [--repeats 5]    # each part of a step: fixed + per item
    python benchmarks/bench_distributed.py --contention --only trees gnn   # a rank's step alone / two at once
    python benchmarks/bench_distributed.py --shares --only trees gnn --epochs 6   # 1 x 1 against a rank, no MPI
    python benchmarks/bench_distributed.py --overhead --only trees gnn   # what a rank's step adds to one process's

For the MLP (digits), a recursive tree network (logic, roots only) and a GNN
(graph_families), runs the same epochs of the same global batches as

    1 process x 1 thread, 1 process x 2 threads, 2 ranks x 1 thread (mpiexec -n 2)

each in fresh processes, `--repeats` times interleaved (each run's first epochs,
up to `WARMUP_STEPS` steps, untimed: a new shape's first calls are slow), and
prints the median epoch time of each, the speed-ups, the share of the 2-rank step spent in the
gradients' sum (shared memory between local ranks, else `Allreduce`; waiting for the slower
rank included), the start-up of a 2-rank
run to its first step beyond the compile, and a model of the Allreduce at N
hosts. One run of a configuration: `--worker NAME --threads T [--distributed]`
(prints JSON on rank 0).

`--batch` sets every workload's global batch (strong scaling: the same steps,
split among the ranks); `--per-rank` makes it each process's batch instead, so
2 ranks take global batches twice as large, half as many steps an epoch (weak
scaling, as DDP and Horovod count throughput: not the same optimisation, the
same items per epoch).
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

STARTED = time.perf_counter()
#: untimed epochs come first until this many steps have run (and one epoch at least)
WARMUP_STEPS = 10
ROOT = Path(__file__).resolve().parent.parent

TREE = """
model LogicRoots {
  input  t: forest(arity=3) of word(vocab=6)
  target y: class[t.trees] of 2
  param  E: embedding(6, 48) = normal(0.3)
  rec h(n) = leaf: E[n.word]
             node: tanh(dense(concat(h(n.children)), 48))
  loss cross_entropy(dense(h(t.root), 2), y)
}
"""

WORKLOADS = {   # name: (source or path, data set, global batch, optimizer, lr)
    "mlp": (ROOT / "examples" / "digits_mlp.snet", "digits", 64, "sgd", 0.1),
    "trees": (TREE, "logic", 64, "adam", 0.003),
    "gnn": (ROOT / "examples" / "graph_families.snet", "graph_families", 32, "adam", 0.005),
}


class TimedSum:
    """A `DataParallel`'s sum of the gradients (shared memory or `Allreduce`), timed:
    waiting for the slower rank included (DataParallel makes the next feed before it)."""

    def __init__(self, dp):
        self.sum, self.seconds, self.cpu_seconds = dp._sum, 0.0, 0.0
        dp._sum = self

    def __call__(self):
        t0, c0 = time.perf_counter(), time.process_time()
        self.sum()
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.process_time() - c0


def prepared(name: str):
    """A workload's net (compiled, optimizer set, its data bound) and data, in this process."""
    import structc
    from structc import datasets
    source, data_name, _batch, optimizer, _lr = WORKLOADS[name]
    net = structc.compile(source)
    data = datasets.load(data_name)
    data.bind(net)
    net.set_optimizer(optimizer)
    return net, data

def worker(name: str, threads: int, distributed: bool, epochs: int, global_batch: int | None = None) -> None:
    import warnings

    import numpy as np

    import structc
    from structc import datasets, distributed as dist
    from structc.native import set_num_threads
    warnings.simplefilter("ignore")
    set_num_threads(threads)
    source, data_name, batch, optimizer, lr = WORKLOADS[name]
    batch = global_batch or batch
    comm = dp = timed = None
    t0 = time.perf_counter()
    if distributed:
        comm = dist.mpi().COMM_WORLD
    t1 = time.perf_counter()
    net = structc.compile(source) if comm is None else dist.rank0_first(comm, lambda: structc.compile(source))
    compile_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    data = datasets.load(data_name)
    data.bind(net)
    data_s = time.perf_counter() - t2
    net.set_optimizer(optimizer)
    t3 = time.perf_counter()
    if comm is not None:
        dp = dist.DataParallel(net, comm)
        timed = TimedSum(dp)
    mpi_s = (t1 - t0) + (time.perf_counter() - t3)      # MPI's start and the broadcast
    items = dist._train_items(data)
    costs = dist.item_costs(data)
    rng = np.random.default_rng(0)
    times, cpu, allreduce, first_step = [], [], [], None
    warmup = max(1, -(-WARMUP_STEPS // -(-len(items) // batch)))
    for epoch in range(warmup + epochs):
        order = rng.permutation(items)
        if comm is not None:
            comm.Barrier()
            timed.seconds = timed.cpu_seconds = 0.0
        start, start_cpu = time.perf_counter(), time.process_time()
        if dp is None:
            shares = [order[at:at + batch] for at in range(0, len(order), batch)]
        else:                                       # every batch's share at once
            shares = dist.shard_epoch(dp, order, batch, costs)
        if dp is None:                              # feeds as `distributed.train` makes them
            losses = (net.train_step(lr=lr, **feed) for feed in dist.feeds(data, shares))
        else:                                       # the next share is made while the sum is in flight
            losses = dp.train_steps(dist.feeds(data, shares), lr)
        for _ in losses:
            if first_step is None:
                first_step = time.perf_counter() - STARTED - compile_s - data_s
        if epoch < warmup:
            continue
        times.append(time.perf_counter() - start)
        allreduce.append(timed.seconds if timed is not None else 0.0)
        # CPU time outside the sum (it busy-polls): the rank's own work, which does not
        # depend on what else the machine runs
        cpu.append(time.process_time() - start_cpu - (timed.cpu_seconds if timed is not None else 0.0))
    if comm is not None:
        cpu = [max(per_rank) for per_rank in zip(*comm.allgather(cpu))]     # the slower rank's
    if comm is None or comm.Get_rank() == 0:
        print(json.dumps({"epoch_s": times, "cpu_s": cpu, "allreduce_s": allreduce, "compile_s": compile_s, "data_s": data_s,
                          "mpi_s": mpi_s,
                          "startup_s": first_step, "steps": -(-len(items) // batch),
                          "params": int(net.meta["param_size"])}))


def feed_times(rounds: int) -> None:
    """CPU ms per epoch of making the feeds, the old way (`Forest.concat` / `batch` of
    the items, per step) against the data set's pool (`distributed.feeder`), for the
    whole global batch and for rank 0's share of 2 (`shard_epoch`); the two alternate
    batch by batch over the same batches; the best of `rounds` epochs."""
    import numpy as np

    import structc
    from structc import Forest, batch, datasets, distributed as dist
    from structc.graph_datasets import GraphDataset
    print("| workload | batch | old: concat / batch() | pool | speed-up |\n|---|---|---|---|---|")
    for name in ("trees", "gnn"):
        source, data_name, size, *_ = WORKLOADS[name]
        data = datasets.load(data_name)
        data.bind(structc.compile(source))
        if isinstance(data, GraphDataset):
            old = lambda items: {data.graph_name: batch([data.graphs[k] for k in items]),               # noqa: E731
                                 data.target["name"]: data.labels[items]}
        else:
            old = lambda items: data.feed(Forest.concat([data.train[k] for k in items]))               # noqa: E731
        for label, rank_of in (("whole", None), ("rank 0 of 2", 2)):
            best = {"old": float("inf"), "pool": float("inf")}
            for seed in range(rounds):
                order = np.random.default_rng(seed).permutation(dist._train_items(data))
                if rank_of is None:
                    shares = [order[at:at + size] for at in range(0, len(order), size)]
                else:
                    dp = type("Rank0", (), {"rank": 0, "size": rank_of})()
                    shares = dist.shard_epoch(dp, order, size, dist.item_costs(data))
                spent = {"old": 0.0, "pool": 0.0}
                feed = dist.feeder(data)
                for mine in shares:
                    for way, make in (("old", old), ("pool", feed)):
                        t = time.process_time()
                        make(mine)
                        spent[way] += time.process_time() - t
                best = {k: min(best[k], spent[k]) for k in best}
            print(f"| {name} | {size} ({label}) | {1e3 * best['old']:.1f} ms | {1e3 * best['pool']:.1f} ms | "
                  f"{best['old'] / best['pool']:.2f}x |")


def cost_model(rounds: int, allreduce_us: float = 13.0) -> None:
    """Where a step's time goes, in one process at 1 thread: CPU time per call (the best
    of `rounds` over 60 random batches) of making a feed and of the step (`train_step`;
    a rank's `grad_into_arena` + `apply_update`) at several batch sizes, fitted as
    fixed + per item, and the 2-rank speed-up they imply: (F + B v) / (F' + B v / 2 + A)
    for the global batch B, with a sum A of `allreduce_us` (the shared-memory sum's in a
    trees step on 2 local ranks; MPICH's `Allreduce` took 20). Feeds are made as
    training makes them (`distributed.feeds`)."""
    import warnings

    import numpy as np

    from structc import distributed as dist
    from structc.native import set_num_threads
    warnings.simplefilter("ignore")
    set_num_threads(1)
    print("| workload | part | fixed per call | per item | measured at 2 ... 64 items |\n|---|---|---|---|---|")
    for name in ("trees", "gnn"):
        _, _, size, _, lr = WORKLOADS[name]
        net, data = prepared(name)
        items, feed = dist._train_items(data), dist.feeder(data)
        rng = np.random.default_rng(0)
        sizes, spent = (2, 8, 16, 32, 64), []
        for b in sizes:
            picks = [rng.choice(items, b, replace=False) for _ in range(60)]
            best = [np.inf] * 3
            for _ in range(rounds):
                t = time.process_time()
                for _ in dist.feeds(data, picks):       # as training makes them (`take_many` chunks)
                    pass
                best[0] = min(best[0], (time.process_time() - t) / len(picks))
                for k, step in ((1, lambda f: net.train_step(lr=lr, **f)),
                                (2, lambda f: (net.grad_into_arena(**f), net.apply_update(lr)))):
                    fresh = [feed(p) for p in picks]          # new forests / graphs, as in training
                    t = time.process_time()
                    for f in fresh:
                        step(f)
                    best[k] = min(best[k], (time.process_time() - t) / len(picks))
            spent.append(best)
        fits = [np.polyfit(sizes, [s[k] for s in spent], 1) for k in range(3)]    # (per item, fixed)
        for k, part in enumerate(("feed", "train_step (1 process)", "grad_into_arena + apply_update (a rank)")):
            measured = ", ".join(f"{b}: {1e6 * s[k]:.0f}" for b, s in zip(sizes, spent))
            print(f"| {name} | {part} | {1e6 * fits[k][1]:.0f} us | {1e6 * fits[k][0]:.2f} us | {measured} us |")
        (vf, ff), (vs, fs), (vr, fr) = fits
        one, rank = ff + fs + size * (vf + vs), ff + fr + size / 2 * (vf + vr) + allreduce_us * 1e-6
        print(f"| {name} | implied 2-rank speed-up at a global batch of {size} | | | **{one / rank:.2f}x** |")


def shares(names, epochs: int) -> None:
    """CPU time per step in one process at 1 thread, the best of `epochs` epochs after a
    first: 1 x 1 (the feeds of each global batch, `train_step`) against a rank's share
    with no partner (the feeds of half of each batch, `DataParallel.train_steps` on a
    1-rank communicator, whose Allreduce is ~1 us). Their ratio is the 2-rank speed-up
    without MPI's sum, the wait for the slower rank or two cores' contention."""
    import warnings

    import numpy as np

    from structc import distributed as dist
    from structc.native import set_num_threads
    warnings.simplefilter("ignore")
    set_num_threads(1)
    print(f"load average before: {os.getloadavg()[0]:.2f}\n")
    print("| workload | 1 x 1 step | a rank's step (half, no partner) | ratio |\n|---|---|---|---|")
    for name in names:
        _, _, batch, _, lr = WORKLOADS[name]
        net, data = prepared(name)
        dp = dist.DataParallel(net, dist.mpi().COMM_SELF)
        items, rng, best = dist._train_items(data), np.random.default_rng(0), [float("inf")] * 2
        for epoch in range(epochs + 1):
            order = rng.permutation(items)
            for k, size in enumerate((batch, batch // 2)):
                mine = [order[at:at + size] for at in range(0, len(order), batch)]
                t = time.process_time()
                if k == 0:
                    for feed in dist.feeds(data, mine):
                        net.train_step(lr=lr, **feed)
                else:
                    for _ in dp.train_steps(dist.feeds(data, mine), lr):
                        pass
                best[k] = min(best[k], (time.process_time() - t) / len(mine)) if epoch else best[k]
        print(f"| {name} | {1e6 * best[0]:.0f} us | {1e6 * best[1]:.0f} us | {best[0] / best[1]:.2f}x |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


def overhead(names, rounds: int) -> None:
    """CPU time per call, in one process at 1 thread, at a rank's half batch: one
    process's step (`train_step`, its C call plan), a rank's two halves
    (`grad_into_arena` + `apply_update`) and `DataParallel.train_step` on a 1-rank
    communicator (the arena weighed, summed and divided), the best of `rounds` x 300
    calls; the last column is what data parallelism adds to a step around the same
    native work."""
    import warnings

    import numpy as np

    from structc import distributed as dist
    from structc.native import set_num_threads
    warnings.simplefilter("ignore")
    set_num_threads(1)
    print(f"load average before: {os.getloadavg()[0]:.2f}\n")
    print("| workload | `train_step` | `grad_into_arena` + `apply_update` | `DataParallel.train_step` (1 rank) "
          "| added by data parallelism |\n|---|---|---|---|---|")
    for name in names:
        _, _, batch, _, lr = WORKLOADS[name]
        net, data = prepared(name)
        dp = dist.DataParallel(net, dist.mpi().COMM_SELF)
        items, feed, rng = dist._train_items(data), dist.feeder(data), np.random.default_rng(0)
        feeds = [feed(rng.choice(items, batch // 2, replace=False)) for _ in range(300)]
        calls = (lambda f: net.train_step(lr=lr, **f), lambda f: (net.grad_into_arena(**f), net.apply_update(lr)),
                 lambda f: dp.train_step(lr, **f))
        best = [float("inf")] * len(calls)
        for _ in range(rounds):
            for k, call in enumerate(calls):
                t = time.process_time()
                for f in feeds:
                    call(f)
                best[k] = min(best[k], (time.process_time() - t) / len(feeds))
        print(f"| {name} | " + " | ".join(f"{1e6 * b:.1f} us" for b in best) + f" | {1e6 * (best[2] - best[0]):.1f} us |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


def half_steps(name: str, epochs: int) -> None:
    """CPU time per step of a rank's work without MPI (half of each global batch:
    `distributed.feeds`, `grad_into_arena`, `apply_update`), the best of `epochs`
    epochs after a first; prints JSON."""
    import warnings

    import numpy as np

    from structc import distributed as dist
    from structc.native import set_num_threads
    warnings.simplefilter("ignore")
    set_num_threads(1)
    _, _, batch, _, lr = WORKLOADS[name]
    net, data = prepared(name)
    items, rng, best = dist._train_items(data), np.random.default_rng(0), float("inf")
    for _ in range(epochs + 1):
        order = rng.permutation(items)
        shares = [order[at:at + batch // 2] for at in range(0, len(order), batch)]
        t = time.process_time()
        for feed in dist.feeds(data, shares):
            net.grad_into_arena(**feed)
            net.apply_update(lr)
        best = min(best, (time.process_time() - t) / len(shares)) if _ else best
    print(json.dumps({"step_s": best}))


def contention(names, epochs: int, repeats: int) -> None:
    """A rank's work (`half_steps`) alone, then two copies at once (what 2 ranks do,
    without MPI): how much a step's CPU time grows when both cores work."""
    def launch(name, copies):
        cmd = [sys.executable, __file__, "--half-steps", name, "--epochs", str(epochs)]
        env = dict(os.environ, STRUCTC_NUM_THREADS="1")
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(copies)]
        return max(json.loads(p.communicate()[0].strip().splitlines()[-1])["step_s"] for p in procs)
    print(f"load average before: {os.getloadavg()[0]:.2f}\n")
    print("| workload | a rank's step alone | two at once (the slower) | growth |\n|---|---|---|---|")
    for name in names:
        alone = min(launch(name, 1) for _ in range(repeats))
        both = min(launch(name, 2) for _ in range(repeats))
        print(f"| {name} | {1e6 * alone:.0f} us | {1e6 * both:.0f} us | {100 * (both / alone - 1):+.0f}% |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


def run(name: str, threads: int, distributed: bool, epochs: int, batch: int | None = None,
        per_rank: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--threads", str(threads), "--epochs", str(epochs)]
    if per_rank:                        # each process keeps the batch: 2 ranks take twice as many a step
        batch = (batch or WORKLOADS[name][2]) * (2 if distributed else 1)
    if batch:
        cmd += ["--batch", str(batch)]
    if distributed:
        cmd = ["mpiexec", "-n", "2", *cmd, "--distributed"]
    env = dict(os.environ, STRUCTC_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


CONFIGS = [("1 x 1", 1, False), ("1 x 2", 2, False), ("2 ranks x 1", 1, True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=list(WORKLOADS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--distributed", action="store_true")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="*", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--batch", type=int, help="the global batch of every workload (default: each one's own)")
    p.add_argument("--per-rank", action="store_true",
                   help="--batch (or the default) is each process's: 2 ranks step on twice as many (weak scaling)")
    p.add_argument("--feed", action="store_true", help="only time making the feeds (old way against the pool)")
    p.add_argument("--costs", action="store_true", help="only fit each step's parts as fixed + per item")
    p.add_argument("--contention", action="store_true",
                   help="only time a rank's work per step alone and as two copies at once (no MPI)")
    p.add_argument("--shares", action="store_true",
                   help="only time, in one process, a 1 x 1 step against a rank's share with no partner")
    p.add_argument("--overhead", action="store_true",
                   help="only time what a rank's step adds to one process's (1-rank communicator)")
    p.add_argument("--half-steps", choices=list(WORKLOADS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.half_steps:
        return half_steps(args.half_steps, args.epochs)
    if args.contention:
        return contention(args.only, args.epochs, args.repeats)
    if args.shares:
        return shares(args.only, args.epochs)
    if args.overhead:
        return overhead(args.only, max(args.repeats, 5))
    if args.feed:
        return feed_times(args.repeats)
    if args.costs:
        return cost_model(args.repeats)
    if args.worker:
        return worker(args.worker, args.threads, args.distributed, args.epochs, args.batch)
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    rows = []
    for name in args.only:
        results = {label: [] for label, *_ in CONFIGS}
        for _ in range(args.repeats):               # interleaved, so load changes hit every configuration
            for label, threads, dist in CONFIGS:
                results[label].append(run(name, threads, dist, args.epochs, args.batch, args.per_rank))
        epoch = {label: statistics.median(t for r in rs for t in r["epoch_s"]) for label, rs in results.items()}
        work = {label: statistics.median(t for r in rs for t in r["cpu_s"]) for label, rs in results.items()}
        two = results["2 ranks x 1"]
        share = statistics.median(a / e for r in two for a, e in zip(r["allreduce_s"], r["epoch_s"]))
        startup = {k: statistics.median(r[k] for r in two) for k in ("startup_s", "compile_s", "data_s", "mpi_s")}
        rows.append((name, epoch, share, startup, two[0]["steps"], two[0]["params"], work))
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    if args.per_rank:
        print("Each process's batch as given (2 ranks: global batches twice as large); steps/epoch: 2 ranks'.\n")
    print("| workload | steps/epoch | 1 x 1 | 1 x 2 | 2 ranks x 1 | 2 ranks vs 1 x 1 | 1 x 2 vs 1 x 1 | "
          "wait for the sum (2 ranks) | 2 ranks: start-up to the first step beyond compile and data (MPI's share) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, e, share, st, steps, _, _ in rows:
        print(f"| {name} | {steps} | {e['1 x 1']:.3f} s | {e['1 x 2']:.3f} s | {e['2 ranks x 1']:.3f} s | "
              f"**{e['1 x 1'] / e['2 ranks x 1']:.2f}x** | {e['1 x 1'] / e['1 x 2']:.2f}x | {100 * share:.1f}% | "
              f"{st['startup_s']:.2f} s ({st['mpi_s']:.2f} s; compile {st['compile_s']:.2f} s, "
              f"data {st['data_s']:.2f} s) |")
    print("\nCPU time per epoch outside the sum (the slower rank's for 2 ranks), and the speed-up it "
          "implies on an idle machine (1 x 1's over 2 ranks'):\n")
    print("| workload | 1 x 1 | 2 ranks x 1 (slower rank) | implied speed-up |")
    print("|---|---|---|---|")
    for name, *_, w in rows:
        print(f"| {name} | {w['1 x 1']:.3f} s | {w['2 ranks x 1']:.3f} s | {w['1 x 1'] / w['2 ranks x 1']:.2f}x |")
    print("\nModel at N hosts (ring Allreduce: 2(N-1)/N x arena bytes / bandwidth + 2(N-1) x 5 us latency),"
          " against the 1 x 1 step time divided by N (the batch split N ways):\n")
    print("| workload | arena | step at 1 x 1 | N | Allreduce at 10 Gb/s | at 100 Gb/s | compute per step |")
    print("|---|---|---|---|---|---|---|")
    for name, e, _, _, steps, params, _ in rows:
        step = e["1 x 1"] / steps
        arena = 4 * (params + 2)
        for n in (2, 8, 64):
            ring = lambda bw: 2 * (n - 1) / n * arena / bw + 2 * (n - 1) * 5e-6   # noqa: E731
            print(f"| {name} | {arena / 1e3:.0f} KB | {1e3 * step:.2f} ms | {n} | {1e3 * ring(1.25e9):.2f} ms | "
                  f"{1e3 * ring(12.5e9):.2f} ms | {1e3 * step / n:.3f} ms |")


if __name__ == "__main__":
    main()
