"""The activations and elementwise ops of issue 11 item 5, from the language:
options, numpy's meaning, gradients, and the names they share with graph
aggregation (`max(... over g.edges)`). The registry sweep (test_ops.py,
test_nan.py) checks each op alone."""
import math
import warnings

import numpy as np
import pytest

import structc
from structc.autodiff import blocked_params
from structc.build import build_model
from structc.errors import GradientWarning, SnetError
from structc.syntax import parse
from structc.testing import check_model_grads

RNG = np.random.default_rng(7)


def run(body: str, x: np.ndarray, inputs: str = "input x: f32[4, 6]") -> np.ndarray:
    net = structc.compile(f"model M {{\n  {inputs}\n  {body}\n}}\n", cache=False)
    out = net(x=x)
    return out if not isinstance(out, dict) else out


def x46():
    return RNG.normal(size=(4, 6)).astype(np.float32)


@pytest.mark.parametrize("body, expected", [
    ("output y = leaky_relu(x)", lambda x: np.where(x > 0, x, 0.01 * x)),
    ("output y = leaky_relu(x, alpha=0.2)", lambda x: np.where(x > 0, x, 0.2 * x)),
    ("output y = elu(x, alpha=0.5)", lambda x: np.where(x > 0, x, 0.5 * np.expm1(x))),
    ("output y = x |> gelu", lambda x: x * 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))),
    ("output y = softplus(x * 30.0)", lambda x: np.logaddexp(0, x.astype(np.float64) * 30)),
    ("output y = clip(x, lo=-0.5, hi=0.25)", lambda x: np.clip(x, -0.5, 0.25)),
    ("output y = clip(x, -1, 0.5)", lambda x: np.clip(x, -1, 0.5)),
    ("output y = where(greater(x, 0.0), x, 0.0)", lambda x: np.where(x > 0, x, 0)),
    ("output y = where(greater_equal(x, 0.1), 1.0, x)", lambda x: np.where(x >= 0.1, 1, x)),
    ("output y = less(x, 0.0) + equal(x, x) + not_equal(x, 0.0) + less_equal(x, 0.0)",
     lambda x: (x < 0) * 1.0 + (x == x) + (x != 0) + (x <= 0)),
    ("output y = max(x, axes=(1,))", lambda x: x.max(axis=1)),
    ("output y = min(x, axes=(0,), keepdims=true)", lambda x: x.min(axis=0, keepdims=True)),
    ("output y = max(x)", lambda x: x.max()),
    ("output y = log_softmax(x)", lambda x: x - np.log(np.exp(x).sum(1, keepdims=True))),
    ("output y = log_softmax(x * 100.0, axis=0)",
     lambda x: 100 * x - np.max(100 * x, 0) - np.log(np.exp(100 * x - np.max(100 * x, 0)).sum(0))),
])
def test_language_ops_match_numpy(body, expected):
    x = x46()
    got = run(body, x)
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), expected(x.astype(np.float64)),
                               rtol=2e-5, atol=2e-5)


def test_argmax_gives_int32_positions_as_numpy():
    x = x46()
    x[1, 2] = x[1, 4] = 9.0                      # a tie: the first one
    x[3, 5] = np.nan                             # a NaN wins
    got = run("output y = argmax(x)", x)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    np.testing.assert_array_equal(run("output y = argmax(x, axis=0)", x), np.argmax(x, axis=0))


def test_argmax_feeding_only_an_output_does_not_warn():
    source = """model C {
  input  x: f32[N, 4]
  target y: class[N] of 3
  z = dense(x, 3)
  output guess = argmax(z)
  loss cross_entropy(z, y)
}
"""
    assert not blocked_params(build_model(parse(source, "c.snet")).graph)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        net = structc.compile(source, cache=False)
    x = RNG.normal(size=(5, 4)).astype(np.float32)
    out = net(x=x)
    guess = out["guess"] if isinstance(out, dict) else out
    assert guess.dtype == np.int32 and guess.shape == (5,)


