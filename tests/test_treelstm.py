"""Gated recursion over trees: a word or vector at every node, several states
per node, per-child terms, the Child-Sum Tree-LSTM against a per-node numpy
reference, native code against the interpreter, no recompilation."""
import numpy as np
import pytest

import structc
from structc.errors import SnetTypeError
from structc.forest import Forest
from tests.test_trees import check_native, compiled, random_tree

# inner nodes carry words: the node case reads its own (n.word), the embedding's
# gradient gets the inner nodes' rows too
INNER_WORDS = """
model InnerWords {
  input  t: forest(arity=3, inner=true) of word(vocab=7)
  target y: class[t.trees] of 2
  param  E: embedding(7, 5) = normal(0.5)
  rec h(n) = leaf: E[n.word]
             node: tanh(dense(concat(h(n.children)), 5) + E[n.word] * 0.7)
  loss cross_entropy(dense(h(t.root), 2), y)
}
"""

INNER_FEATURES = """
model InnerFeatures {
  input  t: forest(arity=2, inner=true) of f32[4]
  target s: class[t.nodes] of 3
  rec h(n) = leaf: dense(n.x, 6, name="in") |> tanh
             node: tanh(dense(sum(h(n.children)), 6, name="rec") + dense(n.x, 6, name="own") * sigmoid(n.x |> dense(6, name="gate")))
  loss cross_entropy(dense(h(t.nodes), 3), s)
}
"""


def inner_forest(rng, trees, vocab=7, arity=3, features=None):
    """Random trees (mixed arity) with a payload at every node, via from_arrays."""
    f = Forest.from_tuples([random_tree(rng, int(rng.integers(1, 9)), vocab, arity) for _ in range(trees)])
    n = f.nodes
    if features:
        return Forest.from_arrays(f.children, features=rng.normal(size=(n, features)), inner=True)
    return Forest.from_arrays(f.children, words=rng.integers(0, vocab, n), inner=True)


def test_inner_words_reach_the_node_case_and_the_embedding_gradient():
    rng = np.random.default_rng(0)
    net, mdef = compiled(INNER_WORDS)
    f = inner_forest(rng, 6)
    check_native(net, mdef, f, {"y": rng.integers(0, 2, f.trees).astype(np.int32)})
    # an inner node's word changes the result: it is read, not ignored
    words = np.array(f.node_words)
    inner = np.arange(f.leaves, f.nodes)
    words[inner] = (words[inner] + 1) % 7
    g = Forest.from_arrays(f.children, words=words, inner=True)
    assert not np.allclose(net(t=f), net(t=g))


def test_inner_words_by_hand():
    """One tree (a (b c)), every node a word: the state computed by hand in numpy."""
    net, _ = compiled(INNER_WORDS)
    f = Forest.from_arrays(np.array([[-1, -1, -1], [-1, -1, -1], [0, 1, -1]]), words=[3, 4, 5], inner=True)
    p = {k: v.astype(np.float64) for k, v in net.params.items()}
    E = p["E"]
    h = np.tanh(np.concatenate([E[3], E[4], np.zeros(5)]) @ p["dense1.w"] + p["dense1.b"] + 0.7 * E[5])
    probs = np.exp(h @ p["dense2.w"] + p["dense2.b"])
    np.testing.assert_allclose(net(t=f)[0], probs / probs.sum(), rtol=1e-5)


def test_inner_features_and_concat():
    rng = np.random.default_rng(1)
    net, mdef = compiled(INNER_FEATURES)
    parts = [inner_forest(rng, k, arity=2, features=4) for k in (3, 1, 4)]
    f = Forest.concat(parts)
    assert f.node_features.shape == (f.nodes, 4)
    check_native(net, mdef, f, {"s": rng.integers(0, 3, f.nodes).astype(np.int32)})
    # the union's rows are the parts' rows, moved with their nodes
    at = 0
    for p in parts:
        np.testing.assert_array_equal(f.node_features[f.index[at:at + p.nodes]], p.node_features)
        at += p.nodes


def test_inner_payload_is_required_and_checked():
    net, _ = compiled(INNER_WORDS)
    with pytest.raises(ValueError, match="inner=True"):
        net(t=Forest.from_tuples([(1, (2, 3))]))
    with pytest.raises(ValueError, match="node 2 has word id -1"):
        Forest.from_arrays([[-1, -1], [-1, -1], [0, 1]], words=[0, 1, -1], inner=True)
    with pytest.raises(ValueError, match="out of range"):
        net(t=Forest.from_arrays([[-1, -1], [-1, -1], [0, 1]], words=[0, 1, 7], inner=True))


def test_inner_word_needs_the_declaration():
    src = INNER_WORDS.replace(", inner=true", "")
    with pytest.raises(SnetTypeError, match="inner=true"):
        structc.compile(src)
