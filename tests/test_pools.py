"""Data sets' pools: `ForestPool.take` and `GraphPool.take` give bit for bit
what `Forest.concat` and `batch` of the same items give (and what the plain
constructions in test_batching give), on random items drawn by hypothesis."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from structc import Forest, Graph, batch
from structc.forest import ForestPool
from structc.graphs import GraphPool
from test_batching import FOREST_FIELDS, assert_same_forest, assert_same_graph, reference_concat, union_of

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SOME = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_identical_forests(got: Forest, want: Forest) -> None:
    """Every field equal, dtype and shape included, and the same sealed buffer."""
    for field in FOREST_FIELDS + ("node_words", "node_features"):
        a, b = getattr(got, field), getattr(want, field)
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            assert a is not None and b is not None, field
            assert a.dtype == b.dtype and a.shape == b.shape, field
            np.testing.assert_array_equal(a, b, err_msg=field)
        else:
            assert a == b, field
    assert got._sizes == want._sizes
    np.testing.assert_array_equal(got._flat, want._flat)


def random_forest(rng, kind: str) -> Forest:
    """One to three trees of mixed arity (1-3), single-node trees among them, some
    labelled; leaves carry words or features; with `inner`, every node carries one."""
    n = int(rng.integers(1, 14))
    children = np.full((n, 3), -1)
    free = []                                      # nodes without a parent yet
    for i in range(n):
        k = int(rng.integers(0, min(3, len(free)) + 1)) if rng.random() < 0.7 else 0
        picks = sorted(rng.choice(len(free), size=k, replace=False).tolist(), reverse=True)
        kids = [free.pop(j) for j in picks]
        children[i, :k] = kids
        free.append(i)
    children = children[:, :max(1, int((children >= 0).sum(axis=1).max()))]    # the forest's own arity
    labels = rng.integers(-1, 5, size=n) if rng.random() < 0.6 else None
    inner = kind.startswith("inner")
    if kind.endswith("features"):
        return Forest.from_arrays(children, features=rng.normal(size=(n, 3)), labels=labels, inner=inner)
    return Forest.from_arrays(children, rng.integers(0, 40, size=n), labels=labels, inner=inner)


@SOME
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["words", "features", "inner words",
                                                               "inner features"]),
       size=st.integers(1, 12), picks=st.integers(1, 20))
def test_forest_pool_takes_what_concat_gives(seed, kind, size, picks):
    rng = np.random.default_rng(seed)
    forests = [random_forest(rng, kind) for _ in range(size)]
    if kind == "words" and size > 2:               # a part built another way: brackets, several trees
        forests[1] = Forest.from_brackets("(3 (1 4) (2 5 6 7)) (8) (1 (2 9))")
    pool = ForestPool(forests)
    items = rng.integers(0, size, size=picks)      # any order, repeats allowed
    got = pool.take(items)
    want = Forest.concat([forests[k] for k in items])
    assert_identical_forests(got, want)
    assert_same_forest(got, reference_concat([forests[k] for k in items]))


def test_forest_pool_of_mixed_inner_payloads_and_its_checks():
    rng = np.random.default_rng(3)
    plain, inner = random_forest(rng, "words"), random_forest(rng, "inner words")
    pool = ForestPool([plain, inner, inner])
    for items in ([0, 1], [1, 2], [2, 1, 0], [1]):
        assert_identical_forests(pool.take(items), Forest.concat([pool.forests[k] for k in items]))
    assert pool.take([1]) is inner                 # one item: that forest, as concat gives
    with pytest.raises(ValueError, match="outside the pool"):
        pool.take([0, 3])
    with pytest.raises(ValueError, match="at least one tree"):
        pool.take([])
    with pytest.raises(TypeError, match="positions in the pool"):
        pool.take([0.5, 1.0])
    with pytest.raises(ValueError, match="same kind of payload"):
        ForestPool([plain, random_forest(rng, "features")])
    with pytest.raises(TypeError, match="Forest objects"):
        ForestPool([plain, "(1 2)"])


def random_graph_args(rng, kind: str) -> dict:
    """Graph's arguments: isolated nodes, graphs without edges, batches inside, edge
    types and features."""
    n = int(rng.integers(1, 9))
    m = 0 if rng.random() < 0.25 else int(rng.integers(0, 3 * n))
    g = int(rng.integers(1, n + 1)) if rng.random() < 0.3 else 1
    args = {"edge_index": rng.integers(0, n, size=(2, m)), "num_nodes": n, "x": rng.normal(size=(n, 2))}
    if g > 1:
        args.update(graph_id=np.sort(rng.integers(0, g, size=n)), num_graphs=g)
    if "types" in kind:
        args["edge_type"] = rng.integers(0, 3, size=m)
    if "edge_x" in kind:
        args["edge_x"] = rng.normal(size=(m, 2))
    return args


def random_graph(rng, kind: str) -> Graph:
    return Graph(**random_graph_args(rng, kind))


@SOME
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["plain", "types", "edge_x types"]),
       size=st.integers(1, 10), picks=st.integers(1, 16))
def test_graph_pool_takes_what_batch_gives(seed, kind, size, picks):
    rng = np.random.default_rng(seed)
    args = [random_graph_args(rng, kind) for _ in range(size)]
    graphs = [Graph(**a) for a in args]
    pool = GraphPool(graphs)
    items = rng.integers(0, size, size=picks)
    got, want = pool.take(items), batch([graphs[k] for k in items])
    if picks > 1:                                  # and the union built the plain way
        assert_same_graph(got, Graph(**union_of([args[k] for k in items])))
    assert_same_graph(got, want)
    assert got._sizes == want._sizes
    for block in ("_edges", "_nodes"):
        np.testing.assert_array_equal(getattr(got, block), getattr(want, block))


def test_graph_pool_checks():
    rng = np.random.default_rng(5)
    plain, typed = random_graph(rng, "plain"), random_graph(rng, "types")
    pool = GraphPool([plain, plain])
    assert pool.take(np.array([1])) is plain
    with pytest.raises(ValueError, match="outside the pool"):
        pool.take([2])
    with pytest.raises(ValueError, match="empty"):
        pool.take([])
    with pytest.raises(ValueError, match="edge types"):
        GraphPool([plain, typed])


def test_pool_batches_are_sealed_and_items_checked():
    from test_batching import assert_sealed
    rng = np.random.default_rng(6)
    forests = ForestPool([random_forest(rng, "inner features") for _ in range(3)])
    got = forests.take([2, 0, 2])
    assert_sealed([got.children, got.words if got.words is not None else got.features, got.roots, got.level_end,
                   got.index, got.tree_of, got.node_features, got._flat])
    graphs = GraphPool([random_graph(rng, "edge_x types") for _ in range(3)])
    got = graphs.take([1, 1, 0])
    assert_sealed(got.arrays.values())
    assert_sealed([got.x, got.edge_x, got.order])
    for pool in (forests, graphs):
        for bad in ([0, 3], [-1], [3], np.array([0, 2**63], np.uint64)):
            with pytest.raises(ValueError, match="outside the pool"):
                pool.take(bad)
        with pytest.raises(ValueError, match="outside the pool"):
            pool.take_many([[0, 1], [1, -2]])
        with pytest.raises(TypeError, match="positions"):
            pool.take(np.zeros((2, 1), int))
    every_other = np.array([2, 9, 0, 9, 1], np.int64)[::2]      # not contiguous
    assert_identical_forests(forests.take(every_other), Forest.concat([forests.forests[k] for k in [2, 0, 1]]))
    assert_same_graph(graphs.take(every_other), batch([graphs.graphs[k] for k in [2, 0, 1]]))
    assert_same_graph(graphs.take(np.array([1, 2], np.uint8)), batch([graphs.graphs[k] for k in [1, 2]]))


def test_pools_refuse_arrays_that_would_lead_out_of_bounds():
    """The C assembly reads indices from the pool's arrays: each is checked against
    the array it indexes (an error, never a read outside it)."""
    rng = np.random.default_rng(7)
    forests = [Forest.from_brackets("(1 (2 3) (4 5 6))"), Forest.from_brackets("(7 8) (9 (1 2))")]

    def spoiled(change):
        pool = ForestPool(forests)
        change(pool)
        with pytest.raises(ValueError, match="inconsistent pool"):
            pool.take([0, 1])

    spoiled(lambda p: p._block.__setitem__((4, 0), 5))          # a child before its forest's first node
    spoiled(lambda p: p._roots.__setitem__(0, 10**6))           # a root outside the pool
    spoiled(lambda p: p._height.__setitem__(0, 200))            # a level past the forest's size
    spoiled(lambda p: p._items.__setitem__((1, 8), 10**6))      # an item's rows outside the pool
    spoiled(lambda p: p._items.__setitem__((1, 6), 5))          # wider than the children's columns
    spoiled(lambda p: p._block.__setitem__((0, p._width + 3), 7))   # a node's number past its forest's nodes

    def spoiled_graphs(change):
        pool = GraphPool([random_graph(rng, "plain") for _ in range(2)])
        change(pool)
        with pytest.raises(ValueError, match="inconsistent pool"):
            pool.take([0, 1])

    spoiled_graphs(lambda p: p._nodes.__setitem__((3, 0), 7))      # a graph id past the item's graphs
    spoiled_graphs(lambda p: p._starts.__setitem__((1, 0), 10**6))  # an item's nodes outside the pool
    spoiled_graphs(lambda p: p._counts.__setitem__((1, 1), 10**6))  # more edges than the pool holds


def test_data_sets_batch_from_their_pool_and_see_changes():
    from structc.treedata import TreeDataset
    data = TreeDataset("t", ["(1 (0 2) (1 3))", "(0 4)", "(1 (1 5) (0 (1 2) 3))"], ["(0 1)"],
                       {str(k): k for k in range(6)})
    pool = data.pool()
    assert data.pool() is pool                     # built once
    data.train[1] = Forest.from_brackets("(1 (0 5) (1 5))")
    fresh = data.pool()                            # a forest was replaced: not the stale pool
    assert fresh is not pool and fresh.forests[1] is data.train[1]
    assert_identical_forests(fresh.take([2, 1, 0]), Forest.concat([data.train[k] for k in (2, 1, 0)]))
    data.train.append(Forest.from_brackets("(0 (1 1) 2)"))
    assert len(data.pool()) == 4


@SOME
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["words", "features", "inner words",
                                                               "inner features"]),
       size=st.integers(1, 10), batches=st.integers(1, 6))
def test_forest_pool_takes_many_batches_as_it_takes_each(seed, kind, size, batches):
    rng = np.random.default_rng(seed)
    forests = [random_forest(rng, kind) for _ in range(size)]
    if kind == "words" and size > 1:               # labelled and unlabelled forests, several trees in one
        forests[0] = Forest.from_brackets("(3 (1 4) (2 5 6 7)) (8) (1 (2 9))")
    pool = ForestPool(forests)
    wanted = [rng.integers(0, size, size=int(rng.integers(1, 7))) for _ in range(batches)]
    got = pool.take_many(wanted)
    assert len(got) == len(wanted)
    for forest, items in zip(got, wanted):
        if len(items) == 1:
            assert forest is forests[items[0]]
        else:
            assert_identical_forests(forest, pool.take(items))


@pytest.mark.parametrize("deep", [2**15 - 2, 2**15 + 1])
def test_forest_pool_heights_of_both_widths(deep):
    """A pool keeps heights as int16 while every forest is at most 2**15 levels
    deep, as int32 beyond: the batches are concat's either way."""
    chain = np.full((deep, 1), -1)
    chain[1:, 0] = np.arange(deep - 1)             # node i's child is node i - 1
    forests = [Forest.from_arrays(chain, np.zeros(deep, int)), Forest.from_brackets("(1 2) (3 (4 5))")]
    pool = ForestPool(forests)
    assert pool._height.dtype == (np.int16 if deep <= 2**15 else np.int32)
    for items in ([1, 0, 1], [0, 1], [1, 1]):
        assert_identical_forests(pool.take(items), Forest.concat([forests[k] for k in items]))


