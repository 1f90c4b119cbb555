"""Held-out accuracy comes from the model's class output, whatever the user named it;
a model without one reports no accuracy (before, a table or a sequence model whose
output was not called `probs` reported 0% accuracy, and graph models failed)."""
from pathlib import Path

import numpy as np
import pytest

import structc
from structc import datasets, readers, streams

DATA = Path(__file__).parent / "data"

# name: (data, the model's head over `z`, a [rows, C] tensor of logits, given as `{}`)
CASES = {
    "table": (DATA / "table.csv", """
model M {{ input x: f32[N, 4]  target y: class[N] of 2
  z = dense(x, 2)
  {}
  loss cross_entropy(z, y) }}"""),
    "trees": (DATA / "treebank.txt", """
model M {{ input t: forest(arity=2) of word(vocab=10)  target y: class[t.trees] of 4
  param E: embedding(10, 8) = normal(0.3)
  rec h(n) = leaf: E[n.word]
             node: tanh(dense(concat(h(n.children)), 8))
  z = dense(h(t.root), 4)
  {}
  loss cross_entropy(z, y) }}"""),
    "graphs": (DATA / "tu_tiny", """
model M {{ input g: graph(features=2)  target y: class[g.graphs] of 2
  z = dense(mean(relu(dense(g.x, 8)) over g.nodes), 2)
  {}
  loss cross_entropy(z, y) }}"""),
    "nodes": (DATA / "nodes_tiny", """
model M {{ input g: graph(features=3)  input m: f32[g.nodes]  target y: class[g.nodes] of 2
  z = dense(relu(sum(dense(g.x, 8) over g.edges, self_loops=true, norm=gcn)), 2)
  {}
  loss masked_cross_entropy(z, y, m) }}"""),
    "sequences": ("digits_rows", """
model M {{ input s: sequence of f32[8]  target y: class[s.sequences] of 10
  rec (h, c)(t) = init: (zeros(8), zeros(8))
                  next: lstm_cell(t.x, h(t.prev), c(t.prev), 8)
  z = dense(h(s.last), 10)
  {}
  loss cross_entropy(z, y) }}"""),
}


def bound(case: str, head: str):
    path, source = CASES[case]
    net = structc.compile(source.format(head))
    data = datasets.load(str(path)) if isinstance(path, str) else readers.read(path)
    return net, data.bind(net)


@pytest.mark.slow       # ten compiles: seconds
@pytest.mark.parametrize("case", list(CASES))
def test_accuracy_is_read_from_the_class_output_whatever_its_name(case):
    implied, data = bound(case, "")                        # no output: the loss implies `probs`
    named, data_named = bound(case, "output guess = softmax(z)")
    for k, v in implied.params.items():
        named.params[k] = v
    assert data.output == "probs" and data_named.output == "guess"
    want, got = data.evaluate(implied), data_named.evaluate(named)
    assert "accuracy" in want and got == pytest.approx(want)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["table", "graphs"])
def test_without_a_class_output_no_accuracy_is_reported(case):
    net, data = bound(case, "output width3 = dense(z, 3)")     # [rows, 3]: not a prediction of the classes
    assert data.output is None
    metrics = data.evaluate(net)
    assert "accuracy" not in metrics and np.isfinite(metrics["loss"])


def test_a_streamed_table_reads_the_named_output(tmp_path):
    net, eager = bound("table", "output guess = softmax(z)")
    data = streams.stream_table(DATA / "table.csv", chunk=16).bind(net)
    assert data.evaluate(net) == pytest.approx(eager.evaluate(net)) and "accuracy" in eager.evaluate(net)


def test_held_out_trees_are_joined_once_and_again_when_they_change():
    """Every epoch evaluates the held-out forests: joined once (4 ms an epoch of the
    logic data set), and joined again when `test` holds other forests."""
    data = readers.read(DATA / "treebank.txt")
    first = data.held_out_batches(4)
    assert data.held_out_batches(4) is first and sum(f.trees for f in first) == len(data.test)
    assert data.held_out_batches(3) is not first
    data.test = data.test[:5]
    assert sum(f.trees for f in data.held_out_batches(3)) == 5
