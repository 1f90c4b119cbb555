"""Patches (im2col) and the rewrite of a convolution whose kernel is its stride
into patches and a 1x1 convolution (`ops/patches.py`, `lower/patches.py`,
`passes/patches.py`): the ops against a loop-by-loop im2col and float64 finite
differences; whole models against the interpreter on the graph as written,
finite differences, one SGD step, 1 and 2 threads bit for bit; the rewrite
itself (where it happens and where not); exporters reading the graph as written."""
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import structc
from structc import _runtime
from structc.autodiff import differentiate
from structc.build import build_model
from structc.compiler import compile_source
from structc.interp import evaluate
from structc.ops import REGISTRY
from structc.ops.base import Sample
from structc.passes.message import prepare
from structc.syntax import parse
from structc.testing import check_model_grads, check_native, check_vjp

SOME = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def im2col(x, kernel, stride, padding):
    """P[n, c·KH·KW + kh·KW + kw, i, j] = x[n, c, i·sh + kh - pt, j·sw + kw - pl], 0 off the input:
    the definition, element by element."""
    (KH, KW), (sh, sw), (pt, pb, pl, pr) = kernel, stride, padding
    N, C, H, W = x.shape
    OH, OW = (H + pt + pb - KH) // sh + 1, (W + pl + pr - KW) // sw + 1
    P = np.zeros((N, C * KH * KW, OH, OW), x.dtype)
    for c in range(C):
        for kh in range(KH):
            for kw in range(KW):
                for i in range(OH):
                    for j in range(OW):
                        h, w = i * sh + kh - pt, j * sw + kw - pl
                        if 0 <= h < H and 0 <= w < W:
                            P[:, c * KH * KW + kh * KW + kw, i, j] = x[:, c, h, w]
    return P


@st.composite
def patch_cases(draw):
    """(x shape, attrs) with at least one patch: kernel == stride half the time."""
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    if draw(st.booleans()):
        (sh, sw), pad = (kh, kw), (0, 0, 0, 0)
    else:
        sh, sw = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        pad = tuple(draw(st.integers(0, k - 1)) for k in (kh, kh, kw, kw))
    h = draw(st.integers(max(1, kh - pad[0] - pad[1]), 12))
    w = draw(st.integers(max(1, kw - pad[2] - pad[3]), 40))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return (n, c, h, w), {"kernel": (kh, kw), "stride": (sh, sw), "padding": pad}


@SOME
@given(patch_cases())
def test_patches_are_im2col(case):
    shape, attrs = case
    x = np.random.default_rng(0).normal(size=shape)
    want = im2col(x, attrs["kernel"], attrs["stride"], attrs["padding"])
    np.testing.assert_array_equal(REGISTRY["patches"].reference(x, **attrs), want)
    check_native(REGISTRY["patches"], Sample((shape,), attrs))         # native forward and gradient


@SOME
@given(patch_cases())
def test_patches_vjp_matches_finite_differences(case):
    shape, attrs = case
    check_vjp(REGISTRY["patches"], Sample((shape,), attrs))


@pytest.mark.parametrize("shape, attrs", [
    ((2, 3, 5, 70), {"kernel": (1, 4), "stride": (1, 4), "padding": (0, 0, 2, 3)}),     # an 11x11/4 stem's phases
    ((1, 2, 4, 200), {"kernel": (2, 3), "stride": (2, 3), "padding": (1, 1, 1, 2)}),
    ((1, 1, 2, 257), {"kernel": (1, 16), "stride": (1, 16), "padding": (0, 0, 0, 0)}),    # a vector a row, 16 loads
    ((2, 2, 3, 40), {"kernel": (3, 2), "stride": (1, 2), "padding": (1, 1, 0, 1)}),    # overlapping rows, 20 columns
])
@pytest.mark.parametrize("by_element", [False, True])
def test_strided_rows_of_a_vector_or_more_by_shuffles_or_by_element(shape, attrs, by_element, monkeypatch):
    """Rows of at least a vector at strides 2-16 (`_shuffled_rows`): sw loads and shuffles;
    or element by element, as AVX2 and SSE copy strides of 4 or more (`_by_element`),
    whatever vector width the host has."""
    from structc.lower import patches
    from structc.lower.patches import _Geometry, _shuffled_rows
    from structc.native import host_target
    monkeypatch.setattr(patches, "_by_element", lambda geo, vw: by_element)
    ow = (shape[3] + attrs["padding"][2] + attrs["padding"][3] - attrs["kernel"][1]) // attrs["stride"][1] + 1
    geo = _Geometry(shape, (shape[0], 0, 1, ow), attrs)
    assert _shuffled_rows(geo, host_target().vector_width) or ow < host_target().vector_width
    x = np.random.default_rng(1).normal(size=shape)
    np.testing.assert_array_equal(REGISTRY["patches"].reference(x, **attrs),
                                  im2col(x, attrs["kernel"], attrs["stride"], attrs["padding"]))
    check_native(REGISTRY["patches"], Sample((shape,), attrs))


