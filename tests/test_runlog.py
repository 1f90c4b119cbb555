"""Training you can watch (structc/runlog.py): the per-epoch metrics log every `structc
train` writes beside its checkpoint, and `structc plot` drawing curves from it."""
import json
import sys

import numpy as np
import pytest

from structc.cli import main
from structc.runlog import metrics_path, read_metrics

TINY = """model Tiny {
  input x: f32[N, 5]  target y: class[N] of 2
  logits = dense(x, 2)
  output probs = softmax(logits)
  loss cross_entropy(logits, y)
}"""


@pytest.fixture
def tiny(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(260, 5)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    model = tmp_path / "tiny.snet"
    model.write_text(TINY)
    return str(model), str(data)


def train(tiny, *extra):
    model, data = tiny
    return main(["train", model, "--data", data, "--no-progress", *extra])


def epoch_lines(text: str) -> list[list[float]]:
    """The numbers of `epoch  2/3  loss 0.1234  held-out loss 0.2345  accuracy 91.67%` lines."""
    rows = []
    for line in text.splitlines():
        if line.startswith("epoch"):
            words = line.split()
            rows.append([float(words[3]), float(words[6]), float(words[8].rstrip("%")) / 100])
    return rows


# -- the log ---------------------------------------------------------------------------

def test_train_writes_one_record_per_epoch_beside_the_checkpoint(tiny, tmp_path, capsys):
    assert train(tiny, "--epochs", "3", "--lr", "0.05", "--out", str(tmp_path / "run.npz")) == 0
    captured = capsys.readouterr()
    log = tmp_path / "run.metrics.jsonl"
    assert f"per-epoch metrics in {log}" in captured.err
    records = read_metrics(log)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert set(records[0]) == {"epoch", "loss", "heldout_loss", "heldout_accuracy", "seconds", "elapsed", "lr"}
    assert all(r["lr"] == 0.05 for r in records)
    printed = epoch_lines(captured.out)
    for r, (loss, heldout, acc) in zip(records, printed):
        assert r["loss"] == pytest.approx(loss, abs=6e-5) and r["heldout_loss"] == pytest.approx(heldout, abs=6e-5)
        assert r["heldout_accuracy"] == pytest.approx(acc, abs=6e-5)
    assert all(r["seconds"] >= 0 for r in records)
    assert records[2]["elapsed"] >= records[1]["elapsed"] >= records[0]["elapsed"]


def test_the_epoch_line_and_the_log_give_each_epochs_own_seconds(tiny, tmp_path):
    """An epoch's `seconds` is its own wall time, in the epoch line (and
    History) as in the log: the line gave the time since training began."""
    import time

    import structc
    from structc import datasets
    from structc.runlog import MetricsLog
    from structc.train import TrainConfig, train as train_loop
    model, data = tiny
    net = structc.compile(model)
    log = MetricsLog(tmp_path / "run.metrics.jsonl", 0.05)
    lines = []
    data = datasets.load(data).bind(net)
    real_evaluate = data.evaluate
    data.evaluate = lambda n: (time.sleep(0.2), real_evaluate(n))[1]     # each epoch takes 0.2 s more
    history = train_loop(net, data, TrainConfig(epochs=3, lr=0.05, progress=False), log=lines.append,
                         on_epoch=log.callback)
    seconds = [m["seconds"] for m in history.epochs]
    assert all(s >= 0.2 for s in seconds) and all(s < 0.4 for s in seconds[1:]), seconds   # not 0.2, 0.4, 0.6
    assert [float(line.rsplit("(", 1)[1].split()[0]) for line in lines if line.startswith("epoch")] == \
        [round(s, 1) for s in seconds]
    assert [r["seconds"] for r in read_metrics(log.path)] == [round(s, 4) for s in seconds]


def test_without_out_the_log_is_beside_the_default_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train(tiny, "--epochs", "1") == 0
    assert (tmp_path / "tiny.npz").is_file()
    assert len(read_metrics(tmp_path / "tiny.metrics.jsonl")) == 1


def test_a_new_run_replaces_an_old_log(tiny, tmp_path, capsys):
    out = str(tmp_path / "run.npz")
    assert train(tiny, "--epochs", "3", "--out", out) == 0
    assert train(tiny, "--epochs", "2", "--out", out) == 0
    assert [r["epoch"] for r in read_metrics(metrics_path(out))] == [1, 2]


def test_a_resumed_run_continues_its_log(tiny, tmp_path, capsys):
    first, second = tmp_path / "a.npz", tmp_path / "b.npz"
    assert train(tiny, "--epochs", "2", "--out", str(first)) == 0
    before = read_metrics(metrics_path(first))
    assert train(tiny, "--epochs", "4", "--resume", str(first), "--out", str(second)) == 0
    after = read_metrics(metrics_path(second))
    assert [r["epoch"] for r in after] == [1, 2, 3, 4]
    assert after[:2] == before                                  # the resumed epochs, as they were
    assert after[2]["elapsed"] >= before[1]["elapsed"]
    assert train(tiny, "--epochs", "5", "--resume", str(second)) == 0          # in place: appended
    assert [r["epoch"] for r in read_metrics(metrics_path(second))] == [1, 2, 3, 4, 5]


def test_a_resumed_run_keeps_the_readable_epochs_of_a_half_written_log(tiny, tmp_path, capsys):
    # a run killed while writing epoch 4's line leaves half of it; the checkpoint is epoch 3's
    out = tmp_path / "run.npz"
    assert train(tiny, "--epochs", "3", "--out", str(out)) == 0
    before = read_metrics(metrics_path(out))
    with open(metrics_path(out), "a") as f:
        f.write('{"epoch": 4, "loss": 0.3')
    capsys.readouterr()
    assert train(tiny, "--epochs", "5", "--resume", str(out)) == 0
    after = read_metrics(metrics_path(out))
    assert [r["epoch"] for r in after] == [1, 2, 3, 4, 5] and after[:3] == before
    assert "line 4 of" in capsys.readouterr().err


def test_a_resumed_run_says_which_epochs_its_log_lacks(tiny, tmp_path, capsys):
    out = tmp_path / "run.npz"
    assert train(tiny, "--epochs", "3", "--out", str(out)) == 0
    metrics_path(out).unlink()
    capsys.readouterr()
    assert train(tiny, "--epochs", "4", "--resume", str(out)) == 0
    assert "cannot be read" in capsys.readouterr().err
    assert [r["epoch"] for r in read_metrics(metrics_path(out))] == [4]
    from structc.runlog import earlier_records          # a log a checkpoint kept no digest of
    metrics_path(out).write_text('{"epoch": 2, "loss": 1.0}\n{"epoch": 4, "loss": 0.5}\n')
    assert earlier_records(metrics_path(out), 6) == ([{"epoch": 2, "loss": 1.0}, {"epoch": 4, "loss": 0.5}],
                                                     f"the resumed run's metrics log {metrics_path(out)} has no "
                                                     f"record of epochs 1, 3, 5")


def test_a_resumed_run_leaves_out_the_log_lines_of_a_later_run_of_the_same_name(tiny, tmp_path, capsys):
    # run A saves epoch 2; run B, same --out, writes its own log and dies before saving
    out, saved = tmp_path / "run.npz", {}
    assert train(tiny, "--epochs", "2", "--out", str(out)) == 0
    for name in ("run.npz", "run.train.npz"):
        saved[name] = (tmp_path / name).read_bytes()
    assert train(tiny, "--epochs", "3", "--lr", "0.5", "--out", str(out)) == 0
    for name, data in saved.items():
        (tmp_path / name).write_bytes(data)
    with open(metrics_path(out), "a") as f:
        f.write('{"epoch": 4, "lo')                     # B killed while writing
    capsys.readouterr()
    assert train(tiny, "--epochs", "4", "--resume", str(out)) == 0
    assert "is not the log of the run saved at epoch 2" in capsys.readouterr().err
    assert [r["epoch"] for r in read_metrics(metrics_path(out))] == [3, 4]


def test_a_run_that_fails_puts_back_the_log_of_the_checkpoint_beside_it(tiny, tmp_path, monkeypatch, capsys):
    # run B failed in epoch 2 after replacing run A's log: run.npz was A's, run.metrics.jsonl B's epoch 1
    from structc import cli
    out = tmp_path / "run.npz"
    assert train(tiny, "--epochs", "3", "--out", str(out)) == 0
    before = metrics_path(out).read_text()

    def failing_logger(metrics, board):
        def record(m):
            if m["epoch"] == 2:
                raise FloatingPointError("the loss became nan in epoch 2")
            return metrics.callback(m)
        return record
    monkeypatch.setattr(cli, "_epoch_logger", failing_logger)
    capsys.readouterr()
    assert train(tiny, "--epochs", "3", "--lr", "0.5", "--out", str(out)) == 1
    err = capsys.readouterr().err
    failed = tmp_path / "run.failed.metrics.jsonl"
    assert metrics_path(out).read_text() == before
    assert [r["epoch"] for r in read_metrics(failed)] == [1]
    assert f"this run's epoch records are in {failed}; run.metrics.jsonl is again that of run.npz" in err
    other = tmp_path / "new.npz"                       # no run saved there: no log is left beside it
    assert train(tiny, "--epochs", "3", "--out", str(other)) == 1
    assert not metrics_path(other).exists() and read_metrics(tmp_path / "new.failed.metrics.jsonl")
    assert "removed (no run saved there had one)" in capsys.readouterr().err


def test_a_log_a_killed_run_rewrote_is_said_not_to_be_the_checkpoints(tiny, tmp_path, capsys):
    # run B, killed (no Python left to put the log back), had replaced run A's log:
    # `structc plot run` drew B's epochs as those of run.npz, A's, without a word
    from structc.runlog import foreign_log
    out = tmp_path / "run.npz"
    assert train(tiny, "--epochs", "2", "--out", str(out)) == 0
    log = metrics_path(out)
    assert foreign_log(log) == ""
    with open(log, "a") as f:                           # a run resumed from it, in progress
        f.write('{"epoch": 3, "loss": 0.5}\n')
    assert foreign_log(log) == ""
    log.write_text('{"epoch": 1, "loss": 0.9}\n')      # B, killed in its epoch 2
    assert "is not the log of the checkpoint run.npz beside it" in foreign_log(log)
    pytest.importorskip("matplotlib")
    capsys.readouterr()
    assert main(["plot", str(out), "-o", str(tmp_path / "c.png")]) == 0
    assert "is not the log of the checkpoint run.npz beside it" in capsys.readouterr().err


def test_the_record_after_a_restart_from_a_kept_epoch_says_so(tmp_path):
    # a resumed run that had stopped early after epoch 5 trains on from epoch 3's parameters:
    # epoch 6 was logged as if it followed epoch 5
    from structc.runlog import start_log
    old = tmp_path / "old.npz"
    log = start_log(old, 0.1)
    for epoch in range(1, 6):
        log.callback({"epoch": epoch, "train_loss": 1.0 / epoch})
    log = start_log(tmp_path / "new.npz", 0.1, resumed_from=old, first_epoch=6, continues_from=3)
    for epoch in (6, 7):
        log.callback({"epoch": epoch, "train_loss": 0.3})
    records = read_metrics(metrics_path(tmp_path / "new.npz"))
    assert [r.get("continues_from") for r in records] == [None] * 5 + [3, None]
    assert list(records[5])[:3] == ["epoch", "continues_from", "loss"]


def test_the_curves_join_the_kept_epoch_to_the_next_one_trained(tmp_path):
    from structc.runlog import stretches
    records = [{"epoch": e, "loss": 1.0 / e} for e in range(1, 6)]
    records += [{"epoch": 6, "continues_from": 3, "loss": 0.3}, {"epoch": 7, "loss": 0.2}]
    assert [[r["epoch"] for r in run] for run in stretches(records)] == [[1, 2, 3, 4, 5], [3, 6, 7]]
    assert [[r["epoch"] for r in run] for run in stretches(records[5:])] == [[6, 7]]     # its start not logged
    pytest.importorskip("matplotlib")
    from structc.runlog import figure
    left, _ = figure({"r": records}).axes
    assert [list(line.get_xdata()) for line in left.lines if line.get_linestyle() == "-"] == [[1, 2, 3, 4, 5],
                                                                                             [3, 6, 7]]
    assert len(left.get_legend_handles_labels()[1]) == 1          # one entry a run


def test_read_metrics_refuses_a_restart_from_a_later_epoch(tmp_path):
    path = tmp_path / "r.metrics.jsonl"
    path.write_text('{"epoch": 1, "loss": 1.0}\n{"epoch": 2, "continues_from": 2, "loss": 0.5}\n')
    with pytest.raises(ValueError, match=r"r\.metrics\.jsonl:2: 'continues_from' is 2"):
        read_metrics(path)


def test_an_empty_held_out_part_is_refused(tiny, tmp_path, capsys):
    # it trained, printed "held-out loss nan  accuracy nan%" and logged nulls, and exited 0
    x = np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32)
    data = tmp_path / "empty.npz"
    np.savez(data, x_train=x, y_train=(x[:, 0] > 0).astype(np.int32), x_test=x[:0], y_test=np.zeros(0, np.int32))
    assert main(["train", tiny[0], "--data", str(data), "--no-progress", "--epochs", "2",
                 "--out", str(tmp_path / "e.npz")]) == 1
    captured = capsys.readouterr()
    assert "the held-out part has no examples" in captured.err and "epoch" not in captured.out    # before training
    assert not (tmp_path / "e.npz").exists()


