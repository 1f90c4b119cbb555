"""Cold and warm compile times of every example and benchmark model (issue 14).

    python benchmarks/bench_compile.py                     # everything, 1 round
    python benchmarks/bench_compile.py --rounds 3 --models lenet5,MLP --jax
    python benchmarks/bench_compile.py --against ../base/venv/bin/python:../base --rounds 5

Each figure comes from a fresh process (so nothing is compiled or imported
beforehand; the import of structc itself is shown apart):
  train cold    structc.compile(..., training=True) with an empty cache folder:
                the forward and the training entries (what `structc train` does)
  forward cold  structc.compile(...) with an empty cache folder: the forward
                entry only (inference; the training entries wait for their first use)
  warm          structc.compile(..., training=True) again, in a new process: both
                parts loaded from the cache
  edit          (models in EDITS) structc.compile(..., training=True) of the model
                with one layer changed, in a new process, with the cache the
                cold compile filled: only the kernels the edit changed are
                compiled (their count in brackets after the CPU seconds)
  --edit-stages (instead of the table) where each edit's compile goes: its
                stages (wall and CPU ms) and each LLVM module it compiled
  --against PYTHON:CHECKOUT
                (instead of the table) train cold of this checkout and another,
                alternated in fresh processes: min and median of `--rounds`, and
                the collection of what the compile left to Python's collector
                (a full `gc.collect()` right after it: whatever runs next pays it)
  jax           (--jax, if jax is installed) the first call of a jitted training
                step (value_and_grad and SGD update) of the MLP and LeNet-5: JAX's
                trace and compile
Every time is wall seconds, with the process's CPU seconds in brackets: LLVM
runs on up to one thread per core (`STRUCTC_COMPILE_THREADS`), so on an idle
machine wall < CPU; on a loaded one wall > CPU, and CPU is the steadier figure.
Medians over rounds; the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent


def models() -> dict[str, str]:
    """name -> source: the shipped examples, then the benchmarks' models."""
    found = {p.stem: p.read_text() for p in sorted((ROOT / "examples").glob("*.snet"))}
    sys.path.insert(0, str(BENCH))
    import bench_conv
    import bench_gnn
    import bench_mlp
    import bench_trees
    found.update({"MLP (bench_mlp)": bench_mlp.MLP, "ConvStep (bench_conv)": bench_conv.CONV_STEP,
                  "GNN (bench_gnn)": bench_gnn.MODEL, "TreeNet (bench_trees)": bench_trees.SRC,
                  "Dense200 (200 layers)": deep(200)})
    return found


def deep(layers: int) -> str:
    """`layers` dense layers of the same shape: repeated kernels (issue 14 item 2)."""
    body = "\n".join("  h = dense(h, 8) |> relu" for _ in range(layers))
    return f"model Deep {{\n  input x: f32[N, 8]\n  target y: class[N] of 4\n  h = x\n{body}\n" \
           "  loss cross_entropy(dense(h, 4), y)\n}\n"


#: model -> (text, replacement): a one-layer edit, compiled after the cold compile with its cache
EDITS = {"lenet5": ("dense(h, 84)", "dense(h, 80)"),
         "karate_gat": ("gat(g.x over g.edges, 8, heads=4)", "gat(g.x over g.edges, 6, heads=4)"),
         "MLP (bench_mlp)": ("dense(h, 128)", "dense(h, 120)")}


WORKER = """
import gc, json, os, sys, time
c0, t0 = time.process_time(), time.perf_counter()
import structc
imported = time.perf_counter() - t0
mode, source = sys.argv[1], sys.stdin.read()
c1, t1 = time.process_time(), time.perf_counter()
modules = getattr(structc.compiler, "MODULE_COUNT", 0)
net = structc.compile(source, training=(mode != "forward"))
wall = time.perf_counter() - t1
t2 = time.perf_counter()
gc.collect()      # what the compile left to the collector: paid by whatever runs next
print(json.dumps({"import": imported, "wall": wall, "cpu": time.process_time() - c1,
                  "collect": time.perf_counter() - t2,
                  "parts": net.meta["parts"], "modules": getattr(structc.compiler, "MODULE_COUNT", 0) - modules}))
"""

# The edit again, with `--edit-stages`: each stage's wall and CPU ms, and each LLVM module compiled
STAGES_WORKER = """
import json, re, sys, time
import structc
from structc import api, compiler
modules = []
real = compiler.compile_objects

def compile_each(texts, *args, **kwargs):      # one module at a time, timed on the thread that compiles it
    out = []
    for text in texts:
        c0 = time.thread_time()
        out += real([text], *args, **kwargs)
        first = re.search(r'^define [^@]*@"([^"]+)"', text, re.M)
        modules.append([first.group(1) if first else "?", text.count("\\n"), time.thread_time() - c0])
    return out
compiler.compile_objects = compile_each
art = api.compile_artifact(sys.stdin.read())
print(json.dumps({"stages": [[k, v, art.timings.cpu.get(k, 0.0)] for k, v in art.timings.items()],
                  "modules": modules, "records": getattr(compiler, "KERNEL_RECORDS", None)}))
"""

