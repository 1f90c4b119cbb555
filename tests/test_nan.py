"""NaN and ±inf propagate as in numpy, through every registered op.

Each op's samples (as in test_ops.py) are run natively with NaN, +inf and
-inf written into their float operands; the forward must match the numpy
reference in float32 (NaN where numpy has NaN, the same infinities, finite
values close), and the native gradients must match the interpreter's (which
evaluates the VJP graph with the numpy references) the same way.
"""
import numpy as np
import pytest

from structc.autodiff import differentiate
from structc.interp import evaluate
from structc.ops import REGISTRY
from structc.ops.base import Sample
from structc.testing import _feeds, op_net
from test_ops import CASES, _id

SPECIALS = {"nan": [np.nan], "inf": [np.inf, -np.inf], "mixed": [np.nan, np.inf, -np.inf]}

# Ops compared more loosely, and why: non-finite exactly where numpy is
# non-finite, finite values close.
LOOSE = {
    # the softmax gradient times an infinite delta: e·(g/s) - g for the label's
    # column is inf - inf (NaN) natively, (p - 1)·g (-inf) in numpy. The delta
    # is the loss seed in a model, never infinite unless the loss already is.
    "softmax_ce_grad": "an infinite delta gives NaN or ±inf",
    "cross_entropy_rows_grad": "an infinite delta gives NaN or ±inf",
}

# Ops whose specials go into some operands only, and why.
ONLY_INTO = {
    # a non-finite weight (or delta) over zero padding or dilation holes: numpy
    # multiplies the zeros (0·inf = NaN), the native kernels skip some of them.
    # Padding is not data, so either answer is defensible; non-finite data is
    # what the test is about.
    "conv2d": {0},
    "conv2d_kernel_grad": {0},
    "conv2d_kernel_grad_parts": {0},
}


def inject(arrays, values, rng, only=None):
    """Copies of the float operands (those in `only`, if given) with `values`
    written at a few positions; an operand of size > 1 keeps most of its finite entries."""
    out = []
    for k, a in enumerate(arrays):
        a = a.copy()
        if a.dtype.kind == "f" and (only is None or k in only):
            flat = a.reshape(-1)
            count = max(1, flat.size // 5) if flat.size > 1 else 1
            at = rng.choice(flat.size, size=count, replace=False)
            flat[at] = [values[(j + k) % len(values)] for j in range(count)]
        out.append(a)
    return out


def assert_same_specials(got, expected, what, rtol=2e-4, atol=2e-5, loose=False):
    """NaN positions equal, infinities equal (with sign), finite values close.
    `loose`: only the non-finite positions must be equal."""
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    if loose:
        bad = np.isfinite(got) != np.isfinite(expected)
        assert not bad.any(), (f"{what}: non-finite (NaN or inf) at {np.argwhere(bad)[:5].tolist()} differs "
                               f"(native {got[bad][:5]}, numpy {expected[bad][:5]})")
        finite = np.isfinite(expected)
        np.testing.assert_allclose(got[finite], expected[finite], rtol=rtol, atol=atol, err_msg=what)
        return
    nan_got, nan_exp = np.isnan(got), np.isnan(expected)
    assert np.array_equal(nan_got, nan_exp), (
        f"{what}: NaN at {np.argwhere(nan_got != nan_exp)[:5].tolist()} differs "
        f"(native {got[nan_got != nan_exp][:5]}, numpy {expected[nan_got != nan_exp][:5]})")
    inf_got, inf_exp = np.isinf(got), np.isinf(expected)
    diff = (inf_got != inf_exp) | (inf_exp & (got != expected))
    assert not diff.any(), (f"{what}: infinities differ at {np.argwhere(diff)[:5].tolist()} "
                            f"(native {got[diff][:5]}, numpy {expected[diff][:5]})")
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=rtol, atol=atol, err_msg=what)


def reference_f32(op, arrays, attrs):
    """The numpy reference on the float32 operands, rounded to float32 (so an
    overflow is the float32 infinity the native code must give too)."""
    with np.errstate(all="ignore"):
        return np.asarray(op.reference(*arrays, **attrs), dtype=np.float64).astype(np.float32)


