"""Training controls: frozen parameters (no gradient computed, never updated),
fine-tuning from a checkpoint."""
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import structc
from structc.build import build_model
from structc.compiler import arena_layout, resolve_frozen, train_graph
from structc.errors import GradientWarning
from structc.passes import dce
from structc.syntax import parse

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CNN = EXAMPLES / "digits_cnn.snet"


def _train_ops(path, freeze):
    """The ops of the train graph (dead code removed) and its outputs."""
    mdef = build_model(parse(path.read_text(), str(path)), None)
    frozen = resolve_frozen(mdef.params, freeze)
    g = dce(train_graph(mdef, arena_layout(mdef, frozen)[2], frozen))
    return Counter(n.op.name for n in g.nodes.values()), set(g.outputs)


def _batch(rng, n=8):
    return (rng.standard_normal((n, 1, 8, 8)).astype(np.float32),
            rng.integers(0, 10, n).astype(np.int32))


def test_frozen_layers_get_no_gradient_and_no_backward_work():
    ops, outputs = _train_ops(CNN, ())
    assert {"grad:conv1.w", "grad:conv2.w"} <= outputs
    assert ops["conv2d_kernel_grad_parts"] == 2        # a kernel gradient in parts over the batch
    ops1, outputs1 = _train_ops(CNN, ["conv1"])
    assert not {"grad:conv1.w", "grad:conv1.b"} & outputs1 and "grad:conv2.w" in outputs1
    # conv1's kernel gradient, and conv2's input gradient (only conv1 needed it), are gone
    assert ops1["conv2d_kernel_grad_parts"] == 1 and ops1["conv2d"] == ops["conv2d"] - 1
    ops2, outputs2 = _train_ops(CNN, ["conv1", "conv2"])
    assert not any(o.startswith("grad:conv") for o in outputs2)
    # no convolution backward at all, no pooling backward, and dense1's input-gradient matmul is gone
    assert ops2["conv2d_kernel_grad_parts"] == 0 and ops2["conv2d"] == 2 and ops2["scatter_argmax"] == 0
    assert ops2["matmul"] == ops["matmul"] - 1


def test_frozen_parameters_keep_their_values_under_every_optimizer(rng):
    x, y = _batch(rng)
    net = structc.compile(CNN, freeze=["conv1", "conv2.w"])
    assert net.meta["frozen"] == ["conv1.b", "conv1.w", "conv2.w"]
    before = {k: v.copy() for k, v in net.params.items()}
    for optimizer in ("sgd", "momentum", "adam"):
        # weight decay must not reach a frozen parameter either
        net.set_optimizer(optimizer, weight_decay=0.1)
        for _ in range(2):
            assert np.isfinite(net.train_step(0.05, x=x, y=y))
        for name in ("conv1.w", "conv1.b", "conv2.w"):
            np.testing.assert_array_equal(net.params[name], before[name])
        assert not np.array_equal(net.params["conv2.b"], before["conv2.b"])
        assert not np.array_equal(net.params["dense2.w"], before["dense2.w"])


@pytest.mark.slow
def test_the_head_trains_exactly_as_it_does_without_freezing(rng):
    """Freezing changes nothing for the trainable parameters' first SGD step."""
    x, y = _batch(rng)
    full = structc.compile(CNN)
    net = structc.compile(CNN, freeze=["conv1", "conv2"])
    for name, value in full.params.items():
        net.params[name] = value
    assert net.train_step(0.1, x=x, y=y) == full.train_step(0.1, x=x, y=y)
    for name in ("dense1.w", "dense1.b", "dense2.w", "dense2.b"):
        np.testing.assert_allclose(net.params[name], full.params[name], rtol=1e-6, atol=1e-7)
    assert not np.array_equal(net.params["conv1.w"], full.params["conv1.w"])


def test_an_unknown_name_is_an_error_listing_the_parameters():
    with pytest.raises(ValueError, match=r"no parameter or layer 'conv3' \(parameters: conv1\.w, conv1\.b, "):
        structc.compile(CNN, freeze=["conv3"])
    with pytest.raises(ValueError, match="'conv'"):      # a prefix is a whole layer name, not any prefix
        structc.compile(CNN, freeze=["conv"])
    with pytest.raises(TypeError, match="list of names"):
        structc.compile(CNN, freeze="conv1")


