"""Held-out accuracy comes from the model's class output, whatever the user named it;
a model without one reports no accuracy (before, a table or a sequence model whose
output was not called `probs` reported 0% accuracy, and graph models failed)."""
import re
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


def _emptied(case: str, data):
    """`data` with no held-out example (its training part as it was)."""
    if case == "streamed":
        data.chunks.parts[data.chunks.parts == streams.HELD_OUT] = streams.TRAIN
    elif case == "table":
        data.x_test, data.y_test = data.x_test[:0], data.y_test[:0]
    elif case == "nodes":
        data.test, data.test_mask[:] = np.zeros(0, np.int64), 0.0
    else:
        data.test = data.test[:0]
    return data


@pytest.mark.parametrize("case", ["table", "streamed", "trees", "graphs", "nodes"])
def test_an_empty_held_out_part_is_refused_before_training(case):
    """It was measured as a NaN loss and accuracy (nodes: a ZeroDivisionError), every
    epoch, after training it."""
    from structc.heldout import EMPTY_PART
    from structc.train import TrainConfig, train
    net, data = bound("table" if case == "streamed" else case, "")
    if case == "streamed":
        data = streams.stream_table(DATA / "table.csv", chunk=16).bind(net)
    data = _emptied(case, data)
    before = {k: v.copy() for k, v in net.params.items()}
    with pytest.raises(ValueError, match=re.escape(EMPTY_PART)):
        train(net, data, TrainConfig(epochs=1, progress=False), log=lambda *a: None)
    assert all(np.array_equal(before[k], net.params[k]) for k in before)          # not one step
    with pytest.raises(ValueError, match=re.escape(EMPTY_PART)):
        data.evaluate(net)
    assert data.held_out_count() == 0


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


@pytest.mark.parametrize("name", ["digits", "logic"])
def test_held_out_evaluation_compiles_no_training_part(name):
    # the per-term tally read a batch's sizes off the training entry, so evaluating a
    # model compiled for inference compiled its training part first (0.05 -> 0.6 s cold)
    path = {"digits": "digits_mlp.snet", "logic": "logic_tree.snet"}[name]
    net = structc.compile(Path(__file__).resolve().parent.parent / "examples" / path)
    data = datasets.load(name)
    data.bind(net)
    assert data.evaluate(net)["loss"] > 0
    assert net.meta["deferred"] == ["training", "update"]


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


# -- the held-out loss in batches is one call's on the whole held-out part -------------------

TREE_MODEL = """
model M {{ input t: forest(arity=2) of word(vocab=10)  {targets}
  param E: embedding(10, 8) = normal(0.3)
  rec h(n) = leaf: E[n.word]
             node: tanh(dense(concat(h(n.children)), 8))
  {losses} }}"""
#: logic_tree's and sentiment_treelstm's form: a mean over trees plus a mean over nodes
ROOTS_AND_NODES = TREE_MODEL.format(targets="target y: class[t.trees] of 4  target s: class[t.nodes] of 4",
                                    losses="loss cross_entropy(dense(h(t.root), 4), y)\n"
                                           "  loss cross_entropy(dense(h(t.nodes), 4), s)")
#: a mean over graphs plus a mean over nodes (x 8 features)
GRAPHS_AND_NODES = """
model M { input g: graph(features=2)  target y: class[g.graphs] of 2
  h = relu(dense(g.x, 8))
  loss cross_entropy(dense(mean(h over g.nodes), 2), y) + 0.1 * mean(h * h) }"""
MIXED_TREES = ["(1 good)", "(2 (1 bad) (3 fun))", "(0 (1 (2 the) (1 dull)) (2 (3 good) (2 (0 the) (1 plot))))",
               "(3 fun)", "(2 (2 (2 (2 the) (1 film)) (3 good)) (0 (1 bad) (2 (2 the) (3 (3 fun) (2 plot)))))"]
WORDS = ["good", "bad", "fun", "the", "dull", "plot", "film"]


def shaken(net, seed: int = 0):
    """`net` with parameters far from their initial values, whose predictions are near
    uniform: every node's loss would be about the same, and any weighing right."""
    rng = np.random.default_rng(seed)
    for k, v in net.params.items():
        net.params[k] = rng.normal(0, 1.0, v.shape).astype(np.float32)
    return net


