"""The compiled model through its Python API: results, optimisers, checks at the boundary."""
import numpy as np
import pytest

import structc
from structc import api
from structc.autodiff import differentiate
from structc.build import build_model
from structc.interp import evaluate
from structc.syntax import parse

MLP = """
model MLP {
  input  x: f32[N, 12]
  target y: class[N] of 5
  h = dense(x, 33) |> tanh
  h = dense(h, 17) |> sigmoid
  h = concat(h, dense(x, 4) |> relu, axis=1)
  loss cross_entropy(dense(h, 5), y)
}
"""


@pytest.fixture(scope="module")
def mlp():
    return structc.compile(MLP), build_model(parse(MLP))


def batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 12)).astype(np.float32), rng.integers(0, 5, n).astype(np.int32)


@pytest.mark.parametrize("n", [1, 7, 12, 13, 64, 100])
def test_forward_and_gradients_match_the_interpreter(mlp, n):
    net, mdef = mlp
    x, y = batch(n, seed=n)
    params = {k: v.copy() for k, v in net.params.items()}
    ref = evaluate(differentiate(mdef.graph), {"x": x, "y": y}, params)
    probs = net(x=x)
    np.testing.assert_allclose(probs, evaluate(mdef.graph, {"x": x}, params, outputs=["probs"])["probs"],
                               rtol=1e-4, atol=1e-6)
    loss, grads = net.grad(x=x, y=y)
    assert loss == pytest.approx(ref["loss"], rel=1e-5)
    for k in params:
        np.testing.assert_allclose(grads[k], ref[f"grad:{k}"], rtol=1e-4, atol=1e-6, err_msg=k)


def test_batch_size_changes_without_recompiling(mlp):
    before = api.COMPILE_COUNT
    net = structc.compile(MLP)          # cached on disk: loads, does not compile
    for n in (3, 50, 9):
        x, y = batch(n)
        assert net(x=x).shape == (n, 5)
        net.train_step(x=x, y=y, lr=0.01)
    assert api.COMPILE_COUNT == before


def _numpy_step(net, mdef, x, y, rule, state, lr, opt, step):
    params = {k: v.astype(np.float64) for k, v in net.params.items()}
    ref = evaluate(differentiate(mdef.graph), {"x": x, "y": y}, params)
    out = {}
    for k, p in params.items():
        g = ref[f"grad:{k}"]
        if rule == "sgd":
            p = p - lr * g
        elif rule == "momentum":
            state[k] = opt["momentum"] * state.get(k, 0) + g
            p = p - lr * state[k]
        else:
            m = opt["beta1"] * state.get(("m", k), 0) + (1 - opt["beta1"]) * g
            v = opt["beta2"] * state.get(("v", k), 0) + (1 - opt["beta2"]) * g * g
            state[("m", k)], state[("v", k)] = m, v
            mhat, vhat = m / (1 - opt["beta1"] ** step), v / (1 - opt["beta2"] ** step)
            p = p - lr * mhat / (np.sqrt(vhat) + opt["eps"])
        out[k] = p
    return out


