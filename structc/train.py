"""The training loop behind `structc train`: epochs of native train steps,
a progress bar on a terminal (one line per epoch otherwise), held-out
metrics per epoch, and the training state a run needs to be resumed.

Validation and early stopping: `TrainConfig(val_split=0.1)` holds a seeded,
stratified tenth of the training examples out of training (`validation_split`)
and reports `val_loss` / `val_accuracy` each epoch; `early_stop=P` stops when
the monitored one (`monitor="val_loss"` or `"val_acc"`) has not improved for P
epochs, and leaves the best epoch's parameters in the model. The data set's
held-out part is never used to choose: its accuracy stays a held-out one."""
from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .files import read_archive, write_atomically
from .heldout import refuse_empty
from .model import BatchTooSmall


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
    val_split: float = 0.0       # > 0: this fraction of the training examples validates instead
    early_stop: int = 0          # > 0: stop after this many epochs without a better `monitor`
    monitor: str = "val_loss"    # val_loss (lower is better) or val_acc (higher is better)


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)
    rng_state: dict | None = None     # the shuffling generator after the last epoch
    best_epoch: int | None = None     # with early stopping: the epoch whose parameters the model keeps
    stop_reason: str = ""             # why training ended before cfg.epochs ("" when it did not)
    stopper: "EarlyStopping | None" = None   # early stopping's state at the end (saved with a checkpoint)
    last_params: dict | None = None   # the last epoch's parameters when the model keeps another's (to resume)

    @property
    def final(self) -> dict:
        """The metrics of the parameters the model ends with: the best epoch's with early stopping
        (an epoch of the run a resumed one continues, when no later epoch was better)."""
        if self.best_epoch is not None:
            found = next((m for m in self.epochs if m["epoch"] == self.best_epoch), None)
            return found if found is not None else dict(self.stopper.best_metrics or {})
        return self.epochs[-1] if self.epochs else {}

    @property
    def last_epoch(self) -> int:
        return self.epochs[-1]["epoch"] if self.epochs else 0


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
    if not 0.0 <= cfg.val_split < 1.0:
        raise ValueError(f"the validation fraction must be at least 0 and below 1, got {cfg.val_split!r}")
    if not isinstance(cfg.early_stop, int) or cfg.early_stop < 0:
        raise ValueError(f"early stopping's patience must be a whole number of epochs, got {cfg.early_stop!r}")
    if cfg.early_stop and not cfg.val_split:
        raise ValueError("early stopping needs a validation split (val_split, --val-split): choosing the epoch "
                         "on the held-out part would leave no held-out measure")
    if cfg.monitor not in MONITORS:
        raise ValueError(f"monitor must be one of {', '.join(MONITORS)}, got {cfg.monitor!r}")
    net.set_optimizer(cfg.optimizer, clip_norm=cfg.clip_norm)
    if cfg.schedule is not None:
        net.set_schedule(**cfg.schedule)


