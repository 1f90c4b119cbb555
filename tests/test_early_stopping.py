"""A validation split and early stopping (structc/train.py): the split is seeded, stratified
and disjoint from training for every kind of data set; a run stops when the monitored
metric stops improving and keeps (and saves) the best epoch's parameters."""
from pathlib import Path

import numpy as np
import pytest

import structc
from structc import datasets, readers
from structc.cli import main
from structc.runlog import read_metrics
from structc.train import TrainConfig, train, validation_split

DATA = Path(__file__).parent / "data"


def members(data, kind: str) -> list:
    """The training examples of `data` as comparable items, and its held-out ones."""
    if kind == "table":
        return [r.tobytes() for r in data.x_train], [r.tobytes() for r in data.x_test]
    if kind == "trees":
        return [id(f) for f in data.train], [id(f) for f in data.test]
    if kind == "graphs":
        return list(data.train), list(data.test)
    if kind == "sequences":
        return [data.train[i].tobytes() for i in range(data.train.count)], \
               [data.test[i].tobytes() for i in range(data.test.count)]
    return list(np.flatnonzero(data.train_mask)), list(np.flatnonzero(data.test_mask))


@pytest.mark.parametrize("path, kind", [("table.csv", "table"), ("treebank.txt", "trees"), ("tu_tiny", "graphs"),
                                        ("nodes_tiny", "nodes"), ("digits_rows", "sequences")])
def test_the_validation_part_is_seeded_disjoint_and_taken_from_training_only(path, kind):
    data = datasets.load(path) if kind == "sequences" else readers.read(DATA / path)
    before, held_out = members(data, kind)
    fit, check = validation_split(data, 0.25, seed=3)
    trained, _ = members(fit, kind)
    _, validated = members(check, kind)
    assert sorted(trained + validated) == sorted(before) and not set(trained) & set(validated)
    assert abs(len(validated) - 0.25 * len(before)) <= 2          # 25% of each class, rounded per class
    assert members(fit, kind)[1] == held_out                        # the held-out part is untouched
    assert members(validation_split(data, 0.25, seed=3)[1], kind)[1] == validated
    assert members(validation_split(data, 0.25, seed=4)[1], kind)[1] != validated


def test_the_table_split_keeps_each_class_share():
    data = readers.read(DATA / "table.csv")
    _, check = validation_split(data, 0.25, seed=0)
    assert np.bincount(check.y_test).tolist() == [round(n / 4) for n in np.bincount(data.y_train)]


NOISE = """model Noise {
  input x: f32[N, 8]  target y: class[N] of 2
  h = dense(x, 64) |> relu
  loss cross_entropy(dense(h, 2), y)
}"""


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    """Labels with no signal: a wide layer memorises the training part, validation gets worse."""
    folder = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 8)).astype(np.float32), rng.integers(0, 2, 300).astype(np.int32)
    np.savez(folder / "noise.npz", x_train=x[:240], y_train=y[:240], x_test=x[240:], y_test=y[240:])
    (folder / "noise.snet").write_text(NOISE)
    return folder


def validation_metrics(model: Path, data: Path, params: Path, fraction: float) -> dict:
    net = structc.compile(model)
    net.load_params(str(params))
    bound = datasets.load(str(data)).bind(net)
    return validation_split(bound, fraction, seed=0)[1].evaluate(net)


