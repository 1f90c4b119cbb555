"""Graph attention (`gat`, ops/attention.py): forward and gradients against a
per-edge numpy reference in float64, on graphs with isolated nodes, self
loops, duplicate edges and a node of high in-degree, one at a time and
batched; what the layer refuses, at its span."""
import numpy as np
import pytest

import structc
from structc.autodiff import differentiate
from structc.build import build_model
from structc.graphs import Binder, Graph, batch
from structc.interp import evaluate
from structc.syntax import parse

FEATURES = 5


def model(width, heads, concat, self_loops, slope=0.2):
    out = width * heads if concat else width
    return f"""
model Att {{
  input  g: graph(features={FEATURES})
  target u: f32[g.nodes, {out}]
  output o = gat(g.x over g.edges, {width}, heads={heads}, concat={str(concat).lower()},
                 self_loops={str(self_loops).lower()}, slope={slope})
  loss sum(o * u)
}}
"""


def reference(p, x, src, dst, n, width, heads, concat, self_loops, slope):
    """GAT edge by edge, float64: e_ij = leaky_relu(a_src·Wh_j + a_dst·Wh_i)
    over each node's incoming edges (and the node itself with self loops)."""
    wh = (x @ p["gat1.w"]).reshape(n, heads, width)
    edges = list(zip(src, dst)) + ([(i, i) for i in range(n)] if self_loops else [])
    out = np.zeros((n, heads, width))
    for i in range(n):
        sources = [j for j, d in edges if d == i]
        if not sources:
            continue                      # no incoming edge: nothing attended, 0
        for h in range(heads):
            e = np.array([p["gat1.a_src"][h] @ wh[j, h] + p["gat1.a_dst"][h] @ wh[i, h] for j in sources])
            e = np.where(e > 0, e, slope * e)
            alpha = np.exp(e - e.max())
            alpha /= alpha.sum()
            out[i, h] = sum(a * wh[j, h] for a, j in zip(alpha, sources))
    out = out.reshape(n, heads * width) if concat else out.mean(axis=1)
    return out + p["gat1.b"]


def odd_graph(rng, n=9):
    """Node 0 gets an edge from every node (and from some twice), node 7 only
    sends, node 8 is isolated, 3 -> 3 is a self loop, 1 -> 2 appears three times."""
    src = [j for j in range(8)] + [2, 5, 1, 1, 1, 3, 4, 6, 2]
    dst = [0] * 8 + [0, 0, 2, 2, 2, 3, 5, 4, 6]
    return np.array(src), np.array(dst), rng.normal(size=(n, FEATURES))


# the first in the fast subset; each compiles a model (1-2 s)
CONFIGS = [(3, 2, True, True)] + [pytest.param(c, marks=pytest.mark.slow)
                                  for c in ((4, 3, False, False), (16, 4, True, False), (3, 1, True, True))]


def params(net, rng):
    return {k: rng.normal(scale=0.6, size=v.shape) for k, v in net.params.items()}


def _config_id(c):
    return "w{}-h{}-{}-{}".format(c[0], c[1], "concat" if c[2] else "mean", "loops" if c[3] else "noloops")


@pytest.fixture(scope="module", params=CONFIGS, ids=_config_id)
def gat(request):
    width, heads, concat, loops = request.param
    src = model(width, heads, concat, loops)
    return request.param, structc.compile(src, seed=3), build_model(parse(src))


def _feed(net, graph, u):
    user = {"g": graph, "u": u}
    return user, Binder(net.meta["graphs"]).expand(user, {})


def _numeric_grads(f, p, h=1e-6):
    out = {}
    for k, v in p.items():
        g = np.zeros_like(v)
        for i in np.ndindex(v.shape):
            plus, minus = {**p, k: v.copy()}, {**p, k: v.copy()}
            plus[k][i] += h
            minus[k][i] -= h
            g[i] = (f(plus) - f(minus)) / (2 * h)
        out[k] = g
    return out


