"""Training runs you can watch and compare: a per-epoch metrics log, and curves drawn from it.

`structc train --out run.npz` writes `run.metrics.jsonl` next to the checkpoint (without
`--out`, next to `<model>.npz`), one JSON object per epoch, written and flushed as the
epoch ends, so `tail -f` or `structc plot` shows a run in progress:

    {"epoch": 3, "loss": 0.41, "heldout_loss": 0.45, "heldout_accuracy": 0.87,
     "seconds": 0.8, "elapsed": 2.5, "lr": 0.1}

`loss` is the mean training loss over the epoch's steps; `heldout_accuracy` is absent for
models without class outputs; with `--val-split`, `val_loss` and `val_accuracy` measure the
validation part; `seconds` is the epoch's wall time (with its evaluation),
`elapsed` the run's so far; a value that is not a finite number (a diverging run's NaN)
is `null`, so that every line is JSON to any reader. A resumed run keeps the lines of the
epochs it continues from (every readable one, when they are the ones its checkpoint saw;
a warning names the epochs it lacks). One that trains on from an earlier epoch's
parameters than its last (early stopping kept them) marks its first record
`"continues_from": KEPT`; `stretches` and the plot join the curve there. A run that fails
before saving puts back the log of the checkpoint it would have replaced (`put_back`);
`foreign_log` tells a log that is not its checkpoint's (one killed outright left it).

`structc train --tensorboard DIR` also writes each record as TensorBoard scalars (tags
in `TENSORBOARD_TAGS`, the epoch as the step) with tensorboardX (an optional extra:
`pip install 'structc[tensorboard]'`; no TensorFlow needed): `tensorboard --logdir DIR`.
A resumed run marks its first epoch so that TensorBoard hides the steps from there on of
earlier event files in DIR (`purge_step`): the curves are the JSONL log's.

`plot(runs, out)` draws loss (training solid, held-out dashed, validation dotted) and
held-out (and validation) accuracy against the epoch, one colour per run, with matplotlib (an optional extra:
`pip install 'structc[plot]'`).
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

METRICS_SUFFIX = ".metrics.jsonl"


def metrics_path(params_path: str | Path) -> Path:
    """`run.npz` -> `run.metrics.jsonl` (beside the checkpoint)."""
    p = Path(params_path)
    stem = p.name[:-len(".npz")] if p.name.endswith(".npz") else p.name
    return p.with_name(stem + METRICS_SUFFIX)


def read_metrics(path: str | Path) -> list[dict]:
    """The epoch records of a metrics file, in order; a line that is not a JSON object
    with an epoch is an error naming the file and line, except a last line with no end,
    unreadable: one being written (a run in progress) or cut short (a run killed)."""
    records, bad, _ = parse_log(Path(path).read_text(encoding="utf-8"))
    if bad:
        number, why = bad[0]
        raise ValueError(f"{path}:{number}: {why}")
    return [r for _, r in records]


def parse_log(text: str) -> tuple[list[tuple[int, dict]], list[tuple[int, str]], int | None]:
    """The one reading of a metrics log: (line number, record) of each epoch record, (line
    number, what is wrong) of each other line but a last one with no end that is not JSON,
    and that line's number (None: none): it is being written, or was cut short."""
    records, bad, torn = [], [], None
    lines = text.splitlines(keepends=True)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and not line.endswith("\n"):
                torn = number
            else:
                bad.append((number, f"not a JSON line ({e.msg})"))
            continue
        why = _not_a_record(record)
        if why:
            bad.append((number, why))
        else:
            records.append((number, record))
    return records, bad, torn


def _not_a_record(record) -> str:
    """What keeps a JSON value from being an epoch record ("" when nothing)."""
    if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
        return "not an epoch record (no integer 'epoch')"
    start = record.get("continues_from")
    if start is not None and not (isinstance(start, int) and 0 <= start < record["epoch"]):
        return f"'continues_from' is {start!r}: the epoch it continues from comes before epoch {record['epoch']}"
    return ""


