"""Dense networks: structc against plain numpy, PyTorch eager and JAX jit, 1 and 2 threads.

    python benchmarks/bench_mlp.py                  # everything, 5 rounds
    python benchmarks/bench_mlp.py --rounds 3 --threads 1 --cases mlp_step
    python benchmarks/bench_mlp.py --dropout --rounds 3   # the MLP step with and without dropout

Cases (the foundation issue's benchmarks):
  mlp_step       one SGD training step (forward, backward, update) of the MLP
                 784-256-128-10, ReLU, softmax cross-entropy, batch 64
  matmul256      the tiled matmul kernel, C = A @ B at 256 x 256 x 256 (GFLOP/s)
  matmul1024     the same at 1024 x 1024 x 1024
  compile_cold   structc.compile of that MLP with an empty cache, in a fresh process
  call_overhead  one forward call of a trivial model (y = x + 1 on a [1, 4] input),
                 the whole Python path: input checks, output allocation, native call
  mlp_dropout    (`--dropout`, structc only) the mlp_step model with dropout(p=0.5)
                 after each hidden layer against mlp_step itself, timed alternately
                 in one process: the step's cost of dropout as a ratio

structc's matmul is timed at the native entry point (inputs bound once), so
the kernel is what is measured; numpy's is `np.matmul` into a preallocated
output (OpenBLAS; the environment's OPENBLAS_CORETYPE, if set, is printed).
The other frameworks are timed the way their users write a training step:
PyTorch `nn.Sequential` + `loss.backward()` + `optim.SGD.step()`; JAX one
`jax.jit` of value_and_grad and the update, parameters donated; numpy the
textbook backward pass with in-place updates.

Every (framework, threads) configuration runs in a fresh process, rounds
interleave the frameworks, and each number is the median over rounds of
per-round medians (best single call in brackets). All run with
MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from cores import pinned
from bench_conv import timed   # [median, best] seconds per call; the same timer as the conv benchmarks

MLP = """model MLP {
  input  x: f32[N, 784]
  target y: class[N] of 10
  h = dense(x, 256) |> relu
  h = dense(h, 128) |> relu
  loss cross_entropy(dense(h, 10), y)
}"""
MLP_DROPOUT = MLP.replace("h = dense(x, 256) |> relu", "h = dropout(dense(x, 256) |> relu, 0.5)").replace(
    "h = dense(h, 128) |> relu", "h = dropout(dense(h, 128) |> relu, 0.5)")
TRIVIAL = "model Trivial { input x: f32[N, 4]\n output y = x + 1 }"
BATCH, SIZES = 64, (784, 256, 128, 10)
CASES = ["mlp_step", "matmul256", "matmul1024", "compile_cold", "call_overhead"]
REPS = {"mlp_step": 2000, "mlp_dropout": 2000, "matmul256": 400, "matmul1024": 20, "call_overhead": 20000}
FRAMEWORKS = ["structc", "numpy", "torch", "jax"]


def data(seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], BATCH).astype(np.int32)
    return x, y


def glorot(rng, fan_in, fan_out):
    import numpy as np
    a = np.sqrt(6 / (fan_in + fan_out))
    return rng.uniform(-a, a, (fan_in, fan_out)).astype(np.float32)


# -- structc -------------------------------------------------------------------------

def structc_cases(cases):
    import numpy as np

    import structc
    out = {}
    if "compile_cold" in cases:     # first, while nothing is compiled in this process
        with tempfile.TemporaryDirectory() as cache:
            os.environ["STRUCTC_CACHE_DIR"] = cache
            t = time.perf_counter()
            structc.compile(MLP, training=True)     # the training entries too, as before they were lazy
            out["compile_cold"] = [time.perf_counter() - t] * 2
            del os.environ["STRUCTC_CACHE_DIR"]
    if "mlp_step" in cases:
        net = structc.compile(MLP)
        x, y = data()
        out["mlp_step"] = timed(lambda: net.train_step(x=x, y=y, lr=0.01), REPS["mlp_step"])
    if "mlp_dropout" in cases:
        out.update(dropout_cases())
    for n in (256, 1024):
        if f"matmul{n}" in cases:
            out[f"matmul{n}"] = timed(structc_matmul(n), REPS[f"matmul{n}"])
    if "call_overhead" in cases:
        net = structc.compile(TRIVIAL)
        x = np.ones((1, 4), np.float32)
        out["call_overhead"] = timed(lambda: net(x=x), REPS["call_overhead"])
    return out


def dropout_cases(blocks: int = 4) -> dict:
    """The MLP step with and without dropout, in alternating blocks (a change of
    the machine's load hits both): the medians of the blocks' medians, the best calls."""

    import structc
    assert MLP_DROPOUT.count("dropout(") == 2
    nets = {"mlp_dropout": structc.compile(MLP_DROPOUT), "mlp_dropout_plain": structc.compile(MLP)}
    x, y = data()
    runs: dict = {k: [] for k in nets}
    for _ in range(blocks):
        for key, net in nets.items():
            runs[key].append(timed(lambda: net.train_step(x=x, y=y, lr=0.01), REPS["mlp_dropout"] // blocks))
    return {k: [statistics.median(m for m, _ in v), min(b for _, b in v)] for k, v in runs.items()}


def structc_matmul(n: int):
    """A callable running the compiled C = A @ W once, its inputs bound once."""
    import numpy as np

    import structc
    from structc import _runtime
    net = structc.compile(f"model MM{n} {{ input a: f32[N, {n}]\n param w: f32[{n}, {n}] = normal(1)\n"
                          f" output c = a @ w }}")
    a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
    entry = net._entries["forward"]
    arrays, dims = net._bind(entry, {"a": a})
    dvals = tuple(dims.get(s, 1) for s in net._symbols)
    outs = [np.empty((n, n), np.float32)]
    ws = net._workspace(net._workspace_size(entry, dvals))
    pa, ga, sa = net._arena_addrs
    expected = a @ net.params["w"]

    def call():
        _runtime.invoke(entry.address, pa, ga, sa, ws, arrays, outs, dvals, net._hyper_addr, 0)
    call()
    np.testing.assert_allclose(outs[0], expected, rtol=1e-3, atol=1e-2 * np.sqrt(n))
    return call


# -- numpy -------------------------------------------------------------------------------

def numpy_cases(cases):
    import numpy as np
    out = {}
    if "mlp_step" in cases:
        rng = np.random.default_rng(0)
        ws = [glorot(rng, a, b) for a, b in zip(SIZES, SIZES[1:])]
        bs = [np.zeros(b, np.float32) for b in SIZES[1:]]
        x, y = data()
        rows = np.arange(BATCH)

        def step(lr=np.float32(0.01)):
            hs = [x]
            for w, b in zip(ws[:-1], bs[:-1]):
                hs.append(np.maximum(hs[-1] @ w + b, 0))
            z = hs[-1] @ ws[-1] + bs[-1]
            z -= z.max(axis=1, keepdims=True)
            e = np.exp(z)
            p = e / e.sum(axis=1, keepdims=True)
            loss = -np.log(p[rows, y]).mean()
            g = p
            g[rows, y] -= 1
            g /= BATCH
            for k in range(len(ws) - 1, -1, -1):
                gw, gb = hs[k].T @ g, g.sum(axis=0)
                if k:
                    g = (g @ ws[k].T) * (hs[k] > 0)
                ws[k] -= lr * gw
                bs[k] -= lr * gb
            return loss
        out["mlp_step"] = timed(step, REPS["mlp_step"])
    for n in (256, 1024):
        if f"matmul{n}" in cases:
            rng = np.random.default_rng(0)
            a, b = (rng.normal(size=(n, n)).astype(np.float32) for _ in range(2))
            c = np.empty((n, n), np.float32)
            out[f"matmul{n}"] = timed(lambda: np.matmul(a, b, out=c), REPS[f"matmul{n}"])
    return out


# -- PyTorch -----------------------------------------------------------------------------

def torch_cases(cases, threads):
    import torch
    torch.set_num_threads(threads)
    out = {}
    if "mlp_step" in cases:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(784, 256), torch.nn.ReLU(),
            torch.nn.Linear(256, 128), torch.nn.ReLU(),
            torch.nn.Linear(128, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loss_fn = torch.nn.CrossEntropyLoss()
        xn, yn = data()
        x, y = torch.from_numpy(xn), torch.from_numpy(yn).long()

        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            return loss
        out["mlp_step"] = timed(step, REPS["mlp_step"])
    return out


# -- JAX ---------------------------------------------------------------------------------

def jax_cases(cases):
    import jax
    import jax.numpy as jnp
    import numpy as np
    out = {}
    if "mlp_step" in cases:
        rng = np.random.default_rng(0)
        params = [(jnp.asarray(glorot(rng, a, b)), jnp.zeros(b, jnp.float32)) for a, b in zip(SIZES, SIZES[1:])]
        xn, yn = data()
        x, y = jnp.asarray(xn), jnp.asarray(yn)

        def loss_fn(params, x, y):
            h = x
            for w, b in params[:-1]:
                h = jax.nn.relu(h @ w + b)
            w, b = params[-1]
            logp = jax.nn.log_softmax(h @ w + b)
            return -jnp.take_along_axis(logp, y[:, None], axis=1).mean()

        def step(params, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            return loss, jax.tree_util.tree_map(lambda p, g: p - 0.01 * g, params, grads)
        step = jax.jit(step, donate_argnums=0)
        state = [params]

        def run():
            loss, state[0] = step(state[0], x, y)
            loss.block_until_ready()
        out["mlp_step"] = timed(run, REPS["mlp_step"])
    return out


# -- driver --------------------------------------------------------------------------------

def worker(args) -> None:
    cases = args.cases.split(",")
    if args.framework == "structc":
        import structc
        structc.set_num_threads(args.threads)
        result = structc_cases(cases)
    elif args.framework == "numpy":
        result = numpy_cases(cases)
    elif args.framework == "torch":
        result = torch_cases(cases, args.threads)
    else:
        result = jax_cases(cases)
    print(json.dumps(result))


def thread_env(threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1073741824", MALLOC_TRIM_THRESHOLD_="1073741824",
               STRUCTC_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    # XLA's CPU client: one intra-op thread unless asked for more
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"
                        f" intra_op_parallelism_threads={threads}").strip()
    return env


def run(framework: str, threads: int, cases: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", framework, "--threads", str(threads), "--cases", ",".join(cases)]
    done = subprocess.run(cmd, env=thread_env(threads), capture_output=True, text=True, **pinned(threads))
    if done.returncode != 0:
        raise RuntimeError(f"{framework} ({threads} threads) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def installed(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def frameworks_for(case: str) -> list[str]:
    if case == "mlp_step":
        return [fw for fw in FRAMEWORKS if fw in ("structc", "numpy") or installed(fw)]
    if case.startswith("matmul"):
        return ["structc", "numpy"]
    if case == "mlp_dropout":
        return ["structc"]
    return ["structc"]


def report(cases, threads_list, med, best) -> None:
    def show(key):
        if key not in med:
            return "–"
        scale, unit = (1e6, "µs") if key[0] == "call_overhead" else ((1, "s") if key[0] == "compile_cold" else (1e3, "ms"))
        return f"{med[key] * scale:.3g} ({best[key] * scale:.3g}) {unit}"

    if "mlp_step" in cases:
        fws = frameworks_for("mlp_step")
        print("MLP 784-256-128-10 training step, batch 64 (median (best)); ratio = other / structc\n")
        print("| threads | " + " | ".join(fws) + " |")
        print("|---|" + "---|" * len(fws))
        for t in threads_list:
            s = med.get(("mlp_step", t, "structc"))
            cells = []
            for fw in fws:
                key = ("mlp_step", t, fw)
                ratio = f", {med[key] / s:.2f}x" if fw != "structc" and key in med and s else ""
                cells.append(show(key) + ratio)
            print(f"| {t} | " + " | ".join(cells) + " |")
        print()
    for n in (256, 1024):
        case = f"matmul{n}"
        if case not in cases:
            continue
        flop = 2 * n ** 3
        for t in threads_list:
            s, np_ = med.get((case, t, "structc")), med.get((case, t, "numpy"))
            if s and np_:
                print(f"matmul {n}^3, {t} thread(s): structc {flop / s / 1e9:.0f} GFLOP/s "
                      f"(best {flop / best[(case, t, 'structc')] / 1e9:.0f}), numpy {flop / np_ / 1e9:.0f} "
                      f"(best {flop / best[(case, t, 'numpy')] / 1e9:.0f}): {100 * np_ / s:.0f}% of numpy")
    if "mlp_dropout" in cases:
        print("MLP step with dropout(p=0.5) after each hidden layer against the same step without, "
              "alternated in one process (median (best)):\n")
        print("| threads | without | with dropout | ratio (medians) | ratio (bests) |")
        print("|---|---|---|---|---|")
        for t in threads_list:
            a, b = ("mlp_dropout_plain", t, "structc"), ("mlp_dropout", t, "structc")
            if a in med and b in med:
                print(f"| {t} | {show(a)} | {show(b)} | {med[b] / med[a]:.3f} | {best[b] / best[a]:.3f} |")
        print()
    for case in ("compile_cold", "call_overhead"):
        if case in cases:
            for t in threads_list:
                print(f"{case}, {t} thread(s): {show((case, t, 'structc'))}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--dropout", action="store_true", help="only the dropout case (mlp_dropout)")
    ap.add_argument("--worker", choices=FRAMEWORKS, dest="framework")
    args, _ = ap.parse_known_args(argv)
    if args.framework:
        args.threads = args.threads[0]
        worker(args)
        return 0
    cases = ["mlp_dropout"] if args.dropout else args.cases.split(",")
    samples: dict = {}
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        for threads in args.threads:
            for fw in FRAMEWORKS:
                mine = [c for c in cases if fw in frameworks_for(c)]
                if mine:
                    for case, (median, best) in run(fw, threads, mine).items():
                        samples.setdefault((case, threads, fw), []).append((median, best))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    med = {k: statistics.median(m for m, _ in v) for k, v in samples.items()}
    best = {k: min(b for _, b in v) for k, v in samples.items()}
    print(f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; {args.rounds} rounds; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}\n")
    report(cases, args.threads, med, best)
    return 0


if __name__ == "__main__":
    sys.exit(main())
