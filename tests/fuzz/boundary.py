"""Throw invalid calls at compiled models; only ValueError/TypeError may come
out. Run in a subprocess by tests/test_boundary.py, so a crash in native
code fails that test instead of killing the test run.

Three models cover the three kinds of input: dense tensors with class
labels, a forest of word trees, and a graph with edge types. Hypothesis
draws each call: arguments missing, extra, of the wrong kind, shape, dtype or
range; forests with children out of range, shared children, cycles, too
many children, words outside the vocabulary; graphs with edges out of range,
negative or fractional indices, features of the wrong width.

usage: python boundary.py CALLS
"""
import sys

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import structc

DENSE = """
model B {
  input  x: f32[N, 6]
  input  z: f32[N, 2, 3]
  target y: class[N] of 4
  h = concat(dense(x, 5) |> relu, flatten(z), axis=1)
  loss cross_entropy(dense(h, 4), y)
}
"""
TREES = """
model T {
  input  t: forest(arity=2) of word(vocab=5)
  target y: class[t.trees] of 2
  param  E: embedding(5, 4)
  rec h(n) = leaf: E[n.word]
             node: tanh(dense(concat(h(n.left), h(n.right)), 4))
  loss cross_entropy(dense(h(t.root), 2), y)
}
"""
GRAPHS = """
model G {
  input  g: graph(features=3, edge_types=2)
  target y: class[g.nodes] of 2
  h = relu(dense(g.x, 4) + sum(dense(g.x, 4, per=g.type) over g.edges))
  loss cross_entropy(dense(h, 2), y)
}
"""

JUNK = st.one_of(
    st.none(), st.text(max_size=5), st.integers(-3, 3), st.floats(allow_nan=True), st.booleans(),
    st.lists(st.integers(-2, 6), max_size=4), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.builds(lambda shape, dt: np.zeros(shape, dt),
              st.lists(st.integers(0, 4), max_size=3).map(tuple),
              st.sampled_from([np.float32, np.float64, np.int32, np.int64, np.bool_, np.complex64, np.uint8])),
)


@st.composite
def dense_feed(draw):
    n = draw(st.integers(1, 5))
    feed = {}
    for name, shape, kind in (("x", (n, 6), "f"), ("z", (n, 2, 3), "f"), ("y", (n,), "i")):
        choice = draw(st.integers(0, 5))
        if choice == 0:
            continue                                            # missing
        if choice == 1:
            feed[name] = draw(JUNK)
        elif choice == 2:                                       # wrong batch or feature size
            bad = tuple(d + draw(st.integers(1, 2)) if k == draw(st.integers(0, len(shape) - 1)) else d
                        for k, d in enumerate(shape))
            feed[name] = np.zeros(bad, np.float32 if kind == "f" else np.int32)
        elif kind == "i":
            feed[name] = np.array(draw(st.lists(st.integers(-3, 8), min_size=n, max_size=n)))
        else:
            feed[name] = np.full(shape, draw(st.floats(allow_nan=True, width=32)), np.float32)
    if draw(st.booleans()) and draw(st.booleans()):
        feed[draw(st.sampled_from(["w", "x.extra", "N"]))] = 1
    return feed


