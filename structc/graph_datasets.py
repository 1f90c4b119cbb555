"""Graph data sets for `structc train`: node classification on one graph,
graph classification on many.

    karate           Zachary's karate club (networkx ships it): which club each of the
                     34 members joined after the split; half the members labelled
    graph_families   600 generated graphs: Erdős–Rényi, Barabási–Albert or Watts–Strogatz?
    atlas            every graph of 1-7 nodes (networkx's graph atlas, 1,252): connected or not?

Both follow the `ArrayDataset` protocol of `structc.datasets`: `bind(net)`
matches the model's graph input, target (and, for nodes, the mask input that
says which labels to train on), `batches` yields feed dicts, `evaluate`
reports held-out accuracy and loss. Graphs are converted (CSR and its
transpose) once, when the data set is made; a batch of graphs is a disjoint
union of those, assembled per step without re-sorting.
"""
from __future__ import annotations

import operator
from typing import Iterator

import networkx as nx
import numpy as np

from .datasets import class_output
from .graphs import Binder, Graph, GraphPool, batch
from .heldout import EMPTY_PART, Tally


def _graph_input(net, data: str) -> dict:
    graphs = net.meta.get("graphs") or []
    if len(graphs) != 1:
        raise ValueError(f"data set '{data}' feeds one graph input; model {net.name} declares "
                         f"{len(graphs) or 'no'} graph inputs")
    return graphs[0]


def _target(net, data: str, size: str) -> dict:
    targets = [s for s in net.meta["inputs"] if s["kind"] == "target"]
    if len(targets) != 1 or tuple(targets[0]["shape"]) != (size,) or not targets[0]["classes"]:
        raise ValueError(f"data set '{data}' has one class label per {size.split('.')[-1][:-1]}: the model needs "
                         f"one target `class[{size}] of C`, it declares "
                         f"{[(s['name'], s['shape']) for s in targets]}")
    return targets[0]


def _check_features(spec: dict, have: int, data: str) -> None:
    if spec["features"] != have:
        raise ValueError(f"data set '{data}' has {have} features per node, but graph input '{spec['name']}' "
                         f"declares graph(features={spec['features']})")


#: a node data set's graph of at least this many nodes is kept in locality order
#: (`Graph.reordered`: the second core then gathers fewer rows from the first)
REORDER_AT = 1024


class NodeDataset:
    """One graph; every node has a label, some are used for training. A graph of
    `REORDER_AT` nodes or more is kept in locality order (labels, masks and
    predictions stay in node order), unless the model has the nodes along a
    second axis somewhere, which a reordered graph does not support."""

    def __init__(self, name: str, graph: Graph, labels, train, test, description: str = ""):
        self.name, self.description = name, description
        self._as_given = graph
        self._in_order = graph.reordered() if graph.num_nodes >= REORDER_AT and graph.node_order is None else graph
        self.graph = self._in_order
        self.labels = np.asarray(labels, np.int32)
        self.train_mask = np.zeros(graph.num_nodes, np.float32)
        self.train_mask[train] = 1.0
        self.test_mask = np.zeros(graph.num_nodes, np.float32)
        self.test_mask[test] = 1.0
        self.test = np.asarray(test)

    def __len__(self) -> int:
        return int(self.train_mask.sum())

    def held_out_count(self) -> int:
        """The examples `evaluate` measures (the held-out part)."""
        return len(self.test)

    def bind(self, net) -> "NodeDataset":
        spec = _graph_input(net, self.name)
        _check_features(spec, self.graph.x.shape[1], self.name)
        nodes = spec["sizes"]["nodes"]
        self.target = _target(net, self.name, nodes)
        if self.labels.max() >= self.target["classes"]:
            raise ValueError(f"data set '{self.name}' has {self.labels.max() + 1} classes, target "
                             f"'{self.target['name']}' declares {self.target['classes']}")
        masks = [s for s in net.meta["inputs"] if s["kind"] == "input" and tuple(s["shape"]) == (nodes,)
                 and s["dtype"] == "f32"]
        if len(masks) != 1:
            raise ValueError(f"data set '{self.name}' labels some nodes for training: declare one input "
                             f"`input train: f32[{nodes}]` (1 for a training node) and a loss such as "
                             f"masked_cross_entropy(logits, y, train)")
        self.graph_name, self.mask_name = spec["name"], masks[0]["name"]
        self.output = class_output(net, self.target)
        across = Binder.from_meta(net.meta).needs_node_order(self.graph_name)
        self.graph = self._as_given if across else self._in_order      # see the class docstring
        return self

    def feed(self, mask) -> dict:
        return {self.graph_name: self.graph, self.target["name"]: self.labels, self.mask_name: mask}

    def batches(self, batch: int, rng: np.random.Generator) -> Iterator[dict]:
        yield self.feed(self.train_mask)            # the whole graph is one step

    def batch_count(self, batch: int) -> int:
        return 1

    def evaluate(self, net, batch: int = 0) -> dict:
        if not len(self.test):
            raise ValueError(EMPTY_PART)
        outs, loss = net.evaluate_batch(**self.feed(self.test_mask))       # one forward call
        if self.output is None:
            return {"loss": loss}
        correct = int(np.sum(np.argmax(outs[self.output][self.test], axis=-1) == self.labels[self.test]))
        return {"loss": loss, "accuracy": correct / len(self.test)}