def test_a_log_that_cannot_be_written_stops_before_training(tiny, tmp_path, capsys):
    (tmp_path / "run.metrics.jsonl").mkdir()                   # a folder in the log's place
    assert train(tiny, "--epochs", "1", "--out", str(tmp_path / "run.npz")) == 2
    assert "cannot write the metrics log" in capsys.readouterr().err
    assert not (tmp_path / "run.npz").exists()


def test_a_log_that_becomes_unwritable_warns_once_and_training_goes_on(tmp_path, capsys):
    from structc.runlog import MetricsLog
    folder = tmp_path / "runs"
    folder.mkdir()
    log = MetricsLog(folder / "r.metrics.jsonl", lr=0.1)
    log.callback({"epoch": 1, "train_loss": 1.0, "heldout_loss": 1.1})
    (folder / "r.metrics.jsonl").unlink()
    folder.rmdir()
    for epoch in (2, 3):
        log.callback({"epoch": epoch, "train_loss": 1.0, "heldout_loss": 1.1})
    assert capsys.readouterr().err.count("cannot write the metrics log") == 1


def test_a_value_that_is_not_a_number_is_written_as_null(tmp_path):
    # a diverging model measures NaN or inf; json.dumps would write NaN, which is no JSON
    from structc.runlog import MetricsLog, figure

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    log = MetricsLog(tmp_path / "r.metrics.jsonl", lr=0.1)
    log.callback({"epoch": 1, "train_loss": 1.0, "heldout_loss": float("nan"), "heldout_accuracy": float("nan"),
                  "val_loss": np.float32("inf")})
    log.callback({"epoch": 2, "train_loss": 0.5, "heldout_loss": 0.7, "heldout_accuracy": 0.5, "val_loss": 0.6})
    lines = [strict(line) for line in (tmp_path / "r.metrics.jsonl").read_text().splitlines()]
    assert [(r["heldout_loss"], r["heldout_accuracy"], r["val_loss"]) for r in lines] == [(None, None, None),
                                                                                         (0.7, 0.5, 0.6)]
    assert read_metrics(tmp_path / "r.metrics.jsonl") == lines
    pytest.importorskip("matplotlib")
    left, right = figure({"r": lines}).axes
    assert [list(line.get_xdata()) for line in left.lines] == [[1, 2], [2], [2]]    # training, held-out, validation
    assert [list(line.get_xdata()) for line in right.lines] == [[2]]


