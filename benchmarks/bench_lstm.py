"""LSTM over sequences (`lstm_seq_train`): one SGD step, structc vs PyTorch and JAX on the CPU.

The issue's workload: a batch of 64 sequences of 50 positions, 64 features
each; one LSTM layer of 128; the last state -> dense 10 -> mean
cross-entropy; one SGD step (forward, backward, update). `ragged`: the same
with lengths drawn uniformly from 10..90 (mean 50). structc takes the ragged
batch as it is (no padding: step t runs the sequences still that long);
PyTorch and JAX pad it to the longest and read each sequence's state at its
last position.

    python benchmarks/bench_lstm.py [--rounds 3] [--threads 1 2] [--cases uniform,ragged]
    python benchmarks/bench_lstm.py --cell gru      # `gru_seq_train`: the same with a GRU of 128
    python benchmarks/bench_lstm.py --hidden 512 --cases uniform   # a wider cell (rows of W 8 KiB apart)

Contenders, each in a fresh process per thread count:
  structc           `rec (h, c)(t) = init: ... next: lstm_cell(t.x, h(t.prev), c(t.prev), 128)`
  torch.nn.LSTM     PyTorch's fused LSTM (oneDNN on the CPU)
  torch cell loop   `torch.nn.LSTMCell` called once per step, the way a hand-written loop runs
  JAX lax.scan      the cell under `lax.scan`, `jax.jit` of value_and_grad plus the update

With `--cell gru` every contender runs a GRU instead (torch.nn.GRU and
torch.nn.GRUCell; structc's `gru_cell` and the JAX cell take the candidate
from r·h, PyTorch's from r·(W h + b): the same matmuls).
The arithmetic floor of a step: the gates' matmul, 2·rows·(F+H)·4H flop per
position forward (3H for a GRU), as much again backward for the weights' gradient,
and 2·rows·H·4H for the state's cotangent through W_h (the features are data: no
cotangent flows into them, and structc computes none), over 64·50 positions
(uniform) or the batch's positions (ragged; the padded peers do 64·90). Until
2026-12-05 (stop 44) the floor also counted the features' cotangent, 12.5% more
at these sizes, so its ms read lower against every contender's time. It is
stated in GFLOP and in ms at the measured FMA peak (`structc.profile.fma_peak`,
one core).
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

from cores import pinned

BATCH, LENGTH, F, H, CLASSES, LR = 64, 50, 64, 128, 10, 0.01
RAGGED = (10, 90)
CASES = ("uniform", "ragged")
FRAMEWORKS = ("structc", "torch_lstm", "torch_loop", "jax_scan")
NAMES = {"structc": "structc", "torch_lstm": "torch.nn.LSTM", "torch_loop": "torch cell loop",
         "jax_scan": "JAX lax.scan"}

CELLS = ("lstm", "gru")


def sources(hidden: int) -> tuple[str, str]:
    """The LSTM's and the GRU's model, `hidden` units."""
    lstm = f"""
model LstmSeq {{
  input  s: sequence of f32[{F}]
  target y: class[s.sequences] of {CLASSES}
  rec (h, c)(t) = init: (zeros({hidden}), zeros({hidden}))
                  next: lstm_cell(t.x, h(t.prev), c(t.prev), {hidden})
  loss cross_entropy(dense(h(s.last), {CLASSES}), y)
}}
"""
    gru = f"""
model GruSeq {{
  input  s: sequence of f32[{F}]
  target y: class[s.sequences] of {CLASSES}
  rec h(t) = init: zeros({hidden})
             next: gru_cell(t.x, h(t.prev), {hidden})
  loss cross_entropy(dense(h(s.last), {CLASSES}), y)
}}
"""
    return lstm, gru


SRC, GRU_SRC = sources(H)


def set_hidden(hidden: int) -> None:
    """`--hidden`: every contender's cell of this many units (the issue's workload: 128)."""
    global H, SRC, GRU_SRC
    H = hidden
    SRC, GRU_SRC = sources(hidden)


def lengths_of(case: str) -> np.ndarray:
    if case == "uniform":
        return np.full(BATCH, LENGTH)
    return np.random.default_rng(1).integers(RAGGED[0], RAGGED[1] + 1, BATCH)


def batch(case: str):
    """[positions, F] features (flat, sequence after sequence), lengths, labels."""
    lengths = lengths_of(case)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(int(lengths.sum()), F)).astype(np.float32)
    y = rng.integers(0, CLASSES, BATCH).astype(np.int32)
    return x, lengths, y


def padded(x, lengths):
    """[T, B, F] zero-padded to the longest sequence, time first."""
    out = np.zeros((int(lengths.max()), len(lengths), F), np.float32)
    at = 0
    for b, n in enumerate(lengths):
        out[:n, b] = x[at:at + n]
        at += n
    return out


def flop(lengths, padded_to: int | None = None, cell: str = "lstm") -> float:
    """The gates' matmuls a training step needs: forward, the weights' gradient
    (the same), and the state's cotangent through W_h (none into the features)."""
    positions = len(lengths) * padded_to if padded_to else int(np.sum(lengths))
    return 2 * positions * (2 * (F + H) + H) * (4 if cell == "lstm" else 3) * H