class GraphDataset:
    """Many graphs, one label each, split into training and held-out graphs."""

    def __init__(self, name: str, graphs: list[Graph], labels, train, test, description: str = ""):
        self.name, self.graphs, self.description = name, graphs, description
        self.labels = np.asarray(labels, np.int32)
        self.train, self.test = np.asarray(train), np.asarray(test)
        self._held_out: tuple[list, Graph] | None = None      # (the test graphs, their batch): `held_out`
        self.held_out()
        self._pool: tuple[list, GraphPool] | None = None

    def held_out(self) -> Graph:
        """The graphs `test` names in `graphs`, as one batch: joined once, and again only
        when they are other graphs (a new split, a graph replaced), as `pool` is."""
        graphs = [self.graphs[i] for i in self.test]
        if not graphs:
            raise ValueError(EMPTY_PART)
        kept = self._held_out
        if kept is None or len(kept[0]) != len(graphs) or not all(map(operator.is_, kept[0], graphs)):
            kept = self._held_out = (graphs, batch(graphs))
        return kept[1]

    def pool(self) -> GraphPool:
        """`graphs` as a `GraphPool` (a batch is then one pass in C), built once and
        again only when `graphs` no longer holds the same graphs."""
        if self._pool is None or len(self._pool[0]) != len(self.graphs) or \
                not all(map(operator.is_, self._pool[0], self.graphs)):
            self._pool = (list(self.graphs), GraphPool(self.graphs))
        return self._pool[1]

    def __len__(self) -> int:
        return len(self.train)

    def held_out_count(self) -> int:
        """The examples `evaluate` measures (the held-out part)."""
        return len(self.test)

    def bind(self, net) -> "GraphDataset":
        spec = _graph_input(net, self.name)
        _check_features(spec, self.graphs[0].x.shape[1], self.name)
        self.target = _target(net, self.name, spec["sizes"]["graphs"])
        self.graph_name = spec["name"]
        self.output = class_output(net, self.target)
        return self

    def batches(self, size: int, rng: np.random.Generator) -> Iterator[dict]:
        order = rng.permutation(self.train)
        pool = self.pool()
        for first in range(0, len(order), 16 * size):      # 16 batches' graphs asked for at once
            parts = [order[at:at + size] for at in range(first, min(first + 16 * size, len(order)), size)]
            for idx, graphs in zip(parts, pool.take_many(parts)):
                yield {self.graph_name: graphs, self.target["name"]: self.labels[idx]}

    def batch_count(self, size: int) -> int:
        return (len(self.train) + size - 1) // size

    def evaluate(self, net, batch: int = 0) -> dict:
        return self.held_out_tally(net, batch).metrics()

    def held_out_tally(self, net, batch: int = 0):
        """The held-out graphs in one call (`structc.heldout`: ranks' shares add up)."""
        tally, y = Tally(net, self.output), self.labels[self.test]
        tally.measure({self.graph_name: self.held_out(), self.target["name"]: y}, y)
        return tally


