"""A leaf case computed once per distinct word (`structc/leafwords.py`)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import structc
from structc.forest import Forest, distinct_words
from test_treelstm import CHILD_SUM_FUSED, child_sum_reference
from test_trees import forests, random_tree


@pytest.mark.parametrize("vocab, n", [(5, 40), (1000, 800), (10 ** 6, 30), (1, 1)])
def test_distinct_words_and_each_words_place(vocab, n):
    """Both ways (a table of the vocabulary, a sort for a vocabulary much larger
    than the words): ascending distinct ids, and kinds[kind] gives back the words."""
    rng = np.random.default_rng(vocab)
    words = rng.integers(0, vocab, n).astype(np.int32)
    kinds, kind = distinct_words(words, vocab)
    assert kinds.dtype == kind.dtype == np.int32
    assert kinds.tolist() == sorted(set(words.tolist()))
    assert np.array_equal(kinds[kind], words)
    assert not kinds.flags.writeable and not kind.flags.writeable


TREE_LSTM_LEAF = "lstm_state(dense(E[n.word], 3 * 8, name=\"leaf\"), 0)"
LEAF_MODEL = """
model Leaves {
  input  t: forest of word(vocab=12)
  target y: class[t.trees] of 3
  param  E: embedding(12, 8)
  input  F: f32[12, 8]
  input  z: f32[8]
  rec h(n) = leaf: LEAF
             node: tanh(dense(concat(h(n.left), h(n.right)), 8))
  loss cross_entropy(dense(h(t.root), 3), y)
}
"""


@pytest.mark.parametrize("leaf, rewritten", [
    ("tanh(dense(E[n.word], 8))", True),                     # a matmul per leaf: once per word
    ("dense(onehot(n.word, 12), 8)", True),
    ("chunk(lstm_state(dense(E[n.word], 24), 0), 0, 2)", True),
    ("E[n.word]", False),                                    # no work to save: one gather stays one
    ("tanh(E[n.word])", False),
    ("dropout(dense(E[n.word], 8), 0.5)", False),            # a mask per leaf, not per word
    ("tanh(dense(F[n.word], 8))", True),                     # a fixed embedding passed as an input
    ("tanh(dense(E[n.word], 8)) * z", True),                 # an input without the leaf dimension
    ("tanh(dense(E[n.word], 8) + mean(E[n.word], axes=(0,)))", False),     # a mean over the leaves
])
def test_which_leaf_cases_run_per_distinct_word(leaf, rewritten):
    meta = structc.compile(LEAF_MODEL.replace("LEAF", leaf), cache=False).meta
    assert meta["forests"][0]["kinds"] is rewritten
    names = {i["name"] for i in meta["inputs"]}
    assert ("t.leaf_words" in names) is rewritten and ("t.leaf_kind" in names) is rewritten


@pytest.fixture(scope="module")
def child_sum():
    return structc.compile(CHILD_SUM_FUSED, cache=False)


@pytest.mark.parametrize("words", ["one_word", "all_distinct", "mixed"])
def test_per_word_leaves_match_the_per_node_reference(child_sum, words):
    """States, loss and gradients against the node-by-node float64 reference
    (which computes every leaf on its own) when every leaf has the same word,
    when no two share one, and in between."""
    net = child_sum
    assert net.meta["forests"][0]["kinds"]
    rng = np.random.default_rng(7)
    trees = [random_tree(rng, leaves, 12, 3) for leaves in (1, 2, 4, 5)]       # at most 12 leaves
    if words != "mixed":
        order = iter(rng.permutation(12).tolist())
        trees = [_relabel(t, (lambda: 0) if words == "one_word" else (lambda: next(order))) for t in trees]
    f = Forest.from_tuples(trees)
    kinds = len(set(f.words.tolist()))
    assert kinds == {"one_word": 1, "all_distinct": f.leaves}.get(words, kinds) and 4 < f.leaves <= 12
    y = rng.integers(0, 3, f.trees).astype(np.int32)
    p = {k: v.astype(np.float64) for k, v in net.params.items()}
    H, C, want = child_sum_reference(p, f, y)
    np.testing.assert_allclose(net.forward(t=f)["states"], np.concatenate([H, C], axis=1), rtol=1e-4, atol=1e-5)
    loss, grads = net.grad(t=f, y=y)
    assert loss == pytest.approx(want, rel=1e-5)
    for name in ("E", "leaf.w", "leaf.b"):
        v = rng.normal(size=grads[name].shape)
        eps = 1e-5
        fd = (child_sum_reference({**p, name: p[name] + eps * v}, f, y)[2]
              - child_sum_reference({**p, name: p[name] - eps * v}, f, y)[2]) / (2 * eps)
        assert np.sum(grads[name] * v) == pytest.approx(fd, rel=2e-3, abs=1e-6), name


def _relabel(tree, word):
    """The same tree with each leaf's word from word()."""
    return word() if isinstance(tree, int) else tuple(_relabel(k, word) for k in tree)


