"""Passes on small graphs: the printed result compared with text written here."""
import re

from structc.graph import Builder, Graph
from structc.ops import REGISTRY
from structc.passes import cse, dce, fuse, simplify
from structc.types import TensorType


def strip(text):
    """The printed graph without source comments and padding."""
    return "\n".join(re.sub(r"\s+#.*$", "", line).rstrip() for line in text.splitlines())


def small_graph():
    g = Graph("t")
    b = Builder(g)
    t = TensorType(("N", 4))
    x = b.value(g.add(REGISTRY["input"], (), {"name": "x", "kind": "input", "type": t, "classes": 0}, type=t))
    g.inputs["x"] = x.id
    return g, b, x


def test_cse_merges_repeated_work():
    g, b, x = small_graph()
    a, c = b.tanh(x), b.tanh(x)
    g.outputs["y"] = (a * c).id
    assert strip(str(cse(g))) == strip("""graph t {
  %0 = input[x, input]() : f32[N, 4]
  %1 = tanh(%0) : f32[N, 4]
  %3 = mul(%1, %1) : f32[N, 4]
  return y = %3
}""")


def test_dce_removes_what_no_output_needs():
    g, b, x = small_graph()
    b.exp(x)
    g.outputs["y"] = b.relu(x).id
    assert strip(str(dce(g))) == strip("""graph t {
  %0 = input[x, input]() : f32[N, 4]
  %2 = relu(%0) : f32[N, 4]
  return y = %2
}""")


def test_simplify_drops_identities():
    g, b, x = small_graph()
    g.outputs["y"] = b.relu(x * 1.0 + 0.0).id
    assert strip(str(dce(simplify(g)))) == strip("""graph t {
  %0 = input[x, input]() : f32[N, 4]
  %5 = relu(%0) : f32[N, 4]
  return y = %5
}""")


def test_simplify_folds_transposes_into_matmul_flags():
    """A matmul reading a transpose reads the matrix under a flag instead, and a
    transposed matmul read by nothing else is the product of its operands
    swapped: (x^T u)^T = u^T x."""
    g, b, x = small_graph()

    def input_(name, shape):
        t = TensorType(shape)
        v = b.value(g.add(REGISTRY["input"], (), {"name": name, "kind": "input", "type": t, "classes": 0}, type=t))
        g.inputs[name] = v.id
        return v
    w, u = input_("w", (3, 4)), input_("u", ("N", 3))
    g.outputs["y"] = b.transpose(b.matmul(b.transpose(x), u)).id
    g.outputs["z"] = b.matmul(x, b.transpose(w)).id
    assert strip(str(dce(simplify(g)))) == strip("""graph t {
  %0 = input[x, input]() : f32[N, 4]
  %1 = input[w, input]() : f32[3, 4]
  %2 = input[u, input]() : f32[N, 3]
  %9 = matmul[ta=True](%2, %0) : f32[3, 4]
  %10 = matmul[tb=True](%0, %1) : f32[N, 3]
  return y = %9
  return z = %10
}""")


def test_fuse_puts_bias_and_activation_in_the_matmul_epilogue():
    g, b, x = small_graph()
    w = TensorType((4, 3))
    wv = b.value(g.add(REGISTRY["param"], (), {"name": "w", "type": w, "init": ("zeros", ())}, type=w))
    bias = TensorType((3,))
    bv = b.value(g.add(REGISTRY["param"], (), {"name": "b", "type": bias, "init": ("zeros", ())}, type=bias))
    g.params.update(w=wv.id, b=bv.id)
    y = b.relu(b.matmul(x, wv) + bv)
    g.outputs["y"] = b.exp(y).id
    fuse(g)
    kinds = [(gr.kind, [g.nodes[m].op.name for m in gr.members], [g.nodes[m].op.name for m in gr.outputs])
             for gr in g.groups]
    assert kinds == [("epilogue", ["matmul", "add", "relu", "exp"], ["exp"])]


def test_fuse_computes_a_shared_value_in_its_first_users_loop():
    """d = x - tanh(x) has two users: it joins the first one's group (rule 6)
    and is stored from that loop for the other, which runs after it. A merge
    that would need another group both before and after is refused (the next test)."""
    import numpy as np

    import structc
    g, b, x = small_graph()
    d = x - b.tanh(x)
    g.outputs["y"] = (d * d).id
    g.outputs["z"] = b.exp(d).id
    fuse(g)
    groups = [[g.nodes[m].op.name for m in gr.members] for gr in g.groups]
    assert groups == [["tanh", "sub", "mul"], ["exp"]]
    assert [g.nodes[m].op.name for m in g.groups[0].outputs] == ["sub", "mul"]
    net = structc.compile("model S {\n  input x: f32[N, 4]\n  d = x - tanh(x)\n  output y = d * d\n"
                          "  output z = exp(d)\n}\n", cache=False)
    xv = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    out, dv = net.forward(x=xv), xv - np.tanh(xv)
    np.testing.assert_allclose(out["y"], dv * dv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["z"], np.exp(dv), rtol=1e-5, atol=1e-6)

def test_fuse_keeps_a_shared_value_out_of_a_user_that_needs_another_reader_first():
    """d = tanh(x) is read by softmax(d), by d * softmax(d) and by exp(d): rule 6 may
    not put it in the product's loop, which must run after the softmax, which reads d.
    (Merged when *any* other reader ran after the product, not *every* one, the
    groups formed a cycle.)"""
    g, b, x = small_graph()
    d = b.tanh(x)
    g.outputs["y"] = (d * b.softmax(d)).id
    g.outputs["z"] = b.exp(d).id
    fuse(g)
    assert [[g.nodes[m].op.name for m in gr.members] for gr in g.groups] == \
        [["tanh"], ["softmax"], ["mul"], ["exp"]]


