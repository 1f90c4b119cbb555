"""The matmul kernel's tiles (`lower/gemm.py`) against numpy: remainder rows,
partial panels, transposed A, k-blocking, epilogues, static and run-time M."""
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import structc
from structc.compiler import compile_model
from structc.lower.gemm import FAR_ROWS, KC, k_split, tile_rows
from structc.lower.module import VECTOR_CODE
from structc.ops import REGISTRY
from structc.ops.base import Sample
from structc.model import Net
from structc import native
from structc.native import JitModule, host_target, named_target
from structc.testing import op_graph
from test_trees import random_tree


def _native_matmul(m, k, n, ta=False, seed=0):
    """(native C, numpy C) for C = op(A) @ B compiled alone at static shapes."""
    sample = Sample((((k, m) if ta else (m, k)), (k, n)), {"ta": True} if ta else {})
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=s).astype(np.float32) for s in sample.inputs]
    mdef = op_graph(REGISTRY["matmul"], sample, arrays)
    art = compile_model(mdef, parts=["forward"])        # the training part is not needed here
    net = Net(art.meta, JitModule(art.object, host_target()))
    for j, a in enumerate(arrays):
        if f"p{j}" in net.params:
            net.params[f"p{j}"][...] = a
    given = {f"i{j}": a for j, a in enumerate(arrays) if f"i{j}" in mdef.inputs}
    a, b = arrays
    return net.forward(**given)["out"], (a.T if ta else a).astype(np.float64) @ b


def _check(m, k, n, ta=False):
    got, want = _native_matmul(m, k, n, ta)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(k), err_msg=f"{m}x{k}x{n} ta={ta}")


def test_static_m_needs_one_remainder_tile():
    assert tile_rows(16, 13) == (12, 1)
    assert tile_rows(16, 3) == (3,)
    assert tile_rows(16, 200) == (12, 8)      # 192 + 8: the row blocks are multiples of 12
    assert tile_rows(16, 36) == (12,)
    assert tile_rows(8, 11) == (6, 5)
    assert tile_rows(16, "N") == (12, 4, 1)
    # one-row tiles keep 8 FMA chains in flight by splitting k
    assert [k_split(1, 2), k_split(1, 1), k_split(2, 2), k_split(3, 2)] == [4, 4, 1, 1]


#: the tests of the kernels' IR compile for AVX-512 (their tiles' rows are its), whatever the host
AVX512 = named_target("x86-64-v4")


def _forward_ir(a_shape, b_shape, target=None) -> str:
    sample = Sample((a_shape, b_shape))
    mdef = op_graph(REGISTRY["matmul"], sample, sample.arrays(np.random.default_rng(0)))
    texts = {}
    compile_model(mdef, target or AVX512, dump=lambda stage, text: texts.setdefault(stage, text), jit=False,
                  parts=["forward"])
    return texts["llvm"]


def test_three_rows_are_one_micro_kernel():
    """M = 3 streams B once through a 3-row tile (it took three 1-row passes)."""
    rows = set(re.findall(r"sc_mk(\d+)x", _forward_ir((3, 64), (64, 64))))
    assert rows == {"3"}, rows


def test_a_row_stable_product_runs_a_lone_row_in_a_one_row_tile():
    """A recurrence's products are row-stable (one FMA chain per element, whatever the
    cut): their tiles are the main one, 4 rows (2 or 3 rows clamped to 4) and 1 row
    without a k split, so a sequence of batch 1 does one row's FMAs a step, not four."""
    from structc.compiler import compile_source
    from structc.lower.gemm import stable_rows
    assert stable_rows(16) == (12, 4, 1) and stable_rows(8) == (6, 2, 1)
    texts = {}
    compile_source("model S { input s: sequence of f32[8]  target y: class[s.sequences] of 3\n"
                   "  rec h(t) = init: zeros(32)\n             next: tanh(dense(concat(t.x, h(t.prev)), 32))\n"
                   "  loss cross_entropy(dense(h(s.last), 3), y) }",
                   target=AVX512, dump=lambda stage, text: texts.setdefault(stage, text), jit=False)
    stable = set(re.findall(r"sc_mk(\d+)x\d+m?s_v", texts["llvm"]))
    assert {"1", "4"} <= stable, stable


def test_narrow_c_uses_no_column_panels():
    """A 2-column C runs along k, not in 2 lanes of a column panel's micro-kernels."""
    assert "sc_mk" not in _forward_ir((64, 128), (128, 2))


@pytest.mark.parametrize("m,k,n,ta", [
    (1, 192, 64, False),      # one row: a 1-row tile, k split four ways
    (2, 37, 35, False),       # two rows, a partial second vector, k not a multiple of the split
    (3, 5, 16, False),        # k shorter than the split
    (13, 400, 20, False),     # main tile + 1 row, k-blocked (partial sums through C), one partial vector
    (11, 7, 33, True),        # A^T, an 11-row tile, a 1-column tail panel
    (1, 1, 1, False),
    (9, 37, 2, False),        # narrow: vectors along k, 8 + 1 rows, a masked k tail
    (20, 100, 4, False),
    (1, 3, 1, False),
    (24, 64, 64, False),      # only inline main tiles: no remainder tile, no micro-kernel
])
def test_tiles_match_numpy(m, k, n, ta):
    _check(m, k, n, ta)


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 420), n=st.one_of(st.sampled_from([1, 2, 4]), st.integers(1, 70)),
       ta=st.booleans())
def test_random_static_shapes(m, k, n, ta):
    _check(m, k, n, ta)