PATCH_EMBED = """
model PatchEmbed {
  input  x: f32[N, 3, 32, 48]
  target y: class[N] of 5
  h = conv(x, 24, kernel=8, stride=8) |> relu
  h = conv(h, 16, kernel=1) |> relu
  loss cross_entropy(dense(global_avg_pool(h), 5), y)
}
"""

# a patch convolution that is not the first layer: its input needs a gradient (patches_grad),
# one of 2x3 patches on a plane that leaves a column over (dropped, as the convolution drops it),
# and a 1-D one
DEEP = """
model Deep {
  input  x: f32[N, 2, 12, 20]
  input  s: f32[N, 4, 30]
  target y: class[N] of 3
  h = conv(x, 6, kernel=3, padding=same) |> tanh
  h = conv(h, 8, kernel="2x3", stride="2x3") |> tanh
  t = conv1d(s, 5, kernel=3, stride=3) |> tanh
  loss cross_entropy(dense(concat(global_avg_pool(h), mean(t, axes=(2,)), axis=1), 3), y)
}
"""


# an 11x11 stride-4 stem (its input's 4 column phases: patches of 1x4 with 4 zero columns past
# the right padding, then a stride-(4, 1) convolution of 3 columns over 12 channels) and, not
# first, a 3x6 stride-2x3 one (its input needs a gradient: patches_grad of the phases)
PHASED = """
model Phased {
  input  x: f32[N, 3, 27, 70]
  target y: class[N] of 3
  h = conv(x, 8, kernel=11, stride=4, padding=(2, 2, 2, 5)) |> tanh
  h = conv(h, 6, kernel="3x6", stride="2x3") |> tanh
  loss cross_entropy(dense(global_avg_pool(h), 3), y)
}
"""


def _inputs(mdef, batch, rng):
    out = {}
    for name, nid in mdef.graph.inputs.items():
        t = mdef.graph.nodes[nid].type
        shape = tuple(batch if d == "N" else d for d in t.shape)
        out[name] = rng.integers(0, 3, shape).astype(np.int32) if not t.is_float else \
            rng.normal(size=shape).astype(np.float32)
    return out


def _dump(source, stage, target="x86-64-v4"):
    """A compile stage's dump, for AVX-512 code unless said (the rewrites depend on the width)."""
    from structc.native import named_target
    dumps = {}
    compile_source(source, target=named_target(target), dump=lambda s, t: dumps.__setitem__(s, t), jit=False)
    return dumps[stage]


def _ops(source, stage, target="x86-64-v4"):
    return re.findall(r"= (\w+)[\[(]", _dump(source, stage, target))


def test_a_patch_convolution_becomes_patches_and_a_1x1_convolution():
    forward = _ops(PATCH_EMBED, "graph.patch_convs")
    assert forward.count("patches") == 1 and forward.count("conv2d") == 2
    line = next(x for x in _dump(PATCH_EMBED, "graph.patch_convs").splitlines() if "patches[" in x)
    assert "kernel=8x8, stride=8x8" in line and line.rstrip().endswith(":5:7")     # the conv's span
    train = _ops(PATCH_EMBED, "train.fuse")
    assert "patches_grad" not in train        # x is an input: no col2im at all
    assert "conv2d_kernel_grad_parts" in train
    groups = re.findall(r"group \d+ \((\w+)\) -> [^{]*\{\n(.*?)\n  \}", _dump(DEEP, "train.fuse"), re.S)
    (kind, body), = [(k, b) for k, b in groups if "patches_grad[" in b]
    assert kind == "epilogue" and "= mul(" in body     # tanh's derivative mask below, as the planes are stored


