"""A cell's gate math as the epilogue of its gates' product (`fuse`, rule 7).

`lstm_gates` (an LSTM cell) and `lstm_state` (a Tree-LSTM's) join the group of
the matmul computing their gates when each gate's units fill whole panels
(a multiple of 32): one kernel that runs the gate math on each block of rows
right after that block's product, where there were two. The tiles are the
plain product's, so the results must be its bits: compared here with the row kernels (the rule off), at one
thread and at two (where a forest's levels are cut anywhere)."""
import importlib

import numpy as np
import pytest

import structc
from structc import api, native
from structc.autodiff import differentiate
from structc.build import build_model
from structc.forest import Forest
from structc.passes import run_pipeline
from structc.seqdata import Sequences
from structc.syntax import parse
from test_sequences import LSTM as SMALL_LSTM
from test_trees import random_tree
from test_treelstm import CHILD_SUM_FUSED, WIDE_CHILD_SUM

fuse = importlib.import_module("structc.passes.fuse")   # the module (the package exports the pass)

# test_sequences' LSTM with 32 units (whole panels) and its last states as an output
LSTM = SMALL_LSTM.replace("model Lstm", "model WideLstm").replace("zeros(6)", "zeros(32)").replace(
    "), 6,", "), 32,").replace("  loss", "  output last = h(s.last)\n  loss")
assert LSTM.count("zeros(32)") == 2 and "), 32," in LSTM
NARROW_LSTM = LSTM.replace("WideLstm", "NarrowLstm").replace("zeros(32)", "zeros(24)").replace("), 32,", "), 24,")


def _gated(graph) -> list[str]:
    """The op of each group's gate math, one entry per group that has one."""
    return [graph.nodes[gr.gate].op.name for gr in graph.groups if gr.gate is not None]


def _alone(graph, op: str) -> int:
    """Groups anchored at an `op` node: the gate math as a kernel of its own."""
    return sum(graph.nodes[gr.anchor].op.name == op for gr in graph.groups)


def _programs(src):
    g = run_pipeline(differentiate(build_model(parse(src)).graph))
    fwd = next(n for n in g.nodes.values() if n.op.name == "tree_map").attrs["fwd"].graph
    return g, fwd


def test_an_lstm_cells_gate_math_is_its_products_epilogue():
    g, fwd = _programs(LSTM)
    assert _gated(fwd) == ["lstm_gates"] and _alone(fwd, "lstm_gates") == 0
    (group,) = [gr for gr in fwd.groups if gr.gate is not None]
    assert fwd.nodes[group.anchor].op.name == "matmul_pair"
    gates = fwd.nodes[group.gate].inputs[0]
    assert gates in group.outputs           # the tile the gate math reads back


def test_a_tree_lstms_gate_math_is_its_products_epilogue_in_the_levels_and_at_the_leaves():
    g, fwd = _programs(WIDE_CHILD_SUM)
    assert _gated(fwd) == ["lstm_state"] and _alone(fwd, "lstm_state") == 0
    # the leaves' case, once per distinct word outside the recursion, with its activations
    (leaf,) = [gr for gr in g.groups if gr.gate is not None]
    assert [g.nodes[m].op.name for m in leaf.members] == ["matmul", "add", "lstm_state", "lstm_acts"]


@pytest.mark.parametrize("src, op", [(NARROW_LSTM, "lstm_gates"), (CHILD_SUM_FUSED, "lstm_state")],
                         ids=["lstm-24", "tree-lstm-8"])
def test_units_short_of_whole_panels_keep_the_row_kernel(src, op):
    g, fwd = _programs(src)
    assert _gated(fwd) == [] and _alone(fwd, op) == 1


#: (source, fused) -> its artifact: the tests comparing the two forms build fresh nets of
#: it, so each model is compiled once a module, not once a test (not in the disk cache:
#: GATED_PRODUCTS is not in its key)
_COMPILED: dict = {}


def _both(src, monkeypatch):
    """The model compiled with the gate math fused and as row kernels: fresh nets
    of seed 3, as structc.compile(src, cache=False, seed=3, training=True) makes them."""
    nets = {}
    for fused in (True, False):
        monkeypatch.setattr(fuse, "GATED_PRODUCTS", fused)
        if (src, fused) not in _COMPILED:
            _COMPILED[src, fused] = api.compile_artifact(src, cache=False)
        art = _COMPILED[src, fused]
        nets[fused] = structc.Net(art.meta, native.JitModule(art.object, native.host_target()), seed=3)
    return nets


def _same_bits(nets, feeds, threads, monkeypatch):
    before = structc.get_num_threads()
    try:
        structc.set_num_threads(threads)
        out = {k: (net.forward(**{k_: v for k_, v in feeds.items() if k_ != "y"}), net.grad(**feeds))
               for k, net in nets.items()}
        for name in out[True][0]:
            np.testing.assert_array_equal(out[True][0][name], out[False][0][name], err_msg=name)
        assert out[True][1][0] == out[False][1][0]
        for name, grad in out[False][1][1].items():
            np.testing.assert_array_equal(out[True][1][1][name], grad, err_msg=name)
        for net in nets.values():
            net.set_optimizer("adam")
            for _ in range(3):
                net.train_step(lr=0.01, **feeds)
        for name, value in nets[False].params.items():
            np.testing.assert_array_equal(nets[True].params[name], value, err_msg=name)
    finally:
        structc.set_num_threads(before)