def test_narrow_output_through_epilogue():
    """A 2-column product with bias and sigmoid fused, at run-time M."""
    net = structc.compile("""model S { input a: f32[N, 19]
      param w: f32[19, 2] = normal(1)
      param c: f32[2] = normal(1)
      output y = sigmoid(a @ w + c) }""")
    rng = np.random.default_rng(2)
    for m in (1, 7, 8, 9, 70):
        a = rng.normal(size=(m, 19)).astype(np.float32)
        want = 1 / (1 + np.exp(-(a @ net.params["w"].astype(np.float64) + net.params["c"])))
        np.testing.assert_allclose(net(a=a), want, rtol=1e-5, atol=1e-6, err_msg=f"M = {m}")


@pytest.fixture(scope="module")
def dense_relu():
    """relu(A @ W + c) with M known only at run time: the halving tiles, through an epilogue."""
    return structc.compile("""model E { input a: f32[N, 400]
      param w: f32[400, 35] = normal(1)
      param c: f32[35] = normal(1)
      output y = relu(a @ w + c) }""")


def test_runtime_rows_with_epilogue(dense_relu):
    net = dense_relu
    rng = np.random.default_rng(1)
    w, c = net.params["w"].astype(np.float64), net.params["c"]
    for m in list(range(1, 26)) + [31, 203]:      # every remainder 1..11 and past a 192-row block
        a = rng.normal(size=(m, 400)).astype(np.float32)
        want = np.maximum(a @ w + c, 0)
        np.testing.assert_allclose(net(a=a), want, rtol=1e-4, atol=2e-3, err_msg=f"M = {m}")


def _driver(ir_text: str) -> tuple[str, str]:
    """(the matmul driver's definition, the text of the module holding it) in a `--dump llvm` text."""
    for module in re.split(r"^; ---- part .*$", ir_text, flags=re.M):
        found = re.search(r'^define [^@]*@"sc_\w+_matmul"\(.*?^}', module, re.M | re.S)
        if found:
            return found.group(0), module
    raise AssertionError("no matmul driver in the IR")


def test_driver_is_vector_code_with_one_micro_kernel_call():
    """The driver is explicit vector code (the short LLVM pipeline, not O3:
    a third of the LLVM time), and calls its remainder tiles through one
    call site, a micro-kernel chosen by the tile's rows and the panel's
    columns, not one call site per tile shape."""
    driver, module = _driver(_forward_ir((13, 400), (400, 35)))
    assert module.lstrip("\n").startswith(VECTOR_CODE)
    assert len(re.findall(r"call void %", driver)) == 1
    assert not re.search(r'call void @"sc_mk', driver)


def test_one_k_block_emits_no_partial_sums():
    """With K known and at most KC, the k-block loop and the partial-sum paths
    (resume from C, unfinished tiles to C) are not emitted at all."""
    short, _ = _driver(_forward_ir((13, KC), (KC, 35)))
    long, _ = _driver(_forward_ir((13, KC + 1), (KC + 1, 35)))
    assert "k0.head" not in short and "k0.head" in long
    assert len(short) < 0.8 * len(long)