class MetricsLog:
    """Appends one record per epoch to a JSONL file; `callback` goes to `train(on_epoch=...)`."""

    def __init__(self, path: str | Path, lr: float, keep: list[dict] = (), continues_from: int | None = None):
        self.path, self.lr = Path(path), lr
        self._lines = [_json_line(r) for r in keep]
        try:
            self._before = self.path.read_bytes()      # the log of the run this one replaces (`put_back`)
        except OSError:
            self._before = None
        self.path.write_text("".join(self._lines))
        self._start = self._last = time.perf_counter()
        self._elapsed_before = keep[-1].get("elapsed", 0.0) if keep else 0.0
        self._continues_from = continues_from
        self.failed = False

    def callback(self, metrics: dict) -> dict:
        """Append the epoch's record (and return it, for `TensorBoardLog.write`). The first
        after a restart from an earlier epoch's parameters says which (`continues_from`)."""
        now = time.perf_counter()
        record = {"epoch": metrics["epoch"]}
        if self._continues_from is not None:
            record["continues_from"], self._continues_from = self._continues_from, None
        record["loss"] = metrics["train_loss"]
        record.update({k: v for k, v in metrics.items() if k.startswith(("heldout_", "val_"))})
        # the epoch's time as the training loop measured it (the epoch line's), else since the last record
        record.update(seconds=round(metrics.get("seconds", now - self._last), 4),
                      elapsed=round(self._elapsed_before + now - self._start, 4),
                      lr=self.lr if metrics.get("lr") is None else metrics["lr"])      # the lr the epoch's last step used (a schedule's)
        self._last = now
        if self.failed:
            return record
        try:
            line = _json_line(record)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
            self._lines.append(line)
        except OSError as e:          # the run matters more than its log: say so once, keep training
            self.failed = True
            print(f"structc: warning: cannot write the metrics log {self.path} ({e.strerror or e}); "
                  f"training goes on without it", file=sys.stderr)
        return record

    def put_back(self) -> Path | None:
        """A run that failed before saving: the log beside the checkpoint is again that of
        the run that saved it (none if it had none); this run's lines move to
        NAME.failed.metrics.jsonl, whose path is returned (None: no line was written)."""
        failed = self.path.with_name(self.path.name.removesuffix(METRICS_SUFFIX) + ".failed" + METRICS_SUFFIX)
        written = self.path.read_bytes() if self.path.is_file() else b""
        if written:
            failed.write_bytes(written)
        if self._before is None:
            self.path.unlink(missing_ok=True)
        else:
            self.path.write_bytes(self._before)
        return failed if written else None

    def digest(self) -> str | None:
        """A digest of the lines written so far (None when some could not be): a checkpoint
        keeps it, so that resuming knows the log beside it is still its run's."""
        return None if self.failed else _lines_digest(self._lines)


def _lines_digest(lines) -> str:
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def foreign_log(path: Path) -> str:
    """Why the log at `path` is not that of the checkpoint beside it, nor continues it
    ("" when it is, or when no training state beside it tells): a later run of the same
    name, in progress or killed before it saved, rewrote it."""
    from .train import load_state, state_path
    stem = path.name.removesuffix(METRICS_SUFFIX)
    saved = state_path(path.with_name(stem + ".npz"))
    try:
        digest = load_state(saved)["config"].get("metrics_digest") if saved.is_file() else None
        records = parse_log(path.read_text(encoding="utf-8"))[0]
    except (OSError, ValueError):
        return ""
    if digest is None:
        return ""
    h = hashlib.sha256()
    for line in ["", *(_json_line(r) for _, r in records)]:   # the checkpoint's lines, then a run resumed from it
        h.update(line.encode())
        if h.hexdigest() == digest:
            return ""
    return (f"{path} is not the log of the checkpoint {stem}.npz beside it: a later run of the same name, "
            f"in progress or stopped before it saved, wrote it")


#: a record's field -> the TensorBoard tag it is written under
TENSORBOARD_TAGS = {"loss": "loss/train", "heldout_loss": "loss/heldout", "val_loss": "loss/validation",
                    "heldout_accuracy": "accuracy/heldout", "val_accuracy": "accuracy/validation",
                    "lr": "learning_rate", "elapsed": "time/elapsed_seconds", "seconds": "time/epoch_seconds"}


