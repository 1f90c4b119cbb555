"""Streamed treebank and table files (structc/streams.py): the eager readers' split, checks
and results, read a chunk at a time with memory that does not grow with the file."""
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import structc
from structc import readers, streams
from structc.cli import main
from structc.readers import ReadError
from structc.train import validation_split

DATA = Path(__file__).parent / "data"

MODELS = """
model Tree {
  input  t: forest(arity=2) of word(vocab=10)
  target y: class[t.trees] of 5
  param  E: embedding(10, 8) = normal(0.3)
  rec h(n) = leaf: E[n.word]
             node: tanh(dense(concat(h(n.children)), 8))
  logits = dense(h(t.root), 5)
  output probs = softmax(logits)
  loss cross_entropy(logits, y)
}
model Table {
  input x: f32[N, 4]  target y: class[N] of 2
  logits = dense(x, 2)
  output probs = softmax(logits)
  loss cross_entropy(logits, y)
}
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "models.snet"
    path.write_text(MODELS)
    return path


def streamed(path: Path, chunk: int):
    return (streams.stream_treebank if readers._looks_bracketed(path) else streams.stream_table)(path, chunk=chunk)


def epoch_examples(data, kind: str) -> list:
    """The training examples one epoch yields, as comparable items."""
    rng = np.random.default_rng(0)
    if kind == "Table":
        return sorted(row.tobytes() for b in data.batches(8, rng) for row in b[data.input["name"]])
    return sorted(int(v) for b in data.batches(8, rng) for v in b[data.root_target["name"]])


@pytest.mark.parametrize("model, file", [pytest.param("Tree", "treebank.txt", marks=pytest.mark.slow),  # a compile
                                         ("Table", "table.csv")])
def test_a_stream_has_the_eager_readers_split_and_results(models, model, file):
    net = structc.compile(models, model)
    eager = readers.read(DATA / file).bind(net)
    stream = streamed(DATA / file, chunk=7).bind(net)          # several chunks, the last one short
    assert len(stream) == len(eager)
    for got, want in [(stream, eager), (validation_split(stream, 0.25, 1)[1], validation_split(eager, 0.25, 1)[1])]:
        g, w = got.evaluate(net, batch=5), want.evaluate(net)
        assert g.keys() == w.keys() and all(g[k] == pytest.approx(w[k], rel=1e-5) for k in w)
    eager_items = (sorted(row.tobytes() for row in eager.x_train) if model == "Table"
                   else sorted(int(f.root_labels[0]) for f in eager.train))
    assert epoch_examples(stream, model) == eager_items
    assert stream.batch_count(8) == sum(1 for _ in stream.batches(8, np.random.default_rng(1)))


def test_a_stream_shuffles_across_chunks(models):
    stream = streamed(DATA / "table.csv", chunk=10).bind(structc.compile(models, "Table"))
    first = [b["x"][0].tobytes() for b in stream.batches(4, np.random.default_rng(0))]
    again = [b["x"][0].tobytes() for b in stream.batches(4, np.random.default_rng(0))]
    other = [b["x"][0].tobytes() for b in stream.batches(4, np.random.default_rng(1))]
    assert first == again and first != other


@pytest.mark.parametrize("model, file", [("Tree", "treebank.txt"), ("Table", "table.csv")])
def test_a_stream_shuffles_within_a_chunk(models, model, file):
    """One chunk holds the whole file, so only the shuffle within a chunk can change the
    order an epoch visits the training examples in: every one once, not in the file's order
    (the test above passes with chunks visited in a random order and read in order)."""
    net = structc.compile(models, model)
    eager = readers.read(DATA / file).bind(net)          # its training examples in the file's order
    stream = streamed(DATA / file, chunk=10_000).bind(net)
    rng = np.random.default_rng(0)
    if model == "Table":
        in_file = [row.tobytes() for row in eager.x_train]
        visited = [row.tobytes() for b in stream.batches(8, rng) for row in b["x"]]
    else:
        in_file = [int(f.root_labels[0]) for f in eager.train]
        visited = [int(v) for b in stream.batches(8, rng) for v in b["y"]]
    assert sorted(visited) == sorted(in_file) and visited != in_file


@pytest.mark.parametrize("file", ["bad_bracket.txt", "ragged.csv"])
def test_a_bad_line_is_the_same_error_as_when_read_whole(file):
    with pytest.raises(ReadError) as eager:
        readers.read(DATA / file)
    with pytest.raises(ReadError) as stream:
        streamed(DATA / file, chunk=1)
    assert str(stream.value) == str(eager.value) and stream.value.line is not None


def test_a_bad_line_far_into_a_large_file_names_its_line(tmp_path):
    path = tmp_path / "big.txt"
    lines = ["(1 (1 good) (1 film))"] * 3000
    lines[2345] = "(1 (1 good) (1 film)"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ReadError, match=r"big\.txt:2346: unbalanced brackets"):
        streamed(path, chunk=100)


@pytest.fixture(scope="module")
def big_table(tmp_path_factory) -> Path:
    """8,000 examples, label = [x0 + x1 > 0]."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8000, 4)).round(4)
    path = tmp_path_factory.mktemp("big") / "big.csv"
    np.savetxt(path, np.column_stack([x, x[:, 0] + x[:, 1] > 0]), fmt="%g", delimiter=",", header="a,b,c,d,y",
               comments="")
    return path


