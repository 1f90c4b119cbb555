"""Convolution and pooling: hypothesis-drawn shapes, strides, paddings and
channel counts (1x1 kernels, kernels as large as the input, odd sizes, rows
longer than one register tile), native code against the numpy references,
VJPs against float64 central differences; the layers of the language; the
fused groups; errors for impossible shapes."""
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import structc
from structc.autodiff import differentiate
from structc.build import build_model
from structc.compiler import compile_source
from structc.errors import SnetError
from structc.interp import evaluate
from structc.ops import REGISTRY
from structc.ops.base import Sample
from structc.ops.conv import conv2d_reference, out_size
from structc.syntax import parse
from structc.testing import check_native, check_vjp

FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def conv_cases(draw, dilation=True):
    """(x shape, w shape, attrs) of a convolution with at least one output."""
    n, c, o = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 7))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = (draw(st.integers(1, 2)), draw(st.integers(1, 2))) if dilation else (1, 1)
    pad = tuple(draw(st.integers(0, k - 1)) for k in (kh, kh, kw, kw))
    h = draw(st.integers(max(1, -(-(kh - pad[0] - pad[1] - 1) // dh) + 1), 9))
    w = draw(st.integers(max(1, -(-(kw - pad[2] - pad[3] - 1) // dw) + 1), 40))
    attrs = {"stride": (sh, sw), "padding": pad}
    if (dh, dw) != (1, 1):
        attrs["input_dilation"] = (dh, dw)
    return (n, c, h, w), (o, c, kh, kw), attrs


def test_reference_is_the_seeds_sum_of_cross_correlations(rng):
    """z_j = Σ_i w_ij ⋆ a_i, with ⋆ the 2-D cross-correlation, written out by hand."""
    x, w = rng.normal(size=(2, 3, 6, 7)), rng.normal(size=(4, 3, 3, 2))
    z = conv2d_reference(x, w)
    for n in range(2):
        for j in range(4):
            want = np.zeros((4, 6))
            for i in range(3):
                for r in range(4):
                    for s in range(6):
                        want[r, s] += np.sum(w[j, i] * x[n, i, r:r + 3, s:s + 2])
            np.testing.assert_allclose(z[n, j], want, rtol=1e-12)


@SOME
@given(conv_cases())
def test_conv_vjp_matches_finite_differences(case):
    xs, ws, attrs = case
    check_vjp(REGISTRY["conv2d"], Sample((xs, ws), attrs))


@SOME
@given(conv_cases())
def test_kernel_grad_vjp_matches_finite_differences(case):
    xs, ws, attrs = case
    ref = conv2d_reference(np.zeros(xs), np.zeros(ws), **attrs)
    gs = (xs[0], ws[0], *ref.shape[2:])
    check_vjp(REGISTRY["conv2d_kernel_grad"], Sample((xs, gs), {**attrs, "kernel": ws[2:]}))


@pytest.mark.slow
@FEW
@given(conv_cases())
def test_native_conv_forward_and_gradients(case):
    xs, ws, attrs = case
    check_native(REGISTRY["conv2d"], Sample((xs, ws), attrs))


@pytest.mark.slow
@FEW
@given(conv_cases(dilation=False))
def test_native_kernel_grad(case):
    xs, ws, attrs = case
    ref = conv2d_reference(np.zeros(xs), np.zeros(ws), **attrs)
    gs = (xs[0], ws[0], *ref.shape[2:])
    check_native(REGISTRY["conv2d_kernel_grad"], Sample((xs, gs), {**attrs, "kernel": ws[2:]}))


@pytest.mark.parametrize("xs, ws, attrs", [
    ((2, 3, 5, 150), (5, 3, 3, 4), {"padding": (1, 1, 2, 1)}),           # a row of 10 vectors: chunked
    ((1, 2, 3, 70), (3, 2, 3, 3), {"stride": (1, 2), "padding": (1, 1, 1, 1)}),
    ((2, 1, 28, 28), (3, 1, 28, 28), {}),                                 # kernel as large as the input
    ((2, 20, 4, 4), (33, 20, 1, 1), {}),                                  # 1x1, many channels (tiles)
    ((1, 2, 6, 6), (3, 2, 3, 3), {"padding": (3, 3, 3, 3)}),              # padding = kernel
    # a stride of 2 reads two vectors and keeps the even lanes; an input dilation of 2
    # (a strided convolution's input gradient) in pairs of vectors by column parity (V even),
    # else one vector spread over the even or odd lanes (V odd, or a stride too)
    ((2, 3, 5, 64), (4, 3, 3, 3), {"stride": (2, 2), "padding": (1, 1, 1, 1)}),
    ((1, 2, 4, 33), (3, 2, 2, 2), {"stride": (1, 2)}),
    ((2, 3, 6, 16), (4, 3, 3, 3), {"input_dilation": (2, 2), "padding": (1, 2, 1, 2)}),   # V = 2
    ((1, 2, 3, 17), (3, 2, 2, 2), {"input_dilation": (1, 2)}),                            # pl = 0
    ((1, 2, 3, 30), (3, 2, 3, 4), {"input_dilation": (1, 2), "padding": (0, 0, 3, 2)}),   # V = 4, pl odd
    ((1, 2, 3, 100), (2, 2, 3, 3), {"input_dilation": (1, 2), "padding": (1, 1, 1, 1)}),  # chunked
    ((1, 2, 3, 20), (3, 2, 3, 3), {"input_dilation": (1, 2), "padding": (1, 1, 1, 1)}),   # V = 3
    ((1, 2, 3, 20), (3, 2, 3, 3), {"input_dilation": (2, 2), "stride": (2, 2)}),
    ((1, 2, 3, 70), (3, 2, 3, 5), {"stride": (1, 4), "padding": (1, 1, 2, 2)}),     # 4 vectors, 3 shuffles
    ((1, 1, 2, 90), (2, 1, 1, 11), {"stride": (1, 7)}),
    ((2, 3, 16, 192), (4, 3, 16, 16), {"stride": (16, 16)}),                 # a ViT's patches: 16 vectors for 12 lanes
    # chunked rows: the chunks between the ends load without masks
    ((1, 2, 2, 300), (3, 2, 1, 3), {"stride": (1, 2), "padding": (0, 0, 1, 1)}),
    ((1, 2, 1, 200), (3, 2, 1, 5), {"padding": (0, 0, 2, 2)}),
    ((1, 2, 1, 258), (2, 2, 1, 3), {}),
])
def test_native_conv_edge_shapes(xs, ws, attrs):
    check_native(REGISTRY["conv2d"], Sample((xs, ws), attrs))


@pytest.mark.parametrize("xs, gs, attrs", [
    ((2, 3, 4, 150), (2, 5, 4, 150), {"kernel": (3, 3), "padding": (1, 1, 1, 1)}),    # chunked rows
    ((1, 8, 28, 28), (1, 32, 1, 1), {"kernel": (28, 28)}),     # partial sums too big: straight into dw
    ((3, 2, 5, 5), (3, 40, 5, 5), {"kernel": (1, 1)}),          # many output-channel tiles
    ((2, 3, 7, 20), (2, 4, 4, 7), {"kernel": (4, 5), "stride": (1, 3), "padding": (0, 0, 1, 2)}),
    ((2, 3, 9, 33), (2, 4, 5, 17), {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1, 1, 1)}),
    ((1, 2, 4, 20), (1, 3, 2, 39), {"kernel": (3, 3), "input_dilation": (1, 2), "padding": (0, 0, 1, 1)}),
    ((2, 3, 5, 127), (2, 4, 5, 30), {"kernel": (1, 11), "stride": (1, 4)}),
    ((2, 3, 16, 192), (2, 4, 1, 12), {"kernel": (16, 16), "stride": (16, 16)}),
    # chunked rows (a conv1d over 200 and 150 positions): the chunks between the ends unmasked
    ((2, 3, 1, 200), (2, 4, 1, 200), {"kernel": (1, 5), "padding": (0, 0, 2, 2)}),
    ((1, 2, 1, 150), (1, 3, 1, 150), {"kernel": (1, 3), "padding": (0, 0, 1, 1)}),
    ((2, 3, 1, 300), (2, 4, 1, 150), {"kernel": (1, 3), "stride": (1, 2), "padding": (0, 0, 1, 1)}),
    # 1x1 over the plane as it is: output x channel tiles, sums in registers over the images
    ((2, 13, 4, 8), (2, 7, 4, 8), {"kernel": (1, 1)}),       # whole vectors; tiles of 4 + 3 and 5 + 4 + 4
    ((3, 1, 1, 5), (3, 1, 1, 5), {"kernel": (1, 1)}),        # a plane shorter than a vector
    ((1, 24, 7, 7), (1, 9, 7, 7), {"kernel": (1, 1)}),       # whole tiles of 6 channels; a tail of 1 lane
    ((2, 3, 6, 6), (2, 4, 3, 3), {"kernel": (1, 1), "stride": (2, 2)}),   # strided: the general kernel
])
def test_native_kernel_grad_edge_shapes(xs, gs, attrs):
    check_native(REGISTRY["conv2d_kernel_grad"], Sample((xs, gs), attrs))


@FEW
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4),
       st.integers(1, 3), st.integers(1, 3), st.integers(0, 6), st.integers(0, 20))
@pytest.mark.slow
def test_pools(n, c, kh, kw, sh, sw, extra_h, extra_w):
    shape = (n, c, kh + extra_h, kw + extra_w)
    for op in ("maxpool2d", "avgpool2d"):
        sample = Sample((shape,), {"size": (kh, kw), "stride": (sh, sw)})
        check_vjp(REGISTRY[op], sample, seed=_clear_of_ties(sample))
        check_native(REGISTRY[op], sample)
    check_native(REGISTRY["maxpool2d_argmax"], Sample((shape,), {"size": (kh, kw), "stride": (sh, sw)}))


def _clear_of_ties(sample):
    """A seed whose data has no window with its two largest values within 1e-4
    (finite differences across max-pooling's kink would not be a derivative)."""
    from structc.ops.pool import _windows
    for seed in range(100):
        x = sample.arrays(np.random.default_rng(seed))[0]
        top = np.sort(_windows(x, **sample.attrs), axis=-1)
        if top.shape[-1] == 1 or np.min(top[..., -1] - top[..., -2]) > 1e-4:
            return seed
    raise AssertionError("no seed without near ties")


def test_maxpool_routes_the_delta_to_the_first_maximum():
    x = np.array([[[[1., 3., 3., 0.],
                    [2., 0., 3., 1.]]]])
    idx = REGISTRY["maxpool2d_argmax"].reference(x, size=(2, 2), stride=(2, 2))
    assert idx.tolist() == [[[[1, 2]]]]          # (0,1) and (0,2): ties go to the first
    g = np.array([[[[10., 20.]]]])
    dx = REGISTRY["scatter_argmax"].reference(g, idx, plane=(2, 4))
    assert dx.tolist() == [[[[0., 10., 20., 0.], [0., 0., 0., 0.]]]]


# -- the language ---------------------------------------------------------------------

def _model(body, inp="f32[N, 2, 9, 11]"):
    return f"model M {{ input x: {inp}\n  {body}\n}}"


@pytest.mark.parametrize("options, shape", [
    ("kernel=3", (5, 7, 9)), ("kernel=3, padding=same", (5, 9, 11)), ('kernel="3x5", padding=same', (5, 9, 11)),
    ('kernel="3x5"', (5, 7, 7)), ("kernel=3, stride=2", (5, 4, 5)), ("kernel=3, stride=2, padding=same", (5, 5, 6)),
    ('kernel=2, padding="1x0"', (5, 10, 10)), ('kernel=3, padding="0,2,1,0"', (5, 9, 10)), ("kernel=1", (5, 9, 11)),
    ('kernel=3, padding="same"', (5, 9, 11)), ("kernel=4, padding=same", (5, 9, 11)),
])
def test_conv_layer_options(options, shape):
    mdef = build_model(parse(_model(f"output y = conv2d(x, 5, {options})")))
    assert mdef.graph.nodes[mdef.graph.outputs["y"]].shape == ("N", *shape)
    assert mdef.params["conv1.w"].type.shape[:2] == (5, 2)


def test_conv_layer_matches_numpy_and_padding_same_keeps_the_size(rng):
    net = structc.compile(_model("output y = conv(x, 4, kernel=\"3x4\", padding=same) |> relu"))
    x = rng.normal(size=(3, 2, 9, 11)).astype(np.float32)
    w, bias = net.params["conv1.w"], rng.normal(size=4).astype(np.float32)
    net.params["conv1.b"][...] = bias
    # "same": total padding k - 1, the extra row/column at the bottom/right
    want = np.maximum(conv2d_reference(x.astype(np.float64), w, padding=(1, 1, 1, 2)) + bias[:, None, None], 0)
    np.testing.assert_allclose(net(x=x), want, rtol=1e-4, atol=1e-5)


def test_conv1d(rng):
    net = structc.compile("model M { input x: f32[N, 3, 20]\n output y = conv1d(x, 4, kernel=5, stride=2, "
                          "padding=same) }")
    x = rng.normal(size=(2, 3, 20)).astype(np.float32)
    w = net.params["conv1.w"]
    assert w.shape == (4, 3, 5)
    want = conv2d_reference(x[:, :, None, :].astype(np.float64), w[:, :, None, :], stride=(1, 2),
                            padding=(0, 0, 1, 2))[:, :, 0, :]
    got = net(x=x)
    assert got.shape == (2, 4, 10) == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_pooling_layers_and_global_average(rng):
    net = structc.compile(_model("output a = maxpool2d(x, 3, stride=2)\n output b = avgpool2d(x)\n"
                                 "  output c = global_avg_pool(x)\n output d = flatten(maxpool2d(x, \"2x3\"))"))
    x = rng.normal(size=(2, 2, 9, 11)).astype(np.float32)
    out = net.forward(x=x)
    np.testing.assert_allclose(out["a"], REGISTRY["maxpool2d"].reference(x, size=(3, 3), stride=(2, 2)))
    np.testing.assert_allclose(out["b"], REGISTRY["avgpool2d"].reference(x, size=(2, 2), stride=(2, 2)),
                               rtol=1e-6)
    np.testing.assert_allclose(out["c"], x.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
    assert out["d"].shape == (2, 2 * 4 * 3)


@pytest.mark.parametrize("body, message", [
    ("output y = conv2d(x, 5, kernel=10)", "conv2d: kernel 10x10 is larger than the input 9x11"),
    ("output y = conv2d(x, 5, kernel=0)", "conv2d: kernel must be a positive integer"),
    ("output y = conv2d(x, 5, padding=sideways)", "conv2d: padding must be valid, same"),
    ("output y = conv2d(x, 5, stride=\"2x\")", "conv2d: stride must be a positive integer"),
    ("output y = maxpool2d(x, 12)", "maxpool2d: window 12x12 is larger than the input 9x11"),
    ("output y = conv2d(flatten(x), 5)", "conv2d expects a [batch, channels, height, width] input"),
])
def test_impossible_layers_are_errors(body, message):
    with pytest.raises(SnetError, match=re.escape(message)):
        build_model(parse(_model(body)))


# -- fusion -----------------------------------------------------------------------------

def _groups(source, stage="train.fuse"):
    dumps = {}
    compile_source(source, dump=lambda s, t: dumps.__setitem__(s, t))
    groups = []
    for block in re.findall(r"group \d+ \((\w+)\) -> [^{]*\{\n(.*?)\n  \}", dumps[stage], re.S):
        kind, body = block
        groups.append((kind, re.findall(r"= (\w+)[\[(]", body)))
    return groups


CNN = """model C { input x: f32[N, 2, 10, 10]  target y: class[N] of 3
  h = conv(x, 4, kernel=3, padding=same) |> relu
  h = conv(h, 5, kernel=3) |> relu |> maxpool2d(2)
  loss cross_entropy(dense(flatten(h), 3), y) }"""


@pytest.mark.slow
def test_conv_bias_and_activation_run_in_one_loop_nest():
    groups = _groups(CNN, "forward.fuse")
    assert ("epilogue", ["conv2d", "add", "relu"]) in groups


@pytest.mark.slow
def test_backward_is_cross_correlations_with_fused_masks():
    groups = _groups(CNN)
    # forward: the arg-max is stored by the max-pool's own loop nest
    assert ("kernel", ["maxpool2d", "maxpool2d_argmax"]) in groups
    # the delta routed to the arg-max, times relu's derivative, in one loop nest
    assert ("epilogue", ["greater", "scatter_argmax", "mul"]) in groups
    # the input gradient: a conv2d of the delta with the flipped kernel, the
    # derivative mask of the layer below fused into its store loop
    assert ("epilogue", ["greater", "conv2d", "mul"]) in groups
    assert ("kernel", ["flip_kernel"]) in groups
    # the kernel gradient, in parts over the batch's images, reads the delta once
    # for the bias gradient's parts as well; each is then summed over its parts
    parts = ["conv2d_bias_grad_parts", "conv2d_kernel_grad_parts"]
    assert sum(kind == "kernel" and sorted(ops) == parts for kind, ops in groups) == 2
    assert not any("conv2d_kernel_grad" in ops for _, ops in groups)


def test_a_small_static_batch_keeps_the_kernel_gradient_in_one_piece():
    groups = _groups(CNN.replace("f32[N, 2, 10, 10]", "f32[3, 2, 10, 10]").replace("class[N]", "class[3]"))
    assert sum(kind == "kernel" and sorted(ops) == ["conv2d_kernel_grad", "sum"] for kind, ops in groups) == 2


@pytest.mark.slow
@pytest.mark.parametrize("batch", [5, 1])      # the kernel gradient's parts: 2 and 3 images, or one empty
def test_cnn_gradients_match_the_interpreter(rng, batch):
    net = structc.compile(CNN)
    mdef = build_model(parse(CNN))
    x = rng.normal(size=(batch, 2, 10, 10)).astype(np.float32)
    y = rng.integers(0, 3, batch).astype(np.int32)
    params = {k: v.copy() for k, v in net.params.items()}
    ref = evaluate(differentiate(mdef.graph), {"x": x, "y": y}, params)
    loss, grads = net.grad(x=x, y=y)
    assert loss == pytest.approx(float(ref["loss"]), rel=1e-4)
    for k in grads:
        np.testing.assert_allclose(grads[k], ref[f"grad:{k}"], rtol=2e-3, atol=2e-5, err_msg=k)


POINTWISE = """model P { input x: f32[N, 3, 5, 7]  target y: class[N] of 3
  h = conv(x, 13, kernel=3, padding=same) |> relu
  h = conv(h, 7, kernel=1) |> relu
  loss cross_entropy(dense(flatten(h), 3), y) }"""


@pytest.mark.parametrize("batch, static", [(5, False), (1, False), (3, True)])
def test_pointwise_kernel_and_bias_gradients_match_the_interpreter(rng, batch, static):
    """The 1x1 kernel gradient's own kernel, with the bias gradient in its group: in
    parts of the batch (a batch known at run time) or in one piece (a static one)."""
    source = POINTWISE.replace("[N", f"[{batch}") if static else POINTWISE
    wanted = ["conv2d_kernel_grad", "sum"] if static else ["conv2d_bias_grad_parts", "conv2d_kernel_grad_parts"]
    assert sum(kind == "kernel" and sorted(ops) == wanted for kind, ops in _groups(source)) == 2
    net = structc.compile(source)
    mdef = build_model(parse(source))
    x = rng.normal(size=(batch, 3, 5, 7)).astype(np.float32)
    y = rng.integers(0, 3, batch).astype(np.int32)
    params = {k: v.copy() for k, v in net.params.items()}
    ref = evaluate(differentiate(mdef.graph), {"x": x, "y": y}, params)
    loss, grads = net.grad(x=x, y=y)
    assert loss == pytest.approx(float(ref["loss"]), rel=1e-4)
    for k in grads:
        np.testing.assert_allclose(grads[k], ref[f"grad:{k}"], rtol=2e-3, atol=2e-5, err_msg=k)


def test_out_size():
    assert out_size(28, 5, 1, 0, 0) == 24
    assert out_size(9, 3, 2, 1, 1) == 5
    assert out_size(4, 3, 1, 2, 2, d=2) == 9
    assert out_size(2, 5, 1, 0, 0) == 0


@pytest.mark.slow
def test_digits_cnn_trains_to_97_percent(tmp_path, capsys):
    from pathlib import Path

    from structc.cli import main
    example = Path(__file__).parent.parent / "examples" / "digits_cnn.snet"
    assert main(["train", str(example), "--data", "digits", "--no-progress", "--out", str(tmp_path / "p.npz")]) == 0
    text = capsys.readouterr().out
    accuracy = float(text.strip().splitlines()[-1].rsplit(" ", 1)[-1].rstrip("%"))
    assert accuracy >= 97.0, text



@pytest.mark.parametrize("sample, loops", [(0, {"c", "khl"}), (-1, {"pz", "ps", "psc"})])
def test_kernel_grad_loops_around_its_reductions_are_not_unrolled(sample, loops):
    """The kernel gradient's loops that O3 would otherwise unroll whole (constant
    trip counts) say `llvm.loop.unroll.disable`: with the images innermost (small
    planes), the loops over a task's channels and kernel rows, each around the
    loop over the images; image by image (large planes), zeroing the partial
    sums and their horizontal sums into dw."""
    from structc.compiler import compile_model
    from structc.testing import op_graph
    op = REGISTRY["conv2d_kernel_grad"]
    chosen = op.samples()[sample]
    texts = {}
    compile_model(op_graph(op, chosen, chosen.arrays(np.random.default_rng(0))),
                  dump=lambda stage, text: texts.setdefault(stage, text), jit=False, parts=["forward"])
    not_unrolled = set(re.findall(r'br label %"(\w+)\.head", !llvm\.loop', texts["llvm"]))
    assert loops <= not_unrolled, not_unrolled