def epoch_line(metrics: dict, cfg: TrainConfig, where: str = "") -> str:
    """One epoch's log line: loss, held-out loss and accuracy, validation, time (and `where`)."""
    acc, val_acc = metrics.get("heldout_accuracy"), metrics.get("val_accuracy")
    return (f"epoch {metrics['epoch']:3d}/{cfg.epochs}  loss {metrics['train_loss']:.4f}  "
            f"held-out loss {metrics['heldout_loss']:.4f}"
            + (f"  accuracy {100 * acc:.2f}%" if acc is not None else "")
            + (f"  val loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else "")
            + (f"  val accuracy {100 * val_acc:.2f}%" if val_acc is not None else "")
            + f"  ({metrics['seconds']:.1f} s{where})")


# -- validation and early stopping ---------------------------------------------------

#: monitor -> (the metric's key, whether higher is better)
MONITORS = {"val_loss": ("val_loss", False), "val_acc": ("val_accuracy", True)}


def validation_split(data, fraction: float, seed: int = 0) -> tuple[object, object]:
    """(training part, validation part) of a bound data set's training examples: `fraction`
    of each class (examples with real-valued targets: of all), drawn with `seed`, disjoint.
    The validation part's `evaluate(net)` measures it; the held-out part is untouched."""
    own = getattr(data, "validation_split", None)
    if own is not None:                     # a data set that knows how to split itself (streams)
        return own(fraction, seed)
    for kind, split in _SPLITTERS:
        if all(hasattr(data, a) for a in kind):
            return split(data, fraction, seed)
    raise TypeError(f"cannot hold a validation part out of a {type(data).__name__}")


def _parts(labels: np.ndarray, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    from .readers import split_indices
    strata = labels if labels.ndim == 1 and labels.dtype.kind in "iu" else np.zeros(len(labels), np.int64)
    keep, val = split_indices(strata, fraction, seed)
    if len(keep) == 0 or len(val) == 0:
        raise ValueError(f"{len(labels)} training {what} are too few to hold {fraction:g} of them out for "
                         f"validation and train on the rest")
    return keep, val


def _split_arrays(data, fraction, seed):
    keep, val = _parts(np.asarray(data.y_train), fraction, seed, "examples")
    train, check = copy.copy(data), copy.copy(data)
    train.x_train, train.y_train = data.x_train[keep], data.y_train[keep]
    check.x_test, check.y_test = data.x_train[val], data.y_train[val]
    return train, check


def _split_trees(data, fraction, seed):
    roots = np.array([int(f.root_labels[0]) for f in data.train], np.int64)
    keep, val = _parts(roots, fraction, seed, "trees")
    train, check = copy.copy(data), copy.copy(data)
    train.train, check.test = [data.train[i] for i in keep], [data.train[i] for i in val]
    return train, check


def _split_sequences(data, fraction, seed):
    keep, val = _parts(data.y_train, fraction, seed, "sequences")
    train, check = copy.copy(data), copy.copy(data)
    train.train, train.y_train = data._subset(data.train, keep), data.y_train[keep]
    check.test, check.y_test = data._subset(data.train, val), data.y_train[val]
    return train, check


def _split_graphs(data, fraction, seed):
    keep, val = _parts(data.labels[data.train], fraction, seed, "graphs")
    train, check = copy.copy(data), copy.copy(data)
    train.train, check.test = data.train[keep], data.train[val]
    return train, check


def _split_nodes(data, fraction, seed):
    nodes = np.flatnonzero(data.train_mask)
    keep, val = _parts(data.labels[nodes], fraction, seed, "nodes")
    train, check = copy.copy(data), copy.copy(data)
    train.train_mask = np.zeros_like(data.train_mask)
    train.train_mask[nodes[keep]] = 1.0
    check.test_mask = np.zeros_like(data.test_mask)
    check.test_mask[nodes[val]] = 1.0
    check.test = nodes[val]
    return train, check


# (attributes that tell the kind of data set, how to split it): ArrayDataset, SequenceDataset,
# TreeDataset, GraphDataset, NodeDataset
_SPLITTERS = [(("x_train", "y_train"), _split_arrays), (("train", "y_train", "_subset"), _split_sequences),
              (("train", "test", "vocab"), _split_trees), (("graphs", "labels", "train"), _split_graphs),
              (("train_mask", "labels"), _split_nodes)]


class EarlyStopping:
    """Watches one validation metric; keeps a copy of the parameters of its best epoch."""

    def __init__(self, patience: int, monitor: str):
        self.patience, self.monitor = patience, monitor
        self.key, self.higher = MONITORS[monitor]
        self.best_epoch, self.best_value, self.best_params = None, None, None
        self.best_metrics: dict | None = None
        self.waited = 0                     # epochs since the best one
        self.stopped = False                # patience ran out

    def should_stop(self, net, metrics: dict) -> bool:
        """Record `metrics`' epoch (a copy of the parameters if it is the best yet); True when
        `patience` epochs have passed without a better value."""
        if self.key not in metrics:
            raise ValueError(f"cannot monitor {self.monitor}: model {net.name} reports no {self.key} "
                             f"(no class output); monitor val_loss")
        value, epoch = metrics[self.key], metrics["epoch"]
        better = self.best_value is None or (value > self.best_value if self.higher else value < self.best_value)
        if better and np.isfinite(value):
            self.best_epoch, self.best_value, self.waited = epoch, value, 0
            self.best_metrics = dict(metrics)
            with net._lock:
                self.best_params = {name: np.array(v) for name, v in net.params.items()}
        else:
            self.waited += 1
        self.stopped = self.waited >= self.patience
        return self.stopped

    def state(self) -> dict:
        """What a checkpoint keeps (JSON; the best parameters are the saved ones)."""
        return {"patience": self.patience, "monitor": self.monitor, "best_epoch": self.best_epoch,
                "best_value": None if self.best_value is None else float(self.best_value),
                "waited": self.waited, "stopped": self.stopped, "best_metrics": self.best_metrics}

    def resume(self, saved: dict, best_params: dict | None) -> None:
        """Continue from a checkpoint's `state()`: the best value, its epoch and parameters,
        and the epochs waited since (a run that had stopped gets a fresh patience)."""
        self.best_epoch, self.best_value = saved["best_epoch"], saved["best_value"]
        self.best_metrics, self.best_params = saved.get("best_metrics"), best_params
        self.waited = 0 if saved.get("stopped") else int(saved["waited"])

    def restore(self, net) -> None:
        """Put the best epoch's parameters back into `net`."""
        if self.best_params is not None:
            with net._lock:
                for name, value in self.best_params.items():
                    net.params[name] = value


def train(net, data, cfg: TrainConfig, log=print, rng: np.random.Generator | None = None,
          on_epoch=None, stopper: EarlyStopping | None = None) -> History:
    """Train `net` on `data` (a bound data set) for epochs `cfg.first_epoch`..`cfg.epochs`;
    returns per-epoch metrics. `rng` (shuffling) continues a resumed run's generator,
    `stopper` its early stopping (`resume_early_stopping`); `on_epoch(metrics)` is called
    as each epoch ends (the metrics log)."""
    configure(net, cfg)
    refuse_empty(data)
    rng = np.random.default_rng(cfg.seed) if rng is None else rng
    history = History()
    data, check = _with_validation(data, cfg, log)
    if stopper is None and cfg.early_stop:
        stopper = EarlyStopping(cfg.early_stop, cfg.monitor)
    bars = show_bars(cfg)
    skipped, last_refusal = 0, None     # batches batch norm could not train on (said once)
    for epoch in range(cfg.first_epoch, cfg.epochs + 1):
        start = time.perf_counter()      # the epoch's own time, as the metrics log's
        total, count = 0.0, 0
        bar = tqdm(data.batches(cfg.batch, rng), total=data.batch_count(cfg.batch), leave=False,
                   disable=not bars, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
                   file=sys.stderr, dynamic_ncols=True)
        for feed in bar:
            try:
                loss = net.train_step(lr=cfg.lr, **feed)
            except BatchTooSmall as e:      # e.g. the last batch when N % batch == 1; nothing was changed
                if not skipped:
                    log(f"epoch {epoch}: skipping a batch that batch normalisation cannot train on ({e}); "
                        "every such batch is skipped (said once)")
                skipped += 1
                last_refusal = e
                continue
            if not np.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss} in epoch {epoch}; try a smaller learning rate")
            total += loss
            count += 1
            if count % 10 == 0:
                bar.set_postfix(loss=f"{total / count:.4f}")
        bar.close()
        if count == 0 and last_refusal is not None:     # nothing trained: not an epoch
            raise last_refusal
        metrics = {"epoch": epoch, "train_loss": total / max(count, 1), **{f"heldout_{k}": v for k, v in
                                                                          data.evaluate(net).items()}}
        if check is not None:
            metrics.update({f"val_{k}": v for k, v in check.evaluate(net).items()})
        metrics.update(seconds=time.perf_counter() - start, lr=net.last_lr)
        history.epochs.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics)
        log(epoch_line(metrics, cfg))
        if stops(net, stopper, metrics, history, cfg):
            break
    return finish(net, history, rng, stopper, cfg, log)


