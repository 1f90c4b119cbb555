"""Every registered op: forward vs numpy, VJP vs finite differences, native vs interpreter."""
import numpy as np
import pytest

from structc.ops import REGISTRY
from structc.ops.base import Elementwise, Sample
from structc.testing import check_native, check_vjp, op_net

# Ops with no operands of their own to test in isolation, and why.
EXEMPT = {
    "input": "a source: covered by every model test",
    "param": "a source: covered by every model test",
    "dim": "needs a symbolic dimension: covered by mean/mse model tests",
    "update": "an effect on the arenas: covered by test_model optimiser tests",
    "max_index": "an integer output (the winning entry): covered with take_index by tests/test_gnn.py",
    "tree_map": "operands are a forest and a body sub-graph: covered by test_trees",
    "tree_map_grad": "made by tree_map's VJP: covered by test_trees",
    "tree_grad_part": "a result of tree_map_grad's kernel: covered by test_trees",
    "tree_leaf_rows": "a view of tree_map_grad's result: covered by test_trees",
    "tree_children": "a result of tree_map's kernel: covered by test_trees",
    "tree_kept": "a result of tree_map's kernel: covered by test_trees",
    "scratch": "memory without meaning: nothing to compare",
    "batch_norm_mode": "two forms (a view in training, running statistics in inference): covered by test_norm",
    "running_average": "an effect on the parameter arena: covered by test_norm against PyTorch",
}

# Ops made after autodiff (by `legalize`), so with no gradient to check: native only.
NO_GRADIENT = {
    "matmul_parts": "a weight gradient in parts over K, summed by a sum (MatMul.legalize)",
    "sum_parts": "a sum over leading axes in parts over the rows, summed by a sum (Sum.legalize)",
    "matmul_colsum_parts": "a bias gradient's parts, made from a sum_parts beside its weight gradient's (legalize)",
    "pack_panels": "a parameter's layout for the matmul kernel, made in a node case's program (tree.pack_wide)",
}

CASES = [(name, k, s) for name, op in sorted(REGISTRY.items()) if name not in EXEMPT
         for k, s in enumerate(op.samples())]
GRADIENT_CASES = [c for c in CASES if c[0] not in NO_GRADIENT]


def _id(case):
    name, k, s = case
    return f"{name}-{k}"


def test_every_op_has_samples():
    missing = [n for n, op in REGISTRY.items() if n not in EXEMPT and not op.samples()]
    assert not missing, f"ops without test samples: {missing}"


@pytest.mark.parametrize("case", GRADIENT_CASES, ids=_id)
def test_vjp_matches_finite_differences(case):
    name, _, sample = case
    check_vjp(REGISTRY[name], sample)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_native_matches_reference(case, op_artifacts):
    name, _, sample = case
    check_native(REGISTRY[name], sample, compiled=op_artifacts)


class WrongTanh(Elementwise):
    """tanh with a deliberately wrong derivative (1 - tanh instead of 1 - tanh²).
    Not registered (no `name`), so the parametrised tests never see it."""

    def reference(self, x):
        return np.tanh(x)

    def vjp(self, b, g, out, x):
        return [g * (1.0 - out)]


def test_gradient_check_catches_a_wrong_vjp(monkeypatch):
    op = WrongTanh()
    op.name = "tanh"
    monkeypatch.setitem(REGISTRY, "tanh", op)
    with pytest.raises(AssertionError, match="gradient mismatch"):
        check_vjp(op, Sample((((3, 5), "away"),)))


def test_native_check_catches_a_wrong_kernel(monkeypatch):
    op = REGISTRY["sigmoid"]
    monkeypatch.setattr(type(op), "emit", lambda self, cg, x: cg.tanh(x))
    with pytest.raises(AssertionError, match="native forward"):
        check_native(op, Sample((((3, 5), "away"),)))


def test_an_op_net_compiled_before_is_reused_only_for_the_same_model():
    """`compiled` (the op tests' shared artifacts) keys a net by what it computes:
    another shape, attribute or integer operand's class count is compiled anew,
    and its net computes that one."""
    compiled = {}
    rng = np.random.default_rng(0)
    samples = [Sample(((3, 5),), {"axes": (1,)}), Sample(((3, 5),), {"axes": (1,)}),
               Sample(((3, 5),), {"axes": (0,)}), Sample(((3, 6),), {"axes": (1,)})]
    for k, sample in enumerate(samples):
        x = sample.arrays(rng)[0].astype(np.float32)
        _, net = op_net(REGISTRY["sum"], sample, [x], compiled)
        net.params["p0"][...] = x
        np.testing.assert_allclose(net.forward()["out"], x.sum(axis=sample.attrs["axes"]), rtol=1e-5)
        assert len(compiled) == [1, 1, 2, 3][k]
    labels = [np.array([0, 1, 2], np.int32), np.array([0, 1, 4], np.int32)]
    for k, y in enumerate(labels):
        op_net(REGISTRY["cross_entropy_rows"], Sample(((3, 7), (3,))), [np.zeros((3, 7), np.float32), y], compiled)
        assert len(compiled) == 4 + k
