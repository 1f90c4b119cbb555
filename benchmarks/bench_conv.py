"""Convolutional networks: structc against PyTorch CPU eager, 1 and 2 threads.

    python benchmarks/bench_conv.py                 # everything, 5 rounds
    python benchmarks/bench_conv.py --rounds 3 --threads 1 --cases lenet_train

Cases (the issue's benchmarks):
  lenet_train   LeNet-5 training step (forward, backward, SGD update), batch 64, 1x28x28
  lenet_infer   LeNet-5 inference, batch 1 (the whole Python call)
  conv_step     conv 32->64 3x3 pad 1 on [32, 32, 32, 32] + ReLU + global average pool
                + dense 10 + cross-entropy, one training step
  conv_fwd      that convolution alone (bias and ReLU fused), forward
  conv_wgrad    its kernel gradient alone (cross-correlation of the input with the delta)
  stride_step   two 3x3 stride-2 convolutions (3->32, 32->64 on [16, 3, 64, 64]), a 1x1 one,
                global average pool, dense 10, cross-entropy: one training step (a strided
                convolution's input gradient is a convolution over the delta dilated by 2)
  text_step     a text CNN: conv1d 64->128 kernel 5 then 128->128 kernel 3 stride 2 over 200
                positions, mean over positions, dense 10, cross-entropy, batch 32: one training
                step (rows longer than a chunk of vectors)
and `fma_peak`: the machine's FMA throughput per core (independent vector FMA chains,
as many as fit in registers: `structc.profile.peak_chains`; compiled with llvmlite), so achieved GFLOP/s can be read as a fraction of peak.

Every (framework, threads) configuration runs in a fresh process (so one framework's
spinning worker threads never steal the other's cores), rounds interleave the
frameworks, and each number is the median over rounds of per-round medians. PyTorch
runs with MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 (its
best case, as in the issue); structc gets the same environment.
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

from cores import pinned

ROOT = Path(__file__).resolve().parent.parent
LENET = ROOT / "examples" / "lenet5.snet"
CONV_STEP = """model ConvStep {
  input  x: f32[N, 32, 32, 32]
  target y: class[N] of 10
  h = conv(x, 64, kernel=3, padding=1) |> relu
  loss cross_entropy(dense(global_avg_pool(h), 10), y)
}"""
STRIDE_STEP = """model StrideStep {
  input  x: f32[N, 3, 64, 64]
  target y: class[N] of 10
  h = conv(x, 32, kernel=3, stride=2, padding=1) |> relu
  h = conv(h, 64, kernel=3, stride=2, padding=1) |> relu
  h = conv(h, 64, kernel=1) |> relu
  loss cross_entropy(dense(global_avg_pool(h), 10), y)
}"""
TEXT_STEP = """model TextStep {
  input  x: f32[N, 64, 200]
  target y: class[N] of 10
  h = conv1d(x, 128, kernel=5, padding=2) |> relu
  h = conv1d(h, 128, kernel=3, padding=1, stride=2) |> relu
  loss cross_entropy(dense(mean(h, axes=(2,)), 10), y)
}"""
CONV_FLOP = 2 * 32 * 64 * 32 * 32 * 32 * 9          # one 32->64 3x3 convolution over the batch
CASES = ["lenet_train", "lenet_infer", "conv_step", "conv_fwd", "conv_wgrad", "stride_step", "text_step"]
REPS = {"lenet_train": 200, "lenet_infer": 3000, "conv_step": 20, "conv_fwd": 20, "conv_wgrad": 20,
        "stride_step": 20, "text_step": 10}


def timed(fn, reps: int, warm: int = None) -> list:
    """[median, best] seconds per call."""
    for _ in range(warm if warm is not None else max(3, reps // 10)):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return [statistics.median(ts), min(ts)]


# -- structc -------------------------------------------------------------------------

def structc_cases(cases):
    import numpy as np

    import structc
    rng = np.random.default_rng(0)
    out = {}
    if "lenet_train" in cases or "lenet_infer" in cases:
        net = structc.compile(LENET)
        x = rng.random((64, 1, 28, 28), dtype=np.float32)
        y = rng.integers(0, 10, 64).astype(np.int32)
        if "lenet_train" in cases:
            out["lenet_train"] = timed(lambda: net.train_step(x=x, y=y, lr=0.01), REPS["lenet_train"])
        if "lenet_infer" in cases:
            x1 = x[:1].copy()
            out["lenet_infer"] = timed(lambda: net(x=x1), REPS["lenet_infer"])
    def train(source, x_shape):
        """A training step of `source` on a random batch of x_shape, as a function."""
        net = structc.compile(source)
        x = rng.normal(size=x_shape).astype(np.float32)
        y = rng.integers(0, 10, x_shape[0]).astype(np.int32)
        return lambda: net.train_step(x=x, y=y, lr=0.01)
    if "conv_step" in cases:
        out["conv_step"] = timed(train(CONV_STEP, (32, 32, 32, 32)), REPS["conv_step"])
    if "conv_fwd" in cases:
        net = _op_net("conv2d", [(32, 32, 32, 32), (64, 32, 3, 3), (64, 1, 1)], {"padding": (1, 1, 1, 1)},
                      post=lambda b, z, bias: b.relu(z + bias))
        out["conv_fwd"] = timed(net.forward, REPS["conv_fwd"])
    if "conv_wgrad" in cases:
        net = _op_net("conv2d_kernel_grad", [(32, 32, 32, 32), (32, 64, 32, 32)],
                      {"kernel": (3, 3), "padding": (1, 1, 1, 1)})
        out["conv_wgrad"] = timed(net.forward, REPS["conv_wgrad"])
    if "stride_step" in cases:
        out["stride_step"] = timed(train(STRIDE_STEP, (16, 3, 64, 64)), REPS["stride_step"])
    if "text_step" in cases:
        out["text_step"] = timed(train(TEXT_STEP, (32, 64, 200)), REPS["text_step"])
    return out


def _op_net(opname, shapes, attrs, post=None):
    """A compiled model computing one op on random parameters (the op's operands)."""
    from structc.build import ModelDef, ParamSpec
    from structc.compiler import compile_model
    from structc.graph import Builder, Graph
    from structc.model import Net
    from structc.native import JitModule, host_target
    from structc.ops import REGISTRY
    from structc.types import TensorType
    g = Graph("bench")
    b = Builder(g)
    params, operands = {}, []
    for k, shape in enumerate(shapes):
        t = TensorType(shape, "f32")
        init = ("normal", (1.0,))
        nid = g.add(REGISTRY["param"], (), {"name": f"p{k}", "type": t, "init": init}, type=t)
        g.params[f"p{k}"] = nid
        params[f"p{k}"] = ParamSpec(f"p{k}", t, init)
        operands.append(b.value(nid))
    n_op = len(REGISTRY[opname].signature()[0])
    out = b.apply(opname, *operands[:n_op], **attrs)
    if post is not None:
        out = post(b, out, *operands[n_op:])
    g.outputs = {"out": out.id}
    art = compile_model(ModelDef("bench", g, {}, params, [], False))
    return Net(art.meta, JitModule(art.object, host_target()))


# -- PyTorch ---------------------------------------------------------------------------

def _sgd_step(params, loss):
    """One PyTorch SGD step of `loss()` over `params`, as a function."""
    import torch
    opt = torch.optim.SGD(params, lr=0.01)

    def step():
        opt.zero_grad()
        loss().backward()
        opt.step()
    return step


def torch_cases(cases, threads):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    out = {}
    if "lenet_train" in cases or "lenet_infer" in cases:
        m = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84),
                          nn.ReLU(), nn.Linear(84, 10))
        x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
        if "lenet_train" in cases:
            out["lenet_train"] = timed(_sgd_step(m.parameters(), lambda: F.cross_entropy(m(x), y)),
                                       REPS["lenet_train"])
        if "lenet_infer" in cases:
            x1 = x[:1].clone()

            def infer():
                with torch.inference_mode():
                    m(x1)
            out["lenet_infer"] = timed(infer, REPS["lenet_infer"])
    if "conv_step" in cases:
        m = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(64, 10))
        x, y = torch.randn(32, 32, 32, 32), torch.randint(0, 10, (32,))
        out["conv_step"] = timed(_sgd_step(m.parameters(), lambda: F.cross_entropy(m(x), y)), REPS["conv_step"])
    if "conv_fwd" in cases or "conv_wgrad" in cases:
        x, w, bias = torch.randn(32, 32, 32, 32), torch.randn(64, 32, 3, 3), torch.randn(64)
        g = torch.randn(32, 64, 32, 32)
        if "conv_fwd" in cases:
            def fwd():
                with torch.inference_mode():
                    F.relu(F.conv2d(x, w, bias, padding=1))
            out["conv_fwd"] = timed(fwd, REPS["conv_fwd"])
        if "conv_wgrad" in cases:
            def wgrad():
                torch.ops.aten.convolution_backward(g, x, w, [64], [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                    [False, True, False])
            out["conv_wgrad"] = timed(wgrad, REPS["conv_wgrad"])
    if "stride_step" in cases:
        m = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
        x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,))
        out["stride_step"] = timed(_sgd_step(m.parameters(), lambda: F.cross_entropy(m(x), y)), REPS["stride_step"])
    if "text_step" in cases:
        m = nn.Sequential(nn.Conv1d(64, 128, 5, padding=2), nn.ReLU(), nn.Conv1d(128, 128, 3, padding=1, stride=2),
                          nn.ReLU())
        head = nn.Linear(128, 10)
        x, y = torch.randn(32, 64, 200), torch.randint(0, 10, (32,))
        out["text_step"] = timed(_sgd_step(list(m.parameters()) + list(head.parameters()),
                                           lambda: F.cross_entropy(head(m(x).mean(2)), y)), REPS["text_step"])
    return out