class TensorBoardLog:
    """`structc train --tensorboard DIR`: each epoch's record as TensorBoard scalars
    (step = the epoch), through tensorboardX (no TensorFlow)."""

    def __init__(self, folder: str | Path, first_epoch: int = 1):
        self.folder = Path(folder)
        # A resumed run's first epoch purges later steps of earlier event files (a run that went
        # on past the checkpoint and died), as the JSONL log drops them. Event files are named
        # by the second: a nanosecond suffix keeps a second writer from truncating the first's.
        self._writer = self.writer_class()(logdir=str(self.folder), filename_suffix=f".{time.time_ns()}",
                                           purge_step=first_epoch if first_epoch > 1 else None)

    @staticmethod
    def writer_class():
        """tensorboardX's SummaryWriter, or a clear error naming the extra."""
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise RuntimeError("--tensorboard needs tensorboardX: pip install 'structc[tensorboard]' "
                               "(or pip install tensorboardX)") from None
        return SummaryWriter

    def write(self, record: dict) -> None:
        for key, tag in TENSORBOARD_TAGS.items():
            if record.get(key) is not None:
                self._writer.add_scalar(tag, float(record[key]), global_step=int(record["epoch"]))
        self._writer.flush()             # as the epoch ends, as the JSONL log: a run in progress shows

    def close(self) -> None:
        self._writer.close()


def _json_line(record: dict) -> str:
    """One record as a line of strict JSON: Python's json would write NaN and Infinity,
    which JSON has not (JSON.parse, Go, serde refuse the line); those are null."""
    return json.dumps({k: _plain(v) for k, v in record.items()}, allow_nan=False) + "\n"


def _plain(value):
    """numpy scalars as Python numbers, so that json can write them; not finite: None."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


def start_log(params_path: Path, lr: float, resumed_from: Path | None = None, first_epoch: int = 1,
              warn=None, digest: str | None = None, continues_from: int | None = None) -> MetricsLog:
    """A fresh log beside `params_path`; a resumed run first copies the epochs before
    `first_epoch` from the log of the checkpoint it resumes (when they are the lines whose
    `digest` its checkpoint kept). `warn(message)` hears what of those epochs the new log
    lacks (a missing file, an unreadable line, a gap, another run's lines). `continues_from`:
    the earlier epoch whose parameters the resumed run trains on from (early stopping kept
    them), marked in its first record."""
    keep, problem = [], ""
    if resumed_from is not None:
        keep, problem = earlier_records(metrics_path(resumed_from), first_epoch, digest)
    if problem and warn is not None:
        warn(problem)
    return MetricsLog(metrics_path(params_path), lr, keep, continues_from)


def earlier_records(path: Path, first_epoch: int, digest: str | None = None) -> tuple[list[dict], str]:
    """The records of epochs 1..first_epoch-1 in the log at `path`, one per epoch in order,
    and what is wrong with them ("" when nothing). Every readable line counts: a run killed
    while writing leaves half a line, and the epochs before it still belong in the log. With
    the `digest` the checkpoint kept of its log, other lines (a later run of the same name
    that did not finish rewrote the log) are left out: they are not this run's epochs."""
    if first_epoch <= 1:
        return [], ""
    try:
        records, bad, torn = parse_log(path.read_text(encoding="utf-8"))
    except OSError as e:
        return [], (f"the resumed run's metrics log {path} cannot be read ({e.strerror or e}): the new log "
                    f"starts at epoch {first_epoch}")
    unreadable = sorted([n for n, _ in bad] + ([torn] if torn else []))
    by_epoch = {}
    for _, record in records:
        if record["epoch"] < first_epoch:
            by_epoch[record["epoch"]] = record         # a later line of the same epoch: the run that went on
    kept = [by_epoch[e] for e in sorted(by_epoch)]
    if digest is not None and _lines_digest(map(_json_line, kept)) != digest:
        return [], (f"{path} is not the log of the run saved at epoch {first_epoch - 1} (a run of the same "
                    f"name started since, and did not finish): its lines are left out, the new log starts at "
                    f"epoch {first_epoch}")
    missing = [e for e in range(1, first_epoch) if e not in by_epoch]
    problems = ([f"line{'s' * (len(unreadable) > 1)} {', '.join(map(str, unreadable))} of {path} "
                 f"{'are' if len(unreadable) > 1 else 'is'} not an epoch record and "
                 f"{'were' if len(unreadable) > 1 else 'was'} left out"] if unreadable else [])
    if missing:
        problems.append(f"the resumed run's metrics log {path} has no record of epoch{'s' * (len(missing) > 1)} "
                        f"{_ranges(missing)}")
    return kept, "; ".join(problems)


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"."""
    spans, start = [], numbers[0]
    for prev, cur in zip(numbers, numbers[1:] + [None]):
        if cur != prev + 1:
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(spans)


# -- curves --------------------------------------------------------------------------

def run_file(run: str) -> Path:
    """A run given as its metrics file, its checkpoint (`run.npz`) or its name (`run`)."""
    p = Path(run)
    if p.name.endswith(METRICS_SUFFIX) or p.suffix == ".jsonl":
        candidates = [p]
    else:
        candidates = [metrics_path(p), metrics_path(p.with_name(p.name + ".npz"))]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"no metrics for run {run}: looked for {candidates[0]} (structc train writes "
                            f"NAME{METRICS_SUFFIX} next to NAME.npz)")


