"""Recursive network over trees: one SGD step, structc vs PyTorch CPU eager.

The issue's workload: 32 random binary trees x 25 leaves (49 nodes each),
vocabulary 1000, d = 64; leaf = E[word], node = tanh(W [h_l; h_r] + b),
root -> dense 5 -> cross-entropy; one SGD step (forward, backward, update).

    python benchmarks/bench_trees.py [--threads 1] [--repeat 200] [--no-torch] [--no-jax]
    python benchmarks/bench_trees.py --vocab 100000 --dim 300    # a large table: its update

PyTorch is timed two ways: recursion per node, the way it is usually
written, and level-batched (one matmul per tree height, like structc). JAX,
when installed, level-batched under `jax.jit`: its level sizes are static
shapes, so every new tree shape compiles again (timed too). The forest (and
its level schedule) is built once per batch, outside the timed step, for
every contender; its cost is printed separately.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from cores import one_core



def source(vocab: int, d: int) -> str:
    return f"""
model TreeNet {{
  input  t: forest of word(vocab={vocab})
  target y: class[t.trees] of 5
  param  E: embedding({vocab}, {d})
  rec h(n) = leaf: E[n.word]
             node: tanh(dense(concat(h(n.left), h(n.right)), {d}))
  loss cross_entropy(dense(h(t.root), 5), y)
}}
"""


TREES, LEAVES, VOCAB, D, CLASSES = 32, 25, 1000, 64, 5
SRC = source(VOCAB, D)


def random_tree(rng, leaves: int):
    """A uniformly split random binary tree with `leaves` word leaves (nested tuples)."""
    if leaves == 1:
        return int(rng.integers(VOCAB))
    k = int(rng.integers(1, leaves))
    return (random_tree(rng, k), random_tree(rng, leaves - k))


def batch(seed: int):
    rng = np.random.default_rng(seed)
    trees = [random_tree(rng, LEAVES) for _ in range(TREES)]
    labels = rng.integers(0, CLASSES, TREES).astype(np.int32)
    return trees, labels


def median_ms(fn, repeat: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_structc(trees, labels, repeat, threads):
    import structc
    from structc import api
    from structc.forest import Forest
    structc.set_num_threads(threads)
    net = structc.compile(SRC)
    forest = Forest.from_tuples(trees)
    build_ms = median_ms(lambda: Forest.from_tuples(trees), 20, warmup=2)
    step_ms = median_ms(lambda: net.train_step(t=forest, y=labels, lr=0.01), repeat)
    # New shapes, sizes and batch sizes: no recompilation.
    before = api.COMPILE_COUNT
    for seed in range(1, 4):
        tr, lb = batch(seed)
        net.train_step(t=Forest.from_tuples(tr[: 8 * seed]), y=lb[: 8 * seed], lr=0.01)
    assert api.COMPILE_COUNT == before
    return step_ms, build_ms


def bench_torch(trees, labels, repeat, threads):
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    E = torch.nn.Parameter(torch.randn(VOCAB, D))
    W = torch.nn.Linear(2 * D, D)
    out = torch.nn.Linear(D, CLASSES)
    params = [E, *W.parameters(), *out.parameters()]
    opt = torch.optim.SGD(params, lr=0.01)
    y = torch.tensor(labels, dtype=torch.long)

    def per_node():
        def rec(t):
            if isinstance(t, int):
                return E[t]
            return torch.tanh(W(torch.cat([rec(t[0]), rec(t[1])])))
        roots = torch.stack([rec(t) for t in trees])
        loss = torch.nn.functional.cross_entropy(out(roots), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    from structc.forest import Forest
    f = Forest.from_tuples(trees)
    ch = torch.tensor(f.children, dtype=torch.long)
    words = torch.tensor(f.words, dtype=torch.long)
    roots = torch.tensor(f.roots, dtype=torch.long)
    ends = [0] + f.level_end.tolist()

    def level_batched():
        parts = [E[words]]
        for lo, hi in zip(ends[1:-1], ends[2:]):
            H = torch.cat(parts)
            kids = ch[lo:hi]
            parts.append(torch.tanh(W(torch.cat([H[kids[:, 0]], H[kids[:, 1]]], dim=1))))
        H = torch.cat(parts)
        loss = torch.nn.functional.cross_entropy(out(H[roots]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return median_ms(per_node, max(20, repeat // 10), warmup=5), median_ms(level_batched, repeat)


def bench_jax(trees, labels, repeat, threads):
    import os
    os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
                                       f"intra_op_parallelism_threads={threads}")
    import jax
    import jax.numpy as jnp

    from structc.forest import Forest
    rng = np.random.default_rng(0)
    p = {"E": rng.normal(size=(VOCAB, D)), "W": rng.normal(size=(2 * D, D)) * 0.1, "b": np.zeros(D),
         "U": rng.normal(size=(D, CLASSES)) * 0.1, "c": np.zeros(CLASSES)}
    p = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}

    def make_step(ends):
        def loss(p, words, ch, roots, y):
            H = jnp.zeros((ends[-1], D), jnp.float32).at[: ends[1]].set(p["E"][words])
            for lo, hi in zip(ends[1:-1], ends[2:]):     # static bounds: one update in place per level
                kids = ch[lo:hi]
                H = H.at[lo:hi].set(jnp.tanh(jnp.concatenate([H[kids[:, 0]], H[kids[:, 1]]], axis=1) @ p["W"]
                                             + p["b"]))
            z = H[roots] @ p["U"] + p["c"]
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))

        @jax.jit
        def step(p, words, ch, roots, y):
            value, grads = jax.value_and_grad(loss)(p, words, ch, roots, y)
            return jax.tree.map(lambda a, g: a - 0.01 * g, p, grads), value
        return step

    def prepared(trees, labels):
        f = Forest.from_tuples(trees)
        args = tuple(jnp.asarray(a) for a in (f.words, f.children, f.roots, labels))
        return make_step(tuple([0] + f.level_end.tolist())), args

    step, args = prepared(trees, labels)
    state = {"p": p}

    def run():
        state["p"], value = step(state["p"], *args)
        value.block_until_ready()
    run_ms = median_ms(run, repeat)
    compiles = []
    for seed in range(1, 4):     # new tree shapes: trace and compile again
        tr, lb = batch(seed)
        new_step, new_args = prepared(tr, lb)
        t0 = time.perf_counter()
        new_step(p, *new_args)[1].block_until_ready()
        compiles.append(time.perf_counter() - t0)
    return run_ms, 1e3 * statistics.median(compiles)


def set_sizes(vocab: int, d: int) -> None:
    """Every contender's vocabulary and width (the words drawn follow)."""
    global VOCAB, D, SRC
    VOCAB, D, SRC = vocab, d, source(vocab, d)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-jax", action="store_true")
    ap.add_argument("--vocab", type=int, default=VOCAB, help="the embedding's rows (a large one: its update's cost)")
    ap.add_argument("--dim", type=int, default=D, help="the embedding's and the nodes' width")
    args = ap.parse_args()
    set_sizes(args.vocab, args.dim)
    trees, labels = batch(0)
    nodes = sum(2 * LEAVES - 1 for _ in trees)
    print(f"{TREES} trees x {LEAVES} leaves ({nodes} nodes), vocab {VOCAB}, d = {D}, {args.threads} thread(s); "
          "median of one SGD step")
    with one_core(args.threads):
        run_all(trees, labels, args)


def run_all(trees, labels, args):
    step, build = bench_structc(trees, labels, args.repeat, args.threads)
    print(f"  structc                     {step:8.3f} ms   (building the forest from tuples: {build:.3f} ms)")
    if not args.no_torch:
        try:
            per_node, level = bench_torch(trees, labels, args.repeat, args.threads)
            print(f"  PyTorch eager, per node     {per_node:8.3f} ms")
            print(f"  PyTorch eager, level-batched{level:8.3f} ms")
        except ImportError:
            print("  (PyTorch not installed)")
    if not args.no_jax:
        try:
            step, compile_ms = bench_jax(trees, labels, args.repeat, args.threads)
            print(f"  JAX jit, level-batched      {step:8.3f} ms   (each new tree shape compiles again: "
                  f"{compile_ms:.0f} ms)")
        except ImportError:
            print("  (JAX not installed)")


if __name__ == "__main__":
    main()
