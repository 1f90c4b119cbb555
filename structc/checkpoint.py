"""A `Net`'s training checkpoint (`Net.save_checkpoint`, `Net.load_checkpoint`):
one `.npz` archive holding everything a training run continued from it needs
to be the uninterrupted run, bit for bit.

What it holds: `HEADER` (JSON: the format, the model's name, program digest
and parameter layout, the dropout seed, the lr schedule, the last lr, the
vocabulary `net.vocab` and `net.numbering`: an embedding's rows mean the
words of the ids they were trained on, and a vocabulary built again from
data read in another order would number them otherwise), every
parameter as `param/<name>`, `Net.optimizer_state`'s arrays (the optimizer,
its options, its moments, the step and dropout draw counts) and `dropout_key`
(dropout's two key words, so a seed of fresh entropy carries over too).
Parameters alone (`save_params`) lose the moments and counters: Adam would
restart its bias correction, the schedule its warm-up, dropout its masks.
"""
from __future__ import annotations

import json
import warnings
from numbers import Integral

import numpy as np

from .forest import Vocab
from .model import _checked_param, _params_path, _read_params, _save_archive
from .ops.optim import DROPOUT_KEY0
from .schedules import check_schedule

HEADER = "structc_checkpoint"
FORMAT = 1
PARAM = "param/"            # + a parameter's name (a name has no '/': no key of the archive is both)
KEY = "dropout_key"


class CheckpointWarning(UserWarning):
    """A checkpoint loaded into a model whose definition differs from its own
    (the same parameter names and shapes: they may mean other things now)."""


def save(net, path):
    """`Net.save_checkpoint`."""
    _refuse_untrainable(net)
    with net._lock:             # one moment: no training call between the parameters and the moments
        arrays = {HEADER: np.array(json.dumps(_header(net))),
                  **{PARAM + name: np.array(v) for name, v in net.params.items()},
                  **net.optimizer_state(),
                  KEY: net._hyper_bits[DROPOUT_KEY0:DROPOUT_KEY0 + 2].copy()}
    return _save_archive(path, arrays)


