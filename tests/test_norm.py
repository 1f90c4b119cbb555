"""Normalisation layers (`layers/norm.py`, `ops/norm.py`): layer_norm against
numpy and finite differences; batch_norm's training form, running statistics
(PyTorch's rule, k steps) and inference form; its buffers through checkpoints,
shipping, freezing; conv + batch norm + ReLU in one epilogue."""
import re
import shutil
import warnings

import numpy as np
import pytest

import structc
from structc import ship
from structc.cli import main
from structc.build import build_model
from structc.compiler import compile_source, forward_graph
from structc.errors import GradientWarning, SnetError
from structc.passes import run_pipeline
from structc.syntax import parse
from structc.testing import check_model_grads

LN = """model LN {
  input  x: f32[N, 3, 7]
  target t: f32[N, 3, 7]
  y = layer_norm(x, eps=0.001)
  loss mse(y, t)
}"""

BN_CONV = """model BC {
  input  x: f32[N, 3, 6, 6]
  target y: class[N] of 5
  h = conv(x, 4, kernel=3) |> batch_norm(momentum=0.2) |> relu
  loss cross_entropy(dense(flatten(h), 5), y)
}"""

BN_DENSE = """model BD {
  input  x: f32[N, 6]
  target y: class[N] of 3
  h = dense(x, 5) |> batch_norm |> relu
  loss cross_entropy(dense(h, 3), y)
}"""


