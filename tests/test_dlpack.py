"""Inputs from any DLPack tensor, outputs to PyTorch: in place where the layout allows
(CPU, the declared dtype, C-contiguous), a clear error where it does not, and never a
cast that changes values. The protocol itself is tested with numpy-backed exporters
(fast); torch and jax tensors, which take seconds to import, are marked slow."""
from __future__ import annotations

import numpy as np
import pytest

import structc
import structc.model

SOURCE = """model Tiny {
  input  x: f32[N, 3]
  target y: class[N] of 2
  loss cross_entropy(dense(x, 2), y)
}"""
X = np.random.default_rng(0).random((5, 3), dtype=np.float32)
Y = np.array([0, 1, 1, 0, 1], np.int32)


@pytest.fixture(scope="module")
def net():
    return structc.compile(SOURCE, seed=1)


@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="needs torch (CPU build: pip install torch==2.13.0)")


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
    """A tensor of no known library: only the DLPack protocol (as a jax.Array has it).
    On another device numpy refuses its capsule, as it would a CUDA tensor's."""

    def __init__(self, arr, device=(1, 0)):
        self.arr, self.device = arr, device

    def __dlpack__(self, **kw):
        if self.device[0] != 1:
            raise BufferError("Unsupported device in DLTensor.")
        return self.arr.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.device


# -- the protocol ------------------------------------------------------------------------

def test_a_cpu_float32_tensor_is_read_in_place(net, native_inputs):
    arr = X.copy()
    np.testing.assert_array_equal(net(x=Exporter(arr)), net(x=X))
    assert native_inputs[0] == [arr.ctypes.data]


def test_wider_integer_labels_are_copied_with_the_same_values(net, native_inputs):
    labels = Y.astype(np.int64)
    assert net.grad(x=Exporter(X), y=Exporter(labels))[0] == net.grad(x=X, y=Y)[0]
    assert native_inputs[0][0] == X.ctypes.data and native_inputs[0][1] != labels.ctypes.data
    with pytest.raises(ValueError, match="class 2 at position"):
        net.grad(x=X, y=Exporter(np.array([0, 1, 2, 0, 1])))
    with pytest.raises(ValueError, match="values do not fit int32"):
        net.grad(x=X, y=Exporter(np.array([0, 1, 2**40, 0, 1])))


def test_a_strided_tensor_is_copied_into_a_contiguous_array(net):
    strided = np.ascontiguousarray(X.T).T                 # the same values, column-major
    np.testing.assert_array_equal(net(x=Exporter(strided)), net(x=X))


@pytest.mark.parametrize("tensor, message", [
    (Exporter(X.astype(np.float64)), r"input 'x': the (tests.)?test_dlpack.Exporter has dtype float64, the model "
                                     r"expects \[N, 3\] of float32 \(float32\)"),
    (Exporter(Y.reshape(5, 1).repeat(3, 1)), r"has dtype int32, the model expects"),
    (Exporter(X, device=(2, 0)), r"is on device cuda; structc runs on the CPU"),
])
def test_tensors_that_cannot_be_used_as_they_are_are_refused(net, tensor, message):
    with pytest.raises(TypeError, match=message):
        net(x=tensor)


def test_float_labels_are_refused_not_truncated(net):
    with pytest.raises(TypeError, match="has dtype float32, the model expects"):
        net.grad(x=X, y=Exporter(np.array([0.0, 1.0, 1.0, 0.0, 1.5], np.float32)))


# -- PyTorch and JAX ---------------------------------------------------------------------

@pytest.mark.slow     # importing torch: seconds
def test_torch_tensors_in_place_and_refused(net, torch, native_inputs):
    t = torch.from_numpy(X.copy())
    np.testing.assert_array_equal(net(x=t), net(x=X))
    assert native_inputs[0] == [t.data_ptr()]
    assert net.grad(x=t, y=torch.tensor(Y.tolist()))[0] == net.grad(x=X, y=Y)[0]     # torch's int64 labels
    for tensor, message in [(t.double(), r"the torch.Tensor has dtype torch.float64, the model expects"),
                            (t.to(torch.bfloat16), r"cannot share the torch.Tensor \(dtype torch.bfloat16\)"),
                            (t.clone().requires_grad_(), r"requires grad, and structc is not part of torch's "
                                                         r"autograd: no gradient would flow back")]:
        with pytest.raises(TypeError, match=message):
            net(x=tensor)


@pytest.mark.slow     # importing torch: seconds
def test_outputs_go_to_pytorch_in_place(net, torch, monkeypatch):
    out = net(x=X)
    assert torch.from_dlpack(out).data_ptr() == out.ctypes.data
    st = pytest.importorskip("structc.torch")
    given = []
    forward = net.forward
    monkeypatch.setattr(net, "forward", lambda **kw: given.append(forward(**kw)) or given[-1])
    probs = st.wrap(net)(x=torch.from_numpy(X))
    assert isinstance(probs, torch.Tensor) and probs.data_ptr() == given[0]["probs"].ctypes.data
    np.testing.assert_array_equal(probs.numpy(), out)


@pytest.mark.slow     # importing torch: seconds
def test_a_later_call_leaves_the_outputs_of_an_earlier_one_alone(net, torch):
    # outputs are each call's own memory (the README says so), torch's views of them too
    st = pytest.importorskip("structc.torch")
    wrapped, other = st.wrap(net), X[::-1].copy()
    first = [net(x=X), net.forward(x=X)["probs"], wrapped(x=torch.from_numpy(X)),
             wrapped.grad(x=torch.from_numpy(X), y=torch.from_numpy(Y))[1]["dense1.w"]]
    kept = [np.array(v) for v in first]
    net(x=other), net.forward(x=other), wrapped(x=torch.from_numpy(other))
    wrapped.grad(x=torch.from_numpy(other), y=torch.from_numpy(Y[::-1].copy()))
    assert not np.array_equal(net(x=other), kept[0])
    for value, before in zip(first, kept):
        np.testing.assert_array_equal(np.asarray(value), before)
    loss, grads = st.wrap(net).grad(x=X, y=Y)
    assert isinstance(loss, float) and isinstance(grads["dense1.w"], torch.Tensor)
    import copy
    assert copy.copy(st.wrap(net)).name == net.name            # other attributes are the Net's


@pytest.mark.slow     # importing jax: seconds
def test_a_jax_array_is_read_in_place(net, native_inputs):
    jnp = pytest.importorskip("jax.numpy", reason="jax is not installed (pip install jax)")
    j = jnp.asarray(X)
    np.testing.assert_array_equal(net(x=j), net(x=X))
    assert native_inputs[0] == [j.unsafe_buffer_pointer()]
    with pytest.raises(TypeError, match=r"cannot share the jaxlib.*\(dtype bfloat16\)"):
        net(x=j.astype(jnp.bfloat16))
