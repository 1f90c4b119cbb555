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

The FMA peak is `structc.profile.fma_peak` (independent chains of vector
FMAs, as many as fit in registers; AVX-512 when the host has it), as bench_conv and bench_lstm report it.
"""
from __future__ import annotations

import argparse
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
    """GFLOP/s of one core's independent vector FMAs: structc.profile's
    measurement (the one bench_conv and bench_lstm report too)."""
    from structc.profile import fma_peak as measure
    return measure()


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