def test_max_over_edges_is_still_graph_aggregation():
    from structc.graphs import Graph
    source = """model G {
  input g: graph(features=2)
  output y = max(g.x[g.src] over g.edges) + max(g.x, axes=(0,))
}
"""
    net = structc.compile(source, cache=False)
    x = np.array([[1, 2], [3, -1], [0, 5]], np.float32)
    g = Graph(np.array([[0, 1, 2], [2, 2, 0]]), num_nodes=3, x=x)
    y = np.asarray(net(g=g)) - x.max(axis=0)          # the per-feature maximum over all nodes
    np.testing.assert_array_equal(y[2], [3, 2])
    np.testing.assert_array_equal(y[0], [0, 5])


def test_max_reduction_shares_the_gradient_among_ties():
    source = """model T {
  input x: f32[2, 3]
  param w: f32[2, 3] = zeros
  loss sum(max(x + w, axes=(1,)))
}
"""
    net = structc.compile(source, cache=False)
    x = np.array([[1, 5, 5], [2, 0, 1]], np.float32)
    _, grads = net.grad(x=x)
    np.testing.assert_allclose(grads["w"], [[0, 0.5, 0.5], [1, 0, 0]])


LAYER_GRADS = """model L {
  input x: f32[3, 5]
  param w: f32[3, 5] = zeros
  loss sum(log_softmax(x + w) * x) + sum(where(greater(x, 0.0), elu(x + w), gelu(x + w)))
    + sum(min(x * w, axes=(0,))) + sum(clip(x + w, lo=-0.5, hi=0.5) * x)
}
"""


def test_layer_gradients_match_finite_differences():
    mdef = build_model(parse(LAYER_GRADS, "l.snet"))
    x = RNG.normal(size=(3, 5))
    x = np.where(np.abs(np.abs(x) - 0.5) < 0.05, x + 0.2, x)      # clear of clip's kinks
    w = RNG.normal(size=(3, 5)) * 0.1
    check_model_grads(mdef, {"x": x}, {"w": w})


def test_softplus_does_not_overflow():
    x = np.array([[-200, -30, 0, 30, 200, 88.8]], np.float32)
    got = run("output y = softplus(x)", x, inputs="input x: f32[1, 6]")
    np.testing.assert_allclose(got, np.logaddexp(0, x.astype(np.float64)), rtol=1e-6, atol=1e-30)


def test_exp_is_finite_up_to_the_largest_float():
    # e^x stays below float32's largest value up to x = 88.7228; from x = 88.38 on,
    # the reduction's 2^n is 2^128, which float32 has not: that must not turn into inf
    x = np.concatenate([np.linspace(87.0, 88.72283, 62), [88.73, np.inf]]).astype(np.float32)[None]
    got = run("output y = exp(x)", x, inputs="input x: f32[1, 64]")[0]
    with np.errstate(over="ignore"):
        expected = np.exp(x[0].astype(np.float64))
    np.testing.assert_allclose(got[:62], expected[:62], rtol=3e-7)
    assert np.isfinite(got[:62]).all() and (got[62:] == np.inf).all()


def test_exp_sigmoid_tanh_and_elu_stay_within_a_few_ulps_over_their_whole_range():
    """The exponential's 2^n comes from the bits of the rounded x log2 e (no
    conversion), sigmoid's and tanh's exponentials are clamped below 2^128 (no
    fix-up for it), and elu's at 0 (its negative side alone is used): over every
    binade of float32 they stay within their ulps of float64, and where
    sigmoid's value is below float32's normal range it is flushed to 0 (as every
    entry flushes)."""
    rng = np.random.default_rng(5)
    x = np.concatenate([np.linspace(-90, 90, 36001), rng.normal(scale=20, size=4000),
                        np.geomspace(1e-30, 90, 4000), -np.geomspace(1e-30, 90, 4000),
                        np.linspace(88.3, 88.8, 1000), np.linspace(-88.8, -86.9, 1047)]).astype(np.float32)
    x = x.reshape(-1, 64)
    src = (f"model M {{\n  input x: f32[{x.shape[0]}, 64]\n  output e = exp(x)\n  output s = sigmoid(x)\n"
           "  output t = tanh(x)\n  output u = elu(x)\n}\n")
    got = structc.compile(src, cache=False)(x=x)
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore"):
        want = {"e": np.exp(x64), "s": 1 / (1 + np.exp(-x64)), "t": np.tanh(x64),
                "u": np.where(x64 > 0, x64, np.expm1(np.minimum(x64, 0)))}
    tiny = np.finfo(np.float32).tiny
    for name, bound in (("e", 1.5), ("s", 2.5), ("t", 1.5), ("u", 1.5)):
        normal = (np.abs(want[name]) >= tiny) & (np.abs(want[name]) <= np.finfo(np.float32).max)
        ulp = np.spacing(np.abs(want[name][normal]).astype(np.float32)).astype(np.float64)
        err = np.abs(got[name][normal] - want[name][normal]) / ulp
        assert err.max() <= bound, (name, x[normal][err.argmax()], err.max())
    assert (got["s"][want["s"] < tiny] == 0).all() and (want["s"] < tiny).sum() > 900
    assert (got["e"][want["e"] < tiny] == 0).all() and (got["e"][x > 88.72283] == np.inf).all()