@pytest.mark.parametrize("rule", ["sgd", "momentum", "adam"])
def test_train_step_applies_the_optimiser(rule):
    net = structc.compile(MLP, seed=3)
    mdef = build_model(parse(MLP))
    net.set_optimizer(rule)
    state, opt = {}, {"momentum": 0.9, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    for step in range(1, 4):
        x, y = batch(16, seed=step)
        expected = _numpy_step(net, mdef, x, y, rule, state, 0.05, opt, step)
        net.train_step(x=x, y=y, lr=0.05)
        for k, p in expected.items():
            np.testing.assert_allclose(net.params[k], p, rtol=2e-4, atol=2e-6, err_msg=f"{rule} step {step} {k}")


SUBNORMAL = np.float32(4 * 2.0 ** -149)     # 0.9 times it rounds back to it: a moment stuck there


@pytest.mark.parametrize("rule", ["momentum", "adam"])
def test_moments_that_decay_into_the_subnormals_are_flushed_to_zero(rule):
    """A parameter whose gradient stays 0 has its moments decay into the subnormal
    floats, where they would stay for good (and slow every update down); native
    code flushes them to 0 instead, and the parameters do not move."""
    net = structc.compile(MLP, seed=3)
    net.set_optimizer(rule)
    size = net.meta["param_size"]
    net._state_arena[:size] = SUBNORMAL                 # momentum's v, Adam's m
    if rule == "adam":
        net._state_arena[size:] = SUBNORMAL             # Adam's v
    for g in net.grads.values():
        g[...] = 0.0
    before = {k: v.copy() for k, v in net.params.items()}
    net.apply_update(0.05)
    assert not np.any(net._state_arena), "a subnormal moment survived the update"
    for k, p in net.params.items():
        np.testing.assert_array_equal(p, before[k], err_msg=k)


@pytest.mark.parametrize("eps", [0.0, 1e-40])
def test_adam_refuses_an_eps_that_could_leave_its_denominator_zero(eps):
    """v underflows to 0 in native code (subnormals are flushed), so sqrt(v) + eps
    must stay positive: eps is at least float32's smallest normal number."""
    net = structc.compile(MLP, seed=3)
    with pytest.raises(ValueError, match=r"eps must be .*>= 1.17549e-38.*underflows"):
        net.set_optimizer("adam", eps=eps)
    net.set_optimizer("adam", eps=1.2e-38)


def test_training_reduces_the_loss():
    net = structc.compile(MLP, seed=1)
    x, y = batch(64, seed=5)
    first = net.train_step(x=x, y=y, lr=0.5)
    for _ in range(100):
        last = net.train_step(x=x, y=y, lr=0.5)
    assert last < 0.5 * first


def test_params_are_views_of_native_memory_and_round_trip(tmp_path, mlp):
    net, _ = mlp
    x, _ = batch(4)
    before = net(x=x)
    w = net.params["dense1.w"]
    saved = w.copy()
    w[...] = 0                                  # writes reach the native arena
    assert not np.allclose(net(x=x), before)
    w[...] = saved
    np.testing.assert_allclose(net(x=x), before)
    path = tmp_path / "p.npz"
    net.save_params(path)
    other = structc.compile(MLP, seed=99)
    other.load_params(path)
    np.testing.assert_allclose(other(x=x), before)


def test_load_params_rejects_a_mismatch(tmp_path, mlp):
    net, _ = mlp
    np.savez(tmp_path / "bad.npz", **{"dense1.w": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="do not match"):
        net.load_params(tmp_path / "bad.npz")


@pytest.mark.parametrize("feed, error, message", [
    ({}, TypeError, "missing input 'x'"),
    ({"x": np.zeros((3, 11), np.float32)}, ValueError, r"input 'x'.*axis 1 should be 12"),
    ({"x": np.zeros((3,), np.float32)}, ValueError, "input 'x': expected shape"),
    ({"x": np.zeros((0, 12), np.float32)}, ValueError, "N must be at least 1"),
    ({"x": np.zeros((3, 12), bool)}, TypeError, "input 'x': expected a float array"),
    ({"x": np.zeros((3, 12), np.float32), "z": 1}, TypeError, "has no input 'z'"),
    ({"x": "abc"}, TypeError, "input 'x'"),
])
def test_forward_rejects_bad_inputs(mlp, feed, error, message):
    net, _ = mlp
    with pytest.raises(error, match=message):
        net(**feed)


@pytest.mark.parametrize("y, error, message", [
    (np.array([0, 1, 5]), ValueError, r"class 5 at position \(2,\) is out of range \[0, 5\)"),
    (np.array([0, -1, 2]), ValueError, "class -1"),
    (np.array([0.0, 1.0, 2.0]), TypeError, "expected integer"),
    (np.array([0, 1]), ValueError, "N = 3 from the other inputs, got 2"),
])
def test_training_rejects_bad_labels(mlp, y, error, message):
    net, _ = mlp
    x, _ = batch(3)
    with pytest.raises(error, match=message):
        net.train_step(x=x, y=y, lr=0.1)


def test_inputs_are_converted_when_lossless(mlp):
    net, _ = mlp
    x, y = batch(6)
    a = net(x=x)
    np.testing.assert_allclose(net(x=x.astype(np.float64)), a)
    np.testing.assert_allclose(net(x=np.asfortranarray(x)), a)
    np.testing.assert_allclose(net(x=x.tolist()), a)
    net.grad(x=x, y=y.astype(np.int64))


def test_a_float64_input_beyond_float32_is_refused_but_infinities_pass(mlp):
    """Converting float64 to float32 rounds, but must not turn a finite value into
    infinity (as int64 that does not fit int32 is refused): 1e39 once reached native
    code as inf, with only numpy's RuntimeWarning. An infinity given stays one."""
    net, _ = mlp
    x, _ = batch(3)
    big = x.astype(np.float64)
    big[1, 4] = -1e39
    with pytest.raises(ValueError, match=r"input 'x': -1e\+39 at position \(1, 4\) is beyond float32's range"):
        net(x=big)
    big[1, 4] = -np.inf
    assert np.isnan(net(x=big)[1]).all() and not np.isnan(net(x=big)[0]).any()


def test_a_misaligned_input_reaches_native_code_as_an_aligned_copy():
    """A C-contiguous float32 array at an odd address: ascontiguousarray keeps
    it as it is, so the boundary copies it (native code reads whole floats)."""
    from structc.model import _as_array, _from_dlpack
    net = structc.compile("model M { input x: f32[N, 3]\n output y = x + 1 }")
    entry = net._entries["forward"]
    spec = entry.inputs[0]
    raw = np.zeros(4 * 6 + 1, np.uint8)
    odd = raw[1:].view(np.float32).reshape(2, 3)
    odd[...] = np.arange(6).reshape(2, 3)
    assert odd.flags.c_contiguous and not odd.flags.aligned
    [passed], _ = net._bind(entry, {"x": odd})         # what `_run` hands to native code
    np.testing.assert_array_equal(net(x=odd), odd + 1)
    for bound in (passed, _as_array(spec, odd), _from_dlpack(spec, odd)):
        assert bound.flags.aligned and bound.flags.c_contiguous
        np.testing.assert_array_equal(bound, odd)


def test_bad_hyper_parameters(mlp):
    net, _ = mlp
    x, y = batch(3)
    with pytest.raises(ValueError, match="lr must be"):
        net.train_step(x=x, y=y, lr=float("nan"))
    with pytest.raises(ValueError, match="unknown optimizer"):
        net.set_optimizer("rmsprop")


def test_model_without_loss_cannot_train():
    net = structc.compile("model F { input x: f32[N, 3]\n output y = relu(x) }")
    assert net(x=np.array([[-1, 0, 2]], np.float32)).tolist() == [[0, 0, 2]]
    with pytest.raises(TypeError, match="declares no loss"):
        net.train_step(x=np.zeros((1, 3), np.float32), lr=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_results_do_not_depend_on_thread_count(threads):
    src = "model W { input x: f32[N, 300]\n target y: class[N] of 7\n loss cross_entropy(dense(dense(x, 200) |> relu, 7), y) }"
    x = np.random.default_rng(0).normal(size=(256, 300)).astype(np.float32)
    y = np.arange(256) % 7
    structc.set_num_threads(1)
    ref = structc.compile(src).grad(x=x, y=y)
    structc.set_num_threads(threads)
    got = structc.compile(src).grad(x=x, y=y)
    structc.set_num_threads(2)
    assert got[0] == pytest.approx(ref[0], rel=1e-6)
    for k in ref[1]:
        np.testing.assert_allclose(got[1][k], ref[1][k], rtol=1e-5, atol=1e-7)


def test_set_num_threads_validates():
    with pytest.raises(ValueError):
        structc.set_num_threads(0)


# -- issue 15: the workspace size never wraps -------------------------------------------

def workspace_bytes(net, kind, dims):
    import ctypes
    arr = (ctypes.c_int64 * len(dims))(*dims)
    return net._entries[kind].workspace_fn(ctypes.addressof(arr))


@pytest.mark.parametrize("kind", ["forward", "train"])
def test_workspace_size_function_reports_overflow(mlp, kind):
    net, _ = mlp
    small, big = workspace_bytes(net, kind, (100,)), workspace_bytes(net, kind, (2 ** 40,))
    assert 0 < small < big
    for n in (2 ** 57, 2 ** 61, 2 ** 62, 2 ** 63 - 1):      # these wrapped, some to negative sizes
        assert workspace_bytes(net, kind, (n,)) == -1, n


def test_a_call_whose_workspace_overflows_is_refused(mlp):
    net, _ = mlp
    with pytest.raises(ValueError, match="more workspace than int64 can count .N=2305843009213693952"):
        net._workspace_size(net._entries["train"], (2 ** 61,))
    with pytest.raises(ValueError, match="more than this machine's memory"):
        net._workspace_size(net._entries["forward"], (2 ** 50,))


def test_reachable_huge_workspaces_are_refused_before_native_code():
    """Small inputs whose symbols multiply: an [N, N] buffer of 4 TiB, and an
    [N, M, K] one of 2**62 bytes next to others (the total wrapped in int64)."""
    square = structc.compile("model Q { input x: f32[N, 1]\n output s = sum(relu(x @ transpose(x))) }")
    assert float(square(x=np.ones((3, 1), np.float32))) == pytest.approx(9.0)
    with pytest.raises(ValueError, match="bytes of workspace .N=1048576., more than this machine's memory"):
        square(x=np.ones((2 ** 20, 1), np.float32))
    cube = structc.compile("model C { input a: f32[N, 1]\n input b: f32[M, 1]\n input c: f32[K, 1]\n"
                           " output s = sum(softmax(reshape(a @ transpose(b), N, M, 1) * reshape(c, 1, 1, K))) }")
    ones = {k: np.ones((n, 1), np.float32) for k, n in zip("abc", (2, 3, 4))}
    assert float(cube(**ones)) == pytest.approx(6.0)
    ones = {k: np.ones((2 ** 20, 1), np.float32) for k in "abc"}
    with pytest.raises(ValueError, match="more workspace than int64 can count"):
        cube(**ones)
