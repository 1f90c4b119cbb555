"""Models no other benchmark measures: structc against PyTorch, one SGD training step.

    python benchmarks/bench_zoo.py                              # every model, 1 thread, 3 rounds
    python benchmarks/bench_zoo.py --cases text_cnn,strided_cnn --threads 2 --rounds 5
    python benchmarks/bench_zoo.py --before /path/to/other/checkout --no-torch   # structc before/after

The other benchmarks measure the issues' workloads; this one looks for the
shapes users meet next (wide MLPs, deep ones, CNNs on 32x32 to 224x224 images,
strided and 1-D convolutions, normalisations, dropout, recurrent cells of 256
and 512), where a kernel might be slow without any benchmark saying so (the
strided convolution ran 2.1x slower than PyTorch until stop 37, a text CNN
2.6x). Each (framework, case) runs in a fresh process, pinned to one core at
one thread; rounds alternate the order; each number is the median over rounds
of each round's median step. PyTorch runs with MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ at 1 GiB (its best case; structc gets the same). With
`--before DIR`, structc from the checkout DIR (on PYTHONPATH) runs too.
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

import numpy as np

from cores import pinned

ROOT = Path(__file__).resolve().parent.parent


def _mlp(widths, head=10):
    lines = [f"model M {{ input x: f32[N, {widths[0]}]  target y: class[N] of {head}"]
    prev = "x"
    for k, w in enumerate(widths[1:]):
        lines.append(f"  h{k} = dense({prev}, {w}) |> relu")
        prev = f"h{k}"
    lines.append(f"  loss cross_entropy(dense({prev}, {head}), y) }}")
    return "\n".join(lines)


def _mlp_mid(mid: str, bias: bool = True):
    b = "" if bias else ", bias=false"
    return (f"model M {{ input x: f32[N, 256]  target y: class[N] of 10\n"
            f"  h = {mid.format(f'dense(x, 512{b})')}\n  h = {mid.format(f'dense(h, 512{b})')}\n"
            "  loss cross_entropy(dense(h, 10), y) }")


def _cnn(input_shape, body):
    lines = [f"model M {{ input x: f32[N, {', '.join(map(str, input_shape))}]  target y: class[N] of 10"]
    lines += [f"  {line}" for line in body]
    return "\n".join(lines) + " }"


def _recurrent(cell: str, features: int, hidden: int):
    if cell == "lstm":
        rec = (f"rec (h, c)(t) = init: (zeros({hidden}), zeros({hidden}))\n"
               f"                  next: lstm_cell(t.x, h(t.prev), c(t.prev), {hidden})")
    else:
        rec = f"rec h(t) = init: zeros({hidden})\n             next: gru_cell(t.x, h(t.prev), {hidden})"
    return (f"model M {{ input s: sequence of f32[{features}]  target y: class[s.sequences] of 10\n"
            f"  {rec}\n  loss cross_entropy(dense(h(s.last), 10), y) }}")


# name: (source, batch, one example's shape, sequence length or None, steps timed)
CASES = {
    "mlp_wide": (_mlp([784, 1024, 1024]), 256, (784,), None, 40),
    "mlp_tiny": (_mlp([32, 64]), 16, (32,), None, 3000),
    "mlp_deep": (_mlp([256] * 13), 64, (256,), None, 300),
    "mlp_batchnorm": (_mlp_mid("{} |> batch_norm |> relu", bias=False), 128, (256,), None, 200),
    "mlp_layernorm": (_mlp_mid("{} |> layer_norm |> relu"), 128, (256,), None, 200),
    "mlp_dropout": (_mlp_mid("dropout(relu({}), 0.5)"), 128, (256,), None, 200),
    "cifar_cnn": (_cnn((3, 32, 32), ["h = conv(x, 32, kernel=3, padding=1) |> relu |> maxpool2d(2)",
                                     "h = conv(h, 64, kernel=3, padding=1) |> relu |> maxpool2d(2)",
                                     "h = dense(flatten(h), 128) |> relu",
                                     "loss cross_entropy(dense(h, 10), y)"]), 32, (3, 32, 32), None, 20),
    "strided_cnn": (_cnn((3, 64, 64), ["h = conv(x, 32, kernel=3, stride=2, padding=1) |> relu",
                                       "h = conv(h, 64, kernel=3, stride=2, padding=1) |> relu",
                                       "h = conv(h, 64, kernel=1) |> relu",
                                       "loss cross_entropy(dense(global_avg_pool(h), 10), y)"]), 16, (3, 64, 64), None, 20),
    "stem_7x7": (_cnn((3, 224, 224), ["h = conv(x, 64, kernel=7, stride=2, padding=3) |> relu |> maxpool2d(3, stride=2)",
                                      "h = conv(h, 64, kernel=3, padding=1) |> relu",
                                      "loss cross_entropy(dense(global_avg_pool(h), 10), y)"]), 4, (3, 224, 224), None, 5),
    "stem_11x11": (_cnn((3, 127, 127), ["h = conv(x, 32, kernel=11, stride=4) |> relu",
                                        "loss cross_entropy(dense(global_avg_pool(h), 10), y)"]), 16, (3, 127, 127), None, 10),
    "wide_images": (_cnn((16, 128, 128), ["h = conv(x, 32, kernel=3, padding=1) |> relu |> maxpool2d(2)",
                                          "h = conv(h, 32, kernel=3, padding=1) |> relu",
                                          "loss cross_entropy(dense(global_avg_pool(h), 10), y)"]), 8, (16, 128, 128), None, 10),
    "conv5x5_pools": (_cnn((16, 64, 64), ["h = conv(x, 16, kernel=5, padding=2) |> relu |> avgpool2d(2)",
                                          "h = conv(h, 32, kernel=3, padding=1) |> relu |> maxpool2d(3, stride=2)",
                                          "loss cross_entropy(dense(global_avg_pool(h), 10), y)"]), 8, (16, 64, 64), None, 20),
    "patch_embed": (_cnn((3, 128, 128), ["h = conv(x, 96, kernel=16, stride=16) |> relu",
                                         "h = conv(h, 96, kernel=1) |> relu",
                                         "loss cross_entropy(dense(global_avg_pool(h), 10), y)"]), 32, (3, 128, 128), None, 10),
    "text_cnn": (_cnn((64, 200), ["h = conv1d(x, 128, kernel=5, padding=2) |> relu",
                                  "h = conv1d(h, 128, kernel=3, padding=1, stride=2) |> relu",
                                  "loss cross_entropy(dense(mean(h, axes=(2,)), 10), y)"]), 32, (64, 200), None, 10),
    "lstm_256": (_recurrent("lstm", 32, 256), 32, (32,), 30, 20),
    "lstm_512": (_recurrent("lstm", 64, 512), 16, (64,), 40, 10),
    "gru_256": (_recurrent("gru", 32, 256), 32, (32,), 30, 20),
}


def data(case: str):
    _, batch, shape, length, _ = CASES[case]
    rng = np.random.default_rng(0)
    rows = batch * length if length else batch
    x = rng.normal(size=(rows, *shape)).astype(np.float32)
    return x, rng.integers(0, 10, batch).astype(np.int32)


def timed(step, steps: int) -> float:
    """The median of `steps` steps, in seconds, after a tenth as many untimed."""
    for _ in range(max(3, steps // 10)):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def structc_step(case: str, threads: int):
    import structc
    structc.set_num_threads(threads)
    source, batch, _, length, _ = CASES[case]
    x, y = data(case)
    net = structc.compile(source)
    if length:
        from structc.seqdata import Sequences
        s = Sequences.from_flat(x, np.arange(0, x.shape[0] + 1, length))
        return lambda: net.train_step(s=s, y=y, lr=0.01)
    return lambda: net.train_step(x=x, y=y, lr=0.01)


def torch_model(case: str):
    """(module, forward on the batch) of the case in PyTorch."""
    import torch.nn as nn

    def mlp(widths, mid=lambda n: nn.Identity(), bias=True, drop=False):
        layers = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b, bias=bias), mid(b), nn.ReLU()] + ([nn.Dropout(0.5)] if drop else [])
        return nn.Sequential(*layers, nn.Linear(widths[-1], 10))

    def head(channels):
        return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]

    class LastState(nn.Module):
        def __init__(self, rnn, hidden):
            super().__init__()
            self.rnn, self.out = rnn, nn.Linear(hidden, 10)

        def forward(self, x):                   # x: [T, B, F]
            return self.out(self.rnn(x)[0][-1])

    class MeanOverPositions(nn.Module):
        def forward(self, h):
            return h.mean(2)
    return {
        "mlp_wide": lambda: mlp([784, 1024, 1024]),
        "mlp_tiny": lambda: mlp([32, 64]),
        "mlp_deep": lambda: mlp([256] * 13),
        "mlp_batchnorm": lambda: mlp([256, 512, 512], nn.BatchNorm1d, bias=False),
        "mlp_layernorm": lambda: mlp([256, 512, 512], nn.LayerNorm),
        "mlp_dropout": lambda: mlp([256, 512, 512], drop=True),
        "cifar_cnn": lambda: nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10)),
        "strided_cnn": lambda: nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 1), nn.ReLU(), *head(64)),
        "stem_7x7": lambda: nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3), nn.ReLU(), nn.MaxPool2d(3, stride=2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), *head(64)),
        "stem_11x11": lambda: nn.Sequential(nn.Conv2d(3, 32, 11, stride=4), nn.ReLU(), *head(32)),
        "wide_images": lambda: nn.Sequential(
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            *head(32)),
        "conv5x5_pools": lambda: nn.Sequential(
            nn.Conv2d(16, 16, 5, padding=2), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(3, stride=2), *head(32)),
        "patch_embed": lambda: nn.Sequential(
            nn.Conv2d(3, 96, 16, stride=16), nn.ReLU(), nn.Conv2d(96, 96, 1), nn.ReLU(), *head(96)),
        "text_cnn": lambda: nn.Sequential(
            nn.Conv1d(64, 128, 5, padding=2), nn.ReLU(), nn.Conv1d(128, 128, 3, padding=1, stride=2), nn.ReLU(),
            MeanOverPositions(), nn.Linear(128, 10)),
        "lstm_256": lambda: LastState(nn.LSTM(32, 256), 256),
        "lstm_512": lambda: LastState(nn.LSTM(64, 512), 512),
        "gru_256": lambda: LastState(nn.GRU(32, 256), 256),
    }[case]()


def torch_step(case: str, threads: int):
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    _, batch, shape, length, _ = CASES[case]
    xn, yn = data(case)
    if length:      # time first, as torch.nn.LSTM reads it
        xn = xn.reshape(batch, length, *shape).transpose(1, 0, 2).copy()
    x, y = torch.from_numpy(xn), torch.from_numpy(yn).long()
    model = torch_model(case)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def worker(framework: str, case: str, threads: int) -> None:
    step = (torch_step if framework == "torch" else structc_step)(case, threads)
    print(json.dumps({"step": timed(step, CASES[case][4])}))


def run(framework: str, case: str, threads: int, before: str | None, script: str = __file__) -> float | None:
    """One (framework, case) in a fresh process of `script` (its `--worker`), pinned to
    one core at one thread: the median step in seconds, or None when it failed."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1073741824", MALLOC_TRIM_THRESHOLD_="1073741824",
               OMP_NUM_THREADS=str(threads))
    path = before if framework == "before" else str(ROOT)
    env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    args = [sys.executable, script, "--worker", "torch" if framework == "torch" else "structc",
            "--cases", case, "--threads", str(threads)]
    out = subprocess.run(args, env=env, capture_output=True, text=True, **pinned(threads))
    if out.returncode:
        print(f"{framework} {case}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["step"]


def drive(script: str, known: dict, worker, doc: str, extra=None) -> None:
    """The command line of a survey: `known` cases by name, `worker(framework, case,
    threads)` run in each fresh process, the table of medians printed at the end.
    `extra(ap)` adds a script's own options and returns a handler of the parsed
    arguments, which ends the run when it returns True (e.g. a profile instead)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--cases", default=",".join(known))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--before", metavar="DIR", help="another checkout of structc, timed too")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--worker", choices=["structc", "torch"], help=argparse.SUPPRESS)
    handle = extra(ap) if extra else None
    args = ap.parse_args()
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in known]
    if unknown:
        raise SystemExit(f"unknown cases {unknown} (known: {', '.join(known)})")
    if args.worker:
        worker(args.worker, cases[0], args.threads)
        return
    if handle and handle(args, cases):
        return
    frameworks = ["structc"] + (["before"] if args.before else []) + ([] if args.no_torch else ["torch"])
    times: dict = {}
    print(f"load average before: {os.getloadavg()[0]:.2f}; {args.threads} thread(s), {args.rounds} rounds")
    for r in range(args.rounds):
        for case in cases:
            for fw in (frameworks if r % 2 == 0 else frameworks[::-1]):
                t = run(fw, case, args.threads, args.before, script)
                if t is not None:
                    times.setdefault((case, fw), []).append(t)
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    columns = [("structc", "structc"), ("before", "structc before"), ("torch", "PyTorch")]
    columns = [(fw, name) for fw, name in columns if fw in frameworks]
    ratios = [f"structc / {name}" for fw, name in (("torch", "PyTorch"), ("before", "before")) if fw in frameworks]
    print("| " + " | ".join(["case"] + [name for _, name in columns] + ratios) + " |")
    print("|---" * (1 + len(columns) + len(ratios)) + "|")
    for case in cases:
        med = {fw: 1e3 * statistics.median(times[case, fw]) for fw, _ in columns if (case, fw) in times}
        cells = [f"{med[fw]:.3f} ms" if fw in med else "-" for fw, _ in columns]
        for other in ("torch", "before"):
            if other in frameworks:
                ok = "structc" in med and other in med
                cells.append(f"{med['structc'] / med[other]:.2f}" if ok else "-")
        print(f"| {case} | " + " | ".join(cells) + " |")


def main() -> None:
    drive(__file__, CASES, worker, __doc__)


if __name__ == "__main__":
    main()