@pytest.mark.parametrize("classes", [5, 37])
def test_softmax_is_exact_to_a_few_ulps_down_to_the_smallest_normal_float(classes):
    """Softmax's and cross-entropy's exponentials take x - max(x) <= 0 (`CG.exp_nonpositive`,
    without exp's handling of large x): a probability below float32's normal range is 0
    (flushed), one above it within a few ulps of float64 (small and large class counts
    take different kernels)."""
    rng = np.random.default_rng(7)
    gaps = np.concatenate([np.linspace(0, 90, 64), [87.0, 87.3, 87.34, 87.4, 88.0, 1e4, np.inf]])
    # row r: gaps r, r + 13, r + 26, ... below a max whose place and size vary
    at = (np.arange(len(gaps))[:, None] + 13 * np.arange(classes)) % len(gaps)
    z = (-gaps[at] + rng.uniform(-50, 50, (len(gaps), 1))).astype(np.float32)
    got = run("output p = softmax(x)", z, inputs=f"input x: f32[{len(z)}, {classes}]")
    e = np.exp((z - z.max(axis=1, keepdims=True)).astype(np.float64))     # x - max rounded as float32
    want = e / e.sum(axis=1, keepdims=True)
    tiny = np.finfo(np.float32).tiny
    normal = want >= tiny
    ulp = np.spacing(want[normal].astype(np.float32)).astype(np.float64)
    assert (np.abs(got[normal] - want[normal]) / ulp).max() <= 4
    assert (got[~normal] == 0).all() and (~normal).sum() >= 10


def test_elu_keeps_relative_accuracy_near_zero():
    # alpha (e^x - 1) cancels near 0 (it gave 0 below |x| = 3e-8): elu must be alpha expm1(x)
    x = np.concatenate([-np.geomspace(1e-30, 3.0, 62), [-np.inf, 0.0]]).astype(np.float32)[None]
    got = run("output y = elu(x, alpha=0.5)", x, inputs="input x: f32[1, 64]")[0]
    np.testing.assert_allclose(got, 0.5 * np.expm1(x[0].astype(np.float64)), rtol=3e-7, atol=0)


EDGES = np.array([[-np.inf, -1e4, -88.8, -87.3, -20, -1e-3, 0, 1e-3, 20, 87.3, 88.8, 1e4, np.inf, np.nan]], np.float32)


def test_sigmoid_at_the_ends_of_its_range():
    # sigmoid's exponential is clamped, not fixed up after: past either end the
    # quotient must still be exactly 1, or 0 (or below float32's normal range)
    got = run("output y = sigmoid(x)", EDGES, inputs="input x: f32[1, 14]")[0]
    x = EDGES[0].astype(np.float64)
    with np.errstate(over="ignore"):
        expected = 1 / (1 + np.exp(-x))
    np.testing.assert_allclose(got, expected, rtol=2e-7, atol=np.finfo(np.float32).tiny)
    assert got[-1] != got[-1] and (got[8:13] == 1.0).all() and (got[:3] < np.finfo(np.float32).tiny).all()