# -- the FMA peak ------------------------------------------------------------------------

def fma_peak() -> float:
    """GFLOP/s of one core running independent chains of vector FMAs
    (structc's profiler measures it the same way; here with longer runs)."""
    from structc.profile import fma_peak as measure
    return measure(iters=20_000_000, tries=5)


# -- driver --------------------------------------------------------------------------------

def worker(args) -> None:
    cases = args.cases.split(",")
    if args.framework == "structc":
        import structc
        structc.set_num_threads(args.threads)
        result = structc_cases(cases)
    elif args.framework == "torch":
        result = torch_cases(cases, args.threads)
    else:
        result = {"fma_peak": fma_peak()}
    print(json.dumps(result))


def run(framework: str, threads: int, cases: list[str]) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1073741824", MALLOC_TRIM_THRESHOLD_="1073741824",
               STRUCTC_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--worker", framework, "--threads", str(threads), "--cases", ",".join(cases)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, **pinned(threads))
    if done.returncode != 0:
        raise RuntimeError(f"{framework} ({threads} threads) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def have_torch() -> bool:
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--worker", choices=["structc", "torch", "peak"], dest="framework")
    args, _ = ap.parse_known_args(argv)
    if args.framework:
        args.threads = args.threads[0]
        worker(args)
        return 0
    cases = args.cases.split(",")
    frameworks = ["structc"] + (["torch"] if have_torch() else [])
    samples: dict = {}
    peaks = []
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        peaks.append(run("peak", 1, [])["fma_peak"])
        for threads in args.threads:
            for fw in frameworks:
                for case, (median, best) in run(fw, threads, cases).items():
                    samples.setdefault((case, threads, fw), []).append((median, best))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    peak = statistics.median(peaks)
    med = {k: statistics.median(m for m, _ in v) for k, v in samples.items()}
    best = {k: min(b for _, b in v) for k, v in samples.items()}
    print(f"FMA peak, one core: {peak:.0f} GFLOP/s (median of {len(peaks)}); load average "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after; {args.rounds} rounds\n")
    print("Times: median over rounds of each round's median call (best single call in brackets).\n")
    print("| case | threads | structc | PyTorch | structc / PyTorch | structc GFLOP/s, median (best), % of peak |")
    print("|---|---|---|---|---|---|")
    for case in cases:
        for threads in args.threads:
            key_s, key_t = (case, threads, "structc"), (case, threads, "torch")
            unit, scale = ("µs", 1e6) if case == "lenet_infer" else ("ms", 1e3)

            def show(key):
                if key not in med:
                    return "–"
                return f"{med[key] * scale:.3g} ({best[key] * scale:.3g}) {unit}"
            ratio = f"{med[key_s] / med[key_t]:.2f}" if key_t in med else "–"
            rate = ""
            flop = {"conv_fwd": CONV_FLOP, "conv_wgrad": CONV_FLOP, "conv_step": 2 * CONV_FLOP}.get(case)
            if flop:
                g, gb = flop / med[key_s] / 1e9, flop / best[key_s] / 1e9
                rate = f"{g:.0f} ({gb:.0f}), {100 * g / (peak * threads):.0f}% ({100 * gb / (peak * threads):.0f}%)"
                if case == "conv_step":
                    rate += " of the two convolutions"
            print(f"| {case} | {threads} | {show(key_s)} | {show(key_t)} | {ratio} | {rate} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
