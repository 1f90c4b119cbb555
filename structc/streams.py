"""Treebank and table files read a chunk at a time, so that a file larger than memory can train.

    structc train model.snet --data big.txt --stream      (automatic above STREAM_ABOVE bytes)

One pass over the file first checks every line with the eager readers' own checks (the
same errors, with the file and the line) and keeps, per example, only its label and its
part (training, held-out, validation), plus the byte offset of every chunk of `CHUNK`
examples. The split is the eager readers' (the same seeded, stratified draw on the
labels), so `structc eval` with or without `--stream` sees the same held-out part.
Each epoch then visits the chunks in a random order, parses the chunk's training
examples and shuffles them within the chunk; evaluation reads the held-out ones chunk
by chunk. Data-parallel training (`shares`, `evaluate_share`) makes the same global
batches on every rank, and each rank parses and evaluates only its share. Memory: one
chunk of parsed examples, and about 9 bytes per example (label, part), plus a
treebank's vocabulary. The file must not change while it is read.
"""
from __future__ import annotations

import copy
import itertools
from array import array
from pathlib import Path

import numpy as np

from .datasets import ArrayDataset
from .heldout import Tally
from .readers import (ReadError, _class_target, _fraction, _GrowingVocab, _line_of, _lines, _rows, _split_words,
                      _text_lines, _whole, checked_split, checked_trees, class_counts, number_rows, one_set_split,
                      random_split)
from .treedata import TreeDataset

STREAM_ABOVE = 256 * 2**20       # bytes: a treebank or table file larger than this is streamed
CHUNK = 4096                     # examples parsed, shuffled and evaluated at a time
TRAIN, HELD_OUT, VALIDATION = 0, 1, 2