def test_read_metrics_names_a_bad_line(tmp_path):
    path = tmp_path / "r.metrics.jsonl"
    path.write_text('{"epoch": 1, "loss": 1.0}\n{"epoch": 2, "loss": \n')
    with pytest.raises(ValueError, match=r"r\.metrics\.jsonl:2: not a JSON line"):
        read_metrics(path)
    path.write_text('{"epoch": 1, "loss": 1.0}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"r\.metrics\.jsonl:2: not an epoch record"):
        read_metrics(path)
    path.write_text('{"epoch": 1, "loss": 1.0}\n{"epoch": 2, "lo')       # being written, or cut short
    assert read_metrics(path) == [{"epoch": 1, "loss": 1.0}]


# -- the plot -----------------------------------------------------------------------------

def _write_run(path, losses, accuracies):
    path.write_text("".join(json.dumps({"epoch": k + 1, "loss": l, "heldout_loss": l + 0.1,
                                        "heldout_accuracy": a, "seconds": 0.1, "elapsed": 0.1 * (k + 1),
                                        "lr": 0.1}) + "\n"
                            for k, (l, a) in enumerate(zip(losses, accuracies))))
    return path


def _colour_pixels(image: np.ndarray, rgb: tuple[float, float, float]) -> np.ndarray:
    """Where `image` shows the colour `rgb` (within antialiasing)."""
    return np.all(np.abs(image[..., :3] - np.array(rgb)) < 0.08, axis=-1)


C0, C1 = (0x1F / 255, 0x77 / 255, 0xB4 / 255), (0xFF / 255, 0x7F / 255, 0x0E / 255)   # matplotlib's first two


def test_plot_draws_loss_and_accuracy_of_each_run_at_the_size_asked(tmp_path, capsys):
    image_module = pytest.importorskip("matplotlib.image")
    a = _write_run(tmp_path / "a.metrics.jsonl", [1.0, 0.6, 0.4, 0.3], [0.5, 0.7, 0.8, 0.9])
    _write_run(tmp_path / "b.metrics.jsonl", [1.2, 0.9, 0.7, 0.6], [0.4, 0.5, 0.6, 0.65])
    out = tmp_path / "curves.png"
    # a run by its metrics file, or by its checkpoint's name
    assert main(["plot", str(a), str(tmp_path / "b.npz"), "-o", str(out), "--size", "8x3", "--dpi", "100"]) == 0
    assert "800x300 pixels, 2 runs" in capsys.readouterr().err
    image = image_module.imread(out)
    assert image.shape[:2] == (300, 800)
    left, right = image[:, :400], image[:, 400:]
    for panel in (left, right):                 # loss on the left, accuracy on the right, both runs in each
        assert _colour_pixels(panel, C0).sum() > 100
        assert _colour_pixels(panel, C1).sum() > 100


def test_the_figure_holds_training_and_held_out_loss_and_accuracy_per_run():
    pytest.importorskip("matplotlib")
    from structc.runlog import figure
    records = [{"epoch": k, "loss": 1.0 / k, "heldout_loss": 1.5 / k, "heldout_accuracy": 0.5 + k / 10}
               for k in (1, 2, 3)]
    fig = figure({"a": records, "b": records[:2]})
    left, right = fig.axes
    lines = {(line.get_label(), line.get_linestyle()): line for line in left.get_lines()}
    assert list(lines["a", "-"].get_ydata()) == [1.0, 0.5, 1 / 3]          # training loss, solid
    dashed = [line for line in left.get_lines() if line.get_linestyle() == "--"]
    assert [list(line.get_ydata()) for line in dashed] == [[1.5, 0.75, 0.5], [1.5, 0.75]]   # held-out, dashed
    assert [list(line.get_ydata()) for line in right.get_lines()] == [[0.6, 0.7, 0.8], [0.6, 0.7]]
    assert [line.get_label() for line in right.get_lines()] == ["a", "b"]
    assert left.get_ylabel() == "loss" and right.get_ylabel() == "held-out accuracy"


def test_the_figure_draws_validation_curves_dotted():
    pytest.importorskip("matplotlib")
    from structc.runlog import figure
    records = [{"epoch": k, "loss": 1.0 / k, "heldout_loss": 1.5 / k, "heldout_accuracy": 0.5,
                "val_loss": 2.0 / k, "val_accuracy": k / 4} for k in (1, 2)]
    left, right = figure({"a": records}).axes
    dotted = [[list(line.get_ydata()) for line in ax.get_lines() if line.get_linestyle() == ":"] for ax in (left, right)]
    assert dotted == [[[2.0, 1.0]], [[0.25, 0.5]]]
    assert "validation (dotted)" in left.get_title() and "validation (dotted)" in right.get_title()


def test_plot_of_a_run_without_accuracy_leaves_the_accuracy_panel_empty(tmp_path, capsys):
    image_module = pytest.importorskip("matplotlib.image")
    run = tmp_path / "r.metrics.jsonl"
    run.write_text("".join(json.dumps({"epoch": k, "loss": 1.0 / k, "heldout_loss": 1.2 / k}) + "\n"
                           for k in (1, 2, 3)))
    out = tmp_path / "c.png"
    assert main(["plot", str(run), "-o", str(out)]) == 0
    image = image_module.imread(out)
    assert image.shape[:2] == (400, 1000)
    assert _colour_pixels(image[:, :500], C0).sum() > 100
    assert _colour_pixels(image[:, 500:], C0).sum() == 0


def test_plot_errors(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nothing"), "-o", str(tmp_path / "c.png")]) == 1
    assert "no metrics for run" in capsys.readouterr().err
    run = _write_run(tmp_path / "a.metrics.jsonl", [1.0], [0.5])
    assert main(["plot", str(run), "-o", str(tmp_path / "c.png"), "--size", "big"]) == 2
    assert "--size takes WIDTHxHEIGHT" in capsys.readouterr().err
    assert main(["plot", str(run), "-o", str(tmp_path / "missing" / "c.png")]) == 2
    assert not (tmp_path / "c.png").exists()


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    run = _write_run(tmp_path / "a.metrics.jsonl", [1.0], [0.5])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)      # import fails as if not installed
    assert main(["plot", str(run), "-o", str(tmp_path / "c.png")]) == 1
    assert "structc plot needs matplotlib: pip install 'structc[plot]'" in capsys.readouterr().err


def test_plot_of_a_trained_run(tiny, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert train(tiny, "--epochs", "2", "--out", str(tmp_path / "run.npz")) == 0
    assert main(["plot", str(tmp_path / "run"), "-o", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000


# -- TensorBoard -----------------------------------------------------------------------

def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the event files in `folder` as TensorBoard shows them:
    TFRecords (length, its CRC, an Event protobuf, its CRC), parsed with tensorboardX's own
    protobuf classes, files in name order; a session START at step T hides the steps >= T
    read before it (TensorBoard's purge of a restarted run's orphaned steps)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event, SessionLog
    scalars: dict[str, list] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        raw = path.read_bytes()
        at = 0
        while at < len(raw):
            (length,) = struct.unpack_from("<Q", raw, at)
            event = Event.FromString(raw[at + 12:at + 12 + length])
            at += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                scalars = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in scalars.items()}
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest.mark.slow      # importing tensorboardX imports torch where it is installed: seconds
def test_tensorboard_gets_the_logs_scalars(tiny, tmp_path, capsys):
    pytest.importorskip("tensorboardX", reason="--tensorboard needs tensorboardX: pip install 'structc[tensorboard]'")
    board = tmp_path / "tb"
    assert train(tiny, "--epochs", "3", "--lr", "0.05", "--out", str(tmp_path / "run.npz"),
                 "--tensorboard", str(board)) == 0
    assert f"TensorBoard scalars in {board}" in capsys.readouterr().err
    records, scalars = read_metrics(tmp_path / "run.metrics.jsonl"), tensorboard_scalars(board)
    for field, tag in [("loss", "loss/train"), ("heldout_loss", "loss/heldout"), ("heldout_accuracy",
                       "accuracy/heldout"), ("lr", "learning_rate"), ("elapsed", "time/elapsed_seconds")]:
        assert [s for s, _ in scalars[tag]] == [1, 2, 3]
        assert [v for _, v in scalars[tag]] == pytest.approx([r[field] for r in records], rel=1e-6)


@pytest.mark.slow      # importing tensorboardX imports torch where it is installed: seconds
def test_a_resumed_run_hides_the_tensorboard_steps_its_log_drops(tiny, tmp_path, capsys):
    # a run went on past its epoch-3 checkpoint to epoch 5, then is resumed from that checkpoint
    pytest.importorskip("tensorboardX", reason="--tensorboard needs tensorboardX: pip install 'structc[tensorboard]'")
    board, run, kept = tmp_path / "tb", tmp_path / "run.npz", tmp_path / "kept.npz"
    assert train(tiny, "--epochs", "3", "--out", str(run), "--tensorboard", str(board)) == 0
    for name in ("npz", "train.npz", "metrics.jsonl"):
        (tmp_path / f"kept.{name}").write_bytes((tmp_path / f"run.{name}").read_bytes())
    assert train(tiny, "--epochs", "5", "--resume", str(run), "--tensorboard", str(board)) == 0
    assert train(tiny, "--epochs", "5", "--resume", str(kept), "--tensorboard", str(board)) == 0
    records, scalars = read_metrics(metrics_path(kept)), tensorboard_scalars(board)
    assert len(list(board.glob("events.out.tfevents.*"))) == 3        # none written over another
    for field, tag in [("loss", "loss/train"), ("elapsed", "time/elapsed_seconds")]:
        assert [s for s, _ in scalars[tag]] == [1, 2, 3, 4, 5]
        assert [v for _, v in scalars[tag]] == pytest.approx([r[field] for r in records], rel=1e-6)


def test_tensorboard_without_tensorboardx_says_what_to_install(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)          # as if not installed
    assert train(tiny, "--epochs", "1", "--out", str(tmp_path / "run.npz"), "--tensorboard", str(tmp_path)) == 1
    assert "--tensorboard needs tensorboardX: pip install 'structc[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "run.npz").exists()                      # refused before training


@pytest.mark.slow      # importing tensorboardX imports torch where it is installed: seconds
def test_a_run_that_never_trains_leaves_no_tensorboard_file(tiny, tmp_path, capsys):
    pytest.importorskip("tensorboardX", reason="--tensorboard needs tensorboardX: pip install 'structc[tensorboard]'")
    model, _ = tiny
    assert main(["train", model, "--data", str(tmp_path / "missing.csv"), "--tensorboard", str(tmp_path / "tb"),
                 "--out", str(tmp_path / "run.npz")]) == 1
    assert "no such data file" in capsys.readouterr().err and not (tmp_path / "tb").exists()
