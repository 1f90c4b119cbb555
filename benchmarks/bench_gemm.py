"""GFLOP/s of structc's matmul kernel at the shapes the models run, against
numpy (OpenBLAS) and the core's measured FMA peak.

    env -u OPENBLAS_CORETYPE OPENBLAS_NUM_THREADS=1 python benchmarks/bench_gemm.py
    python benchmarks/bench_gemm.py --quick          # fewer shapes

Each case is one `matmul` op compiled alone (`structc.testing.op_net`: the
same lowering as in a model, legalize included), called through the forward
entry with its arrays bound once, on one thread. Rows:

  * M x (K, N): C = A @ B, the forward shapes (LSTM gates [192, 512],
    Tree-LSTM iou [256 | 128, 384], [128, 128], LeNet's fc [784 | 400, ...]);
  * `AtG`: C = A^T G, A [M, K] and G [M, N] -> [K, N] (a weight gradient over
    a batch of M rows);
  * narrow N in {1, 2, 4, 10}: C = A @ B with B [K, N].

The FMA peak is measured by a loop of independent vector FMAs compiled
with llvmlite (16 accumulators, AVX-512 when the host has it).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import time

import numpy as np

MS = (1, 2, 3, 4, 5, 8, 12, 13, 16, 32, 64, 128)
KNS = ((192, 512), (256, 384), (128, 384), (128, 128), (784, 128), (400, 120))
NARROW = (1, 2, 4, 10)


def timed(fn, seconds: float = 0.05, blocks: int = 5) -> float:
    """The best over blocks of the CPU seconds of this thread per call (each
    block about `seconds` long): CPU time, because on the shared machine the
    wall time mostly measures the other processes."""
    fn()
    t0 = time.thread_time()
    n = 0
    while time.thread_time() - t0 < seconds / 4:
        fn()
        n += 1
    calls = max(1, int(4 * n))
    per = []
    for _ in range(blocks):
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        per.append((time.thread_time() - t0) / calls)
    return min(per)


def structc_matmul(m: int, k: int, n: int, ta: bool = False):
    """A callable running the compiled matmul once, and its expected result."""
    from structc import _runtime
    from structc.ops import REGISTRY
    from structc.ops.base import Sample
    from structc.testing import op_net
    a_shape = (k, m) if ta else (m, k)
    sample = Sample((a_shape, (k, n)), {"ta": True} if ta else {})
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=s).astype(np.float32) for s in sample.inputs]
    mdef, net = op_net(REGISTRY["matmul"], sample, arrays)
    for name, a in zip(("p0", "p1"), arrays):
        if name in net.params:
            net.params[name][...] = a
    given = {f"i{j}": a for j, a in enumerate(arrays) if f"i{j}" in mdef.inputs}
    entry = net._entries["forward"]
    bound, dims = net._bind(entry, given)
    dvals = tuple(dims.get(s, 1) for s in net._symbols)
    ws = net._workspace(net._workspace_size(entry, dvals))
    out = np.empty((m, n), np.float32)
    pa, ga, sa = net._arena_addrs

    def call():
        _runtime.invoke(entry.address, pa, ga, sa, ws, bound, [out], dvals, net._hyper_addr, 0)
    call()
    a, b = arrays
    expected = (a.T if ta else a) @ b
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-3 * np.sqrt(k))
    return call, a, b


def fma_peak() -> float:
    """GFLOP/s of a loop of 16 independent vector FMAs per iteration (one core)."""
    import llvmlite.binding as llvm
    from llvmlite import ir
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    vw = 16 if "avx512f" in open("/proc/cpuinfo").read() else 8
    f32 = ir.FloatType()
    vt = ir.VectorType(f32, vw)
    mod = ir.Module("peak")
    mod.triple = llvm.get_process_triple()
    fn = ir.Function(mod, ir.FunctionType(f32, [ir.IntType(64)]), "peak")
    fma = ir.Function(mod, ir.FunctionType(vt, [vt, vt, vt]), f"llvm.fma.v{vw}f32")
    entry, loop, done = (fn.append_basic_block(s) for s in ("entry", "loop", "done"))
    b = ir.IRBuilder(entry)
    x = ir.Constant(vt, [ir.Constant(f32, 1.0000001)] * vw)
    b.branch(loop)
    b.position_at_end(loop)
    i = b.phi(ir.IntType(64))
    i.add_incoming(ir.Constant(ir.IntType(64), 0), entry)
    accs = []
    for r in range(16):
        p = b.phi(vt)
        p.add_incoming(ir.Constant(vt, [ir.Constant(f32, r * 0.01)] * vw), entry)
        accs.append(p)
    new = [b.call(fma, [acc, x, x]) for acc in accs]
    for p, v in zip(accs, new):
        p.add_incoming(v, loop)
    nxt = b.add(i, ir.Constant(ir.IntType(64), 1))
    i.add_incoming(nxt, loop)
    b.cbranch(b.icmp_signed("<", nxt, fn.args[0]), loop, done)
    b.position_at_end(done)
    total = new[0]
    for v in new[1:]:
        total = b.fadd(total, v)
    b.ret(b.extract_element(total, ir.Constant(ir.IntType(32), 0)))
    tm = llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=2)
    engine = llvm.create_mcjit_compiler(llvm.parse_assembly(str(mod)), tm)
    engine.finalize_object()
    peak = ctypes.CFUNCTYPE(ctypes.c_float, ctypes.c_int64)(engine.get_function_address("peak"))
    iters = 2_000_000
    best = min(timed(lambda: peak(iters), seconds=0.1) for _ in range(3))
    fma_peak.engine = engine        # keep the code alive
    return iters * 16 * vw * 2 / best / 1e9


def cases(quick: bool):
    ms = (1, 2, 3, 4, 8, 13, 64) if quick else MS
    for k, n in KNS:
        for m in ms:
            yield f"{m}x{k}x{n}", m, k, n, False
    for m, (k, n) in ((64, (128, 512)), (64, (64, 384)), (32, (128, 384)), (64, (784, 120)), (64, (400, 120))):
        yield f"AtG {m}:{k}x{n}", k, m, n, True
    for n in NARROW:
        for m, k in ((1, 128), (64, 128), (256, 64)):
            yield f"narrow {m}x{k}x{n}", m, k, n, False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    args = ap.parse_args(argv)
    import structc
    structc.set_num_threads(1)
    print(os.popen("uptime").read().strip(), "|", structc.__file__)
    peak = fma_peak()
    print(f"FMA peak (one core, measured): {peak:.1f} GFLOP/s")
    print(f"{'case':24s} {'structc us':>10s} {'GFLOP/s':>8s} {'%peak':>6s} {'numpy us':>9s} {'np/sc':>6s}")
    for name, m, k, n, ta in cases(args.quick):
        if args.only not in name:
            continue
        call, a, b = structc_matmul(m, k, n, ta)
        at = np.ascontiguousarray(a)
        t_sc = timed(call)
        t_np = timed((lambda: at.T @ b) if ta else (lambda: at @ b))
        flops = 2 * m * k * n
        print(f"{name:24s} {t_sc * 1e6:10.2f} {flops / t_sc / 1e9:8.1f} {100 * flops / t_sc / 1e9 / peak:5.0f}% "
              f"{t_np * 1e6:9.2f} {t_np / t_sc:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