@pytest.mark.slow     # two compiles and a training run: about 3 s
def test_a_run_stops_early_and_saves_the_best_epoch(noise, capsys):
    out = noise / "run.npz"
    assert main(["train", str(noise / "noise.snet"), "--data", str(noise / "noise.npz"), "--epochs", "30",
                 "--lr", "0.5", "--val-split", "0.2", "--early-stop", "2", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "validation: 48 of the 240 training examples (0.2 of each class, seed 0) held out" in printed
    records = read_metrics(noise / "run.metrics.jsonl")
    losses = [r["val_loss"] for r in records]
    best = int(np.argmin(losses)) + 1
    assert len(records) == best + 2 < 30                           # two epochs without improvement, then stop
    assert (f"early stopping: stopped after epoch {best + 2}: val_loss has not improved for 2 epochs since "
            f"epoch {best}; keeping epoch {best}'s parameters") in printed
    assert all("val_accuracy" in r for r in records)
    kept = validation_metrics(noise / "noise.snet", noise / "noise.npz", out, 0.2)
    assert kept["loss"] == pytest.approx(losses[best - 1], rel=1e-5)
    assert kept["loss"] != pytest.approx(losses[-1], rel=1e-5)
    assert printed.strip().endswith(f"saved epoch {best}'s parameters to {out}; held-out accuracy "
                                    f"{100 * records[best - 1]['heldout_accuracy']:.2f}%")
    # resuming continues from the kept parameters, and says so
    assert main(["train", str(noise / "noise.snet"), "--data", str(noise / "noise.npz"), "--epochs", str(best + 3),
                 "--resume", str(out), "--no-progress"]) == 0
    assert (f"stopped early after epoch {best + 2} and kept epoch {best}'s parameters: training continues from "
            f"those") in capsys.readouterr().err
    resumed = read_metrics(noise / "run.metrics.jsonl")        # its first epoch says where it started from
    assert [r.get("continues_from") for r in resumed] == [None] * (best + 2) + [best]


def test_the_python_loop_monitors_validation_accuracy(noise):
    net = structc.compile(noise / "noise.snet")
    data = datasets.load(str(noise / "noise.npz")).bind(net)
    lines = []
    history = train(net, data, TrainConfig(epochs=30, lr=0.5, progress=False, val_split=0.2, early_stop=3,
                                           monitor="val_acc"), log=lines.append)
    accuracies = [m["val_accuracy"] for m in history.epochs]
    assert history.best_epoch == int(np.argmax(accuracies)) + 1     # the first epoch of the best accuracy
    assert len(history.epochs) < 30 and "val_acc has not improved for 3 epochs" in history.stop_reason
    assert validation_split(data, 0.2, seed=0)[1].evaluate(net)["accuracy"] == max(accuracies)
    assert history.final["epoch"] == history.best_epoch


@pytest.mark.parametrize("options, message", [
    (["--early-stop", "3"], "--early-stop needs --val-split"),
    (["--val-split", "1.5"], "--val-split is the fraction of the training examples to validate on"),
    (["--val-split", "0.1", "--early-stop", "0"], "--early-stop is a number of epochs"),
])
def test_options_are_checked_before_any_work(noise, options, message, capsys):
    out = noise / "refused.npz"
    assert main(["train", str(noise / "noise.snet"), "--data", str(noise / "noise.npz"), "--out", str(out),
                 *options]) == 1
    assert message in capsys.readouterr().err and not out.exists()


def test_monitoring_accuracy_without_classes_is_refused():
    net = structc.compile("model R { input x: f32[N, 2]  target t: f32[N, 1]\n loss mse(dense(x, 1), t) }")
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(40, 2)), rng.normal(size=(40, 1))
    data = datasets.ArrayDataset("r", x, t, x[:8], t[:8]).bind(net)
    with pytest.raises(ValueError, match="cannot monitor val_acc: model R reports no val_accuracy"):
        train(net, data, TrainConfig(epochs=3, progress=False, val_split=0.2, early_stop=1, monitor="val_acc"),
              log=lambda line: None)


def test_measuring_does_not_change_batch_norms_running_statistics():
    """Held-out and validation losses (`Net.loss`) leave the running statistics as they
    were, so they are fitted to the training batches only."""
    net = structc.compile("model B { input x: f32[N, 4]  target y: class[N] of 2\n"
                          " h = relu(batch_norm(dense(x, 8)))\n loss cross_entropy(dense(h, 2), y) }")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    data = datasets.ArrayDataset("t", x[:80], y[:80], x[80:] + 3, y[80:]).bind(net)   # shifted held out
    start = {k: np.array(v) for k, v in net.params.items()}
    train(net, data, TrainConfig(epochs=2, batch=16, progress=False, val_split=0.25), log=lambda line: None)
    trained = {k: np.array(net.params[k]) for k in ("bn1.mean", "bn1.var")}
    for k, v in start.items():                        # the same run with no measuring at all
        net.params[k] = v
    fit, _ = validation_split(data, 0.25, seed=0)
    net.set_optimizer("sgd")
    shuffle = np.random.default_rng(0)
    for _ in range(2):
        for feed in fit.batches(16, shuffle):
            net.train_step(lr=0.1, **feed)
    for k, v in trained.items():
        np.testing.assert_array_equal(net.params[k], v)


@pytest.mark.slow     # three short training runs: about 4 s
def test_a_resumed_run_stops_where_an_uninterrupted_one_does(noise, capsys):
    """Interrupted after the best epoch but before the patience ran out, then resumed:
    the same stop epoch, the same kept epoch and bitwise the same saved parameters as one
    uninterrupted run (the patience count, the best value and the last epoch's parameters,
    which training continues from, survive the checkpoint)."""
    common = [str(noise / "noise.snet"), "--data", str(noise / "noise.npz"), "--lr", "0.5", "--no-progress"]
    whole, part = noise / "whole.npz", noise / "part.npz"
    assert main(["train", *common, "--epochs", "30", "--val-split", "0.2", "--early-stop", "3",
                 "--out", str(whole)]) == 0
    straight = capsys.readouterr().out
    records = read_metrics(noise / "whole.metrics.jsonl")
    best = int(np.argmin([r["val_loss"] for r in records])) + 1
    assert len(records) == best + 3 < 30
    assert main(["train", *common, "--epochs", str(best + 2), "--val-split", "0.2", "--early-stop", "3",
                 "--out", str(part)]) == 0          # ended one epoch before the stop, keeping epoch `best`
    capsys.readouterr()
    assert main(["train", *common, "--epochs", "30", "--resume", str(part)]) == 0
    resumed = capsys.readouterr().out
    tail = (f"early stopping: stopped after epoch {best + 3}: val_loss has not improved for 3 epochs since "
            f"epoch {best}; keeping epoch {best}'s parameters")
    assert tail in straight and tail in resumed
    final = [out.strip().splitlines()[-1].split(";")[-1] for out in (straight, resumed)]
    assert final[0] == final[1] and "held-out accuracy" in final[0]       # the kept epoch's metrics
    assert [r["epoch"] for r in read_metrics(noise / "part.metrics.jsonl")] == list(range(1, best + 4))
    with np.load(whole) as a, np.load(part) as b:
        assert a.files == b.files
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_a_resumed_run_told_another_monitor_trains_on_from_its_last_epoch(noise, capsys):
    """A run that ended (not stopped) keeping an earlier epoch, resumed with another --monitor:
    its early stopping starts afresh, but training goes on from the last epoch's parameters,
    which the optimizer state belongs to, not from the kept ones."""
    run = noise / "monitored.npz"
    common = [str(noise / "noise.snet"), "--data", str(noise / "noise.npz"), "--lr", "0.5", "--no-progress"]
    assert main(["train", *common, "--epochs", "6", "--val-split", "0.2", "--early-stop", "20",
                 "--out", str(run)]) == 0
    from structc.train import load_state, resume_early_stopping, state_path
    state = load_state(state_path(run))
    assert state["config"]["kept_epoch"] < 6                # validation got worse: an earlier epoch kept
    last = {k[len("last_params/"):]: v for k, v in state.items() if k.startswith("last_params/")}
    net = structc.compile(noise / "noise.snet")
    net.load_params(run)
    stopper, warning = resume_early_stopping(net, state, TrainConfig(val_split=0.2, early_stop=20,
                                                                     monitor="val_acc"))
    assert warning == "early stopping starts afresh: it monitored val_loss" and stopper.best_epoch is None
    for name, value in last.items():
        np.testing.assert_array_equal(net.params[name], value, err_msg=name)
    capsys.readouterr()
    assert main(["train", *common, "--epochs", "7", "--resume", str(run), "--monitor", "val_acc"]) == 0
    assert "training continues from those" not in capsys.readouterr().err