def check_specials(op, sample: Sample, special: str, seed: int = 0, compiled: dict | None = None):
    rng = np.random.default_rng(seed)
    arrays = [a.astype(np.float32) if a.dtype.kind == "f" else a for a in sample.arrays(rng)]
    arrays = inject(arrays, SPECIALS[special], rng, ONLY_INTO.get(op.name))
    mdef, net = op_net(op, sample, arrays, compiled)
    out_t = mdef.graph.nodes[mdef.graph.outputs["out"]].type
    u = rng.normal(size=tuple(out_t.shape)).astype(np.float32)
    inputs, params = _feeds(mdef, arrays, u)
    for k, a in params.items():
        net.params[k][...] = a
    what = f"{op.name}{sample.attrs or ''} with {special}"
    loose = op.name in LOOSE
    got = net.forward(**{k: v for k, v in inputs.items() if k != "u"})["out"]
    assert_same_specials(got, reference_f32(op, arrays, sample.attrs), f"{what}: forward", loose=loose)
    if not params:
        return
    _, grads = net.grad(**inputs)
    with np.errstate(all="ignore"):
        ref = evaluate(differentiate(mdef.graph), inputs, params, outputs=[f"grad:{k}" for k in params])
    for k in params:
        expected = np.asarray(ref[f"grad:{k}"], dtype=np.float64).astype(np.float32)
        assert_same_specials(grads[k], expected, f"{what}: gradient of {k}", loose=loose)


@pytest.mark.slow
@pytest.mark.parametrize("special", sorted(SPECIALS))
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_specials_propagate_as_in_numpy(case, special, op_artifacts):
    name, _, sample = case
    check_specials(REGISTRY[name], sample, special, compiled=op_artifacts)


def test_the_check_catches_a_kernel_that_drops_nan(monkeypatch):
    """The old relu (select(x > 0, x, 0)) turns NaN into 0: the check must fail."""
    op = REGISTRY["relu"]
    monkeypatch.setattr(type(op), "emit", lambda self, cg, x: cg.select(cg.gt(x, cg.const(0.0, x)), x,
                                                                        cg.const(0.0, x)))
    with pytest.raises(AssertionError, match="NaN"):
        check_specials(op, Sample((((3, 5), "away"),)), "nan")


def run(source: str, **inputs) -> dict:
    import structc
    out = structc.compile(source)(**inputs)
    return out if isinstance(out, dict) else {"y": out}


def test_relu_and_maximum_of_nan_are_nan():
    x = np.array([np.nan, -1.0, 2.0, np.inf, -np.inf], np.float32)
    out = run("model M { input x: f32[N]\n output r = relu(x)\n output m = maximum(x, x * 0.0 + 1.0) }", x=x)
    np.testing.assert_array_equal(out["r"], [np.nan, 0, 2, np.inf, 0])
    np.testing.assert_array_equal(out["m"][1:3], [1, 2])
    assert np.isnan(out["m"][0]) and np.isnan(out["m"][3:]).all()   # inf * 0 is NaN


def test_an_all_nan_batch_gives_a_nan_loss_and_nan_gradients():
    """The silent case of issue 9: relu and the softmax's max used to turn NaN into finite numbers."""
    import structc
    net = structc.compile("model M { input x: f32[N, 4]\n target y: class[N] of 3\n"
                          " loss cross_entropy(dense(dense(x, 5) |> relu, 3), y) }")
    x = np.full((6, 4), np.nan, np.float32)
    loss, grads = net.grad(x=x, y=np.zeros(6, np.int32))
    assert np.isnan(loss)
    assert all(np.isnan(g).all() for g in grads.values()), {k: g for k, g in grads.items()}