def peak_bytes(net, read) -> int:
    """The most memory Python held while reading, training an epoch on and evaluating `read()`."""
    tracemalloc.start()
    try:
        data = read().bind(net)
        steps = sum(1 for _ in data.batches(64, np.random.default_rng(0)))
        data.evaluate(net)
        assert steps == data.batch_count(64)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow        # the file is read a few times under tracemalloc: seconds
def test_memory_is_a_chunk_and_a_few_bytes_per_example(models, big_table):
    net = structc.compile(models, "Table")
    streams.stream_table(DATA / "table.csv").bind(net).evaluate(net)     # imports and first calls, not measured
    readers.read(DATA / "table.csv").bind(net).evaluate(net)
    streamed_peak = peak_bytes(net, lambda: streams.stream_table(big_table, chunk=200))
    eager_peak = peak_bytes(net, lambda: readers.read(big_table))
    assert streamed_peak < 100 * 8000 < eager_peak / 3            # the split's index arrays: ~60 bytes an example


@pytest.mark.slow      # trains and evaluates on 8,000 streamed rows: seconds
def test_train_and_eval_stream_with_the_option(models, big_table, tmp_path, capsys):
    out = tmp_path / "run.npz"
    args = ["train", str(models), "--model", "Table", "--data", str(big_table), "--epochs", "2", "--optimizer",
            "adam", "--lr", "0.05", "--val-split", "0.1", "--out", str(out), "--no-progress"]
    assert main([*args, "--stream"]) == 0
    captured = capsys.readouterr()
    assert "8000 examples, streamed 4096 at a time (6400 training / 1600 held-out examples" in captured.err
    assert float(captured.out.strip().rsplit(" ", 1)[-1].rstrip("%")) > 90
    evaluated = []
    for extra in (["--stream"], []):          # the same held-out part, streamed or read whole
        assert main(["eval", str(models), "--model", "Table", "--data", str(big_table), "--params", str(out),
                     *extra]) == 0
        evaluated.append(capsys.readouterr().out.split(": ", 1)[1])
    assert evaluated[0] == evaluated[1] and evaluated[0].strip().endswith(captured.out.strip().rsplit(" ", 1)[-1])


def test_files_above_the_threshold_stream_by_themselves(monkeypatch):
    path = DATA / "table.csv"
    monkeypatch.setattr(streams, "STREAM_ABOVE", os.path.getsize(path) - 1)
    assert isinstance(readers.read(path), streams.StreamedTable)
    assert not isinstance(readers.read(path, stream=False), streams.StreamedTable)
    monkeypatch.setattr(streams, "STREAM_ABOVE", os.path.getsize(path))
    assert not isinstance(readers.read(path), streams.StreamedTable)


