"""Data sets for `structc train`: real data shipped with the package, or `.npz` files.

A data set knows how to feed a compiled model: `bind(net)` matches its
arrays to the model's input and target (reshaping images to the declared
input shape, e.g. 64 pixels to [1, 8, 8]), `batches` yields feed dicts,
`evaluate` reports held-out accuracy and loss. Structured data sets (trees,
graphs) register loaders in `DATASETS` too.
"""
from __future__ import annotations

import gzip
import hashlib
from importlib.resources import files
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .heldout import Tally

DIGITS_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"


def class_output(net, target: dict) -> str | None:
    """The forward output whose argmax is the prediction of a class target: shaped
    [the target's rows, its classes] ("probs", the one a loss implies, first), or None
    (then no accuracy is reported: a metric read from another output would be wrong)."""
    if not target.get("classes"):
        return None
    want = [*target["shape"], target["classes"]]
    found = [o["name"] for o in net.meta["entries"]["forward"]["outputs"] if list(o["shape"]) == want]
    return "probs" if "probs" in found else (found[0] if found else None)


class ArrayDataset:
    """Inputs and integer labels, split into a training and a held-out part."""

    def __init__(self, name: str, x_train, y_train, x_test, y_test, description: str = ""):
        self.name = name
        self.x_train, self.y_train = np.asarray(x_train, np.float32), np.asarray(y_train)
        self.x_test, self.y_test = np.asarray(x_test, np.float32), np.asarray(y_test)
        self.description = description
        self.input = self.target = self.output = None

    def __len__(self) -> int:
        return len(self.x_train)

    def held_out_count(self) -> int:
        """The examples `evaluate` measures (the held-out part)."""
        return len(self.x_test)

    def bind(self, net) -> "ArrayDataset":
        """Match the arrays to the model's single input and single target."""
        specs = net.meta["inputs"]
        inputs = [s for s in specs if s["kind"] == "input"]
        targets = [s for s in specs if s["kind"] == "target"]
        if len(inputs) != 1 or len(targets) != 1:
            raise ValueError(f"data set '{self.name}' feeds one tensor input and one target; model {net.name} "
                             f"declares {describe_model(net)}")
        self.input, self.target = inputs[0], targets[0]
        shape = self.input["shape"]
        per_example = shape[1:]
        if not all(isinstance(d, int) for d in per_example):
            raise ValueError(f"input '{self.input['name']}' must have a static shape after the batch axis")
        want = int(np.prod(per_example, dtype=np.int64))
        have = int(np.prod(self.x_train.shape[1:], dtype=np.int64))
        if want != have:
            raise ValueError(f"data set '{self.name}' has {have} values per example, but input "
                             f"'{self.input['name']}' is {shape}: {want} per example")
        self.x_train = self.x_train.reshape(-1, *per_example)
        self.x_test = self.x_test.reshape(-1, *per_example)
        classes = self.target.get("classes") or 0
        if classes and not all(np.all(np.mod(y, 1) == 0) for y in (self.y_train, self.y_test)):
            raise ValueError(f"data set '{self.name}' has labels that are not whole numbers, but target "
                             f"'{self.target['name']}' declares {classes} classes")
        top = max(self.y_train.max(initial=0), self.y_test.max(initial=0))
        if classes and top >= classes:
            raise ValueError(f"data set '{self.name}' has labels up to {int(top)}, but "
                             f"target '{self.target['name']}' declares {classes} classes")
        if classes and min(self.y_train.min(initial=0), self.y_test.min(initial=0)) < 0:
            raise ValueError(f"data set '{self.name}' has label {int(min(self.y_train.min(), self.y_test.min()))}, "
                             f"but class labels are 0, 1, ... (target '{self.target['name']}')")
        dtype = np.int32 if classes else np.float32
        self.y_train, self.y_test = (self._target_shaped(y.astype(dtype)) for y in (self.y_train, self.y_test))
        self.output = class_output(net, self.target)
        return self

    def _target_shaped(self, y: np.ndarray) -> np.ndarray:
        """`y` in the target's shape per example, as the inputs are (a table's one label
        per example for a target f32[N, 1]); another count per example is refused here,
        not by the first training step."""
        per_example = self.target["shape"][1:]
        if not all(isinstance(d, int) for d in per_example):
            return y
        want, have = int(np.prod(per_example, dtype=np.int64)), int(np.prod(y.shape[1:], dtype=np.int64))
        if want != have:
            shape = ", ".join(map(str, self.target["shape"]))
            raise ValueError(f"data set '{self.name}' has {have} label value(s) per example, but target "
                             f"'{self.target['name']}' is [{shape}]: {want} per example")
        return y.reshape(-1, *per_example)

    def batches(self, batch: int, rng: np.random.Generator) -> Iterator[dict]:
        order = rng.permutation(len(self.x_train))
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            yield {self.input["name"]: self.x_train[idx], self.target["name"]: self.y_train[idx]}

    def batch_count(self, batch: int) -> int:
        return (len(self.x_train) + batch - 1) // batch

    def evaluate(self, net, batch: int = 512) -> dict:
        """Held-out accuracy (for class targets with a class output) and loss, as one
        call on the whole held-out part gives it (`structc.heldout`)."""
        return self.held_out_tally(net, batch).metrics()

    def held_out_tally(self, net, batch: int = 512):
        """The held-out part's `structc.heldout.Tally`, `batch` examples a call."""
        name, tname = self.input["name"], self.target["name"]
        tally = Tally(net, self.output)
        for start in range(0, len(self.x_test), batch):
            xb, yb = self.x_test[start:start + batch], self.y_test[start:start + batch]
            tally.measure({name: xb, tname: yb}, yb)        # one forward call
        return tally