def _stratified(labels: np.ndarray, test_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test.extend(idx[: int(round(len(idx) * test_fraction))])
    test = np.sort(np.array(test))
    return np.setdiff1d(np.arange(len(labels)), test), test


def load_karate(test_fraction: float = 0.5, seed: int = 0) -> NodeDataset:
    """Zachary's karate club: 34 members (nodes), 78 friendships (both directions), the club
    each member joined (Mr. Hi's: 0, the officer's: 1). Features: one-hot member ids.
    Half of each club (seed 0) is held out."""
    G = nx.karate_club_graph()
    labels = np.array([0 if G.nodes[v]["club"] == "Mr. Hi" else 1 for v in G])
    graph = Graph.from_networkx(G, x=np.eye(G.number_of_nodes(), dtype=np.float32))
    train, test = _stratified(labels, test_fraction, seed)
    return NodeDataset("karate", graph, labels, train, test,
                       description=f"Zachary's karate club, {len(train)} labelled / {len(test)} held-out members")


FAMILIES = ("Erdős–Rényi", "Barabási–Albert", "Watts–Strogatz")


def make_graph_families(count: int = 600, seed: int = 0) -> tuple[list[Graph], np.ndarray]:
    """`count` graphs of 20-40 nodes, a third of each family, all with about 4 edges
    per node: G(n, 4/n), preferential attachment (m=2), small world (k=4, p=0.2).
    Node features: a constant 1 (the model sees structure only)."""
    rng = np.random.default_rng(seed)
    graphs, labels = [], []
    for k in range(count):
        family = k % 3
        n = int(rng.integers(20, 41))
        s = int(rng.integers(2 ** 31))
        if family == 0:
            G = nx.gnp_random_graph(n, 4.0 / (n - 1), seed=s)
        elif family == 1:
            G = nx.barabasi_albert_graph(n, 2, seed=s)
        else:
            G = nx.watts_strogatz_graph(n, 4, 0.2, seed=s)
        graphs.append(Graph.from_networkx(G, x=np.ones((n, 1), np.float32)))
        labels.append(family)
    return graphs, np.array(labels)


def load_graph_families(test_fraction: float = 0.25, seed: int = 0) -> GraphDataset:
    graphs, labels = make_graph_families(seed=seed)
    train, test = _stratified(labels, test_fraction, seed)
    return GraphDataset("graph_families", graphs, labels, train, test,
                        description=f"generated graphs ({', '.join(FAMILIES)}), {len(train)} training / "
                                    f"{len(test)} held-out graphs")


def make_atlas() -> tuple[list[Graph], np.ndarray]:
    """Every graph of 1 to 7 nodes up to isomorphism (networkx's graph atlas: 1,252
    graphs, the empty graph left out), labelled 1 when it is connected. Node features:
    a constant 1 (the model sees structure only)."""
    graphs, labels = [], []
    for G in nx.graph_atlas_g()[1:]:
        graphs.append(Graph.from_networkx(G, x=np.ones((G.number_of_nodes(), 1), np.float32)))
        labels.append(int(nx.is_connected(G)))
    return graphs, np.array(labels)


def load_atlas(test_fraction: float = 0.2, seed: int = 0) -> GraphDataset:
    graphs, labels = make_atlas()
    train, test = _stratified(labels, test_fraction, seed)
    return GraphDataset("atlas", graphs, labels, train, test,
                        description=f"the graph atlas (all graphs of 1-7 nodes): connected or not, {len(train)} "
                                    f"training / {len(test)} held-out graphs ({int(labels.sum())} of "
                                    f"{len(labels)} connected)")