def _tree_family(source):
    from structc.forest import Forest, Vocab
    from structc.treedata import TreeDataset
    net = shaken(structc.compile(source))
    trees = MIXED_TREES * 3                        # 15 trees of 1 to 9 leaves
    data = TreeDataset("mixed", trees, trees, Vocab.build(WORDS)).bind(net)
    whole = net.evaluate_batch(**data.feed(Forest.concat(data.test)))[1]
    return net, whole, lambda batch: data.evaluate(net, batch)["loss"]


def _graph_family():
    import copy
    from structc.graphs import batch as joined
    net = shaken(structc.compile(GRAPHS_AND_NODES))
    data = readers.read(DATA / "tu_tiny").bind(net)
    whole = net.evaluate_batch(g=joined([data.graphs[k] for k in data.test]), y=data.labels[data.test])[1]

    def batched(size):          # a graph data set evaluates in one call: its parts as ranks' shares are
        tally = None
        for at in range(0, len(data.test), size):
            part = copy.copy(data)
            part.test = data.test[at:at + size]
            tally = part.held_out_tally(net) if tally is None else tally.add(part.held_out_tally(net))
        return tally.metrics()["loss"]
    return net, whole, batched


def _mlp_family():
    net = shaken(structc.compile(Path(__file__).resolve().parent.parent / "examples" / "digits_mlp.snet"))
    data = datasets.load("digits").bind(net)
    whole = net.evaluate_batch(x=data.x_test, y=data.y_test)[1]
    return net, whole, lambda batch: data.evaluate(net, batch)["loss"]


REGRESSION = """
model R {{ input x: f32[N, 4]  target t: f32[N, 3]  param w: f32[4, 3]
  loss {} }}"""
SUMS = {"sum": "sum((x @ w - t) * (x @ w - t))",                          # the parts' losses add
        "mean_and_sum": "mse(x @ w, t) + sum((x @ w - t) * (x @ w - t))",
        "sum_and_penalty": "sum((x @ w - t) * (x @ w - t)) + 0.01 * sum(w * w)"}   # the penalty counts once


def _regression_family(loss):
    from structc.datasets import ArrayDataset
    net = shaken(structc.compile(REGRESSION.format(loss)))
    rng = np.random.default_rng(1)
    x, t = rng.normal(size=(10, 4)).astype(np.float32), rng.normal(size=(10, 3)).astype(np.float32)
    data = ArrayDataset("r", x, t, x, t).bind(net)
    return net, net.evaluate_batch(x=x, t=t)[1], lambda batch: data.evaluate(net, batch)["loss"]


#: a mean over sequences plus a mean over positions (x 6 features)
SEQUENCES_AND_STEPS = """
model M { input s: sequence of f32[3]  target y: class[s.sequences] of 2
  rec h(t) = first: tanh(dense(t.x, 6, name="first"))
             next: tanh(dense(concat(t.x, h(t.prev)), 6, name="next"))
  loss cross_entropy(dense(h(s.last), 2), y) + 0.1 * mean(h(s.steps) * h(s.steps)) }"""


def _sequence_family():
    from structc.seqdata import Sequences, SequenceDataset
    net = shaken(structc.compile(SEQUENCES_AND_STEPS))
    rng = np.random.default_rng(2)
    seqs = Sequences.from_list([rng.normal(size=(n, 3)).astype(np.float32) for n in (1, 9, 2, 14, 3, 1, 7, 20, 2, 5)])
    y = rng.integers(0, 2, seqs.count)
    data = SequenceDataset("ragged", seqs, y, seqs, y).bind(net)
    return net, net.evaluate_batch(s=seqs, y=data.y_test)[1], lambda batch: data.evaluate(net, batch)["loss"]


FAMILIES = {"roots_and_nodes": lambda: _tree_family(ROOTS_AND_NODES),
            "nodes": lambda: _tree_family(NODE_LOSS),
            "graphs_and_nodes": _graph_family,
            "digits_mlp": _mlp_family,
            "sequences_and_steps": _sequence_family,
            **{name: (lambda loss=loss: _regression_family(loss)) for name, loss in SUMS.items()}}
_MADE: dict = {}


@pytest.mark.parametrize("batch", [1, 3, 7])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_held_out_loss_in_batches_is_one_call_s_on_the_whole_part(family, batch):
    """Each term of the loss weighed by its own denominator: before, a mean over trees
    plus a mean over nodes was weighed by trees per batch (4.3% off at a batch of one
    tree, 1.0% at 3)."""
    if family not in _MADE:
        _MADE[family] = FAMILIES[family]()
    net, whole, batched = _MADE[family]
    assert batched(batch) == pytest.approx(whole, rel=1e-5)


