"""Checks for ops and models: what the test suite runs, usable when adding an op.

    check_vjp(op, sample)          VJP vs float64 central differences
    check_forward(op, sample)      native forward vs the numpy reference
    check_native_grads(op, sample) native gradients vs the interpreter's
    check_model_grads(mdef)        whole-model gradient vs finite differences
    poison_workspace(net)          NaN bytes in a Net's workspace, for a fuzzer's call again
    check_op(op_or_name)           all three over the op's samples (for users' ops)

Gradients are compared along random directions, as JAX's `check_grads`
does: with f(x) = <u, op(x)>, the directional derivative <∇f, v> must match
(f(x + hv) - f(x - hv)) / 2h.
"""
from __future__ import annotations

import re
import warnings

import numpy as np

from .autodiff import differentiate
from .build import InputSpec, ModelDef, ParamSpec
from .errors import GradientWarning
from .graph import Builder, Graph, format_graph
from .interp import evaluate
from .ops import REGISTRY
from .ops.base import Op, Sample
from .types import TensorType


def op_graph(op: Op, sample: Sample, arrays: list[np.ndarray]) -> ModelDef:
    """A model computing `op` on parameters (float operands) and inputs
    (integer operands), with output `out` and loss sum(out * u) for an input u."""
    g = Graph(f"test_{op.name}")
    b = Builder(g)
    inputs, params, operands = {}, {}, []
    fixed = sample.fixed()
    for k, a in enumerate(arrays):
        if a.dtype.kind == "f" and k in fixed:
            t = TensorType(a.shape, "f32")
            nid = g.add(REGISTRY["input"], (), {"name": f"i{k}", "kind": "input", "type": t, "classes": 0}, type=t)
            g.inputs[f"i{k}"] = nid
            inputs[f"i{k}"] = InputSpec(f"i{k}", "input", t)
        elif a.dtype.kind == "f":
            t = TensorType(a.shape, "f32")
            nid = g.add(REGISTRY["param"], (), {"name": f"p{k}", "type": t, "init": ("zeros", ())}, type=t)
            g.params[f"p{k}"] = nid
            params[f"p{k}"] = ParamSpec(f"p{k}", t, ("zeros", ()))
        else:
            classes = int(a.max()) + 2 if a.size else 2
            for spec in sample.inputs:
                if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], tuple):
                    classes = spec[1][1]
            t = TensorType(a.shape, "i32")
            nid = g.add(REGISTRY["input"], (), {"name": f"i{k}", "kind": "input", "type": t, "classes": classes},
                        type=t)
            g.inputs[f"i{k}"] = nid
            inputs[f"i{k}"] = InputSpec(f"i{k}", "input", t, classes)
        operands.append(b.value(nid))
    out = b.apply(op.name, *operands, **sample.attrs)
    ut = out.type if out.type.is_float else TensorType(out.type.shape, "f32")
    u = g.add(REGISTRY["input"], (), {"name": "u", "kind": "target", "type": ut, "classes": 0}, type=ut)
    g.inputs["u"] = u
    inputs["u"] = InputSpec("u", "target", ut)
    loss = b.sum(out * b.value(u), axes=tuple(range(len(out.shape))))
    g.outputs = {"out": out.id, "loss": loss.id}
    return ModelDef(g.name, g, inputs, params, [], True)


def _feeds(mdef: ModelDef, arrays, u):
    params = {f"p{k}": a for k, a in enumerate(arrays) if f"p{k}" in mdef.params}
    inputs = {f"i{k}": a for k, a in enumerate(arrays) if f"i{k}" in mdef.inputs}
    inputs["u"] = u
    return inputs, params


def directional_check(f, grad: dict, point: dict, rng, h: float = 1e-6, rtol: float = 1e-5,
                      atol: float = 1e-7, what: str = "") -> None:
    """Compare <grad, v> with central differences of f along a random v."""
    v = {k: rng.normal(size=np.shape(x)) for k, x in point.items()}
    plus = {k: point[k] + h * v[k] for k in point}
    minus = {k: point[k] - h * v[k] for k in point}
    numeric = (f(plus) - f(minus)) / (2 * h)
    analytic = sum(float(np.sum(grad[k] * v[k])) for k in point)
    if not np.isclose(analytic, numeric, rtol=rtol, atol=atol):
        raise AssertionError(f"{what}: gradient mismatch: autodiff <g, v> = {analytic!r}, "
                             f"finite differences = {numeric!r}")


