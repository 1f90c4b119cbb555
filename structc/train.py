"""The training loop behind `structc train`: epochs of native train steps,
a progress bar on a terminal (one line per epoch otherwise), held-out
metrics per epoch, and the training state a run needs to be resumed."""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm


@dataclass
class TrainConfig:
    epochs: int = 20
    batch: int = 32
    lr: float = 0.1
    optimizer: str = "sgd"
    seed: int = 0
    progress: bool = True        # bars when stderr is a terminal; never in a log file
    first_epoch: int = 1         # > 1 when a run is resumed
    freeze: list = field(default_factory=list)   # --freeze as given (the compiled Net applies it)
    clip_norm: float = 0.0       # > 0: gradients clipped by global norm inside the step
    schedule: dict | None = None  # set_schedule's arguments (kind, warmup, decay_steps, gamma, floor)


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)
    rng_state: dict | None = None     # the shuffling generator after the last epoch

    @property
    def final(self) -> dict:
        return self.epochs[-1] if self.epochs else {}


def show_bars(cfg: TrainConfig, stream=None) -> bool:
    """Bars only on a terminal: in a file or a CI log a bar is a line stuck at `0/45`."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(cfg.progress and isatty is not None and isatty())


def configure(net, cfg: TrainConfig) -> None:
    """Check `cfg`, then set `net`'s optimizer and schedule from it (one place for
    every training loop, so none of them drops an option)."""
    for name, value in (("epochs", cfg.epochs), ("batch", cfg.batch), ("first_epoch", cfg.first_epoch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not np.isfinite(cfg.lr) or cfg.lr <= 0:
        raise ValueError(f"the learning rate must be positive, got {cfg.lr!r}")
    net.set_optimizer(cfg.optimizer, clip_norm=cfg.clip_norm)
    if cfg.schedule is not None:
        net.set_schedule(**cfg.schedule)


def epoch_line(metrics: dict, cfg: TrainConfig, where: str = "") -> str:
    """One epoch's log line: loss, held-out loss and accuracy, time (and `where`)."""
    acc = metrics.get("heldout_accuracy")
    return (f"epoch {metrics['epoch']:3d}/{cfg.epochs}  loss {metrics['train_loss']:.4f}  "
            f"held-out loss {metrics['heldout_loss']:.4f}"
            + (f"  accuracy {100 * acc:.2f}%" if acc is not None else "")
            + f"  ({metrics['seconds']:.1f} s{where})")


def train(net, data, cfg: TrainConfig, log=print, rng: np.random.Generator | None = None,
          on_epoch=None) -> History:
    """Train `net` on `data` (a bound data set) for epochs `cfg.first_epoch`..`cfg.epochs`;
    returns per-epoch metrics. `rng` (shuffling) continues a resumed run's generator;
    `on_epoch(metrics)` is called as each epoch ends (the metrics log)."""
    configure(net, cfg)
    rng = np.random.default_rng(cfg.seed) if rng is None else rng
    history = History()
    bars = show_bars(cfg)
    start = time.perf_counter()
    for epoch in range(cfg.first_epoch, cfg.epochs + 1):
        total, count = 0.0, 0
        bar = tqdm(data.batches(cfg.batch, rng), total=data.batch_count(cfg.batch), leave=False,
                   disable=not bars, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
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
                   "seconds": time.perf_counter() - start, "lr": net.last_lr}
        history.epochs.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics)
        log(epoch_line(metrics, cfg))
    history.rng_state = rng.bit_generator.state
    return history


# -- resuming ------------------------------------------------------------------
# A run saved to `p.npz` (parameters only, loadable by `Net.load_params`) also
# writes `p.train.npz`: the epochs done, the optimizer and its moments, the
# shuffling generator, and a digest of the parameters it belongs to, so that
# resuming continues the same run instead of silently starting a different one.

def state_path(params_path: str | Path) -> Path:
    """`run.npz` -> `run.train.npz`."""
    p = Path(params_path)
    return p.with_name(p.name[:-len(".npz")] + ".train.npz" if p.name.endswith(".npz") else p.name + ".train.npz")


def params_digest(net) -> str:
    h = hashlib.sha256()
    for name in sorted(net.params):
        h.update(name.encode())
        h.update(np.ascontiguousarray(net.params[name], np.float32).tobytes())
    return h.hexdigest()


def optimizer_state_restorable(net) -> bool:
    """Whether this `Net` exposes its optimizer arena (momentum / Adam moments and step)."""
    return isinstance(getattr(net, "_state_arena", None), np.ndarray) and hasattr(net, "_step")


def save_state(net, path: str | Path, epoch: int, cfg: TrainConfig, rng_state: dict, data: str) -> None:
    """Write what `load_state` needs to continue after `epoch`."""
    arrays = {"epoch": np.int64(epoch), "digest": np.array(params_digest(net)),
              "config": np.array(json.dumps({"optimizer": cfg.optimizer, "lr": cfg.lr, "batch": cfg.batch,
                                             "seed": cfg.seed, "data": data, "model": net.name,
                                             "freeze": list(cfg.freeze), "frozen": net.meta.get("frozen", []),
                                             "clip_norm": cfg.clip_norm, "schedule": cfg.schedule,
                                             "rng": rng_state}))}
    if optimizer_state_restorable(net):
        # Net has no public accessor for its optimizer arena yet; read it directly.
        arrays["optimizer_state"] = np.array(net._state_arena)
        arrays["optimizer_step"] = np.int64(net._step)
        arrays["dropout_draws"] = np.int64(getattr(net, "_draws", 0))     # dropout's step counter
        arrays["optimizer_options"] = np.array(json.dumps(getattr(net, "_opt", {})))
    with open(path, "wb") as f:          # an open file: numpy adds no second `.npz`
        np.savez(f, **arrays)


def load_state(path: str | Path) -> dict:
    """The saved training state as a dict (`epoch`, `digest`, `config`, optional optimizer arrays)."""
    try:
        with np.load(path) as data:
            state = {k: data[k] for k in data.files}
        state["epoch"] = int(state["epoch"])
        state["digest"] = str(state["digest"])
        state["config"] = json.loads(str(state["config"]))
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise ValueError(f"cannot read the training state {path}: {e}") from None
    return state


def restore_optimizer(net, state: dict) -> bool:
    """Put the saved optimizer moments and step back; False when they cannot be restored."""
    saved = state.get("optimizer_state")
    if saved is None or not optimizer_state_restorable(net) or saved.shape != net._state_arena.shape:
        return False
    net.set_optimizer(state["config"]["optimizer"], **json.loads(str(state.get("optimizer_options", "{}"))))
    net._state_arena[...] = saved
    net._step = int(state["optimizer_step"])
    if hasattr(net, "_draws"):      # older states: one draw per step, as `structc train` makes
        net._draws = int(state.get("dropout_draws", state["optimizer_step"]))
    return True