JAX_WORKER = """
import json, sys, time
sys.path.insert(0, sys.argv[2])
t0 = time.perf_counter()
import jax, jax.numpy as jnp
import numpy as np
imported = time.perf_counter() - t0
rng = np.random.default_rng(0)

def mlp():
    sizes = [784, 256, 128, 10]
    params = [(jnp.asarray(rng.normal(0, 0.05, (a, b)), jnp.float32), jnp.zeros(b, jnp.float32))
              for a, b in zip(sizes, sizes[1:])]
    def forward(params, x):
        for k, (w, b) in enumerate(params):
            x = x @ w + b
            x = jax.nn.relu(x) if k < len(params) - 1 else x
        return x
    x = jnp.asarray(rng.normal(size=(64, 784)), jnp.float32)
    return params, forward, x

def lenet():
    def conv(key, o, i, k):
        return jnp.asarray(rng.normal(0, 0.1, (o, i, k, k)), jnp.float32), jnp.zeros(o, jnp.float32)
    params = [conv(0, 6, 1, 5), conv(1, 16, 6, 5)] + [
        (jnp.asarray(rng.normal(0, 0.05, (a, b)), jnp.float32), jnp.zeros(b, jnp.float32))
        for a, b in ((256, 120), (120, 84), (84, 10))]
    def forward(params, x):
        for w, b in params[:2]:
            x = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID") + b[None, :, None, None]
            x = jax.nn.relu(x)
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
        x = x.reshape(x.shape[0], -1)
        for k, (w, b) in enumerate(params[2:]):
            x = x @ w + b
            x = jax.nn.relu(x) if k < 2 else x
        return x
    x = jnp.asarray(rng.normal(size=(64, 1, 28, 28)), jnp.float32)
    return params, forward, x

params, forward, x = {"mlp": mlp, "lenet": lenet}[sys.argv[1]]()
y = jnp.asarray(rng.integers(0, 10, 64))
def loss(params, x, y):
    logits = forward(params, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
@jax.jit
def step(params, x, y):
    value, grads = jax.value_and_grad(loss)(params, x, y)
    return value, jax.tree_util.tree_map(lambda p, g: p - 0.01 * g, params, grads)
c1, t1 = time.process_time(), time.perf_counter()
value, params = step(params, x, y)
value.block_until_ready()
print(json.dumps({"import": imported, "wall": time.perf_counter() - t1, "cpu": time.process_time() - c1}))
"""


def run_structc(mode: str, source: str, cache: str, python: str = sys.executable, root: Path = ROOT) -> dict:
    env = dict(os.environ, STRUCTC_CACHE_DIR=cache)
    env.pop("STRUCTC_NO_CACHE", None)
    done = subprocess.run([python, "-c", WORKER, mode], input=source, env=env,
                          capture_output=True, text=True, cwd=root)
    if done.returncode:
        sys.exit(f"structc {mode} failed ({python}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def against(chosen: dict, other: str, rounds: int) -> None:
    """Cold training compiles of this checkout and another (`PYTHON:CHECKOUT`, an
    interpreter with that checkout installed), alternated per model and round in
    fresh processes with an empty cache each, so both see the same machine: on a
    shared one the load moves a compile by 20-30% from one minute to the next."""
    python, _, root = other.partition(":")
    if not root:
        sys.exit("--against needs PYTHON:CHECKOUT")
    sides = {"this": (sys.executable, ROOT), "other": (python, Path(root).resolve())}
    load_before = os.getloadavg()
    found: dict = {}
    for k in range(rounds):
        for name, source in chosen.items():
            for side in (list(sides) if k % 2 == 0 else list(sides)[::-1]):
                with tempfile.TemporaryDirectory(prefix="structc-bench-cache-") as cache:
                    found.setdefault((name, side), []).append(run_structc("train", source, cache, *sides[side]))
        print(f"round {k + 1} done", file=sys.stderr)
    print(f"load average {' '.join(f'{v:.2f}' for v in load_before)} before, "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} after; {rounds} round(s); train cold; "
          f"other = {other}\n")
    print("| model | this: wall min / median (CPU) | other: wall min / median (CPU) | this / other (medians) "
          "| collection after it, this / other (median ms) |")
    print("|---|---|---|---|---|")
    for name in chosen:
        cells, medians, collects = [], [], []
        for side in sides:
            runs = found[(name, side)]
            wall = [r["wall"] for r in runs]
            medians.append(statistics.median(wall))
            collects.append(f"{statistics.median(r.get('collect', 0.0) for r in runs) * 1000:.0f}")
            cells.append(f"{min(wall):.2f} / {medians[-1]:.2f} ({statistics.median(r['cpu'] for r in runs):.2f})")
        print(f"| {name} | {cells[0]} | {cells[1]} | {medians[0] / medians[1]:.2f} | {' / '.join(collects)} |")


