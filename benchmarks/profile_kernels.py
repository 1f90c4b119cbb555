"""Where a training step's time goes: every kernel of the entry point, timed.

    python benchmarks/profile_kernels.py mlp            # or gnn, trees, lenet, conv
    python benchmarks/profile_kernels.py gnn --threads 2 --steps 400

The compiled code runs each kernel through the runtime's `sc_parallel_for`.
This script builds a small C shim (with the system C compiler) that wraps
it, timing each call, and points the JIT's symbol at the shim before the
model is compiled, so the machine code measured is exactly the code that
runs (the cache is bypassed so the shim is linked in). Kernels run directly
by the entry point (tiny ones) are not seen; the remainder is printed.
Kernels run from inside another (each level of a recursion over trees) are
listed too, marked, and counted only once, in the kernel that runs them.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHIM = r"""
#include <stdint.h>
#include <time.h>
typedef void (*task_fn)(void *, int64_t, int64_t);
typedef void (*pf_t)(task_fn, void *, int64_t, int64_t);
#define MAXK 4096
static pf_t real;
void *fns[MAXK]; double secs[MAXK]; int64_t calls[MAXK], tasks[MAXK]; int nested[MAXK]; int nk;
static _Thread_local int depth;
void shim_init(void *r) { real = (pf_t)r; nk = 0; }
void shim_reset(void) { for (int i = 0; i < nk; i++) { secs[i] = 0; calls[i] = 0; } }
void shim_pf(task_fn fn, void *frame, int64_t n, int64_t cost) {
    struct timespec a, b;
    int inner = depth++;
    clock_gettime(CLOCK_MONOTONIC, &a);
    real(fn, frame, n, cost);
    clock_gettime(CLOCK_MONOTONIC, &b);
    depth--;
    int i = 0;
    while (i < nk && fns[i] != (void *)fn) i++;
    if (i == nk) { if (nk == MAXK) return; fns[nk++] = (void *)fn; }
    secs[i] += (double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec);
    calls[i]++;
    tasks[i] = n;
    nested[i] |= inner > 0;
}
"""


def install_shim(workdir: Path) -> ctypes.CDLL:
    import llvmlite.binding as llvm

    from structc import native
    src, lib = workdir / "shim.c", workdir / "shim.so"
    src.write_text(SHIM)
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    shim = ctypes.CDLL(str(lib))
    native._init()     # registers the real runtime symbols first
    real = native.runtime_library().sc_parallel_for
    shim.shim_init(ctypes.cast(real, ctypes.c_void_p))
    llvm.add_symbol("sc_parallel_for", ctypes.cast(shim.shim_pf, ctypes.c_void_p).value)
    return shim


def workload(name: str):
    """(source, a function running one training step) for a benchmark's model."""
    import numpy as np

    import structc
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    if name == "mlp":
        import bench_mlp as m
        x, y = m.data()
        return m.MLP, lambda net: net.train_step(x=x, y=y, lr=0.01)
    if name == "gnn":
        import bench_gnn as m
        edge_index, x, y = m.problem()
        g = structc.Graph(edge_index, x=x)
        return m.MODEL, lambda net: net.train_step(g=g, y=y, lr=0.01)
    if name == "trees":
        import bench_trees as m
        trees, labels = m.batch(0)
        forest = structc.Forest.from_tuples(trees)
        return m.SRC, lambda net: net.train_step(t=forest, y=labels, lr=0.01)
    rng = np.random.default_rng(0)
    if name == "lenet":
        import bench_conv as m
        x = rng.random((64, 1, 28, 28), dtype=np.float32)
        y = rng.integers(0, 10, 64).astype(np.int32)
        return m.LENET.read_text(), lambda net: net.train_step(x=x, y=y, lr=0.01)
    if name == "conv":
        import bench_conv as m
        x = rng.normal(size=(32, 32, 32, 32)).astype(np.float32)
        y = rng.integers(0, 10, 32).astype(np.int32)
        return m.CONV_STEP, lambda net: net.train_step(x=x, y=y, lr=0.01)
    raise SystemExit(f"unknown workload {name!r} (mlp, gnn, trees, lenet, conv)")


def kernel_names(source: str, module) -> dict[int, str]:
    """Address -> name of every kernel function in the compiled module."""
    from structc.compiler import compile_source
    dumps = {}
    compile_source(source, "<profile>", None, None, dump=lambda stage, text: dumps.__setitem__(stage, text))
    names = set(re.findall(r'define internal void @"([^"]+)"\(ptr %"\.1", i64', dumps["llvm"]))
    out = {}
    for name in names:
        try:
            out[module.engine.get_function_address(name)] = name
        except Exception:  # noqa: BLE001 - a name the object code does not keep
            pass
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=["mlp", "gnn", "trees", "lenet", "conv"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default: about a second's worth)")
    args = ap.parse_args(argv)
    os.environ["STRUCTC_NO_CACHE"] = "1"      # the shim must be linked into freshly loaded code
    import structc
    with tempfile.TemporaryDirectory() as tmp:
        shim = install_shim(Path(tmp))
        structc.set_num_threads(args.threads)
        source, step = workload(args.workload)
        net = structc.compile(source)
        for _ in range(20):
            step(net)
        t = time.perf_counter()
        step(net)
        steps = args.steps or max(20, int(1.0 / max(time.perf_counter() - t, 1e-6)))
        shim.shim_reset()
        t = time.perf_counter()
        for _ in range(steps):
            step(net)
        per_step = (time.perf_counter() - t) / steps
        names = kernel_names(source, net._module)
        n = ctypes.c_int.in_dll(shim, "nk").value
        fns = (ctypes.c_void_p * 4096).in_dll(shim, "fns")
        secs = (ctypes.c_double * 4096).in_dll(shim, "secs")
        calls = (ctypes.c_int64 * 4096).in_dll(shim, "calls")
        tasks = (ctypes.c_int64 * 4096).in_dll(shim, "tasks")
        nested = (ctypes.c_int * 4096).in_dll(shim, "nested")
        rows = [(secs[i] / steps, calls[i] / steps, tasks[i], names.get(fns[i], hex(fns[i] or 0)), nested[i])
                for i in range(n) if calls[i]]
    rows.sort(reverse=True)
    seen = sum(r[0] for r in rows if not r[4])
    print(f"{args.workload}: {steps} steps at {args.threads} thread(s), {per_step * 1e6:.1f} us per step; "
          f"kernels {seen * 1e6:.1f} us, the rest (Python, input checks, kernels run inline) "
          f"{(per_step - seen) * 1e6:.1f} us\n")
    print(f"{'kernel':50s} {'us/step':>9s} {'share':>6s} {'calls':>6s} {'tasks':>6s}")
    for sec, ncalls, ntasks, name, inner in rows:
        name = ("  (inside) " if inner else "") + name
        print(f"{name:50s} {sec * 1e6:9.1f} {100 * sec / per_step:5.1f}% {ncalls:6.0f} {ntasks:6d}")
    if any(r[4] for r in rows):
        print("\n(inside): run by another kernel (a recursion's levels); its time is part of that kernel's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
