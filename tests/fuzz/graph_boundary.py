"""Throw invalid graphs at a compiled message-passing model; only ValueError /
TypeError may come out, and valid calls must run. Run in a subprocess by
tests/test_gnn.py, so a crash in native code fails the test instead of
killing the test run.

usage: python graph_boundary.py N_CALLS SEED
"""
import sys
from collections import Counter

import networkx as nx
import numpy as np

import structc

MODEL = """
model G {
  input  g: graph(features=3, edge_features=2, edge_types=2)
  target y: class[g.nodes] of 2
  h = relu(dense(g.x, 4) + sum(dense(g.x, 4, per=g.type) over g.edges) + max(dense(g.e, 4) over g.edges))
  loss cross_entropy(dense(h, 2), y)
}
"""


def junk_array(rng, shape_hint):
    kind = rng.integers(0, 9)
    if kind == 0:
        return None
    if kind == 1:
        return "text"
    if kind == 2:
        return rng.normal(size=tuple(rng.integers(0, 4, rng.integers(0, 3))))
    if kind == 3:
        return np.zeros(shape_hint, dtype=rng.choice([np.bool_, np.complex64, object, np.float16]))
    if kind == 4:
        return [[1, 2], [3]]
    if kind == 5:
        return np.full(shape_hint, rng.choice([-1, 2 ** 31, 7, np.nan, np.inf]))
    if kind == 6:
        return np.zeros(tuple(max(0, d + int(rng.integers(-1, 2))) for d in shape_hint))
    if kind == 7:
        return rng.integers(-3, 10, shape_hint)
    return np.zeros(shape_hint, np.float32)


def graph_value(rng):
    n = int(rng.integers(0, 6))
    m = int(rng.integers(0, 8))
    args = {"edge_index": rng.integers(0, max(n, 1), (2, m)), "num_nodes": n, "x": rng.normal(size=(n, 3)),
            "edge_x": rng.normal(size=(m, 2)), "edge_type": rng.integers(0, 2, m)}
    for key in list(args):
        if rng.random() < 0.12:
            args[key] = junk_array(rng, np.shape(args[key]) or (2,)) if key != "num_nodes" else \
                rng.choice([-1, 0, 2.5, None, "3", 10 ** 12, True])
        elif rng.random() < 0.04:
            del args[key]
    if rng.random() < 0.1:
        args["graph_id"] = junk_array(rng, (n,))
    if rng.random() < 0.05:
        args["bogus"] = 1
    form = rng.integers(0, 5)
    if form == 0:
        return args                                     # a dict, converted per call
    if form == 1:
        return [args, args] if rng.random() < 0.5 else []
    if form == 2:
        G = nx.gnp_random_graph(n, 0.5, seed=int(rng.integers(100)), directed=bool(rng.integers(2)))
        for v in G:
            if rng.random() < 0.9:
                G.nodes[v]["x"] = junk_array(rng, (3,)) if rng.random() < 0.2 else rng.normal(size=3)
        return G
    if form == 3:
        return rng.choice(["graph", 3, None, object()])
    try:
        return structc.Graph(**args)
    except (ValueError, TypeError):
        return args


def main(calls: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    net = structc.compile(MODEL)
    outcomes = Counter()
    for _ in range(calls):
        g = graph_value(rng)
        feed = {"g": g}
        n = rng.integers(0, 6)
        if rng.random() < 0.7:
            feed["y"] = rng.integers(-1, 3, n) if rng.random() < 0.3 else rng.integers(0, 2, n)
        try:
            if "y" in feed:
                net.train_step(lr=0.01, **feed)
            else:
                net(**feed)
            outcomes["ok"] += 1
        except (ValueError, TypeError) as e:
            outcomes[type(e).__name__] += 1
    print(dict(outcomes))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