@pytest.mark.slow
def test_freezing_is_part_of_the_cache_key():
    a = structc.compile(CNN, freeze=["conv1"])
    b = structc.compile(CNN)
    c = structc.compile(CNN, freeze=["conv1.w", "conv1.b"])
    assert a.meta["frozen"] == ["conv1.b", "conv1.w"] and b.meta["frozen"] == []
    assert c.meta["frozen"] == a.meta["frozen"]


def test_a_frozen_parameter_no_gradient_reaches_does_not_warn():
    source = ("model P { input x: f32[N, 4]\n target y: f32[N, 3]\n param spare: f32[2] = zeros\n"
              " loss mse(dense(x, 3), y) }")
    with pytest.warns(GradientWarning):
        structc.compile(source)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        structc.compile(source, freeze=["spare"])


def test_everything_frozen_still_computes_the_loss_and_changes_nothing(rng):
    x, y = _batch(rng)
    net = structc.compile(CNN, freeze=["conv1", "conv2", "dense1", "dense2"])
    before = {k: v.copy() for k, v in net.params.items()}
    assert np.isfinite(net.train_step(0.1, x=x, y=y))
    for name, value in before.items():
        np.testing.assert_array_equal(net.params[name], value)


# -- the command line: --init and --freeze ----------------------------------------

def _cli_train(tmp_path, out, *extra, epochs=1):
    from structc.cli import main
    return main(["train", str(CNN), "--data", "digits", "--epochs", str(epochs), "--batch", "64",
                 "--no-progress", "--out", str(tmp_path / out), *extra])


def test_cli_fine_tunes_from_a_checkpoint_with_layers_frozen(tmp_path, capsys):
    assert _cli_train(tmp_path, "base.npz") == 0
    assert _cli_train(tmp_path, "tuned.npz", "--init", str(tmp_path / "base"), "--freeze", "conv1,conv2") == 0
    assert "starting from" in capsys.readouterr().err
    with np.load(tmp_path / "base.npz") as a, np.load(tmp_path / "tuned.npz") as b:
        for name in a.files:
            assert np.array_equal(a[name], b[name]) == name.startswith("conv"), name


def test_cli_freeze_errors(tmp_path, capsys):
    assert _cli_train(tmp_path, "a.npz", "--freeze", "conv1,conv3") == 1
    assert "--freeze: no parameter or layer 'conv3' (parameters: conv1.w" in capsys.readouterr().err
    assert _cli_train(tmp_path, "b.npz", "--init", "x.npz", "--resume", "y.npz") == 1
    assert "pass one" in capsys.readouterr().err


def test_cli_resume_keeps_the_frozen_set_and_the_moments(tmp_path, capsys):
    adam = ("--optimizer", "adam", "--lr", "0.01", "--freeze", "conv1")
    assert _cli_train(tmp_path, "straight.npz", *adam, epochs=2) == 0
    assert _cli_train(tmp_path, "run.npz", *adam) == 0
    from structc.cli import main
    # no --freeze: the run's is kept, and Adam's moments line up with its layout
    assert main(["train", str(CNN), "--data", "digits", "--epochs", "2", "--no-progress",
                 "--resume", str(tmp_path / "run.npz")]) == 0
    with np.load(tmp_path / "straight.npz") as a, np.load(tmp_path / "run.npz") as b:
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])
    capsys.readouterr()
    # another frozen set is another layout: the moments are not restored, and it says so
    assert main(["train", str(CNN), "--data", "digits", "--epochs", "3", "--no-progress", "--freeze", "conv2",
                 "--resume", str(tmp_path / "run.npz"), "--out", str(tmp_path / "other.npz")]) == 0
    err = capsys.readouterr().err
    assert "--freeze conv2 differs from the resumed run's conv1" in err
    assert "could not be restored" in err


# -- the language: `param ... frozen` and a layer's `frozen=true` ------------------

