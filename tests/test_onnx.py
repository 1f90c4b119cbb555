"""ONNX export (`structc.onnx`): the exported forward pass, run by onnxruntime,
gives structc's outputs; models ONNX cannot express are refused by name and span."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

import structc
from structc.cli import main
from structc.onnx import OnnxExportError, export

pytestmark = pytest.mark.slow   # launches processes or compiles many models: not in the fast subset

onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx extra: pip install 'structc[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="checking exported models needs onnxruntime (the onnx extra)")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def randomize(net, seed: int = 1) -> None:
    """Every parameter (biases too: they start at zero) set to non-trivial values."""
    rng = np.random.default_rng(seed)
    for name, p in net.params.items():
        net.params[name] = rng.normal(0.0, 0.3, p.shape)


def run_onnx(path, **inputs) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, inputs)))


def assert_same_outputs(net, path, **inputs) -> None:
    ours, theirs = net.forward(**inputs), run_onnx(path, **inputs)
    assert set(ours) == set(theirs)
    for name in ours:
        np.testing.assert_allclose(theirs[name], ours[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("example, pixels", [("digits_mlp", (64,)), ("digits_cnn", (1, 8, 8)),
                                             ("lenet5", (1, 28, 28))])
def test_example_exported_gives_structc_outputs(example, pixels, tmp_path):
    net = structc.compile(EXAMPLES / f"{example}.snet")
    randomize(net)
    path = tmp_path / f"{example}.onnx"
    proto = export(net, path)
    (x_info,) = proto.graph.input
    assert x_info.type.tensor_type.shape.dim[0].dim_param == "N"        # the batch is dynamic
    assert {i.name for i in proto.graph.initializer} >= set(net.params)
    rng = np.random.default_rng(0)
    for batch in (1, 7):
        assert_same_outputs(net, path, x=rng.random((batch, *pixels), dtype=np.float32))


def test_exported_weights_are_the_nets_current_ones(tmp_path):
    net = structc.compile(EXAMPLES / "digits_mlp.snet")
    x = np.random.default_rng(0).random((5, 64), dtype=np.float32)
    export(net, tmp_path / "before.onnx")
    randomize(net, seed=7)
    export(net, tmp_path / "after.onnx")
    assert_same_outputs(net, tmp_path / "after.onnx", x=x)
    assert not np.allclose(run_onnx(tmp_path / "before.onnx", x=x)["probs"], net(x=x))


OPS_MODEL = """
model Ops {
  input  x: f32[N, 2, 6, 6]
  input  s: f32[N, 3, 10]
  param  W: f32[5, 4] = normal(0.5)
  h = conv2d(x, 3, kernel="3x2", stride="2x1", padding="1,0,2,1") |> tanh
  a = avgpool2d(h, 2, stride=1)
  m = maxpool2d(conv(x, 4, padding=same) |> relu, "3x2", stride=2)
  g = global_avg_pool(m)
  c = conv1d(s, 4, kernel=3, stride=2, padding=same) |> sigmoid
  k = concat(flatten(a), flatten(c), g, axis=1)
  d = dense(k, 5)
  e = d @ W
  output probs = softmax(e)
  output stats = concat(sum(e, axes=1) |> reshape(N, 1), mean(square(e), axes=1) |> reshape(N, 1), axis=1)
  output misc = maximum(abs(e), 0.5) * 2.0 - exp(-e) / (1.0 + sqrt(abs(e))) + log(1.0 + square(e)) + threshold(e - 0.1)
  output t = transpose(W) + mean(e)
  output r = reshape(flatten(m), N, 4, 2, 3)
}
"""


def test_every_translated_op_matches_structc(tmp_path):
    net = structc.compile(OPS_MODEL)
    randomize(net, seed=3)
    path = tmp_path / "ops.onnx"
    export(net, path)
    rng = np.random.default_rng(1)
    for batch in (1, 7):
        assert_same_outputs(net, path, x=rng.normal(size=(batch, 2, 6, 6)).astype(np.float32),
                            s=rng.normal(size=(batch, 3, 10)).astype(np.float32))


def test_losses_as_outputs_match_structc(tmp_path):
    net = structc.compile("model L { input x: f32[N, 4]\n target y: class[N] of 3\n target t: f32[N, 1]\n"
                          " z = dense(x, 3)\n p = dense(x, 1)\n"
                          " output c = cross_entropy(z, y)\n"
                          " output m = mse(p, t) + mean(x @ transpose(x))\n"
                          " loss cross_entropy(z, y) + binary_cross_entropy(p, t) }")
    randomize(net)
    export(net, tmp_path / "l.onnx")
    rng = np.random.default_rng(2)
    for batch in (1, 6):
        assert_same_outputs(net, tmp_path / "l.onnx", x=rng.normal(size=(batch, 4)).astype(np.float32),
                            y=rng.integers(0, 3, batch).astype(np.int32),
                            t=rng.random((batch, 1), dtype=np.float32))


@pytest.mark.parametrize("example, op, line", [("logic_tree", "tree_map", 11), ("karate_gcn", "spmm", 11),
                                               ("digits_lstm", "tree_map", 7)])
def test_recursions_and_message_passing_are_refused_by_name_and_span(example, op, line, tmp_path):
    """A recursion over a tree or a sequence, or message passing, is named with
    its span; not the working memory of the recursion's kernel (`scratch`)."""
    net = structc.compile(EXAMPLES / f"{example}.snet")
    with pytest.raises(OnnxExportError) as err:
        export(net, tmp_path / "m.onnx")
    assert op in err.value.message and err.value.span.line == line
    assert "ONNX has no" in err.value.message and "scratch" not in err.value.message
    assert not (tmp_path / "m.onnx").exists()


