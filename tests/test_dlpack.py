"""Inputs from any DLPack tensor, outputs to PyTorch: in place where the layout allows
(CPU, the declared dtype, C-contiguous), a clear error where it does not, and never a
cast that changes values."""
from __future__ import annotations

import numpy as np
import pytest

import structc
import structc.model

torch = pytest.importorskip("torch", reason="the DLPack tests use torch (CPU build: pip install torch==2.13.0)")

SOURCE = """model Tiny {
  input  x: f32[N, 3]
  target y: class[N] of 2
  loss cross_entropy(dense(x, 2), y)
}"""


@pytest.fixture(scope="module")
def net():
    return structc.compile(SOURCE, seed=1)


@pytest.fixture
def native_inputs(monkeypatch):
    """The addresses of the arrays each native call is given."""
    seen = []
    invoke = structc.model._runtime.invoke

    def spy(address, pa, ga, sa, ws, arrays, outs, *rest):
        seen.append([a.ctypes.data for a in arrays])
        return invoke(address, pa, ga, sa, ws, arrays, outs, *rest)
    monkeypatch.setattr(structc.model._runtime, "invoke", spy)
    return seen


class Exporter:
    """A tensor of no known library: only the DLPack protocol (as a jax.Array has it)."""

    def __init__(self, arr, device=(1, 0)):
        self.arr, self.device = arr, device

    def __dlpack__(self, **kw):
        return self.arr.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.device


X = np.random.default_rng(0).random((5, 3), dtype=np.float32)


def test_a_cpu_float32_tensor_is_read_in_place(net, native_inputs):
    t = torch.from_numpy(X.copy())
    np.testing.assert_array_equal(net(x=t), net(x=X))
    assert native_inputs[0] == [t.data_ptr()]


def test_any_dlpack_exporter_is_read_in_place(net, native_inputs):
    arr = X.copy()
    np.testing.assert_array_equal(net(x=Exporter(arr)), net(x=X))
    assert native_inputs[0] == [arr.ctypes.data]


def test_int64_labels_are_copied_with_the_same_values(net, native_inputs):
    x, y = torch.from_numpy(X), torch.tensor([0, 1, 1, 0, 1])          # torch's labels are int64
    assert net.grad(x=x, y=y)[0] == net.grad(x=X, y=np.array([0, 1, 1, 0, 1], np.int32))[0]
    assert native_inputs[0][0] == x.data_ptr() and native_inputs[0][1] != y.data_ptr()
    with pytest.raises(ValueError, match="class 2 at position"):
        net.grad(x=x, y=torch.tensor([0, 1, 2, 0, 1]))


def test_a_strided_tensor_is_copied_into_a_contiguous_array(net):
    t = torch.from_numpy(np.ascontiguousarray(X.T)).T                 # the same values, column-major
    assert not t.is_contiguous()
    np.testing.assert_array_equal(net(x=t), net(x=X))


@pytest.mark.parametrize("tensor, message", [
    (torch.from_numpy(X.astype(np.float64)), r"input 'x': the torch.Tensor has dtype torch.float64, the model "
                                             r"expects \[N, 3\] of float32 \(float32\)"),
    (torch.from_numpy(X).to(torch.bfloat16), r"cannot share the torch.Tensor \(dtype torch.bfloat16\)"),
    (torch.from_numpy(X).requires_grad_(), r"require gradient, use tensor.detach\(\)"),
    (torch.ones(5, 3, dtype=torch.int32), r"has dtype torch.int32, the model expects"),
    (Exporter(X, device=(2, 0)), r"is on device cuda; structc runs on the CPU"),
])
def test_tensors_that_cannot_be_used_as_they_are_are_refused(net, tensor, message):
    with pytest.raises(TypeError, match=message):
        net(x=tensor)


def test_float_labels_are_refused_not_truncated(net):
    with pytest.raises(TypeError, match="has dtype torch.float32, the model expects"):
        net.grad(x=X, y=torch.tensor([0.0, 1.0, 1.0, 0.0, 1.5]))


def test_outputs_go_to_pytorch_in_place(net, monkeypatch):
    out = net(x=X)
    assert torch.from_dlpack(out).data_ptr() == out.ctypes.data
    st = pytest.importorskip("structc.torch")
    given = []
    forward = net.forward
    monkeypatch.setattr(net, "forward", lambda **kw: given.append(forward(**kw)) or given[-1])
    probs = st.wrap(net)(x=torch.from_numpy(X))
    assert isinstance(probs, torch.Tensor) and probs.data_ptr() == given[0]["probs"].ctypes.data
    np.testing.assert_array_equal(probs.numpy(), out)
    loss, grads = st.wrap(net).grad(x=X, y=np.zeros(5, np.int32))
    assert isinstance(loss, float) and isinstance(grads["dense1.w"], torch.Tensor)
