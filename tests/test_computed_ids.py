"""Row ids that reach an indexing op (`E[ids]`, `onehot(ids, C)`, `h[pick]`) through
other ops: moved (`concat`, `chunk`, `transpose`) or computed (`argmax`).

Kernels clamp an id outside the rows, so such an id was silently another row:
`E[concat(k, j)]` with j = [2, 7] and 5 rows read row 4 for 7 (and training moved
row 4); on a reordered graph `h[concat(pick, more)]` read other nodes, as the
binder mapped only ids that reach `h[...]` directly. Now every such id is refused
or correct, at compile time or before native code runs.
"""
import re

import numpy as np
import pytest

import structc
from structc.build import build_model
from structc.interp import evaluate
from structc.ops import REGISTRY
from structc.syntax import parse
from test_locality import ring

E5 = "  param E: embedding(5, 2) = normal(1)\n"

# source, a good call's inputs, the ids its index reads (numpy), the input to spoil and where
MOVED = {
    "concat": ("model A {\n  input k: i32[2]\n  input j: i32[2]\n" + E5 + "  output s = E[concat(k, j)]\n}",
               {"k": [0, 1], "j": [2, 4]}, lambda k, j: np.concatenate([k, j]), ("j", (1,))),
    "chunk": ("model B {\n  input k: i32[N, 2]\n" + E5 + "  output s = E[reshape(chunk(k, 1, 2), N)]\n}",
              {"k": [[0, 3], [1, 4]]}, lambda k: k[:, 1], ("k", (0, 1))),
    "transpose": ("model T {\n  input k: i32[N, 1]\n" + E5 + "  output s = E[reshape(transpose(k), N)]\n}",
                  {"k": [[4], [2]]}, lambda k: k[:, 0], ("k", (1, 0))),
    "onehot of a concat": ("model P {\n  input k: i32[2]\n  output s = onehot(concat(k, k), 5)\n}",
                           {"k": [0, 4]}, lambda k: np.concatenate([k, k]), ("k", (1,))),
}


MOVED_SOURCE = {structc.syntax.parse(source, "m.snet").models[0].name: source for source, *_ in MOVED.values()}


@pytest.fixture(scope="module", params=sorted(MOVED))
def moved(request):
    source, good, ids, spoil = MOVED[request.param]
    return structc.compile(source), good, ids, spoil


@pytest.mark.parametrize("path", ["fast", "python"])
def test_ids_moved_by_other_ops_are_checked_like_given_ids(moved, path):
    """E[concat(k, j)] with j = [2, 7] gave E[4] for 7; onehot(concat(k, k), 5) of 7 a row of zeros."""
    net, good, ids, (name, at) = moved
    arrays = {k: np.array(v, np.int32) for k, v in good.items()}
    want = ids(*arrays.values())
    out = net(**arrays)
    table = net.params["E"] if "E" in net.params else np.eye(5, dtype=np.float32)
    np.testing.assert_array_equal(out, table[want])
    for bad in (7, -1):
        spoilt = {k: v.copy() for k, v in arrays.items()}
        spoilt[name][at] = bad
        if path == "python":        # not contiguous: the Python path takes the call
            spoilt[name] = np.stack([spoilt[name], spoilt[name]], axis=-1)[..., 0]
        where = re.escape(str(at))
        with pytest.raises(ValueError, match=rf"input '{name}': id {bad} at position {where} is outside \[0, 5\)"):
            net(**spoilt)


def test_training_refuses_a_moved_id_outside_before_anything_changes():
    net = structc.compile("model TR {\n  input k: i32[2]\n  input j: i32[2]\n  target y: class[4] of 2\n" + E5
                          + "  loss cross_entropy(E[concat(k, j)], y)\n}")
    before = net.params["E"].copy()
    k, y = np.array([0, 1], np.int32), np.zeros(4, np.int32)
    with pytest.raises(ValueError, match=r"input 'j': id 7 at position \(1,\) is outside \[0, 5\)"):
        net.train_step(lr=0.5, k=k, j=np.array([2, 7], np.int32), y=y)
    np.testing.assert_array_equal(net.params["E"], before)
    net.train_step(lr=0.5, k=k, j=np.array([2, 4], np.int32), y=y)
    assert set(np.where((net.params["E"] != before).any(axis=1))[0]) == {0, 1, 2, 4}


