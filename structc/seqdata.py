"""Sequences at run time: a batch of sequences of different lengths in, chain-shaped forest arrays out.

A `Sequences` is a batch of sequences (no padding) whose positions carry a
word id or a feature row. It is built from a list of arrays (one per
sequence: `[length]` integers or `[length, F]` floats) or from flat data
plus offsets (`offsets[i]:offsets[i+1]` is sequence i), and validated once,
when it is built: every sequence at least one position long, offsets
increasing from 0 to the data's length, integers that fit int32, finite
features. Anything else raises `ValueError` (or `TypeError` for a value of
the wrong kind) naming the sequence, long before native code runs.

A compiled model runs a sequence as a chain-shaped tree: position t is a
node whose one child is position t-1, the first position a leaf (reversed:
position t's child is t+1, the last position the leaf). In the forest's
schedule order (by height, then by sequence) level t is every sequence's
position t, so `tree_map` runs step t of all sequences at once. For one
direction, `arrays` gives (names relative to the input, e.g. `s.children`):

    children   i32[positions, 1]  the previous position's row (-1 at the first)
    level_end  i32[longest]       end of each step's rows
    roots      i32[sequences]     the row of each sequence's last position
    words      i32[sequences]     the first positions' word ids (or `features` f32[sequences, F])
    node_words i32[positions]     every position's word id (or `node_features` f32[positions, F])
    rows       i32[positions]     the row of each position, in the order given (h(s.steps))
    member_*   the five arrays of the sequence -> rows relation (h(s.mean), `ops.message`)
"""
from __future__ import annotations

from typing import Sequence as SequenceT

import numpy as np

from .heldout import Tally

_I32 = np.int32
_I32_MAX = int(np.iinfo(np.int32).max)