@st.composite
def bad_forest(draw):
    """Arrays for Forest.from_arrays, or raw values, that break a rule."""
    n = draw(st.integers(1, 8))
    children = np.full((n, 2), -1, np.int64)
    for i in range(n):                                          # a valid forest to start from
        for slot in range(2):
            if i >= 2 and draw(st.booleans()):
                children[i, slot] = draw(st.integers(0, i - 1))
    words = np.array(draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)))
    flaw = draw(st.integers(0, 8))
    if flaw == 0:
        children[draw(st.integers(0, n - 1)), 0] = draw(st.sampled_from([n, n + 5, -2, 10 ** 9]))
    elif flaw == 1 and n >= 3:                                  # a child with two parents
        children[n - 1, :] = [0, 0]
    elif flaw == 2:                                             # a node its own descendant
        children[0, 0] = n - 1
    elif flaw == 3:
        children = np.hstack([children, np.zeros((n, 1), np.int64)])   # arity 3 in an arity-2 model
    elif flaw == 4:
        words[0] = draw(st.sampled_from([5, 99, -1]))
    elif flaw == 5:
        children = children.astype(np.float64) + 0.5
    elif flaw == 6:
        return draw(st.sampled_from(["(1 (2 a) b", "((", "(x)", "", "()", "(3 (2 good) (2 movie)"]))
    elif flaw == 7:
        return draw(JUNK)
    else:
        return [[draw(st.integers(-3, 9)), [draw(st.integers(0, 6))]], (), [[[[1]]]]]
    return ("arrays", children, words)


@st.composite
def bad_graph(draw):
    n = draw(st.integers(1, 6))
    e = draw(st.integers(0, 8))
    edges = np.array([draw(st.lists(st.integers(0, n - 1), min_size=e, max_size=e)) for _ in range(2)]).reshape(2, e)
    types = np.array(draw(st.lists(st.integers(0, 1), min_size=e, max_size=e)), np.int64)
    x = np.zeros((n, 3), np.float32)
    flaw = draw(st.integers(0, 7))
    if flaw == 0 and e:
        edges[draw(st.integers(0, 1)), 0] = draw(st.sampled_from([n, -1, 10 ** 12]))
    elif flaw == 1 and e:
        types[0] = draw(st.sampled_from([2, -1, 7]))
    elif flaw == 2:
        x = np.zeros((n, draw(st.sampled_from([1, 2, 4]))), np.float32)
    elif flaw == 3:
        edges = edges.astype(np.float64) + 0.25
    elif flaw == 4:
        edges = edges.reshape(-1)
    elif flaw == 5:
        return draw(JUNK)
    elif flaw == 6:
        x = np.zeros((n + 1, 3), np.float32)
    else:
        types = None                                            # the model needs edge types
    return ("graph", edges, x, types)


def run(net, kind, feed, lr):
    if kind == 0:
        net(**{k: v for k, v in feed.items() if k != "y"})
    elif kind == 1:
        net.grad(**feed)
    else:
        net.train_step(lr=lr, **feed)


def forest_value(v):
    if isinstance(v, tuple) and v and v[0] == "arrays":
        return structc.Forest.from_arrays(v[1], v[2], arity=2)
    return v


def graph_value(v):
    if isinstance(v, tuple) and v and v[0] == "graph":
        return structc.Graph(v[1], x=v[2], edge_type=v[3])
    return v


def main(calls: int) -> None:
    nets = {"dense": structc.compile(DENSE), "trees": structc.compile(TREES), "graphs": structc.compile(GRAPHS)}
    counts = {"ok": 0, "ValueError": 0, "TypeError": 0}

    @settings(max_examples=calls, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(which=st.sampled_from(["dense", "trees", "graphs"]), kind=st.integers(0, 2),
           lr=st.sampled_from([0.1, -1.0, float("inf"), float("nan"), 0.0]), data=st.data())
    def one_call(which, kind, lr, data):
        try:
            if which == "dense":
                feed = data.draw(dense_feed())
            elif which == "trees":
                feed = {"t": forest_value(data.draw(bad_forest())), "y": np.zeros(1, np.int32)}
            else:
                n = data.draw(st.integers(1, 6))
                feed = {"g": graph_value(data.draw(bad_graph())), "y": np.zeros(n, np.int32)}
            run(nets[which], kind, feed, lr)
            counts["ok"] += 1
        except (ValueError, TypeError) as e:
            counts["ValueError" if isinstance(e, ValueError) else "TypeError"] += 1

    one_call()
    print(counts)


if __name__ == "__main__":
    main(int(sys.argv[1]))
