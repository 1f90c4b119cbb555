"""Every vector width gives this machine's gradients: models wide enough to take the
kernels' layout paths (B packed in panels, copied in k blocks, rows FAR_ROWS
apart) and convolutions whose tiles the width's registers size, compiled for
SSE (4 lanes), AVX2 (8) and AVX-512 (16, where the machine runs it), against
the host's code.

A layout fixed for one width once read other columns at another: `pack_panels`
lays B out in panels of two AVX-512 vectors, and AVX2 tiles read it as panels of
two of theirs (a tree-RNN of 384 units trained on wrong products on AVX2).
"""
import numpy as np
import pytest

import structc
from structc import api, native
from structc.forest import Forest
from structc.seqdata import Sequences
from test_trees import random_tree

TARGETS = ["generic", "x86-64-v3", "x86-64-v4"]

MODELS = {
    # W [768, 384] and its transpose: rows 1.5 and 3 KiB apart, packed (`tree.pack_wide`)
    "tree_rnn_384": """model T { input t: forest of word(vocab=30)  target y: class[t.trees] of 3
        param E: embedding(30, 384)
        rec h(n) = leaf: E[n.word]  node: tanh(dense(concat(h(n.children)), 384))
        loss cross_entropy(dense(h(t.root), 3), y) }""",
    # the gates' W [24 + 256, 1024]: rows 4 KiB apart, packed, the gate math in the product
    "lstm_256": """model S { input s: sequence of f32[24]  target y: class[s.sequences] of 3
        rec (h, c)(t) = init: (zeros(256), zeros(256))  next: lstm_cell(t.x, h(t.prev), c(t.prev), 256)
        loss cross_entropy(dense(h(s.last), 3), y) }""",
    # B's rows 8 KiB apart: tasks copy their k blocks (`gemm.copies_b`), in pair tiles on AVX-512
    "mlp_2048": """model M { input x: f32[N, 400]  target y: class[N] of 10
        h = dense(x, 2048) |> tanh
        loss cross_entropy(dense(h, 10), y) }""",
    # convolutions' register tiles, sized by the width's registers (`conv._accumulators`,
    # KG_REGS, PW_TILE): 14- and 7-wide rows packed in vectors, a 5x5 kernel's columns
    # in tiles of 3 and 2, a stride and its dilated input gradient, a pointwise
    # convolution's 3 x 4 tiles with remainders, channel counts no tile divides
    "cnn_packed": """model C { input x: f32[N, 3, 18, 18]  target y: class[N] of 4
        h = conv(x, 7, kernel=5) |> relu
        h = conv(h, 5, kernel=3, stride=2, padding=1) |> relu
        h = conv(h, 7, kernel=1) |> relu
        h = conv(h, 6, kernel=3, padding=1) |> relu
        loss cross_entropy(dense(global_avg_pool(h), 4), y) }""",
    # rows of several vectors: chunks at the row's ends and between (`conv.each_chunk`);
    # a 7x7 stride-2 convolution, over its input's column phases without AVX-512 only
    # (`passes.patches.PHASE_STRIDE`)
    "cnn_wide_rows": """model C { input x: f32[N, 2, 6, 70]  target y: class[N] of 4
        h = conv(x, 5, kernel=3, padding=1) |> relu
        h = conv(h, 7, kernel=5, padding=2) |> relu
        h = conv(h, 6, kernel=7, stride=2, padding=3) |> relu
        loss cross_entropy(dense(global_avg_pool(h), 4), y) }""",
}


def _feeds(name):
    rng = np.random.default_rng(5)
    if name == "tree_rnn_384":
        trees = [random_tree(rng, int(rng.integers(1, 14)), 30) for _ in range(7)]
        return {"t": Forest.from_tuples(trees), "y": rng.integers(0, 3, 7).astype(np.int32)}
    if name == "lstm_256":
        lengths = np.array([1, 6, 3, 11])
        x = rng.normal(size=(int(lengths.sum()), 24)).astype(np.float32)
        return {"s": Sequences.from_flat(x, np.concatenate([[0], np.cumsum(lengths)])),
                "y": rng.integers(0, 3, 4).astype(np.int32)}
    if name.startswith("cnn"):
        shape = (3, 18, 18) if name == "cnn_packed" else (2, 6, 70)
        return {"x": rng.normal(size=(5,) + shape).astype(np.float32), "y": rng.integers(0, 4, 5).astype(np.int32)}
    return {"x": rng.normal(size=(29, 400)).astype(np.float32), "y": rng.integers(0, 10, 29).astype(np.int32)}


def _grad(source, feeds, target):
    art = api.compile_artifact(source, target=target, cache=False, parts=["forward", "training"])
    net = structc.Net(art.meta, native.JitModule(art.object, target))
    net.init_params(4)
    return net.grad(**feeds)


@pytest.mark.slow          # a compile per target and model
@pytest.mark.parametrize("name", list(MODELS))
def test_each_vector_width_gives_the_hosts_gradients(name):
    feeds = _feeds(name)
    want_loss, want = _grad(MODELS[name], feeds, native.host_target())
    ran = 0
    for target_name in TARGETS:
        target = native.named_target(target_name)
        if native.missing_features(target) or target.vector_width == native.host_target().vector_width:
            continue        # the host's width is the reference; a width it cannot run, untested here
        loss, grads = _grad(MODELS[name], feeds, target)
        assert loss == pytest.approx(want_loss, rel=1e-5), target_name
        for key, g in want.items():
            np.testing.assert_allclose(grads[key], g, rtol=1e-3, atol=1e-5 * np.abs(g).max(),
                                       err_msg=f"{target_name} {key}")
        ran += 1
    assert ran >= 1, "no other vector width ran: the comparison checked nothing"
