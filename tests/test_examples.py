"""Every example model: whole-model gradient check (float64 finite differences)
and native results equal to the interpreter's."""
from pathlib import Path

import numpy as np
import pytest

import structc
from structc.autodiff import differentiate
from structc.build import build_model
from structc.compiler import forward_graph
from structc.interp import evaluate
from structc.syntax import parse
from structc.testing import check_model_grads

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.snet"))
MODELS = [(p, name) for p in EXAMPLES for name in parse(p.read_text(), str(p)).model_names]


def random_feed(mdef, n, rng):
    """Random values for the dense inputs of a model (structured inputs are
    covered by their own tests)."""
    feed = {}
    for spec in mdef.inputs.values():
        shape = tuple(n if isinstance(d, str) else d for d in spec.type.shape)
        if spec.classes:
            feed[spec.name] = rng.integers(0, spec.classes, shape).astype(np.int32)
        else:
            feed[spec.name] = rng.normal(size=shape).astype(np.float32)
    return feed


def fix_dropout(mdef, seed: int = 0, step: int = 1):
    """Dropout's masks at the counters a Net compiled with `seed` draws at `step`
    (`grad` before any update: step 1), so the interpreter evaluates them too."""
    key = np.random.SeedSequence(seed).generate_state(2, np.uint32)
    for node in mdef.graph.nodes.values():
        if node.op.name == "dropout_mask":
            node.attrs["counters"] = (int(key[0]), int(key[1]), step)
    return mdef


def dense_only(mdef):
    return all(s.type.dtype in ("f32", "i32") and s.kind in ("input", "target") for s in mdef.inputs.values())


@pytest.mark.slow
@pytest.mark.parametrize("path, name", MODELS, ids=lambda v: v if isinstance(v, str) else v.stem)
def test_example_gradient_matches_finite_differences(path, name):
    mdef = build_model(parse(path.read_text(), str(path)), name)
    if not mdef.has_loss or not dense_only(mdef):
        pytest.skip("no loss, or structured inputs (tested elsewhere)")
    if any(n.attrs.get("grad") == "ste" for n in mdef.graph.nodes.values()):
        pytest.skip("a straight-through gradient is not the derivative (tested in test_gradflow)")
    rng = np.random.default_rng(0)
    net = structc.compile(path, name)
    feed = random_feed(mdef, 3, rng)
    check_model_grads(fix_dropout(mdef), feed, {k: v.copy() for k, v in net.params.items()})


@pytest.mark.slow
@pytest.mark.parametrize("path, name", MODELS, ids=lambda v: v if isinstance(v, str) else v.stem)
def test_example_native_matches_interpreter(path, name):
    mdef = build_model(parse(path.read_text(), str(path)), name)
    if not dense_only(mdef):
        pytest.skip("structured inputs (tested elsewhere)")
    rng = np.random.default_rng(1)
    net = structc.compile(path, name)
    feed = random_feed(mdef, 5, rng)
    params = {k: v.copy() for k, v in net.params.items()}
    forward_inputs = {k: v for k, v in feed.items() if mdef.inputs[k].kind == "input"}
    got = net.forward(**forward_inputs)
    want = evaluate(forward_graph(mdef), feed, params, outputs=list(got))   # inference forms (batch norm)
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-3, atol=1e-5, err_msg=k)
    if mdef.has_loss:
        loss, grads = net.grad(**feed)
        ref = evaluate(differentiate(fix_dropout(mdef).graph), feed, params)
        assert loss == pytest.approx(float(ref["loss"]), rel=1e-4, abs=1e-6)
        for k in grads:
            np.testing.assert_allclose(grads[k], ref[f"grad:{k}"], rtol=1e-3, atol=1e-5, err_msg=k)