def test_path_with_params_exports_those_params(tmp_path):
    net = structc.compile(EXAMPLES / "digits_cnn.snet")
    randomize(net, seed=5)
    saved = net.save_params(tmp_path / "p.npz")
    export(EXAMPLES / "digits_cnn.snet", tmp_path / "m.onnx", params=saved)
    assert_same_outputs(net, tmp_path / "m.onnx", x=np.ones((2, 1, 8, 8), np.float32))


def test_path_without_params_warns_that_weights_are_initial(tmp_path):
    with pytest.warns(UserWarning, match="initial, untrained"):
        export(EXAMPLES / "digits_mlp.snet", tmp_path / "m.onnx")


def test_params_mapping_must_name_every_parameter(tmp_path):
    net = structc.compile(EXAMPLES / "digits_mlp.snet")
    params = {k: np.array(v) for k, v in net.params.items()}
    params["dense9.w"] = params.pop("dense3.w")
    with pytest.raises(ValueError, match=r"missing \['dense3.w'\].*not in the model \['dense9.w'\]"):
        export(EXAMPLES / "digits_mlp.snet", tmp_path / "m.onnx", params=params)


def test_net_without_source_is_refused_and_a_foreign_source_detected(tmp_path):
    net = structc.compile(EXAMPLES / "digits_mlp.snet")
    del net._compiled_from                                # as a Net from structc.load
    with pytest.raises(ValueError, match="carries no source"):
        export(net, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="not the one model"):
        export(net, tmp_path / "m.onnx", source=(EXAMPLES / "lenet5.snet").read_text().replace("LeNet5", "DigitsMLP"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export(net, tmp_path / "m.onnx", source=(EXAMPLES / "digits_mlp.snet").read_text())
    # the same parameters, another meaning: exporting it would give other outputs than the net's
    edited = (EXAMPLES / "digits_mlp.snet").read_text().replace("relu", "tanh")
    assert edited != (EXAMPLES / "digits_mlp.snet").read_text()
    with pytest.raises(ValueError, match="its parameters match, but its definition differs"):
        export(net, tmp_path / "m.onnx", source=edited)
    # comments and layout are not the definition
    export(net, tmp_path / "m.onnx", source="# a comment\n\n" + (EXAMPLES / "digits_mlp.snet").read_text())


def test_cli_export_writes_a_model_onnxruntime_runs(tmp_path, capsys):
    net = structc.compile(EXAMPLES / "lenet5.snet")
    randomize(net, seed=2)
    saved = net.save_params(tmp_path / "lenet.npz")
    out = tmp_path / "lenet.onnx"
    assert main(["export", str(EXAMPLES / "lenet5.snet"), "--onnx", str(out), "--params", str(saved)]) == 0
    assert_same_outputs(net, out, x=np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32))


def test_cli_export_of_a_tree_model_prints_the_span(tmp_path, capsys):
    code = main(["export", str(EXAMPLES / "logic_tree.snet"), "--onnx", str(tmp_path / "t.onnx")])
    err = capsys.readouterr().err
    assert code == 1
    assert "logic_tree.snet:11:" in err and "tree_map" in err and "^" in err


@pytest.mark.parametrize("ta, tb", [(False, True), (True, False), (True, True)])
def test_matmul_transpose_flags(ta, tb, tmp_path):
    """The language's forward graphs hold plain matmuls; VJPs and rewrites make the others."""
    from structc.graph import Builder, Graph
    from structc.onnx import translate
    from structc.types import TensorType
    g = Graph("t")
    b = Builder(g)
    x = b.input(name="x", kind="input", type=TensorType((3, "N") if ta else ("N", 3)))
    w = b.param(name="w", type=TensorType((4, 3) if tb else (3, 4)))
    g.inputs["x"], g.params["w"] = x.id, w.id
    g.outputs["y"] = b.matmul(x, w, ta=ta, tb=tb).id
    rng = np.random.default_rng(0)
    wv = rng.normal(size=w.shape).astype(np.float32)
    xv = rng.normal(size=(3, 5) if ta else (5, 3)).astype(np.float32)
    onnx.save(translate(g, {"w": wv}), tmp_path / "t.onnx")
    np.testing.assert_allclose(run_onnx(tmp_path / "t.onnx", x=xv)["y"], (xv.T if ta else xv) @ (wv.T if tb else wv),
                               rtol=1e-5)


def test_embedding_and_onehot_of_integer_inputs(tmp_path):
    net = structc.compile("model E { input w: class[N] of 6\n param E: embedding(6, 4)\n"
                          " output o = concat(E[w], onehot(w), axis=1) |> tanh }")
    randomize(net)
    export(net, tmp_path / "e.onnx")
    for w in ([3], [0, 5, 2, 2, 1, 4, 0]):
        assert_same_outputs(net, tmp_path / "e.onnx", w=np.array(w, np.int32))


def test_ops_only_rewrites_make(tmp_path):
    """slice, broadcast_to (to a symbolic shape), greater and copy: not written in
    .snet, but translated, so checked against their numpy references."""
    from structc.graph import Builder, Graph
    from structc.onnx import translate
    from structc.types import TensorType
    g = Graph("t")
    b = Builder(g)
    x = b.input(name="x", kind="input", type=TensorType(("N", 5)))
    g.inputs["x"] = x.id
    s = b.slice(x, axis=1, start=1, stop=4)
    wide = b.broadcast_to(b.sum(s, axes=(0,)), shape=("N", 3))
    g.outputs["y"] = b.copy(b.greater(s, wide * 0.3) + b.neg(wide)).id
    xv = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    onnx.save(translate(g, {}), tmp_path / "t.onnx")
    sv = xv[:, 1:4]
    wv = np.broadcast_to(sv.sum(0), (6, 3))
    np.testing.assert_allclose(run_onnx(tmp_path / "t.onnx", x=xv)["y"], (sv > wv * 0.3) - wv, rtol=1e-5)


def test_arithmetic_on_integer_inputs_is_done_in_float32_as_structc_does(tmp_path):
    """structc computes on an integer input in float32; the translations of one-operand
    ops and comparisons gave ONNX the int32 tensor itself: an exported file onnxruntime
    refused to load (Exp of int32; Neg's int32 result where a float one was declared)."""
    net = structc.compile("model I { input k: i32[N, 3]\n"
                          " output a = relu(k) + abs(k) + sigmoid(k) + tanh(k) + exp(k * 0.1) + log(k + 1)\n"
                          " output b = sqrt(k) + square(k) - k + threshold(k - 2) + threshold(k) }")
    export(net, tmp_path / "i.onnx")
    for k in ([[0, 5, 2]], [[3, 1, 4], [6, 0, 2]]):
        assert_same_outputs(net, tmp_path / "i.onnx", k=np.array(k, np.int32))


@pytest.mark.parametrize("layer, kernel", [("kernel=4, stride=4", 4),              # patches and a 1x1
                                           ("kernel=8, stride=4, padding=1", 8)])    # the column phases
def test_a_patch_embedding_exports_as_the_convolution_written(tmp_path, layer, kernel):
    """The compiler runs a 4x4 convolution at stride 4 as patches and a 1x1 convolution, an
    8x8 one at stride 4 over its input's column phases (`passes/patches.py`); the export is
    the convolution the source wrote, with its weight."""
    net = structc.compile("model P { input x: f32[N, 3, 16, 20]\n"
                          f"  output y = conv(x, 6, {layer}) |> relu |> flatten\n}}")
    randomize(net, seed=5)
    path = tmp_path / "patches.onnx"
    proto = export(net, path)
    assert [n.op_type for n in proto.graph.node].count("Conv") == 1
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    assert {a.name: list(a.ints) for a in conv.attribute}.get("kernel_shape") == [kernel, kernel]
    rng = np.random.default_rng(2)
    for batch in (1, 5):
        assert_same_outputs(net, path, x=rng.normal(size=(batch, 3, 16, 20)).astype(np.float32))
