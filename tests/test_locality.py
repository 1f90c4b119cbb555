"""Graph.reordered(): reverse Cuthill–McKee within each graph of a batch, computed
level by level (`structc.locality`), and a model fed a reordered graph that sees its
inputs and gives its outputs per node in node order, as with the graph as given."""
import pickle
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import structc
from structc.graphs import Binder, Graph, GraphPool, batch
from structc.locality import locality_order
from test_gnn import SINK, random_graph
from test_readers import MODELS as READER_MODELS

# a node output, a per-edge input and a per-edge output beside node targets and a mask
EDGES = """
model Edges {
  input  g: graph(features=3)
  input  ew: f32[g.edges, 1]
  input  keep: f32[g.nodes]
  target y: class[g.nodes] of 2
  m = tanh(dense(concat(g.x[g.src], g.x[g.dst], axis=1), 4)) * ew
  h = tanh(dense(g.x, 4) + sum(m over g.edges))
  logits = dense(h, 2)
  output probs = softmax(logits)
  output msg = m
  loss masked_cross_entropy(logits, y, keep)
}
"""

ACROSS = """
model Across {
  input  g: graph(features=2)
  input  pair: f32[2, g.nodes]
  target y: class[g.graphs] of 2
  loss cross_entropy(dense(sum(g.x over g.nodes), 2), y) + mean(pair)
}
"""


def cuthill_mckee_reference(n, src, dst, gptr):
    """Node by node, as the textbook states it: per graph, from each unvisited node of
    least degree (then id), breadth first, each node's unvisited neighbours by degree
    (then id); each graph's order reversed."""
    nbrs = [set() for _ in range(n)]
    for u, v in zip(src, dst):
        if u != v:
            nbrs[u].add(v)
            nbrs[v].add(u)
    degree = [len(s) for s in nbrs]
    order, seen = [], [False] * n
    for a, b in zip(gptr[:-1], gptr[1:]):
        mine = []
        for start in sorted(range(a, b), key=lambda v: (degree[v], v)):
            if seen[start]:
                continue
            seen[start] = True
            queue = deque([start])
            while queue:
                v = queue.popleft()
                mine.append(v)
                for w in sorted((w for w in nbrs[v] if not seen[w] and a <= w < b), key=lambda w: (degree[w], w)):
                    seen[w] = True
                    queue.append(w)
        order += mine[::-1]
    return np.array(order)


def _csr_edges(g):
    n = g.num_nodes
    return np.asarray(g.arrays["src"]), np.repeat(np.arange(n), np.diff(g.arrays["ptr"]))


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 25), min_size=1, max_size=4), density=st.floats(0.0, 3.0),
       seed=st.integers(0, 2**31 - 1))
def test_the_order_is_reverse_cuthill_mckee_within_each_graph(sizes, density, seed):
    rng = np.random.default_rng(seed)
    parts = []
    for n in sizes:
        m = int(density * n)
        parts.append(Graph(rng.integers(0, n, (2, m)), num_nodes=n))
    g = batch(parts) if len(parts) > 1 else parts[0]
    src, dst = _csr_edges(g)
    gptr = np.asarray(g.arrays["gptr"])
    got = locality_order(g.arrays, g.num_nodes)
    np.testing.assert_array_equal(got, cuthill_mckee_reference(g.num_nodes, src, dst, gptr))
    for a, b in zip(gptr[:-1], gptr[1:]):       # a permutation of each graph's own rows
        assert sorted(got[a:b]) == list(range(a, b))


def ring(rng, n=600, m=3000, reach=5):
    place = rng.integers(0, n, m)
    ends = np.stack([place, (place + rng.integers(-reach, reach + 1, m)) % n])
    return Graph(rng.permutation(n)[ends], num_nodes=n, x=rng.normal(size=(n, 3)))


