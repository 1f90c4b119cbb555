"""Readers for users' own data: files in the formats the field uses -> data sets for `structc train`.

    treebank file     one bracketed tree per line, a label on every node: `(3 (2 good) (2 movie))`;
                      `#` lines are comments
    TU folder         graph classification: NAME_A.txt, NAME_graph_indicator.txt, NAME_graph_labels.txt,
                      optional NAME_node_labels.txt (one-hot features) / NAME_node_attributes.txt
    node folder       node classification on one graph: edges.txt|.csv, labels.txt|.csv,
                      optional features.csv|.npy, optional train_mask.txt|.csv
    table             .csv / .tsv / .txt numbers, the label in the last column, an optional header (a first
                      line with a field that is not a number; `_rows`), `#` comment lines;
                      .npy (the same as one 2-D array); .npz with x and y (or x_train, y_train, x_test, y_test)

`read(path, split)` picks the reader by the path's form. A file that gives one set
(everything above but an .npz holding both halves, or a node folder with a train mask)
is split by a seeded, stratified draw: `split` of each class held out, seed 0, so that
`structc eval` sees the same held-out part as `structc train` (whole-number labels are
classes until the data set is bound to a model with a real-valued target: then they are
values, split at random). A malformed line raises `ReadError` naming
the file and the line.

Two readers number what they read: a treebank's words get ids in order of first
appearance, a TU set's graph labels (and node labels) are renumbered in sorted order.
A model trained on those numbers means nothing with others, so `structc train` saves
them next to the parameters (`NAME.numbering.json`, `save_numbering`) and `structc eval`
reads other files with them (`read(..., numbering=..., fixed=True)`): a word or label the
training data did not have is refused, not given a number of its own; `Net.load_params`
reads the file too (the words become `net.vocab`).
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

from .datasets import ArrayDataset

DEFAULT_SPLIT = 0.2
SPLIT_SEED = 0


class ReadError(ValueError):
    """A data file that cannot be read, with where: `file:line: message`."""

    def __init__(self, path, message: str, line: int | None = None):
        self.path, self.line = str(path), line
        super().__init__(f"{path}:{line}: {message}" if line is not None else f"{path}: {message}")


# -- the dispatcher ------------------------------------------------------------------

TABLE_SUFFIXES = (".csv", ".tsv", ".txt")


def read(path: str | Path, split: float | None = None, stream: bool | None = None,
         numbering: dict | None = None, fixed: bool = False):
    """The data set in the file or folder `path`, by its form (see the module docstring).
    `split`: the held-out fraction for data that comes as one set (None: 0.2); data that
    comes split (an .npz with both parts, a node folder with a train mask) refuses one.
    `stream`: read a treebank or table file a chunk at a time (`structc.streams`); None:
    when the file is larger than `streams.STREAM_ABOVE`. `numbering`: the words' and
    labels' numbers of a trained model (`load_numbering`), kept; what it lacks gets the
    next numbers, or with `fixed` (evaluation) is refused."""
    p = Path(path)
    if split is not None and not 0.0 < split < 1.0:
        raise ValueError(f"the held-out fraction (--split) must be between 0 and 1, got {split}")
    if stream or stream is None and p.is_file() and p.suffix in TABLE_SUFFIXES + (".trees", ".ptb"):
        from . import streams
        if stream or p.stat().st_size > streams.STREAM_ABOVE:
            if not p.is_file() or p.suffix not in TABLE_SUFFIXES + (".trees", ".ptb"):
                raise ReadError(p, "only treebank and table text files (.txt, .csv, .tsv, .trees, .ptb) are "
                                   "streamed; this data is read whole")
            if _looks_bracketed(p):
                return streams.stream_treebank(p, split, vocab=trained_vocab(numbering, fixed))
            return streams.stream_table(p, split)
    if p.is_dir():
        if _tu_prefix(p) is not None:
            return read_tu(p, split, numbering, fixed)
        if _first_of(p, "edges", (".txt", ".csv")) is not None:
            return read_node_folder(p, split)
        raise ReadError(p, "a folder of data must hold a TU data set (NAME_A.txt, NAME_graph_indicator.txt, "
                           "NAME_graph_labels.txt) or a graph for node classification (edges.txt or edges.csv, "
                           "labels.txt or labels.csv)")
    if not p.is_file():
        raise FileNotFoundError(f"no such data file or folder: {p}")
    if p.suffix == ".npz":
        return read_npz(p, split)
    if p.suffix == ".npy":
        return read_npy(p, split)
    if p.suffix in TABLE_SUFFIXES or p.suffix in (".trees", ".ptb"):
        return read_treebank(p, split, numbering, fixed) if _looks_bracketed(p) else read_table(p, split)
    raise ReadError(p, f"unknown kind of data file '{p.suffix}' (readers: a treebank or table .txt/.csv/.tsv, "
                       f".npy, .npz, or a folder)")


def _looks_bracketed(path: Path) -> bool:
    """Whether the first line that is neither blank nor a `#` comment opens a tree."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:      # -sig: a byte order mark is not text
        for line in f:
            if line.strip() and not line.lstrip().startswith("#"):
                return line.lstrip().startswith("(")
    return False


