"""The training call path's fixed costs (issue 12, branch dist2): the same bits as the
numpy and ctypes code it replaces, and the replaced code no longer on the path."""
import ctypes

import numpy as np
import pytest

import structc
from structc import Forest, _runtime
from structc.model import N_FLOAT_HYPER

TREES = """
model T {
  input  t: forest(arity=2) of word(vocab=5)
  target y: class[t.trees] of 2
  param  E: embedding(5, 8) = normal(0.3)
  rec h(n) = leaf: E[n.word]
             node: tanh(dense(concat(h(n.children)), 8))
  loss cross_entropy(dense(h(t.root), 2), y)
}
"""
FORESTS = [((1, 2), 3), (0, 1), 3, ((1, 2), (3, 4))]


@pytest.fixture(scope="module")
def trees():
    return structc.compile(TREES)


def ctypes_size(entry, dims):
    arr = (ctypes.c_int64 * max(1, len(dims)))(*dims)
    return entry.workspace_fn(ctypes.addressof(arr))


@pytest.mark.parametrize("kind", ["forward", "train", "update"])
def test_workspace_size_in_c_is_the_size_function_s(trees, kind):
    entry = trees._entries[kind]
    n = len(trees._symbols)
    for dims in [(1,) * n, tuple(range(2, 2 + n)), tuple(7 * k + 3 for k in range(n)), (2 ** 62,) * n]:
        assert _runtime.workspace_size(entry.workspace_address, dims) == ctypes_size(entry, dims), dims


def test_workspace_size_refuses_bad_arguments():
    with pytest.raises(ValueError, match="null"):
        _runtime.workspace_size(0, (1,))
    with pytest.raises(TypeError):
        _runtime.workspace_size(1, None)


def test_a_training_step_calls_no_ctypes_size_function(trees):
    """Each forest batch binds new dims, so the size was computed through ctypes
    (~5 us) on every step; now `_runtime.workspace_size` does it."""
    entry = trees._entries["train"]

    def refuse(address):
        raise AssertionError("the ctypes size function was called")
    saved = entry.workspace_fn
    entry.workspace_fn = refuse
    try:
        for k in range(3):
            trees.train_step(lr=0.1, t=Forest.from_tuples(FORESTS[k:]), y=np.arange(len(FORESTS) - k) % 2)
            trees.grad_into_arena(t=Forest.from_tuples(FORESTS[:k + 1]), y=np.zeros(k + 1, np.int64))
    finally:
        entry.workspace_fn = saved
    assert not hasattr(entry, "workspace_sizes")      # no cache growing with every batch's dims


def test_an_overflowing_workspace_is_still_refused_with_its_dims(trees):
    entry = trees._entries["train"]
    huge = (2 ** 62,) * len(trees._symbols)
    with pytest.raises(ValueError, match="more workspace than int64 can count"):
        trees._workspace_size(entry, huge)


def _numpy_weigh(arena, count, loss):
    n = len(arena) - 2
    with np.errstate(all="ignore"):         # the C pass does not warn on overflow
        np.multiply(arena[:n], np.float32(count), out=arena[:n])
    arena[n], arena[n + 1] = count, loss * count


def _numpy_unweigh(arena, divisor):
    n = len(arena) - 2
    d = np.float32(divisor)
    with np.errstate(all="ignore"):
        np.divide(arena[:n], d, out=arena[:n])
        return float(arena[n + 1] / d)


@pytest.mark.parametrize("n", [0, 1, 7, 33, 7501])
def test_weighing_the_arena_in_c_is_numpy_s_bits(n):
    rng = np.random.default_rng(n)
    for count, loss in [(1.0, 0.7), (3.0, 1e-30), (1 / 3, 2.5), (16777215.0, 3.4e30), (12.0, float("nan"))]:
        base = (rng.standard_normal(n + 2) * 10.0 ** rng.integers(-40, 38, n + 2)).astype(np.float32)
        want, got = base.copy(), base.copy()
        _numpy_weigh(want, count, loss)
        _runtime.weigh_arena(got, count, loss)
        assert want.tobytes() == got.tobytes()