GRAPH = """
model Pick {
  input  g: graph(features=3)
  input  pick: i32[2]
  input  more: i32[2]
  h = tanh(dense(g.x, 4) + sum(dense(g.x, 4) over g.edges))
  %s
}
"""


@pytest.fixture(scope="module")
def graphs():
    g = ring(np.random.default_rng(6), n=40, m=120, reach=3)
    r = g.reordered()
    assert not np.array_equal(r.node_order, np.arange(40))
    return g, r


def test_node_ids_moved_by_concat_name_nodes_of_a_reordered_graph(graphs):
    """h[concat(pick, more)] read the rows of a reordered graph at the given ids: other nodes."""
    g, r = graphs
    net = structc.compile(GRAPH % "output picked = h[concat(pick, more)]", seed=5)
    ids = {"pick": np.array([0, 7], np.int32), "more": np.array([39, 12], np.int32)}
    np.testing.assert_allclose(net(g=r, **ids), net(g=g, **ids), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"input 'more': id 40 .* outside \[0, 40\)"):
        net(g=r, pick=ids["pick"], more=np.array([1, 40], np.int32))


@pytest.mark.parametrize("uses", ["output back = pick", "output plus = pick + 0"])
def test_node_ids_also_used_as_values_refuse_a_reordered_graph(graphs, uses):
    """The binder renumbers node ids into a reordered graph's rows; an output `pick`
    gave those rows ([22, 25] for [0, 7]), `pick + 0` too. Such a model now refuses a
    reordered graph (and a data set keeps the graph in node order), naming the input."""
    g, r = graphs
    source = (GRAPH % f"output picked = h[pick]\n  {uses}").replace("  input  more: i32[2]\n", "")
    net = structc.compile(source, seed=5)
    pick = np.array([0, 7], np.int32)
    plain = net.forward(g=g, pick=pick)
    if "back" in plain or "plus" in plain:
        np.testing.assert_array_equal(plain.get("back", plain.get("plus")), pick)
    with pytest.raises(ValueError, match=r"'pick' holds ids of g's nodes that are also used as values .*"
                                         r"pass g in node order"):
        net.forward(g=r, pick=pick)
    assert structc.graphs.Binder.from_meta(net.meta).needs_node_order("g")
    alone = structc.compile(GRAPH.replace("  input  more: i32[2]\n", "") % "output picked = h[pick]", seed=5)
    assert not structc.graphs.Binder.from_meta(alone.meta).needs_node_order("g")


# -- ids an op computes: argmax's positions, checked against the rows when the model is built

@pytest.mark.parametrize("source, where", [
    ("model G {\n  input x: f32[N, 10]\n" + E5 + "  output s = E[argmax(x)]\n}", (4, 14)),
    ("model S {\n  input x: f32[N, M]\n" + E5 + "  output s = E[argmax(x)]\n}", (4, 14)),
    ("model R {\n  input x: f32[N, 1, 10]\n" + E5 + "  output s = E[reshape(argmax(x), N)]\n}", (4, 14)),
    ("model O {\n  input x: f32[N, 10]\n  output s = onehot(argmax(x), 3)\n}", (3, 14)),
], ids=["gather", "symbolic", "through a reshape", "onehot"])
def test_ids_computed_past_the_rows_are_refused_when_the_model_is_built(source, where):
    """E[argmax(x)] over 10 columns into 5 rows read E[4] for argmax 7 (and trained it);
    onehot(argmax(x), 3) gave a row of zeros. Refused at the index's span, for native
    code and the interpreter alike (both take the model from `build_model`)."""
    with pytest.raises(structc.SnetError, match=r"row ids computed by argmax lie in \[0, (10|M)\), but pick "
                                                 r"from \[0, (5|3)\)") as info:
        build_model(parse(source, "m.snet"))
    assert (info.value.span.line, info.value.span.col) == where
    with pytest.raises(structc.SnetError, match="row ids computed by argmax"):
        structc.compile(source, cache=False)