def test_a_row_stride_of_3_or_more_runs_over_the_inputs_column_phases():
    dump = _dump(PHASED, "graph.patch_convs")
    lines = [x for x in dump.splitlines() if "= patches" in x]
    assert len(lines) == 4 and all("kernel=1x4, stride=1x4" in x or "kernel=1x3, stride=1x3" in x for x in lines)
    convs = [x for x in dump.splitlines() if "= conv2d" in x]
    assert len(convs) == 2 and all("stride=4x1" in x or "stride=2x1" in x for x in convs), convs
    assert "patches_grad" in _ops(PHASED, "train.fuse")      # the second one's input needs a gradient
    # a padded patch convolution: not patches and a 1x1 convolution, but its column phases
    padded = _dump("model M { input x: f32[N, 2, 16, 16]\n  output y = conv(x, 4, kernel=4, stride=4, padding=1)\n}",
                   "graph.patch_convs")
    assert "= conv2d[stride=4x1, padding=1,1,0,0]" in padded and "kernel=1x4, stride=1x4, padding=0,0,1,0](%0)" in padded


@pytest.mark.parametrize("layer", ["conv(x, 4, kernel=4, stride=2)", "conv(x, 4, kernel=1)", "conv(x, 4, kernel=3, stride=1)",
                                   "conv(x, 4, kernel=7, stride=3)",        # 9 taps for 7: too many zeros
                                   "conv(x, 4, kernel=5, stride=2)"])       # stride 2: by shuffles as it is
def test_convolutions_with_overlap_padding_or_1x1_stay_as_written(layer):
    src = f"model M {{ input x: f32[N, 2, 16, 16]\n  output y = {layer}\n}}"
    assert "patches" not in _ops(src, "graph.patch_convs")


@pytest.mark.parametrize("target, phased", [("x86-64-v4", False), ("x86-64-v3", True), ("generic", True)])
def test_a_row_stride_of_2_runs_over_phases_in_code_without_avx512(target, phased):
    """AVX2 and SSE shuffle two vectors in several instructions: a 7x7 stride-2 stem's
    rows run over their 2 column phases there (`PHASE_STRIDE`), by shuffles with AVX-512."""
    src = "model M { input x: f32[N, 3, 20, 20]\n  output y = conv(x, 4, kernel=7, stride=2, padding=3)\n}"
    dump = _dump(src, "graph.patch_convs", target)
    assert ("kernel=1x2, stride=1x2" in dump) == phased
    assert ("= conv2d[stride=2x1" in dump) == phased      # values: tests/test_vector_widths.py


def test_input_dilations_are_never_rewritten():
    """An input gradient is a convolution over a stride-dilated delta: it comes after the rewrite, and
    the rule refuses one anyway (its kernel read with input_dilation is not a patch of its input)."""
    from structc.passes.patches import patch_convs
    from structc.types import TensorType
    mdef = build_model(parse("model M { input x: f32[N, 2, 8, 8]\n  output y = conv(x, 3, kernel=2, stride=2)\n}"))
    g = mdef.graph.copy()
    conv = next(n for n in g.nodes.values() if n.op.name == "conv2d")
    conv.attrs["input_dilation"] = (2, 2)
    conv.type = TensorType(("N", 3, 7, 7), "f32")         # 8x8 dilated to 15x15, 2x2 at stride 2
    assert all(n.op.name != "patches" for n in patch_convs(g).nodes.values())


