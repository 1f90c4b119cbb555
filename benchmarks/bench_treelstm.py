"""Child-Sum Tree-LSTM (`treelstm_train`): one SGD step, structc vs PyTorch and JAX, level-batched.

The issue's workload: the trees benchmark's forest (32 random binary trees x
25 leaves, 1,568 nodes), embedding [1000, 64], hidden 128; a leaf's gates
from its word, an inner node's from the sum of its children's h, a forget
gate per child (Tai, Socher and Manning 2015):

    i, o, u = split(W x + U sum_k h_k + b),  f_k = sigmoid(U_f h_k + b_f)
    c = sigmoid(i) tanh(u) + sum_k f_k c_k,   h = sigmoid(o) tanh(c)

root h -> dense 5 -> mean cross-entropy; one SGD step (forward, backward,
update). Every contender runs one matmul of width 3H for i, o, u per level
and one matmul over all children's rows for the forget gates.

    python benchmarks/bench_treelstm.py [--threads 1 2] [--repeat 100] [--rounds 3]
    python benchmarks/bench_treelstm.py --levels [--threads 1]   # structc's matmuls per level

Each framework and thread count runs in a fresh process (`--only`), and the
medians are printed side by side. JAX's level sizes are static shapes, so
each new tree shape compiles again: that time is reported too.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_trees import CLASSES, VOCAB, batch, median_ms  # noqa: E402  (the trees benchmark's forest)
from cores import pinned  # noqa: E402

D, HID = 64, 128
SRC = f"""
model TreeLSTM {{
  input  t: forest of word(vocab={VOCAB})
  target y: class[t.trees] of {CLASSES}
  param  E: embedding({VOCAB}, {D})
  rec (h, c)(n) =
    leaf: {{ s = lstm_state(dense(E[n.word], {3 * HID}, name="leaf"), 0);     # [h, c] from i, o, u
            (chunk(s, 0, 2), chunk(s, 1, 2)) }}
    node: {{ s = lstm_state(dense(sum(h(n.children)), {3 * HID}, name="iou"),
                           sum(sigmoid(dense(h(k), {HID}, name="f")) * c(k) for k in n.children));
            (chunk(s, 0, 2), chunk(s, 1, 2)) }}
  loss cross_entropy(dense(h(t.root), {CLASSES}, name="out"), y)
}}
"""


def bench_structc(repeat, threads):
    import structc
    from structc import api
    from structc.forest import Forest
    structc.set_num_threads(threads)
    t0 = time.perf_counter()
    net = structc.compile(SRC, cache=False, training=True)     # the whole cold compile, as before lazy training
    compile_s = time.perf_counter() - t0
    trees, labels = batch(0)
    forest = Forest.from_tuples(trees)
    step = median_ms(lambda: net.train_step(t=forest, y=labels, lr=0.01), repeat)
    before = api.COMPILE_COUNT          # new shapes and batch sizes: no recompilation
    for seed in range(1, 4):
        tr, lb = batch(seed)
        net.train_step(t=Forest.from_tuples(tr[: 8 * seed]), y=lb[: 8 * seed], lr=0.01)
    assert api.COMPILE_COUNT == before
    return {"step_ms": step, "compile_s": compile_s}


def _schedule(trees):
    from structc.forest import Forest
    f = Forest.from_tuples(trees)
    return f, [0] + f.level_end.tolist()


def bench_torch(repeat, threads):
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    E = torch.nn.Parameter(torch.randn(VOCAB, D) * 0.1)
    leaf, iou, forget = torch.nn.Linear(D, 3 * HID), torch.nn.Linear(HID, 3 * HID), torch.nn.Linear(HID, HID)
    out = torch.nn.Linear(HID, CLASSES)
    params = [E, *leaf.parameters(), *iou.parameters(), *forget.parameters(), *out.parameters()]
    opt = torch.optim.SGD(params, lr=0.01)
    trees, labels = batch(0)
    f, ends = _schedule(trees)
    ch = torch.tensor(f.children, dtype=torch.long)
    words = torch.tensor(f.words, dtype=torch.long)
    roots = torch.tensor(f.roots, dtype=torch.long)
    y = torch.tensor(labels, dtype=torch.long)

    def cell(g, c_kept):
        i, o, u = g.chunk(3, dim=1)
        c = torch.sigmoid(i) * torch.tanh(u) + c_kept
        return torch.sigmoid(o) * torch.tanh(c), c

    def step():
        h, c = cell(leaf(E[words]), 0.0)
        hs, cs = [h], [c]
        for lo, hi in zip(ends[1:-1], ends[2:]):
            H, C = torch.cat(hs), torch.cat(cs)
            kids = ch[lo:hi]                            # binary trees: every inner node has both children
            hk = H[kids.reshape(-1)]                    # [2B, H]: one row per child
            fk = torch.sigmoid(forget(hk)).view(-1, 2, HID)
            kept = (fk * C[kids.reshape(-1)].view(-1, 2, HID)).sum(dim=1)
            h, c = cell(iou(hk.view(-1, 2, HID).sum(dim=1)), kept)
            hs.append(h)
            cs.append(c)
        loss = torch.nn.functional.cross_entropy(out(torch.cat(hs)[roots]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return {"step_ms": median_ms(step, repeat)}


def bench_jax(repeat, threads):
    os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
                                       f"intra_op_parallelism_threads={threads}")
    import jax
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    shapes = {"E": (VOCAB, D), "Wl": (D, 3 * HID), "bl": (3 * HID,), "Wi": (HID, 3 * HID), "bi": (3 * HID,),
              "Wf": (HID, HID), "bf": (HID,), "U": (HID, CLASSES), "c": (CLASSES,)}
    p = {k: jnp.asarray(rng.normal(size=s) * 0.1, jnp.float32) for k, s in shapes.items()}

    def cell(g, kept):
        i, o, u = jnp.split(g, 3, axis=1)
        c = jax.nn.sigmoid(i) * jnp.tanh(u) + kept
        return jax.nn.sigmoid(o) * jnp.tanh(c), c

    def make_step(ends):
        def loss(p, words, ch, roots, y):
            h, c = cell(p["E"][words] @ p["Wl"] + p["bl"], 0.0)
            H = jnp.zeros((ends[-1], HID), jnp.float32).at[: ends[1]].set(h)
            C = jnp.zeros((ends[-1], HID), jnp.float32).at[: ends[1]].set(c)
            for lo, hi in zip(ends[1:-1], ends[2:]):    # static bounds: one update in place per level
                kids = ch[lo:hi].reshape(-1)
                hk = H[kids]
                fk = jax.nn.sigmoid(hk @ p["Wf"] + p["bf"]).reshape(-1, 2, HID)
                kept = (fk * C[kids].reshape(-1, 2, HID)).sum(axis=1)
                h, c = cell(hk.reshape(-1, 2, HID).sum(axis=1) @ p["Wi"] + p["bi"], kept)
                H, C = H.at[lo:hi].set(h), C.at[lo:hi].set(c)
            z = H[roots] @ p["U"] + p["c"]
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))

        @jax.jit
        def step(p, words, ch, roots, y):
            value, grads = jax.value_and_grad(loss)(p, words, ch, roots, y)
            return jax.tree.map(lambda a, g: a - 0.01 * g, p, grads), value
        return step

    def prepared(seed):
        trees, labels = batch(seed)
        f, ends = _schedule(trees)
        args = tuple(jnp.asarray(a) for a in (f.words, f.children, f.roots, labels))
        return make_step(tuple(ends)), args

    step, args = prepared(0)
    state = {"p": p}

    def run():
        state["p"], value = step(state["p"], *args)
        value.block_until_ready()
    run_ms = median_ms(run, repeat)
    compiles = []
    for seed in range(1, 4):     # new tree shapes: trace and compile again
        new_step, new_args = prepared(seed)
        t0 = time.perf_counter()
        new_step(p, *new_args)[1].block_until_ready()
        compiles.append(time.perf_counter() - t0)
    return {"step_ms": run_ms, "compile_ms": 1e3 * float(np.median(compiles))}


def floor_flops(forest) -> dict:
    """The FLOPs of the matmuls one step needs, 2 M K N each. Forward: the
    leaves' gates from their words (distinct words x D x 3H: leaves of one word
    have one state, and structc computes it once), the inner nodes' iou from
    their children's summed h (inner x H x 3H: a leaf has no children, so no
    U h), a forget gate per child edge (edges x H x H). Backward: each product
    again for its input's cotangent and again for its weight's gradient, except
    that nothing flows into the word ids (the leaves' dX only feeds the
    embedding rows: still needed, E is trained)."""
    leaves, nodes = len(forest.words), len(forest.children)
    inner, edges = nodes - leaves, int((forest.children >= 0).sum())
    forward = {"leaf": len(set(forest.words.tolist())) * D * 3 * HID, "iou": inner * HID * 3 * HID, "forget": edges * HID * HID}
    return {k: 2 * 3 * v for k, v in forward.items()}


def level_profile(threads: int, steps: int, peak: float | None = None) -> str:
    """structc's step through the profiler: every matmul kernel per tree level
    (rows, µs, GFLOP/s, % of the measured FMA peak), the rest by kernel."""
    import structc
    from structc.forest import Forest
    from structc.profile import CALL, fma_peak, profile, profiled_net
    structc.set_num_threads(threads)
    trees, labels = batch(0)
    forest = Forest.from_tuples(trees)
    net = profiled_net(SRC, "<treelstm>")
    peak = peak or fma_peak()
    report = profile(net, {"t": forest, "y": labels}, steps=steps, warmup=20, peak=peak)
    ends = [0] + forest.level_end.tolist()
    sizes = [b - a for a, b in zip(ends[1:-1], ends[2:])]          # inner levels, bottom up
    inner = ends[-1] - ends[1]
    dims = {"rows": None, "kids": None, "t.leaves": ends[1], "t.trees": len(forest.roots),
            "t.leaf_words": len(set(forest.words.tolist()))}
    ev = report.events[report.events["kind"] == CALL]
    spans = report.step_spans
    out = [f"structc treelstm_train at {threads} thread(s): {report.step_seconds * 1e3:.3f} ms a step "
           f"(profiled, {report.steps} steps); FMA peak {peak:.1f} GFLOP/s; load "
           f"{os.getloadavg()[0]:.1f}", f"levels (inner rows, bottom up): {sizes}", "",
           f"{'kernel':44s} {'level':>5s} {'M':>5s} {'us':>8s} {'GFLOP/s':>8s} {'%peak':>6s}"]
    total_mm, total_flops = 0.0, 0
    for fn, kernel in sorted(report._kernels.items(), key=lambda kv: kv[1].name):
        if not kernel.flops or kernel.op != "matmul":
            continue
        mine = ev[ev["fn"] == fn]
        per_step = [mine[(mine["start"] >= a) & (mine["end"] <= b)] for a, b in spans]
        calls = len(per_step[0])
        if calls == 0:
            continue
        order = sizes[::-1] if "vjp_children" in kernel.name else sizes
        for j in range(calls):
            us = float(np.median([(s["end"][j] - s["start"][j]) for s in per_step if len(s) == calls])) / 1e3
            level_rows = order[j] if calls == len(sizes) else inner
            level_dims = dict(dims, rows=level_rows, kids=2 * level_rows)
            factors = [level_dims[f] if isinstance(f, str) else f for f in kernel.flops]
            flops, rows = int(np.prod(factors)), factors[1]      # (2, M, N, K)
            total_mm += us
            total_flops += flops
            level = (len(sizes) - j if "vjp_children" in kernel.name else j + 1) if calls == len(sizes) else "all"
            out.append(f"{kernel.name[:44]:44s} {level!s:>5s} {rows:5d} {us:8.1f} {flops / us / 1e3:8.1f} "
                       f"{100 * flops / us / 1e3 / peak:5.1f}%")
    floor = sum(floor_flops(forest).values())
    out += ["", f"matmuls: {total_mm / 1e3:.3f} ms for {total_flops / 1e6:.1f} MFLOP "
            f"({total_flops / total_mm / 1e3:.1f} GFLOP/s, {100 * total_flops / total_mm / 1e3 / peak:.0f}% of peak); "
            f"the step's floor {floor / 1e6:.1f} MFLOP = {floor / peak / 1e6:.3f} ms at {peak:.1f} GFLOP/s "
            f"({floor / peak / 1e6 / threads:.3f} ms on {threads} cores)", "", report.table()]
    return "\n".join(out)


BENCHES = {"structc": bench_structc, "torch": bench_torch, "jax": bench_jax}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=1, help="fresh processes per framework and thread count, "
                    "interleaved; the median is reported (default: 1)")
    ap.add_argument("--only", choices=BENCHES, help="run one framework in this process (a JSON line out)")
    ap.add_argument("--levels", action="store_true", help="profile structc's step: the matmuls per tree level")
    ap.add_argument("--peak", type=float, help="with --levels: the core's FMA peak in GFLOP/s (default: measured)")
    args = ap.parse_args()
    if args.levels:
        print(level_profile(args.threads[0], args.repeat, args.peak))
        return
    if args.only:
        print(json.dumps(BENCHES[args.only](args.repeat, args.threads[0])))
        return
    print(f"treelstm_train: 32 binary trees x 25 leaves (1568 nodes), embedding [{VOCAB}, {D}], hidden {HID}; "
          f"median ms of one SGD step over {args.repeat} steps, a fresh process per framework, thread count and "
          f"round; the median over {args.rounds} round(s)")
    print(f"load average {os.getloadavg()[0]:.1f} at the start")
    got: dict = {}                   # (threads, framework): each round's result
    for r in range(args.rounds):     # rounds interleave the frameworks: a noisy spell hits all of them
        for threads in args.threads:
            for name in BENCHES:
                run = subprocess.run([sys.executable, __file__, "--only", name, "--threads", str(threads),
                                      "--repeat", str(args.repeat)], capture_output=True, text=True,
                                     **pinned(threads))
                if run.returncode:
                    print(f"  {name} ({threads} thread(s), round {r + 1}): failed\n{run.stderr[-2000:]}")
                    continue
                got.setdefault((threads, name), []).append(json.loads(run.stdout.strip().splitlines()[-1]))
    for threads in args.threads:
        runs = {name: got[(threads, name)] for name in BENCHES if (threads, name) in got}
        step = {name: statistics.median(x["step_ms"] for x in rs) for name, rs in runs.items()}
        print(f"{threads} thread(s):")
        for name, rs in runs.items():
            extra = ""
            if name == "structc":
                extra = (f"   (cold compile {statistics.median(x['compile_s'] for x in rs):.2f} s; "
                         "new shapes: no recompilation)")
            if name == "jax":
                extra = (f"   (each new tree shape compiles again: "
                         f"{statistics.median(x['compile_ms'] for x in rs):.0f} ms)")
            each = ", ".join(f"{x['step_ms']:.3f}" for x in rs) if len(rs) > 1 else ""
            print(f"  {name:8s} {step[name]:8.3f} ms{extra}" + (f"   rounds: {each}" if each else ""))
        peers = [k for k in ("torch", "jax") if k in runs]
        if "structc" in runs and peers:
            line = f"  structc / fastest peer: {step['structc'] / min(step[k] for k in peers):.2f}x"
            if args.rounds > 1 and all(len(runs[k]) == args.rounds for k in ("structc", *peers)):
                per = [runs["structc"][r]["step_ms"] / min(runs[k][r]["step_ms"] for k in peers)
                       for r in range(args.rounds)]
                line += " (rounds: " + ", ".join(f"{x:.2f}" for x in per) + ")"
            print(line)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