def median_s(fn, repeat: int, warmup: int = 3) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


# -- the contenders ---------------------------------------------------------------

def run_structc(case, threads, repeat, cell="lstm"):
    import structc
    from structc import api
    from structc.seqdata import Sequences
    structc.set_num_threads(threads)
    t0 = time.perf_counter()
    net = structc.compile(SRC if cell == "lstm" else GRU_SRC, cache=False, training=True)   # the whole cold compile
    compile_s = time.perf_counter() - t0
    x, lengths, y = batch(case)
    seqs = Sequences.from_flat(x, np.concatenate([[0], np.cumsum(lengths)]))
    before = api.COMPILE_COUNT
    result = median_s(lambda: net.train_step(s=seqs, y=y, lr=LR), repeat)
    other = Sequences.from_flat(x[:100], [0, 1, 37, 100])        # new lengths: no recompilation
    net.train_step(s=other, y=y[:3], lr=LR)
    assert api.COMPILE_COUNT == before
    return {"median": result[0], "best": result[1], "compile": compile_s}


def run_torch(case, threads, repeat, loop: bool, cell="lstm"):
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x, lengths, y = batch(case)
    xp = torch.tensor(padded(x, lengths))
    last = torch.tensor(lengths - 1, dtype=torch.long)
    rows = torch.arange(BATCH)
    target = torch.tensor(y, dtype=torch.long)
    out = torch.nn.Linear(H, CLASSES)
    if loop:
        step_of = torch.nn.LSTMCell(F, H) if cell == "lstm" else torch.nn.GRUCell(F, H)
        params = [*step_of.parameters(), *out.parameters()]

        def states():
            h = c = torch.zeros(BATCH, H)
            hs = []
            for t in range(xp.shape[0]):
                if cell == "lstm":
                    h, c = step_of(xp[t], (h, c))
                else:
                    h = step_of(xp[t], h)
                hs.append(h)
            return torch.stack(hs)
    else:
        rnn = torch.nn.LSTM(F, H) if cell == "lstm" else torch.nn.GRU(F, H)
        params = [*rnn.parameters(), *out.parameters()]

        def states():
            return rnn(xp)[0]
    opt = torch.optim.SGD(params, lr=LR)

    def step():
        loss = torch.nn.functional.cross_entropy(out(states()[last, rows]), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    result = median_s(step, repeat)
    return {"median": result[0], "best": result[1], "onednn": bool(torch.backends.mkldnn.is_available())}


def run_jax(case, threads, repeat, cell="lstm"):
    os.environ["XLA_FLAGS"] = (f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
                               f"intra_op_parallelism_threads={threads}")
    import jax
    import jax.numpy as jnp
    x, lengths, y = batch(case)
    rng = np.random.default_rng(0)
    gates = 4 if cell == "lstm" else 3
    p = {"W": rng.normal(size=(F + H, gates * H)) * 0.05, "b": np.zeros(gates * H),
         "U": rng.normal(size=(H, CLASSES)) * 0.1, "c": np.zeros(CLASSES)}
    p = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
    xp, last, labels = jnp.asarray(padded(x, lengths)), jnp.asarray(lengths - 1), jnp.asarray(y)

    def loss(p, xp, last, labels):
        def lstm(carry, xt):
            h, c = carry
            g = jnp.concatenate([xt, h], axis=1) @ p["W"] + p["b"]
            i, f, u, o = jnp.split(g, 4, axis=1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(u)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        def gru(h, xt):             # structc's gru_cell: the candidate from r h
            rz = jax.nn.sigmoid(jnp.concatenate([xt, h], axis=1) @ p["W"][:, :2 * H] + p["b"][:2 * H])
            r, z = rz[:, :H], rz[:, H:]
            n = jnp.tanh(jnp.concatenate([xt, r * h], axis=1) @ p["W"][:, 2 * H:] + p["b"][2 * H:])
            h = n + z * (h - n)
            return h, h
        zero = jnp.zeros((xp.shape[1], H), jnp.float32)
        _, hs = jax.lax.scan(lstm, (zero, zero), xp) if cell == "lstm" else jax.lax.scan(gru, zero, xp)
        z = hs[last, jnp.arange(xp.shape[1])] @ p["U"] + p["c"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), labels[:, None], axis=1))

    @jax.jit
    def step(p, xp, last, labels):
        value, grads = jax.value_and_grad(loss)(p, xp, last, labels)
        return jax.tree.map(lambda a, g: a - LR * g, p, grads), value

    state = {"p": p}
    t0 = time.perf_counter()
    step(p, xp, last, labels)[1].block_until_ready()
    compile_s = time.perf_counter() - t0

    def run():
        state["p"], value = step(state["p"], xp, last, labels)
        value.block_until_ready()
    result = median_s(run, repeat)
    return {"median": result[0], "best": result[1], "compile": compile_s}