@pytest.mark.parametrize("leaf, indexed", [("E[n.word]", True),
                                           (TREE_LSTM_LEAF.replace("3 * 8", "8").replace("lstm_state", "tanh")
                                            .replace(", 0)", ")"), True),     # per distinct word, then by index
                                           ("tanh(E[n.word])", False)])
def test_leaves_that_are_rows_of_a_table_are_copied_by_index(leaf, indexed):
    """`tree_map` copies a leaf's row of the table (the embedding, or the states
    of the distinct words) into H itself: no gathered [leaves, d] copy first."""
    from structc.build import build_model
    from structc.syntax import parse
    g = build_model(parse(LEAF_MODEL.replace("LEAF", leaf))).graph
    tm = next(n for n in g.nodes.values() if n.op.name == "tree_map")
    assert tm.attrs.get("indexed", False) is indexed
    leaves, ids = g.nodes[tm.inputs[3]], g.nodes[tm.inputs[6]]
    if indexed:         # the table itself, and one row number per leaf
        assert leaves.op.name != "gather_rows" and ids.type.shape == ("t.leaves",) and ids.type.dtype == "i32"
    else:
        assert leaves.type.shape[0] == "t.leaves"


@pytest.fixture(scope="module")
def child_sum16():
    """The Child-Sum Tree-LSTM over the 16 words `test_trees.forests` draws."""
    return structc.compile(CHILD_SUM_FUSED.replace("vocab=12", "vocab=16").replace("embedding(12", "embedding(16"),
                           cache=False)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(forests())
def test_hypothesis_forests_per_word_match_the_per_node_reference(child_sum16, forest):
    """Single leaves, chains of one word, full trees, mixed arity, up to 500
    nodes: every node's state, the loss and the leaf layer's gradient along a
    random direction, against the reference that computes every leaf itself."""
    net = child_sum16
    y = (np.arange(forest.trees) % 3).astype(np.int32)
    p = {k: v.astype(np.float64) for k, v in net.params.items()}
    H, C, want = child_sum_reference(p, forest, y)
    np.testing.assert_allclose(net.forward(t=forest)["states"], np.concatenate([H, C], axis=1),
                               rtol=1e-4, atol=1e-5)
    loss, grads = net.grad(t=forest, y=y)
    assert loss == pytest.approx(want, rel=1e-5)
    v = np.random.default_rng(forest.nodes).normal(size=grads["leaf.w"].shape)
    eps = 1e-5
    fd = (child_sum_reference({**p, "leaf.w": p["leaf.w"] + eps * v}, forest, y)[2]
          - child_sum_reference({**p, "leaf.w": p["leaf.w"] - eps * v}, forest, y)[2]) / (2 * eps)
    assert np.sum(grads["leaf.w"] * v) == pytest.approx(fd, rel=2e-3, abs=1e-6)


