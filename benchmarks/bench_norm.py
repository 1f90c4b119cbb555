"""LeNet-5 with batch normalisation after each convolution: structc against
PyTorch CPU eager (training), and against itself without batch norm (inference).

    python benchmarks/bench_norm.py                      # 5 rounds, 1 and 2 threads
    python benchmarks/bench_norm.py --rounds 3 --threads 1

Cases:
  bn_train     training step (forward, backward, SGD update, running statistics), batch 64, 1x28x28;
               the same model in PyTorch (Conv2d without bias, BatchNorm2d, train mode)
  bn_infer     inference, batch 1 (the whole Python call): batch norm is a per-channel scale
               and shift in the convolution's epilogue (structc); PyTorch in eval mode
  plain_infer  examples/lenet5.snet, inference batch 1, timed in the same process as bn_infer,
               alternating blocks (the issue's target: bn_infer <= 1.1x plain_infer)
  plain_train  examples/lenet5.snet, training step batch 64 (structc only): what batch norm adds

Each (framework, threads) pair runs in a fresh process (as bench_conv.py), rounds
interleave the frameworks, numbers are medians over rounds of per-round medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conv import LENET, timed  # noqa: E402

LENET_BN = (LENET.read_text()
            .replace("model LeNet5", "model LeNet5BN")
            .replace("conv(x, 6, kernel=5) |> relu", "conv(x, 6, kernel=5, bias=false) |> batch_norm |> relu")
            .replace("conv(h, 16, kernel=5) |> relu", "conv(h, 16, kernel=5, bias=false) |> batch_norm |> relu"))
CASES = ["bn_train", "bn_infer", "plain_infer", "plain_train"]
REPS = {"bn_train": 200, "infer": 3000}


def structc_cases(cases):
    import numpy as np

    import structc
    assert LENET_BN.count("batch_norm") == 2
    rng = np.random.default_rng(0)
    out = {}
    bn = structc.compile(LENET_BN)
    x = rng.random((64, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 64).astype(np.int32)
    if "bn_train" in cases:
        out["bn_train"] = timed(lambda: bn.train_step(x=x, y=y, lr=0.01), REPS["bn_train"])
    plain = structc.compile(LENET)
    if "plain_train" in cases:
        out["plain_train"] = timed(lambda: plain.train_step(x=x, y=y, lr=0.01), REPS["bn_train"])
    if "bn_infer" in cases or "plain_infer" in cases:
        x1 = x[:1].copy()
        runs = {"bn_infer": [], "plain_infer": []}
        for _ in range(10):       # alternating blocks: a load change hits both
            runs["plain_infer"].append(timed(lambda: plain(x=x1), REPS["infer"] // 10, warm=50))
            runs["bn_infer"].append(timed(lambda: bn(x=x1), REPS["infer"] // 10, warm=50))
        for case, r in runs.items():
            if case in cases:
                out[case] = [statistics.median(m for m, _ in r), min(b for _, b in r)]
    return out


def torch_cases(cases, threads):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    out = {}
    m = nn.Sequential(nn.Conv2d(1, 6, 5, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(6, 16, 5, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    if "bn_train" in cases:
        m.train()

        def step():
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        out["bn_train"] = timed(step, REPS["bn_train"])
    if "bn_infer" in cases:
        m.eval()
        x1 = x[:1].clone()

        def infer():
            with torch.inference_mode():
                m(x1)
        out["bn_infer"] = timed(infer, REPS["infer"])
    return out


def run(framework: str, threads: int, cases: list[str]) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1073741824", MALLOC_TRIM_THRESHOLD_="1073741824",
               STRUCTC_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--worker", framework, "--threads", str(threads), "--cases", ",".join(cases)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{framework} ({threads} threads) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--worker", choices=["structc", "torch"], dest="framework")
    args, _ = ap.parse_known_args(argv)
    cases = args.cases.split(",")
    if args.framework:
        threads = args.threads[0]
        if args.framework == "structc":
            import structc
            structc.set_num_threads(threads)
            print(json.dumps(structc_cases(cases)))
        else:
            print(json.dumps(torch_cases(cases, threads)))
        return 0
    try:
        import torch  # noqa: F401
        frameworks = ["structc", "torch"]
    except ImportError:
        frameworks = ["structc"]
    samples: dict = {}
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        for threads in args.threads:
            for fw in frameworks:
                for case, (median, best) in run(fw, threads, cases).items():
                    samples.setdefault((case, threads, fw), []).append((median, best))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    med = {k: statistics.median(m for m, _ in v) for k, v in samples.items()}
    best = {k: min(b for _, b in v) for k, v in samples.items()}
    print(f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; {args.rounds} rounds\n")
    print("| case | threads | structc | PyTorch | structc / PyTorch | structc / structc without batch norm |")
    print("|---|---|---|---|---|---|")
    for case in cases:
        for threads in args.threads:
            unit, scale = ("ms", 1e3) if case.endswith("train") else ("µs", 1e6)

            def show(key):
                return f"{med[key] * scale:.3g} ({best[key] * scale:.3g}) {unit}" if key in med else "–"
            s, t = (case, threads, "structc"), (case, threads, "torch")
            p = ("plain_" + case[3:], threads, "structc")
            ratio = f"{med[s] / med[t]:.2f}" if t in med else "–"
            own = f"{med[s] / med[p]:.3f}" if case.startswith("bn_") and p in med else "–"
            print(f"| {case} | {threads} | {show(s)} | {show(t)} | {ratio} | {own} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