def check_vjp(op: Op, sample: Sample, seed: int = 0) -> None:
    """The op's VJP (through the interpreter, float64) against central differences."""
    rng = np.random.default_rng(seed)
    arrays = sample.arrays(rng)
    mdef = op_graph(op, sample, arrays)
    out_t = mdef.graph.nodes[mdef.graph.outputs["out"]].type
    u = rng.normal(size=tuple(out_t.shape))
    inputs, params = _feeds(mdef, arrays, u)
    if not params:
        return
    train = differentiate(mdef.graph)
    grads = evaluate(train, inputs, params, outputs=[f"grad:{k}" for k in params])
    grads = {k: grads[f"grad:{k}"] for k in params}

    def f(p):
        return float(evaluate(mdef.graph, inputs, p, outputs=["loss"])["loss"])
    directional_check(f, grads, params, rng, what=f"{op.name}{sample.attrs or ''}")


def op_net(op: Op, sample: Sample, arrays, compiled: dict | None = None):
    """(`op_graph`'s model, a fresh `Net` of it). `compiled`: artifacts made
    before, by what the model is (the op, the sample's attributes and the
    printed graph, which holds every operand's type and an integer operand's
    classes), so that checks of one op net in turn compile it once; only for
    callers that do not change the compiler in between (a monkeypatch)."""
    from .compiler import compile_model
    from .model import Net
    from .native import JitModule, host_target
    mdef = op_graph(op, sample, arrays)
    key = (op.name, repr(sample.attrs), format_graph(mdef.graph))
    art = None if compiled is None else compiled.get(key)
    if art is None:
        with warnings.catch_warnings():     # integer or fixed operands only: no parameter, as meant
            warnings.filterwarnings("ignore", rf"model {re.escape(mdef.name)} has no parameter that training changes",
                                    GradientWarning)
            art = compile_model(mdef)
        if compiled is not None:
            compiled[key] = art
    net = Net(art.meta, JitModule(art.object, host_target()))
    return mdef, net


def check_native(op: Op, sample: Sample, seed: int = 0, rtol: float = 2e-4, atol: float = 2e-5,
                 compiled: dict | None = None) -> None:
    """Native forward equals the numpy reference; native gradients equal the
    interpreter's. `compiled`: as `op_net` takes it."""
    rng = np.random.default_rng(seed)
    arrays = sample.arrays(rng)
    arrays = [a.astype(np.float32) if a.dtype.kind == "f" else a for a in arrays]
    mdef, net = op_net(op, sample, arrays, compiled)
    out_t = mdef.graph.nodes[mdef.graph.outputs["out"]].type
    u = rng.normal(size=tuple(out_t.shape)).astype(np.float32)
    inputs, params = _feeds(mdef, arrays, u)
    for k, a in params.items():
        net.params[k][...] = a
    expected = op.reference(*arrays, **sample.attrs)
    fwd_inputs = {k: v for k, v in inputs.items() if k != "u"}
    got = net.forward(**fwd_inputs)["out"]
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol,
                               err_msg=f"{op.name}{sample.attrs or ''}: native forward")
    if not params:
        return
    loss, grads = net.grad(**inputs)
    train = differentiate(mdef.graph)
    ref = evaluate(train, inputs, params, outputs=["loss"] + [f"grad:{k}" for k in params])
    np.testing.assert_allclose(loss, ref["loss"], rtol=rtol, atol=atol * max(1, out_t.size().coef),
                               err_msg=f"{op.name}: native loss")
    for k in params:
        np.testing.assert_allclose(grads[k], ref[f"grad:{k}"], rtol=rtol, atol=atol,
                                   err_msg=f"{op.name}{sample.attrs or ''}: native gradient of operand {k}")


def check_model_grads(mdef: ModelDef, inputs: dict, params: dict, seed: int = 0, h: float = 1e-6) -> None:
    """The whole model's gradient (interpreter, float64) against central differences."""
    rng = np.random.default_rng(seed)
    train = differentiate(mdef.graph)
    p64 = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    grads = evaluate(train, inputs, p64, outputs=[f"grad:{k}" for k in p64])
    grads = {k: grads[f"grad:{k}"] for k in p64}

    def f(p):
        return float(evaluate(mdef.graph, inputs, p, outputs=["loss"])["loss"])
    directional_check(f, grads, p64, rng, h=h, what=mdef.name)


def check_op(op, samples=None, seed: int = 0) -> None:
    """Run an op (a registered name, an `Op` subclass or instance) through the
    checks structc's own ops pass, on `samples` (default: `op.samples()`):
    its VJP (float64, interpreted) against central differences, the native
    forward against its numpy `reference`, the native gradients against the
    interpreter's. Raises AssertionError naming the op, the sample and the check."""
    op = _resolve_op(op)
    samples = list(op.samples() if samples is None else samples)
    if not samples:
        raise AssertionError(f"op {op.name!r} has no samples to check: define samples() or pass samples=[Sample(...)]")
    for k, sample in enumerate(samples):
        for what, check in (("shape rule vs reference", check_shape), ("VJP vs finite differences", check_vjp),
                            ("native vs reference and interpreter", check_native)):
            try:
                check(op, sample, seed=seed)
            except AssertionError as e:
                raise AssertionError(f"check_op({op.name!r}), sample {k} {sample.inputs} {sample.attrs or ''}: "
                                     f"{what} failed: {e}") from None


