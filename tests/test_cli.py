"""The command line: the quick start's training run, dumps, errors."""
import io
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from structc.cli import main
from structc.compiler import STAGES

ROOT = Path(__file__).parent.parent
MLP = ROOT / "examples" / "digits_mlp.snet"


def test_quick_start_trains_digits_to_95_percent(tmp_path, capsys):
    out = tmp_path / "digits.npz"
    assert main(["train", str(MLP), "--data", "digits", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    accuracy = float(text.strip().splitlines()[-1].rsplit(" ", 1)[-1].rstrip("%"))
    assert accuracy >= 95.0, text
    assert "epoch  20/20" in text
    with np.load(out) as params:
        assert "dense1.w" in params.files


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ast", "graph", "train", "train.fuse", "plan", "llvm", "asm"])
def test_dump_prints_each_stage(stage, capsys):
    assert main(["compile", str(MLP), f"--dump={stage}"]) == 0
    out = capsys.readouterr().out
    assert f";; ---- {stage} ----" in out
    assert len(out.splitlines()) > 3


def test_dump_names_every_stage():
    for required in ("ast", "graph", "train", "plan", "llvm", "opt", "asm"):
        assert required in STAGES


@pytest.mark.slow
def test_fused_groups_are_shown(capsys):
    main(["compile", str(MLP), "--dump=train.fuse"])
    out = capsys.readouterr().out
    assert "(epilogue) -> " in out and "matmul" in out


def test_every_stage_dump_all_prints_can_be_asked_for_alone(capsys):
    """`--dump all` prints the update entry's passes too (`update.fuse`):
    each of its stages is one --dump accepts on its own."""
    perceptron = ROOT / "examples" / "perceptron.snet"
    assert main(["compile", str(perceptron), "--dump=all"]) == 0
    printed = re.findall(r"^;; ---- (\S+) ----$", capsys.readouterr().out, re.M)
    assert "update.fuse" in printed and set(printed) <= set(STAGES)
    assert main(["compile", str(perceptron), "--dump=update.fuse"]) == 0
    assert re.findall(r"^;; ---- (\S+) ----$", capsys.readouterr().out, re.M) == ["update.fuse"]


def test_unknown_stage_is_an_error(capsys):
    assert main(["compile", str(MLP), "--dump=nonsense"]) == 1
    assert "unknown stage 'nonsense'" in capsys.readouterr().err


def test_unknown_data_set(capsys):
    assert main(["train", str(MLP), "--data", "mnist-9000"]) == 1
    assert "unknown data set 'mnist-9000'" in capsys.readouterr().err


def test_data_set_that_does_not_fit_the_model(tmp_path, capsys):
    f = tmp_path / "m.snet"
    f.write_text("model M { input x: f32[N, 10]  target y: class[N] of 10\n loss cross_entropy(dense(x, 10), y) }")
    assert main(["train", str(f), "--data", "digits"]) == 1
    assert "64 values per example" in capsys.readouterr().err


def test_npz_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    np.savez(tmp_path / "d.npz", x_train=x[:150], y_train=y[:150], x_test=x[150:], y_test=y[150:])
    f = tmp_path / "m.snet"
    f.write_text("model M { input x: f32[N, 5]  target y: class[N] of 2\n loss cross_entropy(dense(x, 2), y) }")
    assert main(["train", str(f), "--data", str(tmp_path / "d.npz"), "--epochs", "30", "--no-progress",
                 "--out", str(tmp_path / "p.npz")]) == 0
    assert "held-out accuracy" in capsys.readouterr().out


def test_graph_writes_dot_with_fused_groups(tmp_path):
    out = tmp_path / "g.dot"
    assert main(["graph", str(MLP), "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith('digraph "DigitsMLP"') and "subgraph cluster_" in text
    assert "matmul" in text and "softmax_ce_grad" in text and "line 7" in text


@pytest.mark.parametrize("target, transposes", [("x86-64-v3", 1), ("x86-64-v4", 0)])
def test_graph_draws_what_this_machine_compiles(tmp_path, monkeypatch, target, transposes):
    """`legalize` depends on the vector width (a weight gradient over x of rows 4 KiB
    apart reads x transposed below AVX-512): the picture is the host's graph."""
    from structc import native
    monkeypatch.setattr(native, "host_target", lambda: native.named_target(target))
    src = tmp_path / "wide.snet"
    src.write_text("model W { input x: f32[N, 1024]  target y: class[N] of 3\n"
                   "  loss cross_entropy(dense(dense(x, 64) |> relu, 3), y) }")
    out = tmp_path / "g.dot"
    assert main(["graph", str(src), "-o", str(out)]) == 0
    assert out.read_text().count(" transpose\\nf32[1024, N]") == transposes      # x^T, drawn as it runs


def test_graph_draws_svg(tmp_path):
    pytest.importorskip("matplotlib")   # in the test extra; skipped only where it is not installed
    out = tmp_path / "g.svg"
    assert main(["graph", str(MLP), "-o", str(out), "--which", "forward"]) == 0
    assert out.read_text().lstrip().startswith("<?xml") and "<svg" in out.read_text()


def test_graph_rejects_unknown_format(tmp_path, capsys):
    assert main(["graph", str(MLP), "-o", str(tmp_path / "g.bmp")]) == 1
    assert "unknown picture format '.bmp'" in capsys.readouterr().err


# -- shared: a small model on a small .npz data set, fast to compile and train ------

TINY = """model Tiny {
  input x: f32[N, 5]  target y: class[N] of 2
  logits = dense(x, 2)
  output probs = softmax(logits)
  loss cross_entropy(logits, y)
}"""


@pytest.fixture
def tiny(tmp_path):
    """(model file, data file) for a 5-feature, 2-class problem: 200 training examples (7 batches of 32)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(260, 5)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    model = tmp_path / "tiny.snet"
    model.write_text(TINY)
    return str(model), str(data)


def train_tiny(tiny, out, *extra):
    model, data = tiny
    return main(["train", model, "--data", data, "--epochs", "2", "--out", str(out), *extra])


# -- item 1: where the parameters go ------------------------------------------------

def test_out_in_a_missing_folder_fails_before_training(tiny, tmp_path, capsys):
    out = tmp_path / "missing" / "p.npz"
    assert train_tiny(tiny, out) == 2
    captured = capsys.readouterr()
    assert f"cannot write the parameters to {out}: folder {out.parent} does not exist" in captured.err
    assert "epoch" not in captured.out + captured.err and "compiled" not in captured.err


def test_out_that_is_a_folder_fails_before_training(tiny, tmp_path, capsys):
    (tmp_path / "p.npz").mkdir()
    assert train_tiny(tiny, tmp_path / "p.npz") == 2
    captured = capsys.readouterr()
    assert "it is a folder" in captured.err and "epoch" not in captured.out


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_out_in_a_read_only_folder_fails_before_training(tiny, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    try:
        assert train_tiny(tiny, folder / "p.npz") == 2
    finally:
        folder.chmod(0o700)
    assert "permission denied" in capsys.readouterr().err


def test_out_without_npz_reports_the_file_written_and_params_accepts_both_names(tiny, tmp_path, capsys):
    assert train_tiny(tiny, tmp_path / "weights") == 0
    assert f"saved parameters to {tmp_path / 'weights.npz'};" in capsys.readouterr().out
    assert (tmp_path / "weights.npz").is_file() and not (tmp_path / "weights").exists()
    for name in ("weights", "weights.npz"):
        assert main(["eval", tiny[0], "--data", tiny[1], "--params", str(tmp_path / name)]) == 0
        assert "accuracy" in capsys.readouterr().out


def _remove_folder_after_training(monkeypatch, folder):
    """Make the output folder vanish while the run trains (a write error after training)."""
    import shutil

    import structc.train
    real = structc.train.train

    def train_then_remove(*args, **kwargs):
        history = real(*args, **kwargs)
        shutil.rmtree(folder)
        return history
    monkeypatch.setattr(structc.train, "train", train_then_remove)


def test_a_finished_run_is_saved_in_the_working_directory_when_out_fails(tiny, tmp_path, monkeypatch, capsys):
    (tmp_path / "gone").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    _remove_folder_after_training(monkeypatch, tmp_path / "gone")
    assert train_tiny(tiny, tmp_path / "gone" / "p.npz") == 1
    err = capsys.readouterr().err
    saved = tmp_path / "cwd" / "p.npz"
    assert f"cannot write {tmp_path / 'gone' / 'p.npz'}" in err and f"saved the parameters to {saved} instead" in err
    with np.load(saved) as params:
        assert "dense1.w" in params.files
    assert (tmp_path / "cwd" / "p.train.npz").is_file()


def test_a_finished_run_falls_back_to_a_temporary_file(tiny, tmp_path, monkeypatch, capsys):
    (tmp_path / "gone").mkdir()
    _remove_folder_after_training(monkeypatch, tmp_path / "gone")
    monkeypatch.setattr(Path, "cwd", classmethod(lambda cls: tmp_path / "also-gone"))
    assert train_tiny(tiny, tmp_path / "gone" / "p.npz") == 1
    err = capsys.readouterr().err
    saved = Path(err.split("saved the parameters to ")[1].split(" instead")[0])
    assert saved.parent == Path(tempfile.gettempdir()) and saved.name.startswith("p-")
    with np.load(saved) as params:
        assert "dense1.w" in params.files
    saved.unlink()
    saved.with_name(saved.name[:-4] + ".train.npz").unlink()


# -- item 2: progress bars on a terminal only ----------------------------------------

def test_no_bars_in_a_log_one_line_per_epoch(tiny, tmp_path, capsys):
    assert train_tiny(tiny, tmp_path / "p.npz") == 0         # capsys: stderr is not a terminal
    captured = capsys.readouterr()
    assert "batch" not in captured.err and "\r" not in captured.err and "0/7" not in captured.err
    epochs = [line for line in captured.out.splitlines() if line.startswith("epoch")]
    assert len(epochs) == 2
    assert re.fullmatch(r"epoch   2/2  loss \d\.\d{4}  held-out loss \d\.\d{4}  accuracy \d+\.\d\d%  "
                        r"\(\d+\.\d s\)", epochs[1])


def test_no_bars_when_stderr_is_a_pipe(tiny, tmp_path):
    model, data = tiny
    run = subprocess.run([sys.executable, "-m", "structc.cli", "train", model, "--data", data, "--epochs", "2",
                          "--out", str(tmp_path / "p.npz")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "batch" not in run.stderr and "\r" not in run.stderr
    assert run.stderr.count("\n") == 1                          # only the "compiled ..." line
    assert run.stdout.count("epoch ") == 2


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_on_a_terminal(tiny, tmp_path, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert train_tiny(tiny, tmp_path / "p.npz") == 0
    assert "epoch 2/2" in terminal.getvalue() and "batch/s" in terminal.getvalue()


def test_no_progress_hides_bars_on_a_terminal_too(tiny, tmp_path, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert train_tiny(tiny, tmp_path / "p.npz", "--no-progress") == 0
    assert "batch" not in terminal.getvalue()


# -- item 3: help, compile into the cache, eval, predict, resume, --model ------------

def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_train_help_lists_every_data_set_and_every_default(capsys):
    from structc.cli import parser
    from structc.datasets import DATASETS
    text = " ".join(_help("train", capsys).split())
    assert f"built-in data set ({', '.join(sorted(DATASETS))}) or a file or folder of your data" in text
    train = parser()._subparsers._group_actions[0].choices["train"]
    help_of = train._get_formatter()._expand_help
    options = [a for a in train._actions if a.option_strings and not a.required
               and a.dest not in ("help", "no_progress", "distributed")]
    assert len(options) == 23     # with --init, --freeze, --clip-norm, the schedule's 5, --val-split, --early-stop, --monitor, --tensorboard, --stream
    for option in options:
        assert "default" in help_of(option), option.option_strings
    for shown in ("(default: 20)", "(default: 32;", "(default: 0.1;", "(default: sgd;", "(default: <model>.npz;"):
        assert shown in text


def test_compile_without_output_fills_the_cache_structc_compile_reads(tmp_path, monkeypatch, capsys):
    import structc
    from structc import api
    monkeypatch.setenv("STRUCTC_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "m.snet"
    model.write_text("model CachedOne { input x: f32[N, 7]  output o = dense(x, 3) }")
    assert main(["compile", str(model)]) == 0
    out = capsys.readouterr().out
    assert "compiled CachedOne (forward) in" in out and f"(cached in {tmp_path / 'cache'})" in out
    before = api.COMPILE_COUNT
    structc.compile(model)
    assert api.COMPILE_COUNT == before                       # loaded from what the CLI compiled
    assert main(["compile", str(model)]) == 0
    assert f"model CachedOne is already compiled (cached in {tmp_path / 'cache'})" in capsys.readouterr().out


def test_eval_reports_the_held_out_accuracy_of_saved_parameters(tiny, tmp_path, capsys):
    assert train_tiny(tiny, tmp_path / "p.npz") == 0
    trained = capsys.readouterr().out.strip().splitlines()[-1].rsplit(" ", 1)[-1]
    assert main(["eval", tiny[0], "--data", tiny[1], "--params", str(tmp_path / "p.npz")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Tiny with {tmp_path / 'p.npz'} on {tiny[1]} (held-out split): loss ")
    assert out.strip().endswith(f"accuracy {trained}")


def test_eval_with_missing_parameters(tiny, tmp_path, capsys):
    assert main(["eval", tiny[0], "--data", tiny[1], "--params", str(tmp_path / "nope")]) == 1
    assert f"no parameter file {tmp_path / 'nope'} (nor {tmp_path / 'nope'}.npz)" in capsys.readouterr().err


def _forward(tiny, params, x):
    import structc
    net = structc.compile(Path(tiny[0]))
    net.load_params(str(params))
    return net.forward(x=x)["probs"]


def test_predict_writes_class_ids_scores_and_every_output(tiny, tmp_path, capsys):
    assert train_tiny(tiny, tmp_path / "p.npz") == 0
    x = np.random.default_rng(1).normal(size=(9, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    probs = _forward(tiny, tmp_path / "p.npz", x)
    capsys.readouterr()
    args = ["predict", tiny[0], "--params", str(tmp_path / "p"), "--input", str(tmp_path / "x.npy")]
    assert main(args + ["--out", str(tmp_path / "ids")]) == 0
    assert f"to {tmp_path / 'ids.npy'}" in capsys.readouterr().out    # the name numpy would have written
    ids = np.load(tmp_path / "ids.npy")
    assert ids.dtype == np.int32 and np.array_equal(ids, np.argmax(probs, axis=-1))
    assert main(args + ["--out", str(tmp_path / "scores.npy"), "--raw"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "scores.npy"), probs)
    np.savez(tmp_path / "x.npz", x=x)
    assert main(["predict", tiny[0], "--params", str(tmp_path / "p.npz"), "--input", str(tmp_path / "x.npz"),
                 "--out", str(tmp_path / "all.npz")]) == 0
    with np.load(tmp_path / "all.npz") as saved:
        assert saved.files == ["probs"] and np.array_equal(saved["probs"], ids)


def test_predict_refuses_inputs_that_do_not_fit(tiny, tmp_path, capsys):
    assert train_tiny(tiny, tmp_path / "p.npz") == 0
    np.savez(tmp_path / "wrong.npz", a=np.zeros((3, 5), np.float32), b=np.zeros(3, np.float32))
    np.save(tmp_path / "narrow.npy", np.zeros((3, 4), np.float32))
    capsys.readouterr()
    args = ["predict", tiny[0], "--params", str(tmp_path / "p.npz"), "--out", str(tmp_path / "o.npy"), "--input"]
    assert main(args + [str(tmp_path / "wrong.npz")]) == 1
    assert "holds ['a', 'b']; model Tiny takes inputs ['x']" in capsys.readouterr().err
    assert main(args + [str(tmp_path / "narrow.npy")]) == 1
    assert "input 'x'" in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()
    assert main(args[:-3] + ["--out", str(tmp_path / "no" / "o.npy"), "--input", str(tmp_path / "narrow.npy")]) == 2


def test_predict_refuses_a_graph_model_clearly(tmp_path, capsys):
    model = tmp_path / "graphs.snet"
    model.write_text(KINDS["graphs"])
    np.save(tmp_path / "x.npy", np.ones((3, 1), np.float32))
    import structc
    structc.compile(model).save_params(str(tmp_path / "p.npz"))
    assert main(["predict", str(model), "--params", str(tmp_path / "p.npz"), "--input", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "o.npy")]) == 1
    assert "structc predict reads tensors; model SmallGraphs takes g (a graph, forest or sequence)" in capsys.readouterr().err


def test_resume_ends_as_an_uninterrupted_run(tiny, tmp_path):
    model, data = tiny
    common = ["train", model, "--data", data, "--optimizer", "adam", "--lr", "0.05", "--batch", "16"]
    assert main(common + ["--epochs", "3", "--out", str(tmp_path / "straight.npz")]) == 0
    assert main(common + ["--epochs", "1", "--out", str(tmp_path / "first.npz")]) == 0
    # the resumed run takes optimizer, lr and batch from the checkpoint
    assert main(["train", model, "--data", data, "--epochs", "3", "--resume", str(tmp_path / "first"),
                 "--out", str(tmp_path / "resumed.npz")]) == 0
    with np.load(tmp_path / "straight.npz") as a, np.load(tmp_path / "resumed.npz") as b:
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])


def test_resume_updates_the_checkpoint_unless_told_otherwise(tiny, tmp_path, capsys):
    assert train_tiny(tiny, tmp_path / "run") == 0
    assert main(["train", tiny[0], "--data", tiny[1], "--epochs", "3", "--resume", str(tmp_path / "run")]) == 0
    assert f"saved parameters to {tmp_path / 'run.npz'};" in capsys.readouterr().out
    from structc.train import load_state
    assert load_state(tmp_path / "run.train.npz")["epoch"] == 3


def test_compile_checks_the_library_path_first(tmp_path, capsys):
    assert main(["compile", str(MLP), "-o", str(tmp_path / "missing" / "m.so")]) == 2
    captured = capsys.readouterr()
    assert f"cannot write the library to {tmp_path / 'missing' / 'm.so'}: folder" in captured.err
    assert captured.out == ""


def test_resume_says_what_it_cannot_continue(tiny, tmp_path, capsys):
    model, data = tiny
    assert train_tiny(tiny, tmp_path / "p.npz", "--optimizer", "momentum") == 0
    capsys.readouterr()
    resume = ["train", model, "--data", data, "--resume", str(tmp_path / "p.npz"), "--out", str(tmp_path / "q")]
    assert main(resume + ["--epochs", "2"]) == 1
    assert "has already been trained for 2 epochs; --epochs is the total to reach" in capsys.readouterr().err
    assert main(resume + ["--epochs", "3", "--optimizer", "adam"]) == 0
    err = capsys.readouterr().err
    assert "--optimizer adam differs from the resumed run's momentum" in err
    assert "the adam optimizer's state (moments, step count) could not be restored" in err
    (tmp_path / "p.train.npz").unlink()
    assert main(resume + ["--epochs", "3"]) == 1
    assert f"its training state {tmp_path / 'p.train.npz'} is missing" in capsys.readouterr().err


def test_resume_of_an_edited_model_with_the_same_parameters_says_so(tiny, tmp_path, capsys):
    model, data = tiny
    assert train_tiny(tiny, tmp_path / "p.npz") == 0
    resume = ["train", model, "--data", data, "--resume", str(tmp_path / "p.npz"), "--out", str(tmp_path / "q")]
    Path(model).write_text("# a comment changes nothing\n" + TINY)
    capsys.readouterr()
    assert main(resume + ["--epochs", "3"]) == 0
    assert "differs from the resumed run's" not in capsys.readouterr().err
    Path(model).write_text(TINY.replace("logits = dense(x, 2)", "logits = dense(x, 2) |> tanh"))
    assert main(resume + ["--epochs", "3"]) == 0
    assert "model Tiny differs from the resumed run's (its parameters' names and shapes are the same, its " \
           "definition is not)" in capsys.readouterr().err


def test_resume_refuses_a_state_file_of_other_parameters(tiny, tmp_path, capsys):
    assert train_tiny(tiny, tmp_path / "a.npz") == 0
    assert train_tiny(tiny, tmp_path / "b.npz", "--seed", "1") == 0
    (tmp_path / "b.train.npz").replace(tmp_path / "a.train.npz")
    capsys.readouterr()
    assert main(["train", tiny[0], "--data", tiny[1], "--epochs", "3", "--resume", str(tmp_path / "a.npz"),
                 "--out", str(tmp_path / "c")]) == 1
    assert "is the training state of other parameters" in capsys.readouterr().err


def test_resume_refuses_a_damaged_training_state_clearly(tiny, tmp_path, capsys):
    """A state file cut short (a crash while it was written) or not an archive at all
    is an error naming the file, not a traceback."""
    assert train_tiny(tiny, tmp_path / "a.npz") == 0
    whole = (tmp_path / "a.train.npz").read_bytes()
    resume = ["train", tiny[0], "--data", tiny[1], "--epochs", "3", "--resume", str(tmp_path / "a.npz"),
              "--out", str(tmp_path / "b")]
    for damaged in (whole[:300], b"hello\n"):
        (tmp_path / "a.train.npz").write_bytes(damaged)
        capsys.readouterr()
        assert main(resume) == 1
        err = capsys.readouterr().err
        assert f"cannot read the training state {tmp_path / 'a.train.npz'}" in err
        assert "pickle" not in err


def test_a_failed_state_write_leaves_the_last_state_whole(tiny, tmp_path, monkeypatch):
    """The training state is replaced in one rename: a write that fails half-way
    (disk full, a crash) leaves the previous checkpoint's state readable."""
    from structc import train as train_module
    assert train_tiny(tiny, tmp_path / "a.npz") == 0

    def fails_half_way(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train_module.np, "savez", fails_half_way)
    import structc
    net = structc.compile(Path(tiny[0]))
    net.load_params(tmp_path / "a.npz")
    with pytest.raises(OSError):
        train_module.save_state(net, tmp_path / "a.train.npz", 3, train_module.TrainConfig(), {}, "d")
    monkeypatch.undo()
    assert train_module.load_state(tmp_path / "a.train.npz")["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".structc-")] == []


@pytest.mark.parametrize("options, named", [
    (["--decay-steps", "3", "--gamma", "0.5"], "--decay-steps"),       # no --schedule: the lr stayed constant
    (["--schedule", "constant", "--decay-steps", "3"], "--decay-steps"),
    (["--schedule", "cosine", "--decay-steps", "3", "--gamma", "0.5"], "--gamma"),    # only step uses gamma
    (["--schedule", "step", "--decay-steps", "3", "--floor", "0.5"], "--floor"),      # only cosine uses floor
])
def test_schedule_options_the_schedule_would_ignore_are_refused(tiny, tmp_path, capsys, options, named):
    assert train_tiny(tiny, tmp_path / "a.npz", *options) == 1
    err = capsys.readouterr().err
    assert f"structc: error: {named} " in err and "--schedule" in err
    assert not (tmp_path / "a.npz").exists()


def test_resume_with_another_schedule_says_so(tiny, tmp_path, capsys):
    """The README's promise: a resumed run keeps the run's --schedule and warns when told otherwise."""
    assert train_tiny(tiny, tmp_path / "a.npz", "--schedule", "step", "--decay-steps", "3") == 0
    resume = ["train", tiny[0], "--data", tiny[1], "--epochs", "3", "--resume", str(tmp_path / "a.npz"),
              "--out", str(tmp_path / "b")]
    capsys.readouterr()
    assert main(resume) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(resume + ["--schedule", "cosine", "--decay-steps", "30"]) == 0
    assert ("--schedule cosine (decay-steps 30, floor 0) differs from the resumed run's step (decay-steps 3, gamma 0.1)"
            in capsys.readouterr().err)
    assert main(resume + ["--schedule", "constant"]) == 0
    assert "--schedule constant differs from the resumed run's step" in capsys.readouterr().err


def test_resume_with_another_optimizer_keeps_the_schedule_where_it_was(tiny, tmp_path, capsys):
    """Adam's moments cannot carry over to SGD, but the schedule's position is the run's:
    epoch 2's last step is step 13 of the step schedule, as in an uninterrupted run."""
    import json

    from structc.schedules import lr_factor
    sched = ["--schedule", "step", "--decay-steps", "3", "--gamma", "0.5"]
    assert main(["train", tiny[0], "--data", tiny[1], "--epochs", "1", "--out", str(tmp_path / "a.npz"), "--optimizer", "adam",
                 *sched]) == 0
    for optimizer, warning in (("sgd", None), ("momentum", "the momentum optimizer's moments could not be "
                                                            "restored: they start from zero")):
        capsys.readouterr()
        assert main(["train", tiny[0], "--data", tiny[1], "--epochs", "2", "--resume", str(tmp_path / "a.npz"), "--optimizer",
                     optimizer, "--out", str(tmp_path / optimizer)]) == 0
        err = capsys.readouterr().err
        assert (warning in err) if warning else ("could not be restored" not in err)
        lrs = [json.loads(line)["lr"] for line in (tmp_path / f"{optimizer}.metrics.jsonl").read_text().splitlines()]
        spec = {"kind": "step", "warmup": 0, "decay_steps": 3, "gamma": 0.5, "floor": 0.0}
        assert lrs == pytest.approx([0.1 * lr_factor(spec, 6), 0.1 * lr_factor(spec, 13)]), optimizer


def test_resume_into_adam_says_the_schedule_restarts(tiny, tmp_path, capsys):
    """Adam's bias correction counts from its moments' first step, so its step count and
    with it the schedule start again: said, not done silently."""
    assert train_tiny(tiny, tmp_path / "a.npz", "--schedule", "cosine", "--decay-steps", "30") == 0
    capsys.readouterr()
    assert main(["train", tiny[0], "--data", tiny[1], "--epochs", "3", "--resume", str(tmp_path / "a.npz"), "--optimizer", "adam",
                 "--out", str(tmp_path / "b")]) == 0
    assert ("the adam optimizer's state (moments, step count) could not be restored: it starts from zero, and "
            "so does the --schedule" in capsys.readouterr().err)


TWO_MODELS = """model A { input x: f32[N, 5]  target y: class[N] of 2
  loss cross_entropy(dense(x, 2), y) }
model B { input x: f32[N, 5]  target y: class[N] of 2
  logits = dense(dense(x, 4) |> relu, 2)
  loss cross_entropy(logits, y) }
"""


def test_model_chooses_among_several(tiny, tmp_path, capsys):
    two = tmp_path / "two.snet"
    two.write_text(TWO_MODELS)
    args = ["train", str(two), "--data", tiny[1], "--epochs", "1", "--out", str(tmp_path / "p")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "several models" in err and re.search(r"\bA\b.*\bB\b", err)    # the wording is branch syntax's
    assert main(args + ["--model", "B"]) == 0
    with np.load(tmp_path / "p.npz") as params:
        assert len(params.files) == 4                          # B's two layers, not A's one
    assert main(args + ["--model", "C"]) == 1
    assert "C" in capsys.readouterr().err


# -- item 4: a data set of the wrong kind for the model (golden messages) -------------

# One small model of each kind (fast to compile), each given a data set of another kind.
KINDS = {
    "tree": """model SmallTree { input t: forest(arity=2) of word(vocab=6)  target y: class[t.trees] of 2
  param E: embedding(6, 4) = normal(0.3)
  rec h(n) = leaf: E[n.word]
             node: sum(h(n.children))
  loss cross_entropy(dense(h(t.root), 2), y) }""",
    "dense": TINY,
    "nodes": """model SmallNodes { input g: graph(features=3)  input train: f32[g.nodes]  target y: class[g.nodes] of 2
  loss masked_cross_entropy(dense(g.x, 2), y, train) }""",
    "graphs": """model SmallGraphs { input g: graph(features=1)  target y: class[g.graphs] of 3
  loss cross_entropy(dense(mean(g.x over g.nodes), 3), y) }""",
}
WRONG_KIND = [
    ("tree", "digits",
     "data set 'digits' holds dense examples of 64 values with a class label each (for a tensor input), but "
     "model SmallTree declares forest input 't' (arity 2, leaves word(vocab=6)), target 'y': class[t.trees] of 2; "
     "try --data logic (labelled trees)"),
    ("dense", "logic",
     "data set 'logic' holds labelled trees (for a forest input), but model Tiny declares tensor input 'x': "
     "f32[N, 5], target 'y': class[N] of 2; try --data digits (64 values per example) or an .npz file with "
     "x_train, y_train, x_test, y_test"),
    ("nodes", "digits",
     "data set 'digits' holds dense examples of 64 values with a class label each (for a tensor input), but "
     "model SmallNodes declares graph input 'g' (3 features per node), tensor input 'train': f32[g.nodes], "
     "target 'y': class[g.nodes] of 2; try --data karate (a label per node)"),
    ("nodes", "graph_families",
     "data set 'graph_families' holds many graphs with one class label each (for a graph input), but model "
     "SmallNodes declares graph input 'g' (3 features per node), tensor input 'train': f32[g.nodes], target 'y': "
     "class[g.nodes] of 2; try --data karate (a label per node)"),
    ("graphs", "logic",
     "data set 'logic' holds labelled trees (for a forest input), but model SmallGraphs declares graph input "
     "'g' (1 feature per node), target 'y': class[g.graphs] of 3; try --data graph_families (a label per graph)"),
    ("graphs", "karate",
     "data set 'karate' holds one graph with a class label per node (for a graph input and a node mask), but "
     "model SmallGraphs declares graph input 'g' (1 feature per node), target 'y': class[g.graphs] of 3; "
     "try --data graph_families (a label per graph)"),
]


@pytest.mark.parametrize("kind, data, message", WRONG_KIND, ids=[f"{k}-on-{d}" for k, d, _ in WRONG_KIND])
def test_data_of_the_wrong_kind_says_what_the_model_declares(kind, data, message, tmp_path, capsys):
    model = tmp_path / f"{kind}.snet"
    model.write_text(KINDS[kind])
    assert main(["train", str(model), "--data", data, "--out", str(tmp_path / "p")]) == 1
    assert capsys.readouterr().err == f"structc: error: {message}\n"
    assert main(["eval", str(model), "--data", data, "--params", "unused"]) == 1
    assert capsys.readouterr().err == f"structc: error: {message}\n"


def test_dense_data_of_another_kind_from_a_file(tmp_path, capsys):
    model = tmp_path / "tree.snet"
    model.write_text(KINDS["tree"])
    np.savez(tmp_path / "flat.npz", x_train=np.zeros((4, 7)), y_train=np.zeros(4, np.int32),
             x_test=np.zeros((2, 7)), y_test=np.zeros(2, np.int32))
    assert main(["train", str(model), "--data", str(tmp_path / "flat.npz"), "--out", str(tmp_path / "p")]) == 1
    assert "data set 'flat' holds dense examples of 7 values with a class label each" in capsys.readouterr().err


def test_dense_data_for_a_model_with_two_inputs(tmp_path, capsys):
    model = tmp_path / "two.snet"
    model.write_text("model TwoIn { input a: f32[N, 32]  input b: f32[N, 32]  target y: class[N] of 10\n"
                     "  loss cross_entropy(dense(concat(a, b, axis=1), 10), y) }")
    assert main(["train", str(model), "--data", "digits", "--out", str(tmp_path / "p")]) == 1
    assert capsys.readouterr().err == (
        "structc: error: data set 'digits' feeds one tensor input and one target; model TwoIn declares "
        "tensor input 'a': f32[N, 32], tensor input 'b': f32[N, 32], target 'y': class[N] of 10\n")


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`structc compile --dump=llvm | head -1`: no BrokenPipeError traceback."""
    import subprocess
    import sys
    cmd = (f"{sys.executable} -c 'import sys; from structc.cli import main; sys.exit(main())' "
           f"compile {ROOT / 'examples/digits_mlp.snet'} --dump=llvm | head -1")
    done = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd="/tmp", timeout=120)
    assert done.stdout.strip()
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


# -- flags against their help: bad values and flags that would do nothing ----------

def test_graph_into_a_missing_folder_is_an_error_not_a_traceback(tmp_path, capsys):
    assert main(["graph", str(MLP), "-o", str(tmp_path / "none" / "g.dot")]) == 2
    assert capsys.readouterr().err == (f"structc: error: cannot write the picture to {tmp_path / 'none' / 'g.dot'}: "
                                       f"folder {tmp_path / 'none'} does not exist\n")


def test_graph_checks_the_picture_format_before_building_the_graph(tmp_path, capsys, monkeypatch):
    import structc.build
    monkeypatch.setattr(structc.build, "build_model", lambda *a: pytest.fail("built the model first"))
    assert main(["graph", str(MLP), "-o", str(tmp_path)]) == 2
    assert "it is a folder" in capsys.readouterr().err
    assert main(["graph", str(MLP), "-o", str(tmp_path / "g.bmp")]) == 1
    assert "unknown picture format '.bmp'" in capsys.readouterr().err


@pytest.mark.parametrize("size, dpi", [("1000x1000", "1000"), ("10x4", "100000"), ("infx4", "100")])
def test_plot_refuses_a_picture_too_large_to_draw(tmp_path, capsys, size, dpi):
    """Past matplotlib's 2**16 pixels a side the render ran out of memory with a traceback."""
    assert main(["plot", str(tmp_path / "run"), "-o", str(tmp_path / "c.png"), "--size", size, "--dpi", dpi]) == 2
    err = capsys.readouterr().err
    assert err.startswith("structc: error: --size and --dpi") and "65535" in err and err.count("\n") == 1
    assert not (tmp_path / "c.png").exists()


def test_version_into_a_closed_pipe_ends_quietly():
    """`structc --version | true`: the reader is gone before the version is printed."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-c", "import sys; from structc.cli import main; sys.exit(main())",
                               "--version"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == "", done.stderr


def test_a_negative_seed_is_refused_by_name_before_compiling(tiny, tmp_path, capsys, monkeypatch):
    import structc.cli
    monkeypatch.setattr(structc.cli, "_compile_net", lambda *a, **k: pytest.fail("compiled first"))
    assert train_tiny(tiny, tmp_path / "p", "--seed", "-1") == 1
    assert capsys.readouterr().err == "structc: error: --seed must be a non-negative integer, got -1\n"


def test_compile_inference_into_the_cache_compiles_the_forward_entry_only(tiny, tmp_path, monkeypatch, capsys):
    """--inference without -o or --dump was dropped unsaid: the training parts were compiled too."""
    monkeypatch.setenv("STRUCTC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("STRUCTC_NO_CACHE", raising=False)
    assert main(["compile", tiny[0], "--inference"]) == 0
    assert re.search(r": compiled Tiny \(forward\) in .* \(cached in ", capsys.readouterr().out)
    assert main(["compile", tiny[0]]) == 0                 # the training parts are still to compile
    assert re.search(r": compiled Tiny \(forward, train\) in ", capsys.readouterr().out)


def test_monitor_without_early_stop_is_refused(tiny, tmp_path, capsys):
    assert train_tiny(tiny, tmp_path / "p", "--monitor", "val_acc", "--val-split", "0.1") == 1
    assert capsys.readouterr().err == ("structc: error: --monitor is what --early-stop watches, and this run has "
                                       "no --early-stop: it would have no effect\n")


def test_profile_forward_refuses_a_learning_rate(capsys):
    assert main(["profile", str(MLP), "--data", "digits", "--forward", "--lr", "0.5"]) == 1
    assert capsys.readouterr().err == ("structc: error: --lr is the training step's learning rate; --forward "
                                       "profiles the forward pass, which has none\n")


def test_predict_that_fails_to_write_leaves_the_old_file_whole(tiny, tmp_path, capsys, monkeypatch):
    """A full disk mid-write: one line, exit 1, the previous predictions untouched (no truncated .npy)."""
    model, _ = tiny
    assert train_tiny(tiny, tmp_path / "p", "--no-progress") == 0
    np.save(tmp_path / "x.npy", np.ones((3, 5), np.float32))
    out = tmp_path / "preds.npy"
    np.save(out, np.arange(4))

    def full_disk(f, *a, **k):
        f.write(b"\x93NUMPY")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "save", full_disk)
    capsys.readouterr()
    assert main(["predict", model, "--params", str(tmp_path / "p"), "--input", str(tmp_path / "x.npy"),
                 "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"structc: error: cannot write the predictions to {out}: No space left on device\n"
    monkeypatch.undo()
    assert np.load(out).tolist() == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_graph_which_train_of_a_model_without_a_loss_is_refused(tmp_path, capsys):
    """It drew the forward graph alone, as if asked for --which forward; without --which that stays the default."""
    model = tmp_path / "noloss.snet"
    model.write_text("model NoLoss {\n  input x: f32[N, 4]\n  output y = relu(dense(x, 3))\n}\n")
    assert main(["graph", str(model), "-o", str(tmp_path / "g.dot"), "--which", "train"]) == 1
    assert capsys.readouterr().err == ("structc: error: model NoLoss declares no loss, so it has no training "
                                       "graph: draw it with --which forward\n")
    assert not (tmp_path / "g.dot").exists()
    assert main(["graph", str(model), "-o", str(tmp_path / "g.dot")]) == 0
    assert "relu" in (tmp_path / "g.dot").read_text()


def _fails_part_way(path, *a, **k):
    Path(path).write_text("half a pict")
    raise OSError(28, "No space left on device")


def test_graph_that_fails_to_write_leaves_the_old_picture_whole(tmp_path, capsys, monkeypatch):
    import structc.draw
    out = tmp_path / "g.dot"
    out.write_text("the old picture")
    monkeypatch.setattr(structc.draw, "write", lambda g, forward, path: _fails_part_way(path))
    assert main(["graph", str(MLP), "-o", str(out)]) == 1
    assert capsys.readouterr().err == f"structc: error: cannot write the picture to {out}: No space left on device\n"
    assert out.read_text() == "the old picture" and sorted(p.name for p in tmp_path.iterdir()) == ["g.dot"]


def test_plot_that_fails_to_write_leaves_the_old_picture_whole(tiny, tmp_path, capsys, monkeypatch):
    import structc.runlog
    assert train_tiny(tiny, tmp_path / "run", "--no-progress") == 0
    out = tmp_path / "c.png"
    out.write_text("the old picture")
    monkeypatch.setattr(structc.runlog, "plot", lambda runs, path, **k: _fails_part_way(path))
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "run"), "-o", str(out)]) == 1
    assert capsys.readouterr().err == f"structc: error: cannot write the picture to {out}: No space left on device\n"
    assert out.read_text() == "the old picture" and not list(tmp_path.glob(".*"))


def test_profile_trace_that_fails_to_write_leaves_the_old_trace_whole(tmp_path, capsys, monkeypatch):
    import structc.profile
    out = tmp_path / "t.json"
    out.write_text("{}")
    monkeypatch.setattr(structc.profile.Report, "write_trace", lambda self, path: _fails_part_way(path))
    assert main(["profile", str(MLP), "--data", "digits", "--steps", "2", "--trace", str(out)]) == 1
    assert capsys.readouterr().err == f"structc: error: cannot write the trace to {out}: No space left on device\n"
    assert out.read_text() == "{}" and not list(tmp_path.glob(".*"))


def test_plot_of_a_missing_run_says_so_and_writes_nothing(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope"), "-o", str(tmp_path / "c.png")]) == 1
    assert capsys.readouterr().err.startswith(f"structc: error: no metrics for run {tmp_path / 'nope'}: looked for ")
    assert list(tmp_path.iterdir()) == []


def test_predict_input_that_is_not_numpy_says_so(tiny, tmp_path, capsys):
    """A .csv given to --input was reported as numpy's 'pickled (object) data ... allow_pickle' advice."""
    assert train_tiny(tiny, tmp_path / "p", "--no-progress") == 0
    (tmp_path / "x.csv").write_text("1,2,3,4,5\n")
    capsys.readouterr()
    assert main(["predict", tiny[0], "--params", str(tmp_path / "p"), "--input", str(tmp_path / "x.csv"),
                 "--out", str(tmp_path / "y.npy")]) == 1
    assert capsys.readouterr().err == (f"structc: error: cannot read inputs from {tmp_path / 'x.csv'}: not an .npy "
                                       f"or .npz file (save the arrays with numpy.save or numpy.savez)\n")


# -- `-` for standard output -----------------------------------------------------------
# `--out -` wrote a file named `-.npy` (train: `-.npz`, with `-.train.npz` and `-.metrics.jsonl`
# beside it) and printed nothing on standard output.

def test_predict_out_dash_writes_one_npy_to_standard_output(tiny, tmp_path, capsysbinary, monkeypatch):
    assert train_tiny(tiny, tmp_path / "p", "--no-progress") == 0
    x = np.random.default_rng(1).normal(size=(9, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    probs = _forward(tiny, tmp_path / "p.npz", x)
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())
    capsysbinary.readouterr()
    assert main(["predict", tiny[0], "--params", "p", "--input", "x.npy", "--out", "-"]) == 0
    captured = capsysbinary.readouterr()
    ids = np.load(io.BytesIO(captured.out))
    assert ids.dtype == np.int32 and np.array_equal(ids, np.argmax(probs, axis=-1))
    assert captured.err.decode().endswith("to standard output\n") and sorted(tmp_path.iterdir()) == before


def test_predict_out_dash_refuses_a_terminal(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["predict", tiny[0], "--params", "p", "--input", "x.npy", "--out", "-"]) == 2
    assert capsys.readouterr().err.startswith("structc: error: --out - writes the predictions to standard output "
                                              "as an .npy file (binary), and standard output is a terminal")


@pytest.mark.parametrize("command, what", [
    (["train", "{model}", "--data", "{data}", "--out", "-"], "the parameters"),
    (["compile", "{model}", "-o", "-"], "the library"),
    (["compile", "{model}", "-o", "t.so", "-H", "-"], "the header"),
    (["export", "{model}", "--onnx", "-"], "the ONNX model"),
    (["graph", "{model}", "-o", "-"], "the picture"),
    (["plot", "run", "-o", "-"], "the picture"),
    (["profile", "{model}", "--data", "{data}", "--trace", "-"], "the trace"),
])
def test_outputs_that_are_files_refuse_dash(command, what, tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())
    argv = [word.format(model=tiny[0], data=tiny[1]) for word in command]
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"structc: error: cannot write {what} to standard output ('-'): it is "
                                       f"written to a file; name one\n")
    assert sorted(tmp_path.iterdir()) == before


# -- numbers from the command line: named as the flags, refused before any work --------
# They were refused by library code after compiling and loading the data, naming its
# arguments (`epochs must be a positive integer`, `lr must be a finite float32 number >= 0`);
# `profile --lr 0` was accepted.

@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    (["--batch", "-3"], "--batch must be a positive integer, got -3"),
    (["--threads", "0"], "--threads must be a positive integer, got 0"),
    (["--lr", "0"], "--lr, the learning rate, must be a positive number, got 0.0"),
    (["--lr", "-0.1"], "--lr, the learning rate, must be a positive number, got -0.1"),
    (["--lr", "nan"], "--lr, the learning rate, must be a positive number, got nan"),
    (["--lr", "1e39"], "--lr, the learning rate, must be a positive number, got 1e+39"),
    (["--clip-norm", "-1"], "--clip-norm must be a number >= 0 (0: no clipping), got -1.0"),
    (["--warmup", "-1"], "--schedule: --warmup must be a whole number of steps >= 0, got -1"),
    (["--schedule", "step", "--decay-steps", "0"],
     "--schedule: the step schedule needs --decay-steps, a whole number of steps >= 1, got 0"),
    (["--schedule", "step", "--decay-steps", "5", "--gamma", "2"], "--schedule: --gamma must be a number in [0, 1], got 2.0"),
    (["--schedule", "cosine", "--decay-steps", "5", "--floor", "-1"],
     "--schedule: --floor must be a number in [0, 1], got -1.0"),
])
def test_train_names_the_flag_of_a_number_out_of_range(flags, message, tiny, tmp_path, capsys):
    assert train_tiny(tiny, tmp_path / "p", *flags) == 1
    captured = capsys.readouterr()
    assert captured.err == f"structc: error: {message}\n"
    assert "compiled" not in captured.err and list(tmp_path.glob("p*")) == []


@pytest.mark.parametrize("lr", ["0", "-1", "nan"])
def test_profile_refuses_a_learning_rate_train_refuses(lr, tiny, capsys):
    assert main(["profile", tiny[0], "--data", tiny[1], "--steps", "1", "--lr", lr]) == 2
    assert capsys.readouterr() == ("", f"structc: error: --lr, the learning rate, must be a positive number, "
                                       f"got {float(lr)}\n")


def test_predict_out_dash_that_fails_to_write_says_so(tiny, tmp_path, capsys, monkeypatch):
    assert train_tiny(tiny, tmp_path / "p", "--no-progress") == 0
    np.save(tmp_path / "x.npy", np.ones((3, 5), np.float32))

    def full_disk(f, *a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "save", full_disk)
    capsys.readouterr()
    assert main(["predict", tiny[0], "--params", str(tmp_path / "p"), "--input", str(tmp_path / "x.npy"),
                 "--out", "-"]) == 1
    assert capsys.readouterr().err == ("structc: error: cannot write the predictions to standard output: "
                                       "No space left on device\n")
