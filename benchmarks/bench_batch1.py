"""Batch-1 inference: structc's forward entry against Apache TVM tuned with MetaSchedule.

    python benchmarks/bench_batch1.py --tune 300          # tune TVM (slow; the log is kept in --work-dir)
    python benchmarks/bench_batch1.py                     # measure structc and the tuned TVM, in one run

The models are LeNet-5 (`examples/lenet5.snet`) and the digits MLP
(`examples/digits_mlp.snet`) at batch 1, returning the class probabilities
(softmax), weights bound as constants on the TVM side. TVM is optional
(`pip install apache-tvm apache-tvm-ffi==0.1.14.post1`): without it only
structc is measured. Both run on one thread (TVM_NUM_THREADS=1, target
num-cores=1). Times are the median and the best of blocks of calls.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"
MODELS = {"lenet5": (EXAMPLES / "lenet5.snet", (1, 1, 28, 28)),
          "mlp": (EXAMPLES / "digits_mlp.snet", (1, 64))}


def timed(fn, calls: int = 2000, blocks: int = 7) -> tuple[float, float]:
    """(median, best) CPU seconds of the process per call over blocks of
    `calls` calls: CPU time, because on the shared machine the wall time
    mostly measures the other processes; the whole process's, so work handed
    to another thread (or a pool spinning) is counted."""
    for _ in range(200):
        fn()
    per = []
    for _ in range(blocks):
        t0 = time.process_time()
        for _ in range(calls):
            fn()
        per.append((time.process_time() - t0) / calls)
    return statistics.median(per), min(per)


def structc_forward(name: str):
    """(call, params, x, out, net_call, net): `call` runs the forward entry at batch 1
    with its arrays bound once (the native call alone); `net_call` is what a
    user writes, `net(x=x)` (input checks and the output's allocation included)."""
    import structc
    from structc import _runtime
    structc.set_num_threads(1)
    src, shape = MODELS[name]
    net = structc.compile(src.read_text())
    net.init_params(seed=0)
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    entry = net._entries["forward"]
    arrays, dims = net._bind(entry, {"x": x})
    dvals = tuple(dims.get(s, 1) for s in net._symbols)
    outs = [np.empty((1, 10), np.float32)]
    ws = net._workspace(net._workspace_size(entry, dvals))
    pa, ga, sa = net._arena_addrs

    def call():
        _runtime.invoke(entry.address, pa, ga, sa, ws, arrays, outs, dvals, net._hyper_addr, 0)
    call()
    np.testing.assert_allclose(outs[0], net(x=x), rtol=1e-5)
    return call, net.params, x, outs[0], lambda: net(x=x), net


def plan_calls(net) -> int:
    """Calls `net`'s C call plan ran (0 where there is none: an older checkout)."""
    return getattr(getattr(net, "_forward_plan", None), "calls", 0)


# -- TVM ---------------------------------------------------------------------------------

def tvm_module(name: str):
    """The Relax module of a model at batch 1 (parameters still free)."""
    from tvm.relax.frontend import nn

    class MLP(nn.Module):
        def __init__(self):
            self.l0, self.l1, self.l2 = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 10)

        def forward(self, x):
            h = nn.op.relu(self.l0(x))
            h = nn.op.relu(self.l1(h))
            return nn.op.softmax(self.l2(h), axis=-1)

    class LeNet5(nn.Module):
        def __init__(self):
            self.c0, self.c1 = nn.Conv2D(1, 6, 5), nn.Conv2D(6, 16, 5)
            self.l0, self.l1, self.l2 = nn.Linear(256, 120), nn.Linear(120, 84), nn.Linear(84, 10)

        def forward(self, x):
            from tvm import relax
            from tvm.relax.frontend.nn import op

            def pool(h):
                return op.wrap_nested(relax.op.nn.max_pool2d(h._expr, (2, 2), (2, 2)), "pool")
            h = pool(op.relu(self.c0(x)))
            h = pool(op.relu(self.c1(h)))
            h = op.reshape(h, (1, 256))
            h = op.relu(self.l0(h))
            h = op.relu(self.l1(h))
            return op.softmax(self.l2(h), axis=-1)

    model = {"mlp": MLP, "lenet5": LeNet5}[name]()
    shape = MODELS[name][1]
    mod, specs = model.export_tvm({"forward": {"x": nn.spec.Tensor(shape, "float32")}})
    return mod, {n: tuple(int(d) for d in param.shape) for n, param in specs}