def test_a_ring_numbered_at_random_gets_its_locality_back():
    g = ring(np.random.default_rng(0))
    n = g.num_nodes
    for graph, most in ((g, None), (g.reordered(), 0.05)):
        src, dst = _csr_edges(graph)
        cut = np.mean((src < n // 2) != (dst < n // 2))    # edges one thread gathers from the other's rows
        if most is None:
            assert cut > 0.3
        else:
            assert cut < most


def test_a_reordered_graph_is_the_same_graph_to_its_caller():
    rng = np.random.default_rng(1)
    g = random_graph(rng, 40, 120)
    r = g.reordered()
    assert r.node_order is not None and sorted(r.node_order) == list(range(40))
    assert "reordered" in repr(r)
    # edges in node ids, the same ones; x in row order is x in node order moved
    assert sorted(map(tuple, g.edge_index.T.tolist())) == sorted(map(tuple, r.edge_index.T.tolist()))
    np.testing.assert_array_equal(r.x, g.x[r.node_order])
    assert r.num_nodes == g.num_nodes and r.num_edges == g.num_edges and r.num_graphs == g.num_graphs
    # the given edge order is kept: edge features (stored in CSR order) follow their edges
    np.testing.assert_array_equal(r.edge_x[np.argsort(r.order)], g.edge_x[np.argsort(g.order)])
    twice = pickle.loads(pickle.dumps(r)).reordered()
    np.testing.assert_array_equal(twice.x, g.x[twice.node_order])
    x = rng.normal(size=(40, 5))
    np.testing.assert_array_equal(r.with_features(x=x).x, x[r.node_order].astype(np.float32))


@pytest.fixture(scope="module")
def sink():
    return structc.compile(SINK, seed=1)


def _same_calls(net, feeds, reordered_feeds, rtol=2e-5, atol=2e-6):
    for plain, moved in zip(feeds, reordered_feeds):
        for k, v in net.forward(**{k: v for k, v in plain.items() if k in net_inputs(net)}).items():
            got = net.forward(**{k: v for k, v in moved.items() if k in net_inputs(net)})[k]
            np.testing.assert_allclose(got, v, rtol=rtol, atol=atol, err_msg=k)
        loss, grads = net.grad(**plain)
        loss2, grads2 = net.grad(**moved)
        assert loss2 == pytest.approx(loss, rel=1e-5)
        for k in grads:
            np.testing.assert_allclose(grads2[k], grads[k], rtol=1e-4, atol=1e-6, err_msg=k)


def net_inputs(net):
    return {i["name"].split(".")[0] for i in net.meta["inputs"] if i["kind"] != "target"}


def test_a_model_sees_a_reordered_graph_as_the_graph(sink):
    """Node mask and node targets in node order, a graph target, edge features and
    types, several graphs (a batch of reordered and plain ones): the same loss and
    gradients, and training steps on either stay together."""
    rng = np.random.default_rng(2)
    parts = [random_graph(rng, n, 3 * n) for n in (12, 1, 30)]
    plain = batch(parts)
    for moved in (plain.reordered(), batch([parts[0].reordered(), parts[1], parts[2].reordered()])):
        n = plain.num_nodes
        feed = {"w": (rng.random(n) < 0.6).astype(np.float32), "y": rng.integers(0, 3, n).astype(np.int32),
                "z": rng.integers(0, 2, 3).astype(np.int32)}
        _same_calls(sink, [{"g": plain, **feed}], [{"g": moved, **feed}])
    a, b = structc.compile(SINK, seed=1), structc.compile(SINK, seed=1)
    for _ in range(3):
        la = a.train_step(lr=0.05, g=plain, **feed)
        lb = b.train_step(lr=0.05, g=moved, **feed)
        assert lb == pytest.approx(la, rel=1e-4)
    for k in a.params:
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_node_and_edge_outputs_come_back_in_node_and_edge_order():
    net = structc.compile(EDGES, seed=3)
    rng = np.random.default_rng(3)
    g = ring(rng, n=50, m=200, reach=3)
    r = g.reordered()
    ew = rng.random((200, 1)).astype(np.float32)       # in the edges' given order
    keep = (rng.random(50) < 0.5).astype(np.float32)
    y = rng.integers(0, 2, 50).astype(np.int32)
    want, got = net.forward(g=g, ew=ew), net.forward(g=r, ew=ew)
    for k in ("probs", "msg"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert net.loss(g=r, ew=ew, keep=keep, y=y) == pytest.approx(net.loss(g=g, ew=ew, keep=keep, y=y), rel=1e-5)
    with pytest.raises(ValueError, match="one row per node"):
        net.loss(g=r, ew=ew, keep=keep[:-1], y=y)


def test_what_a_reordered_graph_cannot_be_given_to_says_so():
    rng = np.random.default_rng(4)
    g = Graph(rng.integers(0, 6, (2, 12)), num_nodes=6, x=rng.normal(size=(6, 2))).reordered()
    net = structc.compile(ACROSS)
    with pytest.raises(ValueError, match="axis other than its first"):
        net.loss(g=g, pair=np.ones((2, 6), np.float32), y=np.zeros(1, np.int32))
    net.loss(g=Graph(rng.integers(0, 6, (2, 12)), num_nodes=6, x=rng.normal(size=(6, 2))),
             pair=np.ones((2, 6), np.float32), y=np.zeros(1, np.int32))          # as numbered: fine
    with pytest.raises(ValueError, match="node order"):
        GraphPool([g])
    from structc.distributed import halo_subgraph
    with pytest.raises(ValueError, match="node order"):
        halo_subgraph(g, [0, 1], 1)


def test_a_large_node_data_set_keeps_its_graph_in_locality_order(tmp_path, monkeypatch):
    """A node folder of 1,100 nodes (a ring numbered at random) is read reordered, says
    so, and trains and evaluates as the same folder read as numbered."""
    from structc import graph_datasets, readers
    rng = np.random.default_rng(5)
    g = ring(rng, n=1100, m=4000, reach=4)
    folder = tmp_path / "ring"
    folder.mkdir()
    src, dst = g.edge_index
    (folder / "edges.txt").write_text("\n".join(f"{u} {v}" for u, v in zip(src, dst)))
    (folder / "labels.txt").write_text("\n".join(str(v) for v in rng.integers(0, 2, 1100)))
    (folder / "features.csv").write_text("a,b,c\n" + "\n".join(",".join(map(str, r)) for r in g.x))
    moved = readers.read(folder)
    assert moved.graph.node_order is not None and "locality order" in moved.description
    monkeypatch.setattr(graph_datasets, "REORDER_AT", 10**9)
    plain = readers.read(folder)
    assert plain.graph.node_order is None and "locality order" not in plain.description
    results = []
    for data in (plain, moved):
        net = structc.compile(READER_MODELS, "Nodes", seed=4)       # the node folder tests' model
        net.set_optimizer("adam")
        data.bind(net)
        losses = [net.train_step(lr=0.01, **feed) for _ in range(5) for feed in data.batches(0, rng)]
        results.append((losses, data.evaluate(net)))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
    assert results[1][1]["accuracy"] == results[0][1]["accuracy"]
    assert results[1][1]["loss"] == pytest.approx(results[0][1]["loss"], rel=1e-5)


def test_a_node_data_set_keeps_the_numbering_a_model_needs():
    """A model with the nodes along a second axis cannot take a reordered graph: the
    data set gives it the graph as numbered."""
    from structc.graph_datasets import NodeDataset
    n = 1100
    ring_edges = np.stack([np.arange(n), (np.arange(n) + 1) % n])
    data = NodeDataset("ring", Graph(ring_edges, x=np.ones((n, 2))), np.zeros(n), [0], [1])
    assert data.graph.node_order is not None
    across = """
model Across {
  input  g: graph(features=2)
  input  train: f32[g.nodes]
  input  pair: f32[2, g.nodes]
  target y: class[g.nodes] of 2
  loss masked_cross_entropy(dense(g.x, 2), y, train) + mean(pair)
}
"""
    data.bind(structc.compile(across))
    assert data.graph.node_order is None


# node ids as an integer input: rows of node tensors picked by the caller's node ids
PICK = """
model Pick {
  input  g: graph(features=3)
  input  pick: i32[K]
  target y: class[K] of 2
  h = tanh(dense(g.x, 4) + sum(dense(g.x, 4) over g.edges))
  output picked = h[pick]
  loss cross_entropy(dense(h[pick], 2), y)
}
"""


def test_node_ids_given_as_inputs_name_nodes_not_rows():
    """`h[pick]` with `pick` node ids reads the same nodes of a reordered graph (its
    rows hold other nodes), in forward, loss and gradients; an id outside the nodes
    is refused as it is for the graph as given."""
    net = structc.compile(PICK, seed=5)
    rng = np.random.default_rng(6)
    g = ring(rng, n=40, m=120, reach=3)
    r = g.reordered()
    assert not np.array_equal(r.node_order, np.arange(40))
    pick = np.array([0, 7, 39, 7, 12], np.int32)
    y = rng.integers(0, 2, 5).astype(np.int32)
    np.testing.assert_allclose(net.forward(g=r, pick=pick)["picked"], net.forward(g=g, pick=pick)["picked"],
                               rtol=1e-5, atol=1e-6)
    _same_calls(net, [{"g": g, "pick": pick, "y": y}], [{"g": r, "pick": pick, "y": y}])
    np.testing.assert_array_equal(pick, [0, 7, 39, 7, 12])          # the caller's array is not changed
    for graph in (g, r):
        with pytest.raises(ValueError, match="outside"):
            net.forward(g=graph, pick=np.array([3, 40], np.int32))
    both = structc.compile(PICK.replace("h[pick]", "h[pick] + E[pick]")         # pick: node ids and word ids
                           .replace("  h = ", "  param E: embedding(50, 4)\n  h = "), seed=5)
    both.forward(g=g, pick=pick)
    with pytest.raises(ValueError, match="ids of g's nodes that pick other rows too"):
        both.forward(g=r, pick=pick)
    assert Binder.from_meta(both.meta).needs_node_order("g") and not Binder.from_meta(net.meta).needs_node_order("g")