def test_take_many_checks_like_take():
    rng = np.random.default_rng(8)
    pool = ForestPool([random_forest(rng, "words") for _ in range(3)])
    with pytest.raises(ValueError, match="at least one tree"):
        pool.take_many([[0, 1], []])
    with pytest.raises(ValueError, match="outside the pool"):
        pool.take_many([[0, 1], [2, 3]])
    assert pool.take_many([]) == []


def test_distributed_feeds_are_the_feeder_s(tmp_path):
    """`distributed.feeds` (forests assembled CHUNK batches at a time) gives what
    `feeder` gives share by share, empty shares ({}) included."""
    import structc
    from structc import distributed as dist
    from structc.treedata import TreeDataset
    rng = np.random.default_rng(9)
    texts = [bracket_text(rng) for _ in range(60)]
    data = TreeDataset("t", texts, texts[:2], {str(k): k for k in range(50)})
    data.bind(structc.compile(ROOTS))
    order = rng.permutation(60)
    shares = [order[at:at + k] for at, k in zip(range(0, 60, 3), rng.integers(0, 4, size=20))]
    assert any(len(s) == 0 for s in shares) and any(len(s) == 1 for s in shares)
    one = dist.feeder(data)
    got = list(dist.feeds(data, shares))
    assert len(got) == len(shares) > dist.CHUNK
    for feed, mine in zip(got, shares):
        want = one(mine)
        assert feed.keys() == want.keys()
        if want:
            assert_identical_forests(feed["t"], want["t"])
            np.testing.assert_array_equal(feed["y"], want["y"])