def edit_stages(name: str, source: str) -> None:
    """Print where an edit's compile goes: cold compile, then the edit with `STAGES_WORKER`."""
    edited = source.replace(*EDITS[name])
    with tempfile.TemporaryDirectory(prefix="structc-bench-cache-") as cache:
        run_structc("train", source, cache)
        env = dict(os.environ, STRUCTC_CACHE_DIR=cache)
        done = subprocess.run([sys.executable, "-c", STAGES_WORKER], input=edited, env=env, capture_output=True,
                              text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(f"structc edit stages failed:\n{done.stderr[-2000:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n{name}: one-layer edit {EDITS[name][0]!r} -> {EDITS[name][1]!r}, stages (ms)\n")
    print("| stage | wall | CPU |\n|---|---|---|")
    for stage, wall, cpu in found["stages"]:
        if wall >= 0.0005 or cpu >= 0.0005:
            print(f"| {stage} | {wall * 1000:.1f} | {cpu * 1000:.1f} |")
    print(f"\nLLVM modules compiled ({len(found['modules'])}; CPU ms of optimisation and code generation):\n")
    print("| first function | IR lines | CPU ms |\n|---|---|---|")
    for first, lines, cpu in sorted(found["modules"], key=lambda m: -m[2]):
        print(f"| {first} | {lines} | {cpu * 1000:.0f} |")
    print(f"| all {len(found['modules'])} | {sum(m[1] for m in found['modules'])} "
          f"| {sum(m[2] for m in found['modules']) * 1000:.0f} |")
    records = found.get("records")
    if records:
        print(f"\nkernels from their records: {records['reused']}, built: {records['built']}, "
              f"not recorded: {records['refused'] or 'none'}")


def run_jax(model: str) -> dict | None:
    done = subprocess.run([sys.executable, "-c", JAX_WORKER, model, str(BENCH)], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if done.returncode:
        print(f"jax {model} failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _seconds(t: float) -> str:
    return f"{t:.2f}" if t >= 0.1 else f"{t * 1000:.0f} ms"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--models", help="comma-separated names (default: all); names start as listed in the table")
    ap.add_argument("--jax", action="store_true", help="also JAX's first call on the MLP and LeNet-5")
    ap.add_argument("--edit-stages", action="store_true",
                    help="only where each edit's compile goes: its stages and the LLVM modules it compiles")
    ap.add_argument("--against", metavar="PYTHON:CHECKOUT",
                    help="only cold training compiles, this checkout's and another's alternated")
    args = ap.parse_args(argv)
    chosen = models()
    if args.models:
        wanted = args.models.split(",")
        chosen = {k: v for k, v in chosen.items() if any(k.startswith(w) for w in wanted)}
    if args.against:
        against(chosen, args.against, args.rounds)
        return 0
    if args.edit_stages:
        print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        for name in (n for n in chosen if n in EDITS):
            edit_stages(name, chosen[name])
        return 0
    load_before = os.getloadavg()
    found: dict = {}
    for _ in range(args.rounds):
        for name, source in chosen.items():
            with tempfile.TemporaryDirectory(prefix="structc-bench-cache-") as cache:
                found.setdefault((name, "forward"), []).append(run_structc("forward", source, cache))
            with tempfile.TemporaryDirectory(prefix="structc-bench-cache-") as cache:
                found.setdefault((name, "train"), []).append(run_structc("train", source, cache))
                found.setdefault((name, "warm"), []).append(run_structc("train", source, cache))
                if name in EDITS:
                    edited = source.replace(*EDITS[name])
                    assert edited != source, name
                    found.setdefault((name, "edit"), []).append(run_structc("train", edited, cache))
            print(f"{name} done", file=sys.stderr)
        if args.jax:
            for model in ("mlp", "lenet"):
                result = run_jax(model)
                if result:
                    found.setdefault((model, "jax"), []).append(result)

    def cell(key):
        if key not in found:
            return "–"
        wall = statistics.median(r["wall"] for r in found[key])
        cpu = statistics.median(r["cpu"] for r in found[key])
        modules = f", {statistics.median(r['modules'] for r in found[key]):.0f} modules" if key[1] == "edit" else ""
        return f"{_seconds(wall)} ({_seconds(cpu)}{modules})"
    print(f"load average {' '.join(f'{v:.2f}' for v in load_before)} before, "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} after; {args.rounds} round(s); "
          f"{os.cpu_count()} cores; seconds, wall (CPU)\n")
    print("| model | train cold | forward cold | warm (cached) | one-layer edit | import structc |")
    print("|---|---|---|---|---|---|")
    for name in chosen:
        imported = statistics.median(r["import"] for r in found[(name, "train")])
        print(f"| {name} | {cell((name, 'train'))} | {cell((name, 'forward'))} | {cell((name, 'warm'))} "
              f"| {cell((name, 'edit')) if name in EDITS else ''} | {imported:.2f} |")
    for model, label in (("mlp", "MLP (bench_mlp)"), ("lenet", "LeNet-5")):
        if (model, "jax") in found:
            print(f"| JAX first call, {label} | {cell((model, 'jax'))} | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