def stops(net, stopper: EarlyStopping | None, metrics: dict, history: History, cfg: TrainConfig) -> bool:
    """Whether early stopping ends training after this epoch's `metrics` (saying why in `history`)."""
    if stopper is None or not stopper.should_stop(net, metrics):
        return False
    history.stop_reason = f"{cfg.monitor} has not improved for {cfg.early_stop} epochs since epoch {stopper.best_epoch}"
    return True


def finish(net, history: History, rng: np.random.Generator, stopper: EarlyStopping | None, cfg: TrainConfig,
           log) -> History:
    """After the last epoch: the generator's state (for a resumed run), and with early
    stopping the last epoch's parameters kept aside and the best epoch's put back."""
    history.rng_state = rng.bit_generator.state
    if stopper is not None:
        history.stopper = stopper
        if stopper.best_epoch is not None and stopper.best_epoch != history.last_epoch:
            with net._lock:      # where training stands, for a resumed run to continue from
                history.last_params = {name: np.array(v) for name, v in net.params.items()}
        _keep_best(net, stopper, history, cfg, log)
    return history


def _with_validation(data, cfg: TrainConfig, log):
    """(what to train on, what to validate on or None), saying how it was split."""
    if not cfg.val_split:
        return data, None
    train_part, check = validation_split(data, cfg.val_split, cfg.seed)
    log(f"validation: {len(data) - len(train_part)} of the {len(data)} training examples ({cfg.val_split:g} "
        f"of each class, seed {cfg.seed}) held out of training; training on {len(train_part)}")
    return train_part, check