def test_ids_computed_within_the_rows_are_read_as_computed():
    source = "model G {\n  input x: f32[N, 5]\n" + E5 + "  output s = E[argmax(x)]\n  output t = onehot(argmax(x), 5)\n}"
    net = structc.compile(source)
    x = np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32)
    want = np.argmax(x, axis=1)
    out = net.forward(x=x)
    np.testing.assert_array_equal(out["s"], net.params["E"][want])
    np.testing.assert_array_equal(out["t"], np.eye(5)[want])
    ref = evaluate(build_model(parse(source, "m.snet")).graph, {"x": x}, {"E": net.params["E"]}, dtype=np.float32)
    np.testing.assert_array_equal(ref["s"], out["s"])


def test_an_op_computing_ids_of_no_known_range_is_refused(monkeypatch):
    """An op's `id_range` None (the default: a new op that makes integers) is refused, not trusted."""
    monkeypatch.setattr(type(REGISTRY["argmax"]), "id_range", lambda self, graph, node: None)
    with pytest.raises(structc.SnetError, match=r"row ids computed by argmax have no known range"):
        build_model(parse("model G {\n  input x: f32[N, 5]\n" + E5 + "  output s = E[argmax(x)]\n}", "m.snet"))


def test_positions_along_the_nodes_refuse_a_reordered_graph(graphs):
    """argmax over the nodes gives rows: of a reordered graph, other nodes ([33, 32, ...]
    where the graph as given gave [32, 22, ...])."""
    g, r = graphs
    source = (GRAPH % "output hh = h\n  output best = argmax(transpose(h))\n  output top = h[argmax(transpose(h))]"
              ).replace("  input  pick: i32[2]\n  input  more: i32[2]\n", "")
    net = structc.compile(source, seed=5)
    out = net.forward(g=g)
    np.testing.assert_array_equal(out["best"], np.argmax(out["hh"], axis=0))
    np.testing.assert_array_equal(out["top"], out["hh"][out["best"]])
    with pytest.raises(ValueError, match=r"positions along g.nodes \(argmax over g's nodes\).*pass g in node order"):
        net.forward(g=r)
    assert structc.graphs.Binder.from_meta(net.meta).needs_node_order("g")


@pytest.mark.parametrize("path", ["fast", "python"])
def test_ids_in_a_block_of_an_input_are_checked_in_that_block_only(path):
    """k's columns are ids into tables of 5 and 40 rows (a word and a tag, say): each
    column is checked against its own table, not both against the smaller one, on
    the C call plan (the blocks checked first) and the Python path, in training too."""
    net = structc.compile("model W {\n  input k: i32[N, 2]\n  target y: class[N] of 2\n" + E5
                          + "  param F: embedding(40, 2)\n"
                          "  s = E[reshape(chunk(k, 0, 2), N)] + F[reshape(chunk(k, 1, 2), N)]\n"
                          "  output s\n  loss cross_entropy(s, y)\n}")
    k, y = np.array([[4, 39], [0, 20]], np.int32), np.zeros(2, np.int32)
    np.testing.assert_allclose(net(k=k), net.params["E"][k[:, 0]] + net.params["F"][k[:, 1]])
    net.train_step(k=k, y=y)
    assert net._forward_plan is not structc.model._NO_PLAN and net._train_plan is not structc.model._NO_PLAN
    before = {name: p.copy() for name, p in net.params.items()}
    for at, bad, rows in (((1, 0), 5, 5), ((0, 1), 40, 40), ((1, 1), -1, 40)):
        spoilt = k.copy()
        spoilt[at] = bad
        if path == "python":        # not contiguous: the Python path takes the call
            spoilt = np.stack([spoilt, spoilt], axis=-1)[..., 0]
        for call in (net, net.forward, lambda **kw: net.train_step(y=y, **kw), lambda **kw: net.grad(y=y, **kw),
                     lambda **kw: net.grad_into_arena(y=y, **kw)):
            with pytest.raises(ValueError, match=rf"input 'k': id {bad} at position {re.escape(str(at))} is "
                                                 rf"outside \[0, {rows}\)"):
                call(k=spoilt)
    assert all(np.array_equal(p, before[name]) for name, p in net.params.items())


