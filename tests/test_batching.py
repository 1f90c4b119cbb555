"""Batch assembly: `structc.batch` and `Forest.concat` give exactly what a
straightforward construction of the union gives (same arrays, same order), keep
every check, and hand out arrays nobody can write."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from structc import Forest, Graph, batch

FOREST_FIELDS = ("children", "words", "features", "roots", "level_end", "labels", "height", "index", "tree_of",
                 "max_word")


# -- graphs ------------------------------------------------------------------------

def random_graph_parts(rng, n, m, features=True, edge_features=False, types=False, graphs=1) -> dict:
    """Graph's arguments for a random graph of n nodes and m edges (n >= graphs)."""
    parts = {"edge_index": rng.integers(0, n, size=(2, m)), "num_nodes": n}
    if features:
        parts["x"] = rng.normal(size=(n, 3))
    if edge_features:
        parts["edge_x"] = rng.normal(size=(m, 2))
    if types:
        parts["edge_type"] = rng.integers(0, 4, size=m)
    if graphs > 1:
        parts["graph_id"] = np.sort(rng.integers(0, graphs, size=n))
        parts["num_graphs"] = graphs
    return parts


def union_of(parts: list[dict]) -> dict:
    """Graph's arguments for the disjoint union, written out the plain way."""
    offsets = np.cumsum([0] + [p["num_nodes"] for p in parts])
    first_graph = np.cumsum([0] + [p.get("num_graphs", 1) for p in parts])
    out = {"edge_index": np.concatenate([p["edge_index"] + offsets[k] for k, p in enumerate(parts)], axis=1),
           "num_nodes": int(offsets[-1]), "num_graphs": int(first_graph[-1]),
           "graph_id": np.concatenate([p.get("graph_id", np.zeros(p["num_nodes"], np.int64)) + first_graph[k]
                                       for k, p in enumerate(parts)])}
    for key in ("x", "edge_x", "edge_type"):
        if key in parts[0]:
            out[key] = np.concatenate([p[key] for p in parts])
    return out