def run_label(path: Path) -> str:
    return path.name[:-len(METRICS_SUFFIX)] if path.name.endswith(METRICS_SUFFIX) else path.stem


def plot(runs: list[str], out: str | Path, size: tuple[float, float] = (10.0, 4.0), dpi: int = 100) -> Path:
    """Loss and accuracy curves of `runs` side by side in one picture of `size` inches at `dpi`."""
    files = [run_file(r) for r in runs]
    runs_read = {}
    for f in files:
        records = read_metrics(f)
        if not records:
            raise ValueError(f"{f}: no epochs recorded yet")
        runs_read[_unique(run_label(f), runs_read)] = records
    fig = figure(runs_read, size, dpi)
    fig.savefig(out, dpi=dpi)
    return Path(out)


def figure(runs: dict[str, list[dict]], size: tuple[float, float] = (10.0, 4.0), dpi: int = 100):
    """A matplotlib Figure: loss (left) and held-out accuracy (right) of each run by name."""
    fig = _figure_class()(figsize=size, dpi=dpi)
    left, right = fig.subplots(1, 2)
    for k, (label, records) in enumerate(runs.items()):
        _draw_run(left, right, label, records, f"C{k % 10}")
    validated = any("val_loss" in r for records in runs.values() for r in records)
    _finish_axes(left, "loss", "training (solid), held-out (dashed)" + (", validation (dotted)" if validated else ""))
    _finish_axes(right, "held-out accuracy", "held-out (solid), validation (dotted)" if validated else "")
    fig.tight_layout()
    return fig


def _unique(label: str, taken) -> str:
    """`run`, or `run (2)` when two runs in different folders share a name."""
    k, name = 1, label
    while name in taken:
        k += 1
        name = f"{label} ({k})"
    return name


def stretches(records: list[dict]) -> list[list[dict]]:
    """A log's records as the stretches training ran through: a record that `continues_from`
    an earlier epoch (a resumed run that had stopped early trains on from the parameters it
    kept, not from its last epoch's) starts a new stretch at that epoch's record, so that a
    curve joins the kept epoch to the next one trained, and the epochs dropped end a branch."""
    runs, by_epoch = [[]], {}
    for r in records:
        start = r.get("continues_from")
        if start is not None and runs[-1]:
            runs.append([by_epoch[start]] if start in by_epoch else [])
        runs[-1].append(r)
        by_epoch[r["epoch"]] = r
    return [run for run in runs if run]


def _draw_run(left, right, label: str, records: list[dict], colour: str) -> None:
    marker = "o" if sum(r.get("heldout_accuracy") is not None for r in records) < 20 else None
    for k, recs in enumerate(stretches(records)):
        named = label if k == 0 else None      # one legend entry a run
        left.plot([r["epoch"] for r in recs], [r["loss"] for r in recs], color=colour, label=named)
        held = [(r["epoch"], r["heldout_loss"]) for r in recs if r.get("heldout_loss") is not None]
        if held:
            left.plot(*zip(*held), color=colour, linestyle="--")
        acc = [(r["epoch"], r["heldout_accuracy"]) for r in recs if r.get("heldout_accuracy") is not None]
        if acc:
            right.plot(*zip(*acc), color=colour, label=named, marker=marker)
        for axes, key in ((left, "val_loss"), (right, "val_accuracy")):      # --val-split runs
            val = [(r["epoch"], r[key]) for r in recs if r.get(key) is not None]
            if val:
                axes.plot(*zip(*val), color=colour, linestyle=":")


def _finish_axes(ax, ylabel: str, title: str) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))     # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize="small")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _figure_class():
    """matplotlib's Figure (drawn to a file without pyplot, so no backend is switched
    under a user's feet), or a clear error naming the extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("structc plot needs matplotlib: pip install 'structc[plot]' "
                           "(or pip install matplotlib)") from None
    return Figure