def _first_of(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    for s in suffixes:
        if (folder / f"{stem}{s}").is_file():
            return folder / f"{stem}{s}"
    return None


# -- numbers from text, with line numbers -------------------------------------------------

_SEP = re.compile(r"[,\s]+")
_EMPTY_FIELD = re.compile(r"^,|,\s*,")       # a field with nothing in it (a trailing comma is allowed)


def _text_lines(path: Path, lines=None):
    """(line number, text) of every line of a treebank that is neither blank nor a `#` comment."""
    for number, line in _lines(path) if lines is None else lines:
        if line.strip() and not line.lstrip().startswith("#"):
            yield number, line.strip()


def _lines(path: Path, start: int = 0, first: int = 1, where: list | None = None):
    """(line number, text) of every line, read as bytes and decoded one line at a time
    so that bytes that are not UTF-8 are reported at their line; a UTF-8 byte order mark
    opening the file (as Excel and Notepad write) is dropped. From byte `start`
    (line number `first`) on; `where[0]` is kept at the byte offset of the line yielded."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ReadError(path, f"cannot read: {e.strerror}") from None
    with f:
        f.seek(start)
        offset = start
        for number, raw in enumerate(f, first):
            if where is not None:
                where[0] = offset
            offset += len(raw)
            try:
                yield number, raw.decode("utf-8-sig" if number == first and start == 0 else "utf-8")
            except UnicodeDecodeError:
                raise ReadError(path, "not UTF-8 text (a binary file?)", number) from None


def _rows(path: Path, *, header_allowed: bool = False, lines=None):
    """(line number, fields) of every non-blank line that is not a `#` comment;
    a first line with a non-numeric field is skipped as a header where allowed. A first
    line of numbers is data, unless it numbers the columns (`_column_numbers`): that is
    refused. An empty field between commas is an error (a missing value: it would shift
    the columns after it). `lines`: the (line number, text) to read (default: `_lines(path)`)."""
    first = True
    for number, line in _lines(path) if lines is None else lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = [t for t in _SEP.split(text) if t]
        if first and header_allowed and not all(_is_number(t) for t in fields):
            first = False
            continue
        if first and header_allowed and _column_numbers(fields):
            raise ReadError(path, f"the first line, {text!r}, numbers the columns: a header (as pandas writes "
                                  f"unnamed columns) or data? A first line of numbers is read as data; delete "
                                  f"the line, or name the columns (a header has a field that is not a number)",
                            number)
        first = False
        if _EMPTY_FIELD.search(text):
            raise ReadError(path, "an empty field (a missing value) cannot be trained on; fill it in or leave the "
                                  "line out", number)
        yield number, fields


def _column_numbers(fields: list[str]) -> bool:
    """Whether `fields`, three or more, are the columns' numbers 0, 1, 2, ... or 1, 2, 3, ...:
    as data, a row unlikely enough that such a first line is taken for a header of numbers."""
    return len(fields) >= 3 and fields in ([str(k) for k in range(len(fields))],
                                           [str(k + 1) for k in range(len(fields))])


def _one_row_more(path: Path, have: int, want: int) -> str:
    """The likely cause of a text file's one row too many: a header read as data (a `.csv`
    file's header of numbers, or a header in a file that takes none)."""
    if have != want + 1 or path.suffix == ".npy":
        return ""
    if path.suffix == ".csv":
        return "; one too many: a first line of numbers is data, so a header must name a column with a word"
    return f"; one too many: is the first line a header? a {path.suffix} file here holds rows of numbers only"


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_numbers(path: Path, *, columns: int | None = None, integer: bool = False,
                 header_allowed: bool = False) -> np.ndarray:
    """A [rows, columns] array from a text table; a ragged or non-numeric line is a
    `ReadError` with its line number. `columns` fixes the width."""
    values = [row for _, row in number_rows(path, columns=columns, integer=integer, header_allowed=header_allowed)]
    if not values:
        raise ReadError(path, "no data in the file")
    return np.array(values, np.int64 if integer else np.float64)


def number_rows(path: Path, *, columns: int | None = None, integer: bool = False, header_allowed: bool = False,
                rows=None):
    """(line number, row of numbers) of a text table, one line at a time (the streams read
    tables with it too); a ragged or non-numeric line is a `ReadError` with its line number.
    `rows`: the (line number, fields) to check (default: `_rows(path)`)."""
    width, width_line = columns, None
    kind = int if integer else float
    for number, fields in _rows(path, header_allowed=header_allowed) if rows is None else rows:
        if width is None:
            width, width_line = len(fields), number
        if len(fields) != width:
            since = f"line {width_line} has {width}" if width_line else f"expected {width}"
            raise ReadError(path, f"{len(fields)} values on this line, {since}", number)
        try:
            row = [kind(t) for t in fields]
        except ValueError:
            bad = next(t for t in fields if not _parses(t, kind))
            raise ReadError(path, f"{bad!r} is not {'an integer' if integer else 'a number'}", number) from None
        if not integer and not all(np.isfinite(row)):
            bad = next(t for t, v in zip(fields, row) if not np.isfinite(v))
            raise ReadError(path, f"{bad!r}: missing or infinite values cannot be trained on", number)
        yield number, row


def _parses(text: str, kind) -> bool:
    try:
        kind(text)
        return True
    except ValueError:
        return False


def _column(path: Path, *, integer: bool = True) -> np.ndarray:
    return read_numbers(path, columns=1, integer=integer, header_allowed=path.suffix == ".csv")[:, 0]


# -- splits and reports ------------------------------------------------------------------

def _fraction(split: float | None) -> float:
    return DEFAULT_SPLIT if split is None else split


def checked_split(path: Path, labels: np.ndarray, split: float, what: str) -> tuple[np.ndarray, np.ndarray]:
    """`split_indices`, refusing a split that leaves either part empty."""
    train, test = split_indices(labels, split)
    if len(train) == 0 or len(test) == 0:
        raise ReadError(path, f"{len(labels)} {what} are too few to hold {round(100 * split)}% of each class out "
                              f"and train on the rest")
    return train, test


def split_indices(labels: np.ndarray, fraction: float, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) indices: `fraction` of each class held out (at least one
    where a class has two or more), drawn with `seed`."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(len(idx) * fraction))
        if k == 0 and len(idx) > 1:
            k = 1
        test.extend(idx[:k])
    test = np.sort(np.array(test, np.int64))
    return np.setdiff1d(np.arange(len(labels)), test), test


def class_counts(labels) -> str:
    """`3 classes (0: 40, 1: 35, 2: 25)`."""
    counts = sorted(Counter(int(v) for v in np.asarray(labels).ravel()).items())
    return f"{len(counts)} classes ({', '.join(f'{c}: {n}' for c, n in counts)})"


def _split_words(train: int, test: int, what: str, split: float | None) -> str:
    how = f", seeded {round(100 * (1 - split))}/{round(100 * split)} split" if split is not None else ""
    return f"{train} training / {test} held-out {what}{how}"


# -- treebanks ---------------------------------------------------------------------------

class _GrowingVocab(dict):
    """A vocabulary that gives every new word the next id, as the trees are read."""

    def __missing__(self, word):
        self[word] = len(self)
        return self[word]


class _TrainedVocab(dict):
    """A trained model's vocabulary, read with for evaluation: a word it lacks is refused
    (its id would be one the model never learned)."""

    def __missing__(self, word):
        raise ValueError(f"word {word!r} is not in the vocabulary the model was trained with ({len(self)} words); "
                         f"the model has no id for it")


def trained_vocab(numbering: dict | None, fixed: bool = False) -> dict:
    """The vocabulary to read a treebank with: a trained model's words keep their ids;
    a new word gets the next id, or with `fixed` is refused. Without one, a new vocabulary."""
    words = (numbering or {}).get("words")
    vocab = (_TrainedVocab if fixed and words is not None else _GrowingVocab)()
    vocab.update((w, i) for i, w in enumerate(words or ()))
    return vocab


def read_treebank(path: str | Path, split: float | None = None, numbering: dict | None = None,
                  fixed: bool = False):
    """One bracketed tree per line, every node labelled (Penn Treebank / SST style):
    `(3 (2 good) (2 movie))`. Words get ids in order of first appearance, after the words
    of `numbering` (a trained model's, `trained_vocab`)."""
    from .forest import Vocab
    from .treedata import TreeDataset
    path = Path(path)
    vocab, forests, roots = trained_vocab(numbering, fixed), [], []
    for _, _, forest in checked_trees(path, vocab):      # parsed once: the data set keeps these
        forests.append(forest)
        roots.append(int(forest.root_labels[0]))
    if not forests:
        raise ReadError(path, "no trees in the file")
    roots, split = np.array(roots), _fraction(split)
    train, test = checked_split(path, roots, split, "trees")
    data = TreeDataset(path.stem, [forests[i] for i in train], [forests[i] for i in test], Vocab(vocab))
    data.description = (f"{path}: {len(forests)} trees ({_split_words(len(train), len(test), 'trees', split)}), "
                        f"{len(vocab)} words, {class_counts(roots)} at the roots")
    return data


def data_numbering(data) -> dict | None:
    """How `data`'s reader numbered it, to be saved with a model trained on it (`read`'s
    `numbering`): a treebank's words in id order, a TU set's labels; None: nothing numbered."""
    vocab = getattr(data, "vocab", None)
    if vocab is not None:
        from .forest import Vocab
        return Vocab(vocab).numbering()
    return getattr(data, "numbering", None)


def checked_trees(path: Path, vocab, lines=None):
    """(line number, text, Forest) of each tree of a treebank, one line at a time (the streams
    read treebanks with it too); a line that is not one fully labelled tree is a `ReadError`.
    `lines`: the (line number, text) to parse (default: every non-blank line of `path`)."""
    from .forest import Forest
    for number, text in _text_lines(path) if lines is None else lines:
        try:
            forest = Forest.from_brackets(text, vocab)
        except ValueError as e:
            raise ReadError(path, str(e).removeprefix("tree 0: "), number) from None
        if forest.trees != 1:
            raise ReadError(path, f"{forest.trees} trees on one line; a treebank has one tree per line", number)
        if forest.labels.min() < 0:
            raise ReadError(path, "a node without a label (or with a negative one); every node needs a class "
                                  "0, 1, ..., as in (3 (2 good) (2 movie))", number)
        yield number, text, forest


# -- TU graph classification ------------------------------------------------------------

def _tu_prefix(folder: Path) -> str | None:
    found = sorted(folder.glob("*_A.txt"))
    return found[0].name[:-len("_A.txt")] if found else None


def read_tu(folder: str | Path, split: float | None = None, numbering: dict | None = None, fixed: bool = False):
    """A TU-format graph classification set (https://chrsmrrs.github.io/datasets/): nodes are
    numbered from 1 across all graphs; NAME_A.txt holds one edge `i, j` per line (as given:
    an undirected graph lists both directions), NAME_graph_indicator.txt each node's graph
    (1..graphs), NAME_graph_labels.txt each graph's label. Node features: NAME_node_labels.txt
    one-hot, then NAME_node_attributes.txt, side by side; neither: a constant 1.
    Graph labels are renumbered 0..C-1 in sorted order (TU sets use -1/1 or 1..C); with
    `numbering` (a trained model's), its classes and node labels keep their numbers and
    new ones follow, or with `fixed` are refused."""
    from .graph_datasets import GraphDataset
    folder = Path(folder)
    name = _tu_prefix(folder)
    files = {part: folder / f"{name}_{part}.txt" for part in
             ("A", "graph_indicator", "graph_labels", "node_labels", "node_attributes")}
    for part in ("graph_indicator", "graph_labels"):
        if not files[part].is_file():
            raise ReadError(folder, f"a TU data set needs {files[part].name} next to {files['A'].name}")
    numbering = numbering or {}
    raw_labels = _column(files["graph_labels"])
    classes = _kinds(files["graph_labels"], raw_labels, numbering.get("classes"), fixed, "graph label")
    order = np.argsort(classes)
    labels = order[np.searchsorted(classes, raw_labels, sorter=order)]
    graph_of = _graph_indicator(files["graph_indicator"], len(raw_labels))
    x, node_kinds = _tu_features(files, len(graph_of), numbering.get("node_labels"), fixed)
    edges = _tu_edges(files["A"], graph_of)
    graphs = _split_graphs(graph_of, edges, x, len(raw_labels), files["graph_indicator"])
    split = _fraction(split)
    train, test = checked_split(folder, labels, split, "graphs")
    renamed = "" if np.array_equal(classes, np.arange(len(classes))) else \
        f"; labels {', '.join(str(int(c)) for c in classes)} read as 0..{len(classes) - 1}"
    data = GraphDataset(name, graphs, labels, train, test)
    data.numbering = {"classes": [int(c) for c in classes]}
    if node_kinds:
        data.numbering["node_labels"] = [[int(k) for k in kinds] for kinds in node_kinds]
    data.description = (f"{folder}: {len(graphs)} graphs ({_split_words(len(train), len(test), 'graphs', split)}), "
                        f"{len(graph_of)} nodes, {len(edges)} edges, {x.shape[1]} features per node, "
                        f"{class_counts(labels)}{renamed}")
    return data


def _graph_indicator(path: Path, graphs: int) -> np.ndarray:
    """Each node's graph, 0-based; every value must name one of the `graphs` labelled graphs."""
    ind = read_numbers(path, columns=1, integer=True)[:, 0]
    bad = np.flatnonzero((ind < 1) | (ind > graphs))
    if len(bad):
        raise ReadError(path, f"graph {int(ind[bad[0]])} is out of range: the graph labels file lists {graphs} "
                              f"graphs, numbered from 1", _line_of(path, int(bad[0])))
    return ind - 1


def _line_of(path: Path, row: int, header_allowed: bool | None = None) -> int:
    """The line number of the `row`-th data row (0-based) of a text table (read again:
    only when reporting an error)."""
    header_allowed = path.suffix == ".csv" if header_allowed is None else header_allowed
    for k, (number, _) in enumerate(_rows(path, header_allowed=header_allowed)):
        if k == row:
            return number
    return -1


def _tu_edges(path: Path, graph_of: np.ndarray) -> np.ndarray:
    """[edges, 2] 0-based node pairs, each in range and inside one graph."""
    edges = read_numbers(path, columns=2, integer=True) - 1
    n = len(graph_of)
    bad = np.flatnonzero((edges < 0).any(axis=1) | (edges >= n).any(axis=1))
    if len(bad):
        raise ReadError(path, f"edge ({', '.join(str(int(v) + 1) for v in edges[bad[0]])}) names a node outside "
                              f"1..{n} (the graph indicator lists {n} nodes)", _line_of(path, int(bad[0])))
    across = np.flatnonzero(graph_of[edges[:, 0]] != graph_of[edges[:, 1]])
    if len(across):
        u, v = (int(t) for t in edges[across[0]])
        raise ReadError(path, f"edge ({u + 1}, {v + 1}) joins graph {graph_of[u] + 1} to graph {graph_of[v] + 1}",
                        _line_of(path, int(across[0])))
    return edges


def _kinds(path: Path, values: np.ndarray, trained: list | None, fixed: bool, what: str) -> np.ndarray:
    """The distinct `values` in the order they are numbered: sorted; after a trained model's
    (`trained`, kept in its order), new ones follow sorted, or with `fixed` are refused."""
    found = np.unique(values)
    if trained is None:
        return found
    trained = np.asarray(trained, values.dtype)
    new = found[~np.isin(found, trained)]
    if fixed and len(new):
        k = int(np.argmax(values == new[0]))
        raise ReadError(path, f"{what} {int(new[0])} was not in the data the model was trained on (it knows "
                              f"{', '.join(str(int(v)) for v in trained)})", _line_of(path, k, header_allowed=False))
    return np.concatenate([trained, new])


def _tu_features(files: dict, nodes: int, trained: list | None = None,
                 fixed: bool = False) -> tuple[np.ndarray, list]:
    """The node features and, per node-label column, its labels in one-hot order."""
    parts, kinds_of = [], []
    if files["node_labels"].is_file():
        path = files["node_labels"]
        table = read_numbers(path, integer=True)
        _check_rows(path, len(table), nodes)
        if trained is not None and len(trained) != table.shape[1]:
            raise ReadError(path, f"{table.shape[1]} node-label columns, but the data the model was trained on "
                                  f"had {len(trained)}")
        for k, lab in enumerate(table.T):        # each column one-hot, side by side
            kinds = _kinds(path, lab, None if trained is None else trained[k], fixed, "node label")
            order = np.argsort(kinds)
            parts.append(np.eye(len(kinds), dtype=np.float32)[order[np.searchsorted(kinds, lab, sorter=order)]])
            kinds_of.append(kinds)
    if files["node_attributes"].is_file():
        att = read_numbers(files["node_attributes"])
        _check_rows(files["node_attributes"], len(att), nodes)
        parts.append(att.astype(np.float32))
    return (np.concatenate(parts, axis=1) if parts else np.ones((nodes, 1), np.float32)), kinds_of


def _check_rows(path: Path, have: int, nodes: int) -> None:
    if have != nodes:
        raise ReadError(path, f"{have} rows, but the graph indicator lists {nodes} nodes (one row per node)"
                              + _one_row_more(path, have, nodes))


def _split_graphs(graph_of, edges, x, graphs: int, indicator: Path) -> list:
    """One `structc.Graph` per graph, its nodes renumbered from 0 in file order."""
    from .graphs import Graph
    order = np.argsort(graph_of, kind="stable")
    sizes = np.bincount(graph_of, minlength=graphs)
    if sizes.min() == 0:
        raise ReadError(indicator, f"graph {int(np.argmin(sizes)) + 1} has no nodes")
    start = np.concatenate([[0], np.cumsum(sizes)])
    local = np.empty(len(graph_of), np.int64)
    local[order] = np.arange(len(graph_of)) - start[graph_of[order]]
    edge_graph = graph_of[edges[:, 0]] if len(edges) else np.zeros(0, np.int64)
    by_graph = np.argsort(edge_graph, kind="stable")
    edge_start = np.concatenate([[0], np.cumsum(np.bincount(edge_graph, minlength=graphs))])
    result = []
    for g in range(graphs):
        mine = edges[by_graph[edge_start[g]:edge_start[g + 1]]]
        result.append(Graph(local[mine].T, num_nodes=int(sizes[g]), x=x[order[start[g]:start[g + 1]]]))
    return result


# -- node classification on one graph ------------------------------------------------------

def read_node_folder(folder: str | Path, split: float | None = None):
    """One graph for node classification, nodes numbered from 0:
        edges.txt|.csv        `u v` (or `u,v`) per line; each edge is used in both directions,
                              duplicates and the reverse of an edge already listed are dropped
        labels.txt|.csv       one class per node (-1: unlabelled, in neither part)
        features.csv|.txt|.npy  one row per node (default: one-hot node ids)
        train_mask.txt|.csv   optional, 1 for a training node; the other labelled nodes are held
                              out. Without it, a seeded stratified split of the labelled nodes.
    `.csv` files may start with a header line."""
    from .graph_datasets import NodeDataset
    from .graphs import Graph
    folder = Path(folder)
    labels_file = _first_of(folder, "labels", (".txt", ".csv"))
    if labels_file is None:
        raise ReadError(folder, "a node classification folder needs labels.txt or labels.csv (one class per node)")
    labels = _column(labels_file)
    n = len(labels)
    if labels.min() < -1:
        raise ReadError(labels_file, f"class label {int(labels.min())}: labels are 0, 1, ... or -1 (unlabelled)",
                        _line_of(labels_file, int(np.argmax(labels < -1))))
    edges_file = _first_of(folder, "edges", (".txt", ".csv"))
    edges = _undirected(_node_edges(edges_file, n))
    x = _node_features(folder, n)
    train, test, how = _node_split(folder, labels, split)
    graph = Graph(edges.T, num_nodes=n, x=x)
    data = NodeDataset(folder.name, graph, np.maximum(labels, 0), train, test)
    data.description = (f"{folder}: {n} nodes, {len(edges)} directed edges, {x.shape[1]} features per node, "
                        f"{_split_words(len(train), len(test), 'nodes', how)}, {class_counts(labels[labels >= 0])}"
                        + (f", {int(np.sum(labels < 0))} unlabelled" if np.any(labels < 0) else "")
                        + (", nodes kept in locality order" if data.graph.node_order is not None else ""))
    return data


def _node_edges(path: Path, n: int) -> np.ndarray:
    edges = read_numbers(path, columns=2, integer=True, header_allowed=path.suffix == ".csv")
    bad = np.flatnonzero((edges < 0).any(axis=1) | (edges >= n).any(axis=1))
    if len(bad):
        raise ReadError(path, f"edge ({', '.join(str(int(v)) for v in edges[bad[0]])}) names a node outside "
                              f"0..{n - 1} (the labels file lists {n} nodes)",
                        _line_of(path, int(bad[0])))
    return edges


def _undirected(edges: np.ndarray) -> np.ndarray:
    """Each distinct edge in both directions (a self loop once)."""
    pairs = np.unique(np.sort(edges, axis=1), axis=0)
    loops = pairs[:, 0] == pairs[:, 1]
    return np.concatenate([pairs, pairs[~loops][:, ::-1]])


def _node_features(folder: Path, n: int) -> np.ndarray:
    path = _first_of(folder, "features", (".npy", ".csv", ".txt"))
    if path is None:
        return np.eye(n, dtype=np.float32)
    if path.suffix == ".npy":
        x = _real_numbers(path, "the array", _load_npy(path))
        if x.ndim != 2:
            raise ReadError(path, f"node features must be a 2-D array [nodes, features], got shape {x.shape}")
    else:
        x = read_numbers(path, header_allowed=path.suffix == ".csv")
    if len(x) != n:
        raise ReadError(path, f"{len(x)} rows, but the labels file lists {n} nodes (one row per node)"
                              + _one_row_more(path, len(x), n))
    return x.astype(np.float32)


def _node_split(folder: Path, labels: np.ndarray, split: float | None):
    """(training nodes, held-out nodes, the split fraction or None when a mask gave it)."""
    labelled = np.flatnonzero(labels >= 0)
    if len(labelled) == 0:
        raise ReadError(folder, "no node has a label")
    mask_file = _first_of(folder, "train_mask", (".txt", ".csv"))
    if mask_file is None:
        train, test = checked_split(folder, labels[labelled], _fraction(split), "labelled nodes")
        return labelled[train], labelled[test], _fraction(split)
    if split is not None:
        raise ReadError(mask_file, "the train mask gives the split; --split applies to data that comes as one set")
    mask = _column(mask_file)
    if len(mask) != len(labels):
        raise ReadError(mask_file, f"{len(mask)} rows, but the labels file lists {len(labels)} nodes"
                                   + _one_row_more(mask_file, len(mask), len(labels)))
    if not np.isin(mask, (0, 1)).all():
        k = int(np.argmax(~np.isin(mask, (0, 1))))
        raise ReadError(mask_file, f"{int(mask[k])}: the mask holds 1 (training) or 0", _line_of(mask_file, k))
    unlabelled = np.flatnonzero((mask == 1) & (labels < 0))
    if len(unlabelled):
        raise ReadError(mask_file, f"node {int(unlabelled[0])} is a training node without a label",
                        _line_of(mask_file, int(unlabelled[0])))
    train = np.flatnonzero(mask == 1)
    test = np.flatnonzero((mask == 0) & (labels >= 0))
    if len(train) == 0 or len(test) == 0:
        raise ReadError(mask_file, "the mask leaves no " + ("training" if len(train) == 0 else "held-out") + " node")
    return train, test, None


# -- tables ------------------------------------------------------------------------------

def read_table(path: str | Path, split: float | None = None):
    """A text table of numbers, one example per line, its label in the last column;
    a first line with a non-numeric field is a header."""
    path = Path(path)
    table = read_numbers(path, header_allowed=True)
    if table.shape[1] < 2:
        raise ReadError(path, "a table needs at least one feature column and the label (last) column")
    return _examples(path, table[:, :-1], table[:, -1], split,
                     line_of=lambda k: _line_of(path, k, header_allowed=True))


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ReadError(path, f"cannot read: {e}") from None


def read_npy(path: str | Path, split: float | None = None):
    """A 2-D array, one example per row, its label in the last column."""
    path = Path(path)
    table = _real_numbers(path, "the array", _load_npy(path))
    if table.ndim != 2 or table.shape[1] < 2:
        raise ReadError(path, f"an .npy table is a 2-D array [examples, features + label], got shape {table.shape} "
                              f"(for images, use an .npz with arrays x and y)")
    return _examples(path, table[:, :-1], table[:, -1], split)


NPZ_SPLIT = ["x_train", "y_train", "x_test", "y_test"]


def read_npz(path: str | Path, split: float | None = None):
    """An .npz with x_train, y_train, x_test, y_test (used as they are), or with x and y
    (any example shape, e.g. images [N, 1, 28, 28]; split here)."""
    from .datasets import ArrayDataset
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:
        raise ReadError(path, f"cannot read: {e}") from None
    for k in NPZ_SPLIT + ["x", "y"]:
        if k in arrays:
            _real_numbers(path, k, arrays[k])
    if all(k in arrays for k in NPZ_SPLIT):
        if split is not None:
            raise ReadError(path, "the file holds its own split (x_train ... y_test); --split applies to data "
                                  "that comes as one set (x and y)")
        _same_length(path, arrays, "x_train", "y_train")
        _same_length(path, arrays, "x_test", "y_test")
        data = ArrayDataset(path.stem, *(arrays[k] for k in NPZ_SPLIT))
        data.description = (f"{path}: {len(data.x_train)} training / {len(data.x_test)} held-out examples "
                            f"(as the file splits them), {np.prod(data.x_train.shape[1:], dtype=int)} values each"
                            + _label_words(data.y_train))
        return data
    if "x" in arrays and "y" in arrays:
        _same_length(path, arrays, "x", "y")
        return _examples(path, arrays["x"], arrays["y"], split)
    raise ReadError(path, f"an .npz data file holds x_train, y_train, x_test, y_test (or x and y to be split); "
                          f"found {sorted(arrays)}")


def _real_numbers(path: Path, name: str, array: np.ndarray) -> np.ndarray:
    """`array`, refused unless it holds real numbers, all finite (as a text table's cells must be)."""
    kind = array.dtype.kind
    if kind not in "biuf":
        what = {"U": "strings", "S": "strings", "c": "complex numbers", "M": "dates", "m": "time spans"}.get(
            kind, "values")
        raise ReadError(path, f"{name} holds {what} ({array.dtype}), not numbers; class labels are 0, 1, ... "
                              f"and features and targets real numbers")
    if kind == "f" and not np.isfinite(array).all():
        at = np.unravel_index(int(np.argmax(~np.isfinite(array))), array.shape)
        raise ReadError(path, f"{name}[{', '.join(str(int(i)) for i in at)}] is {array[at]}: missing or infinite "
                              f"values cannot be trained on")
    return array


def _same_length(path: Path, arrays: dict, x: str, y: str) -> None:
    if arrays[x].ndim == 0 or len(arrays[x]) != len(arrays[y]):
        raise ReadError(path, f"{x} has {len(np.atleast_1d(arrays[x]))} examples, {y} has "
                              f"{len(np.atleast_1d(arrays[y]))}")


def _label_words(y: np.ndarray) -> str:
    return f", {class_counts(y)}" if _integral(y) else ", real-valued targets"


def _integral(y: np.ndarray) -> bool:
    """Whole numbers that int64 holds exactly (1e20 is no class id)."""
    return np.issubdtype(y.dtype, np.integer) or bool(np.all(np.isfinite(y)) and np.all(y == np.round(y))
                                                      and np.all(np.abs(y) <= 2.0 ** 53))


def _whole(y: np.ndarray) -> bool:
    """Labels that may be classes: whole numbers, none negative."""
    return _integral(y) and not (y.size and y.min() < 0)


def one_set_split(path: Path, y: np.ndarray, split: float, line_of=None):
    """(training, held-out, per class, refusal) for labels `y` that came as one set, before a
    model says what they are: whole numbers, none negative, one per example, are split per
    class; anything else at random (`random_split`; also whole numbers bound to a real-valued
    target: values, not classes). `refusal`: None, or a function raising the `ReadError`
    for a class target these labels cannot be bound to (a negative label, at `line_of(example)`;
    classes too small to hold any out)."""
    refusal = None
    if _integral(y) and not _whole(y):
        k = int(np.argmax(y.ravel() < 0))
        value, where = int(y.ravel()[k]), "" if line_of else f" (example {k})"

        def refusal():
            raise ReadError(path, f"class label {value}{where} is negative; class labels are 0, 1, ...",
                            line_of(k) if line_of else None)
    elif _whole(y) and y.ndim == 1:
        train, test = split_indices(y.astype(np.int64), split)
        if len(train) and len(test):
            return train, test, True, None
        refusal = lambda: checked_split(path, y.astype(np.int64), split, "examples")     # raises
    return *random_split(path, len(y), split), False, refusal


def random_split(path: Path, examples: int, split: float) -> tuple[np.ndarray, np.ndarray]:
    return checked_split(path, np.zeros(examples, np.int64), split, "examples")


class OneSet(ArrayDataset):
    """Examples that came as one set, split by `one_set_split`. Bound to a model, the labels
    are what its target says: whole numbers bound to a real-valued target are values and
    are split again at random; a class target meets the split's refusal."""

    def __init__(self, path: Path, x, y, split: float, line_of=None):
        train, test, self.per_class, self.refusal = one_set_split(path, y, split, line_of)
        self.path, self.split, self.whole = path, split, _whole(y)
        y = y.astype(np.int64) if self.whole else y
        super().__init__(path.stem, x[train], y[train], x[test], y[test])
        self.order = np.concatenate([train, test])       # the file's example of each training, then held-out row
        self.description = self._words(x.shape[1:], _label_words(y) if self.whole else ", real-valued targets")

    def _words(self, shape, labels: str) -> str:
        n, train = len(self.order), len(self.x_train)
        return (f"{self.path}: {n} examples ({_split_words(train, n - train, 'examples', self.split)}), "
                f"{np.prod(shape, dtype=int)} values each{labels}")

    def bind(self, net) -> "OneSet":
        if self.refusal is not None and _class_target(net):
            self.refusal()
        super().bind(net)
        if not self.target.get("classes") and self.whole:
            if self.per_class:
                self._split_again()
            self.whole = False
            self.description = self._words(self.x_train.shape[1:], ", real-valued targets")
        return self

    def _split_again(self) -> None:
        """The file's examples split at random, taken from the rows they are in now (the
        arrays as read are not kept: that would hold the table twice)."""
        row = np.argsort(self.order)            # the file's example i is row[i] of training, then held-out
        train, test = random_split(self.path, len(row), self.split)
        x, y = np.concatenate([self.x_train, self.x_test]), np.concatenate([self.y_train, self.y_test])
        self.x_train, self.y_train = x[row[train]], y[row[train]]
        self.x_test, self.y_test = x[row[test]], y[row[test]]
        self.order, self.per_class = np.concatenate([train, test]), False


def _class_target(net) -> bool:
    """Whether `net`'s one target is a class target (checked first: the refusal says where)."""
    targets = [s for s in net.meta["inputs"] if s["kind"] == "target"]
    return len(targets) == 1 and bool(targets[0].get("classes"))


def _examples(path: Path, x: np.ndarray, y: np.ndarray, split: float, line_of=None) -> OneSet:
    """A data set from one set of examples (`OneSet`). `line_of(k)`: the line of example k."""
    y = np.asarray(y).reshape(len(y), -1)
    return OneSet(path, x, y[:, 0] if y.shape[1] == 1 else y, _fraction(split), line_of)
