"""The command line: the quick start's training run, dumps, errors."""
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


def test_graph_draws_svg(tmp_path):
    pytest.importorskip("matplotlib")   # in the test extra; skipped only where it is not installed
    out = tmp_path / "g.svg"
    assert main(["graph", str(MLP), "-o", str(out), "--which", "forward"]) == 0
    assert out.read_text().lstrip().startswith("<?xml") and "<svg" in out.read_text()


def test_graph_rejects_unknown_format(tmp_path, capsys):
    assert main(["graph", str(MLP), "-o", str(tmp_path / "g.bmp")]) == 1
    assert "unknown picture format '.bmp'" in capsys.readouterr().err
