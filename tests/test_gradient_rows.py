"""An embedding's gradient is zeroed where the last step wrote, not whole
(`ops/embedding.py`, `record`; `sc_rows_record` in the runtime): a net keeps a
byte a row of the rows its training entry wrote while nothing else writes its
gradient arena. The arena must hold, step after step, the very bits of the
whole-table zeroing, which a net whose gradients were handed out (`net.grads`)
still does."""
import numpy as np
import pytest

import structc

# E: 3,000 rows (each task's range of rows ends off a 64-row block of the record),
# F: 50 rows (under one block), W looked up twice (its gradient a sum: no record)
from test_sparse_update import TABLES  # noqa: E402


def feed(seed, n=40, vocab=3000):
    """A batch whose ids differ from the last one's: rows written before must be zeroed."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, vocab, n).astype(np.int32)
    a[:5] = a[5:10]                                 # repeated ids
    return {"a": a, "b": rng.integers(0, 20, n).astype(np.int32),        # F and W: 20 of their rows
            "c": rng.integers(0, 20, n).astype(np.int32), "y": rng.integers(0, 4, n).astype(np.int32)}


def pair(optimizer="sgd", source=TABLES, **options):
    """A net that keeps the record, and one whose gradients were handed out
    (it zeroes the tables whole), with the same parameters."""
    kept, whole = structc.compile(source, seed=0), structc.compile(source, seed=0)
    whole.grads     # noqa: B018 - handing them out is what turns the record off
    for net in (kept, whole):
        net.set_optimizer(optimizer, **options)
    assert kept._rows_kept.alive and not whole._rows_kept.alive
    return kept, whole


def assert_same(kept, whole, step):
    for name in kept.params:
        np.testing.assert_array_equal(kept.params[name], whole.params[name], err_msg=f"step {step}: {name}")
        np.testing.assert_array_equal(kept._grad_views[name], whole._grad_views[name],
                                      err_msg=f"step {step}: grad {name}")


def assert_steps_agree(source, feeds, threads, optimizer, options):
    """Six training steps of a net keeping the record and of one that does not."""
    before = structc.get_num_threads()
    structc.set_num_threads(threads)
    try:
        kept, whole = pair(optimizer, source, **options)
        for step, inputs in enumerate(feeds):
            assert kept.train_step(lr=0.3, **inputs) == whole.train_step(lr=0.3, **inputs)
            assert_same(kept, whole, step)
    finally:
        structc.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("optimizer, options", [("sgd", {}), ("momentum", {}), ("adam", {}),
                                                ("sgd", {"weight_decay": 0.01}), ("sgd", {"clip_norm": 0.05})])
def test_the_gradient_arena_holds_the_whole_zeroing_bits_step_after_step(threads, optimizer, options):
    assert_steps_agree(TABLES, [feed(step) for step in range(6)], threads, optimizer, options)


def test_grad_and_train_step_keep_the_record_true_between_them():
    """`net.grad` (copies) and `grad_into_arena` + `apply_update` run the same
    training entry: the record follows them."""
    kept, whole = pair()
    for step in range(6):
        inputs = feed(10 + step)
        if step % 3 == 0:
            loss, grads = kept.grad(**inputs)
            want, want_grads = whole.grad(**inputs)
            for name in grads:
                np.testing.assert_array_equal(grads[name], want_grads[name], err_msg=name)
        elif step % 3 == 1:
            loss, _ = kept.grad_into_arena(**inputs)
            kept.apply_update(lr=0.1)
            want, _ = whole.grad_into_arena(**inputs)
            whole.apply_update(lr=0.1)
        else:
            loss, want = kept.train_step(lr=0.1, **inputs), whole.train_step(lr=0.1, **inputs)
        assert loss == want
        assert_same(kept, whole, step)
    assert kept._rows_kept.alive


def test_the_record_is_used_and_handing_the_gradients_out_ends_it():
    """A row written behind the record's back survives the next step: the table
    was not zeroed whole (the test above is not passing on whole zeroing alone).
    Written through `net.grads`, the next step zeroes it: handing the views out
    ends the record, for good."""
    net = structc.compile(TABLES, seed=0)
    net.train_step(lr=0.1, **feed(0))
    spare = sorted(set(range(3000)) - set(feed(0)["a"]) - set(feed(1)["a"]))[:3]
    net._grad_views["E"][spare] = 7.0           # behind its back: not a thing a user can do
    net.train_step(lr=0.1, **feed(1))
    assert np.all(net._grad_views["E"][spare] == 7.0)
    assert net._rows_kept.alive
    net.grads["E"][spare] = 5.0                 # through the public views
    assert not net._rows_kept.alive
    for step in (2, 3):
        net.train_step(lr=0.1, **feed(step))
        rows = set(feed(step)["a"])
        assert not np.any(net.grads["E"][[r for r in spare if r not in rows]])


def test_apply_update_takes_a_tables_rows_from_its_record():
    """The update entry (`apply_update`, data-parallel training's second half) has the
    tables' spans in the arena (`compiler.update_graph`): plain SGD updates the rows the
    step's scatter wrote, read from the record, so a row written behind its back stays
    unapplied (a dense update would move its parameter), and with momentum, which
    updates every row, it is applied. `grad_into_arena` + `apply_update` keeps the
    whole-zeroing bits either way (the test above)."""
    net = structc.compile(TABLES, seed=0)
    spare = sorted(set(range(3000)) - set(feed(0)["a"]))[:3]
    for optimizer, moves in (("sgd", False), ("momentum", True)):
        net.set_optimizer(optimizer)
        net.grad_into_arena(**feed(0))
        assert net.meta["row_tables"] == ["E", "F"]     # with the training part; W is looked up twice: none
        net._grad_views["E"][spare] = 7.0       # behind its back: not a thing a user can do
        before = net.params["E"][spare].copy()
        net.apply_update(lr=0.1)
        assert np.any(net.params["E"][spare] != before) == moves, optimizer
        net._grad_views["E"][spare] = 0.0


def test_a_user_who_keeps_the_views_across_steps_gets_the_right_gradient():
    """The trap the record must not fall into: views taken once, written to every
    step (weight decay by hand), while training goes on."""
    kept, whole = pair()
    views = kept.grads                           # taken once, before any step
    for step in range(4):
        inputs = feed(20 + step)
        kept.grad_into_arena(**inputs)
        whole.grad_into_arena(**inputs)
        for net, g in ((kept, views), (whole, whole._grad_views)):
            g["E"] += 0.01 * net.params["E"]        # every row
            net.apply_update(lr=0.1)
        assert_same(kept, whole, step)


# a table read in a recursion's step case: its gradient is the parameter program's scatter
WORDS_IN_STEPS = """
model Reader {
  input  s: sequence of word(vocab=300)
  target y: class[s.sequences] of 3
  param  E: embedding(300, 12)
  rec (h, c)(t) = init: (zeros(16), zeros(16))
                  next: lstm_cell(E[t.word], h(t.prev), c(t.prev), 16)
  loss cross_entropy(dense(h(s.last), 3), y)
}
"""


def sentences(seed, count=5):
    from structc.seqdata import Sequences
    rng = np.random.default_rng(seed)
    words = rng.permutation(300)[:60]            # each batch its own words, mostly
    return {"s": Sequences.from_list([rng.choice(words, int(rng.integers(1, 9))).astype(np.int32)
                                      for _ in range(count)]),
            "y": rng.integers(0, 3, count).astype(np.int32)}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("optimizer, options", [("sgd", {}), ("adam", {}), ("sgd", {"weight_decay": 0.01})])
def test_a_table_read_in_a_recursion_keeps_the_whole_zeroing_bits(threads, optimizer, options):
    assert_steps_agree(WORDS_IN_STEPS, [sentences(step) for step in range(6)], threads, optimizer, options)


def test_sgd_updates_a_table_read_in_a_recursion_by_its_record_of_rows():
    """Only the rows the step's words name are read: an infinite row no word
    names stays as it is (the dense pass's 0 * inf decay term makes it NaN, as
    it does once the record is gone)."""
    for exposed in (False, True):
        net = structc.compile(WORDS_IN_STEPS, seed=0)
        if exposed:
            net._expose_grads()
        inputs = sentences(0)
        spare = sorted(set(range(300)) - set(inputs["s"].data.tolist()))[0]
        net.params["E"][spare] = np.inf
        net.train_step(lr=0.1, **inputs)
        assert bool(np.isinf(net.params["E"][spare]).all()) is not exposed
        assert bool(np.isnan(net.params["E"][spare]).all()) is exposed
