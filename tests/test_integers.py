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