def test_forward_and_gradients_match_the_per_edge_reference(gat):
    (width, heads, concat, loops), net, mdef = gat
    rng = np.random.default_rng(width + heads)
    src, dst, x = odd_graph(rng)
    n = len(x)
    p = params(net, rng)
    for k, v in p.items():
        net.params[k][...] = v
    graph = Graph(np.stack([src, dst]), num_nodes=n, x=x)
    want = reference(p, x, src, dst, n, width, heads, concat, loops, 0.2)
    got = net.forward(g=graph)["o"]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    if not loops:                                 # node 7 and 8 receive nothing: just the bias
        np.testing.assert_allclose(got[7:], np.broadcast_to(p["gat1.b"], got[7:].shape), rtol=1e-6, atol=1e-6)

    u = rng.normal(size=want.shape)
    numeric = _numeric_grads(lambda q: float(np.sum(reference(q, x, src, dst, n, width, heads, concat, loops, 0.2)
                                                    * u)), p)
    user, arrays = _feed(net, graph, u.astype(np.float32))
    interp = evaluate(differentiate(mdef.graph), arrays, p)      # the VJP graph in float64
    _, native = net.grad(**user)
    for k in p:
        np.testing.assert_allclose(interp[f"grad:{k}"], numeric[k], rtol=1e-5, atol=1e-6, err_msg=k)
        scale = max(1.0, float(np.abs(numeric[k]).max()))
        np.testing.assert_allclose(native[k], numeric[k], rtol=2e-3, atol=2e-4 * scale, err_msg=k)


def test_a_batch_is_each_graph_on_its_own(gat):
    (width, heads, concat, loops), net, _ = gat
    rng = np.random.default_rng(1)
    parts = []
    for n, m in ((6, 14), (1, 0), (40, 90)):
        parts.append(Graph(rng.integers(0, n, (2, m)), num_nodes=n, x=rng.normal(size=(n, FEATURES))))
    alone = [net.forward(g=g)["o"] for g in parts]
    together = net.forward(g=batch(parts))["o"]
    np.testing.assert_allclose(together, np.concatenate(alone), rtol=1e-5, atol=1e-6)


def test_results_do_not_depend_on_thread_count(gat):
    """Every kernel owns the rows it writes (no atomics): bitwise equal at 1 and 2 threads."""
    (width, heads, concat, loops), net, _ = gat
    rng = np.random.default_rng(7)
    n = 3000
    graph = Graph(rng.integers(0, n, (2, 15000)), num_nodes=n, x=rng.normal(size=(n, FEATURES)))
    u = rng.normal(size=(n, width * heads if concat else width)).astype(np.float32)
    before = structc.get_num_threads()
    try:
        structc.set_num_threads(1)
        ref = net.grad(g=graph, u=u)
        structc.set_num_threads(2)
        got = net.grad(g=graph, u=u)
    finally:
        structc.set_num_threads(before)
    assert got[0] == ref[0]
    for k in ref[1]:
        np.testing.assert_array_equal(got[1][k], ref[1][k])


@pytest.mark.slow
def test_a_high_in_degree_node_and_extreme_scores():
    """600 edges into node 0 (a softmax over many entries), scores in the
    thousands (the per-node maximum keeps exp finite)."""
    src = model(4, 2, True, True)
    net = structc.compile(src, seed=0)
    rng = np.random.default_rng(0)
    n = 50
    s, d = rng.integers(0, n, 600), np.zeros(600, np.int64)
    x = rng.normal(size=(n, FEATURES))
    p = {k: rng.normal(size=v.shape) * (30.0 if "a_" in k else 1.0) for k, v in net.params.items()}
    for k, v in p.items():
        net.params[k][...] = v
    got = net.forward(g=Graph(np.stack([s, d]), num_nodes=n, x=x))["o"]
    want = reference(p, x, s, d, n, 4, 2, True, True, 0.2)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("line, message", [
    ("o = gat(g.x over g.nodes, 4)", "gat attends over a graph's edges"),
    ("o = gat(g.e over g.edges, 4)", "edge tensors (edge features) are not supported"),
    ("o = gat(dense(g.x, 4, per=g.type) over g.edges, 4)", "per-edge-type weights"),
    ("o = gat(g.x, 4)", "the first argument is `h over g.edges`"),
    ("o = gat(g.x over g.edges)", "give the features per head"),
    ("o = gat(g.x over g.edges, 4, heads=0)", "heads must be a positive integer"),
    ("o = gat(g.x over g.edges, 4, slope=-1)", "slope"),
    ("o = gat(g.x over g.edges, 4, concat=2)", "concat must be true or false"),
])
def test_what_gat_refuses_is_reported_at_its_span(line, message):
    src = f"""model Bad {{
  input  g: graph(features=3, edge_features=2, edge_types=2)
  {line}
  loss sum(o)
}}"""
    with pytest.raises(structc.SnetError) as info:
        build_model(parse(src))
    assert message in str(info.value)
    assert info.value.span.line == 3