ROOTS = """
model Roots {
  input  t: forest(arity=3) of word(vocab=50)
  target y: class[t.trees] of 5
  param  E: embedding(50, 4) = normal(0.3)
  rec h(n) = leaf: E[n.word]
             node: tanh(dense(concat(h(n.children)), 4))
  loss cross_entropy(dense(h(t.root), 5), y)
}
"""


def bracket_text(rng) -> str:
    from test_batching import bracket_tree
    text = bracket_tree(rng, int(rng.integers(0, 4)), 3)
    return text if text.startswith("(") and text[1].isdigit() else f"(1 {text})"     # a labelled root


@SOME
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["plain", "types", "edge_x types"]),
       size=st.integers(1, 8), batches=st.integers(1, 5))
def test_graph_pool_takes_many_batches_as_it_takes_each(seed, kind, size, batches):
    rng = np.random.default_rng(seed)
    graphs = [random_graph(rng, kind) for _ in range(size)]
    pool = GraphPool(graphs)
    wanted = [rng.integers(0, size, size=int(rng.integers(1, 6))) for _ in range(batches)]
    for graph, items in zip(pool.take_many(wanted), wanted):
        if len(items) == 1:
            assert graph is graphs[items[0]]
            continue
        want = pool.take(items)
        assert_same_graph(graph, want)
        assert graph._sizes == want._sizes
        for block in ("_edges", "_nodes"):
            np.testing.assert_array_equal(getattr(graph, block), getattr(want, block))
    with pytest.raises(ValueError, match="empty"):
        pool.take_many([[0], []])


