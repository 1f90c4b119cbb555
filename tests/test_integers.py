"""Integer tensors (word ids, labels, indices) in ops that compute on floats.

Native kernels once read an i32 operand's bits as float32: `sum` of [4, 0, -2, 7]
gave -2, `k + k` stored float bits into an integer result, and `output s = k`
returned 1082130432 for 4. Arithmetic now converts integers to float32 (its
result is f32), data movement keeps their bits, and the float kernels refuse
an integer operand by name, at the call's span.
"""
import numpy as np
import pytest

import structc

K = np.array([[4, 0, -2, 2**30 + 1]], np.int32)


def run(expr: str):
    net = structc.compile(f"model M {{\n  input k: i32[N, 4]\n  output s = {expr}\n}}", cache=False)
    return net(k=K)


@pytest.mark.parametrize("expr, expect", [
    ("k", K),
    ("concat(k, k)", np.concatenate([K, K], axis=1)),
    ("reshape(k, (N, 2, 2))", K.reshape(1, 2, 2)),
])
def test_moving_integers_keeps_their_values(expr, expect):
    out = run(expr)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, expect)


@pytest.mark.parametrize("expr, fn", [
    ("k + k", lambda k: k + k),
    ("relu(k)", lambda k: np.maximum(k, 0)),
    ("k * 2", lambda k: k * 2),
    ("exp(k - k)", lambda k: np.ones_like(k)),
])
def test_arithmetic_on_integers_is_float32(expr, fn):
    small = K[:, :3]
    net = structc.compile(f"model M {{\n  input k: i32[N, 3]\n  output s = {expr}\n}}", cache=False)
    out = net(k=small)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, fn(small.astype(np.float64)).astype(np.float32))


@pytest.mark.parametrize("expr", ["sum(k, axes=1)", "mean(k)", "max(k, axes=1)", "argmax(k)", "dense(k, 2)",
                                  "softmax(k)"])
def test_float_kernels_refuse_integer_operands(expr):
    with pytest.raises(structc.SnetError, match=r"needs float operands, and \w+ is i32\[N, 4\]") as info:
        run(expr)
    assert info.value.span.line == 3


def test_integers_beyond_2_24_are_refused_where_float32_arithmetic_would_round_them():
    """`k + 0` of 2**24 + 1 would silently be 2**24 in float32: refused at the call, naming
    the input. 2**24 itself is exact and passes; moving integers (no arithmetic) and
    indexing with them stay exact at any size and are not checked."""
    net = structc.compile("model M {\n  input k: i32[N, 2]\n  output s = k + 0\n}", cache=False)
    assert net.meta["float_arithmetic_inputs"] == ["k"]
    np.testing.assert_array_equal(net(k=np.array([[2**24, -2**24]], np.int32)), [[2.0**24, -2.0**24]])
    for bad in (2**24 + 1, -2**24 - 1):
        with pytest.raises(ValueError, match=rf"input 'k': {bad} is beyond 2\*\*24"):
            net(k=np.array([[1, bad]], np.int32))
    moved = structc.compile("model M {\n  input k: i32[N, 2]\n  output s = concat(k, k)\n}", cache=False)
    assert moved.meta["float_arithmetic_inputs"] == []
    assert moved(k=np.array([[2**30 + 1, 0]], np.int32))[0, 0] == 2**30 + 1
    indexed = structc.compile("model E {\n  input k: i32[N]\n  param E: embedding(5, 2)\n  output s = E[k]\n}",
                              cache=False)
    assert indexed.meta["float_arithmetic_inputs"] == []
