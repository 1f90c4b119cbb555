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


@pytest.mark.parametrize("expr", ["concat(k, x)", "concat(x, k)", "concat(k, j)"])
def test_concat_of_integers_and_floats_is_refused(expr):
    """concat took its first operand's dtype and copied the others' bits: concat(k, x)
    of x = 0.5 gave 1056964608, concat(x, k) of k = 1 gave 1e-45."""
    src = f"model M {{\n  input k: i32[N, 4]\n  input j: i64[N, 4]\n  input x: f32[N, 4]\n  output s = {expr}\n}}"
    with pytest.raises(structc.SnetError, match=r"concat: operands of different dtypes, \w+\[N, 4\], ") as info:
        structc.compile(src, cache=False)
    assert (info.value.span.line, info.value.span.col) == (5, 14)


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


INDEXED = {
    "gather": ("model G {\n  input k: i32[N]\n  param E: embedding(5, 2) = normal(1)\n  output s = E[k]\n}", 5),
    "gather through a reshape": ("model R {\n  input k: i32[N, 1]\n  param E: embedding(5, 2) = normal(1)\n"
                                 "  output s = E[reshape(k, N)]\n}", 5),
    "onehot": ("model O {\n  input k: i64[N]\n  output s = onehot(k, 3)\n}", 3),
}


@pytest.fixture(scope="module", params=sorted(INDEXED))
def indexed(request):
    source, rows = INDEXED[request.param]
    return structc.compile(source), rows


@pytest.mark.parametrize("bad", [-1, "rows", 2**31 - 1])
@pytest.mark.parametrize("path", ["fast", "python"])
def test_an_index_outside_its_table_is_refused_not_clamped(indexed, bad, path):
    """A plain integer input used as row ids (`E[k]`, `onehot(k, C)`) is not declared
    `class[...] of V`, yet its values index a table: the kernels clamp a stray id (E[5]
    gave E's last row, onehot(3, 3) a row of zeros), a silently wrong result. Refused
    at the call instead, on the C call plan and the Python path alike, naming the id."""
    net, rows = indexed
    shape = tuple(3 if d == "N" else d for d in net.meta["inputs"][0]["shape"])
    dtype = np.dtype(structc.model._NP[net.meta["inputs"][0]["dtype"]])
    k = np.zeros(shape, dtype)
    net(k=k)                                    # the workspace grown: a call as declared takes the C plan
    k.flat[1] = rows if bad == "rows" else bad
    if path == "python":
        k = np.stack([k, k], axis=-1)[..., 0]   # not contiguous: the Python path takes the call
    with pytest.raises(ValueError, match=rf"input 'k': id {k.flat[1]} at position .* is outside \[0, {rows}\)"):
        net(k=k)
    k.flat[1] = rows - 1
    out = net(k=k)                              # the largest id is fine
    assert out.shape[0] == k.size


def test_training_refuses_an_index_outside_its_table_before_anything_changes():
    net = structc.compile("model T {\n  input w: i32[N]\n  target y: class[N] of 2\n  param E: embedding(4, 3)\n"
                          "  loss cross_entropy(dense(E[w], 2), y)\n}")
    before = {name: p.copy() for name, p in net.params.items()}
    for call in (net.grad, net.train_step, net.grad_into_arena, net.loss):
        with pytest.raises(ValueError, match=r"input 'w': id 4 at position \(1,\) is outside \[0, 4\)"):
            call(w=np.array([0, 4], np.int32), y=np.zeros(2, np.int32))
    assert all(np.array_equal(p, before[name]) for name, p in net.params.items())
    net.train_step(w=np.array([0, 3], np.int32), y=np.zeros(2, np.int32))


def test_labels_reshaped_into_a_smaller_table_are_checked_against_its_rows():
    """`E[c]` of class[N] of 4 into a 3-row E is a compile error; through a reshape the
    check of the source cannot see it, so the call checks the rows (labels that fit
    their classes are not checked twice: perceptron's onehot(y, 10) of class 10)."""
    net = structc.compile("model M {\n  input c: class[N] of 4\n  param E: embedding(3, 2)\n"
                          "  output o = E[reshape(c, N)]\n}")
    assert net.meta["index_inputs"] == {"c": [3]}
    with pytest.raises(ValueError, match=r"input 'c': id 3 at position \(0,\) is outside \[0, 3\)"):
        net(c=np.array([3], np.int32))
    assert net(c=np.array([2], np.int32)).shape == (1, 2)
    same = structc.compile("model P {\n  input y: class[N] of 10\n  output o = onehot(y, 10)\n}")
    assert same.meta["index_inputs"] == {}