def test_the_interpreter_refuses_the_ids_native_code_refuses(moved):
    """`interp.evaluate` (the meaning of a graph) clamped as the kernels do, so it gave
    E[4] for id 7 where `Net` refuses it: now both refuse, and agree on good ids."""
    net, good, ids, (name, at) = moved
    graph = build_model(parse(MOVED_SOURCE[net.name], "m.snet")).graph
    arrays = {k: np.array(v, np.int32) for k, v in good.items()}
    np.testing.assert_array_equal(evaluate(graph, arrays, net.params, dtype=np.float32)["s"], net(**arrays))
    arrays[name][at] = 7
    with pytest.raises(ValueError, match=r"input '.*': id 7 at position .* is outside \[0, 5\)"):
        net(**arrays)
    with pytest.raises(ValueError, match=r"(gather_rows|onehot) at \d+:\d+: id 7 is outside \[0, 5\)"):
        evaluate(graph, arrays, net.params, dtype=np.float32)


def test_positions_along_the_edges_are_the_edges_as_given_or_refused():
    """Native code keeps edges by destination: argmax over the edges gave that place
    (1 for the given edge 2, of [[0, 1, 2, 3], [1, 0, 0, 2]]). Refused unless the edges
    were given in that order, where the positions are the edges as given."""
    net = structc.compile("model E {\n  input g: graph(features=3)\n  input ew: f32[g.edges, 1]\n"
                          "  output best = argmax(transpose(ew))\n}")
    x, ew = np.zeros((4, 3), np.float32), np.array([[0], [0], [9], [0]], np.float32)
    given = structc.Graph(np.array([[0, 1, 2, 3], [1, 0, 0, 2]]), num_nodes=4, x=x)
    with pytest.raises(ValueError, match=r"positions along g.edges \(argmax over g's edges\).*sorted by destination"):
        net(g=given, ew=ew)
    by_destination = structc.Graph(np.array([[1, 2, 0, 3], [0, 0, 1, 2]]), num_nodes=4, x=x)
    np.testing.assert_array_equal(net(g=by_destination, ew=ew), [2])


def test_pairs_of_node_ids_in_the_columns_of_one_input_name_nodes_of_a_reordered_graph(graphs):
    """Link prediction's pairs [K, 2]: each column, a chunk, picks h's rows. Chunks were
    not followed, so a reordered graph's rows were read at the given ids: other nodes."""
    g, r = graphs
    net = structc.compile((GRAPH % "a = h[reshape(chunk(pairs, 0, 2), K)]\n  b = h[reshape(chunk(pairs, 1, 2), K)]\n"
                           "  output score = sum(a * b, axes=1)").replace("  input  pick: i32[2]\n  input  more: "
                                                                      "i32[2]\n", "  input  pairs: i32[K, 2]\n"),
                          seed=5)
    pairs = np.array([[0, 7], [39, 12], [5, 5]], np.int32)
    np.testing.assert_allclose(net(g=r, pairs=pairs), net(g=g, pairs=pairs), rtol=1e-5, atol=1e-6)
    assert not structc.graphs.Binder.from_meta(net.meta).needs_node_order("g")
    with pytest.raises(ValueError, match=r"input 'pairs': id 40 at position \(1, 1\) is outside \[0, 40\)"):
        net(g=r, pairs=np.array([[0, 7], [39, 40]], np.int32))


