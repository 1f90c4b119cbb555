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


def test_evaluate_batch_is_the_forward_outputs_and_the_loss_in_one_call():
    """Held-out evaluation's one call (the evaluation entry: no backward pass) gives the
    forward entry's outputs and the loss the training entry computes, and writes no
    gradient."""
    net, data = bound("trees", "output guess = softmax(z)")
    part = data.held_out_batches(512)[0]
    feed = data.feed(part)
    net.grads["E"][...] = 7.0
    outs, loss = net.evaluate_batch(**feed)
    assert np.all(net.grads["E"] == 7.0)                  # nothing written
    np.testing.assert_allclose(outs["guess"], net.forward(t=part)["guess"], rtol=1e-6, atol=1e-7)
    assert loss == pytest.approx(net.grad(**feed)[0], rel=1e-6)
    assert net.loss(**feed) == loss


@pytest.mark.slow     # links a library: seconds
def test_a_library_without_the_evaluation_entry_evaluates_in_two_calls(tmp_path):
    import shutil
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    from structc import api, ship
    net, data = bound("table", "output guess = softmax(z)")
    ship.write_shared_library(api.compile_artifact(CASES["table"][1].format("output guess = softmax(z)"),
                                                   jit=False), tmp_path / "t.so")
    lib = ship.load(tmp_path / "t.so")
    assert lib._entries.get("eval_loss") is None
    for k, v in net.params.items():
        lib.params[k] = v
    assert data.evaluate(lib) == pytest.approx(data.evaluate(net), rel=1e-6)


def test_evaluate_batch_does_not_drop():
    """Dropout is off in held-out evaluation: the outputs are the forward entry's and
    two calls give the same loss (a training call draws new masks each time)."""
    net = structc.compile(Path(__file__).resolve().parent.parent / "examples" / "digits_dropout.snet")
    data = datasets.load("digits").bind(net)
    feed = {data.input["name"]: data.x_test[:50], data.target["name"]: data.y_test[:50]}
    outs, loss = net.evaluate_batch(**feed)
    again = net.evaluate_batch(**feed)[1]
    np.testing.assert_array_equal(outs[data.output], net.forward(**{data.input["name"]: data.x_test[:50]})[data.output])
    assert loss == again and net.grad(**feed)[0] != net.grad(**feed)[0]


def test_held_out_graphs_follow_the_split_and_the_graphs():
    """A graph data set evaluates the graphs `test` names in `graphs` now: a split or
    a graph changed after the data set was made is seen (the training batches see
    both), not the held-out batch joined when it was made."""
    from structc.graphs import batch
    net, data = bound("graphs", "output guess = softmax(z)")

    def measured(test):         # one evaluation call on those graphs, as evaluate makes it
        outs, loss = net.evaluate_batch(g=batch([data.graphs[k] for k in test]), y=data.labels[test])
        return {"loss": loss, "accuracy": float(np.mean(np.argmax(outs["guess"], axis=-1) == data.labels[test]))}
    test = data.test.copy()
    assert data.evaluate(net) == pytest.approx(measured(test))
    data.test = data.train[:len(test)]                  # another split of the same size
    assert data.evaluate(net) == pytest.approx(measured(data.test))
    data.test = test
    data.graphs[test[0]] = data.graphs[test[0]].with_features(x=np.full_like(data.graphs[test[0]].x, 9.0))
    assert data.evaluate(net) == pytest.approx(measured(test))


NODE_LOSS = """
model M { input t: forest(arity=2) of word(vocab=10)  target s: class[t.nodes] of 4
  param E: embedding(10, 8) = normal(0.3)
  rec h(n) = leaf: E[n.word]
             node: tanh(dense(concat(h(n.children)), 8))
  loss cross_entropy(dense(h(t.nodes), 4), s) }"""


def test_a_held_out_loss_over_nodes_weighs_each_batch_by_its_nodes():
    """A loss that is a mean over every node: the held-out loss is that mean over all
    held-out nodes, whatever the evaluation batch (before, each batch's mean was weighed
    by its trees, so batches of small trees counted too much)."""
    from structc.forest import Forest, Vocab
    from structc.treedata import TreeDataset
    trees = ["(1 good)", "(2 (1 bad) (3 fun))", "(0 (1 (2 the) (1 dull)) (2 (3 good) (2 (0 the) (1 plot))))",
             "(3 fun)", "(2 (2 (2 (2 the) (1 film)) (3 good)) (0 (1 bad) (2 (2 the) (3 (3 fun) (2 plot)))))"]
    net = structc.compile(NODE_LOSS)
    data = TreeDataset("mixed", trees, trees, Vocab.build(["good", "bad", "fun", "the", "dull", "plot", "film"]))
    data.bind(net)
    whole = net.loss(**data.feed(Forest.concat(data.test)))
    for batch in (1, 2, len(trees)):
        assert data.evaluate(net, batch)["loss"] == pytest.approx(whole, rel=1e-5), batch


def test_the_digits_description_counts_the_split_it_describes():
    """It said 1,437 training / 360 held-out images; the split is 1,438 / 359."""
    from structc import datasets
    data = datasets.load("digits")
    assert f"{len(data.x_train):,} training / {len(data.x_test):,} held-out images" in data.description