def check_shape(op: Op, sample: Sample, seed: int = 0) -> None:
    """The shape rule's result is the shape of the numpy reference's (a
    broadcasting comparison would hide a reference of the wrong shape)."""
    arrays = sample.arrays(np.random.default_rng(seed))
    types = [TensorType(a.shape, "f32" if a.dtype.kind == "f" else "i32") for a in arrays]
    want = tuple(op.infer(*types, **sample.attrs).shape)
    got = np.shape(op.reference(*arrays, **sample.attrs))
    if got != want:
        raise AssertionError(f"the shape rule gives {list(want)}, the reference returns {list(got)}")


def _resolve_op(op) -> Op:
    if isinstance(op, str):
        if op not in REGISTRY:
            raise ValueError(f"no op named {op!r} is registered (import the module that defines it first)")
        return REGISTRY[op]
    if isinstance(op, type) and issubclass(op, Op):
        registered = REGISTRY.get(op.name)
        if type(registered) is not op:
            raise ValueError(f"op class {op.__qualname__} is not registered: give it a `name` "
                             f"(or call structc.ops.register_op) before checking it")
        return registered
    if isinstance(op, Op):
        if REGISTRY.get(op.name) is not op and type(REGISTRY.get(op.name)) is not type(op):
            raise ValueError(f"op {op!r} is not the registered {op.name!r}: register it first")
        return op
    raise TypeError(f"check_op takes an op name, an Op subclass or an Op instance, got {op!r}")


def random_feed(mdef: ModelDef, n: int, rng) -> dict:
    """Random values for the dense inputs of a model at batch `n`: class labels in
    range, floats from a standard normal (structured inputs have their own makers)."""
    feed = {}
    for spec in mdef.inputs.values():
        shape = tuple(n if isinstance(d, str) else d for d in spec.type.shape)
        if spec.classes:
            feed[spec.name] = rng.integers(0, spec.classes, shape).astype(np.int32)
        else:
            feed[spec.name] = rng.normal(size=shape).astype(np.float32)
    return feed


def check_held_out(net, held_out: Graph, given: dict, arrays: dict, params: dict, close, where: str):
    """A fuzzer's check of `net`'s evaluation entry called with `given`: its loss and each
    loss term against the interpreter's run of the `held_out` graph on `arrays` (the same
    inputs, as arrays) with `params`, compared by the fuzzer's `close(got, want, what)`.
    Returns the entry's outputs and the interpreter's results, whose outputs each fuzzer
    checks its own way."""
    outs, loss, terms = net.evaluate_terms(**given)
    evaluated = evaluate(held_out, arrays, params)
    close(loss, evaluated["loss"], f"{where}: the evaluation entry's loss")
    want = [evaluated[k] for k in sorted(evaluated, key=str) if k.startswith("loss_term")]
    assert len(terms or []) == len(want), f"{where}: loss terms {terms}, expected {want}"
    for j, (got, expected) in enumerate(zip(terms or [], want)):
        close(got, expected, f"{where}: the evaluation entry's loss term {j}")
    return outs, evaluated


def poison_workspace(net, byte: int = 0xFF) -> None:
    """Fill `net`'s workspace (the memory of its intermediate values, kept between calls)
    with `byte`s (0xFF: every float a NaN), so that a kernel reading memory no kernel of
    the call wrote (past a buffer's end, lanes it masks out only by multiplying by zero)
    makes NaNs, where the zeros or finite values left there would hide it. A fuzzer then
    calls the net again: its results must be the first call's bits."""
    if net._workspace_buf is not None:
        net._workspace_buf[...] = byte


def thread_bits(script: str, items: list, tests_dir) -> dict:
    """Run a fuzzer's `script` (it reads `items` as JSON on stdin, its tests folder as
    argv[1], and prints a JSON line last) in a process whose pool takes every kernel of
    more than one task (the work thresholds at 0, no back-off or adapting), so that 1
    and 2 threads can be compared bit for bit; what it printed."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {**os.environ, "STRUCTC_SERIAL_WORK": "0", "STRUCTC_ENTRY_SERIAL_WORK": "0",
           "STRUCTC_BACKOFF": "0", "STRUCTC_ADAPT": "0"}
    root = Path(tests_dir).resolve().parent
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, "-c", script, str(tests_dir)],
                          input=json.dumps(items), capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