def test_relu_gradient_at_a_nan_input_is_nan_not_zero():
    import structc
    net = structc.compile("model M { input x: f32[N, 3]\n param w: f32[3] = zeros\n"
                          " loss sum(relu(x + w)) }")
    x = np.array([[np.nan, 1.0, -1.0]], np.float32)
    _, grads = net.grad(x=x)
    assert np.isnan(grads["w"][0]) and grads["w"][1] == 1.0 and grads["w"][2] == 0.0


@pytest.mark.parametrize("x, expected", [(1e-45, -103.27893), (1e-40, -92.10340), (1.1754944e-38, -87.33655),
                                         (0.0, -np.inf), (np.inf, np.inf)])
def test_log_of_subnormal_numbers_is_not_flushed(x, expected):
    """Issue 15: log(1e-45) was -88.03 (the smallest normal float's log)."""
    got = run("model M { input x: f32[N]\n output y = log(x) }", x=np.array([x], np.float32))["y"][0]
    assert got == pytest.approx(expected, rel=1e-6)


def test_exp_overflows_to_inf_and_underflows_to_zero():
    x = np.array([89.0, 1000.0, np.inf, -np.inf, -1000.0, 88.0], np.float32)
    got = run("model M { input x: f32[N]\n output y = exp(x) }", x=x)["y"]
    np.testing.assert_array_equal(got[:5], [np.inf, np.inf, np.inf, 0.0, 0.0])
    assert got[5] == pytest.approx(np.exp(np.float32(88.0)), rel=1e-6)


def test_max_aggregation_and_readout_propagate_nan():
    """A NaN among a node's messages (or a graph's nodes) wins the max, as in numpy."""
    import structc
    from structc.graphs import Graph
    # graphs refuse NaN features, so the NaN is made inside: sqrt(-1)
    net = structc.compile("model R { input g: graph(features=2)\n h = sqrt(g.x)\n"
                          " output a = max(h over g.edges)\n output r = max(h over g.nodes) }")
    # edges 0->2, 1->2, 0->1: node 2 gets h0 and then h1 (the NaN comes second,
    # after a finite value has been the maximum), node 1 gets h0
    x = [[9.0, 1.0], [-1.0, 0.0], [0.0, 0.0]]
    out = net(g=Graph([[0, 1, 0], [2, 2, 1]], num_nodes=3, x=x))
    np.testing.assert_array_equal(out["a"], [[0, 0], [3, 1], [np.nan, 1]])
    np.testing.assert_array_equal(out["r"], [[np.nan, 1]])


TINY = np.float32(2e-38)        # normal; half of it is not


@pytest.mark.parametrize("threads", [1, 2])
def test_results_below_the_smallest_normal_float_are_zero(threads):
    """Native code flushes subnormal results to 0 (as XLA does on CPU), on the
    caller and on the pool's workers alike: underflowing values must not turn
    every later instruction into a microcode assist. numpy, run by the same
    thread before and after the call, keeps its subnormals."""
    import structc
    from structc import _runtime
    net = structc.compile("model M { input x: f32[N]\n output y = x * 0.5 }")
    x = np.full(1 << 22, TINY, np.float32)            # enough work for the pool
    assert TINY * np.float32(0.5) > 0
    was = structc.get_num_threads()
    structc.set_num_threads(threads)
    try:
        before = _runtime.handoffs()
        y = net(x=x)
        pooled = _runtime.handoffs() - before
    finally:
        structc.set_num_threads(was)
    assert (pooled > 0) == (threads > 1)
    np.testing.assert_array_equal(y, 0.0)
    assert TINY * np.float32(0.5) > 0, "the flush leaked into the caller's numpy"
    np.testing.assert_array_equal(net(x=np.array([4 * TINY], np.float32)), [2 * TINY])   # normal: exact


def test_subnormal_inputs_are_read_as_they_are():
    """Flush-to-zero only: a subnormal input is not taken for 0 (no DAZ)."""
    x = np.array([1e-40, -3e-42], np.float32)
    got = run("model M { input x: f32[N]\n output y = x * 65536.0 }", x=x)["y"]
    np.testing.assert_array_equal(got, x * np.float32(65536.0))