def _ln_numpy(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def _bn_numpy(x, g, b, mean, var, eps):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * g.reshape(shape) + b.reshape(shape)


def _batch_stats(x):
    axes = tuple(k for k in range(x.ndim) if k != 1)
    n = x.size // x.shape[1]
    mean = x.mean(axes, dtype=np.float64)
    var = x.astype(np.float64).var(axes)
    return mean, var, var * n / (n - 1)


@pytest.fixture
def rng():
    return np.random.default_rng(5)


# -- layer_norm ------------------------------------------------------------------

def test_layer_norm_forward_and_params(rng):
    net = structc.compile(LN)
    assert [(k, v.shape) for k, v in net.params.items()] == [("ln1.g", (7,)), ("ln1.b", (7,))]
    np.testing.assert_array_equal(net.params["ln1.g"], 1)
    np.testing.assert_array_equal(net.params["ln1.b"], 0)
    net.params["ln1.g"] = rng.normal(size=7).astype(np.float32)
    net.params["ln1.b"] = rng.normal(size=7).astype(np.float32)
    x = (rng.normal(size=(4, 3, 7)) * 3 + 2).astype(np.float32)
    want = _ln_numpy(x.astype(np.float64), net.params["ln1.g"], net.params["ln1.b"], 1e-3)
    np.testing.assert_allclose(net(x=x), want, rtol=1e-4, atol=1e-5)


def test_layer_norm_gradient_matches_finite_differences(rng):
    mdef = build_model(parse(LN))
    x = rng.normal(size=(2, 3, 7))
    params = {"ln1.g": rng.normal(size=7), "ln1.b": rng.normal(size=7)}
    check_model_grads(mdef, {"x": x, "t": rng.normal(size=(2, 3, 7))}, params)


def test_layer_norm_native_gradient_matches_torch(rng):
    torch = pytest.importorskip("torch")
    net = structc.compile(LN)
    x = rng.normal(size=(4, 3, 7)).astype(np.float32)
    t = rng.normal(size=(4, 3, 7)).astype(np.float32)
    loss, grads = net.grad(x=x, t=t)
    ln = torch.nn.LayerNorm(7, eps=1e-3)
    ref = torch.nn.functional.mse_loss(ln(torch.tensor(x)), torch.tensor(t))
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    np.testing.assert_allclose(grads["ln1.g"], ln.weight.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["ln1.b"], ln.bias.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_layer_norm_nan_stays_in_its_row(rng):
    net = structc.compile(LN)
    x = rng.normal(size=(2, 3, 7)).astype(np.float32)
    x[1, 2, 4] = np.nan
    y = net(x=x)
    assert np.isnan(y[1, 2]).all()
    assert np.isfinite(np.delete(y.reshape(6, 7), 5, axis=0)).all()


def test_layer_norm_rejects_bad_eps_and_integers():
    with pytest.raises(SnetError, match="eps must be a number greater than 0"):
        build_model(parse(LN.replace("eps=0.001", "eps=0")))
    for layer in ("layer_norm", "batch_norm"):
        with pytest.raises(SnetError, match=f"{layer} expects f32 values, got i32"):
            build_model(parse(f"model M {{ input k: i32[N, 4]\n output o = {layer}(k) }}"))


# -- batch_norm: training, running statistics, inference ---------------------------

def _torch_conv_bn(net, torch):
    conv = torch.nn.Conv2d(3, 4, 3)
    bn = torch.nn.BatchNorm2d(4, momentum=0.2)
    with torch.no_grad():
        conv.weight[...] = torch.tensor(net.params["conv1.w"])
        conv.bias[...] = torch.tensor(net.params["conv1.b"])
    return conv, bn


def test_batch_norm_running_statistics_follow_pytorch_after_k_steps(rng):
    """The running mean and the running UNBIASED variance follow PyTorch's rule
    with momentum 0.2 over three steps (Adam with weight decay: the update
    never touches them); inference reads them."""
    torch = pytest.importorskip("torch")
    net = structc.compile(BN_CONV)
    net.set_optimizer("adam", weight_decay=0.5)
    assert net.meta["buffers"] == ["bn1.mean", "bn1.var"] and net.meta["frozen"] == []
    conv, bn = _torch_conv_bn(net, torch)
    for step in range(3):
        x = (rng.normal(size=(5, 3, 6, 6)) * 2 + 1).astype(np.float32)
        y = rng.integers(0, 5, 5).astype(np.int32)
        with torch.no_grad():     # PyTorch's module sees the same weights as this step
            conv.weight[...] = torch.tensor(net.params["conv1.w"])
            conv.bias[...] = torch.tensor(net.params["conv1.b"])
            bn.train()
            z = bn(conv(torch.tensor(x)))
            z.numpy()
        net.train_step(lr=0.05, x=x, y=y)
    np.testing.assert_allclose(net.params["bn1.mean"], bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.params["bn1.var"], bn.running_var.numpy(), rtol=1e-5, atol=1e-6)
    bn.eval()
    with torch.no_grad():
        bn.weight[...] = torch.tensor(net.params["bn1.g"])
        bn.bias[...] = torch.tensor(net.params["bn1.b"])
        conv.weight[...] = torch.tensor(net.params["conv1.w"])
        conv.bias[...] = torch.tensor(net.params["conv1.b"])
        h = torch.relu(bn(conv(torch.tensor(x)))).flatten(1).numpy()
    logits = h @ net.params["dense1.w"] + net.params["dense1.b"]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(net(x=x), probs / probs.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)


def test_batch_norm_dense_statistics_and_forms(rng):
    """[N, F]: one running update against the formula (n = N values per feature),
    the training loss from batch statistics, inference from running ones."""
    net = structc.compile(BN_DENSE)
    x = (rng.normal(size=(8, 6)) * 3 - 1).astype(np.float32)
    y = rng.integers(0, 3, 8).astype(np.int32)
    h = x @ net.params["dense1.w"] + net.params["dense1.b"]
    mean, var, unbiased = _batch_stats(h)
    loss, _ = net.grad(x=x, y=y)      # gradients only: updates the running statistics too (as documented)
    np.testing.assert_allclose(net.params["bn1.mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.params["bn1.var"], 0.9 + 0.1 * unbiased, rtol=1e-5)
    g, b = net.params["bn1.g"], net.params["bn1.b"]
    logits = np.maximum(_bn_numpy(h, g, b, mean, var, 1e-5), 0) @ net.params["dense2.w"] + net.params["dense2.b"]
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    assert loss == pytest.approx(-logp[np.arange(8), y].mean(), rel=1e-5)
    before = {k: v.copy() for k, v in net.params.items()}
    out = net(x=x)
    for k in before:                  # inference writes nothing
        np.testing.assert_array_equal(net.params[k], before[k])
    hn = np.maximum(_bn_numpy(h, g, b, net.params["bn1.mean"], net.params["bn1.var"], 1e-5), 0)
    logits = hn @ net.params["dense2.w"] + net.params["dense2.b"]
    p = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(out, p / p.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)


def test_batch_norm_training_gradient_matches_finite_differences(rng):
    mdef = build_model(parse(BN_DENSE))
    net = structc.compile(BN_DENSE)
    params = {k: v.astype(np.float64) + 0.1 * rng.normal(size=v.shape) for k, v in net.params.items()}
    feed = {"x": rng.normal(size=(6, 6)), "y": rng.integers(0, 3, 6).astype(np.int32)}
    check_model_grads(mdef, feed, params)


def test_batch_norm_native_gradient_matches_torch(rng):
    torch = pytest.importorskip("torch")
    net = structc.compile(BN_CONV)
    x = rng.normal(size=(4, 3, 6, 6)).astype(np.float32)
    y = rng.integers(0, 5, 4).astype(np.int32)
    net.params["bn1.g"] = rng.normal(size=4).astype(np.float32)
    loss, grads = net.grad(x=x, y=y)
    conv, bn = _torch_conv_bn(net, torch)
    dense = torch.nn.Linear(64, 5)
    with torch.no_grad():
        bn.weight[...] = torch.tensor(net.params["bn1.g"])
        dense.weight[...] = torch.tensor(net.params["dense1.w"].T)
        dense.bias[...] = torch.tensor(net.params["dense1.b"])
    ref = torch.nn.functional.cross_entropy(dense(torch.relu(bn(conv(torch.tensor(x)))).flatten(1)),
                                            torch.tensor(y, dtype=torch.long))
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    for name, t in [("conv1.w", conv.weight), ("conv1.b", conv.bias), ("bn1.g", bn.weight), ("bn1.b", bn.bias)]:
        np.testing.assert_allclose(grads[name], t.grad.numpy(), rtol=2e-3, atol=2e-5, err_msg=name)
    assert not grads["bn1.mean"].any() and not grads["bn1.var"].any()


def test_batch_norm_refuses_training_on_one_value_per_channel(rng):
    net = structc.compile(BN_DENSE)
    x = rng.normal(size=(1, 6)).astype(np.float32)
    before = net.params["bn1.var"].copy()
    with pytest.raises(ValueError, match="bn1.var: batch normalisation in training needs more than one value"):
        net.train_step(x=x, y=np.zeros(1, np.int32))
    np.testing.assert_array_equal(net.params["bn1.var"], before)
    assert net(x=x).shape == (1, 3)      # inference on one example is fine


@pytest.mark.slow     # compiles and trains (or links a library): about 3 s
def test_the_epoch_loop_skips_a_last_batch_of_one_and_says_so_once(rng):
    """33 examples in batches of 8: each epoch's last batch holds one example, which
    batch norm cannot train on; the loop skips it (saying so once) instead of
    stopping mid-epoch, and ends where training on the first 32 alone ends."""
    from structc import datasets
    from structc.train import TrainConfig, train
    x = rng.normal(size=(33, 6)).astype(np.float32)
    y = rng.integers(0, 3, 33).astype(np.int32)
    net = structc.compile(BN_DENSE)
    data = datasets.ArrayDataset("d", x, y, x[:4], y[:4]).bind(net)
    lines = []
    history = train(net, data, TrainConfig(epochs=2, batch=8, progress=False), log=lines.append)
    skips = [line for line in lines if "skipping a batch that batch normalisation cannot train on" in line]
    assert len(skips) == 1 and skips[0].startswith("epoch 1:") and len(history.epochs) == 2
    alone = structc.compile(BN_DENSE)          # the same run by hand, without the lone examples
    shuffle = np.random.default_rng(0)
    alone.set_optimizer("sgd")
    for _ in range(2):
        for feed in data.batches(8, shuffle):
            if len(feed["y"]) > 1:
                alone.train_step(lr=0.1, **feed)
    for name in net.params:
        np.testing.assert_array_equal(net.params[name], alone.params[name], err_msg=name)
    with pytest.raises(ValueError, match="a batch of one"):       # nothing left to train on: refused
        train(net, data, TrainConfig(epochs=1, batch=1, progress=False), log=lines.append)


def test_evaluation_leaves_the_running_statistics_alone(rng):
    """Held-out evaluation (`Net.loss`, which every data set's `evaluate` uses)
    once ran the training call: it moved the running statistics towards the
    test data, and a last test batch of one stopped the run."""
    net = structc.compile(BN_DENSE)
    x, y = rng.normal(size=(8, 6)).astype(np.float32), rng.integers(0, 3, 8).astype(np.int32)
    net.train_step(x=x, y=y)
    before = {n: net.params[n].copy() for n in ("bn1.mean", "bn1.var")}
    loss = net.loss(x=x[:1] + 5, y=y[:1])
    assert np.isfinite(loss)
    net.loss(x=x + 5, y=y)
    for name, value in before.items():
        np.testing.assert_array_equal(net.params[name], value)


def _cross_entropy(logits, y):
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean()


def test_held_out_loss_uses_the_running_statistics(rng):
    """`Net.loss` (held-out loss, val_loss, what early stopping picks an epoch by) is
    the loss of the model as used: batch norm with its running statistics, like the
    forward entry's predictions, not with the evaluated batch's own statistics."""
    net = structc.compile(BN_DENSE)
    x, y = rng.normal(size=(8, 6)).astype(np.float32), rng.integers(0, 3, 8).astype(np.int32)
    for _ in range(3):
        net.train_step(lr=0.1, x=x, y=y)
    xs = x * 2 + 1          # far from the running statistics: the two forms differ a lot
    h = xs @ net.params["dense1.w"] + net.params["dense1.b"]
    hn = np.maximum(_bn_numpy(h, net.params["bn1.g"], net.params["bn1.b"], net.params["bn1.mean"],
                              net.params["bn1.var"], 1e-5), 0)
    want = _cross_entropy(hn @ net.params["dense2.w"] + net.params["dense2.b"], y)
    assert net.loss(x=xs, y=y) == pytest.approx(want, rel=1e-5)
    probs = net(x=xs)
    assert net.loss(x=xs, y=y) == pytest.approx(-np.log(probs[np.arange(8), y]).mean(), rel=1e-5)
    assert net.loss(x=xs[:1], y=y[:1]) == pytest.approx(-np.log(probs[0, y[0]]), rel=1e-5)   # a batch of one


@pytest.mark.slow     # compiles and trains (or links a library): about 3 s
def test_batch_norm_library_without_the_loss_entry_refuses_loss(rng, tmp_path):
    """A library built from the eager parts only (no eval_loss entry) refuses
    `loss` rather than answering with the batch's own statistics."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    from structc import api
    ship.write_shared_library(api.compile_artifact(BN_DENSE, jit=False), tmp_path / "bd.so")
    lib = ship.load(tmp_path / "bd.so")
    with pytest.raises(TypeError, match="no held-out loss entry"):
        lib.loss(x=np.zeros((2, 6), np.float32), y=np.zeros(2, np.int32))


def test_batch_norm_options_are_checked():
    with pytest.raises(SnetError, match=r"momentum must be a number in \(0, 1\]"):
        structc.compile(BN_DENSE.replace("batch_norm", "batch_norm(momentum=1.5)"))
    with pytest.raises(SnetError, match="batch_norm expects"):
        structc.compile(BN_DENSE.replace("dense(x, 5) |> batch_norm", "batch_norm(sum(x, axes=1))"))


# -- buffers: no gradient, no warning, freezing, checkpoints, shipping ----------------

def test_structc_check_gives_no_gradient_warning_for_buffers(tmp_path, capsys):
    path = tmp_path / "bc.snet"
    path.write_text(BN_CONV)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        assert main(["check", str(path)]) == 0
    assert "ok" in capsys.readouterr().out


def test_buffers_raise_no_gradient_warning_and_freezing_keeps_working(rng):
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        net = structc.compile(BN_CONV, freeze=["bn1"])
    assert net.meta["frozen"] == ["bn1.b", "bn1.g"]
    x = rng.normal(size=(4, 3, 6, 6)).astype(np.float32)
    y = rng.integers(0, 5, 4).astype(np.int32)
    g0, w0 = net.params["bn1.g"].copy(), net.params["conv1.w"].copy()
    net.train_step(lr=0.1, x=x, y=y)
    np.testing.assert_array_equal(net.params["bn1.g"], g0)                # frozen: not trained
    assert not np.array_equal(net.params["conv1.w"], w0)
    np.testing.assert_array_equal(net.params["bn1.mean"], 0)    # a frozen layer keeps its statistics too


@pytest.mark.parametrize("freeze, layer", [(["bn1"], ""), (["bn1.mean", "bn1.var"], ""),
                                           ([], "(frozen=true)")], ids=["layer", "by-name", "frozen-true"])
def test_a_frozen_batch_norm_keeps_its_statistics_and_trains_with_them(rng, freeze, layer):
    """A frozen batch norm layer (freeze=["bn1"], its statistics by name, or
    batch_norm(frozen=true)) still had its running statistics moved by every
    training call (bn1.mean 0 -> up to 0.44 after one step): the frozen layer computed
    something else than the loaded one. They now stay as loaded and training
    normalises with them (its loss is the held-out one), so a batch of one trains too."""
    net = structc.compile(BN_CONV.replace("batch_norm(momentum=0.2)", f"batch_norm{layer}"), freeze=freeze)
    net.params["bn1.mean"][...] = rng.normal(size=4)
    net.params["bn1.var"][...] = rng.uniform(0.5, 2.0, size=4)
    kept = {k: net.params[k].copy() for k in ("bn1.mean", "bn1.var")}
    x = rng.normal(size=(4, 3, 6, 6)).astype(np.float32) * 2 + 1
    y = rng.integers(0, 5, 4).astype(np.int32)
    held_out = net.loss(x=x, y=y)
    loss, _ = net.grad(x=x, y=y)
    assert loss == pytest.approx(held_out, rel=1e-6)
    w0 = net.params["conv1.w"].copy()
    net.train_step(lr=0.1, x=x, y=y)
    net.train_step(lr=0.1, x=x[:1], y=y[:1])            # no batch statistics: one example is fine
    for k, v in kept.items():
        np.testing.assert_array_equal(net.params[k], v, err_msg=k)
    assert not np.array_equal(net.params["conv1.w"], w0)


def test_batch_norm_scale_and_shift_frozen_alone_leave_the_statistics_to_the_batches(rng):
    net = structc.compile(BN_CONV, freeze=["bn1.g", "bn1.b"])
    x = rng.normal(size=(4, 3, 6, 6)).astype(np.float32) + 1
    net.train_step(lr=0.1, x=x, y=rng.integers(0, 5, 4).astype(np.int32))
    assert not np.array_equal(net.params["bn1.mean"], 0)
    with pytest.raises(ValueError, match="freeze: bn1.mean is one of batch norm's running statistics, read "
                                         "with bn1.var: freeze both"):
        structc.compile(BN_CONV, freeze=["bn1.mean"])


def test_running_statistics_survive_a_checkpoint(rng, tmp_path):
    net = structc.compile(BN_CONV)
    x = rng.normal(size=(4, 3, 6, 6)).astype(np.float32)
    y = rng.integers(0, 5, 4).astype(np.int32)
    for _ in range(2):
        net.train_step(lr=0.01, x=x, y=y)
    path = net.save_params(tmp_path / "p.npz")
    other = structc.compile(BN_CONV, seed=3)
    other.load_params(path)
    for k in ("bn1.mean", "bn1.var"):
        np.testing.assert_array_equal(other.params[k], net.params[k])
    np.testing.assert_array_equal(other(x=x), net(x=x))


# -- inference: batch norm in the convolution's epilogue -------------------------------

def test_conv_batch_norm_relu_run_in_one_epilogue():
    """The forward entry's batch norm is x·s + t per channel: the convolution
    stores conv + bias, times s, plus t, through relu in one loop."""
    g = run_pipeline(forward_graph(build_model(parse(BN_CONV))))
    ops = {nid: g.nodes[nid].op.name for gr in g.groups for nid in gr.members}
    assert "running_average" not in ops.values() and "batch_norm_mode" not in ops.values()
    (conv,) = [gr for gr in g.groups if any(ops[m] == "conv2d" for m in gr.members)]
    assert conv.kind == "epilogue"
    assert [ops[m] for m in conv.members] == ["conv2d", "add", "mul", "add", "relu"]


def test_parts_of_one_compile_define_each_kernel_once():
    """A shared library links every part's objects: the loss kernel the training and
    evaluation parts both call is defined by one of them (`lower.module.defined_once`)
    and declared by the other, else the link fails on a symbol defined twice."""
    a = compile_source(BN_CONV, jit=False, parts=("forward", "training", "evaluation"))
    names = [n for t in a.part_ir for n in re.findall(r'^define (?!internal )[^@]*@"([^"]+)"', t, re.M)]
    assert len(names) == len(set(names)), sorted(n for n in set(names) if names.count(n) > 1)
    evaluation = a.part_ir[sum(len(a.meta["objects"][p]) for p in ("forward", "training")):]
    assert any(re.search(r'^declare hidden [^@]*@"sc_[0-9a-f]+_xent"', t, re.M) for t in evaluation)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
@pytest.mark.slow
def test_shipped_library_keeps_running_statistics(rng, tmp_path):
    """`structc compile -o` with `--params`: the library's forward entry reads the
    running statistics it was built with."""
    src = tmp_path / "bc.snet"
    src.write_text(BN_CONV)
    net = structc.compile(BN_CONV)
    x = rng.normal(size=(4, 3, 6, 6)).astype(np.float32)
    net.train_step(lr=0.01, x=x, y=rng.integers(0, 5, 4).astype(np.int32))
    params = net.save_params(tmp_path / "p.npz")
    assert main(["compile", str(src), "-o", str(tmp_path / "bc.so"), "--params", str(params)]) == 0
    shipped = ship.load(tmp_path / "bc.so")
    np.testing.assert_array_equal(shipped.params["bn1.var"], net.params["bn1.var"])
    np.testing.assert_array_equal(shipped(x=x), net(x=x))
    y = rng.integers(0, 5, 4).astype(np.int32)
    assert shipped.loss(x=x, y=y) == net.loss(x=x, y=y)     # the library holds the held-out loss entry


@pytest.mark.slow
def test_onnx_export_of_the_inference_forms(rng, tmp_path):
    """The forward graph's batch norm is x·s + t and layer_norm ordinary ops:
    both export as they are, running statistics as initializers."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from structc.onnx import export
    src = BN_CONV.replace("loss cross_entropy(dense(flatten(h), 5), y)",
                          "loss cross_entropy(dense(layer_norm(flatten(h)), 5), y)")
    net = structc.compile(src)
    for name, p in net.params.items():
        net.params[name] = rng.uniform(0.5, 1.5, p.shape)      # positive: var is one of them
    export(net, tmp_path / "m.onnx")
    x = rng.normal(size=(3, 3, 6, 6)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (theirs,) = sess.run(None, {"x": x})
    np.testing.assert_allclose(theirs, net(x=x), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_resumed_training_keeps_the_running_statistics(rng, tmp_path):
    """`structc train --resume` continues from the checkpoint's running statistics:
    one epoch and a resumed second end exactly where two epochs in a row do."""
    model, data = tmp_path / "bd.snet", tmp_path / "d.npz"
    model.write_text(BN_DENSE)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1)
    np.savez(data, x_train=x[:100], y_train=y[:100], x_test=x[100:], y_test=y[100:])
    common = ["train", str(model), "--data", str(data), "--batch", "16", "--no-progress"]
    assert main(common + ["--epochs", "2", "--out", str(tmp_path / "straight.npz")]) == 0
    assert main(common + ["--epochs", "1", "--out", str(tmp_path / "first.npz")]) == 0
    assert main(["train", str(model), "--data", str(data), "--epochs", "2", "--no-progress",
                 "--resume", str(tmp_path / "first.npz"), "--out", str(tmp_path / "resumed.npz")]) == 0
    with np.load(tmp_path / "straight.npz") as a, np.load(tmp_path / "resumed.npz") as b, \
            np.load(tmp_path / "first.npz") as first:
        assert not np.array_equal(a["bn1.var"], first["bn1.var"])
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


TREE = """model T {
  input  t: forest of word(vocab=9)
  target y: class[t.trees] of 2
  param  E: embedding(9, 8)
  rec h(n) = leaf: E[n.word]
             node: tanh(NORM(dense(concat(h(n.left), h(n.right)), 8)))
  loss cross_entropy(dense(h(t.root), 2), y)
}"""


def test_batch_norm_is_refused_in_a_node_case():
    with pytest.raises(SnetError, match=r"a node case cannot keep running statistics \('bn1.mean'"):
        build_model(parse(TREE.replace("NORM", "batch_norm")))


@pytest.mark.slow
def test_layer_norm_trains_in_a_node_case():
    net = structc.compile(TREE.replace("NORM", "layer_norm"))
    trees, y = ["(1 (2 3))", "((4 5) 6)", "(7 8)"], np.array([0, 1, 1], np.int32)
    losses = [net.train_step(t=trees, y=y, lr=0.1) for _ in range(20)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_layer_norm_default_eps_is_1e_5(rng):
    """Rows of variance 1e-5, where ε is half the denominator (the README's default)."""
    net = structc.compile(LN.replace("layer_norm(x, eps=0.001)", "layer_norm(x)"))
    x = (rng.normal(size=(2, 3, 7)) * np.sqrt(1e-5) + 1).astype(np.float32)
    want = _ln_numpy(x.astype(np.float64), 1.0, 0.0, 1e-5)
    np.testing.assert_allclose(net(x=x), want, rtol=2e-3, atol=2e-3)
    assert not np.allclose(net(x=x), _ln_numpy(x.astype(np.float64), 1.0, 0.0, 1e-4), rtol=2e-3, atol=2e-3)