def load(net, path) -> None:
    """`Net.load_checkpoint`: every part checked, then all of it put in place at once."""
    _refuse_untrainable(net)
    path = _params_path(path)
    data = _read_params(path, "checkpoint", "save_checkpoint")
    where = f"{path}: "
    header = _read_header(data, where)
    _check_identity(net, header, where)
    params = net._checked_params({k[len(PARAM):]: v for k, v in data.items() if k.startswith(PARAM)}, where)
    optimizer = net._checked_optimizer_state(data, where)
    key = np.asarray(data.get(KEY))
    if key.shape != (2,) or key.dtype != np.uint32:
        raise ValueError(f"{where}{KEY} must be two uint32 words, got {key!r}")
    try:
        schedule = None if header.get("schedule") is None else check_schedule(**header["schedule"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}the saved schedule is not one set_schedule makes: {e}") from None
    last_lr = header.get("last_lr")
    if last_lr is not None and not isinstance(last_lr, (int, float)):
        raise ValueError(f"{where}the saved last lr must be a number, got {last_lr!r}")
    vocab = _read_vocab(net, header, where)
    numbering = header.get("numbering")
    if numbering is not None and not isinstance(numbering, dict):
        raise ValueError(f"{where}the saved numbering must be a JSON object, got {numbering!r}")
    if header.get("program") != net.meta.get("program"):
        warnings.warn(f"{where}model {net.name}'s definition differs from the one this checkpoint was saved "
                      f"from (its parameters' names and shapes are the same): training continues with the "
                      f"model as it is now", CheckpointWarning, stacklevel=3)
    with net._lock:
        for name, view in net.params.items():
            view[...] = params[name]
        net._restore_optimizer(optimizer)
        net._hyper_bits[DROPOUT_KEY0:DROPOUT_KEY0 + 2] = key
        net.seed, net.schedule, net.last_lr = header.get("seed"), schedule, last_lr
        if vocab is not None:
            if net.vocab is not None and (dict(net.vocab), getattr(net.vocab, "unk", None)) != (dict(vocab), vocab.unk):
                warnings.warn(f"{where}net.vocab replaced by the checkpoint's {len(vocab)} words (its embedding "
                              f"rows were trained on their ids)", CheckpointWarning, stacklevel=3)
            net.vocab, net._numbered_vocab = vocab, None
        if numbering is not None or vocab is not None:
            net.numbering = numbering


def _vocab_header(net) -> dict | None:
    """`net.vocab` as JSON: [word, id] pairs and the unknown-word id (None: ids only)."""
    vocab = net.vocab
    if vocab is None:
        return None
    return {"words": [[w, int(i)] for w, i in vocab.items()], "unk": getattr(vocab, "unk", None)}


def _read_vocab(net, header: dict, where: str):
    """The checkpoint's vocabulary as a `Vocab` checked against this model's, or None."""
    saved = header.get("vocab")
    if saved is None:
        return None
    try:
        pairs, unk = saved["words"], saved["unk"]
        vocab = Vocab({w: i for w, i in pairs})
        if len(vocab) != len(pairs) or not (unk is None or isinstance(unk, int)):
            raise ValueError("a word twice, or an unknown-word id that is not an integer")
        vocab.unk = unk
        net._forests.check_vocab(vocab)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{where}the saved vocabulary is damaged: {e}") from None
    return vocab


def _refuse_untrainable(net) -> None:
    """A model without a loss: its parameters are all there is (a library compiled with
    --inference has a loss: its checkpoint goes on training in a `Net` that can train)."""
    if "training" not in net.meta.get("parts", []) + net.meta["deferred"] and "update" not in net.meta["entries"]:
        raise TypeError(f"model {net.name} declares no loss, so it has no training to checkpoint: "
                        f"save_params and load_params save and load its parameters")


def _layout(net) -> dict:
    """What must be the same for a checkpoint's arrays to mean the same in another `Net`."""
    return {"model": net.name, "params": [[p["name"], list(p["shape"]), p["offset"]] for p in net.meta["params"]],
            "frozen": sorted(net.meta.get("frozen", [])), "state_size": int(net._state_arena.size)}


def _header(net) -> dict:
    seed = int(net.seed) if isinstance(net.seed, Integral) else net.seed
    try:
        json.dumps(seed)
    except (TypeError, ValueError):
        seed = None             # a generator's, say: the key words carry it
    return {"format": FORMAT, **_layout(net), "program": net.meta.get("program"), "seed": seed,
            "schedule": net.schedule, "last_lr": net.last_lr, "vocab": _vocab_header(net),
            "numbering": net.numbering}


def _read_header(data: dict, where: str) -> dict:
    """The checkpoint's header, or what the file is instead."""
    if HEADER not in data:
        if "optimizer_state" in data or "config" in data:
            raise ValueError(f"{where}the training state `structc train` writes beside its parameters, not a "
                             f"checkpoint: resume that run with structc train --resume")
        raise ValueError(f"{where}holds parameters only (save_params writes such files), no optimizer state: "
                         f"load it with load_params, or save a checkpoint with save_checkpoint")
    try:
        header = json.loads(str(data[HEADER]))
        if not isinstance(header, dict):
            raise ValueError(f"not a JSON object: {header!r}")
    except ValueError as e:
        raise ValueError(f"{where}not a checkpoint written by save_checkpoint: its header is damaged ({e})") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{where}a checkpoint of format {header.get('format')!r}; this structc reads format {FORMAT}")
    return header


def _check_identity(net, header: dict, where: str) -> None:
    """Refuse a checkpoint of another model, naming everything that differs."""
    mine, theirs = _layout(net), {k: header.get(k) for k in ("model", "params", "frozen", "state_size")}
    if mine == theirs:
        return
    differ = []
    if theirs["model"] != mine["model"]:
        differ.append(f"it is a checkpoint of model {theirs['model']}, not {mine['model']}")
    saved = {p[0]: p[1] for p in theirs["params"] or ()}
    now = {p[0]: p[1] for p in mine["params"]}
    missing, extra = [n for n in now if n not in saved], [n for n in saved if n not in now]
    if missing or extra:
        differ.append(f"parameters missing {missing or 'none'}, unexpected {extra or 'none'}")
    differ += [f"parameter '{n}' is {saved[n]} there, {now[n]} here" for n in now if n in saved and saved[n] != now[n]]
    if theirs["frozen"] != mine["frozen"]:
        differ.append(f"it froze {theirs['frozen'] or 'none'}, this net freezes {mine['frozen'] or 'none'} "
                      f"(the optimizer's moments are laid out by which parameters train)")
    if not differ and theirs["params"] != mine["params"]:
        differ.append("its parameters are laid out otherwise in the arena")
    if theirs["state_size"] != mine["state_size"]:
        differ.append(f"its optimizer state holds {theirs['state_size']} floats, this net's {mine['state_size']}")
    raise ValueError(f"{where}not a checkpoint of this model {net.name}: {'; '.join(differ)}")
