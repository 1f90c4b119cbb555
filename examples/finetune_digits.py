"""Fine-tuning a trained CNN's head on a new task, its convolutions frozen.

    python examples/finetune_digits.py [WORKDIR]

1. `structc train digits_cnn.snet --data digits` trains the CNN on the digits.
2. The new task: the same digits rotated by 90 degrees (rotated.npz), on
   which the trained model is near chance.
3. `structc train ... --init base.npz --freeze conv1,conv2` trains only the
   dense head from the trained weights: no gradient is computed for the
   convolutions, so a step costs less than a full one.
It prints the held-out accuracies and the time of one training step with and
without the convolutions frozen.
"""
from __future__ import annotations

import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MODEL = HERE / "digits_cnn.snet"


def _cli(*words: str) -> float:
    """Run `structc ...`; the held-out accuracy it reports last (a fraction)."""
    from structc.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(list(words))
    if code != 0:
        raise RuntimeError(f"structc {' '.join(words)} failed ({code})")
    return float(out.getvalue().strip().rsplit(" ", 1)[-1].rstrip("%")) / 100


def rotated_digits(path: Path) -> Path:
    from structc.datasets import load_digits
    d = load_digits()

    def rotate(x):
        return np.rot90(x.reshape(-1, 8, 8), 1, axes=(1, 2)).reshape(len(x), 1, 8, 8).copy()
    np.savez(path, x_train=rotate(d.x_train), y_train=d.y_train, x_test=rotate(d.x_test), y_test=d.y_test)
    return path


def step_seconds(freeze=(), batch: int = 32, repeats: int = 200) -> float:
    """The fastest of `repeats` training steps on one batch."""
    import structc
    net = structc.compile(MODEL, freeze=list(freeze))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    for _ in range(20):
        net.train_step(0.01, x=x, y=y)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        net.train_step(0.01, x=x, y=y)
        best = min(best, time.perf_counter() - t)
    return best


def run(workdir: Path, epochs: int = 5) -> dict:
    workdir = Path(workdir)
    base, tuned = workdir / "base.npz", workdir / "tuned.npz"
    data = str(rotated_digits(workdir / "rotated.npz"))
    common = ["--no-progress", "--epochs", str(epochs)]
    result = {"base": _cli("train", str(MODEL), "--data", "digits", "--out", str(base), *common)}
    result["base_on_rotated"] = _cli("eval", str(MODEL), "--data", data, "--params", str(base))
    result["head_only"] = _cli("train", str(MODEL), "--data", data, "--init", str(base),
                               "--freeze", "conv1,conv2", "--out", str(tuned), *common)
    result["step_full"] = step_seconds()
    result["step_frozen"] = step_seconds(["conv1", "conv2"])
    return result


if __name__ == "__main__":
    import tempfile
    where = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="finetune-"))
    r = run(where)
    print(f"trained on the digits:          {100 * r['base']:.2f}% held out")
    print(f"the same model, rotated digits: {100 * r['base_on_rotated']:.2f}%")
    print(f"head fine-tuned, convs frozen:  {100 * r['head_only']:.2f}%")
    print(f"one step (batch 32): {1e6 * r['step_full']:.0f} us, with conv1 and conv2 frozen "
          f"{1e6 * r['step_frozen']:.0f} us ({r['step_full'] / r['step_frozen']:.1f}x faster)")