def _split(x, y, test_fraction: float, seed: int = 0):
    """A seeded split that keeps every class's share in both parts."""
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test_idx.extend(idx[: int(round(len(idx) * test_fraction))])
    test = np.zeros(len(y), bool)
    test[test_idx] = True
    return x[~test], y[~test], x[test], y[test]


def load_digits(test_fraction: float = 0.2) -> ArrayDataset:
    """The 8x8 handwritten digits (1,797 images, UCI via scikit-learn; see data/README.md).
    Pixels are scaled to [0, 1]; 20% of each class is held out."""
    raw = files("structc.data").joinpath("digits.csv.gz").read_bytes()
    if hashlib.sha256(raw).hexdigest() != DIGITS_SHA256:
        raise RuntimeError("structc's copy of the digits data is damaged (checksum mismatch); reinstall structc")
    table = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",", dtype=np.float32)
    x, y = table[:, :64] / 16.0, table[:, 64].astype(np.int32)
    parts = _split(x, y, test_fraction)
    return ArrayDataset("digits", *parts,       # the counts as split (stratified: 1,438 / 359 at 20%)
                        description=f"8x8 handwritten digits, {len(parts[0]):,} training / "
                                    f"{len(parts[2]):,} held-out images")


def load_npz(path: str) -> ArrayDataset:
    """An .npz file with x_train, y_train, x_test, y_test."""
    with np.load(path) as data:
        need = ["x_train", "y_train", "x_test", "y_test"]
        missing = [k for k in need if k not in data.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing} (expected {need}, found {data.files})")
        return ArrayDataset(Path(path).stem, *(data[k] for k in need), description=str(path))


def load_logic():
    """Boolean formulas as labelled trees (structc/data/make_logic.py)."""
    from .treedata import load_logic as load
    return load()


def load_sentiment():
    """A sentiment treebank in SST's form, made by a grammar (structc/data/make_sentiment.py)."""
    from .treedata import load_sentiment as load
    return load()


def load_digits_rows():
    """The digits as sequences of 8 rows of 8 pixels (structc/seqdata.py)."""
    from .seqdata import load_digits_rows as load
    return load()


DATASETS: dict[str, Callable[[], object]] = {"digits": load_digits, "logic": load_logic,
                                             "sentiment": load_sentiment, "digits_rows": load_digits_rows}


def load(name: str, split: float | None = None, numbering: dict | None = None, fixed: bool = False):
    """A registered data set by name, or the user's data by path: a file or folder that
    `structc.readers.read` recognises by its form. `split`: the held-out fraction for data
    that comes as one set (None: 0.2); built-in data sets keep their own split.
    `numbering`, `fixed`: a trained model's words and labels, as `readers.read` takes them."""
    from . import readers
    if name in DATASETS:
        if split is not None:
            raise ValueError(f"--split applies to your own data that comes as one set; the built-in data set "
                             f"'{name}' has its own split")
        return DATASETS[name]()
    if Path(name).exists():
        return readers.read(name, split, numbering=numbering, fixed=fixed)
    if Path(name).suffix or "/" in name or "\\" in name:
        raise FileNotFoundError(f"no such data file or folder: {name}")
    raise ValueError(f"unknown data set '{name}' (built in: {', '.join(sorted(DATASETS))}; or a path: a treebank, "
                     f"a TU folder, a node classification folder, a .csv/.npy/.npz table)")


def _graph_data(loader: str) -> Callable[[], object]:
    def load():
        from . import graph_datasets
        return getattr(graph_datasets, loader)()
    return load


DATASETS.update(karate=_graph_data("load_karate"), graph_families=_graph_data("load_graph_families"),
                atlas=_graph_data("load_atlas"))