@pytest.mark.slow          # two compiles
@pytest.mark.parametrize("threads", [1, 2])
def test_a_fused_lstm_gives_the_row_kernels_bits(threads, monkeypatch):
    rng = np.random.default_rng(4)
    lengths = np.concatenate([[1, 60], rng.integers(1, 61, 38)])
    x = rng.normal(size=(int(lengths.sum()), 5)).astype(np.float32)
    seqs = Sequences.from_flat(x, np.concatenate([[0], np.cumsum(lengths)]))
    y = rng.integers(0, 3, len(lengths)).astype(np.int32)
    _same_bits(_both(LSTM, monkeypatch), {"s": seqs, "y": y}, threads, monkeypatch)


@pytest.mark.slow          # two compiles
@pytest.mark.parametrize("threads", [1, 2])
def test_a_fused_tree_lstm_gives_the_row_kernels_bits(threads, monkeypatch):
    rng = np.random.default_rng(9)
    trees = [random_tree(rng, int(rng.integers(1, 14)), 12, 3) for _ in range(90)]
    f = Forest.from_tuples(trees)
    y = rng.integers(0, 3, f.trees).astype(np.int32)
    _same_bits(_both(WIDE_CHILD_SUM, monkeypatch), {"t": f, "y": y}, threads, monkeypatch)


@pytest.mark.slow          # two compiles
def test_a_batch_of_one_sequence_of_one_step(monkeypatch):
    """The smallest case: one row, a tile of clamped rows, every gate's panel."""
    nets = _both(LSTM, monkeypatch)
    x = np.random.default_rng(1).normal(size=(1, 5)).astype(np.float32)
    seqs = Sequences.from_flat(x, np.array([0, 1]))
    _same_bits(nets, {"s": seqs, "y": np.array([2], np.int32)}, 1, monkeypatch)


def test_the_rules_unit_step_fills_every_targets_panels():
    """`fuse` is target-free: its step of units fills the panels of every vector width."""
    assert all(fuse.GATE_UNITS_STEP % (2 * vw) == 0 for vw in (4, 8, 16))


STATIC = """
model Static {{
  input x: f32[{rows}, 20]
  input c: f32[{rows}, 32]
  target y: class[{rows}] of 3
  s = lstm_state(dense(x, 96, name="z"), 0)
  t = lstm_state(dense(x, 96, name="t"), c)
  output both = concat(s, t, axis=1)
  loss cross_entropy(dense(concat(s, t, axis=1), 3), y)
}}
"""


@pytest.mark.parametrize("rows", [1, 37, pytest.param(401, marks=pytest.mark.slow)])
def test_rows_known_at_compile_time(rows, monkeypatch):
    """Outside a recursion the rows are known: tiles of exactly the rows left
    (one row: the k-split micro-kernel), a kept memory of zero or a tensor."""
    src = STATIC.format(rows=rows)
    g = run_pipeline(differentiate(build_model(parse(src)).graph))
    assert _gated(g) == ["lstm_state", "lstm_state"]
    rng = np.random.default_rng(rows)
    feeds = {"x": rng.normal(size=(rows, 20)).astype(np.float32),
             "c": rng.normal(size=(rows, 32)).astype(np.float32), "y": rng.integers(0, 3, rows).astype(np.int32)}
    _same_bits(_both(src, monkeypatch), feeds, 1, monkeypatch)


def _forest_feeds():
    rng = np.random.default_rng(1)
    f = Forest.from_tuples([random_tree(rng, int(rng.integers(1, 14)), 12, 3) for _ in range(30)])
    return {"t": f, "y": rng.integers(0, 3, f.trees).astype(np.int32)}


@pytest.fixture(scope="module")
def on_this_machine():
    """WIDE_CHILD_SUM's loss and gradients here (seed 2) on `_forest_feeds`: what
    each other target must give, compiled once for the three."""
    return structc.compile(WIDE_CHILD_SUM, cache=False, seed=2).grad(**_forest_feeds())


@pytest.mark.slow          # three compiles for other targets
@pytest.mark.parametrize("target", ["generic", "x86-64-v3", "x86-64-v4"])
def test_other_targets_fuse_and_agree(target, on_this_machine):
    """Panels of 8, 16 or 32 columns (SSE, AVX2, AVX-512): the 32 units fill
    them all, and the gradients are this machine's within float32's rounding."""
    t = native.named_target(target)
    if native.missing_features(t):
        pytest.skip(f"this machine cannot run {target} code")
    art = api.compile_artifact(WIDE_CHILD_SUM, target=t, cache=False, parts=["forward", "training"])
    net = structc.Net(art.meta, native.JitModule(art.object, t))
    net.init_params(2)
    loss, grads = net.grad(**_forest_feeds())
    want_loss, want = on_this_machine
    assert loss == pytest.approx(want_loss, rel=1e-6)
    for name, g in want.items():
        np.testing.assert_allclose(grads[name], g, rtol=1e-4, atol=1e-6 * np.abs(g).max(), err_msg=name)


@pytest.mark.slow          # a compile without the cache, then a profile
def test_the_profile_names_the_gate_math_its_products_kernel_runs():
    """Its GFLOP/s count the product's flops over a time that includes the math: say so."""
    net = structc.compile(LSTM, cache=False, seed=3)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 5)).astype(np.float32)
    report = net.profile(steps=2, s=Sequences.from_flat(x, np.array([0, 5, 12])), y=np.array([0, 2], np.int32))
    gated = [r.kernel for r in report.rows if r.kernel.gate]
    assert [k.gate for k in gated] == ["lstm_gates"] and "matmul_pair" in gated[0].name
    assert f"{gated[0].name} + lstm_gates" in report.table()