def _keep_best(net, stopper: EarlyStopping, history: History, cfg: TrainConfig, log) -> None:
    """Leave the best epoch's parameters in `net` and say when and why training stopped."""
    if stopper.best_epoch is None:
        log(f"early stopping: {cfg.monitor} was never finite; the last epoch's parameters are kept")
        return
    stopper.restore(net)
    history.best_epoch = stopper.best_epoch
    how = (f"stopped after epoch {history.last_epoch}: {history.stop_reason}" if history.stop_reason
           else f"ran all {history.last_epoch} epochs")
    log(f"early stopping: {how}; keeping epoch {stopper.best_epoch}'s parameters "
        f"({cfg.monitor} {stopper.best_value:.4f})")


# -- resuming ------------------------------------------------------------------
# A run saved to `p.npz` (parameters only, loadable by `Net.load_params`) also
# writes `p.train.npz`: the epochs done, the optimizer and its moments, the
# shuffling generator, and a digest of the parameters it belongs to, so that
# resuming continues the same run instead of silently starting a different one.

def state_path(params_path: str | Path) -> Path:
    """`run.npz` -> `run.train.npz`."""
    p = Path(params_path)
    return p.with_name(p.name[:-len(".npz")] + ".train.npz" if p.name.endswith(".npz") else p.name + ".train.npz")


# `p.numbering.json` holds how the reader numbered the training data (a treebank's words,
# a TU set's labels: `readers.data_numbering`), with the digest of the parameters it
# belongs to, so that `structc eval` on another file numbers its words and labels alike,
# and `Net.load_params` gives the net the words as its vocabulary.

class NumberingWarning(UserWarning):
    """A numbering file beside parameters that `Net.load_params` cannot use."""