# -- does a data set fit a model? -----------------------------------------------
# Checked before `bind`, so that a tree model on digits or a dense model on
# `logic` is told what it declares, what the data set holds, and which
# built-in data set would fit, instead of a message about its tensor inputs.

def model_kind(net) -> str:
    """"forest", "graph nodes" (a label per node), "graphs" (a label per graph) or "dense"."""
    if net.meta.get("forests"):
        return "forest"
    if net.meta.get("sequences"):
        return "sequence"
    graphs = net.meta.get("graphs")
    if graphs:
        per_graph = [graphs[0]["sizes"]["graphs"]]
        targets = [s["shape"] for s in net.meta["inputs"] if s["kind"] == "target"]
        return "graphs" if per_graph in targets else "graph nodes"
    return "dense"


#: what each built-in data set holds (and, for dense ones, the values per example),
#: so that a model of another kind is told before the data set is loaded
DATA_KINDS = {"digits": ("dense", 64), "logic": ("forest", None), "sentiment": ("forest", None),
              "karate": ("graph nodes", None),
              "graph_families": ("graphs", None), "atlas": ("graphs", None), "digits_rows": ("sequence", None)}


def data_kind(data) -> str:
    from .graph_datasets import GraphDataset, NodeDataset
    from .seqdata import SequenceDataset
    from .treedata import TreeDataset
    if isinstance(data, TreeDataset):
        return "forest"
    if isinstance(data, SequenceDataset):
        return "sequence"
    if isinstance(data, NodeDataset):
        return "graph nodes"
    if isinstance(data, GraphDataset):
        return "graphs"
    return "dense"


def describe_model(net) -> str:
    """The model's inputs and targets by name and kind, as the source declares them."""
    parts = []
    for f in net.meta.get("forests") or []:
        leaves = f"word(vocab={f['vocab']})" if f.get("vocab") else f"features({f.get('features')})"
        parts.append(f"forest input '{f['name']}' (arity {f['arity']}, leaves {leaves})")
    for q in net.meta.get("sequences") or []:
        item = f"word(vocab={q['vocab']})" if q.get("vocab") else f"f32[{q.get('features')}]"
        parts.append(f"sequence input '{q['name']}' (of {item})")
    for g in net.meta.get("graphs") or []:
        n = g["features"]
        parts.append(f"graph input '{g['name']}' ({n} feature{'' if n == 1 else 's'} per node)")
    for s in net.meta["inputs"]:
        if s["kind"] in ("input", "target"):
            what = f"class[{', '.join(map(str, s['shape']))}] of {s['classes']}" if s["classes"] else \
                f"{s['dtype']}[{', '.join(map(str, s['shape']))}]"
            parts.append(f"{'target' if s['kind'] == 'target' else 'tensor input'} '{s['name']}': {what}")
    return ", ".join(parts) or "no inputs"


HOLDS = {"forest": "labelled trees (for a forest input)",
         "sequence": "labelled sequences (for a sequence input)",
         "graph nodes": "one graph with a class label per node (for a graph input and a node mask)",
         "graphs": "many graphs with one class label each (for a graph input)",
         "dense": "dense examples{values} with a class label each (for a tensor input)"}


SUGGESTIONS = {"forest": "try --data logic (labelled trees)",
               "sequence": "try --data digits_rows (the digits as sequences of 8 rows)",
               "graph nodes": "try --data karate (a label per node)",
               "graphs": "try --data graph_families (a label per graph)",
               "dense": "try --data digits (64 values per example) or an .npz file with x_train, y_train, "
                        "x_test, y_test"}


def suggest_data(net) -> str:
    """A built-in data set whose kind fits the model, in words."""
    return SUGGESTIONS[model_kind(net)]


def check_kind(name: str, kind: str, net, values: int | None = None) -> None:
    """A clear error when a data set of `kind` cannot feed the model: what the model
    declares, what the data set holds, and a built-in data set that would fit."""
    if kind != model_kind(net):
        holds = HOLDS[kind].format(values=f" of {values} values" if values else "")
        raise ValueError(f"data set '{name}' holds {holds}, but model {net.name} declares "
                         f"{describe_model(net)}; {suggest_data(net)}")


def check_fits(data, net) -> None:
    values = int(np.prod(data.x_train.shape[1:], dtype=np.int64)) if isinstance(data, ArrayDataset) else None
    check_kind(data.name, data_kind(data), net, values)


def check_name_fits(name: str, net) -> None:
    """`check_kind` for a built-in data set by name, before loading it."""
    if name in DATA_KINDS:
        kind, values = DATA_KINDS[name]
        check_kind(name, kind, net, values)