MARKED = """model F {
  input x: f32[N, 4]
  target y: class[N] of 3
  param w: f32[4, 5] = glorot%s
  param b: f32[5]%s
  h = relu(x @ w + b)
  h = dense(h, 6%s) |> relu
  loss cross_entropy(dense(h, 3), y)
}"""


def test_frozen_in_the_language_marks_parameters_and_layers(rng):
    plain = structc.compile(MARKED % ("", "", ""))      # compiled first: the marker must change the cache key
    net = structc.compile(MARKED % (" frozen", " frozen", ", frozen=true"))
    assert plain.meta["frozen"] == []
    assert net.meta["frozen"] == ["b", "dense1.b", "dense1.w", "w"]
    x = rng.standard_normal((5, 4)).astype(np.float32)
    y = rng.integers(0, 3, 5).astype(np.int32)
    before = {k: v.copy() for k, v in net.params.items()}
    net.train_step(0.5, x=x, y=y)
    for name in ("w", "b", "dense1.w", "dense1.b"):
        np.testing.assert_array_equal(net.params[name], before[name])
    assert not np.array_equal(net.params["dense2.w"], before["dense2.w"])
    # the language's marks and the API's switch add up
    both = structc.compile(MARKED % (" frozen", "", ""), freeze=["dense2"])
    assert both.meta["frozen"] == ["dense2.b", "dense2.w", "w"]


def test_frozen_in_the_language_errors():
    base = "model G {{ input x: f32[N, 4]\n target y: f32[N, 3]\n loss mse({}, y) }}"
    with pytest.raises(structc.SnetError, match=r"3:11: dense: frozen must be true or false, got 1"):
        structc.compile(base.format("dense(x, 3, frozen=1)"))
    with pytest.raises(structc.SnetError, match=r"flatten\(\.\.\., frozen=true\): this call creates no parameters"):
        structc.compile(base.format("dense(flatten(x, frozen=true), 3)"))


# -- gradient clipping by global norm, inside the compiled step --------------------

def _global_norm(grads):
    return np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))


@pytest.mark.parametrize("clip", [0.5, 1e6, 0.0], ids=["above", "below", "off"])
def test_clipping_scales_every_gradient_by_min_1_c_over_the_global_norm(rng, clip):
    x, y = _batch(rng, 16)
    net = structc.compile(CNN)
    loss, grads = net.grad(x=x, y=y)
    norm = _global_norm(grads)
    assert norm > 0.5                       # so that 0.5 clips
    scale = min(1.0, clip / norm) if clip > 0 else 1.0
    net.set_optimizer("sgd", clip_norm=clip, weight_decay=0.01)
    before = {k: v.copy() for k, v in net.params.items()}
    assert net.train_step(0.1, x=x, y=y) == loss
    for name, g in grads.items():
        expected = before[name] - 0.1 * (scale * g + 0.01 * before[name])   # decay is not clipped
        np.testing.assert_allclose(net.params[name], expected, rtol=1e-5, atol=1e-7, err_msg=name)


def test_clipping_with_adam_and_only_over_trainable_parameters(rng):
    x, y = _batch(rng, 16)
    net = structc.compile(CNN, freeze=["conv1"])
    full = structc.compile(CNN)
    for name, value in full.params.items():
        net.params[name] = value
    _, grads = full.grad(x=x, y=y)
    trainable = {k: v for k, v in grads.items() if not k.startswith("conv1")}
    scale = 0.5 / _global_norm(trainable)
    assert scale < 1
    net.set_optimizer("adam", clip_norm=0.5)
    before = {k: v.copy() for k, v in net.params.items()}
    net.train_step(0.01, x=x, y=y)
    for name, g in trainable.items():
        g = scale * g
        m, v = 0.1 * g, 0.001 * g * g
        expected = before[name] - 0.01 / 0.1 * m / (np.sqrt(v) / np.sqrt(0.001) + 1e-8)
        np.testing.assert_allclose(net.params[name], expected, rtol=1e-3, atol=1e-6, err_msg=name)


def test_clip_norm_is_checked():
    net = structc.compile(CNN)
    with pytest.raises(ValueError, match="clip_norm must be a finite float32 number >= 0"):
        net.set_optimizer("sgd", clip_norm=-1.0)


