"""The C call plan (`_runtime.CallPlan`, `Net._call_plan`): `net(x=x)` on ndarrays
as declared runs checked in C; every other call takes the Python path
(`Net._run`), which converts or raises exactly as before."""
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import structc
from structc.model import _NO_PLAN

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MIXED = """model Mixed {
  input a: f32[N, 3]
  input b: f32[N, 3]
  input c: class[N] of 4
  input k: i32[M, 2]
  param E: embedding(4, 3) = normal(0.3)
  output y = a + b + E[c]
  output z = relu(a)
  output m = k
}"""


@pytest.fixture(scope="module")
def mlp():
    return structc.compile(EXAMPLES / "digits_mlp.snet")


@pytest.fixture(scope="module")
def mixed():
    return structc.compile(MIXED)


def valid(n: int = 5, m: int = 2) -> dict:
    r = np.random.default_rng(n * 31 + m)
    return {"a": r.random((n, 3), dtype=np.float32), "b": r.random((n, 3), dtype=np.float32),
            "c": r.integers(0, 4, n).astype(np.int32), "k": r.integers(-9, 9, (m, 2)).astype(np.int32)}


def slow_path(net, given: dict) -> dict:
    return net._run("forward", given, 0)[0]


def assert_same_outputs(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        assert got[name].tobytes() == want[name].tobytes(), name        # bitwise


def fast_calls(net, call) -> int:
    """How many calls the plan ran while `call()` ran."""
    before = net._forward_plan.calls
    call()
    return net._forward_plan.calls - before


def test_the_mlp_takes_the_fast_path(mlp):
    x = np.random.default_rng(0).random((1, 64), dtype=np.float32)
    mlp(x=x)                         # the first call grows the workspace (the Python path)
    assert fast_calls(mlp, lambda: [mlp(x=x), mlp.forward(x=x)]) == 2
    assert_same_outputs(mlp.forward(x=x), slow_path(mlp, {"x": x}))


@pytest.mark.slow
def test_lenet5_takes_the_fast_path():
    net = structc.compile(EXAMPLES / "lenet5.snet")
    for n in (1, 3):
        x = np.random.default_rng(n).random((n, 1, 28, 28), dtype=np.float32)
        want = slow_path(net, {"x": x})
        got = {}
        assert fast_calls(net, lambda: got.update(net.forward(x=x))) == 1
        assert_same_outputs(got, want)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), m=st.integers(1, 6))
def test_fast_and_python_paths_agree_bitwise(mlp, mixed, n, m):
    x = np.random.default_rng(n).random((n, 64), dtype=np.float32)
    slow = slow_path(mlp, {"x": x})          # first: it grows the workspace for this batch
    assert fast_calls(mlp, lambda: assert_same_outputs(mlp.forward(x=x), slow)) == 1
    assert fast_calls(mlp, lambda: assert_same_outputs({"probs": mlp(x=x)}, slow)) == 1   # the array itself
    given_ = valid(n, m)
    slow = slow_path(mixed, given_)
    assert fast_calls(mixed, lambda: assert_same_outputs(mixed.forward(**given_), slow)) == 1
    assert fast_calls(mixed, lambda: assert_same_outputs(mixed(**given_), slow)) == 1      # several: a dict


def test_a_call_needing_more_workspace_grows_it_through_python():
    net = structc.compile(EXAMPLES / "digits_mlp.snet")
    small, large = (np.ones((n, 64), np.float32) for n in (1, 300))
    assert fast_calls(net, lambda: net(x=small)) == 0      # no workspace yet
    assert fast_calls(net, lambda: net(x=small)) == 1
    assert fast_calls(net, lambda: net(x=large)) == 0      # more than the workspace holds
    assert fast_calls(net, lambda: [net(x=large), net(x=small)]) == 2


def _replace(**changes):
    def make():
        given_ = valid()
        for name, value in changes.items():
            if value is None:
                given_.pop(name)
            else:
                given_[name] = value(given_) if callable(value) else value
        return given_
    return make