@pytest.mark.parametrize("n", [0, 1, 7, 33, 7501])
def test_dividing_the_arena_in_c_is_numpy_s_bits(n):
    rng = np.random.default_rng(n)
    for divisor in (1.0, 3.0, 7.0, 1 / 3, 16777215.0, 1e-3):
        base = (rng.standard_normal(n + 2) * 10.0 ** rng.integers(-40, 38, n + 2)).astype(np.float32)
        want, got = base.copy(), base.copy()
        want_loss = _numpy_unweigh(want, divisor)
        got_loss = _runtime.unweigh_arena(got, divisor)
        assert want.tobytes() == got.tobytes()
        assert np.float64(got_loss).tobytes() == np.float64(want_loss).tobytes()


def test_the_arena_functions_refuse_what_is_not_a_float32_arena():
    for bad in (np.zeros(8, np.float64), np.zeros(1, np.float32), np.zeros(8, np.int32),
                np.zeros(8, np.float32)[::2]):
        with pytest.raises((TypeError, BufferError, ValueError)):
            _runtime.weigh_arena(bad, 1.0, 1.0)
        with pytest.raises((TypeError, BufferError, ValueError)):
            _runtime.unweigh_arena(bad, 1.0)
    frozen = np.zeros(8, np.float32)
    frozen.flags.writeable = False
    with pytest.raises((TypeError, BufferError, ValueError)):
        _runtime.weigh_arena(frozen, 1.0, 1.0)


@pytest.mark.parametrize("lr", [0.1, 1e-45, 3e-39, 1 / 3, 3.4028234e38, 12345.678])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_hyper_parameters_are_stored_as_numpy_rounds_them(trees, lr, optimizer):
    """`_set_hyper` stores its floats with one struct call; numpy's float32 cast
    of the same values is the reference."""
    trees.set_optimizer(optimizer, weight_decay=1e-4, eps=1e-8)
    seen = []
    real = structc.model._FLOAT_HYPER

    class Spy:
        def pack_into(self, buffer, offset, *values):
            seen.append(values)
            real.pack_into(buffer, offset, *values)
    structc.model._FLOAT_HYPER = Spy()
    try:
        with trees._lock:
            trees._set_hyper(lr)
    except ValueError:
        assert lr > 1e37          # lr / (1 - beta1) overflows float32: refused, as before
        return
    finally:
        structc.model._FLOAT_HYPER = real
    (values,) = seen
    assert trees._hyper[:N_FLOAT_HYPER].tobytes() == np.array(values, np.float32).tobytes()


def test_bind_s_dtype_shortcut_still_converts_other_byte_orders_and_strides():
    """`_bind` settles the usual dtype with `is`: an array whose dtype is equal in
    kind but not numpy's singleton (big-endian) or is strided still goes through
    the conversion, and the errors keep their words and order."""
    net = structc.compile("model D { input x: f32[N, 3]\n input y: f32[N]\n"
                          " output s = sum(x, axes=(1,)) + y }")
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    y = np.ones(4, np.float32)
    want = net._run("forward", {"x": x, "y": y}, 0)[0]["s"]
    for other in (x.astype(">f4"), np.asfortranarray(x), np.repeat(x, 2, axis=1)[:, ::2]):
        got = net._run("forward", {"x": other, "y": y}, 0)[0]["s"]
        assert got.tobytes() == want.tobytes()
    with pytest.raises(ValueError, match=r"input 'x': expected shape \[N, 3\] of float32, got \(4, 2\) \(axis 1 "
                                         r"should be 3\)"):
        net._run("forward", {"x": x[:, :2], "y": y}, 0)
    with pytest.raises(ValueError, match=r"input 'y': axis 0 is N = 4 from the other inputs, got 3"):
        net._run("forward", {"x": x, "y": y[:3]}, 0)
    with pytest.raises(ValueError, match=r"input 'x': N must be at least 1"):
        net._run("forward", {"x": x[:0], "y": y[:0]}, 0)