@pytest.mark.slow       # loads graph_families and compiles its model
def test_distributed_feeds_of_graphs_are_the_feeder_s():
    import structc
    from structc import datasets, distributed as dist
    data = datasets.load("graph_families")
    data.bind(structc.compile(EXAMPLES / "graph_families.snet"))
    rng = np.random.default_rng(10)
    order = rng.permutation(data.train)
    shares = [order[at:at + k] for at, k in zip(range(0, 200, 5), rng.integers(0, 5, size=40))]
    one = dist.feeder(data)
    got = list(dist.feeds(data, shares))
    assert len(got) == len(shares) > dist.CHUNK and any(not f for f in got)
    for feed, mine in zip(got, shares):
        want = one(mine)
        assert feed.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, Graph):
                assert_same_graph(feed[key], value)
            else:
                np.testing.assert_array_equal(feed[key], value)


def test_forest_binder_binds_a_forest_once_per_declaration():
    """The binder's per-input names and cache key are worked out once; a forest is
    checked and bound once per declaration (the same arrays again), separately
    for another declaration, and refused where it does not fit."""
    from structc.forest import ForestBinder, bind_forest
    forest = Forest.from_brackets("(3 (1 4) 2) (5)")
    binder = ForestBinder([{"name": "t", "arity": 3, "vocab": 6}, {"name": "u", "arity": 2, "vocab": 6}])
    dims: dict = {}
    out = binder.expand({"t": forest, "u": forest, "y": 1}, dims)
    assert sorted(out) == ["t.children", "t.level_end", "t.roots", "t.words",
                           "u.children", "u.level_end", "u.roots", "u.words", "y"]
    assert out["t.children"].shape == (forest.nodes, 3) and out["u.children"].shape == (forest.nodes, 2)
    sizes = (forest.nodes, forest.leaves, forest.trees, forest.levels)
    assert sizes == (4, 3, 2, 2)
    assert dims == {f"{t}.{k}": n for t in "tu" for k, n in zip(("nodes", "leaves", "trees", "levels"), sizes)}
    again = binder.expand({"t": forest, "u": forest}, {})
    assert again["t.children"] is out["t.children"] and again["u.words"] is out["u.words"]
    assert bind_forest("t", forest, {"arity": 3, "vocab": 6})[0]["t.children"] is out["t.children"]
    with pytest.raises(ValueError, match="out of range"):
        ForestBinder([{"name": "t", "arity": 3, "vocab": 5}]).expand({"t": forest}, {})
    with pytest.raises(ValueError, match="declares arity 1"):
        ForestBinder([{"name": "t", "arity": 1, "vocab": 6}]).expand({"t": forest}, {})
    with pytest.raises(TypeError, match="missing input 't'"):
        binder.expand({"u": forest}, {})