REFUSED = {     # each raises in the Python path; the plan must leave it there
    "string dtype": (_replace(a=np.full((5, 3), "x")), TypeError, "expected a float array"),
    "complex dtype": (_replace(a=lambda g: g["a"].astype(np.complex64)), TypeError, "expected a float array"),
    "float labels": (_replace(c=lambda g: g["c"].astype(np.float32)), TypeError, "expected integer"),
    "label out of range": (_replace(c=np.array([0, 1, 7, 3, 0], np.int32)), ValueError,
                           r"class 7 at position \(2,\) is out of range \[0, 4\)"),
    "negative label": (_replace(c=np.array([0, -1, 2, 3, 0], np.int64)), ValueError, "class -1"),
    "wrong rank": (_replace(a=np.zeros((5, 3, 1), np.float32)), ValueError, "got an array of shape"),
    "wrong fixed axis": (_replace(a=np.zeros((5, 4), np.float32)), ValueError, "axis 1 should be 3"),
    "symbol mismatch": (_replace(b=np.zeros((4, 3), np.float32)), ValueError, "axis 0 is N = 5 from the other"),
    "empty batch": (_replace(a=np.zeros((0, 3), np.float32), b=np.zeros((0, 3), np.float32),
                             c=np.zeros(0, np.int32)), ValueError, "N must be at least 1"),
    "missing input": (_replace(k=None), TypeError, "missing input 'k'"),
    "None input": (_replace(k=lambda g: None), TypeError, "missing input 'k'"),
    "extra input": (_replace(q=np.zeros(3, np.float32)), TypeError, "Mixed has no input 'q'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_raise_what_the_python_path_raises(mixed, case):
    make, kind, message = REFUSED[case]
    mixed.forward(**valid())             # the workspace is there: only the refusal can decline
    with pytest.raises(kind, match=message) as slow:
        slow_path(mixed, make())
    before = mixed._forward_plan.calls
    with pytest.raises(kind) as fast:
        mixed.forward(**make())
    assert str(fast.value) == str(slow.value)
    assert mixed._forward_plan.calls == before


def _misaligned(a: np.ndarray) -> np.ndarray:
    raw = np.zeros(a.nbytes + 1, np.uint8)
    out = raw[1:].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


class _Sub(np.ndarray):
    pass


def _read_only(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


CONVERTED = {   # accepted as before (copied or converted by the Python path), the plan not used
    "float64": lambda a: a.astype(np.float64),
    "strided": lambda a: np.repeat(a, 2, axis=1)[:, ::2],
    "fortran order": np.asfortranarray,
    "misaligned": _misaligned,
    "byte-swapped": lambda a: a.astype(a.dtype.newbyteorder()),
    "subclass": lambda a: a.view(_Sub),
    "list": lambda a: a.tolist(),
}


@pytest.mark.parametrize("case", list(CONVERTED))
def test_values_the_python_path_converts_still_work(mixed, case):
    given_ = valid()
    want = slow_path(mixed, given_)
    changed = dict(given_, a=CONVERTED[case](given_["a"]))
    got = {}
    assert fast_calls(mixed, lambda: got.update(mixed.forward(**changed))) == 0
    assert_same_outputs(got, want)


def test_read_only_and_int64_values():
    """A read-only input is only read: the plan takes it. int64 labels given
    for i32 ones are converted by the Python path."""
    net = structc.compile(MIXED)
    given_ = valid()
    want = slow_path(net, given_)
    got = {}
    assert fast_calls(net, lambda: got.update(net.forward(**dict(given_, a=_read_only(given_["a"]))))) == 1
    assert_same_outputs(got, want)
    assert fast_calls(net, lambda: got.update(net.forward(**dict(given_, k=given_["k"].astype(np.int64))))) == 0
    assert_same_outputs(got, want)


def test_models_whose_inputs_need_python_have_no_plan():
    """Integers computed on in float32 need the 2**24 check (in Python)."""
    net = structc.compile("model Twice { input k: i32[N, 2]\n output s = k + k }")
    assert net._forward_plan is _NO_PLAN
    np.testing.assert_array_equal(net(k=np.array([[1, 2]], np.int32)), [[2, 4]])
    with pytest.raises(ValueError, match="beyond 2..24"):
        net(k=np.array([[2 ** 25, 0]], np.int32))


def test_two_threads_calling_one_net_get_their_own_results():
    """Calls on one Net are serialised by its lock (the workspace is shared),
    while a thread's call may grow the workspace under another's feet."""
    reference = structc.compile(EXAMPLES / "digits_mlp.snet")
    net = structc.compile(EXAMPLES / "digits_mlp.snet")       # same seed: the same parameters
    # batches large enough that one call's native part outlasts the other thread's checks
    xs = [np.random.default_rng(n).random((n, 64), dtype=np.float32) for n in range(100, 501, 100)]
    want = [reference(x=x) for x in xs]
    bad = []

    def hammer(order):
        for _ in range(20):
            for i in order:
                if net(x=xs[i]).tobytes() != want[i].tobytes():
                    bad.append(i)
    threads = [threading.Thread(target=hammer, args=(order,)) for order in (range(5), range(4, -1, -1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
    assert net._forward_plan.calls > 0.9 * 2 * 20 * 5
