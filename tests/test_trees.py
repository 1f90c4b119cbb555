"""Recursive networks over trees: forests, the language, native code against the
node-by-node interpreter, gradients against float64 finite differences,
hypothesis-drawn forests, no recompilation, the PCA embedding."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import structc
from structc import api
from structc.autodiff import differentiate
from structc.build import build_model
from structc.embeddings import cooccurrence, pca_embedding, pca_embedding_of
from structc.errors import SnetShapeError
from structc.forest import Forest, Vocab, bind_forest
from structc.interp import evaluate
from structc.syntax import parse
from structc.testing import check_model_grads

BINARY = """
model Binary {
  input  t: forest of word(vocab=20)
  target y: class[t.trees] of 3
  param  E: embedding(20, 8)
  rec h(n) = leaf: E[n.word]
             node: tanh(dense(concat(h(n.left), h(n.right)), 8))
  loss cross_entropy(dense(h(t.root), 3), y)
}
"""

# n-ary, mixed arity, per-node labels and outputs, a declared weight used in the node case
NARY = """
model Nary {
  input  t: forest(arity=3) of word(vocab=12)
  target s: class[t.nodes] of 4
  param  E: embedding(12, 6) = normal(0.5)
  param  U: f32[6, 6]
  rec h(n) = leaf: E[n.word] |> tanh
             node: tanh(sum(h(n.children)) @ U + dense(h(n.children[0]), 6, name="first"))
  output states = h(t.nodes)
  loss cross_entropy(dense(h(t.nodes), 4, name="out"), s)
}
"""

# feature vectors at the leaves, one-hot of nothing; mean over children, sigmoid
FEATURES = """
model Features {
  input  t: forest(arity=2) of f32[5]
  target y: class[t.trees] of 2
  rec g(m) = leaf: dense(m.x, 7) |> relu
             node: sigmoid(dense(concat(h2(m), g(m.right)), 7))
  loss cross_entropy(dense(g(t.root), 2), y)
}
"""

ONEHOT = """
model OneHot {
  input  t: forest of word(vocab=9)
  target y: class[t.trees] of 2
  rec h(n) = leaf: onehot(n.word)
             node: tanh(dense(concat(h(n.left), h(n.right)), 9))
  loss cross_entropy(dense(h(t.root), 2), y)
}
"""


def random_tree(rng, leaves, vocab, arity=2):
    if leaves == 1:
        return int(rng.integers(vocab))
    k = int(rng.integers(1, min(arity, leaves) + 1)) if arity > 2 else 2
    if k == 1:
        return (random_tree(rng, leaves, vocab, arity),) if rng.random() < 0.3 else int(rng.integers(vocab))
    cuts = np.sort(rng.choice(np.arange(1, leaves), size=k - 1, replace=False))
    sizes = np.diff(np.concatenate([[0], cuts, [leaves]]))
    return tuple(random_tree(rng, int(s), vocab, arity) for s in sizes)


def compiled(src):
    return structc.compile(src), build_model(parse(src))


def feed_for(mdef, forest, **targets):
    feed = dict(bind_forest("t", forest, mdef.forests[0])[0])
    feed.update(targets)
    return feed


def check_native(net, mdef, forest, targets, rtol=2e-3, atol=2e-5):
    """Native forward, loss and gradients against the interpreter (node by node, float64)."""
    params = {k: v.copy() for k, v in net.params.items()}
    feed = feed_for(mdef, forest, **targets)
    got = net.forward(t=forest, **{k: v for k, v in targets.items() if mdef.inputs[k].kind == "input"})
    want = evaluate(mdef.graph, feed, params, outputs=list(got))
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)
    loss, grads = net.grad(t=forest, **targets)
    ref = evaluate(differentiate(mdef.graph), feed, params)
    assert loss == pytest.approx(float(ref["loss"]), rel=1e-4, abs=1e-6)
    for k in grads:
        np.testing.assert_allclose(grads[k], ref[f"grad:{k}"], rtol=rtol, atol=atol, err_msg=k)


# -- forests ------------------------------------------------------------------

def test_brackets_tuples_and_arrays_agree():
    vocab = {"good": 0, "movie": 1, "a": 2}
    f = Forest.from_brackets(["(3 (2 good) (2 movie))", "(1 (0 a) (4 (2 good) (1 movie)))"], vocab)
    assert (f.trees, f.nodes, f.leaves, f.levels) == (2, 8, 5, 3)
    assert f.root_labels.tolist() == [3, 1]
    g = Forest.from_tuples([("good", "movie"), ("a", ("good", "movie"))], vocab)
    for k in ("children", "words", "roots", "level_end"):
        assert np.array_equal(getattr(f, k), getattr(g, k)), k
    # children before parents, any numbering
    a = Forest.from_arrays([[-1, -1], [-1, -1], [0, 1]], words=[0, 1, -1])
    assert a.children[a.roots[0]].tolist() == [0, 1] and a.words.tolist() == [0, 1]


def _bracketed(rng, depth: int) -> str:
    """A random tree in treebank form: labels optional, leaves bare or labelled, 1-4 children."""
    label = f"{int(rng.integers(5))} " if rng.random() < 0.7 else ""
    if depth == 0 or rng.random() < 0.3:
        word = f"w{int(rng.integers(6))}"
        return f"({label}{word})" if label and rng.random() < 0.5 else word
    kids = " ".join(_bracketed(rng, depth - 1) for _ in range(int(rng.integers(1, 5))))
    return f"({label}{kids})"


def _same_forest(a: Forest, b: Forest) -> None:
    for k in Forest.__slots__:
        x, y = getattr(a, k), getattr(b, k)
        if k == "_bound":
            continue
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert x is not None and y is not None and x.dtype == y.dtype and np.array_equal(x, y), k
            assert not y.flags.writeable, k
        else:
            assert x == y, k


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(1, 12))
def test_each_from_brackets_is_from_brackets_of_each(seed, count):
    """Parsed together, each string gives the very forest it gives alone (a data set's
    lines are parsed this way), concatenated and pickled alike."""
    import pickle
    rng = np.random.default_rng(seed)
    vocab = Vocab.build([f"w{k}" for k in range(6)])
    texts = []
    for _ in range(count):
        trees = [_bracketed(rng, int(rng.integers(0, 5))) for _ in range(int(rng.integers(1, 3)))]
        texts.append(" ".join(t if t.startswith("(") else f"({t})" for t in trees))
    each = Forest.each_from_brackets(texts, vocab)
    alone = [Forest.from_brackets(t, vocab) for t in texts]
    for a, b in zip(alone, each, strict=True):
        _same_forest(a, b)
    _same_forest(Forest.concat(alone), Forest.concat(each))
    _same_forest(pickle.loads(pickle.dumps(each[-1])), alone[-1])


def test_each_from_brackets_names_the_bad_string():
    vocab = {"a": 0}
    assert Forest.each_from_brackets([], vocab) == []
    with pytest.raises(ValueError, match=r"tree 2: unbalanced brackets"):
        Forest.each_from_brackets(["(1 a)", "(0 a a)", "(1 (2 a)"], vocab)
    with pytest.raises(ValueError, match=r"tree 1: a forest needs at least one tree"):
        Forest.each_from_brackets(["(1 a)", "  "], vocab)
    with pytest.raises(ValueError, match=r"tree 0: expected a bracketed string"):
        Forest.each_from_brackets([("a", "a")], vocab)


def test_concat_equals_building_at_once():
    rng = np.random.default_rng(0)
    trees = [random_tree(rng, int(rng.integers(1, 9)), 7, arity=3) for _ in range(12)]
    whole = Forest.from_tuples(trees)
    parts = Forest.concat([Forest.from_tuples(trees[:5]), Forest.from_tuples(trees[5:6]), Forest.from_tuples(trees[6:])])
    for k in ("children", "words", "roots", "level_end", "height"):
        assert np.array_equal(getattr(whole, k), getattr(parts, k)), k


def test_schedule_invariants():
    rng = np.random.default_rng(1)
    f = Forest.from_tuples([random_tree(rng, int(rng.integers(1, 30)), 5, arity=3) for _ in range(20)])
    start = np.concatenate([[0], f.level_end[:-1]])
    for lv, (lo, hi) in enumerate(zip(start, f.level_end)):
        assert (f.height[lo:hi] == lv).all()
        kids = f.children[lo:hi]
        assert (kids[kids >= 0] < lo).all(), "children come from lower levels"
    assert (f.children[: f.leaves] == -1).all()


@pytest.mark.parametrize("build, message", [
    (lambda: Forest.from_arrays([[1], [-1]], words=[0, 0]), "does not come before its parent"),
    (lambda: Forest.from_arrays([[-1], [0], [0]], words=[0, 0, 0]), "more than one parent"),
    (lambda: Forest.from_arrays([[-1, -1], [0, 7]], words=[0, 0]), "out of range"),
    (lambda: Forest.from_arrays([[-1], [-1]], words=[0, -3]), "word id -3"),
    (lambda: Forest.from_arrays(np.zeros((0, 2), int), words=[]), "at least one node"),
    (lambda: Forest.from_arrays([[-1, -1, -1]], words=[0], arity=2), "more than the arity"),
    (lambda: Forest.from_brackets("(1 (2 a) (3 b)", {"a": 0, "b": 1}), "unbalanced"),
    (lambda: Forest.from_brackets("(1 (2 a)))", {"a": 0}), "unbalanced"),
    (lambda: Forest.from_brackets("(1 (2 zebra))", {"a": 0}), "not in the vocabulary"),
    (lambda: Forest.from_brackets("(1 ())", {"a": 0}), "empty brackets"),
    (lambda: Forest.from_tuples([(0, 1, 2)], arity=2), "the arity is 2"),
    (lambda: Forest.from_tuples([()]), "non-empty tuple"),
    # feature leaves are checked as from_arrays checks them (1e300 is infinite in float32)
    (lambda: Forest.from_arrays([[-1], [0]], features=[[np.nan], [0.0]]), "leaf features must be finite"),
    (lambda: Forest.from_tuples([(np.zeros(2), (np.array([1.0, np.nan]),))]), "tree 0: leaf features must be finite"),
    (lambda: Forest.from_tuples([np.ones(2), (np.zeros(2), np.array([np.inf, 0]))]), "tree 1: leaf features must"),
    (lambda: Forest.from_tuples([np.array([1e300, 0.0])]), "tree 0: leaf features must be finite"),
    (lambda: _cyclic(), "a cycle"),
])
def test_bad_forests_raise_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def _cyclic():
    node = [1, 2]
    node.append(node)
    return Forest.from_tuples([node])


def test_forest_arrays_are_read_only():
    f = Forest.from_tuples([(0, 1)])
    with pytest.raises(ValueError):
        f.children[0, 0] = 5


# -- the compiled models against the interpreter ------------------------------

@pytest.fixture(scope="module")
def binary():
    return compiled(BINARY)


def test_binary_matches_interpreter(binary):
    net, mdef = binary
    rng = np.random.default_rng(2)
    trees = [random_tree(rng, int(rng.integers(1, 12)), 20) for _ in range(9)]
    check_native(net, mdef, Forest.from_tuples(trees), {"y": rng.integers(0, 3, 9).astype(np.int32)})


@pytest.mark.slow
def test_nary_per_node_matches_interpreter():
    net, mdef = compiled(NARY)
    rng = np.random.default_rng(3)
    trees = [random_tree(rng, int(rng.integers(1, 10)), 12, arity=3) for _ in range(7)]
    f = Forest.from_tuples(trees)
    assert f.arity == 3 and (f.children[f.leaves:] < 0).any(), "mixed arity"
    check_native(net, mdef, f, {"s": rng.integers(0, 4, f.nodes).astype(np.int32)})


@pytest.mark.slow
def test_features_and_onehot_match_interpreter():
    src = FEATURES.replace("h2(m)", "g(m.left)")
    net, mdef = compiled(src)
    rng = np.random.default_rng(4)
    trees = [random_tree(rng, int(rng.integers(1, 8)), 1) for _ in range(5)]
    trees = [_features(t, rng) for t in trees]
    check_native(net, mdef, Forest.from_tuples(trees), {"y": rng.integers(0, 2, 5).astype(np.int32)})
    net, mdef = compiled(ONEHOT)
    trees = [random_tree(rng, int(rng.integers(1, 8)), 9) for _ in range(6)]
    check_native(net, mdef, Forest.from_tuples(trees), {"y": rng.integers(0, 2, 6).astype(np.int32)})


def _features(t, rng):
    if isinstance(t, int):
        return rng.normal(size=5).astype(np.float32)
    return tuple(_features(c, rng) for c in t)


VARIANT = """
model V {
  input  t: forest(arity=3) of word(vocab=10)
  target y: class[t.trees] of 2
  param  E: embedding(10, 5)
  param  v: f32[5]
  rec h(n) = leaf: LEAF
             node: NODE
  MORE
  loss cross_entropy(dense(OUT, 2), y)
}"""


@pytest.mark.parametrize("leaf, node, more, out", [
    ("E[n.word]", "relu(dense(sum(h(n.children)), 5)) + v", "", "h(t.root)"),
    ("E[n.word]", "softmax(dense(h(n.left), 5)) * sigmoid(h(n.children[2]))", "", "h(t.root)"),
    ("E[n.word] * 2.0 - 1.0", "maximum(h(n.left), h(n.right)) / (1.0 + square(h(n.children[2])))", "", "h(t.root)"),
    # a leaf case that reads no forest array: t.leaves must still be bound
    ("v", "tanh(dense(concat(h(n.right), h(n.left), h(n.children[2])), 5))", "", "h(t.root)"),
    # two recursions over one forest
    ("E[n.word]", "tanh(dense(concat(h(n.children)), 5))",
     "rec g(m) = leaf: E[m.word] |> sigmoid  node: g(m.left) * 0.5 + g(m.right) * v",
     "concat(h(t.root), g(t.root), axis=1)"),
], ids=["sum-relu", "softmax-sigmoid", "maximum-div", "param-leaf", "two-recs"])
@pytest.mark.slow
def test_node_case_variants_match_interpreter(leaf, node, more, out):
    src = VARIANT.replace("LEAF", leaf).replace("NODE", node).replace("MORE", more).replace("OUT", out)
    net, mdef = compiled(src)
    rng = np.random.default_rng(9)
    f = Forest.from_tuples([random_tree(rng, int(rng.integers(1, 12)), 10, arity=3) for _ in range(9)])
    check_native(net, mdef, f, {"y": (np.arange(9) % 2).astype(np.int32)})


@pytest.mark.parametrize("src", [BINARY, NARY], ids=["binary", "nary"])
def test_gradients_match_finite_differences(src):
    mdef = build_model(parse(src))
    rng = np.random.default_rng(5)
    arity = mdef.forests[0]["arity"]
    vocab = mdef.forests[0]["vocab"]
    f = Forest.from_tuples([random_tree(rng, int(rng.integers(1, 7)), vocab, arity) for _ in range(4)])
    targets = {"y": rng.integers(0, 3, f.trees).astype(np.int32)} if "y" in mdef.inputs else \
        {"s": rng.integers(0, 4, f.nodes).astype(np.int32)}
    from structc.init import initialize
    params = {p.name: initialize(p.init, p.type.shape, rng).astype(np.float64) + 0.1 * rng.normal(size=p.type.shape)
              for p in mdef.params.values()}
    check_model_grads(mdef, feed_for(mdef, f, **targets), params)


def _numbered_forest(rng, leaves, vocab=12, arity=3):
    """Trees as `from_arrays` takes them: (children, words), nodes numbered children
    before parents but otherwise shuffled (not in schedule order), slots with gaps."""
    children, words, free = [], [], []
    for _ in range(leaves):
        free.append(len(children))
        children.append([-1] * arity)
        words.append(int(rng.integers(vocab)))
        if len(free) > 1 and rng.random() < 0.5:
            k = int(rng.integers(1, min(arity, len(free)) + 1))
            kids = [free.pop(int(rng.integers(len(free)))) for _ in range(k)]
            row = [-1] * arity
            for slot, kid in zip(sorted(rng.choice(arity, k, replace=False)), kids):
                row[slot] = kid
            free.append(len(children))
            children.append(row)
            words.append(int(rng.integers(vocab)))
    return np.array(children), np.array(words)


def test_index_puts_per_node_outputs_in_the_nodes_given_order():
    """h(t.nodes) is in schedule order; `f.index[i]` is the row of node i as the
    forest was given: from_arrays' rows, and for a concat (or a pool's batch) of
    such forests the parts' rows one after the other, a batch of one included:
    the very forest from_arrays makes of the stacked arrays. Against a numpy
    reference node by node in that order."""
    from structc.forest import ForestPool
    net = structc.compile(NARY)
    p = {k: v.astype(np.float64) for k, v in net.params.items()}

    def reference(children, words):
        h = np.zeros((len(children), 6))
        for i, kids in enumerate(children):
            if (kids < 0).all():
                h[i] = np.tanh(p["E"][words[i]])
            else:
                first = h[kids[0]] if kids[0] >= 0 else np.zeros(6)
                h[i] = np.tanh(h[kids[kids >= 0]].sum(axis=0) @ p["U"] + first @ p["first.w"] + p["first.b"])
        return h

    rng = np.random.default_rng(4)
    given = [_numbered_forest(rng, k) for k in (3, 1, 6, 2)]
    parts = [Forest.from_arrays(c, w) for c, w in given]
    off = np.cumsum([0] + [len(c) for c, _ in given])
    stacked = (np.concatenate([np.where(c >= 0, c + o, -1) for (c, _), o in zip(given, off)]),
               np.concatenate([w for _, w in given]))
    whole = Forest.from_arrays(*stacked)
    pool = ForestPool(parts)
    for items in ([0, 1, 2, 3], [2], [3, 3, 0]):
        children = [c for k in items for c in [given[k][0]]]
        at = np.cumsum([0] + [len(c) for c in children])
        want = reference(np.concatenate([np.where(c >= 0, c + o, -1) for c, o in zip(children, at)]),
                         np.concatenate([given[k][1] for k in items]))
        for f in (Forest.concat([parts[k] for k in items]), pool.take(items)):
            np.testing.assert_allclose(net(t=f)[f.index], want, rtol=1e-5, atol=1e-6)
    united = Forest.concat(parts)
    for field in ("children", "words", "roots", "level_end", "index"):
        np.testing.assert_array_equal(getattr(united, field), getattr(whole, field), err_msg=field)
    nested = Forest.concat([Forest.concat(parts[:2]), Forest.concat(parts[2:])])
    np.testing.assert_array_equal(nested.index, whole.index)


def test_tuples_number_their_nodes_as_brackets_do():
    """from_tuples and from_brackets of the same trees give the same forest, `index`
    too: nodes numbered children first (each tree's nodes as their brackets close),
    tree after tree."""
    vocab = {"a": 0, "b": 1, "c": 2, "d": 3}
    tuples = Forest.from_tuples([("a", ("b", "c")), "d", (("a", "b"), "c", "d")], vocab)
    brackets = Forest.from_brackets(["(a (b c))", "(d)", "((a b) c d)"], vocab)
    for field in ("children", "words", "roots", "level_end", "tree_of", "index"):
        np.testing.assert_array_equal(getattr(tuples, field), getattr(brackets, field), err_msg=field)
    # node 0 is the first tree's first leaf, the last node the last tree's root
    assert tuples.index[0] == 0 and tuples.index[-1] == tuples.roots[-1]


# -- hypothesis: single leaves, long chains, full trees, mixed arity, 1..500 nodes --

HYP = """
model Hyp {
  input  t: forest(arity=3) of word(vocab=16)
  target y: class[t.trees] of 2
  param  E: embedding(16, 4) = normal(0.5)
  rec h(n) = leaf: E[n.word]
             node: tanh(dense(concat(h(n.children)), 4))
  output states = h(t.nodes)
  loss cross_entropy(dense(h(t.root), 2), y)
}
"""


def chain(length, word):
    t = word
    for _ in range(length - 1):
        t = (t,)
    return t


def full(depth, rng):
    if depth == 0:
        return int(rng.integers(16))
    return (full(depth - 1, rng), full(depth - 1, rng))


@st.composite
def forests(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    kind = draw(st.sampled_from(["single", "chain", "full", "mixed", "big"]))
    if kind == "single":
        trees = [int(rng.integers(16)) for _ in range(draw(st.integers(1, 4)))]
    elif kind == "chain":
        trees = [chain(draw(st.integers(1, 120)), 3) for _ in range(draw(st.integers(1, 3)))]
    elif kind == "full":
        trees = [full(draw(st.integers(0, 6)), rng) for _ in range(draw(st.integers(1, 3)))]
    elif kind == "mixed":
        trees = [random_tree(rng, int(rng.integers(1, 20)), 16, arity=3) for _ in range(draw(st.integers(1, 8)))]
    else:   # one large tree: up to 500 nodes
        trees = [random_tree(rng, 200, 16, arity=3)]
    f = Forest.from_tuples(trees)
    assert 1 <= f.nodes <= 500
    return f


@pytest.fixture(scope="module")
def hyp():
    return compiled(HYP)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@pytest.mark.slow
@given(forests())
def test_hypothesis_forests_match_interpreter(hyp, forest):
    net, mdef = hyp
    y = (np.arange(forest.trees) % 2).astype(np.int32)
    check_native(net, mdef, forest, {"y": y})


# -- one compilation for every shape; checks at the boundary --------------------

@pytest.mark.slow
def test_no_recompilation_across_shapes():
    before = api.COMPILE_COUNT
    net = structc.compile(BINARY.replace("Binary", "Once"), cache=False, training=True)   # both parts, once
    assert api.COMPILE_COUNT == before + 1
    rng = np.random.default_rng(6)
    for n_trees, leaves in [(1, 1), (3, 40), (32, 25), (5, 2), (64, 7)]:
        f = Forest.from_tuples([random_tree(rng, leaves, 20) for _ in range(n_trees)])
        y = rng.integers(0, 3, n_trees).astype(np.int32)
        assert net(t=f).shape == (n_trees, 3)
        assert np.isfinite(net.train_step(t=f, y=y, lr=0.1))
        net.train_step(t=["(1 (2 3) (4 5))", "(6 (7 8))"], y=np.array([0, 1]), lr=0.1)   # strings, unary node
    assert api.COMPILE_COUNT == before + 1


@pytest.mark.parametrize("value, error, message", [
    (Forest.from_tuples([(1, 2, 3)]), ValueError, "declares arity 2"),
    (Forest.from_tuples([(1, 25)]), ValueError, r"word id 25, out of range \[0, 20\)"),
    (Forest.from_tuples([(np.zeros(3), np.ones(3))]), ValueError, "expects word ids"),
    ("(1 (2 3)", ValueError, "unbalanced"),
    (42, TypeError, "expected a Forest"),
])
def test_bad_forest_inputs_are_rejected(binary, value, error, message):
    net, _ = binary
    with pytest.raises(error, match=message):
        net(t=value)


def test_label_count_must_match_trees(binary):
    net, _ = binary
    with pytest.raises(ValueError, match="t.trees = 2 from the other inputs, got 3"):
        net.grad(t=Forest.from_tuples([(1, 2), 3]), y=np.array([0, 1, 2]))


def test_training_learns_a_tree_function():
    """Root label = parity of the number of 1-words: needs the whole tree."""
    net = structc.compile(BINARY, seed=1)
    net.set_optimizer("adam")
    rng = np.random.default_rng(7)
    trees = [random_tree(rng, int(rng.integers(2, 6)), 2) for _ in range(256)]
    labels = np.array([_count(t) % 2 for t in trees], np.int32)
    f = Forest.from_tuples(trees)
    for _ in range(150):
        net.train_step(t=f, y=labels, lr=0.02)
    acc = np.mean(np.argmax(net(t=f), axis=1) == labels)
    assert acc > 0.9, acc


def _count(t):
    return t if isinstance(t, int) else sum(_count(c) for c in t)


# -- the PCA embedding -----------------------------------------------------------

def test_cooccurrence_counts_a_window():
    K, vocab = cooccurrence([["a", "b", "c", "a"]], window=2)
    i = vocab
    assert K[i["a"], i["b"]] == 2 and K[i["b"], i["a"]] == 2      # a-b at distance 1 and 2
    assert K[i["a"], i["c"]] == 2 and K[i["b"], i["c"]] == 1
    assert K[i["a"], i["a"]] == 0 and np.array_equal(K, K.T)
    K1, _ = cooccurrence([["a", "b", "c", "a"]], vocab, window=1)
    assert K1[i["a"], i["c"]] == 1


def test_pca_embedding_against_an_eigendecomposition():
    rng = np.random.default_rng(8)
    words = [f"w{k}" for k in range(30)]
    corpus = [[words[int(j)] for j in rng.zipf(1.5, size=40) % 30] for _ in range(200)]
    K, vocab = cooccurrence(corpus, window=3)
    E = pca_embedding(corpus, vocab, d=5, window=3)
    lam, U = np.linalg.eig(K)                       # the general solver, not the helper's eigh
    top = np.argsort(lam.real)[::-1][:5]
    lam, U = lam.real[top], U.real[:, top]
    U /= np.linalg.norm(U, axis=0)
    want = U * np.sqrt(np.maximum(lam, 0))
    np.testing.assert_allclose(np.abs(E), np.abs(want), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(E @ E.T, want @ want.T, rtol=1e-3, atol=1e-2)
    with pytest.raises(ValueError):
        pca_embedding_of(np.array([[0.0, 1.0], [2.0, 0.0]]), 1)


def test_pca_embedding_initialises_a_learned_table():
    corpus = [["0", "1", "2"], ["1", "2", "3"], ["2", "3", "4"]] * 5
    E = pca_embedding(corpus, {str(k): k for k in range(20)}, d=8)
    net = structc.compile(BINARY)
    net.params["E"][...] = E
    f = Forest.from_tuples([(1, 2)])
    assert np.isfinite(net(t=f)).all()
    assert isinstance(Vocab.build(list("abca")), dict) and Vocab.build(list("abca")) == {"a": 0, "b": 1, "c": 2}


@pytest.mark.parametrize("text", ["good movie", b"good movie"])
def test_a_vocabulary_of_one_string_is_refused(text):
    # iterated, "good movie" gave a vocabulary of its letters: {'g': 0, 'o': 1, 'd': 2, ' ': 3, ...}
    with pytest.raises(TypeError, match=r"list of words.*text\.split\(\)"):
        Vocab.build(text)
    assert Vocab.build("good movie".split()) == {"good": 0, "movie": 1}


def test_a_copied_vocabulary_keeps_its_unknown_word():
    vocab = Vocab.build(["a", "b"], unk="<unk>")
    copy = vocab.copy()
    assert isinstance(copy, Vocab) and copy == vocab and copy.unk == 2
    copy["c"] = 3
    assert "c" not in vocab
    assert sorted(Forest.from_brackets("(1 a zzz)", copy).words.tolist()) == [0, 2]


def test_a_vocabulary_made_from_another_keeps_its_unknown_word():
    # Vocab(v) gave unk None: 'zzz' was refused (with advice to add the unknown word it has);
    # v | more and pickling likewise
    import copy
    import pickle
    vocab = Vocab.build(["a", "b"], unk="<unk>")
    for made in (Vocab(vocab), vocab | {"c": 3}, pickle.loads(pickle.dumps(vocab)), copy.deepcopy(vocab)):
        assert isinstance(made, Vocab) and made.unk == 2
        assert Forest.from_brackets("(1 a zzz)", made).words.tolist() == [0, 2]
    assert Vocab({"a": 0}).unk is None and Vocab(a=0) == {"a": 0}


def test_building_a_vocabulary_from_a_vocabulary_is_refused():
    # Vocab.build numbered a mapping's words anew in its order: {'b': 1, 'a': 0} came out {'b': 0, 'a': 1}
    with pytest.raises(TypeError, match=r"already maps words to ids: Vocab\(it\) keeps its ids"):
        Vocab.build({"b": 1, "a": 0})


def test_a_vocabularys_numbering_keeps_its_unknown_word():
    vocab = Vocab.build(["b", "a"], unk="<unk>")
    assert vocab.numbering() == {"words": ["b", "a", "<unk>"], "unk": 2}
    again = Vocab.from_numbering(vocab.numbering())
    assert again == vocab and again.unk == 2
    assert Vocab.from_numbering({"words": ["x"]}).unk is None


# -- the example: structc train on the shipped tree data -----------------------

@pytest.mark.slow
def test_logic_example_trains_well_above_chance(tmp_path, capsys):
    from pathlib import Path

    from structc.cli import main
    example = Path(__file__).parent.parent / "examples" / "logic_tree.snet"
    out = tmp_path / "logic.npz"
    assert main(["train", str(example), "--data", "logic", "--optimizer", "adam", "--lr", "0.003",
                 "--epochs", "3", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    accuracy = float(text.strip().splitlines()[-1].rsplit(" ", 1)[-1].rstrip("%"))
    assert accuracy >= 95.0, text          # chance: 50%


@pytest.mark.slow
def test_logic_data_set_is_balanced_and_disjoint():
    from structc.treedata import load_logic
    d = load_logic()
    assert len(d.train) == 6000 and len(d.test) == 2000
    roots = np.array([int(f.root_labels[0]) for f in d.test])
    assert abs(roots.mean() - 0.5) < 0.03
    key = lambda f: (f.children.tobytes(), f.words.tobytes())   # noqa: E731
    assert not {key(f) for f in d.train} & {key(f) for f in d.test}


@pytest.mark.slow
def test_fixed_embedding_is_an_input_table():
    """A fixed (say PCA) embedding: declared an input, passed with every call, never trained."""
    src = """
    model Fixed {
      input  t: forest of word(vocab=20)
      input  E: f32[20, 8]
      target y: class[t.trees] of 2
      rec h(n) = leaf: E[n.word]
                 node: tanh(dense(concat(h(n.left), h(n.right)), 8))
      loss cross_entropy(dense(h(t.root), 2), y)
    }"""
    corpus = [[str(k), str((k + 1) % 20), str((k + 3) % 20)] for k in range(20)] * 3
    E = pca_embedding(corpus, {str(k): k for k in range(20)}, d=8)
    net, mdef = compiled(src)
    rng = np.random.default_rng(10)
    f = Forest.from_tuples([random_tree(rng, int(rng.integers(1, 8)), 20) for _ in range(6)])
    y = (np.arange(6) % 2).astype(np.int32)
    check_native(net, mdef, f, {"E": E, "y": y})
    assert "E" not in net.params
    before = E.copy()
    net.train_step(t=f, E=E, y=y, lr=0.5)
    assert np.array_equal(E, before)


def test_a_long_chain_from_arrays_is_linear_time():
    n = 20000
    ch = np.full((n, 1), -1)
    ch[1:, 0] = np.arange(n - 1)
    f = Forest.from_arrays(ch, words=np.zeros(n, int))
    assert (f.trees, f.leaves, f.levels) == (1, 1, n)


# -- vocabularies, integer ranges, forests that stay checked ---------------------------

def test_a_net_carries_its_vocabulary(binary):
    net, _ = binary
    vocab = Vocab.build(["good", "movie", "bad", "plot"])
    text = ["(1 (2 good) (2 movie))", "(0 (0 bad) plot)"]
    by_ids = net(t=Forest.from_brackets(text, vocab))
    with pytest.raises(ValueError, match="set net.vocab"):
        net(t=text)
    net.vocab = vocab
    try:
        np.testing.assert_array_equal(net(t=text), by_ids)
        np.testing.assert_array_equal(net(t=[("good", "movie"), ("bad", "plot")]), by_ids)
        with pytest.raises(ValueError, match="'zebra' is not in the vocabulary"):
            net(t="(1 good zebra)")
    finally:
        net.vocab = None
    with pytest.raises(ValueError, match="outside \\[0, 20\\)"):
        net.vocab = {"good": 25}
    with pytest.raises(TypeError, match="keys are words"):
        net.vocab = {3: 1}
    same = structc.compile(BINARY, vocab=vocab)
    net_params = {k: v.copy() for k, v in net.params.items()}
    for k, v in net_params.items():
        same.params[k] = v
    np.testing.assert_array_equal(same(t=text), by_ids)


def test_unknown_words_map_to_an_explicit_unk_id():
    vocab = Vocab.build(["a", "b"], unk="<unk>")
    assert vocab == {"a": 0, "b": 1, "<unk>": 2} and vocab.unk == 2
    f = Forest.from_brackets("(1 a zzz)", vocab)
    assert sorted(f.words.tolist()) == [0, 2]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Forest.from_brackets("(1 a zzz)", Vocab.build(["a"]))


@pytest.mark.parametrize("vocab", [{"a": 1.7, "b": 0}, {"a": "1", "b": 0}, {"a": True, "b": 0}])
def test_a_vocabularys_ids_are_integers(vocab):
    """1.7 was read as id 1, "1" and True as 1: the leaf took another word's row."""
    with pytest.raises(ValueError, match="'a' has id"):
        Forest.from_brackets("(1 a b)", vocab)
    with pytest.raises(ValueError, match="'a' has id"):
        Forest.from_tuples(("a", "b"), vocab)


@pytest.mark.parametrize("text", ["(1 \u00b2)", "(\u00b2 (1 a) (1 a))", "(--3 1 2)"])
def test_numbers_in_brackets_are_ascii_digits(text):
    """'²' passed str.isdigit() and then failed int() ("invalid literal"), as did '--3'."""
    with pytest.raises(ValueError, match="is not a number"):
        Forest.from_brackets(text)


def test_a_word_in_another_unicode_form_or_case_is_named_as_such():
    import unicodedata
    nfc, nfd = (unicodedata.normalize(form, "caf\u00e9") for form in ("NFC", "NFD"))
    with pytest.raises(ValueError, match="another Unicode form"):
        Forest.from_brackets(f"(1 {nfd})", Vocab.build([nfc]))
    with pytest.raises(ValueError, match="another case"):
        Forest.from_brackets("(1 Good)", Vocab.build(["good"]))


@pytest.mark.parametrize("build, message", [
    (lambda: Forest.from_arrays([[-1], [-1], [0]], words=[2**32 + 3, 1, 0]), "word id 4294967299"),
    (lambda: Forest.from_arrays([[-1], [-1], [0]], words=np.array([2**63 + 1, 1, 0], np.uint64)),
     "out of range"),
    (lambda: Forest.from_arrays([[-1], [0]], words=[1, 0], labels=[2**32 + 1, 0]), "out of range"),
    (lambda: Forest.from_arrays(np.array([[2**64 - 1], [0]], np.uint64), words=[1, 0]), "out of range"),
    (lambda: Forest.from_tuples([(2**32 + 3, 1)]), "out of range"),
    (lambda: Forest.from_tuples([(2**70, 1)]), "out of range"),
    (lambda: Forest.from_brackets("(1 4294967299 2)"), "out of range"),
    (lambda: Forest.from_brackets("(4294967297 (2 a) (1 b))", {"a": 0, "b": 1}), "label 4294967297"),
    (lambda: Forest.from_brackets("(1 a b)", {"a": 2**40, "b": 1}), "out of range"),
])
def test_integers_are_never_truncated(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_a_forest_stays_as_checked(binary):
    net, _ = binary
    f = Forest.from_tuples([(1, 2), (3, (4, 5))])
    for name in ("children", "words", "roots", "level_end"):
        arr = getattr(f, name)
        with pytest.raises(ValueError):
            arr.flags.writeable = True
        with pytest.raises(ValueError):
            arr.base.flags.writeable = True
    with pytest.raises(AttributeError, match="immutable"):
        f.children = np.full((5, 2), 10**6, np.int32)
    with pytest.raises(AttributeError, match="immutable"):
        f.max_word = 0
    padded = bind_forest("t", Forest.from_tuples([1, 2]), {"arity": 2, "vocab": 20})[0]["t.children"]
    with pytest.raises(ValueError):
        padded.flags.writeable = True
    assert net(t=f).shape == (2, 3)


# -- issue 9 item 8: values of parameters alone inside the node case ------------------

TRANSPOSED = """
model T {
  input  t: forest of word(vocab=7)
  target y: class[t.trees] of 2
  param  E: embedding(7, 4) = normal(0.5)
  param  W: f32[4, 8]
  param  b: f32[4]
  rec h(n) = leaf: E[n.word]
             node: tanh(concat(h(n.left), h(n.right)) @ WEIGHT + b)
  loss cross_entropy(dense(h(t.root), 2), y)
}
"""


def test_node_case_may_compute_on_parameters_alone():
    """transpose(W) touches no node: it is computed once, and the model is the
    one with the transposed weight declared as a parameter."""
    hoisted, mdef = compiled(TRANSPOSED.replace("WEIGHT", "transpose(W) * 1.5"))
    plain, _ = compiled(TRANSPOSED.replace("WEIGHT", "W").replace("f32[4, 8]", "f32[8, 4]"))
    rng = np.random.default_rng(3)
    f = Forest.from_tuples([random_tree(rng, int(rng.integers(1, 10)), 7) for _ in range(6)])
    y = (np.arange(6) % 2).astype(np.int32)
    check_native(hoisted, mdef, f, {"y": y})
    w = rng.normal(size=(4, 8)).astype(np.float32) * 0.5
    for name in ("E", "b", "dense1.w", "dense1.b"):
        plain.params[name][...] = hoisted.params[name]
    hoisted.params["W"][...] = w
    plain.params["W"][...] = 1.5 * w.T
    loss_h, grads_h = hoisted.grad(t=f, y=y)
    loss_p, grads_p = plain.grad(t=f, y=y)
    assert loss_h == pytest.approx(loss_p, rel=1e-5)
    np.testing.assert_allclose(grads_h["W"], 1.5 * grads_p["W"].T, rtol=1e-4, atol=1e-6)
    for name in ("E", "b", "dense1.w"):
        np.testing.assert_allclose(grads_h[name], grads_p[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("node, what", [
    ("h(n.left) @ (transpose(h(n.right)) @ h(n.left))", "transpose"),
    ("h(n.left) * sum(h(n.right))", "sum"),
])
def test_node_case_that_mixes_nodes_is_still_refused(node, what):
    src = TRANSPOSED.replace("tanh(concat(h(n.left), h(n.right)) @ WEIGHT + b)", node)
    with pytest.raises(SnetShapeError, match=f"{what} here mixes nodes"):
        build_model(parse(src))