def test_cli_clip_norm_bounds_every_step_and_is_kept_on_resume(tmp_path):
    assert _cli_train(tmp_path, "base.npz") == 0
    assert _cli_train(tmp_path, "clipped.npz", "--init", str(tmp_path / "base"), "--clip-norm", "1e-4",
                      "--lr", "0.1") == 0
    steps = -(-1438 // 64)           # the digits' training split in batches of 64
    with np.load(tmp_path / "base.npz") as a, np.load(tmp_path / "clipped.npz") as b:
        moved = np.sqrt(sum(float(((a[k] - b[k]).astype(np.float64) ** 2).sum()) for k in a.files))
    assert 0 < moved <= 0.1 * 1e-4 * steps * (1 + 1e-3)
    from structc.train import load_state
    assert load_state(tmp_path / "clipped.train.npz")["config"]["clip_norm"] == 1e-4


def test_a_restored_optimizer_takes_the_next_step_of_the_saved_one(rng, tmp_path):
    """`train.save_state` then `restore_optimizer` into a fresh Net: the next step is the
    saving Net's, bit for bit: its moments, its step count (Adam's bias correction) and its
    options (beta1, beta2, eps, weight decay: not the defaults, which set_optimizer would keep)."""
    from structc.train import TrainConfig, load_state, restore_optimizer, save_state
    x, y = _batch(rng)
    a = structc.compile(CNN)
    a.set_optimizer("adam", beta1=0.5, beta2=0.9, eps=1e-3, weight_decay=0.05)
    for _ in range(2):
        a.train_step(0.01, x=x, y=y)
    save_state(a, tmp_path / "a.train.npz", 1, TrainConfig(optimizer="adam"), {}, "data")
    b = structc.compile(CNN)
    for name, value in a.params.items():
        b.params[name][...] = value
    assert restore_optimizer(b, load_state(tmp_path / "a.train.npz"))
    a.train_step(0.01, x=x, y=y)
    b.train_step(0.01, x=x, y=y)
    for name, value in a.params.items():
        np.testing.assert_array_equal(b.params[name], value, err_msg=name)


# -- learning-rate schedules --------------------------------------------------------

def _lrs(net, rng, steps, lr=0.5):
    x, y = _batch(rng, 4)
    used = []
    for _ in range(steps):
        net.train_step(lr, x=x, y=y)
        used.append(net.last_lr)
    return used


@pytest.mark.parametrize("schedule, expected", [
    (dict(kind="step", decay_steps=2, gamma=0.5), [0.5, 0.5, 0.25, 0.25, 0.125]),
    (dict(kind="constant", warmup=4), [0.125, 0.25, 0.375, 0.5, 0.5]),
    # cos(pi/4) = 0.70710678: 0.1 + 0.9 * (1 + 0.70710678) / 2 = 0.86819805
    (dict(kind="cosine", warmup=2, decay_steps=4, floor=0.1),
     [0.25, 0.5, 0.5, 0.5 * 0.86819805, 0.5 * 0.55, 0.5 * 0.23180195, 0.05, 0.05]),
    (dict(kind="step", warmup=1, decay_steps=1, gamma=0.1), [0.5, 0.5, 0.05, 0.005]),
], ids=["step", "warmup", "warmup+cosine", "warmup+step"])
def test_schedules_give_the_hand_computed_rates(rng, schedule, expected):
    net = structc.compile(CNN)
    net.set_schedule(**schedule)
    assert _lrs(net, rng, len(expected)) == pytest.approx(expected, rel=1e-6)


def test_the_native_step_uses_the_scheduled_rate(rng):
    x, y = _batch(rng)
    net = structc.compile(CNN)
    net.set_schedule("constant", warmup=4)
    _, grads = net.grad(x=x, y=y)
    before = {k: v.copy() for k, v in net.params.items()}
    net.train_step(0.4, x=x, y=y)                  # the first of 4 warm-up steps: lr 0.1
    for name, g in grads.items():
        np.testing.assert_allclose(net.params[name], before[name] - 0.1 * g, rtol=1e-5, atol=1e-7)


def test_schedule_arguments_are_checked():
    net = structc.compile(CNN)
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        net.set_schedule("linear")
    with pytest.raises(ValueError, match="the cosine schedule needs decay_steps"):
        net.set_schedule("cosine")
    with pytest.raises(ValueError, match="warmup must be a whole number"):
        net.set_schedule("constant", warmup=-1)
    with pytest.raises(ValueError, match=r"gamma must be a number in \[0, 1\]"):
        net.set_schedule("step", decay_steps=3, gamma=2)
    # an option the kind does not use would change nothing: refused, as the CLI refuses its flag
    with pytest.raises(ValueError, match="floor is the cosine schedule's: the step schedule would ignore it"):
        net.set_schedule("step", decay_steps=3, floor=0.3)
    with pytest.raises(ValueError, match="gamma is the step schedule's: the cosine schedule would ignore it"):
        net.set_schedule("cosine", decay_steps=3, gamma=0.5)
    with pytest.raises(ValueError, match="gamma is the step schedule's: the constant schedule would ignore it"):
        net.set_schedule("constant", warmup=2, gamma=0.5)
    assert net.schedule is None


def test_cli_schedule_is_logged_per_epoch_and_resumes_bit_identically(tmp_path):
    import json
    from structc.cli import main
    sched = ("--optimizer", "momentum", "--schedule", "cosine", "--warmup", "5", "--decay-steps", "40")
    assert _cli_train(tmp_path, "straight.npz", *sched, epochs=2) == 0
    assert _cli_train(tmp_path, "run.npz", *sched) == 0
    assert main(["train", str(CNN), "--data", "digits", "--epochs", "2", "--no-progress",
                 "--resume", str(tmp_path / "run.npz")]) == 0
    with np.load(tmp_path / "straight.npz") as a, np.load(tmp_path / "run.npz") as b:
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])
    from structc.schedules import lr_factor
    steps = -(-1438 // 64)
    spec = {"kind": "cosine", "warmup": 5, "decay_steps": 40, "gamma": 0.1, "floor": 0.0}
    for run in ("straight", "run"):
        logged = [json.loads(line)["lr"] for line in (tmp_path / f"{run}.metrics.jsonl").read_text().splitlines()]
        expected = [0.1 * lr_factor(spec, e * steps - 1) for e in (1, 2)]   # each epoch's last step
        assert logged == pytest.approx(expected, rel=1e-6), run


@pytest.mark.slow
def test_freezing_in_a_tree_model_keeps_the_recursion_reading_the_right_parameters():
    """Recursion bodies are separate entry points: they must use the frozen layout too."""
    from structc import datasets
    path = EXAMPLES / "logic_tree.snet"
    data = datasets.load("logic")
    full = structc.compile(path)
    net = structc.compile(path, freeze=["E"])       # declared first: every other offset moves
    for name, value in full.params.items():
        net.params[name] = value
    data.bind(full)
    feed = next(iter(data.batches(8, np.random.default_rng(0))))
    assert net.train_step(0.1, **feed) == pytest.approx(full.train_step(0.1, **feed), rel=1e-6)
    for name in full.params:
        if name == "E":
            assert not np.array_equal(net.params[name], full.params[name])
        else:
            np.testing.assert_allclose(net.params[name], full.params[name], rtol=1e-5, atol=1e-6, err_msg=name)


# -- per-parameter-group options: no weight decay on biases and norms ---------------

@pytest.mark.parametrize("decay_biases", [True, False])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_decay_biases_false_decays_only_the_matrices(rng, decay_biases, optimizer):
    x, y = _batch(rng)
    net = structc.compile(CNN, freeze=["dense1.b"])     # a frozen vector too: it must not decay either
    _, grads = net.grad(x=x, y=y)
    net.set_optimizer(optimizer, weight_decay=0.5, decay_biases=decay_biases)
    before = {k: v.copy() for k, v in net.params.items()}
    net.train_step(0.1, x=x, y=y)
    for name, g in grads.items():
        if name == "dense1.b":
            np.testing.assert_array_equal(net.params[name], before[name])
            continue
        decays = before[name].ndim >= 2 or decay_biases
        expected = before[name] - 0.1 * (g + (0.5 * before[name] if decays else 0))   # momentum's first step: v = g
        np.testing.assert_allclose(net.params[name], expected, rtol=1e-5, atol=1e-7, err_msg=name)


def test_decay_biases_is_checked():
    net = structc.compile(CNN)
    with pytest.raises(TypeError, match="decay_biases must be True or False"):
        net.set_optimizer("sgd", decay_biases=0)


# -- the update rules with every option, against float64 numpy ----------------------

TINY = """
model Tiny {
  input x: f32[N, 6]
  target y: class[N] of 3
  loss cross_entropy(dense(tanh(dense(x, 5)), 3), y)
}
"""


def _numpy_update(rule, params, grads, state, t, lr, o):
    """One step as the docs define it: clipping, then L2 weight decay added to the
    gradient (not AdamW's decoupled decay), then SGD, momentum or bias-corrected Adam."""
    norm = np.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    scale = min(1.0, o["clip_norm"] / norm) if o["clip_norm"] > 0 else 1.0
    out = {}
    for k, p in params.items():
        g = scale * grads[k] + (o["weight_decay"] if p.ndim >= 2 or o["decay_biases"] else 0.0) * p
        if rule == "sgd":
            out[k] = p - lr * g
        elif rule == "momentum":
            state[k] = o["momentum"] * state.get(k, 0.0) + g
            out[k] = p - lr * state[k]
        else:
            m = state[k, "m"] = o["beta1"] * state.get((k, "m"), 0.0) + (1 - o["beta1"]) * g
            v = state[k, "v"] = o["beta2"] * state.get((k, "v"), 0.0) + (1 - o["beta2"]) * g * g
            out[k] = p - lr * (m / (1 - o["beta1"] ** t)) / (np.sqrt(v / (1 - o["beta2"] ** t)) + o["eps"])
    return out


@pytest.mark.parametrize("split", [False, True], ids=["train_step", "grad_into_arena+apply_update"])
@pytest.mark.parametrize("rule, options", [
    ("momentum", dict(momentum=0.5, weight_decay=0.05, clip_norm=0.3)),
    ("adam", dict(beta1=0.7, beta2=0.95, eps=1e-3, weight_decay=0.05)),
    ("adam", dict(weight_decay=0.1, decay_biases=False, clip_norm=0.3)),
])
def test_each_optimizer_option_as_documented(rng, rule, options, split):
    net = structc.compile(TINY, seed=1)
    net.set_optimizer(rule, **options)
    o = dict(net._opt)
    state = {}
    for t in range(1, 5):
        x, y = rng.normal(size=(5 + t, 6)).astype(np.float32), rng.integers(0, 3, 5 + t).astype(np.int32)
        _, grads = net.grad(x=x, y=y)           # no update, and the step counter stays
        params = {k: v.astype(np.float64) for k, v in net.params.items()}
        expected = _numpy_update(rule, params, {k: g.astype(np.float64) for k, g in grads.items()}, state, t,
                                 0.05, o)
        if split:
            net.grad_into_arena(x=x, y=y)
            net.apply_update(0.05)
        else:
            net.train_step(0.05, x=x, y=y)
        for k, p in expected.items():
            np.testing.assert_allclose(net.params[k], p, rtol=1e-5, atol=1e-6, err_msg=f"step {t} {k}")


def test_options_not_given_keep_their_last_values_across_optimizers(rng):
    """As README says: set_optimizer("adam") after set_optimizer("sgd", weight_decay=...,
    clip_norm=...) still decays and clips (only the moments and the counter restart)."""
    net = structc.compile(TINY, seed=1)
    net.set_optimizer("sgd", weight_decay=0.5, clip_norm=0.1)
    net.set_optimizer("adam", beta1=0.5)
    x, y = rng.normal(size=(6, 6)).astype(np.float32), rng.integers(0, 3, 6).astype(np.int32)
    _, grads = net.grad(x=x, y=y)
    params = {k: v.astype(np.float64) for k, v in net.params.items()}
    o = {"momentum": 0.9, "beta1": 0.5, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.5, "clip_norm": 0.1,
         "decay_biases": True}
    expected = _numpy_update("adam", params, {k: g.astype(np.float64) for k, g in grads.items()}, {}, 1, 0.05, o)
    net.train_step(0.05, x=x, y=y)
    for k, p in expected.items():
        np.testing.assert_allclose(net.params[k], p, rtol=1e-5, atol=1e-6, err_msg=k)


def test_set_optimizer_without_a_name_keeps_the_optimizer_and_its_moments(rng):
    """`net.set_optimizer(clip_norm=1.0)` on an Adam net adds clipping to Adam: it switched to
    SGD (the name's default) and dropped the moments, with no word."""
    net = structc.compile(TINY, seed=1)
    net.set_optimizer("adam")
    x, y = rng.normal(size=(6, 6)).astype(np.float32), rng.integers(0, 3, 6).astype(np.int32)
    net.train_step(0.01, x=x, y=y)
    moments = net._state_arena.copy()
    net.set_optimizer(clip_norm=1.0)
    assert net.optimizer == "adam" and net._opt["clip_norm"] == 1.0 and net._step == 1
    assert np.array_equal(net._state_arena, moments)


def test_adams_first_step_is_lr_times_the_gradients_sign_with_a_beta_near_1(rng):
    """Bias correction undoes (1 - beta)'s weighting of the first step's moments exactly, so
    each parameter moves by lr * g / (|g| + eps): native code weighs with float32's betas
    (0.999999 is 0.99999899 there, 1 - beta 1.3% larger), so the correction must use them too
    (it used 0.999999 itself: every first step was 0.66% short)."""
    net = structc.compile(TINY, seed=1)
    net.set_optimizer("adam", beta1=0.9, beta2=0.999999, eps=1.2e-38)
    x, y = rng.normal(size=(6, 6)).astype(np.float32), rng.integers(0, 3, 6).astype(np.int32)
    before = {k: v.copy() for k, v in net.params.items()}
    _, grads = net.grad(x=x, y=y)
    net.train_step(0.01, x=x, y=y)
    for k, g in grads.items():
        moved = g != 0
        np.testing.assert_allclose((before[k] - net.params[k])[moved], 0.01 * np.sign(g[moved]), rtol=1e-4,
                                   atol=2e-7, err_msg=k)


def test_the_fine_tuning_example_trains_the_head_only_and_saves_time(tmp_path):
    import sys
    sys.path.insert(0, str(EXAMPLES))
    from finetune_digits import run
    r = run(tmp_path, epochs=3)
    assert r["base"] > 0.9 and r["base_on_rotated"] < 0.3        # the new task is new
    assert r["head_only"] > 0.8
    assert r["step_frozen"] < 0.7 * r["step_full"]
    with np.load(tmp_path / "base.npz") as a, np.load(tmp_path / "tuned.npz") as b:
        for name in a.files:
            assert np.array_equal(a[name], b[name]) == name.startswith("conv"), name


EMBED = """model Embed {
  input  w: i32[N]
  target y: class[N] of 3
  param  E: embedding(40, 24)
  loss cross_entropy(dense(E[w], 3), y)
}"""


def test_sgd_is_p_minus_lr_g_bit_for_bit_where_the_gradient_is_zero_too(rng):
    """SGD skips the store of a vector whose step is +0 in every lane (the rows
    of an embedding no word of the batch used): every parameter must still be
    exactly p - lr g in float32, as numpy computes it, in vectors of zero,
    nonzero and mixed lanes, and for parameters that are -0.0."""
    net = structc.compile(EMBED, training=True)
    E = net.params["E"]
    E[::3] = -0.0                           # -0.0 - (+0.0) is -0.0: a skipped store keeps it
    w = np.array([1, 2, 2, 7, 30], np.int32)                # most rows get no gradient
    y = rng.integers(0, 3, len(w)).astype(np.int32)
    before = {k: v.copy() for k, v in net.params.items()}
    _, grads = net.grad(w=w, y=y)
    assert (grads["E"] == 0).all(axis=1).sum() == 40 - 4
    net.train_step(0.5, w=w, y=y)
    for name, g in grads.items():
        want = before[name] - np.float32(0.5) * g
        assert np.array_equal(net.params[name].view(np.int32), want.view(np.int32)), name