def test_the_weight_keeps_its_name_shape_and_meaning(rng):
    net = structc.compile(PATCH_EMBED, seed=3)
    assert net.params["conv1.w"].shape == (24, 3, 8, 8)
    mdef = build_model(parse(PATCH_EMBED))
    x = rng.normal(size=(4, 3, 32, 48)).astype(np.float32)
    params = {k: v.astype(np.float64) for k, v in net.params.items()}
    want = evaluate(mdef.graph, {"x": x, "y": np.zeros(4, np.int32)}, params, outputs=["probs"])["probs"]
    np.testing.assert_allclose(net(x=x), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("source, batch", [(PATCH_EMBED, 5), (DEEP, 4), (PHASED, 3)])
def test_gradients_and_a_step_match_the_graph_as_written(source, batch, rng):
    net = structc.compile(source, seed=1)
    for name in net.params:         # biases too: they start at zero
        net.params[name] = rng.normal(0, 0.3, net.params[name].shape)
    mdef = build_model(parse(source))
    inputs = _inputs(mdef, batch, rng)
    params = {k: v.copy() for k, v in net.params.items()}
    as_written = evaluate(differentiate(mdef.graph), inputs, {k: v.astype(np.float64) for k, v in params.items()})
    loss, grads = net.grad(**inputs)
    assert loss == pytest.approx(float(as_written["loss"]), rel=1e-4)
    for k in grads:
        np.testing.assert_allclose(grads[k], as_written[f"grad:{k}"], rtol=2e-3, atol=2e-5, err_msg=k)
    # the rewritten forward graph, interpreted: its gradient against finite differences
    rewritten = build_model(parse(source))
    rewritten.graph = prepare(rewritten.graph)
    assert any(n.op.name == "patches" for n in rewritten.graph.nodes.values())
    check_model_grads(rewritten, inputs, params)
    # one SGD step moves every parameter by -lr times its gradient
    net.train_step(lr=0.1, **inputs)
    for k in grads:
        np.testing.assert_allclose(net.params[k], params[k] - 0.1 * as_written[f"grad:{k}"],
                                   rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("source", [PATCH_EMBED, DEEP, PHASED])
def test_one_thread_and_two_give_the_same_bits(source):
    net = structc.compile(source, seed=2)
    mdef = build_model(parse(source))
    inputs = _inputs(mdef, 64, np.random.default_rng(5))
    before, handed = structc.get_num_threads(), _runtime.handoffs()
    try:
        structc.set_num_threads(1)
        one = net.grad(**inputs)
        structc.set_num_threads(2)
        two = net.grad(**inputs)
    finally:
        structc.set_num_threads(before)
    assert _runtime.handoffs() > handed, "nothing ran on two threads: the comparison checked nothing"
    assert one[0] == two[0]
    for k in one[1]:
        np.testing.assert_array_equal(one[1][k], two[1][k], err_msg=k)


def test_profile_counts_the_convolutions_flops_and_names_the_users_line():
    net = structc.compile(PATCH_EMBED)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 3, 32, 48)).astype(np.float32), np.zeros(8, np.int32)
    report = net.profile(steps=2, x=x, y=y)
    dims = {"N": 8}
    mine = [r.kernel for r in report.rows if r.kernel.line == 5]        # the patch convolution's line
    assert {"patches", "conv2d", "conv2d_kernel_grad_parts"} <= {k.op for k in mine}, report.table()
    forward = next(k for k in mine if k.op == "conv2d")
    assert forward.flop_count(dims) == 2 * 8 * 24 * 4 * 6 * 3 * 8 * 8, report.table()


def test_a_frozen_patch_convolution_stays_frozen_and_nothing_warns(rng):
    import warnings
    from structc.errors import GradientWarning
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)     # the reshaped weight still gets its gradient
        structc.compile(PATCH_EMBED).train_step(lr=0.1, **_inputs(build_model(parse(PATCH_EMBED)), 2, rng))
    net = structc.compile(PATCH_EMBED, freeze=["conv1"])
    before = {k: v.copy() for k, v in net.params.items()}
    net.train_step(lr=0.1, **_inputs(build_model(parse(PATCH_EMBED)), 4, rng))
    np.testing.assert_array_equal(net.params["conv1.w"], before["conv1.w"])
    assert not np.array_equal(net.params["conv2.w"], before["conv2.w"])