@pytest.mark.parametrize("leaf", ["tanh(dense(E[n.word], 8))", "dense(onehot(n.word, 12), 8)",
                                  "tanh(dense(F[n.word], 8)) * z",
                                  "chunk(lstm_state(dense(E[n.word], 24), 0), 0, 2)"])
def test_a_case_per_word_gives_what_it_gives_per_leaf(leaf, monkeypatch):
    """The loss and every gradient with the rewrite against the same model with
    the leaf case run per leaf, on forests that repeat words."""
    from structc import recursion
    src = LEAF_MODEL.replace("LEAF", leaf)
    rng = np.random.default_rng(5)
    f = Forest.from_tuples([random_tree(rng, int(rng.integers(1, 15)), 5) for _ in range(6)])  # 5 of 12 words
    feed = {"t": f, "y": (np.arange(f.trees) % 3).astype(np.int32)}
    if "F[" in leaf:
        feed.update(F=rng.normal(size=(12, 8)).astype(np.float32), z=rng.normal(size=8).astype(np.float32))
    per_word = structc.compile(src, cache=False, seed=1, training=True)     # both parts before the patch
    monkeypatch.setattr(recursion, "by_distinct_word", lambda mb, decl, value: value)
    per_leaf = structc.compile(src, cache=False, seed=1, training=True)
    assert per_word.meta["forests"][0]["kinds"] and not per_leaf.meta["forests"][0]["kinds"]
    (lw, gw), (ll, gl) = per_word.grad(**feed), per_leaf.grad(**feed)
    assert lw == pytest.approx(ll, rel=1e-6)
    for k in gl:
        np.testing.assert_allclose(gw[k], gl[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_a_training_part_built_otherwise_than_the_forward_is_refused(monkeypatch):
    """The training entries, compiled on the first training call, must lay out
    the arena and the inputs as the forward part did: a part built otherwise
    (here: its leaf case per leaf, where the forward's is per word) is an
    error, not a step on arrays it does not expect."""
    from structc import recursion
    net = structc.compile(LEAF_MODEL.replace("LEAF", "tanh(dense(E[n.word], 8))"), cache=False)
    assert net.meta["deferred"] and net.meta["forests"][0]["kinds"]
    monkeypatch.setattr(recursion, "by_distinct_word", lambda mb, decl, value: value)
    f = Forest.from_tuples([(1, 2), 3])
    with pytest.raises(RuntimeError, match="does not match.*forests"):
        net.grad(t=f, y=np.zeros(2, np.int32))


@pytest.mark.parametrize("dtype", ["i32", "i64"])
def test_leaves_by_index_take_ids_of_either_integer_type(dtype):
    """A leaf case `E[z]` over an integer input of either width (what `gather_rows`
    takes) is copied by index too: native forward, loss and gradients against
    the interpreter, with ids that repeat."""
    from structc.build import build_model
    from structc.syntax import parse
    from test_trees import check_native
    src = f"""model I {{
  input  t: forest of word(vocab=20)
  input  z: {dtype}[t.leaves]
  target y: class[t.trees] of 2
  param  E: embedding(20, 8)
  rec h(n) = leaf: E[z]
             node: tanh(dense(concat(h(n.left), h(n.right)), 8))
  loss cross_entropy(dense(h(t.root), 2), y)
}}"""
    mdef = build_model(parse(src))
    tm = next(n for n in mdef.graph.nodes.values() if n.op.name == "tree_map")
    assert tm.attrs["indexed"]
    rng = np.random.default_rng(1)
    f = Forest.from_tuples([random_tree(rng, int(rng.integers(1, 9)), 20) for _ in range(5)])
    z = rng.integers(0, 6, f.leaves).astype(np.int32 if dtype == "i32" else np.int64)
    check_native(structc.compile(src, cache=False), mdef, f, {"z": z, "y": (np.arange(f.trees) % 2).astype(np.int32)})