def numbering_path(params_path: str | Path) -> Path:
    """`run.npz` -> `run.numbering.json`."""
    p = Path(params_path)
    return p.with_name((p.name[:-len(".npz")] if p.name.endswith(".npz") else p.name) + ".numbering.json")


def save_numbering(net, params_path: str | Path, numbering: dict | None) -> None:
    """Write `numbering` next to the parameters just saved from `net`; without one (data
    that numbers nothing), remove what an earlier run left there."""
    path = numbering_path(params_path)
    if numbering is None:
        path.unlink(missing_ok=True)
        return
    text = json.dumps({"digest": params_digest(net), **numbering}, ensure_ascii=False).encode()
    write_atomically(str(path), lambda f: f.write(text))


def load_numbering(params_path: str | Path, params: dict | None = None) -> tuple[dict | None, str]:
    """The numbering saved next to the parameters at `params_path`, or None and why not
    ("" when there is none). `params`: that file's arrays, when already read."""
    from .model import _read_params
    path = numbering_path(params_path)
    if not path.is_file():
        return None, ""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        digest = saved.pop("digest")
        params = _read_params(str(params_path)) if params is None else params
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        return None, f"cannot read {path}: {e}"
    if digest != _digest(params):
        return None, f"{path} belongs to other parameters than {params_path} (written by another run); ignored"
    return saved, ""


def params_digest(net) -> str:
    return _digest(net.params)


def _digest(params) -> str:
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(np.ascontiguousarray(params[name], np.float32).tobytes())
    return h.hexdigest()


def optimizer_state_restorable(net) -> bool:
    """Whether `net` gives its optimizer state (`Net.optimizer_state`: moments, step, draws)."""
    return callable(getattr(net, "optimizer_state", None))


def save_state(net, path: str | Path, epoch: int, cfg: TrainConfig, rng_state: dict, data: str,
               kept_epoch: int | None = None, history: History | None = None,
               metrics_digest: str | None = None) -> None:
    """Write what `load_state` needs to continue after `epoch`; `kept_epoch`: the epoch whose
    parameters were kept instead of the last's (early stopping), whose state (patience, best
    value) and last epoch's parameters come from `history`; `metrics_digest`: the run's
    metrics log's (`MetricsLog.digest`), so that a resumed run keeps only its own lines."""
    arrays = {"epoch": np.int64(epoch), "digest": np.array(params_digest(net)),
              "config": np.array(json.dumps({"optimizer": cfg.optimizer, "lr": cfg.lr, "batch": cfg.batch,
                                             "seed": cfg.seed, "data": data, "model": net.name,
                                             "program": net.meta.get("program"),
                                             "freeze": list(cfg.freeze), "frozen": net.meta.get("frozen", []),
                                             "clip_norm": cfg.clip_norm, "schedule": cfg.schedule,
                                             "val_split": cfg.val_split, "kept_epoch": kept_epoch,
                                             "rng": rng_state, "early_stop": _stopper_state(history),
                                             "metrics_digest": metrics_digest},
                                            default=float))}
    if history is not None and history.last_params is not None:
        arrays.update({f"last_params/{name}": v for name, v in history.last_params.items()})
    if optimizer_state_restorable(net):
        arrays.update(net.optimizer_state())    # the optimizer's name is also the config's (older states: only there)
    # one rename: a crash while writing leaves the last checkpoint's state whole
    write_atomically(str(path), lambda f: np.savez(f, **arrays))


def _stopper_state(history: History | None) -> dict | None:
    return history.stopper.state() if history is not None and history.stopper is not None else None