@pytest.mark.parametrize("path", ["fast", "python"])
def test_ids_in_a_block_taken_after_a_concat_or_transpose_are_checked_in_that_block_only(path):
    """chunk(concat(a, b, axis=1), 1, 2) reads b alone and chunk(transpose(k), 0, 2) k's
    first row alone: a, and k's second row, may hold anything. The check covered
    every input the block was cut from (a of 9 refused, 'id 9 at position (0, 0)'),
    refusing valid calls; now it covers the block, and still refuses a bad id in it."""
    net = structc.compile("model C {\n  input a: i32[N, 1]\n  input b: i32[N, 1]\n  input k: i32[2, 3]\n" + E5
                          + "  output o = E[reshape(chunk(concat(a, b, axis=1), 1, 2), N)]\n"
                          "  output p = E[reshape(chunk(transpose(k), 0, 2), 3)]\n}")
    a, b = np.array([[9], [-3]], np.int32), np.array([[1], [4]], np.int32)
    k = np.array([[1, 2, 3], [9, 9, -1]], np.int32)

    def call(**kw):
        if path == "python":        # not contiguous: the Python path takes the call
            kw = {n: np.stack([v, v], axis=-1)[..., 0] for n, v in kw.items()}
        return net.forward(**kw)
    out = call(a=a, b=b, k=k)
    np.testing.assert_array_equal(out["o"], net.params["E"][b[:, 0]])
    np.testing.assert_array_equal(out["p"], net.params["E"][k[0]])
    with pytest.raises(ValueError, match=r"input 'b': id 5 at position \(1, 0\) is outside \[0, 5\)"):
        call(a=a, b=np.array([[1], [5]], np.int32), k=k)
    with pytest.raises(ValueError, match=r"input 'k': id 7 at position \(0, 2\) is outside \[0, 5\)"):
        call(a=a, b=b, k=np.array([[1, 2, 7], [9, 9, -1]], np.int32))


def test_positions_along_a_forest_or_sequences_are_rows_of_its_per_node_outputs():
    """argmax over t.nodes gives schedule rows, the rows h(t.nodes) is in (README:
    np.argsort(f.index) maps one to the node as given), as the interpreter does;
    over s.positions, positions in the order given, as each sequence alone gives."""
    from structc.forest import Forest, Vocab
    from structc.seqdata import Sequences
    source = ("model F {\n  input t: forest(arity=2) of word(vocab=5)\n" + E5 +
              "  rec h(n) = leaf: E[n.word]\n             node: tanh(dense(concat(h(n.left), h(n.right)), 2))\n"
              "  output o = h(t.nodes)\n  output a = argmax(h(t.nodes), axis=0)\n}")
    tree = structc.compile(source, seed=3)
    f = Forest.from_brackets(["(1 (0 a) (1 (0 b) (0 zz)))", "(0 c)", "(1 (0 d) (1 a))"],
                             Vocab.build(["a", "b", "c", "d"], unk="<unk>"))
    assert not np.array_equal(f.index, np.arange(f.nodes))     # the schedule is not the order given
    out = tree.forward(t=f)
    np.testing.assert_array_equal(out["a"], np.argmax(out["o"], axis=0))
    np.testing.assert_array_equal(np.argsort(f.index)[out["a"]], np.argmax(out["o"][f.index], axis=0))
    arrays, _ = tree._expanded({"t": f})
    want = evaluate(build_model(parse(source, "f.snet")).graph, arrays, tree.params, dtype=np.float32)
    np.testing.assert_array_equal(want["a"], out["a"])
    seq = structc.compile("model Q {\n  input s: sequence of f32[2]\n"
                          "  rec h(t) = first: tanh(dense(t.x, 3))\n       next: tanh(dense(concat(t.x, h(t.prev)), 3))\n"
                          "  output o = h(s.steps)\n  output a = argmax(h(s.steps), axis=0)\n}", seed=3)
    parts = [np.random.default_rng(k).normal(size=(k, 2)) for k in (3, 1, 5, 2)]
    out = seq.forward(s=Sequences.from_list(parts))
    alone = np.concatenate([seq.forward(s=Sequences.from_list([p]))["o"] for p in parts])
    np.testing.assert_array_equal(out["a"], np.argmax(alone, axis=0))