def test_only_text_files_stream(tmp_path, capsys):
    with pytest.raises(ReadError, match="only treebank and table text files"):
        readers.read(DATA / "tu_tiny", stream=True)
    model = tmp_path / "digits.snet"
    model.write_text("model D { input x: f32[N, 64]  target y: class[N] of 10\n loss cross_entropy(dense(x, 10), y) }")
    assert main(["train", str(model), "--data", "digits", "--stream", "--out", str(tmp_path / "d.npz")]) == 1
    assert "--stream reads your own treebank or table file; the built-in data set 'digits'" in capsys.readouterr().err


@pytest.mark.parametrize("model, file", [pytest.param("Tree", "treebank.txt", marks=pytest.mark.slow),  # a compile
                                         ("Table", "table.csv")])
def test_ranks_shares_are_the_one_process_batches_split(models, model, file):
    """Data-parallel streaming: every rank draws the same chunks and orders, so the shares
    of each step are that step's one-process batch, split (trees: by size), none lost."""
    net = structc.compile(models, model)
    data = streamed(DATA / file, chunk=7).bind(net)
    key = data.input["name"] if model == "Table" else data.root_target["name"]
    whole = list(data.batches(5, np.random.default_rng(3)))
    for size in (2, 3):
        ranks = [list(data.shares(5, np.random.default_rng(3), r, size)) for r in range(size)]
        assert all(len(r) == len(whole) for r in ranks)
        for step, batch in enumerate(whole):
            parts = [r[step][key] for r in ranks if r[step]]
            if model == "Table":
                got, want = sorted(map(bytes, np.concatenate(parts))), sorted(map(bytes, batch[key]))
            else:
                got, want = sorted(np.concatenate(parts).tolist()), sorted(batch[key].tolist())
            assert got == want, step
    whole = data.evaluate_share(net, 0, 1)
    evaluated = whole.metrics()
    assert evaluated == data.evaluate(net)
    assert getattr(getattr(data, "_probe", None), "_held_out", None) is None     # no chunk kept after it
    shares = [data.evaluate_share(net, r, 3) for r in range(3)]
    np.testing.assert_allclose(sum(s.sums for s in shares), whole.sums, rtol=1e-6)
    combined = shares[0].add(shares[1]).add(shares[2]).metrics()
    for metric, value in evaluated.items():
        assert combined[metric] == pytest.approx(value, rel=1e-6)


def test_the_stream_option_is_the_same_with_distributed():
    from structc.cli import _stream_choice, parser
    for given, want in (([], None), (["--stream"], True)):
        for extra in ([], ["--distributed"]):
            assert _stream_choice(parser().parse_args(["train", "m.snet", "--data", "d.csv", *given, *extra])) is want


def test_a_file_that_changes_while_streamed_is_an_error(models, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text((DATA / "table.csv").read_text())
    data = streams.stream_table(path, chunk=10).bind(structc.compile(models, "Table"))
    with open(path, "a") as f:
        f.write("0.1,0.2,0.3,0.4,1\n")
    with pytest.raises(ReadError, match="the file changed while it was streamed"):
        data.evaluate(structc.compile(models, "Table"))


def test_the_readme_states_the_chunk_and_the_threshold():
    text = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    assert f"over {streams.STREAM_ABOVE // 2**20} MiB" in text and f"reads {streams.CHUNK} examples at a time" in text
    kept = streams.stream_table(DATA / "table.csv")
    assert f"about {kept.labels.itemsize + kept.chunks.parts.itemsize} bytes an example" in text


def test_numbers_numpy_reads_differently_are_read_as_python_reads_them(models, tmp_path):
    """Python's float takes Arabic-Indic digits and splits on a no-break space; numpy's
    byte-level reading does neither, so that chunk is read line by line: the same values."""
    path = tmp_path / "odd.csv"
    rows = [f"{k % 7}.5,{k % 3},{k}\u00a01,{k % 2}" for k in range(40)]
    rows[5] = "\u0661.5,2,3 1,1"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    net = structc.compile(models, "Table")
    eager, stream = readers.read(path).bind(net), streams.stream_table(path, chunk=16).bind(net)
    assert stream.evaluate(net) == pytest.approx(eager.evaluate(net), rel=1e-6)
    got = np.concatenate([b["x"] for b in stream.batches(64, np.random.default_rng(0))])
    assert sorted(map(bytes, got)) == sorted(map(bytes, eager.x_train))
