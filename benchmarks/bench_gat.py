"""Graph attention benchmark (issue 11, `gat_train`): one SGD step of a 2-layer GAT.

    the GNN benchmark's graph: 2000 nodes, 10000 directed edges (uniform at random,
    seed 0), 32 input features; a self loop added at every node;
    h = elu(gat(x, 4 heads x 16, concatenated)), logits = gat(h, 1 head x 4 classes),
    mean cross-entropy over all nodes, one SGD step (forward, backward, update).

structc, PyTorch CPU eager (gather, `scatter_reduce` amax, `index_add_`) and JAX
jit (`segment_max`, `segment_sum`), each in a fresh process per thread count.
The softmax subtracts each node's largest score (not differentiated through,
as PyTorch Geometric does; the result does not depend on it). Before timing,
the three are checked to compute the same loss and step from the same weights.
Each timing is the median of --repeats runs of --steps steps; the share of the
machine other processes took meanwhile is printed beside it (see bench_gnn.py),
and the process's CPU time per step after it (all its threads: on a loaded
machine the work done is inflated less than the wall clock).

    python benchmarks/bench_gat.py [--steps 100] [--repeats 5] [--threads 1 2]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from cores import pinned
from bench_gnn import EDGES, FEATURES, NODES, Timer, fmt, per_step, problem

HEADS, WIDTH, CLASSES, LR, SLOPE = 4, 16, 4, 0.01, 0.2

MODEL = f"""
model GatBench {{
  input  g: graph(features={FEATURES})
  target y: class[g.nodes] of {CLASSES}
  h = elu(gat(g.x over g.edges, {WIDTH}, heads={HEADS}))
  loss cross_entropy(gat(h over g.edges, {CLASSES}, heads=1), y)
}}
"""
SHAPES = {"gat1.w": (FEATURES, HEADS * WIDTH), "gat1.a_src": (HEADS, WIDTH), "gat1.a_dst": (HEADS, WIDTH),
          "gat1.b": (HEADS * WIDTH,), "gat2.w": (HEADS * WIDTH, CLASSES), "gat2.a_src": (1, CLASSES),
          "gat2.a_dst": (1, CLASSES), "gat2.b": (CLASSES,)}


def weights(seed: int = 0) -> dict:
    """The same starting weights for every framework (glorot-like, small biases)."""
    rng = np.random.default_rng(seed)
    return {k: rng.uniform(-0.3, 0.3, s).astype(np.float32) for k, s in SHAPES.items()}


def with_self_loops(edge_index):
    loops = np.arange(NODES)
    return np.concatenate([edge_index[0], loops]), np.concatenate([edge_index[1], loops])


# -- structc ----------------------------------------------------------------------

def structc_step(threads: int):
    import structc
    structc.set_num_threads(threads)
    edge_index, x, y = problem()
    net = structc.compile(MODEL)
    for k, v in weights().items():
        net.params[k][...] = v
    g = structc.Graph(edge_index, x=x)          # CSR and its transpose built once; self loops in the kernels
    return net, lambda: net.train_step(g=g, y=y, lr=LR)      # the loss


# -- PyTorch -----------------------------------------------------------------------

def torch_step(threads: int):
    import torch
    torch.set_num_threads(threads)
    edge_index, x, y = problem()
    src, dst = (torch.from_numpy(a).long() for a in with_self_loops(edge_index))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    p = {k: torch.from_numpy(v.copy()).requires_grad_() for k, v in weights().items()}
    opt = torch.optim.SGD(list(p.values()), lr=LR)

    def layer(h, name, heads, width):
        wh = (h @ p[f"{name}.w"]).view(NODES, heads, width)
        e = torch.nn.functional.leaky_relu((wh * p[f"{name}.a_src"]).sum(-1)[src]
                                           + (wh * p[f"{name}.a_dst"]).sum(-1)[dst], SLOPE)
        index = dst[:, None].expand(-1, heads)
        top = torch.full((NODES, heads), -torch.inf).scatter_reduce(0, index, e.detach(), "amax")
        ex = (e - top[dst]).exp()
        alpha = ex / torch.zeros(NODES, heads).index_add_(0, dst, ex)[dst]
        out = torch.zeros(NODES, heads, width).index_add_(0, dst, alpha[:, :, None] * wh[src])
        return out.reshape(NODES, heads * width) + p[f"{name}.b"]

    def loss():
        h = torch.nn.functional.elu(layer(xt, "gat1", HEADS, WIDTH))
        return torch.nn.functional.cross_entropy(layer(h, "gat2", 1, CLASSES), yt)

    def step():
        value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        return float(value.detach())
    return p, step


# -- JAX ----------------------------------------------------------------------------

def jax_step(threads: int):
    import jax
    import jax.numpy as jnp
    edge_index, x, y = problem()
    src, dst = (jnp.asarray(a, jnp.int32) for a in with_self_loops(edge_index))
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    def layer(p, h, name, heads, width):
        wh = (h @ p[f"{name}.w"]).reshape(NODES, heads, width)
        e = jax.nn.leaky_relu((wh * p[f"{name}.a_src"]).sum(-1)[src] + (wh * p[f"{name}.a_dst"]).sum(-1)[dst],
                              SLOPE)
        top = jax.lax.stop_gradient(jax.ops.segment_max(e, dst, num_segments=NODES))
        ex = jnp.exp(e - top[dst])
        alpha = ex / jax.ops.segment_sum(ex, dst, num_segments=NODES)[dst]
        out = jax.ops.segment_sum(alpha[:, :, None] * wh[src], dst, num_segments=NODES)
        return out.reshape(NODES, heads * width) + p[f"{name}.b"]

    def loss(p):
        h = jax.nn.elu(layer(p, xj, "gat1", HEADS, WIDTH))
        logp = jax.nn.log_softmax(layer(p, h, "gat2", 1, CLASSES))
        return -jnp.mean(jnp.take_along_axis(logp, yj[:, None], axis=1))

    def sgd(p):
        value, grads = jax.value_and_grad(loss)(p)
        return value, jax.tree_util.tree_map(lambda a, g: a - LR * g, p, grads)
    sgd = jax.jit(sgd, donate_argnums=0)
    state = [{k: jnp.asarray(v) for k, v in weights().items()}]

    def step():
        value, state[0] = sgd(state[0])
        return float(value.block_until_ready())
    return state, step


STEPS = {"structc": structc_step, "torch": torch_step, "jax": jax_step}


def check(names, threads: int = 1) -> None:
    """From the same weights, two steps give the same losses in every framework."""
    losses = {}
    for name in names:
        _, step = STEPS[name](threads)
        losses[name] = (step(), step())
    ref = losses["structc"]
    for name, got in losses.items():
        if not np.allclose(got, ref, rtol=1e-4, atol=1e-5):
            raise AssertionError(f"{name}'s losses {got} differ from structc's {ref}")
    print("same losses from the same weights, two steps: "
          + ", ".join(f"{k} {v[0]:.6f} -> {v[1]:.6f}" for k, v in losses.items()), flush=True)


def cpu_per_step(step, steps: int, repeats: int) -> float:
    """Median over repeats of the process's CPU time (all its threads) per step,
    in ms: the work done, which a loaded machine inflates less than the wall clock."""
    runs = []
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(steps):
            step()
        runs.append((time.process_time() - t0) / steps * 1e3)
    return statistics.median(runs)


def worker(name: str, threads: int, steps: int, repeats: int) -> None:
    _, step = STEPS[name](threads)
    wall, others = per_step(step, steps, repeats)
    print(json.dumps((wall, others, cpu_per_step(step, steps, repeats))))


def run(name: str, threads: int, args) -> tuple[float, float, float]:
    """A fresh process per framework and thread count (XLA reads its threading
    flags once, at import; every framework keeps its thread pool)."""
    env = dict(os.environ)
    if name == "jax":
        env["XLA_FLAGS"] = (f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
                            f"intra_op_parallelism_threads={threads}")
    cmd = [sys.executable, __file__, "--worker", name, "--threads", str(threads), "--steps", str(args.steps),
           "--repeats", str(args.repeats), "--max-others", str(args.max_others), "--tries", str(args.tries)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, **pinned(threads))
    if done.returncode != 0:
        raise RuntimeError(f"{name} ({threads} threads) failed:\n{done.stderr}")
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    p.add_argument("--max-others", type=float, default=0.05,
                   help="discard runs where other processes used more of the machine than this")
    p.add_argument("--tries", type=int, default=20, help="runs at most per timing")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-jax", action="store_true")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--worker", choices=sorted(STEPS), help=argparse.SUPPRESS)
    args = p.parse_args()
    Timer.max_others, Timer.tries = args.max_others, args.tries
    if args.worker:
        worker(args.worker, args.threads[0], args.steps, args.repeats)
        return
    names = ["structc"] + [n for n in ("torch", "jax")
                           if not getattr(args, f"no_{n}") and importlib.util.find_spec(n) is not None]
    if not args.no_check:
        check(names)
    print(f"{NODES} nodes, {EDGES} edges + {NODES} self loops, {FEATURES} features; gat {HEADS}x{WIDTH} concat, elu, "
          f"gat 1x{CLASSES}; mean cross-entropy, one SGD step; median of {args.repeats} x {args.steps} steps")
    for t in args.threads:
        times = {n: run(n, t, args) for n in names}
        fastest = min((times[n][0], n) for n in names if n != "structc") if len(names) > 1 else None
        line = f"threads={t}  " + "   ".join(f"{n} {fmt(times[n][:2])} cpu {times[n][2]:7.3f} ms" for n in names)
        if fastest:
            cpu = min((times[n][2], n) for n in names if n != "structc")
            line += (f"\n    structc / fastest other: wall {times['structc'][0] / fastest[0]:.2f}x ({fastest[1]}), "
                     f"cpu {times['structc'][2] / cpu[0]:.2f}x ({cpu[1]})")
        print(line, flush=True)


if __name__ == "__main__":
    main()
