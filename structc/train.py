"""The training loop behind `structc train`: epochs of native train steps,
a progress bar, held-out metrics per epoch, parameters saved at the end."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm


@dataclass
class TrainConfig:
    epochs: int = 20
    batch: int = 32
    lr: float = 0.1
    optimizer: str = "sgd"
    seed: int = 0
    progress: bool = True


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)

    @property
    def final(self) -> dict:
        return self.epochs[-1] if self.epochs else {}


def train(net, data, cfg: TrainConfig, log=print) -> History:
    """Train `net` on `data` (a bound data set); returns per-epoch metrics."""
    for name, value in (("epochs", cfg.epochs), ("batch", cfg.batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not np.isfinite(cfg.lr) or cfg.lr <= 0:
        raise ValueError(f"the learning rate must be positive, got {cfg.lr!r}")
    net.set_optimizer(cfg.optimizer)
    rng = np.random.default_rng(cfg.seed)
    history = History()
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        total, count = 0.0, 0
        bar = tqdm(data.batches(cfg.batch, rng), total=data.batch_count(cfg.batch), leave=False,
                   disable=not cfg.progress, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
                   file=sys.stderr, dynamic_ncols=True)
        for feed in bar:
            loss = net.train_step(lr=cfg.lr, **feed)
            if not np.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss} in epoch {epoch}; try a smaller learning rate")
            total += loss
            count += 1
            if count % 10 == 0:
                bar.set_postfix(loss=f"{total / count:.4f}")
        bar.close()
        metrics = {"epoch": epoch, "train_loss": total / max(count, 1), **{f"heldout_{k}": v for k, v in
                                                                          data.evaluate(net).items()},
                   "seconds": time.perf_counter() - start}
        history.epochs.append(metrics)
        acc = metrics.get("heldout_accuracy")
        log(f"epoch {epoch:3d}/{cfg.epochs}  loss {metrics['train_loss']:.4f}  "
            f"held-out loss {metrics['heldout_loss']:.4f}"
            + (f"  accuracy {100 * acc:.2f}%" if acc is not None else "")
            + f"  ({metrics['seconds']:.1f} s)")
    return history
