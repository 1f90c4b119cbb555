"""Property tests over random shapes: native kernels against numpy."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from structc.ops import REGISTRY
from structc.ops.base import Sample
from structc.testing import check_native

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
dim = st.integers(1, 40)


@pytest.mark.slow
@SETTINGS
@given(m=dim, k=st.one_of(dim, st.integers(380, 420)), n=st.integers(1, 70), ta=st.booleans(), tb=st.booleans())
def test_matmul_any_shape(m, k, n, ta, tb):
    a = (k, m) if ta else (m, k)
    b = (n, k) if tb else (k, n)
    check_native(REGISTRY["matmul"], Sample((a, b), {"ta": ta, "tb": tb}), rtol=1e-3, atol=1e-4)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 60), k=st.sampled_from([1, 5, 31, 64, 383, 500, 800]),
       n=st.sampled_from([1, 16, 17, 32, 40, 64, 96]), seed=st.integers(0, 2 ** 16))
@pytest.mark.slow
def test_dense_relu_layer_forward_and_gradients(batch, k, n, seed):
    """A dense layer with its bias and ReLU fused into the matmul's tiles
    (full tiles inline, remainders through the shared micro-kernels, k-blocked
    partial sums), over a symbolic batch: outputs and all three gradients
    (the input's through the masked delta, the weight's over the batch)
    against numpy."""
    import structc
    src = (f"model D {{ input x: f32[N, {k}]\n target t: f32[N, {n}]\n param W: f32[{k}, {n}] = normal(0.5)\n"
           f" param b: f32[{n}] = normal(0.5)\n param V: f32[{n}, 3] = normal(0.5)\n"
           f" h = relu(x @ W + b)\n output y = h\n loss mse(relu(h @ V) @ transpose(V), t) }}")
    net = structc.compile(src, seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, k)).astype(np.float32)
    t = rng.normal(size=(batch, n)).astype(np.float32)
    W, b, V = (net.params[p].astype(np.float64) for p in ("W", "b", "V"))
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    z = x64 @ W + b
    h = np.maximum(z, 0)
    np.testing.assert_allclose(net(x=x), h, rtol=1e-4, atol=1e-4 * np.sqrt(k))
    u = h @ V
    r = np.maximum(u, 0)
    diff = r @ V.T - t64
    loss, grads = net.grad(x=x, t=t)
    np.testing.assert_allclose(loss, np.mean(diff ** 2), rtol=1e-3)
    d_out = 2 * diff / diff.size
    d_u = (d_out @ V) * (u > 0)
    d_h = d_u @ V.T
    d_z = d_h * (z > 0)
    # each value again with every operand's magnitude and no cancellation: what float32
    # rounding is relative to (`assert_sums_close`)
    aW, aV = np.abs(W), np.abs(V)
    m_h = (np.abs(x64) @ aW + np.abs(b)) * (z > 0)
    m_r = (m_h @ aV) * (u > 0)
    m_out = 2 * (m_r @ aV.T + np.abs(t64)) / diff.size
    m_u = (m_out @ aV) * (u > 0)
    m_z = (m_u @ aV.T) * (z > 0)
    assert_sums_close(grads["W"], x64.T @ d_z, np.abs(x64.T) @ m_z, "W")
    assert_sums_close(grads["b"], d_z.sum(axis=0), m_z.sum(axis=0), "b")
    assert_sums_close(grads["V"], h.T @ d_u + d_out.T @ r, m_h.T @ m_u + m_out.T @ m_r, "V")


def assert_sums_close(actual, desired, magnitude, what: str) -> None:
    """float32 arithmetic is good to a small multiple of its epsilon times the
    magnitude of what it summed along the way (`magnitude`: the same computation on
    absolute values), not of its result: where terms cancel (V's gradient 0.0142 from
    terms of 18.9 in all, batch 11, k 383, n 64, seed 3968; W's from a delta that
    cancelled upstream) a bound relative to the result fails a right answer. A wrong
    gradient (a missed mask, a term or an operand wrong) is off by a fair part of it."""
    err = np.abs(actual - desired)
    bad = err > 1e-4 * magnitude + 1e-7
    assert not bad.any(), (f"d{what}: off by {err[bad].max():.3g} where its computation's magnitude is "
                           f"{magnitude[bad].max():.3g}")


@st.composite
def broadcast_pair(draw):
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.integers(1, 9)) for _ in range(rank))
    other = tuple(1 if draw(st.booleans()) else d for d in shape)
    other = other[draw(st.integers(0, rank)):]
    return (shape, other) if draw(st.booleans()) else (other, shape)


@pytest.mark.slow
@SETTINGS
@given(broadcast_pair(), st.sampled_from(["add", "sub", "mul", "maximum"]))
def test_binary_ops_broadcast(shapes, op):
    a, b = shapes
    check_native(REGISTRY[op], Sample(((a, "away"), (b, "away"))))


@pytest.mark.slow
@SETTINGS
@given(st.lists(st.integers(1, 9), min_size=1, max_size=4), st.data())
def test_sum_over_any_axes(shape, data):
    axes = tuple(sorted(data.draw(st.sets(st.integers(0, len(shape) - 1)))))
    keep = data.draw(st.booleans())
    check_native(REGISTRY["sum"], Sample((tuple(shape),), {"axes": axes or None, "keepdims": keep}))


@pytest.mark.slow
@SETTINGS
@given(rows=st.integers(1, 30), classes=st.integers(2, 70))
def test_softmax_and_cross_entropy_any_size(rows, classes):
    check_native(REGISTRY["softmax"], Sample(((rows, classes),)))
    check_native(REGISTRY["cross_entropy"], Sample(((rows, classes), ((rows,), ("classes", classes)))))


@pytest.mark.slow
@SETTINGS
@given(st.lists(st.integers(1, 8), min_size=2, max_size=3), st.sampled_from(["tanh", "sigmoid", "exp", "relu"]))
def test_activations_any_shape(shape, op):
    check_native(REGISTRY[op], Sample(((tuple(shape), "away"),)))


def test_transcendentals_are_accurate_over_their_range():
    """exp, log, tanh, sigmoid are polynomials in the generated code: check
    them across the float range that matters, not just near 0."""
    x = np.concatenate([np.linspace(-90, 90, 2001), np.linspace(-1e-3, 1e-3, 201)]).astype(np.float32)
    for op, ref, tol in (("tanh", np.tanh, 2e-6), ("sigmoid", lambda v: 1 / (1 + np.exp(-v)), 2e-6)):
        check = Sample(((x.shape, "float"),))
        import structc.testing as t
        mdef, net = t.op_net(REGISTRY[op], check, [x])
        net.params["p0"][...] = x
        got = net.forward()["out"]
        np.testing.assert_allclose(got, ref(x.astype(np.float64)), rtol=tol, atol=1e-7, err_msg=op)
    pos = np.geomspace(1e-30, 1e30, 3001).astype(np.float32)
    import structc.testing as t
    for op, vals, ref in (("log", pos, np.log), ("exp", x[np.abs(x) < 85], np.exp)):
        mdef, net = t.op_net(REGISTRY[op], Sample(((vals.shape, "float"),)), [vals])
        net.params["p0"][...] = vals
        np.testing.assert_allclose(net.forward()["out"], ref(vals.astype(np.float64)), rtol=3e-6, atol=0, err_msg=op)


def test_transcendentals_at_infinities_and_nan():
    """±inf saturate, NaN comes out as NaN (a diverging model must show it)."""
    import structc.testing as t
    x = np.array([-np.inf, np.inf, np.nan, -100.0, 100.0], np.float32)
    want = {"tanh": [-1, 1, np.nan, -1, 1], "sigmoid": [0, 1, np.nan, 0, 1],
            "exp": [0, np.inf, np.nan, 0, np.inf]}
    for op, expected in want.items():
        mdef, net = t.op_net(REGISTRY[op], Sample(((x.shape, "float"),)), [x])
        net.params["p0"][...] = x
        got = net.forward()["out"]
        np.testing.assert_allclose(got, np.array(expected, np.float32), rtol=1e-6, atol=1e-30, err_msg=op)