class Chunks:
    """A file's examples in chunks of `size`: where each chunk starts, and each example's part."""

    def __init__(self, path: Path, starts: list[tuple[int, int]], parts: np.ndarray, size: int, examples):
        self.path, self.starts, self.parts, self.size = path, starts, parts, size
        self._examples = examples          # (byte offset, line number) -> the examples from there on
        self._stamp = _stamp(path)

    def read(self, chunk: int, part: int) -> list:
        """The examples of `chunk` that are in `part`, as `examples` yields them."""
        self._check_unchanged()
        mine = self.mine(chunk)
        items = itertools.islice(self._examples(*self.starts[chunk]), len(mine))
        return [item for item, p in zip(items, mine) if p == part]

    def raw_lines(self, chunk: int) -> list[bytes]:
        """The lines of `chunk` as bytes, read in one go (blank and other lines included)."""
        self._check_unchanged()
        end = self.starts[chunk + 1][0] if chunk + 1 < len(self.starts) else self._stamp[0]
        with open(self.path, "rb") as f:
            f.seek(self.starts[chunk][0])
            return f.read(end - self.starts[chunk][0]).split(b"\n")

    def mine(self, chunk: int) -> np.ndarray:
        """The parts of `chunk`'s examples."""
        return self.parts[chunk * self.size:(chunk + 1) * self.size]

    def _check_unchanged(self) -> None:
        if _stamp(self.path) != self._stamp:
            raise ReadError(self.path, "the file changed while it was streamed; it must stay as it was when "
                                       "first read")

    def counts(self, part: int) -> np.ndarray:
        """How many examples of `part` each chunk holds."""
        return np.add.reduceat((self.parts == part).astype(np.int64), np.arange(0, len(self.parts), self.size))

    def with_validation(self, labels: np.ndarray, fraction: float, seed: int) -> "Chunks":
        """A copy with `fraction` of the training examples (of each class) moved to VALIDATION."""
        from .train import _parts
        training = np.flatnonzero(self.parts == TRAIN)
        _, val = _parts(labels[training], fraction, seed, "examples")
        moved = copy.copy(self)
        moved.parts = self.parts.copy()
        moved.parts[training[val]] = VALIDATION
        return moved


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class _Streamed:
    """What both streams share: the part evaluated, the batch count, the validation split."""

    chunks: Chunks
    labels: np.ndarray
    evaluated = HELD_OUT

    def __len__(self) -> int:
        return int(np.sum(self.chunks.parts == TRAIN))

    def held_out_count(self) -> int:
        """The examples `evaluate` measures (the held-out part, or a validation part's)."""
        return int(np.sum(self.chunks.parts == self.evaluated))

    def batch_count(self, batch: int) -> int:
        return int(np.sum(-(-self.chunks.counts(TRAIN) // batch)))

    def _training_chunks(self, rng: np.random.Generator):
        for chunk in rng.permutation(len(self.chunks.starts)):
            items = self.chunks.read(int(chunk), TRAIN)
            if items:
                yield items, rng.permutation(len(items))

    def evaluate(self, net, batch: int = 512) -> dict:
        return self.evaluate_share(net, 0, 1, batch).metrics()

    def evaluate_share(self, net, rank: int, size: int, batch: int = 512):
        """The `structc.heldout.Tally` of share `rank` of `size` of the evaluated part:
        each chunk's examples cut into `size` contiguous shares, each chunk's tally
        added (each loss term's sums and denominators), so that the shares' tallies
        add up to the whole part's, as one call on it gives it."""
        tally = Tally(net, self._probe.output)       # the bound model's class output
        for chunk in range(len(self.chunks.starts)):
            items = self._evaluated_items(chunk)
            share = np.array_split(np.arange(len(items)), size)[rank]
            if len(share):
                picked = items[share] if isinstance(items, np.ndarray) else [items[k] for k in share]
                tally.add(self._measure(net, picked, batch))
        return tally

    def batches(self, batch: int, rng: np.random.Generator):
        return self.shares(batch, rng, 0, 1)

    def validation_split(self, fraction: float, seed: int = 0):
        """(training part, validation part), as `structc.train.validation_split` draws them eagerly."""
        chunks = self.chunks.with_validation(self.labels, fraction, seed)
        train, check = copy.copy(self), copy.copy(self)
        train.chunks = check.chunks = chunks
        check.evaluated = VALIDATION
        return train, check


# -- treebanks -------------------------------------------------------------------------

class StreamedTrees(_Streamed, TreeDataset):
    """A treebank read a chunk at a time (a TreeDataset to the rest of structc)."""

    def __init__(self, path: Path, chunks: Chunks, roots: np.ndarray, vocab, probe_lines: list[str]):
        from .forest import Vocab
        self.name, self.vocab, self.description = path.stem, Vocab(vocab), ""
        self.chunks, self.labels = chunks, roots
        self.train, self.test = [], []                # nothing is held in memory
        self._probe = TreeDataset(self.name, probe_lines, [], self.vocab)   # the widest tree, the top labels

    def bind(self, net) -> "StreamedTrees":
        self._probe.bind(net)
        for a in ("forest", "root_target", "node_target", "output"):
            setattr(self, a, getattr(self._probe, a))
        return self

    def _forests(self, lines) -> list:
        return [f for _, _, f in checked_trees(self.chunks.path, self.vocab, lines)]

    def shares(self, batch: int, rng: np.random.Generator, rank: int, size: int):
        """The feed of share `rank` of each of an epoch's global batches ({}: none), split
        among `size` ranks by size (a tree's opening brackets: one per labelled node), largest first;
        one rank (`batches`): the batches themselves. Each share is parsed by its rank only."""
        from .distributed import balance_batches
        from .forest import Forest
        for lines, order in self._training_chunks(rng):
            texts = [lines[k][1] for k in order]
            owner = (balance_batches([t.count("(") for t in texts], batch, size) if size > 1
                     else np.zeros(len(texts), np.int64))
            for start in range(0, len(texts), batch):      # checked when first read: one parse per batch
                mine = [t for t, r in zip(texts[start:start + batch], owner[start:start + batch]) if r == rank]
                yield self.feed(Forest.from_brackets(mine, self.vocab)) if mine else {}

    def _evaluated_items(self, chunk: int) -> list:
        return self.chunks.read(chunk, self.evaluated)

    def _measure(self, net, lines, batch: int):
        self._probe.test = self._forests(lines)
        try:
            return self._probe.held_out_tally(net, batch)
        finally:
            self._probe.test, self._probe._held_out = [], None     # no chunk kept past its evaluation


def stream_treebank(path: str | Path, split: float | None = None, chunk: int = CHUNK,
                    vocab: dict | None = None) -> StreamedTrees:
    """`readers.read_treebank`, a chunk at a time (see the module docstring); `vocab`: the
    vocabulary to read with (`readers.trained_vocab`; default: a new one)."""
    path, where = Path(path), [0]
    vocab, starts, roots = _GrowingVocab() if vocab is None else vocab, [], array("q")
    widest = top = top_root = (-1, "")
    for k, (number, text, forest) in enumerate(checked_trees(path, vocab, _text_lines(path, _lines(path, where=where)))):
        if k % chunk == 0:
            starts.append((where[0], number))
        roots.append(int(forest.root_labels[0]))
        widest = max(widest, (forest.arity, text), key=lambda t: t[0])
        top = max(top, (int(forest.labels.max()), text), key=lambda t: t[0])
        top_root = max(top_root, (roots[-1], text), key=lambda t: t[0])
    if not roots:
        raise ReadError(path, "no trees in the file")
    roots, split = np.frombuffer(roots, np.int64), _fraction(split)
    parts = _parts(path, roots, split, "trees")

    def lines_from(offset: int, line: int):
        return _text_lines(path, _lines(path, offset, line))
    data = StreamedTrees(path, Chunks(path, starts, parts, chunk, lines_from), roots, vocab,
                         list(dict.fromkeys([widest[1], top[1], top_root[1]])))
    data.description = (f"{path}: {len(roots)} trees, streamed {chunk} at a time ("
                        f"{_split_words(len(roots) - int(parts.sum()), int(parts.sum()), 'trees', split)}), "
                        f"{len(vocab)} words, {class_counts(roots)} at the roots")
    return data


def _parts(path: Path, strata: np.ndarray, split: float, what: str) -> np.ndarray:
    """Each example's part, HELD_OUT as the eager readers draw it (`checked_split`)."""
    return _held_out(checked_split(path, strata, split, what)[1], len(strata))


def _held_out(test: np.ndarray, examples: int) -> np.ndarray:
    """Each example's part: `test` HELD_OUT, the others TRAIN."""
    parts = np.zeros(examples, np.int8)
    parts[test] = HELD_OUT
    return parts


# -- tables ------------------------------------------------------------------------------

class StreamedTable(_Streamed, ArrayDataset):
    """A text table read a chunk at a time (an ArrayDataset to the rest of structc)."""

    def __init__(self, path: Path, chunks: Chunks, labels: np.ndarray, width: int):
        self.name, self.description, self.input, self.target = path.stem, "", None, None
        self.chunks, self.labels, self.width = chunks, labels, width
        self.x_train = np.zeros((0, width - 1), np.float32)      # the shape only: rows come from the file
        self.y_train = self.x_test = self.y_test = None

    def bind(self, net) -> "StreamedTable":
        if self.refusal is not None and _class_target(net):     # as `readers.OneSet.bind`
            self.refusal()
        # the eager checks, on the examples that decide them: the largest label, a fractional one
        fractional = np.flatnonzero(self.labels != np.round(self.labels))[:1]
        probe = self.labels[np.concatenate([[int(np.argmax(self.labels))], fractional])]
        x = np.zeros((len(probe), self.width - 1), np.float32)
        self._probe = ArrayDataset(self.name, x, probe, x, probe).bind(net)
        self.input, self.target = self._probe.input, self._probe.target
        self._shape, self._dtype = tuple(self.input["shape"][1:]), self._probe.y_train.dtype
        if not self.target.get("classes"):             # as the bound eager labels (`readers.OneSet`): not stratified
            self.labels = self.labels.astype(np.float64)
            if self.per_class:                         # whole numbers are values: split again at random
                self.chunks = copy.copy(self.chunks)
                self.chunks.parts = _held_out(random_split(self.chunks.path, len(self.labels), self.split)[1],
                                              len(self.labels))
                self.per_class = False
            self.description = _table_words(self, ", real-valued targets")
        return self

    def _table(self, chunk: int, part: int) -> np.ndarray:
        """[examples, width] numbers of `chunk`'s examples in `part` (checked when first read):
        the chunk's bytes split by numpy in one go; line by line where that does not apply."""
        rows = [line for line in self.chunks.raw_lines(chunk) if (t := line.strip()) and not t.startswith(b"#")]
        picked = [r for r, p in zip(rows, self.chunks.mine(chunk)) if p == part]
        try:
            values = np.array(b" ".join(picked).replace(b",", b" ").split()).astype(np.float64)
            if values.size == len(picked) * self.width:
                return values.reshape(len(picked), self.width)
        except ValueError:          # a number numpy does not read as Python does ("1_000")
            pass
        return np.array([fields for _, fields in self.chunks.read(chunk, part)], np.float64)

    def _arrays(self, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = table[:, -1].astype(self._dtype).reshape(-1, *self._probe.y_train.shape[1:])   # the target's shape
        return table[:, :-1].astype(np.float32).reshape(-1, *self._shape), labels

    def shares(self, batch: int, rng: np.random.Generator, rank: int, size: int):
        """The feed of share `rank` of each of an epoch's global batches ({}: none), each
        batch's rows cut into `size` contiguous parts; one rank (`batches`): the batches."""
        x_name, y_name = self.input["name"], self.target["name"]
        for chunk in rng.permutation(len(self.chunks.starts)):
            table = self._table(int(chunk), TRAIN)
            if not len(table):
                continue
            x, y = self._arrays(table)
            order = rng.permutation(len(table))
            for start in range(0, len(order), batch):
                idx = np.array_split(order[start:start + batch], size)[rank]
                yield {x_name: x[idx], y_name: y[idx]} if len(idx) else {}

    def _evaluated_items(self, chunk: int) -> np.ndarray:
        return self._table(chunk, self.evaluated)

    def _measure(self, net, rows, batch: int):
        self._probe.x_test, self._probe.y_test = self._arrays(rows)
        return ArrayDataset.held_out_tally(self._probe, net, batch)


def stream_table(path: str | Path, split: float | None = None, chunk: int = CHUNK) -> StreamedTable:
    """`readers.read_table`, a chunk at a time (see the module docstring)."""
    path, where = Path(path), [0]
    starts, labels, width = [], array("d"), 0
    rows = _rows(path, header_allowed=True, lines=_lines(path, where=where))
    for k, (number, row) in enumerate(number_rows(path, rows=rows)):
        if k % chunk == 0:
            starts.append((where[0], number))
        labels.append(row[-1])
        width = len(row)
    if not labels:
        raise ReadError(path, "no data in the file")
    if width < 2:
        raise ReadError(path, "a table needs at least one feature column and the label (last) column")
    labels, split = np.frombuffer(labels, np.float64), _fraction(split)
    _, test, per_class, refusal = one_set_split(path, labels, split, lambda k: _line_of(path, k, header_allowed=True))
    whole = _whole(labels)

    def rows_from(offset: int, line: int):
        return _rows(path, lines=_lines(path, offset, line))
    data = StreamedTable(path, Chunks(path, starts, _held_out(test, len(labels)), chunk, rows_from),
                         labels.astype(np.int64) if whole else labels.copy(), width)
    data.split, data.per_class, data.refusal = split, per_class, refusal
    data.description = _table_words(data, f", {class_counts(data.labels)}" if whole else ", real-valued targets")
    return data


def _table_words(data: StreamedTable, labels: str) -> str:
    n, held, chunks = len(data.labels), int(np.sum(data.chunks.parts == HELD_OUT)), data.chunks
    return (f"{chunks.path}: {n} examples, streamed {chunks.size} at a time ("
            f"{_split_words(n - held, held, 'examples', data.split)}), {data.width - 1} values each{labels}")