def worker(framework: str, case: str, threads: int, repeat: int, cell: str = "lstm") -> dict:
    if framework == "structc":
        return run_structc(case, threads, repeat, cell)
    if framework in ("torch_lstm", "torch_loop"):
        return run_torch(case, threads, repeat, loop=framework == "torch_loop", cell=cell)
    if framework == "jax_scan":
        return run_jax(case, threads, repeat, cell)
    from structc.profile import fma_peak
    return {"fma_peak": fma_peak(iters=20_000_000, tries=3)}


# -- driver ---------------------------------------------------------------------------

def run(framework: str, case: str, threads: int, repeat: int, cell: str = "lstm") -> dict | None:
    env = dict(os.environ, STRUCTC_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--worker", framework, "--case", case, "--threads", str(threads),
           "--repeat", str(repeat), "--cell", cell, "--hidden", str(H)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, **pinned(threads))
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  {framework} ({case}, {threads} threads) failed: {last}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    ap.add_argument("--worker", choices=[*FRAMEWORKS, "peak"])
    ap.add_argument("--case", default="uniform")
    ap.add_argument("--cell", choices=CELLS, default="lstm", help="the recurrence's cell (default: lstm)")
    ap.add_argument("--hidden", type=int, default=H, help=f"the cell's units (default: {H}, the issue's)")
    args = ap.parse_args(argv)
    set_hidden(args.hidden)
    if args.worker:
        print(json.dumps(worker(args.worker, args.case, args.threads[0], args.repeat, args.cell)))
        return 0
    cases, frameworks = args.cases.split(","), args.frameworks.split(",")
    for given, known, what in ((cases, CASES, "--cases"), (frameworks, FRAMEWORKS, "--frameworks")):
        unknown = [x for x in given if x not in known]
        if unknown:
            ap.error(f"{what}: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
    names = dict(NAMES, torch_lstm="torch.nn.GRU") if args.cell == "gru" else NAMES
    load_before = os.getloadavg()
    samples: dict = {}
    peaks = []
    for r in range(args.rounds):
        peaks.append(run("peak", "uniform", 1, 1)["fma_peak"])
        for case in cases:
            for threads in args.threads:
                for fw in frameworks:
                    got = run(fw, case, threads, args.repeat, args.cell)
                    if got is not None:
                        samples.setdefault((case, threads, fw), []).append(got)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    peak = statistics.median(peaks)
    print(f"{args.cell}_seq_train: batch {BATCH}, input {F}, {args.cell.upper()} {H}, dense {CLASSES}, one SGD step; "
          f"uniform: length {LENGTH}; ragged: lengths {RAGGED[0]}..{RAGGED[1]} (seed 1, "
          f"{int(lengths_of('ragged').sum())} positions, longest {int(lengths_of('ragged').max())})")
    print(f"FMA peak, one core: {peak:.0f} GFLOP/s (median of {len(peaks)}); load average "
          f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; {args.rounds} rounds of "
          f"{args.repeat} steps, fresh process per framework, case and thread count\n")
    print("Median over rounds of each round's median step (best step in brackets), ms.\n")
    print("| case | threads | floor | " + " | ".join(names[f] for f in frameworks) +
          " | structc / " + " | structc / ".join(names[f] for f in frameworks if f != "structc") + " |")
    print("|---" * (3 + 2 * len(frameworks) - 1) + "|")
    for case in cases:
        lengths = lengths_of(case)
        gflop = flop(lengths, cell=args.cell) / 1e9
        for threads in args.threads:
            med = {fw: statistics.median(s["median"] for s in samples[(case, threads, fw)])
                   for fw in frameworks if (case, threads, fw) in samples}
            best = {fw: min(s["best"] for s in samples[(case, threads, fw)]) for fw in med}
            floor = f"{gflop:.2f} GFLOP, {1e3 * gflop / (peak * threads):.1f} ms"
            cells = [f"{1e3 * med[f]:.2f} ({1e3 * best[f]:.2f})" if f in med else "–" for f in frameworks]
            ratios = [f"{med['structc'] / med[f]:.2f}" if f in med and "structc" in med else "–"
                      for f in frameworks if f != "structc"]
            print(f"| {case} | {threads} | {floor} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    comp = [s["compile"] for k, v in samples.items() if k[2] == "structc" for s in v]
    jcomp = [s["compile"] for k, v in samples.items() if k[2] == "jax_scan" for s in v]
    if comp:
        print(f"\nstructc cold compile (no cache): median {statistics.median(comp):.2f} s; "
              + (f"JAX jit trace + compile: median {statistics.median(jcomp):.2f} s" if jcomp else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
