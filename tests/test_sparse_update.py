"""SGD updates an embedding's rows from the step's ids alone (`ops/optim.py`,
`_sparse_sgd`): a table whose gradient is a scatter of rows is not read whole.
The bits are those of the dense update (`grad_into_arena` + `apply_update` of a
net whose gradients were handed out: its update entry has no ids and finds no
record of rows), at any thread count; weight decay, a clipping scale below 1,
momentum and Adam update every row."""
import re

import numpy as np
import pytest

import structc
from structc.compiler import compile_source
from structc.ops.optim import CHUNK

# two tables: one 3,000 x 37 (111,000 floats: rows straddle the update's chunks of
# 16,384), one small; ids repeat; `w` is looked up twice (two scatters summed: dense)
TABLES = """
model Bag {
  input  a: i32[N]
  input  b: i32[N]
  input  c: i32[N]
  target y: class[N] of 4
  param  E: embedding(3000, 37)
  param  F: embedding(50, 8)
  param  W: embedding(20, 37)
  h = concat(tanh(E[a] + W[c] + W[b]), F[b], axis=1)
  loss cross_entropy(dense(h, 4), y)
}
"""


def batch(n, seed=0, vocab=3000):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, vocab, n).astype(np.int32)
    a[: n // 3] = a[n // 3: 2 * (n // 3)]          # repeated ids
    return {"a": a, "b": rng.integers(0, 20, n).astype(np.int32), "c": rng.integers(0, 20, n).astype(np.int32), "y": rng.integers(0, 4, n).astype(np.int32)}


def nets(source, **options):
    """A net that updates its tables by rows, and one that updates them whole."""
    one, two = structc.compile(source, seed=0), structc.compile(source, seed=0)
    two.grads       # noqa: B018 - handed out: no record of rows, so `apply_update` is dense
    for net in (one, two):
        net.set_optimizer("sgd", **options)
    return one, two


def assert_steps_equal(source, feeds, threads=1, **options):
    """train_step (the sparse update) against grad_into_arena + apply_update, step by step."""
    before = structc.get_num_threads()
    structc.set_num_threads(threads)
    try:
        sparse, dense = nets(source, **options)
        for feed in feeds:
            loss = sparse.train_step(lr=0.3, **feed)
            want, _ = dense.grad_into_arena(**feed)
            dense.apply_update(lr=0.3)
            assert loss == want
            for name in sparse.params:
                np.testing.assert_array_equal(sparse.params[name], dense.params[name], err_msg=name)
                np.testing.assert_array_equal(sparse.grads[name], dense.grads[name], err_msg=f"grad {name}")
        return {name: v.copy() for name, v in sparse.params.items()}
    finally:
        structc.set_num_threads(before)


def test_the_train_graph_marks_each_lone_scatter_as_sparse():
    """E and F's gradients are one scatter each; W's is two summed, and the dense
    layer's a product: only E and F are marked (by their ids)."""
    dumps = {}
    compile_source(TABLES, "<bag>", dump=lambda stage, text: dumps.__setitem__(stage, text))
    update = re.search(r"= update\[(.*?)\]\((.*?)\)", dumps["train"])
    assert update, dumps["train"]
    pairs = re.search(r"sparse=\(\((\d+), (\d+)\), \((\d+), (\d+)\)\)", update.group(1))
    assert pairs, update.group(1)
    operands = update.group(2).split(", ")
    grads = {k: v for k, v in re.findall(r"return grad:(\w+) = (%\d+)", dumps["train"])}
    marked = {operands[int(pairs.group(k))] for k in (1, 3)}
    assert marked == {grads["E"], grads["F"]}


@pytest.mark.parametrize("threads", [1, 2])
def test_sgd_on_rows_gives_the_dense_updates_bits(threads):
    feeds = [batch(n, seed) for seed, n in enumerate([64, 1, 300, 64])]
    got = assert_steps_equal(TABLES, feeds, threads)
    if threads == 2:
        assert all(np.array_equal(got[k], v) for k, v in assert_steps_equal(TABLES, feeds, 1).items())


@pytest.mark.parametrize("options", [{"weight_decay": 0.01}, {"clip_norm": 1e-3}, {"clip_norm": 1e3}])
def test_decay_and_clipping_give_the_dense_updates_bits(options):
    """Weight decay moves every row, and a clipping scale below 1 changes every
    step: both update densely; a clipping norm never reached (scale 1) does not."""
    assert_steps_equal(TABLES, [batch(64, seed) for seed in range(3)], **options)


def test_more_ids_than_the_sparse_pass_takes_update_densely():
    """E (111,000 floats in 7 chunks) goes dense from 3,965 ids, F (400) from 101."""
    n = CHUNK // 4 + 1
    assert_steps_equal(TABLES, [batch(n, 0), batch(n // 2, 1), batch(101, 2), batch(100, 3)])


def test_a_tree_models_words_are_updated_as_rows():
    from test_trees import BINARY, random_tree
    from structc.forest import Forest
    rng = np.random.default_rng(0)
    feeds = [{"t": Forest.from_tuples([random_tree(rng, 9, 20) for _ in range(6)]),
              "y": (np.arange(6) % 3).astype(np.int32)} for _ in range(3)]
    assert_steps_equal(BINARY, feeds)
    assert_steps_equal(BINARY, feeds, threads=2)


def test_a_row_no_id_names_is_not_read():
    """The sparse pass leaves a row no id names as it is even where the dense
    pass would not: weight decay 0 times an infinite parameter is NaN, which the
    dense update writes. That is how this test knows the rows were skipped."""
    sparse, dense = nets(TABLES)
    feed = batch(64)
    unused = int(np.setdiff1d(np.arange(3000), feed["a"])[0])
    for net in (sparse, dense):
        net.params["E"][unused] = np.inf
    sparse.train_step(lr=0.1, **feed)
    dense.grad_into_arena(**feed)
    dense.apply_update(lr=0.1)
    assert np.isinf(sparse.params["E"][unused]).all()
    assert np.isnan(dense.params["E"][unused]).all()
    used = np.unique(feed["a"])
    np.testing.assert_array_equal(sparse.params["E"][used], dense.params["E"][used])


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_momentum_and_adam_update_every_row(name):
    """Their state moves rows no id names: the same as the update entry's."""
    sparse, dense = (structc.compile(TABLES, seed=0) for _ in range(2))
    for net in (sparse, dense):
        net.set_optimizer(name)
    for seed in range(3):
        feed = batch(64, seed)
        sparse.train_step(lr=0.01, **feed)
        dense.grad_into_arena(**feed)
        dense.apply_update(lr=0.01)
    for k in sparse.params:
        np.testing.assert_array_equal(sparse.params[k], dense.params[k], err_msg=k)


@pytest.mark.parametrize("n, sparse", [(100, True), (101, False)])
def test_a_small_table_goes_dense_past_a_quarter_of_its_floats_in_ids(n, sparse):
    """F (50 x 8: 400 floats, one chunk) is updated by rows for up to 100 ids:
    beyond, scanning the ids would cost more than reading the table. Told
    apart by an infinite row no id names (see the test above). With no record
    of the rows the scatter wrote, that is (its gradients handed out)."""
    net = structc.compile(TABLES, seed=0)
    net._expose_grads()
    net.params["F"][30] = np.inf            # b's ids are below 20
    net.train_step(lr=0.1, **batch(n))
    assert bool(np.isinf(net.params["F"][30]).all()) is sparse
    assert bool(np.isnan(net.params["F"][30]).all()) is not sparse


@pytest.mark.parametrize("n", [100, 101, 4000])
def test_with_the_record_of_the_rows_a_table_stays_sparse_however_many_ids(n):
    """The record (`embedding.keeps_record`) gives a chunk its rows for the price of
    its bytes: no count of ids makes reading the table cheaper."""
    net = structc.compile(TABLES, seed=0)
    net.params["F"][30] = np.inf
    net.train_step(lr=0.1, **batch(n))
    assert np.isinf(net.params["F"][30]).all()