def test_lstm_cell_at_the_ends_of_its_range():
    g = np.repeat(EDGES[0][:, None], 3, axis=1)      # i = o = u on each row
    kept = np.zeros((14, 1), np.float32)
    net = structc.compile("model M {\n  input g: f32[14, 3]\n  input k: f32[14, 1]\n"
                          "  output s = lstm_state(g, k)\n}\n", cache=False)
    got = net(g=g, k=kept)
    x = EDGES[0].astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        si = 1 / (1 + np.exp(-x))
        c = si * np.tanh(x)
        expected = np.stack([si * np.tanh(c), c], axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_comparisons_with_nan_are_false_as_numpy():
    x = np.array([[np.nan, 1.0]], np.float32)
    body = "output y = greater(x, 0.0) + less(x, 2.0) * 10.0 + not_equal(x, 0.0) * 100.0"
    got = run(body, x, inputs="input x: f32[1, 2]")
    np.testing.assert_array_equal(got, [[100, 111]])
    np.testing.assert_array_equal(run("output y = where(x, 1.0, 2.0)", x, inputs="input x: f32[1, 2]"), [[1, 1]])


@pytest.mark.parametrize("body, message", [
    ("output y = clip(x, lo=1.0, hi=0.0)", "clip needs lo <= hi"),
    ("output y = clip(x, lo=nope, hi=1.0)", "number"),
    ("output y = clip(x, 1.0)", "hi must be a number, got nothing"),
    ("output y = max(x, axes=(2,))", "axis 2 is out of range"),
    ("output y = argmax(x, axis=3)", "out of range"),
    ("output y = log_softmax(x, axis=5)", "out of range"),
    ("output y = greater(1.0, 2.0)", "tensor"),
])
def test_bad_options_are_language_errors(body, message):
    with pytest.raises(SnetError, match=message):
        structc.compile(f"model M {{\n  input x: f32[4, 6]\n  {body}\n}}\n", cache=False)


def test_gelu_keeps_relative_accuracy_in_its_negative_tail():
    x = np.array([[-5.0, -4.0, -3.0, -1.0, 0.5, 3.0]], np.float32)
    got = run("output y = gelu(x)", x, inputs="input x: f32[1, 6]")
    expected = [v * 0.5 * math.erfc(-v / math.sqrt(2)) for v in x[0].astype(np.float64)]
    np.testing.assert_allclose(got[0], expected, rtol=2e-3)


def test_avx512s_exponential_gives_the_portable_ones_values(monkeypatch):
    """On AVX-512 the exponential rounds with `vrndscaleps` and scales by 2^n
    with `vscalefps` (`CG._has_scalef`); the portable code rounds by adding a
    magic number and builds 2^n from its bits. Same n, same polynomial: sigmoid
    and tanh give the same bits, exp the same up to one ulp (where x log2 e
    sits on a rounding tie, the portable sum may be fused into an FMA)."""
    from structc.lower import codegen
    from structc.native import host_target
    if host_target().vector_width != 16:
        pytest.skip("this machine has no AVX-512: only the portable exponential is compiled")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-100, 100, 4000), rng.uniform(-1, 1, 4000), np.linspace(86, 89, 1000),
                        np.linspace(-89, -86, 1000), EDGES[0], np.zeros(34)]).astype(np.float32).reshape(-1, 64)
    src = (f"model M {{\n  input x: f32[{x.shape[0]}, 64]\n  output e = exp(x)\n  output s = sigmoid(x)\n"
           "  output t = tanh(x)\n}\n")
    fast = structc.compile(src, cache=False)(x=x)
    monkeypatch.setattr(codegen.CG, "_has_scalef", lambda self, v: False)
    portable = structc.compile(src, cache=False)(x=x)
    np.testing.assert_array_equal(fast["s"], portable["s"])
    np.testing.assert_array_equal(fast["t"], portable["t"])
    finite = np.isfinite(portable["e"])
    np.testing.assert_array_max_ulp(fast["e"][finite], portable["e"][finite], maxulp=1)
    np.testing.assert_array_equal(fast["e"][~finite], portable["e"][~finite])