def test_a_sum_of_means_over_different_things_combines_each_term_by_its_own_count():
    """The tally keeps each term's sum and count: a part's tally is what one call on
    it gives, and two parts' tallies add to one call's on both."""
    from structc.forest import Forest, Vocab
    from structc.heldout import Tally
    net = shaken(structc.compile(ROOTS_AND_NODES))
    assert [t["dims"] for t in net.meta["loss_denominator"]["terms"]] == [["t.trees"], ["t.nodes"]]
    small, large = (Forest.from_brackets(trees, Vocab.build(WORDS)) for trees in (MIXED_TREES[:2], MIXED_TREES[2:]))
    feed = lambda f: {"t": f, "y": f.root_labels, "s": f.labels}      # noqa: E731
    _, loss, terms = net.evaluate_terms(**feed(small))
    assert len(terms) == 2 and loss == pytest.approx(sum(terms), rel=1e-6)
    tally = Tally(net, None)
    tally.measure(feed(small), small.root_labels)
    np.testing.assert_allclose(tally.sums[:4], [terms[0] * 2, 2, terms[1] * small.nodes, small.nodes], rtol=1e-6)
    tally.measure(feed(large), large.root_labels)
    assert tally.metrics()["loss"] == pytest.approx(net.evaluate_batch(**feed(Forest.concat([small, large])))[1],
                                                    rel=1e-5)


def test_a_streamed_treebank_combines_its_chunks_and_shares_as_one_call(tmp_path):
    """Chunks of 4 trees of 1 to 9 leaves, a loss over roots and nodes: the streamed
    held-out loss, and three ranks' shares added, are one call's on every held-out tree."""
    from structc.forest import Forest
    path = tmp_path / "bank.txt"
    path.write_text("\n".join(MIXED_TREES * 8) + "\n")
    net = shaken(structc.compile(ROOTS_AND_NODES))
    eager = readers.read(path, split=0.5).bind(net)
    whole = net.evaluate_batch(**eager.feed(Forest.concat(eager.test)))[1]
    stream = streams.stream_treebank(path, split=0.5, chunk=4).bind(net)
    assert stream.evaluate(net, batch=3)["loss"] == pytest.approx(whole, rel=1e-5)
    shares = [stream.evaluate_share(net, r, 3, batch=2) for r in range(3)]
    assert shares[0].add(shares[1]).add(shares[2]).metrics()["loss"] == pytest.approx(whole, rel=1e-5)


def test_a_loss_that_is_not_a_sum_of_means_says_so_once(recwarn):
    """A product of two means has no count to weigh its batches by: the held-out loss
    is weighed by examples and a warning says it depends on the batch size, once."""
    from structc.errors import HeldOutLossWarning
    net = structc.compile(TREE_MODEL.format(
        targets="target y: class[t.trees] of 4  target s: class[t.nodes] of 4",
        losses="loss cross_entropy(dense(h(t.root), 4), y) * cross_entropy(dense(h(t.nodes), 4), s)"))
    assert net.meta["loss_denominator"]["kind"] == "unsupported"
    from structc.forest import Vocab
    from structc.treedata import TreeDataset
    data = TreeDataset("mixed", MIXED_TREES, MIXED_TREES, Vocab.build(WORDS)).bind(net)
    recwarn.clear()
    first = data.evaluate(net, 2)["loss"]
    data.evaluate(net, 2)
    said = [w for w in recwarn if issubclass(w.category, HeldOutLossWarning)]
    assert len(said) == 1 and "depends on the batch size" in str(said[0].message)
    assert "is not a sum, or a sum divided by a count" in str(said[0].message)
    assert np.isfinite(first)


def test_a_library_without_the_terms_outputs_says_so(monkeypatch, recwarn):
    """A library compiled before the evaluation entry gave each term: weighed by examples, said."""
    from structc.errors import HeldOutLossWarning
    net, whole, batched = _tree_family(ROOTS_AND_NODES)
    given = net.evaluate_terms
    monkeypatch.setattr(net, "evaluate_terms", lambda **feed: (*given(**feed)[:2], None))
    monkeypatch.setattr("structc.heldout._WARNED", set())
    recwarn.clear()
    batched(3)
    said = [w for w in recwarn if issubclass(w.category, HeldOutLossWarning)]
    assert len(said) == 1 and "does not give the loss's terms" in str(said[0].message)
