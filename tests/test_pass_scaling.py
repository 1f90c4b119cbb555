"""The compiler's Python passes do work in proportion to the graph (issue 14
item 3: a model of 200 layers, a GNN of 10 rounds): counted in Python and
builtin calls, which do not depend on the machine's load as times do."""
import dataclasses
import random
import sys

import networkx as nx
import pytest

from structc.build import build_model
from structc.autodiff import gradient_warnings
from structc.compiler import arena_layout, forward_graph, train_graph
from structc.graph import Graph, Node
from structc.ops import REGISTRY
from structc.passes import run_pipeline
from structc.passes.message import prepare
from structc.passes.plan import _Slots, plan_memory
from structc.syntax import parse
from structc.types import TensorType


def deep(layers: int) -> str:
    body = "\n".join("  h = dense(h, 8) |> relu" for _ in range(layers))
    return f"model Deep {{\n  input x: f32[N, 8]\n  target y: class[N] of 4\n  h = x\n{body}\n" \
           "  loss cross_entropy(dense(h, 4), y)\n}\n"


def gnn(rounds: int) -> str:
    return ("model G {\n  input g: graph(features=16)\n  target y: class[g.nodes] of 3\n  h = g.x\n"
            f"  repeat {rounds} {{ h = relu(dense(h, 16) + sum(dense(h, 16, bias=false) over g.edges)) }}\n"
            "  loss cross_entropy(dense(h, 3), y)\n}\n")


def calls(work) -> int:
    """Python function calls and builtin calls made by `work()`."""
    count = [0]

    def seen(frame, event, arg):
        if event in ("call", "c_call"):
            count[0] += 1
    sys.setprofile(seen)
    try:
        work()
    finally:
        sys.setprofile(None)
    return count[0]


def compile_work(source: str) -> dict:
    """Calls per stage of the Python side before lowering: the gradient check,
    autodiff, every pass on both graphs, and the memory plans."""
    mdef = build_model(parse(source))
    mdef = dataclasses.replace(mdef, graph=prepare(mdef.graph.copy()))
    offsets, _, update_size, decay_end = arena_layout(mdef, frozenset())
    made = {}
    counts = {
        "gradient_warnings": calls(lambda: gradient_warnings(mdef.graph)),
        "autodiff": calls(lambda: made.setdefault("train", train_graph(mdef, update_size, decay_end=decay_end))),
        "forward passes": calls(lambda: made.setdefault("forward", run_pipeline(forward_graph(mdef)))),
        "train passes": calls(lambda: made.setdefault("fused", run_pipeline(made["train"]))),
    }
    counts["plans"] = calls(lambda: (plan_memory(made["forward"], offsets), plan_memory(made["fused"], offsets)))
    return counts


@pytest.mark.parametrize("model", [deep, gnn])
def test_passes_grow_linearly_with_layers_and_rounds(model):
    """Four times the layers (rounds) cost at most ~4x the calls in every
    stage: a best fit that compared each buffer with every workspace slot
    (a training graph keeps every layer's activations until the backward
    pass), or a scan of every output per rewritten node, grew ~16x."""
    small, large = compile_work(model(20)), compile_work(model(80))
    growth = {stage: round(large[stage] / small[stage], 2) for stage in small}
    assert all(g < 4.4 for g in growth.values()), growth