def resume_early_stopping(net, state: dict, cfg: TrainConfig) -> tuple[EarlyStopping | None, str]:
    """The resumed run's early stopping, and a warning ("" when none): with the saved patience
    count, best value and epoch (the parameters `net` holds, the kept ones, are the best), and
    `net` put back to the last epoch's parameters to train on from there, so the run goes on
    as an uninterrupted one would. A run that had stopped continues from the kept parameters."""
    saved = state["config"].get("early_stop")
    with net._lock:
        best = {name: np.array(v) for name, v in net.params.items()}
    # where training stood, whatever is monitored now: the optimizer state belongs to those parameters
    if _trains_on_from_last(state):
        for name, value in state.items():
            if name.startswith("last_params/"):
                net.params[name[len("last_params/"):]] = value
    if not cfg.early_stop:
        return None, ""
    stopper = EarlyStopping(cfg.early_stop, cfg.monitor)
    if saved is None or saved["monitor"] != cfg.monitor or saved["best_epoch"] is None:
        why = ("it did not stop early" if saved is None else f"it monitored {saved['monitor']}"
               if saved["monitor"] != cfg.monitor else f"its {saved['monitor']} was never finite")
        return stopper, f"early stopping starts afresh: {why}"
    stopper.resume(saved, best)
    warning = ""
    if saved["patience"] != cfg.early_stop:
        warning = f"--early-stop {cfg.early_stop} differs from the resumed run's {saved['patience']}"
    return stopper, warning


def _trains_on_from_last(state: dict) -> bool:
    """Whether a resumed run trains on from its last epoch's parameters, saved beside the
    kept ones by a run whose early stopping had not stopped it."""
    saved = state["config"].get("early_stop")
    return saved is not None and not saved.get("stopped") and any(k.startswith("last_params/") for k in state)


def resumes_from(state: dict) -> int:
    """The epoch whose parameters a resumed run trains on from: its last, or the earlier
    one early stopping kept when the run had stopped (`resume_early_stopping`)."""
    kept = state["config"].get("kept_epoch")
    return state["epoch"] if kept is None or _trains_on_from_last(state) else kept


def load_state(path: str | Path) -> dict:
    """The saved training state as a dict (`epoch`, `digest`, `config`, optional optimizer arrays)."""
    try:
        state = read_archive(path)
        state["epoch"] = int(state["epoch"])
        state["digest"] = str(state["digest"])
        state["config"] = json.loads(str(state["config"]))
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise ValueError(f"cannot read the training state {path}: {e}") from None
    return state


def restore_counters(net, state: dict, optimizer: str) -> bool:
    """When the saved moments cannot be restored (another optimizer, another frozen set):
    `optimizer` from zero moments, with the run's dropout call count and, except for Adam
    (whose bias correction counts from its moments' first step), its step count, so that a
    schedule goes on where it was. Whether the step count was kept."""
    if "optimizer_step" not in state or not optimizer_state_restorable(net):
        return False
    keep_step = optimizer != "adam"
    now = net.optimizer_state()         # its options, as set_optimizer(optimizer) keeps them
    # `optimizer` set now: `configure` would otherwise restart the count
    net.set_optimizer_state(dict(now, optimizer=optimizer, optimizer_state=np.zeros_like(now["optimizer_state"]),
                                 optimizer_step=state["optimizer_step"] if keep_step else 0,
                                 dropout_draws=_draws(state)))
    return keep_step


def restore_optimizer(net, state: dict) -> bool:
    """Put the saved optimizer moments and step back; False when they cannot be restored."""
    saved = state.get("optimizer_state")
    if (saved is None or not optimizer_state_restorable(net)
            or saved.shape != net.optimizer_state()["optimizer_state"].shape):
        return False
    net.set_optimizer_state({"optimizer": state["config"]["optimizer"], "optimizer_state": saved,
                             "optimizer_options": state.get("optimizer_options", "{}"),   # older states: none
                             "optimizer_step": state["optimizer_step"], "dropout_draws": _draws(state)})
    return True


def _draws(state: dict):
    """The saved dropout call count; older states have none: one draw per step, as `structc train` makes."""
    return state.get("dropout_draws", state["optimizer_step"])