def test_tiles_ask_ahead_only_where_k_is_long():
    """A weight gradient's K runs into the thousands, and its tiles ask for B's
    and A's rows ahead (`gemm.PREFETCH_AHEAD`). The inline tile of a K known to
    fit one k block (a forward layer's features) asks for nothing, unless B's
    rows are `gemm.FAR_ROWS` bytes apart or more; nor do tiles
    of fewer than 8 rows or of one vector of columns, whatever K."""
    short, _ = _driver(_forward_ir((24, 64), (64, 64)))
    long, module = _driver(_forward_ir((20, KC + 1), (KC + 1, 56)))      # 12 + 8 rows; 32 + 24 columns
    assert "llvm.prefetch" not in short and "llvm.prefetch" in long
    # ... unless B's rows are FAR_ROWS apart: an LSTM of 256 units' gates (N = 1024)
    narrow, _ = _driver(_forward_ir((24, 64), (64, FAR_ROWS // 4 - 32)))
    wide, _ = _driver(_forward_ir((24, 64), (64, FAR_ROWS // 4)))
    assert "llvm.prefetch" not in narrow and "llvm.prefetch" in wide
    module += _driver(_forward_ir((29, KC + 1), (KC + 1, 40)))[1]       # 12 + 5 rows; 32 + 8 columns
    tiles = [(int(r), int(nv), body) for r, nv, body in
             re.findall(r'^define [^@]*@"sc_mk(\d+)x(\d+)\w*"(\(.*?^})', module, re.M | re.S)]
    assert {(r, nv) for r, nv, _ in tiles} >= {(12, 2), (8, 2), (12, 1), (5, 2)}, [t[:2] for t in tiles]
    for r, nv, body in tiles:
        assert ("llvm.prefetch" in body) == (r >= 8 and nv == 2), (r, nv)


def test_avx2_tiles_ask_ahead_from_four_rows_for_b_alone():
    """With AVX2's 16 registers the main tile has 6 rows: tiles of 4 rows and
    more ask for B's row ahead where K is long (with 8, as AVX-512's, none
    did, and an LSTM of 512 units ran 10-20% slower), but not for A's rows
    (`gemm.PREFETCH_A`: an MLP's weight gradient ran 37% slower asking)."""
    avx2 = named_target("x86-64-v3")
    long, module = _driver(_forward_ir((10, KC + 1), (KC + 1, 40), avx2))     # 6 + 4 rows
    module += _driver(_forward_ir((9, KC + 1), (KC + 1, 40), avx2))[1]        # 6 + 3 rows
    tiles = [(int(r), int(nv), body) for r, nv, body in
             re.findall(r'^define [^@]*@"sc_mk(\d+)x(\d+)\w*"(\(.*?^})', module, re.M | re.S)]
    assert {(r, nv) for r, nv, _ in tiles} >= {(4, 2), (3, 2)}, [t[:2] for t in tiles]
    for r, nv, body in tiles + [(6, 2, long)]:
        # B's row: one hint a vector of columns (the A operand is the call's first pointer)
        assert body.count("llvm.prefetch") == (2 if r >= 4 and nv == 2 else 0), (r, nv)


@pytest.fixture(scope="module")
def runtime_m_and_n():
    """relu(A @ B) with M and N known only at run time: every panel shape
    (full, wide, one partial vector) meets every tile of rows, k-blocked."""
    return structc.compile("""model R { input a: f32[M, 400]
      input b: f32[400, N]
      output y = relu(a @ b) }""")


@pytest.mark.parametrize("m", [1, 3, 4, 5, 12, 13, 17, 25, 203])
def test_runtime_m_and_n_every_panel_and_tile(runtime_m_and_n, m):
    rng = np.random.default_rng(m)
    a = rng.normal(size=(m, 400)).astype(np.float32)
    for n in (1, 15, 16, 17, 31, 32, 33, 48, 49, 70):
        b = rng.normal(size=(400, n)).astype(np.float32)
        want = np.maximum(a.astype(np.float64) @ b, 0)
        np.testing.assert_allclose(runtime_m_and_n(a=a, b=b), want, rtol=1e-4, atol=2e-3, err_msg=f"{m}x400x{n}")


def test_narrow_kernel_is_vector_code():
    """The narrow kernel's module gets the short LLVM pipeline: O3 unrolled
    its k loop four times (half as much code again) for no speed."""
    driver, module = _driver(_forward_ir((64, 128), (128, 2)))
    assert "nk.head" in driver           # the narrow kernel, not the column panels'
    assert module.lstrip("\n").startswith(VECTOR_CODE)


HEAVY = """model H { input a: f32[N, 40]
  param w: f32[40, 64] = normal(1)
  param c: f32[64] = normal(1)
  output y = %s(a @ w + c) }"""


def test_heavy_epilogue_runs_in_a_loop_and_matches_numpy():
    """The inline tile's epilogue is copied per vector when cheap (bias + relu)
    and run in one loop over the accumulators when heavy (a sigmoid)."""
    from structc.compiler import compile_source
    for act, looped in (("relu", False), ("sigmoid", True)):
        texts = {}
        compile_source(HEAVY % act, dump=lambda stage, text: texts.setdefault(stage, text), parts=["forward"])
        driver, _ = _driver(texts["llvm"])
        assert ("ei.head" in driver) == looped, act
    net = structc.compile(HEAVY % "sigmoid")
    w, c = net.params["w"].astype(np.float64), net.params["c"]
    rng = np.random.default_rng(4)
    for m in (12, 24, 29):
        a = rng.normal(size=(m, 40)).astype(np.float32)
        want = 1 / (1 + np.exp(-(a @ w + c)))
        np.testing.assert_allclose(net(a=a), want, rtol=1e-5, atol=1e-6, err_msg=f"M = {m}")


DENSE_BIAS = """model B {{
  input x: f32[N, {k}]
  target y: class[N] of 3
  h = dense(x, {m}) |> tanh
  loss cross_entropy(dense(h, 3), y)
}}"""


def _differentiated(src, vector_width):
    """The train graph of `src`, its recursions' backward node cases made for `vector_width`."""
    from structc.autodiff import differentiate
    from structc.build import build_model
    from structc.syntax import parse
    return differentiate(build_model(parse(src)).graph, vector_width=vector_width)


def _pipelined(src, vector_width):
    from structc.passes import run_pipeline
    return run_pipeline(_differentiated(src, vector_width), vector_width=vector_width)


@pytest.mark.parametrize("k, m, vw, transposed", [(1024, 64, 8, True), (2048, 64, 4, True), (512, 64, 8, True),
                                                  (1536, 64, 8, True), (1040, 64, 8, False), (768, 64, 8, False),
                                                  (1024, 48, 8, False), (1024, 64, 16, False)])
def test_an_aliased_weight_gradient_reads_x_transposed_below_avx512(k, m, vw, transposed):
    """x^T g with x's rows a multiple of 2 KiB apart (`matmul.ALIASED_FLOATS`)
    reads A's column strips from lines in two of L1's sets: with AVX2
    or SSE, and C at least `ALIASED_MIN_N` wide, legalize transposes x first
    and the product reads rows; AVX-512's code is left as it was."""
    g = _pipelined(DENSE_BIAS.format(k=k, m=m), vw)
    x = g.inputs["x"]
    flipped = [n for n in g.nodes.values() if n.op.name == "transpose" and n.inputs[0] == x]
    assert bool(flipped) == transposed
    assert any(n.op.name == "matmul" and n.attrs.get("ta") and n.inputs[0] == x
               for n in g.nodes.values()) == (not transposed)


LSTM_512 = """
model Seq {
  input  s: sequence of f32[8]
  target y: class[s.sequences] of 3
  rec (h, c)(t) = init: (zeros(512), zeros(512))
                  next: lstm_cell(t.x, h(t.prev), c(t.prev), 512)
  loss cross_entropy(dense(h(s.last), 3), y)
}"""


@pytest.mark.parametrize("vw, transposed", [(8, True), (16, False)])
def test_a_recurrences_aliased_weight_gradient_reads_h_transposed_below_avx512(vw, transposed):
    """An LSTM of 512 units: its weights' gradient H^T dG over every position
    (the backward node case run once over all nodes) has H's rows 2 KiB apart.
    The backward node cases are made when the compiler differentiates, for
    the target's lanes: with AVX2, H is transposed first."""
    train = _differentiated(LSTM_512, vw)
    grads = [n for n in train.nodes.values() if n.op.name == "tree_map_grad"]
    assert len(grads) == 1
    body = grads[0].attrs["bwd_par"].graph
    ta = [n for n in body.nodes.values() if n.op.name == "matmul" and n.attrs.get("ta")
          and body.nodes[n.inputs[0]].shape[1] == 512]
    flipped = [n for n in body.nodes.values() if n.op.name == "transpose" and n.shape[0] == 512]
    assert bool(flipped) == transposed and bool(ta) == (not transposed)


def _aliased_feeds(case, rng):
    """(source, feeds, parameters) of a model with an aliased weight gradient."""
    if case == "dense":
        return DENSE_BIAS.format(k=1024, m=72), {"x": rng.normal(size=(37, 1024)).astype(np.float32),
                                                  "y": rng.integers(0, 3, 37).astype(np.int32)}, 4
    from structc.seqdata import Sequences
    lengths = np.array([3, 1, 5])
    x = rng.normal(size=(int(lengths.sum()), 8)).astype(np.float32)
    return LSTM_512, {"s": Sequences.from_flat(x, np.concatenate([[0], np.cumsum(lengths)])),
                      "y": rng.integers(0, 3, 3).astype(np.int32)}, 4


@pytest.mark.parametrize("case", ["dense", "lstm"])
def test_an_aliased_weight_gradient_transposed_is_the_same_bits(case, monkeypatch):
    """x transposed first sums the same products in the same order: the same
    bits (a dense layer's x^T dY; an LSTM's H^T dG inside its recursion)."""
    from structc import api
    from structc.ops import matmul as mm
    target = named_target("x86-64-v3")
    if native.missing_features(target):
        pytest.skip("this machine does not run x86-64-v3 code")
    src, feeds, n_params = _aliased_feeds(case, np.random.default_rng(3))
    grads, transposes = [], []
    for floats in (mm.ALIASED_FLOATS, 1 << 30):
        monkeypatch.setattr(mm, "ALIASED_FLOATS", floats)
        art = api.compile_artifact(src, target=target, cache=False, parts=["forward", "training"])
        transposes.append(len(re.findall(r'^define [^@]*@"sc_\w+_transpose\d*"', art.llvm_ir, re.M)))
        net = Net(art.meta, JitModule(art.object, target))
        net.init_params(4)
        grads.append(net.grad(**feeds)[1])
    assert transposes[0] == transposes[1] + 1
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == n_params
    for name in grads[0]:
        np.testing.assert_array_equal(grads[0][name], grads[1][name])


# a partial panel (40 = 32 + 8 columns); two blocks of rows (200 > MB), with a part's K past KC
@pytest.mark.parametrize("k, n", [(24, 2 * 64 + 5), (200, 900)])
def test_the_bias_gradient_is_summed_by_the_weight_gradients_kernel(k, n, monkeypatch):
    """A dense layer's bias gradient (a sum_parts of the cotangent beside the
    weight gradient's matmul_parts of it) becomes a `matmul_colsum_parts` in
    that kernel's group, summed by the task of each part's first row block:
    the same bits as the separate sum at 1 and 2 threads, and numpy's sums."""
    from structc.ops import matmul as mm
    rng = np.random.default_rng(k)
    x, y = rng.normal(size=(n, k)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)
    src = DENSE_BIAS.format(k=k, m=40)
    net = structc.compile(src, cache=False, seed=0)
    g = _pipelined(src, 16)
    fused = [gr for gr in g.groups if {g.nodes[k].op.name for k in gr.members} >= {"matmul_parts",
                                                                                   "matmul_colsum_parts"}]
    assert fused and not any(nd.op.name == "sum_parts" and nd.inputs[0] == g.nodes[fused[0].members[0]].inputs[1]
                             for nd in g.nodes.values())
    grads, before = {}, structc.get_num_threads()
    try:
        for t in (1, 2):
            structc.set_num_threads(t)
            grads[t] = net.grad(x=x, y=y)[1]
        monkeypatch.setattr(mm, "colsum_into_weight_gradients", lambda graph: {})   # the separate sum
        structc.set_num_threads(1)
        want = structc.compile(src, cache=False, seed=0).grad(x=x, y=y)[1]
    finally:
        structc.set_num_threads(before)
    for t in (1, 2):
        for k in want:
            assert np.array_equal(grads[t][k], want[k]), (t, k)
    w = net.params["dense1.w"].astype(np.float64)
    h = np.tanh(x.astype(np.float64) @ w + net.params["dense1.b"])
    logits = h @ net.params["dense2.w"] + net.params["dense2.b"]
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(n), y] -= 1
    dh = (p / n) @ net.params["dense2.w"].T * (1 - h ** 2)
    np.testing.assert_allclose(grads[1]["dense1.b"], dh.sum(axis=0), rtol=1e-4, atol=1e-6)


def test_a_product_computed_from_the_column_sum_does_not_also_compute_it():
    """`transpose(sum(w, axes=(0,)) + x) @ w`: the product's kernel cannot sum w's
    columns for the sum it reads (legalize made a cycle: "graph has a cycle"
    at compile, found by tests/test_program_fuzz.py); the sum stays its own kernel."""
    src = """model C { input x: f32[N, 100]
      input w: f32[N, 100]
      output o = transpose(sum(w, axes=(0,)) + x) @ w }"""
    net = structc.compile(src)
    rng = np.random.default_rng(0)
    for n in (3, 64):
        x, w = rng.normal(size=(n, 100)).astype(np.float32), rng.normal(size=(n, 100)).astype(np.float32)
        a = w.astype(np.float64).sum(axis=0) + x
        np.testing.assert_allclose(net(x=x, w=w), a.T @ w, rtol=1e-4, atol=1e-4 * n)


def calls_of(monkeypatch, module, name: str) -> list:
    """A list that gets an entry at each call of module.name, which still runs."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: (calls.append(1), real(*a))[1])
    return calls


def _weight_gradient(k_rows: int, m: int, n: int, rng):
    """x^T g for x [K, m], g [K, n], K known only at run time (a batch's rows), two
    threads or one; the model's forward, so one product with a long K (no parts)."""
    net = structc.compile(f"""model W {{ input x: f32[K, {m}]
      input g: f32[K, {n}]
      output y = transpose(x) @ g }}""", cache=False)
    x = rng.normal(size=(k_rows, m)).astype(np.float32)
    g = rng.normal(size=(k_rows, n)).astype(np.float32)
    return net, x, g


def _at_1_and_2_threads(net, **inputs) -> dict:
    """{threads: net(**inputs)} at 1 and 2 threads, the setting restored."""
    outs, before = {}, structc.get_num_threads()
    for threads in (1, 2):
        structc.set_num_threads(threads)
        try:
            outs[threads] = net(**inputs)
        finally:
            structc.set_num_threads(before)
    return outs


def _all_the_same_bits_and_right(outs: dict, first, x, g) -> None:
    """Every result the bits of `first`, which is x^T g within float32's rounding."""
    np.testing.assert_allclose(first, x.T.astype(np.float64) @ g, rtol=1e-4, atol=1e-4 * np.sqrt(len(x)))
    for key, got in outs.items():
        np.testing.assert_array_equal(got, first, err_msg=str(key))


@pytest.mark.parametrize("k_rows,m,n", [(3 * KC + 5, 37, 500), (KC + 1, 200, 300), (2 * KC, 12, 64), (KC, 13, 520)])
def test_long_k_panels_grouped_are_the_same_bits(monkeypatch, k_rows, m, n):
    """A task of a K longer than KC runs several panels k block by k block
    (`gemm.LONG_K_PANELS`): the same k blocks in the same order, so the same
    bits as a task a panel, at 1 and 2 threads, with partial panels, several row
    blocks and a K of exactly KC (one block: no grouping)."""
    import structc.lower.gemm as gemm
    outs = {}
    for panels in (1, gemm.LONG_K_PANELS):
        monkeypatch.setattr(gemm, "LONG_K_PANELS", panels)
        net, x, g = _weight_gradient(k_rows, m, n, np.random.default_rng(k_rows + m + n))
        outs.update(((panels, threads), got) for threads, got in _at_1_and_2_threads(net, x=x, g=g).items())
    _all_the_same_bits_and_right(outs, outs[1, 1], x, g)


@pytest.mark.parametrize("k_rows,m,n", [(3 * KC + 5, 37, 300), (2 * KC + 1, 200, 520), (KC + 7, 30, 2000)])
def test_a_wide_b_copied_is_the_same_bits(monkeypatch, k_rows, m, n):
    """A task of several panels over a long K copies their k block of a wide B
    (`gemm.WIDE_ROWS`) into its thread's scratch and reads that: the same bits
    as B read in place, at 1 and 2 threads, with a partial last panel, row
    blocks of WIDE_MB rows, and a thread the scratch is refused to (it reads B
    in place). The limits are lowered here so that small products copy."""
    import structc.lower.gemm as gemm
    copied = calls_of(monkeypatch, gemm, "_copy_panels")
    monkeypatch.setattr(gemm, "COPY_ROWS", 12)
    monkeypatch.setattr(gemm, "WIDE_MB", 96)
    outs = {}
    for how, rows, refused in (("in place", 1 << 40, False), ("copied", 64, False), ("refused", 64, True)):
        monkeypatch.setattr(gemm, "WIDE_ROWS", rows)
        if refused:     # more than sc_scratch gives: a null scratch, B read in place
            monkeypatch.setattr(gemm, "copy_bytes", lambda vw: 1 << 41)
        copied.clear()
        net, x, g = _weight_gradient(k_rows, m, n, np.random.default_rng(k_rows + m + n))
        assert bool(copied) == (how != "in place"), how
        outs.update(((how, threads), got) for threads, got in _at_1_and_2_threads(net, x=x, g=g).items())
    _all_the_same_bits_and_right(outs, outs["in place", 1], x, g)


@pytest.mark.parametrize("m,k,n", [(203, KC, 1040), (37, 100, 2048), (600, 7, 1024)])
def test_a_wide_b_of_one_k_block_copied_is_the_same_bits(monkeypatch, m, k, n):
    """x @ w with K known to fit one k block and a wide B (`gemm.ONE_BLOCK_COPY`):
    each task copies its one panel's rows; the bits of B read in place, at 1 and
    2 threads, with a partial last panel (1040 columns), several row blocks (600
    rows), and numpy's values."""
    import structc.lower.gemm as gemm
    rng = np.random.default_rng(m + k + n)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = rng.normal(size=(k, n)).astype(np.float32)
    outs = {}
    for copied in (False, True):
        monkeypatch.setattr(gemm, "ONE_BLOCK_COPY", copied)
        net = structc.compile(f"""model P {{ input x: f32[N, {k}]
          input w: f32[{k}, {n}]
          output y = x @ w }}""", cache=False)
        outs.update(((copied, threads), got) for threads, got in _at_1_and_2_threads(net, x=x, w=w).items())
    np.testing.assert_allclose(outs[False, 1], x.astype(np.float64) @ w, rtol=1e-4, atol=1e-4 * np.sqrt(k))
    for key, got in outs.items():
        np.testing.assert_array_equal(got, outs[False, 1], err_msg=str(key))


@pytest.mark.parametrize("rows", [5, 20, 40])
def test_a_far_wide_b_copied_for_few_rows_is_the_same_bits(monkeypatch, rows):
    """B's rows 8 KiB apart or more (N >= 2048, `gemm.FAR_COPY_ROWS`): a task of
    only `FAR_COPY_FEW` rows copies its k block too (the run-time choice, so
    this checks the bits, not that it copied): the bits of a kernel whose tasks
    never copy, at 1 and 2 threads."""
    import structc.lower.gemm as gemm
    outs = {}
    for how, least in (("in place", 1 << 30), ("copied", gemm.FAR_COPY_FEW)):
        monkeypatch.setattr(gemm, "FAR_COPY_FEW", least)
        net, x, g = _weight_gradient(KC + 5, rows, 2048, np.random.default_rng(rows))
        outs.update(((how, threads), got) for threads, got in _at_1_and_2_threads(net, x=x, g=g).items())
    _all_the_same_bits_and_right(outs, outs["in place", 1], x, g)


@pytest.mark.parametrize("rows,units,out", [(37, 1030, KC + 6), (203, 1056, 2 * KC + 17), (13, 1024, KC + 16),
                                             (50, 1056, 200), (21, 1040, 7)])
def test_a_transposed_b_copied_is_the_same_bits(monkeypatch, rows, units, out):
    """dH = dY @ W^T for a wide W [units, out] reads W itself: each task's copy
    of a k block of B (of the one block, for an `out` within KC: `gemm.ONE_BLOCK_COPY`)
    transposes W's rows (`gemm._copy_transposed`), where a transpose kernel wrote
    W^T first. The same values in the copy, so the same bits as the transpose, at
    1 and 2 threads, with a partial last panel (1030 units), k blocks of a length
    no multiple of a vector (7: shorter than one), few rows, a thread the scratch
    is refused to (a panel at a time on its stack), relu's mask in the product's
    epilogue; and the gradient numpy's."""
    import structc.lower.gemm as gemm
    import structc.ops.matmul as matmul
    monkeypatch.setenv("STRUCTC_NO_CACHE", "1")
    transposed = calls_of(monkeypatch, gemm, "_copy_transposed")
    in_copy = matmul._transposed_in_copy
    rng = np.random.default_rng(rows + units)
    x = rng.normal(size=(rows, 24)).astype(np.float32)
    t = rng.normal(size=(rows, out)).astype(np.float32)
    source = f"""model T {{ input x: f32[N, 24]
      target t: f32[N, {out}]
      loss mse(dense(dense(x, {units}, name="a") |> relu, {out}, bias=false, name="b"), t) }}"""
    outs = {}
    for how in ("transpose", "in copy", "refused"):
        monkeypatch.setattr(matmul, "_transposed_in_copy", in_copy if how != "transpose" else lambda shape: False)
        if how == "refused":     # more than sc_scratch gives: a null scratch
            monkeypatch.setattr(gemm, "copy_bytes", lambda vw: 1 << 41)
        transposed.clear()
        net = structc.compile(source, cache=False, seed=2)
        outs.update(((how, threads), got[1]["a.w"]) for threads, got in _at_1_and_2_threads(net.grad, x=x, t=t).items())
        assert bool(transposed) == (how != "transpose"), how
    p = {k: v.astype(np.float64) for k, v in net.params.items()}
    h = np.maximum(x @ p["a.w"] + p["a.b"], 0)
    dy = 2 * (h @ p["b.w"] - t) / t.size
    np.testing.assert_allclose(outs["transpose", 1], x.T @ ((dy @ p["b.w"].T) * (h > 0)), rtol=1e-4, atol=1e-7)
    for key, got in outs.items():
        np.testing.assert_array_equal(got, outs["transpose", 1], err_msg=str(key))


@pytest.mark.parametrize("k_rows,m,n", [(2 * KC + 1, 37, 224), (KC + 7, 200, 128), (3 * KC, 150, 32 * 9)])
def test_pair_tiles_are_the_same_bits(monkeypatch, k_rows, m, n):
    """A copying task's whole panels run two at a time (`gemm._pair_tiles`): 6-row
    tiles of four vectors over the rows its main tiles would cover, the rest and
    an odd last panel as before. Each element is the same FMA chain over k, so
    the bits are those of one panel at a time: a weight gradient at 1 and 2
    threads, with remainder rows (37, 150), several row blocks and an odd count
    of panels (7, 9)."""
    import structc.lower.gemm as gemm
    paired = calls_of(monkeypatch, gemm, "_pair_tiles")
    monkeypatch.setattr(gemm, "PAIR_WIDTHS", (8, 16))     # an AVX2 host pairs too (3 rows x 4 vectors)
    monkeypatch.setattr(gemm, "COPY_ROWS", 12)
    monkeypatch.setattr(gemm, "WIDE_MB", 96)
    monkeypatch.setattr(gemm, "WIDE_ROWS", 64)
    outs = {}
    for on in (False, True):
        monkeypatch.setattr(gemm, "PAIR_TILES", on)
        paired.clear()
        net, x, g = _weight_gradient(k_rows, m, n, np.random.default_rng(k_rows + m + n))
        assert bool(paired) == on
        outs.update(((on, threads), got) for threads, got in _at_1_and_2_threads(net, x=x, g=g).items())
    _all_the_same_bits_and_right(outs, outs[False, 1], x, g)


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_pair_tiles_run_the_epilogue(monkeypatch, act):
    """A dense layer over a long K whose product pairs its panels: the bias and
    activation from the pair tile's registers (relu inline, tanh in the
    epilogue loop over four vectors a row), the same bits as one panel at a
    time, and numpy's values."""
    import structc.lower.gemm as gemm
    paired = calls_of(monkeypatch, gemm, "_pair_tiles")
    monkeypatch.setattr(gemm, "PAIR_WIDTHS", (8, 16))     # an AVX2 host pairs too (3 rows x 4 vectors)
    monkeypatch.setattr(gemm, "COPY_ROWS", 12)
    monkeypatch.setattr(gemm, "WIDE_MB", 24)       # several row blocks: tasks of several panels
    monkeypatch.setattr(gemm, "WIDE_ROWS", 64)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(61, KC + 9)).astype(np.float32)
    outs = {}
    for on in (False, True):
        monkeypatch.setattr(gemm, "PAIR_TILES", on)
        paired.clear()
        net = structc.compile(f"""model D {{ input x: f32[N, {KC + 9}]
          output y = dense(x, 160, name="d") |> {act} }}""", cache=False, seed=3)
        outs.update(((on, threads), got["y"] if isinstance(got, dict) else got)
                    for threads, got in _at_1_and_2_threads(net, x=x).items())
        assert bool(paired) == on
    w, b = (net.params[k].astype(np.float64) for k in ("d.w", "d.b"))
    want = x.astype(np.float64) @ w + b
    want = np.maximum(want, 0) if act == "relu" else np.tanh(want)
    np.testing.assert_allclose(outs[False, 1], want, rtol=1e-4, atol=1e-4 * np.sqrt(KC))
    for key, got in outs.items():
        np.testing.assert_array_equal(got, outs[False, 1], err_msg=str(key))


@pytest.fixture(params=["native", "x86-64-v3"])
def compiled_for(request, monkeypatch):
    """`structc.compile` makes code for this machine, and again for AVX2 (x86-64-v3),
    which an AVX-512 machine runs too: a kernel's layout per vector width (a packed
    panel is two AVX-512 vectors, four AVX2 ones) is checked on either machine."""
    target = named_target(request.param)
    if request.param != "native":
        if native.missing_features(target):
            pytest.skip(f"this machine cannot run {request.param} code")
        if target.vector_width == host_target().vector_width:
            pytest.skip(f"this machine's code has {request.param}'s vector width")
    monkeypatch.setattr(structc.api, "host_target", lambda: target)
    return target


@pytest.mark.parametrize("units,long_k", [(64, False), (40, False), (100, True), (128, True)])
def test_a_node_case_reads_wide_weights_packed_with_the_same_bits(monkeypatch, compiled_for, units, long_k):
    """A node case's matmul whose B is a parameter (or its transpose, in the
    cotangent's product) with rows `tree.PACK_ROWS` bytes apart reads it in
    panels (`pack_panels`, hoisted out of the levels): the same bits as B read in
    place, at 1 and 2 threads, with the gate math fused (64 units) or partial
    panels (40 units: 160 gate columns, 40 cotangent columns). PACK_ROWS is
    lowered here so these small cells' products are packed, the cotangent's too.
    `long_k`: only a B of more rows than a k block is packed, from
    `tree.PACK_LONG_K_ROWS` bytes a row (100 units: the cotangent's W_h^T, 400 x 100).
    The gates' W is packed from W's rows where they lie (W_x and W_h are slices), the
    cotangent's W_h^T from W_h's square blocks turned in registers where W_h's rows
    are whole panels (64 and 128 units), else from W_h^T written first (40, 100)."""
    import structc.ops.tree as tree
    from structc.seqdata import Sequences
    src = f"""model Cell {{ input s: sequence of f32[7]
      target y: class[s.sequences] of 3
      rec (h, c)(t) = init: (zeros({units}), zeros({units}))
                      next: lstm_cell(t.x, h(t.prev), c(t.prev), {units})
      loss cross_entropy(dense(h(s.last), 3), y) }}"""
    rng = np.random.default_rng(units)
    lengths = np.array([1, 9, 4, 13, 2])
    seqs = Sequences.from_flat(rng.normal(size=(int(lengths.sum()), 7)).astype(np.float32),
                               np.concatenate([[0], np.cumsum(lengths)]))
    y = rng.integers(0, 3, len(lengths)).astype(np.int32)
    monkeypatch.setattr(tree, "PACK_ROWS", 1 << 40 if long_k else 4 * units)
    monkeypatch.setattr(tree, "PACK_LONG_K_ROWS", 4 * units if long_k else 1 << 40)
    pack = type(REGISTRY["pack_panels"])
    lower, made = pack.lower, []
    monkeypatch.setattr(pack, "lower", lambda self, kb, node, epilogue: (made.append(node.shape),
                                                                         lower(self, kb, node, epilogue))[1])
    runs = {}
    for packed in (False, True):
        monkeypatch.setattr(tree, "PACK_WIDE", packed)
        made.clear()
        net = structc.compile(src, cache=False, seed=0, training=True)
        # the gates' W [7 + units, 4 units], and the cotangent's W_h^T [4 units, units]
        want = {(-(-units // 32), 4 * units, 32)} if long_k else \
            {(-(-4 * units // 32), 7 + units, 32), (-(-units // 32), 4 * units, 32)}
        assert set(made) == (want if packed else set()), made
        runs.update(((packed, threads), got) for threads, got in _at_1_and_2_threads(net.grad, s=seqs, y=y).items())
    loss, grads = runs[False, 1]
    for key, (other_loss, other) in runs.items():
        assert other_loss == loss, key
        for name in grads:
            np.testing.assert_array_equal(other[name], grads[name], err_msg=f"{key} {name}")


@pytest.mark.slow
def test_a_tree_lstms_wide_weight_gradient_copied_is_the_same_bits(monkeypatch):
    """A Tree-LSTM of 256 units: the weight gradient of its gates i, o, u over
    every inner node ([256, 768] over K > KC: B's rows 3 KiB apart,
    `gemm.WIDE_ROWS`) copies B's k blocks, as do the node case's products that
    are wide. The bits of B read in place, at 1 and 2 threads."""
    import structc.lower.gemm as gemm
    from structc.forest import Forest
    source = """model T {
      input  t: forest of word(vocab=20)
      target y: class[t.trees] of 3
      param  E: embedding(20, 16)
      rec (h, c)(n) =
        leaf: { s = lstm_state(dense(E[n.word], 768, name="leaf"), 0); (chunk(s, 0, 2), chunk(s, 1, 2)) }
        node: { s = lstm_state(dense(sum(h(n.children)), 768, name="iou"),
                               sum(sigmoid(dense(h(k), 256, name="f")) * c(k) for k in n.children));
                (chunk(s, 0, 2), chunk(s, 1, 2)) }
      loss cross_entropy(dense(h(t.root), 3, name="out"), y)
    }"""
    monkeypatch.setenv("STRUCTC_NO_CACHE", "1")
    copied = calls_of(monkeypatch, gemm, "_copy_panels")
    rng = np.random.default_rng(6)
    forest = Forest.from_tuples([random_tree(rng, int(rng.integers(8, 30)), 20) for _ in range(40)])   # > KC inner
    assert forest.nodes - forest.leaves > KC
    y = rng.integers(0, 3, 40).astype(np.int32)
    outs = {}
    for how, rows in (("in place", 1 << 40), ("copied", gemm.WIDE_ROWS)):
        monkeypatch.setattr(gemm, "WIDE_ROWS", rows)
        copied.clear()
        net = structc.compile(source, cache=False, seed=1)
        outs.update(((how, threads), got[1]) for threads, got in _at_1_and_2_threads(net.grad, t=forest, y=y).items())
        assert bool(copied) == (how == "copied"), how
    for key, got in outs.items():
        for name, g in got.items():
            np.testing.assert_array_equal(g, outs["in place", 1][name], err_msg=f"{key} {name}")


def test_a_node_cases_cotangent_over_a_wide_weight_is_packed_not_transposed_per_level(monkeypatch, compiled_for):
    """A tree-RNN of 384 units: the children's cotangent dG @ W^T (W [768, 384],
    B's rows 3 KiB apart) would read W through its copies' transposes
    (`matmul._transposed_in_copy`), again at every level's call; `tree.pack_wide`
    packs W^T once a call instead. No transposing copy is emitted, W^T is
    packed, and the gradients are the bits of W^T made by a transpose kernel
    and read in place, at 1 and 2 threads."""
    import structc.lower.gemm as gemm
    import structc.ops.matmul as matmul
    from structc.forest import Forest
    monkeypatch.setenv("STRUCTC_NO_CACHE", "1")
    source = """model T {
      input  t: forest of word(vocab=20)
      target y: class[t.trees] of 3
      param  E: embedding(20, 384)
      rec h(n) = leaf: E[n.word]
                 node: tanh(dense(concat(h(n.children)), 384))
      loss cross_entropy(dense(h(t.root), 3), y)
    }"""
    transposed = calls_of(monkeypatch, gemm, "_copy_transposed")
    made = calls_of(monkeypatch, type(REGISTRY["pack_panels"]), "lower")
    rng = np.random.default_rng(8)
    forest = Forest.from_tuples([random_tree(rng, int(rng.integers(1, 12)), 20) for _ in range(6)])
    y = rng.integers(0, 3, 6).astype(np.int32)
    outs = {}
    in_copy = matmul._transposed_in_copy
    for packed in (False, True):
        monkeypatch.setattr(matmul, "_transposed_in_copy", in_copy if packed else lambda shape: False)
        made.clear()
        net = structc.compile(source, cache=False, seed=1)
        runs = _at_1_and_2_threads(net.grad, t=forest, y=y)
        outs.update(((packed, threads), got[1]) for threads, got in runs.items())
        assert not transposed and bool(made) == packed, (packed, made)
    for key, got in outs.items():
        for name, g in got.items():
            np.testing.assert_array_equal(g, outs[False, 1][name], err_msg=f"{key} {name}")