class Sequences:
    """A validated batch of sequences (see the module docstring)."""

    __slots__ = ("offsets", "words", "features", "_cache")

    def __init__(self, *args, **kwargs):
        raise TypeError("build Sequences with Sequences.from_list(arrays) or Sequences.from_flat(data, offsets)")

    def __setattr__(self, name, value):
        raise AttributeError(f"Sequences are immutable (cannot set '{name}'); build new ones")

    def __reduce__(self):
        # pickle and copy rebuild through _make, which seals the arrays again
        return (_rebuild, (np.array(self.offsets), np.array(self.data)))

    # -- properties --------------------------------------------------------
    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def count(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def positions(self) -> int:
        return int(self.offsets[-1])

    @property
    def longest(self) -> int:
        return int(self.lengths.max())

    @property
    def data(self) -> np.ndarray:
        """The positions' payload, flat, sequence after sequence."""
        return self.words if self.words is not None else self.features

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.count <= i < self.count:
            raise IndexError(f"sequence {i} of {self.count}")
        i %= self.count
        return self.data[self.offsets[i]:self.offsets[i + 1]]

    def __repr__(self) -> str:
        kind = f"features f32[{self.features.shape[1]}]" if self.features is not None else "words"
        return f"<Sequences {self.count} sequences, {self.positions} positions (longest {self.longest}), {kind}>"

    # -- construction --------------------------------------------------------
    @classmethod
    def from_flat(cls, data, offsets) -> "Sequences":
        """Flat data (`[positions]` word ids or `[positions, F]` features) and
        `offsets` (`[sequences + 1]`, from 0 to positions, increasing)."""
        off = np.asarray(offsets)
        if off.dtype.kind not in "iu" or off.ndim != 1:
            raise ValueError(f"offsets must be a 1-D integer array, got {off.dtype} with shape {off.shape}")
        if off.shape[0] < 2:
            raise ValueError("offsets must hold at least two entries (a batch needs at least one sequence)")
        if off.dtype.kind == "u" and off.max() > _I32_MAX:
            raise ValueError(f"offsets: {int(off.max())} is out of range (at most {_I32_MAX})")
        off = off.astype(np.int64)
        if off[0] != 0:
            raise ValueError(f"offsets must start at 0, got {int(off[0])}")
        lengths = np.diff(off)
        if (lengths < 1).any():
            i = int(np.flatnonzero(lengths < 1)[0])
            raise ValueError(f"sequence {i} has length {int(lengths[i])} (offsets {int(off[i])} to "
                             f"{int(off[i + 1])}); every sequence needs at least one position")
        arr = _payload(data, "data")
        if off[-1] != arr.shape[0]:
            raise ValueError(f"offsets end at {int(off[-1])}, but the data has {arr.shape[0]} positions")
        return cls._make(off, arr)

    @classmethod
    def from_list(cls, seqs: SequenceT) -> "Sequences":
        """One array per sequence: `[length]` word ids or `[length, F]` features."""
        if isinstance(seqs, np.ndarray) or not isinstance(seqs, (list, tuple)):
            raise TypeError(f"expected a list of arrays (one per sequence), got {type(seqs).__name__}")
        if not seqs:
            raise ValueError("a batch needs at least one sequence")
        parts = []
        for i, s in enumerate(seqs):
            a = _payload(s, f"sequence {i}")
            if a.shape[0] < 1:
                raise ValueError(f"sequence {i} is empty; every sequence needs at least one position")
            if parts and (a.dtype != parts[0].dtype or a.shape[1:] != parts[0].shape[1:]):
                first = "word ids" if parts[0].ndim == 1 else f"[length, {parts[0].shape[1]}] features"
                raise ValueError(f"sequence {i} has {'word ids' if a.ndim == 1 else f'shape {a.shape}'}, "
                                 f"sequence 0 has {first}: every sequence must carry the same kind")
            parts.append(a)
        off = np.zeros(len(parts) + 1, np.int64)
        np.cumsum([p.shape[0] for p in parts], out=off[1:])
        return cls._make(off, np.concatenate(parts))

    @classmethod
    def _make(cls, offsets: np.ndarray, data: np.ndarray) -> "Sequences":
        if offsets[-1] > _I32_MAX:
            raise ValueError(f"a batch of {int(offsets[-1])} positions is too large for 32-bit indices")
        self = object.__new__(cls)
        words = data if data.ndim == 1 else None
        for k, v in (("offsets", offsets), ("words", words), ("features", None if words is not None else data),
                     ("_cache", {})):
            object.__setattr__(self, k, _frozen(v) if isinstance(v, np.ndarray) else v)
        return self

    # -- what a compiled model reads -------------------------------------------
    def check(self, name: str, vocab: int | None, features: int | None) -> None:
        """Does this batch fit an input declared `sequence of word(vocab=V)` or `of f32[F]`?"""
        if vocab is not None:
            if self.words is None:
                raise ValueError(f"input '{name}': the model expects word ids at every position, "
                                 f"the sequences carry feature vectors of {self.features.shape[1]}")
            bad = self.words >= vocab
            if bad.any():
                self._fail_at(name, int(np.flatnonzero(bad)[0]), f"word id {{}} is out of range [0, {vocab})")
        elif self.features is None:
            raise ValueError(f"input '{name}': the model expects feature vectors f32[{features}] at every "
                             "position, the sequences carry word ids")
        elif self.features.shape[1] != features:
            raise ValueError(f"input '{name}': positions carry {self.features.shape[1]} features, the model "
                             f"expects {features}")

    def _fail_at(self, name: str, flat: int, what: str) -> None:
        i = int(np.searchsorted(self.offsets, flat, side="right") - 1)
        raise ValueError(f"input '{name}': sequence {i}, position {flat - int(self.offsets[i])}: "
                         + what.format(int(self.words[flat])))

    def arrays(self, reverse: bool = False, *, member: bool = False, init: bool = False) -> dict[str, np.ndarray]:
        """The chain-shaped forest of these sequences (see the module
        docstring), run from the last position to the first when `reverse`,
        with a start leaf per sequence when `init`; the membership relation
        too when `member`. Cached: the arrays are read-only."""
        key = (reverse, member, init)
        if key not in self._cache:
            self._cache[key] = {k: _frozen(v) for k, v in chain_arrays(self.offsets, self.data, reverse,
                                                                        member, init).items()}
        return self._cache[key]


def _rebuild(offsets: np.ndarray, data: np.ndarray) -> Sequences:
    return Sequences._make(offsets, data)


def chain_arrays(offsets: np.ndarray, data: np.ndarray, reverse: bool, member: bool,
                 init: bool = False) -> dict[str, np.ndarray]:
    """Vectorised: schedule order is by step (position, or position from the
    end when `reverse`), then by sequence. With `init`, each sequence starts
    with a leaf of its own (the state before its first step), so every
    position is a node: [positions + sequences] rows, one level more."""
    from .ops.message import relation_arrays
    lengths = np.diff(offsets)
    count, n = lengths.shape[0], int(offsets[-1])
    seq = np.repeat(np.arange(count), lengths)            # each flat position's sequence
    t = np.arange(n) - offsets[seq]                       # its position in that sequence
    if reverse:
        t = lengths[seq] - 1 - t
    if init:                                              # the start leaves come after the positions
        seq = np.concatenate([seq, np.arange(count)])
        t = np.concatenate([t + 1, np.zeros(count, np.int64)])
    total = t.shape[0]
    order = np.lexsort((seq, t))                          # schedule row -> flat node
    row = np.empty(total, np.int64)
    row[order] = np.arange(total)                         # flat node -> schedule row
    prev = np.arange(n) + (1 if reverse else -1)          # the chain's child of a position
    if init:
        first = offsets[1:] - 1 if reverse else offsets[:-1]
        prev[first] = n + np.arange(count)                # a first step's child: its sequence's start
    kids = np.full(total, -1, np.int64)
    inner = t > 0
    kids[inner] = row[prev[inner[:n]]]                 # inner nodes are positions, the first n
    children = kids[order]
    last = offsets[:-1] if reverse else offsets[1:] - 1   # the position a recursion ends at
    out = {"children": children[:, None], "level_end": np.cumsum(np.bincount(t)), "roots": row[last],
           "rows": row[:n]}
    if not init:                                          # the first steps' payload, read by `first:`
        out["words" if data.ndim == 1 else "features"] = data[order[:count]]
    every = np.zeros((total,) + data.shape[1:], data.dtype)      # every node's payload (start leaves: 0)
    every[row[:n]] = data
    out["node_words" if data.ndim == 1 else "node_features"] = every
    out = {k: v.astype(_I32) if v.dtype.kind in "iu" else v for k, v in out.items()}
    if member:
        rel = relation_arrays(count, total, seq[:n], row[:n])     # sequence -> its positions' rows
        out.update({f"member_{k}": v for k, v in zip(("ptr", "idx", "ptr_t", "idx_t", "eid_t"), rel)})
    return out


def as_sequences(value, name: str) -> Sequences:
    """Sequences from what a user may pass: `Sequences` or a list of arrays."""
    if isinstance(value, Sequences):
        return value
    if isinstance(value, (list, tuple)) and not isinstance(value, str):
        return Sequences.from_list(list(value))
    from .forest import Forest
    if isinstance(value, Forest):
        raise TypeError(f"input '{name}' is a sequence input, got a Forest (trees); pass Sequences or a "
                        "list of arrays, one per sequence")
    raise TypeError(f"input '{name}' is a sequence input: pass structc.Sequences or a list of arrays "
                    f"(one per sequence), got {type(value).__name__}")


def _payload(value, what: str) -> np.ndarray:
    """Word ids ([length] integers, int64 for the checks) or features ([length, F], float32, finite)."""
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{what}: expected an array of word ids or feature rows, got {type(value).__name__}")
    a = np.asarray(value)
    if a.ndim == 1 and a.size == 0:     # `[]` is float64 to numpy: an empty sequence, for the caller to refuse
        return a.astype(np.int64)
    if a.dtype.kind in "iu" and a.ndim == 1:
        if a.size and (a.min() < 0 or a.max() > _I32_MAX):
            k = int(np.flatnonzero((a < 0) | (a > _I32_MAX))[0])
            raise ValueError(f"{what}: word id {int(a[k])} at position {k} is out of range [0, {_I32_MAX}]")
        return a.astype(np.int64)
    if a.dtype.kind in "fiu" and a.ndim == 2:
        if a.shape[1] < 1:
            raise ValueError(f"{what}: feature rows must have at least one feature, got shape {a.shape}")
        f = a.astype(np.float32)
        if not np.isfinite(f).all():
            k = int(np.argwhere(~np.isfinite(f))[0][0])
            raise ValueError(f"{what}: the features at position {k} are not finite")
        return f
    raise ValueError(f"{what}: expected [length] integer word ids or [length, F] real features, "
                     f"got {a.dtype} with shape {a.shape}")


def _frozen(a: np.ndarray) -> np.ndarray:
    """A read-only copy user code cannot make writeable again (see forest._frozen)."""
    a = np.ascontiguousarray(a)
    return np.frombuffer(a.tobytes(), a.dtype).reshape(a.shape)


#: the chains a model may read: (reverse, init, the arrays' names after the input's); see `sequence.CHAINS`
CHAINS = {"fwd": (False, False, ""), "rev": (True, False, ".rev"), "fwd_init": (False, True, ".init"),
          "rev_init": (True, True, ".rev.init")}


class SequenceBinder:
    """Expands sequence inputs in a call's keyword arguments (a `Net` binder):
    each becomes the arrays its recursions read, and its sizes are bound."""

    def __init__(self, specs: list[dict]):
        self.specs = specs

    @classmethod
    def from_meta(cls, meta: dict) -> "SequenceBinder | None":
        specs = meta.get("sequences") or []
        return cls(specs) if specs else None

    def expand(self, given, dims: dict) -> dict:
        out = dict(given)
        for spec in self.specs:
            name = spec["name"]
            if name not in out:
                raise TypeError(f"missing input '{name}': expected sequences (structc.Sequences or a list of "
                                "arrays, one per sequence)")
            seqs = as_sequences(out.pop(name), name)
            seqs.check(name, spec.get("vocab"), spec.get("features"))
            for chain, wanted in spec["arrays"].items():
                if wanted:
                    reverse, init, suffix = CHAINS[chain]
                    arrays = seqs.arrays(reverse, member=any(w.startswith("member_") for w in wanted), init=init)
                    out.update({f"{name}{suffix}.{w}": arrays[w] for w in wanted})
            n, count, longest = seqs.positions, seqs.count, seqs.longest
            dims.update({f"{name}.sequences": count, f"{name}.positions": n, f"{name}.longest": longest,
                         f"{name}.sequences+1": count + 1, f"{name}.positions+1": n + 1,
                         f"{name}.positions+sequences": n + count, f"{name}.positions+sequences+1": n + count + 1,
                         f"{name}.longest+1": longest + 1})
        return out


class SequenceDataset:
    """Labelled sequences for `structc train`: a model with one sequence input
    and a target `class[s.sequences] of C`; held-out accuracy from the
    forward output of shape [s.sequences, C]."""

    def __init__(self, name: str, train: Sequences, y_train, test: Sequences, y_test, description: str = ""):
        self.name, self.description = name, description
        self.train, self.test = train, test
        self.y_train, self.y_test = np.asarray(y_train, np.int32), np.asarray(y_test, np.int32)
        self.input = self.target = self.output = None

    def __len__(self) -> int:
        return self.train.count

    def held_out_count(self) -> int:
        """The examples `evaluate` measures (the held-out part)."""
        return self.test.count

    def bind(self, net) -> "SequenceDataset":
        seqs = net.meta.get("sequences") or []
        if len(seqs) != 1:
            raise ValueError(f"data set '{self.name}' holds sequences: model {net.name} must declare one "
                             "sequence input")
        spec = seqs[0]
        self.input = spec["name"]
        self.train.check(self.input, spec.get("vocab"), spec.get("features"))
        targets = [s for s in net.meta["inputs"] if s["kind"] == "target"]
        if len(targets) != 1 or targets[0]["shape"] != [f"{self.input}.sequences"]:
            raise ValueError(f"data set '{self.name}' labels each sequence: declare one target "
                             f"`target y: class[{self.input}.sequences] of C`")
        self.target = targets[0]
        top = int(max(self.y_train.max(), self.y_test.max()))
        if self.target["classes"] <= top:
            raise ValueError(f"data set '{self.name}' has labels up to {top}, but target "
                             f"'{self.target['name']}' declares {self.target['classes']} classes")
        from .datasets import class_output
        self.output = class_output(net, self.target)
        return self

    def _subset(self, seqs: Sequences, idx: np.ndarray) -> Sequences:
        """The sequences `idx` of `seqs`, as one batch (vectorised)."""
        off = seqs.offsets
        lengths = off[idx + 1] - off[idx]
        starts = np.repeat(off[idx] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        flat = starts + np.arange(int(lengths.sum()))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        return Sequences._make(offsets, seqs.data[flat])

    def batches(self, batch: int, rng: np.random.Generator):
        order = rng.permutation(self.train.count)
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            yield {self.input: self._subset(self.train, idx), self.target["name"]: self.y_train[idx]}

    def batch_count(self, batch: int) -> int:
        return (self.train.count + batch - 1) // batch

    def evaluate(self, net, batch: int = 512) -> dict:
        """Held-out accuracy and loss, as one call on every held-out sequence gives it
        (`structc.heldout`)."""
        return self.held_out_tally(net, batch).metrics()

    def held_out_tally(self, net, batch: int = 512):
        """The held-out part's `structc.heldout.Tally`, `batch` examples a call."""
        tally, n = Tally(net, self.output), self.test.count
        for start in range(0, n, batch):
            idx = np.arange(start, min(n, start + batch))
            y = self.y_test[idx]
            tally.measure({self.input: self._subset(self.test, idx), self.target["name"]: y}, y)   # one call
        return tally


def load_digits_rows() -> SequenceDataset:
    """The shipped 8x8 digits, each a sequence of its 8 rows of 8 pixels (the same split as `digits`)."""
    from .datasets import load_digits
    d = load_digits()
    rows = lambda x: Sequences.from_flat(x.reshape(-1, 8), np.arange(0, 8 * len(x) + 1, 8))  # noqa: E731
    return SequenceDataset("digits_rows", rows(d.x_train), d.y_train, rows(d.x_test), d.y_test,
                           description="8x8 handwritten digits as sequences of 8 rows of 8 pixels, "
                                       f"{len(d.x_train):,} training / {len(d.x_test):,} held-out")