def test_topo_is_networkx_lexicographical_order():
    """Ties broken by the smallest node id, as `nx.lexicographical_topological_sort`
    (dumps and cache keys depend on the order), also after nodes are removed;
    `Graph.ancestors` is `nx.ancestors`."""
    rng = random.Random(7)
    for _ in range(200):
        g = Graph()
        for nid in range(rng.randint(1, 40)):
            ins = rng.sample(range(nid), min(nid, rng.randint(0, 3)))
            g.add(REGISTRY["const"], ins, {"value": 1.0, "dtype": "f32"}, type=TensorType(()))
        for nid in rng.sample(sorted(g.nodes), len(g.nodes) // 4):
            if not g.users(nid):        # as dce removes them
                g.remove(nid)
        assert g.topo() == list(nx.lexicographical_topological_sort(g.nx))
        assert all(g.ancestors(nid) == nx.ancestors(g.nx, nid) for nid in g.nodes)
        g.verify()


def test_a_cycle_is_refused_by_topo_and_verify():
    g = Graph()
    a = g.add(REGISTRY["const"], (), {"value": 1.0, "dtype": "f32"}, type=TensorType(()))
    b = g.add(REGISTRY["neg"], (a,))
    g.set_inputs(a, (b,))
    with pytest.raises(ValueError, match="cycle"):
        g.topo()
    with pytest.raises(AssertionError, match="cycle"):
        g.verify()


def best_fit_scanning_every_slot(buffers):
    """The memory plan's slot choice as it was written first (a scan of every slot)."""
    free_at, nominal_of, chosen = [], [], []
    for first, last, nominal in buffers:
        best = None
        for s, free in enumerate(free_at):
            if free < first:
                fit = (nominal_of[s] < nominal, abs(nominal_of[s] - nominal))
                if best is None or fit < best[0]:
                    best = (fit, s)
        if best is None:
            free_at.append(last)
            nominal_of.append(nominal)
            chosen.append(len(free_at) - 1)
        else:
            s = best[1]
            free_at[s], nominal_of[s] = last, max(nominal_of[s], nominal)
            chosen.append(s)
    return chosen


def test_slots_are_the_best_fit_of_a_scan_of_every_slot():
    rng = random.Random(3)
    for _ in range(300):
        starts = sorted(rng.randint(0, 30) for _ in range(rng.randint(1, 40)))
        buffers = [(f, f + rng.randint(0, 8), rng.choice([16, 64, 64, 128, 512, 4096])) for f in starts]
        slots = _Slots()
        assert [slots.take(*b) for b in buffers] == best_fit_scanning_every_slot(buffers)


def test_a_training_compile_differentiates_the_model_once(monkeypatch):
    """The gradient warnings and the train graph come from one differentiation
    (the warnings' own was a tenth of a deep model's Python time)."""
    from structc import autodiff, compiler
    real, count = autodiff._differentiate, [0]

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(autodiff, "_differentiate", counted)
    monkeypatch.setattr(compiler, "compile_objects", lambda texts, *a, **k: [(b"", {}) for _ in texts])
    art = compiler.compile_source(deep(3), parts=["forward", "training"])
    assert count[0] == 1 and art.meta["gradient_warnings"] == []
    with pytest.warns(Warning, match="does not affect the loss"):
        art = compiler.compile_source("model U {\n  input x: f32[N, 2]\n  target y: class[N] of 2\n"
                                      "  param unused: f32[3] = zeros\n"
                                      "  loss cross_entropy(dense(x, 2), y)\n}\n", parts=["forward", "training"])
    assert count[0] == 2 and "unused" in art.meta["gradient_warnings"][0]["message"]


def test_topo_follows_every_edit_after_verify_kept_it():
    """`verify` keeps the order it computed for the next pass's `topo`; adding a
    node, rewiring one or removing one must not leave it stale."""
    g = Graph()
    const = lambda: g.add(REGISTRY["const"], (), {"value": 1.0, "dtype": "f32"}, type=TensorType(()))
    a, b = const(), const()
    c = g.add(REGISTRY["neg"], (b,))
    g.verify()
    assert g.topo() == [a, b, c]
    g.set_inputs(a, (c,))            # a now reads c
    assert g.topo() == [b, c, a]
    g.verify()
    d = g.add(REGISTRY["neg"], (b,))
    assert g.topo() == [b, c, a, d]
    g.verify()
    g.remove(a)
    assert g.topo() == [b, c, d] == list(nx.lexicographical_topological_sort(g.nx))
    copied = g.copy()
    copied.remove(d)
    assert copied.topo() == [b, c] and g.topo() == [b, c, d]


def test_reused_kernels_print_each_declaration_they_call_once(tmp_path, monkeypatch):
    """A kernel's record names the declarations it calls (intrinsics, the
    runtime); checking them against the module's printed each one again for
    every record (a third of the time of reusing one)."""
    from llvmlite import ir

    from structc import compiler
    monkeypatch.setenv("STRUCTC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(compiler, "compile_objects", lambda texts, *a, **k: [(b"", {}) for _ in texts])
    compiler.compile_program(parse(deep(16)), module_cache=True)      # the records
    real, printed = ir.Function.__str__, []

    def counted(fn):
        printed.append(fn.name)
        return real(fn)
    monkeypatch.setattr(ir.Function, "__str__", counted)
    reused = compiler.KERNEL_RECORDS["reused"]
    compiler.compile_program(parse(deep(16)), module_cache=True)
    assert compiler.KERNEL_RECORDS["reused"] - reused > 60
    times = {name: printed.count(name) for name in printed}      # per part: its checks, split_module
    assert max(times.values()) <= 4, times


@pytest.mark.parametrize("parts", [["forward"], ["forward", "training"]])
def test_llvm_starts_on_the_forward_part_before_the_model_is_differentiated(monkeypatch, parts):
    """The forward part needs no gradient: its modules go to LLVM's threads
    first, and the differentiation (for the warnings every part keeps, and
    the training part) runs while they compile."""
    from structc import autodiff, compiler
    events = []
    real_add, real_diff = compiler._ModuleObjects.add, autodiff._differentiate

    def add(self, texts):
        events.append("llvm")
        return real_add(self, texts)

    def differentiate(*args, **kwargs):
        events.append("differentiate")
        return real_diff(*args, **kwargs)
    monkeypatch.setattr(compiler._ModuleObjects, "add", add)
    monkeypatch.setattr(autodiff, "_differentiate", differentiate)
    monkeypatch.setattr(compiler, "compile_objects", lambda texts, *a, **k: [(b"", {}) for _ in texts])
    art = compiler.compile_source(deep(2), parts=parts)
    assert events == ["llvm", "differentiate", "llvm"][:len(parts) + 1] and art.meta["parts"] == parts


def test_graph_copy_names_every_field_of_a_node():
    """`Graph.copy` builds each `Node` from its fields by name (dataclasses.replace
    was a fifth of a copy): a new field must be added there too."""
    assert [f.name for f in dataclasses.fields(Node)] == ["id", "op", "inputs", "attrs", "type", "span"]
