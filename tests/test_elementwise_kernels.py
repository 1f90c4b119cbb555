"""Elementwise kernels' bounds (structc/lower/fused.py): a flat loop cut into chunks of
`1 << 14` elements, each task its chunks, full vectors then one masked; every element
of every chunk written. The op tests' tensors fit one chunk."""
import numpy as np

import structc

CHUNK = 1 << 14     # fused.emit_elementwise_kernel's inner_chunk


def test_a_flat_elementwise_loop_writes_every_element_of_every_chunk():
    """50,000 elements: three whole chunks and a part. Chunks that stopped a vector
    short (start + chunk - vw) left 16 elements of each unwritten: 48 wrong values
    at AVX-512, whatever the workspace held, and no error."""
    net = structc.compile("model E {\n  input x: f32[N, 5]\n  output y = exp(x) * 2 - x\n}\n")
    x = np.random.default_rng(0).normal(size=(10000, 5)).astype(np.float32)
    assert x.size > 3 * CHUNK and x.size % CHUNK
    np.testing.assert_allclose(net.forward(x=x)["y"], np.exp(x) * 2 - x, rtol=1e-5, atol=1e-6)