def test_fuse_sums_a_loss_inside_the_loop_that_computes_it():
    import numpy as np

    import structc
    from structc.compiler import train_graph
    from structc.passes import run_pipeline
    from structc.passes.plan import param_layout
    from structc.build import build_model
    from structc.syntax import parse
    src = "model R { input x: f32[N, 7]\n target t: f32[N, 2]\n loss mse(dense(x, 2), t) }"
    mdef = build_model(parse(src))
    g = run_pipeline(train_graph(mdef, param_layout({n: p.type.shape for n, p in mdef.params.items()})[1]))
    fused = [gr for gr in g.groups if gr.reductions]
    assert len(fused) == 1 and [g.nodes[m].op.name for m in fused[0].members] == ["square", "sum"]
    # deterministic: the same sum whatever the thread count
    net = structc.compile(src)
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(5000, 7)).astype(np.float32), rng.normal(size=(5000, 2)).astype(np.float32)
    structc.set_num_threads(1)
    one = net.grad(x=x, t=t)[0]
    structc.set_num_threads(2)
    assert all(net.grad(x=x, t=t)[0] == one for _ in range(5))


def test_a_sum_fused_over_rows_counts_every_row_of_every_task():
    """sum(exp(x - c)), c broadcast along the rows: one loop nest of 1000 rows cut into
    64 tasks (`MAX_REDUCTION_TASKS`), 1000 = 64 * 15 + 40. Tasks of rows // tasks rows
    each dropped the last 40 rows: 9871.1 for 10247.4, with no error."""
    import numpy as np

    import structc
    from structc.build import build_model
    from structc.compiler import train_graph
    from structc.lower.fused import MAX_REDUCTION_TASKS
    from structc.passes import run_pipeline
    from structc.passes.plan import param_layout
    from structc.syntax import parse
    src = "model R {\n  input x: f32[N, 5]\n  param c: f32[5] = zeros\n  loss sum(exp(x - c))\n}\n"
    mdef = build_model(parse(src))
    g = run_pipeline(train_graph(mdef, param_layout({n: p.type.shape for n, p in mdef.params.items()})[1]))
    assert [[g.nodes[m].op.name for m in gr.members] for gr in g.groups if gr.reductions] == [["sub", "exp", "sum"]]
    rows = 1000
    assert rows % MAX_REDUCTION_TASKS
    net = structc.compile(src)
    x = np.random.default_rng(0).normal(size=(rows, 5)).astype(np.float32)
    net.params["c"][...] = c = np.linspace(-1, 1, 5, dtype=np.float32)
    loss, grads = net.grad(x=x)
    e = np.exp(x.astype(np.float64) - c)
    np.testing.assert_allclose(loss, e.sum(), rtol=1e-5)
    np.testing.assert_allclose(grads["c"], -e.sum(axis=0), rtol=1e-4)


def test_fuse_leaves_a_max_over_everything_out_of_the_loop_that_computes_its_operand():
    """The fused loop adds as it goes: a max or min fused so was the sum (`max(x * x)`
    over 5 values gave 5.52 for 2.74, found by tests/test_program_fuzz.py)."""
    import numpy as np

    import structc
    rng = np.random.default_rng(0)
    for name, pick in [("max", np.max), ("min", np.min), ("sum", np.sum)]:
        net = structc.compile(f"model R {{ input x: f32[N, 5]\n output o = {name}(x * x) / (square(x) + 0.5) }}")
        for n in (1, 3, 64):
            x = rng.normal(size=(n, 5)).astype(np.float32)
            np.testing.assert_allclose(net(x=x), pick(x * x) / (x * x + 0.5), rtol=1e-5, err_msg=f"{name} at {n}")


def test_forward_entry_uses_each_ops_inference_form(monkeypatch):
    """An op's `inference(b, node)` replaces it in the forward entry only: here
    tanh made the identity at inference, while training still sees tanh."""
    import numpy as np

    import structc

    def identity(self, b, node):
        return b.value(node.inputs[0])
    monkeypatch.setattr(type(REGISTRY["tanh"]), "inference", identity, raising=False)
    src = """model M {
      input x: f32[N, 2]
      target y: f32[N, 2]
      output z = tanh(x)
      loss mse(tanh(x), y)
    }"""
    net = structc.compile(src, cache=False)
    x = np.array([[0.5, -2.0]], np.float32)
    np.testing.assert_array_equal(net(x=x), x)
    loss, _ = net.grad(x=x, y=np.zeros_like(x))
    np.testing.assert_allclose(loss, np.mean(np.tanh(x.astype(np.float64)) ** 2), rtol=1e-5)


def test_pack_wide_packs_a_node_cases_w_transposed_in_either_form():
    """A node case's X @ W^T over a wide W (N 768: its copies would transpose
    W at every level's call, `matmul._transposed_in_copy`) reads W^T packed,
    hoisted: as the VJP writes it (`tb`) and as a user does (a transpose node,
    before simplify folds it into the flag)."""
    from structc.ops.tree import pack_wide
    for flagged in (True, False):
        g, b, x = small_graph()
        t = TensorType((768, 4))
        w = b.value(g.add(REGISTRY["param"], (), {"name": "w", "type": t, "init": ("zeros", ())}, type=t))
        g.outputs["y"] = (b.matmul(x, w, tb=True) if flagged else b.matmul(x, b.transpose(w))).id
        g = pack_wide(g)
        assert g.nodes[g.outputs["y"]].attrs.get("packed") == 768, flagged