def tvm_weights(name: str, params: dict, names: dict) -> dict:
    """structc's parameters under the TVM module's names (the same model)."""
    order = sorted(params)        # dense/conv weights and biases, in layer order by name
    mats = [params[k] for k in order]
    ws = [m for m in mats if m.ndim >= 2]
    bs = [m for m in mats if m.ndim == 1]
    out = {}
    wi = bi = 0
    for n in names:
        if n.endswith("weight"):
            w = ws[wi]
            wi += 1
            out[n] = w.T.copy() if w.ndim == 2 else w.copy()   # Linear keeps [out, in]
        else:
            out[n] = bs[bi].copy()
            bi += 1
    return out


def _cost_model() -> str:
    try:
        import xgboost  # noqa: F401
        return "xgb"
    except ImportError:
        return "random"


COST_MODEL = _cost_model()
PER_TASK = 16        # trials per tuning task: every task gets some within the global budget


def tvm_target():
    import tvm
    return tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 1})


def tvm_build(name: str, work_dir: Path, trials: int, weights: dict | None = None, ops=None):
    """The tuned VM function (tunes for `trials` first when trials > 0)."""
    import tvm
    from tvm import relax
    mod, names = tvm_module(name)
    if weights is None:
        rng = np.random.default_rng(0)
        weights = {n: rng.normal(size=shape).astype(np.float32) for n, shape in names.items()}
    mod = relax.transform.BindParams("forward", {n: tvm.runtime.tensor(v) for n, v in weights.items()})(mod)
    target = tvm_target()
    work = str(work_dir / name)
    with target:
        mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                        relax.transform.CanonicalizeBindings(),
                                        relax.get_pipeline("zero")])(mod)
        if trials:
            tune(mod, target, work, trials, ops)
        mod = relax.transform.MetaScheduleApplyDatabase(work)(mod)
    ex = tvm.compile(mod, target=target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["forward"]


def tune(mod, target, work: str, trials: int, ops=None) -> None:
    """MetaSchedule over every task of the module, `trials` in all. The
    builder's and runner's timeouts are raised from 30 s: on this shared
    machine a build worker's start alone took longer, and every trial failed."""
    from tvm.s_tir import meta_schedule as ms
    ms.relax_integration.tune_relax(
        mod, params={}, target=target, work_dir=work, max_trials_global=trials,
        max_trials_per_task=PER_TASK, num_trials_per_iter=16, op_names=ops, cost_model=COST_MODEL,
        builder=ms.builder.LocalBuilder(max_workers=1, timeout_sec=600),
        runner=ms.runner.LocalRunner(timeout_sec=120))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tune", type=int, default=0, help="MetaSchedule trials per model (0: use the log)")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/structc_tvm_batch1"))
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--no-tvm", action="store_true")
    ap.add_argument("--ops", nargs="*", help="tune only the tasks whose name contains one of these (e.g. conv2d)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    if args.tune:
        for name in args.models:
            t0 = time.perf_counter()
            tvm_build(name, args.work_dir, args.tune, ops=args.ops)
            print(f"tuned {name}: {args.tune} trials in {time.perf_counter() - t0:.0f} s", flush=True)
        return 0
    print(os.popen("uptime").read().strip())
    for name in args.models:
        call, params, x, out, net_call, net = structc_forward(name)
        s_med, s_best = timed(call)
        before = plan_calls(net)
        n_med, _ = timed(net_call)
        path = "C plan" if plan_calls(net) > before else "Python path"     # which one net(x=x) took
        line = (f"{name:7s} structc {s_med * 1e6:6.1f} us (best {s_best * 1e6:.1f}), "
                f"net(x=x) {n_med * 1e6:6.1f} us ({path})")
        if not args.no_tvm:
            import tvm
            _, names = tvm_module(name)
            fn = tvm_build(name, args.work_dir, 0, tvm_weights(name, params, names))
            xt = tvm.runtime.tensor(x)
            np.testing.assert_allclose(fn(xt).numpy(), out, rtol=1e-3, atol=1e-5)
            t_med, t_best = timed(lambda: fn(xt))
            # again, so a change of load between the two hits both
            s2, _ = timed(call)
            line += (f"  TVM {t_med * 1e6:6.1f} us (best {t_best * 1e6:.1f})"
                     f"  structc/TVM {min(s_med, s2) / t_med:.2f}, net(x=x)/TVM {n_med / t_med:.2f}")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