def assert_same_graph(got: Graph, want: Graph) -> None:
    for field in ("num_nodes", "num_edges", "num_graphs", "max_type"):
        assert getattr(got, field) == getattr(want, field), field
    assert set(got.arrays) == set(want.arrays)
    for role, arr in want.arrays.items():
        assert got.arrays[role].dtype == arr.dtype == np.int32, role
        np.testing.assert_array_equal(got.arrays[role], arr, err_msg=role)
    np.testing.assert_array_equal(got.order, want.order)
    assert got.order.dtype == want.order.dtype
    for field in ("x", "edge_x"):
        a, b = getattr(got, field), getattr(want, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def assert_sealed(arrays) -> None:
    for arr in arrays:
        with pytest.raises(ValueError):
            arr.flags.writeable = True
        if arr.base is not None and isinstance(arr.base, np.ndarray):
            with pytest.raises(ValueError):
                arr.base.flags.writeable = True


@pytest.mark.parametrize("kind", [
    dict(),                                             # node features only
    dict(edge_features=True),
    dict(types=True),
    dict(edge_features=True, types=True),
    dict(features=False, types=True),
])
def test_batch_is_the_union_built_from_scratch(kind):
    rng = np.random.default_rng(7)
    for trial in range(20):
        count = int(rng.integers(2, 9))
        # sizes include single nodes, graphs without edges, and parts that are batches of several graphs
        shapes = [(int(rng.integers(1, 12)), int(rng.choice([0, 1, int(rng.integers(0, 40))])), 1)
                  for _ in range(count)]
        shapes[0] = (1, 0, 1)
        if trial % 3 == 0:
            shapes[-1] = (9, 20, 3)
        parts = [random_graph_parts(rng, n, m, graphs=k, **kind) for n, m, k in shapes]
        got = batch([Graph(**p) for p in parts])
        assert_same_graph(got, Graph(**union_of(parts)))
        assert_sealed(got.arrays.values())
        assert_sealed([a for a in (got.x, got.edge_x, got.order) if a is not None])


def test_batches_of_batches_networkx_and_dicts():
    import networkx as nx
    rng = np.random.default_rng(3)
    parts = [random_graph_parts(rng, n, m, edge_features=True, types=True) for n, m in [(4, 6), (1, 0), (5, 0),
                                                                                           (6, 12), (2, 1)]]
    graphs = [Graph(**p) for p in parts]
    want = Graph(**union_of(parts))
    assert_same_graph(batch([batch(graphs[:2]), graphs[2], batch(graphs[3:])]), batch(graphs))
    nested = batch([batch(graphs[:2]), graphs[2], batch(graphs[3:])])
    assert nested.num_graphs == 5
    assert_same_graph(batch([batch(graphs[:2]), graphs[2]] + graphs[3:]), want)
    assert_same_graph(batch([parts[0]] + graphs[1:]), want)                       # a dict of Graph's arguments
    G, H = nx.path_graph(4), nx.cycle_graph(3)
    assert_same_graph(batch([G, H, G]), Graph(**union_of([nx_parts(G), nx_parts(H), nx_parts(G)])))


def nx_parts(G) -> dict:
    """An undirected networkx graph's edges as Graph takes them: both ways, in
    from_networkx's order (the edges as listed, then the reversed ones)."""
    e = np.array(list(G.edges)).T
    return {"edge_index": np.concatenate([e, e[::-1]], axis=1), "num_nodes": G.number_of_nodes()}


def test_batch_of_restored_and_refeatured_graphs():
    rng = np.random.default_rng(5)
    parts = [random_graph_parts(rng, n, m, edge_features=True) for n, m in [(3, 4), (2, 0), (7, 15)]]
    graphs = [Graph(**p) for p in parts]
    want = batch(graphs)
    restored = [pickle.loads(pickle.dumps(g)) for g in graphs]
    assert_same_graph(batch(restored), want)
    again = pickle.loads(pickle.dumps(want))
    assert_same_graph(again, want)
    assert_sealed(again.arrays.values())
    x = [rng.normal(size=(g.num_nodes, 3)) for g in graphs]
    changed = batch([g.with_features(x=v) for g, v in zip(graphs, x)])
    np.testing.assert_array_equal(changed.x, np.concatenate(x).astype(np.float32))
    assert_same_graph(changed, Graph(**{**union_of(parts), "x": np.concatenate(x)}))


@pytest.mark.parametrize("parts, message", [
    ([Graph([[0], [1]], x=np.ones((2, 3))), Graph([[0], [1]])], "only some have x"),
    ([Graph([[0], [1]], x=np.ones((2, 3))), Graph([[0], [1]], x=np.ones((2, 4)))], "differ in width"),
    ([Graph([[0], [1]], edge_x=np.ones((1, 2))), Graph([[0], [1]])], "only some have edge_x"),
    ([Graph([[0], [1]], edge_type=[1]), Graph([[0], [1]])], "only some have edge types"),
    ([Graph([[0], [1]]), Graph([[0], [1]], edge_type=np.zeros(1, np.int64))], "only some have edge types"),
    ([], "empty list"),
])
def test_batch_keeps_its_checks(parts, message):
    with pytest.raises(ValueError, match=message):
        batch(parts)


def test_batch_checks_parts_it_converts():
    with pytest.raises(ValueError, match="outside"):
        batch([Graph([[0], [1]]), {"edge_index": [[0], [5]], "num_nodes": 2}])
    with pytest.raises(TypeError, match="expected a graph"):
        batch([Graph([[0], [1]]), "not a graph"])


# -- forests -----------------------------------------------------------------------

def bracket_tree(rng, depth: int, arity: int) -> str:
    """A random tree `(label child ...)`, labels on about two nodes of three."""
    label = f"{int(rng.integers(0, 5))} " if rng.random() < 0.7 else ""
    if depth == 0 or rng.random() < 0.3:
        return f"({label}{int(rng.integers(0, 50))})"
    kids = " ".join(bracket_tree(rng, depth - 1, arity) for _ in range(int(rng.integers(1, arity + 1))))
    return f"({label}{kids})"


def reference_concat(forests: list[Forest]) -> dict:
    """The union's fields, computed the plain way: every node with its height and
    tree, sorted by height, then tree, then position in the parts."""
    nodes = [f.nodes for f in forests]
    off = np.cumsum([0] + nodes)
    tree_off = np.cumsum([0] + [f.trees for f in forests])
    n, a = int(off[-1]), max(f.arity for f in forests)
    height = np.concatenate([f.height for f in forests])
    tree = np.concatenate([f.tree_of + tree_off[k] for k, f in enumerate(forests)])
    order = np.lexsort((np.arange(n), tree, height))
    pos = np.empty(n, np.int64)
    pos[order] = np.arange(n)
    children = np.full((n, a), -1)
    words = np.zeros(n, np.int64)
    labels = np.full(n, -1)
    features = np.zeros((n, forests[0].features.shape[1])) if forests[0].features is not None else None
    for k, f in enumerate(forests):
        rows = slice(off[k], off[k + 1])
        children[rows, :f.arity] = np.where(f.children >= 0, f.children + off[k], -1)
        if f.labels is not None:
            labels[rows] = f.labels
        if f.words is not None:
            words[off[k]:off[k] + f.leaves] = f.words          # the leaves are a forest's first rows
        else:
            features[off[k]:off[k] + f.leaves] = f.features
    leaves = int(np.sum(height == 0))
    return {"children": np.where(children >= 0, pos[children], -1)[order], "height": height[order],
            "level_end": np.cumsum(np.bincount(height)), "tree_of": tree[order],
            "roots": pos[np.concatenate([f.roots + off[k] for k, f in enumerate(forests)])],
            "words": words[order][:leaves] if features is None else None,
            "features": features[order][:leaves] if features is not None else None,
            "labels": labels[order] if any(f.labels is not None for f in forests) else None,
            "index": pos[np.concatenate([f.index + off[k] for k, f in enumerate(forests)])],   # as each part numbers them
            "max_word": max(f.max_word for f in forests)}


def assert_same_forest(got: Forest, want: dict, skip=()) -> None:
    for field in FOREST_FIELDS:
        if field in skip:
            continue
        a, b = getattr(got, field), want[field]
        assert (a is None) == (b is None), field
        if isinstance(a, np.ndarray):
            assert a.dtype == (np.float32 if field == "features" else np.int32), field
            np.testing.assert_array_equal(a, b, err_msg=field)
        else:
            assert a == b, field


def test_concat_is_the_union_built_the_plain_way():
    rng = np.random.default_rng(11)
    for trial in range(30):
        texts = [" ".join(bracket_tree(rng, int(rng.integers(0, 6)), int(rng.integers(1, 4)))
                          for _ in range(int(rng.integers(1, 3))))          # one or two trees a string
                 for _ in range(int(rng.integers(2, 12)))]
        texts[0] = "(3 7)" if trial % 2 else "(7)"                           # a single node
        parts = [Forest.from_brackets(t) for t in texts]
        if trial % 3 == 0:                                                   # some parts without labels
            parts[1] = Forest.from_tuples([(1, (2, 3)), 4, ((5,), 6, 7)])
            parts.append(Forest.from_arrays([[-1, -1], [-1, -1], [0, 1]], [8, 9, 0]))
        got = Forest.concat(parts)
        assert_same_forest(got, reference_concat(parts))
        assert_sealed([getattr(got, k) for k in FOREST_FIELDS if isinstance(getattr(got, k), np.ndarray)])
        if trial % 3:
            # and the same forest as parsing every string at once, `index` too
            whole = Forest.from_brackets(texts)
            assert_same_forest(got, {k: getattr(whole, k) for k in FOREST_FIELDS})


def test_concat_of_feature_forests_and_of_concats():
    rng = np.random.default_rng(2)

    def leaf():
        return rng.normal(size=4).astype(np.float32)

    trees = [(leaf(), (leaf(), leaf())), leaf(), ((leaf(),), leaf(), leaf()), (leaf(), leaf())]
    parts = [Forest.from_tuples([t]) for t in trees]
    got = Forest.concat(parts)
    assert_same_forest(got, reference_concat(parts))
    assert_same_forest(got, {k: getattr(Forest.from_tuples(trees), k) for k in FOREST_FIELDS})
    nested = Forest.concat([Forest.concat(parts[:2]), Forest.concat(parts[2:])])
    assert_same_forest(nested, {k: getattr(got, k) for k in FOREST_FIELDS})
    restored = pickle.loads(pickle.dumps(got))
    assert_same_forest(restored, {k: getattr(got, k) for k in FOREST_FIELDS})
    assert_same_forest(Forest.concat([pickle.loads(pickle.dumps(p)) for p in parts]), reference_concat(parts))


def test_concat_keeps_its_checks():
    words, feats = Forest.from_tuples([(1, 2)]), Forest.from_tuples([(np.ones(2), np.ones(2))])
    with pytest.raises(ValueError, match="same kind of payload"):
        Forest.concat([words, feats])
    with pytest.raises(TypeError, match="Forest objects"):
        Forest.concat([words, "(1 2)"])
    with pytest.raises(ValueError, match="at least one tree"):
        Forest.concat([])