@pytest.mark.slow
def test_gat_output_can_be_read_out_per_graph():
    src = """model Readout {
  input  g: graph(features=3)
  target y: class[g.graphs] of 2
  h = elu(gat(g.x over g.edges, 4, heads=2))
  loss cross_entropy(dense(max(h over g.nodes), 2), y)
}"""
    net = structc.compile(src, seed=0)
    rng = np.random.default_rng(0)
    parts = [Graph(rng.integers(0, 5, (2, 8)), num_nodes=5, x=rng.normal(size=(5, 3))) for _ in range(3)]
    loss, grads = net.grad(g=batch(parts), y=np.array([0, 1, 1], np.int32))
    assert np.isfinite(loss) and all(np.isfinite(v).all() for v in grads.values())


@pytest.mark.slow
def test_the_example_on_the_karate_club():
    """examples/karate_gat.snet on the real graph: native = interpreter, and
    the interpreter's gradient = finite differences."""
    from pathlib import Path

    from structc import graph_datasets
    from structc.testing import check_model_grads
    source = (Path(__file__).parent.parent / "examples" / "karate_gat.snet").read_text()
    net, mdef = structc.compile(source), build_model(parse(source))
    ds = graph_datasets.load_karate().bind(net)
    user = ds.feed(ds.train_mask)
    arrays = Binder(net.meta["graphs"]).expand(user, {})
    params = {k: v.copy() for k, v in net.params.items()}
    loss, grads = net.grad(**user)
    ref = evaluate(differentiate(mdef.graph), arrays, params)
    assert loss == pytest.approx(float(ref["loss"]), rel=1e-4, abs=1e-5)
    for k in grads:
        np.testing.assert_allclose(grads[k], ref[f"grad:{k}"], rtol=2e-3, atol=2e-5, err_msg=k)
    rng = np.random.default_rng(0)
    check_model_grads(mdef, arrays, {k: rng.normal(scale=0.3, size=v.shape) for k, v in net.params.items()})


def test_gat_takes_the_options_every_layer_takes():
    """frozen=true freezes its four parameters; inside repeat each copy has its own."""
    src = """model Opts {
  input  g: graph(features=3)
  target y: class[g.nodes] of 2
  h = g.x
  repeat 2 { h = elu(gat(h over g.edges, 4, heads=2, frozen=true) + dense(h, 8)) }
  loss cross_entropy(dense(h, 2), y)
}"""
    mdef = build_model(parse(src))
    frozen = sorted(k for k, p in mdef.params.items() if p.frozen)
    assert frozen == [f"gat{i}.{p}" for i in (1, 2) for p in ("a_dst", "a_src", "b", "w")]


def test_the_defaults_the_readme_states():
    """slope 0.2, self loops on, heads side by side (README's gat bullet)."""
    src = """model Defaults {
  input  g: graph(features=3)
  output o = gat(g.x over g.edges, 4, heads=3)
}"""
    graph = build_model(parse(src)).graph
    nodes = list(graph.nodes.values())
    assert {n.attrs["alpha"] for n in nodes if n.op.name == "leaky_relu"} == {0.2}
    assert {len(n.inputs) for n in nodes if n.op.name == "segment_softmax"} == {7}      # with the self-loop scores
    assert graph.nodes[graph.outputs["o"]].shape == ("g.nodes", 12)


def test_the_interpreter_attends_on_a_graph_without_edges(gat):
    """No edges at all (a batch of isolated nodes): the interpreter's reference
    split an empty [0, heads·F] read into heads with reshape(-1) and raised;
    now it gives what native code gives (each node attends to itself alone,
    or gets the bias), gradients too."""
    (width, heads, concat, loops), net, mdef = gat
    rng = np.random.default_rng(11)
    n = 4
    x = rng.normal(size=(n, FEATURES))
    graph = Graph(np.zeros((2, 0), np.int64), num_nodes=n, x=x)
    p = params(net, rng)
    for k, v in p.items():
        net.params[k][...] = v
    u = rng.normal(size=(n, width * heads if concat else width)).astype(np.float32)
    user, arrays = _feed(net, graph, u)
    want = reference(p, x, [], [], n, width, heads, concat, loops, 0.2)
    np.testing.assert_allclose(evaluate(mdef.graph, arrays, p, outputs=["o"])["o"], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(net.forward(g=graph)["o"], want, rtol=2e-4, atol=2e-5)
    interp = evaluate(differentiate(mdef.graph), arrays, p)
    _, native = net.grad(**user)
    for k in p:
        np.testing.assert_allclose(native[k], interp[f"grad:{k}"], rtol=2e-3, atol=2e-5, err_msg=k)
