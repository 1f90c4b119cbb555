"""dropout(x, p): Philox-4x32-10 masks, the same at any thread count, a new one
each step, inverse scaling, off outside training, seeded from the API and the CLI.

How the masks are observed: in `loss sum(dropout(w, p) * u)` the gradient of
the parameter w is u * mask exactly (mask = 0 or 1/(1-p)), so `net.grad`
shows the mask the training entry drew. The registry's checks (test_ops,
test_nan) run the `dropout_mask` op with fixed counters, which make it a
deterministic function of its position; its gradient (none: the mask does
not depend on x's values) and the product's (mul's VJP) are checked here
against the numpy mask.
"""
import numpy as np
import pytest

import structc
from structc.compiler import compile_source
from structc.errors import SnetError
from structc.lower.philox import element_bits_numpy, philox4x32_numpy
from structc.ops.random import keep_mask, scale

# Random123's known answers for Philox-4x32-10 (its tests/kat_vectors)
KNOWN = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
         ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
         ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
          (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]

MASKED = """model Masked {{
  input u: f32[{r}, {c}]
  param w: f32[{r}, {c}] = ones
  loss sum(dropout(w, {p}) * u)
}}"""

TINY = """model Tiny {
  input  x: f32[N, 8]
  target y: class[N] of 3
  loss cross_entropy(dense(dropout(dense(x, 16) |> relu, 0.5), 3), y)
}"""

MLP = """model Drop {
  input  x: f32[N, 32]
  target y: class[N] of 10
  h = dropout(dense(x, 128) |> relu, 0.5)
  h = dropout(dense(h, 64) |> relu, 0.5)
  loss cross_entropy(dense(h, 10), y)
}"""


def compiled(src, seed=0):
    """The model's Net and its dumped stages, from one compilation."""
    from structc.model import Net
    from structc.native import JitModule, host_target
    dumps = {}
    art = compile_source(src, dump=lambda stage, text: dumps.setdefault(stage, text))
    return Net(art.meta, JitModule(art.object, host_target()), seed=seed), dumps


def key_of(seed):
    return np.random.SeedSequence(seed).generate_state(2, np.uint32)


def drawn_mask(net, r, c):
    """The mask a training call draws (this one: a `grad`), read off the gradient of w (u = 1)."""
    _, grads = net.grad(u=np.ones((r, c), np.float32))
    return grads["w"]


@pytest.mark.parametrize("counter, key, expected", KNOWN)
def test_numpy_philox_gives_random123s_known_answers(counter, key, expected):
    assert tuple(int(v) for v in philox4x32_numpy(counter, key)) == expected


def test_native_masks_are_the_numpy_generators():
    """Counter (position, step, stream) under the seed's key: step 1 for the first
    training call, step 4 for a grad after two updates, the second dropout of a model on stream 1."""
    r, c, p = 37, 45, 0.3        # 1665 elements: whole vectors and a masked tail
    net = structc.compile(MASKED.format(r=r, c=c, p=p), seed=5)
    want = np.where(keep_mask(r * c, p, key_of(5), 1, 0), np.float32(scale(p)), 0).reshape(r, c)
    np.testing.assert_array_equal(drawn_mask(net, r, c), want)
    for _ in range(2):
        net.train_step(u=np.zeros((r, c), np.float32), lr=0.0)
    want4 = np.where(keep_mask(r * c, p, key_of(5), 4, 0), np.float32(scale(p)), 0).reshape(r, c)
    np.testing.assert_array_equal(drawn_mask(net, r, c), want4)
    two = structc.compile("model Two { input u: f32[8, 8]\n param v: f32[8, 8] = ones\n param w: f32[8, 8] = ones\n"
                          " loss sum(dropout(v, 0.5) * u) + sum(dropout(w, 0.5) * u) }", seed=5)
    _, grads = two.grad(u=np.ones((8, 8), np.float32))
    for name, stream in (("v", 0), ("w", 1)):
        np.testing.assert_array_equal(grads[name].reshape(-1) > 0, keep_mask(64, 0.5, key_of(5), 1, stream))


@pytest.mark.slow    # compiles an MLP: several seconds on a loaded machine
def test_masks_drawn_in_a_matmul_store_loop_are_the_numpy_generators():
    """Dropout fused into a matmul's epilogue (12-row tiles, remainders, a partial
    panel of 37 columns): grad w = x^T (u * mask) with the numpy mask."""
    src = "model E { input x: f32[N, 40]\n input u: f32[N, 37]\n param w: f32[40, 37] = normal(1)\n" \
          " loss sum(dropout(relu(x @ w), 0.25) * u) }"
    net, dumps = compiled(src, seed=2)
    epilogue = next(g for g in dumps["train.fuse"].split("group ")[1:] if "(epilogue)" in g and "matmul(" in g)
    assert "dropout_mask" in epilogue      # fused into the store loop, not a loop of its own
    rng = np.random.default_rng(0)
    x, u = rng.normal(size=(53, 40)).astype(np.float32), rng.normal(size=(53, 37)).astype(np.float32)
    _, grads = net.grad(x=x, u=u)
    z = x @ net.params["w"]
    keep = keep_mask(53 * 37, 0.25, key_of(2), 1, 0).reshape(53, 37)
    expected = x.T @ (u * (z > 0) * np.where(keep, np.float32(scale(0.25)), 0))
    np.testing.assert_allclose(grads["w"], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_five_sigma_and_kept_values_scaled(p):
    r, c = 250, 400
    mask = drawn_mask(structc.compile(MASKED.format(r=r, c=c, p=p), seed=11), r, c)
    n = mask.size
    kept = int(np.count_nonzero(mask))
    assert abs(kept - n * (1 - p)) <= 5 * np.sqrt(n * p * (1 - p)), (kept, n, p)
    assert set(np.unique(mask)) == {0.0, np.float32(1 / (1 - p))}      # inverse scaling: E[mask] = 1


def test_gradient_is_zero_exactly_where_dropped_and_scaled_elsewhere():
    r, c, p = 16, 33, 0.5
    net = structc.compile(MASKED.format(r=r, c=c, p=p), seed=3)
    net.params["w"] = np.random.default_rng(1).normal(size=(r, c))
    u = np.random.default_rng(2).normal(size=(r, c)).astype(np.float32)
    _, grads = net.grad(u=u)
    keep = keep_mask(r * c, p, key_of(3), 1, 0).reshape(r, c)
    np.testing.assert_array_equal(grads["w"], np.where(keep, u * np.float32(2.0), np.float32(0.0)))
    assert (grads["w"][~keep] == 0).all() and not (grads["w"][keep] == 0).any()


def test_inference_is_the_identity_and_has_no_mask():
    from structc.build import build_model
    from structc.compiler import forward_graph
    from structc.syntax import parse
    src = "model I { input x: f32[N, 30]\n param w: f32[30] = normal(1)\n output y = dropout(x * w, 0.6)\n" \
          " loss sum(y) }"
    net = structc.compile(src)
    x = np.random.default_rng(0).normal(size=(7, 30)).astype(np.float32)
    np.testing.assert_array_equal(net(x=x), x * net.params["w"])
    mdef = build_model(parse(src), None)
    ops = lambda g: {n.op.name for n in g.nodes.values()}     # noqa: E731
    assert "dropout_mask" in ops(mdef.graph) and "dropout_mask" not in ops(forward_graph(mdef))


def test_each_training_call_draws_a_new_mask():
    """grad, as train_step: a loop of grad and a user's own update must not reuse one mask."""
    r, c = 20, 50
    net = structc.compile(MASKED.format(r=r, c=c, p=0.5), seed=0)
    first, second = drawn_mask(net, r, c), drawn_mask(net, r, c)
    assert (first != second).mean() > 0.3                  # independent masks differ in about half
    net.train_step(u=np.zeros((r, c), np.float32), lr=0.0)
    np.testing.assert_array_equal(drawn_mask(net, r, c).reshape(-1) > 0, keep_mask(r * c, 0.5, key_of(0), 4, 0))
    net.set_optimizer("adam")                               # restarts the optimizer's counter, not the masks'
    np.testing.assert_array_equal(drawn_mask(net, r, c).reshape(-1) > 0, keep_mask(r * c, 0.5, key_of(0), 5, 0))


def train_run(seed, threads, steps=4, set_seed=None):
    before = structc.native.get_num_threads()
    structc.set_num_threads(threads)
    try:
        net = structc.compile(MLP, seed=seed)
        if set_seed is not None:
            net.set_seed(set_seed)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(512, 32)).astype(np.float32)      # big enough for the kernels to split
        y = rng.integers(0, 10, 512)
        losses = [net.train_step(x=x, y=y, lr=0.05) for _ in range(steps)]
        return losses, {k: v.copy() for k, v in net.params.items()}
    finally:
        structc.set_num_threads(before)


@pytest.mark.slow    # compiles an MLP: several seconds on a loaded machine
def test_same_seed_same_run_at_one_and_two_threads():
    one, two = train_run(7, 1), train_run(7, 2)
    assert one[0] == two[0]
    for k in one[1]:
        np.testing.assert_array_equal(one[1][k], two[1][k], err_msg=k)
    other = train_run(7, 2, set_seed=8)            # same initialisation, other masks
    assert other[0][0] != one[0][0]


def test_set_seed_leaves_the_parameters_and_init_params_reseeds():
    r, c = 10, 40
    net = structc.compile(MASKED.format(r=r, c=c, p=0.5), seed=1)
    first = drawn_mask(net, r, c)
    net.set_seed(2)
    assert net.seed == 2 and (drawn_mask(net, r, c) != first).any()
    assert (net.params["w"] == 1).all()
    net.init_params(1)
    np.testing.assert_array_equal(drawn_mask(net, r, c), first)
    big = 2 ** 70                                  # any non-negative int, as for the initialisation
    net.set_seed(big)
    np.testing.assert_array_equal(drawn_mask(net, r, c).reshape(-1) > 0, keep_mask(r * c, 0.5, key_of(big), 2, 0))
    with pytest.raises(ValueError):
        net.set_seed(-1)


def test_a_resumed_run_continues_the_masks(tmp_path):
    """A gradient and two steps, saved and resumed as --resume does (train.save_state/
    restore_optimizer), then two more steps: bit-identical to the uninterrupted run. The
    gradient draws masks and makes no step: the draws (3) are restored, not the steps (2)."""
    from structc.train import TrainConfig, load_state, restore_optimizer, save_state
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 8)).astype(np.float32), rng.integers(0, 3, 32)
    whole = structc.compile(TINY, seed=4)
    whole.grad(x=x, y=y)
    for _ in range(4):
        whole.train_step(x=x, y=y, lr=0.1)
    first = structc.compile(TINY, seed=4)
    first.grad(x=x, y=y)
    for _ in range(2):
        first.train_step(x=x, y=y, lr=0.1)
    first.save_params(tmp_path / "p.npz")
    save_state(first, tmp_path / "p.train.npz", 1, TrainConfig(seed=4), {}, "data")
    resumed = structc.compile(TINY, seed=0)        # as the CLI compiles a resumed run without --seed
    resumed.load_params(tmp_path / "p.npz")
    assert restore_optimizer(resumed, load_state(tmp_path / "p.train.npz"))
    resumed.set_seed(4)                            # cmd_train: the run's seed
    for _ in range(2):
        resumed.train_step(x=x, y=y, lr=0.1)
    for k in whole.params:
        np.testing.assert_array_equal(whole.params[k], resumed.params[k], err_msg=k)


def training_call(net, call, x, y):
    """One training call of the kind `call` (an update's lr 0.1)."""
    if call == "train_step":
        return net.train_step(x=x, y=y, lr=0.1)
    if call == "apply_update":
        return net.apply_update(lr=0.1)
    return getattr(net, call)(x=x, y=y)[0]


@pytest.mark.parametrize("call, where", [("train_step", "_set_hyper"), ("train_step", "_next_dropout_step"),
                                         ("grad", "_next_dropout_step"), ("grad_into_arena", "_next_dropout_step"),
                                         ("apply_update", "_set_hyper")])
@pytest.mark.parametrize("path", ["plan", "python"])
def test_a_training_call_interrupted_before_native_code_runs_counts_nothing(call, where, path):
    """A KeyboardInterrupt (here injected) right after a training call wrote the step's
    hyper-parameters or dropout's draw, before native code ran: the optimizer's step
    and dropout's draw count are as they were, and the run goes on exactly as one that
    was never interrupted. (`train_step` counted the step in `_set_hyper` and the draw
    after it: one step ahead of the steps that ran, so Adam's bias correction, the
    schedule and every later mask were silently another run's.) `path`: the C call
    plan (float32 inputs) or the Python path (float64 inputs, converted)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 8)).astype(np.float32 if path == "plan" else np.float64), rng.integers(0, 3, 32)
    net, twin = (structc.compile(TINY, seed=4) for _ in range(2))
    for n in (net, twin):
        n.set_optimizer("adam")
        n.set_schedule("cosine", warmup=2, decay_steps=6)
        n.train_step(x=x, y=y, lr=0.1)
    real = getattr(net, where)

    def interrupted(*args):
        real(*args)                 # its work done, the interrupt lands
        raise KeyboardInterrupt
    setattr(net, where, interrupted)
    with pytest.raises(KeyboardInterrupt):
        training_call(net, call, x, y)
    delattr(net, where)
    assert (net._step, net._draws, net.last_lr) == (twin._step, twin._draws, twin.last_lr) == (1, 1, twin.last_lr)
    for _ in range(2):
        assert training_call(net, call, x, y) == training_call(twin, call, x, y)
        assert net.train_step(x=x, y=y, lr=0.1) == twin.train_step(x=x, y=y, lr=0.1)
    assert (net._step, net._draws) == (twin._step, twin._draws)
    for k in net.params:
        np.testing.assert_array_equal(net.params[k], twin.params[k], err_msg=k)


def test_a_resumed_run_with_another_optimizer_continues_the_masks(tmp_path):
    """Momentum's saved moments do not fit SGD, but dropout's call count is the run's:
    a resumed run draws the masks an uninterrupted one would next, not the first ones again."""
    from structc.train import TrainConfig, load_state, restore_counters, save_state
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 8)).astype(np.float32), rng.integers(0, 3, 32)
    first = structc.compile(TINY, seed=4)
    first.set_optimizer("momentum")
    first.grad(x=x, y=y)                           # masks drawn, no step made
    for _ in range(3):
        first.train_step(x=x, y=y, lr=0.1)
    first.save_params(tmp_path / "p.npz")
    save_state(first, tmp_path / "p.train.npz", 1, TrainConfig(optimizer="momentum", seed=4), {}, "data")
    resumed = structc.compile(TINY, seed=4)
    resumed.load_params(tmp_path / "p.npz")
    assert restore_counters(resumed, load_state(tmp_path / "p.train.npz"), "sgd")
    assert (resumed.optimizer, resumed._draws, resumed._step) == ("sgd", 4, 3)
    assert not resumed._state_arena.any()


@pytest.mark.parametrize("call, message", [
    ("dropout(x, 1)", "p must be a number in [0, 1)"),
    ("dropout(x, -0.1)", "p must be a number in [0, 1)"),
    ("dropout(x)", "p must be a number in [0, 1), got nothing"),
    ("dropout(x, he)", "p must be a number in [0, 1)"),
])
def test_bad_rates_are_language_errors(call, message):
    with pytest.raises(SnetError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        structc.compile(f"model B {{ input x: f32[N, 4]\n output y = {call} }}")


def test_p_zero_is_no_op_and_recursion_bodies_refuse_dropout():
    from structc.build import build_model
    from structc.syntax import parse
    mdef = build_model(parse("model Z { input x: f32[N, 4]\n param w: f32[4] = ones\n loss sum(dropout(x * w, 0)) }"),
                       None)
    assert all(n.op.name != "dropout_mask" for n in mdef.graph.nodes.values())
    with pytest.raises(SnetError, match="not available inside a recursion body"):
        structc.compile("model R { input t: forest(arity=2) of word(vocab=5)\n param E: embedding(5, 4) = normal(1)\n"
                        " rec h(n) = leaf: E[n.word]\n node: dropout(sum(h(n.children)), 0.5)\n"
                        " output o = h(t.root) }")


def test_element_bits_depend_on_position_step_and_stream_only():
    """The reference's counters: the first 1000 positions' bits are a prefix of the first 5000's."""
    key = (3, 4)
    np.testing.assert_array_equal(element_bits_numpy(1000, key, 9, 2), element_bits_numpy(5000, key, 9, 2)[:1000])
    assert (element_bits_numpy(1000, key, 9, 2) != element_bits_numpy(1000, key, 10, 2)).mean() > 0.99
    assert (element_bits_numpy(1000, key, 9, 2) != element_bits_numpy(1000, key, 9, 3)).mean() > 0.99


@pytest.mark.slow    # four short training runs from the command line
def test_cli_seed_gives_the_run_and_resume_keeps_it(tmp_path):
    """structc train --seed: the same seed, the same parameters; another seed, others;
    a run resumed without --seed continues with the run's seed (its dropout masks too)."""
    from structc.cli import main
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x[:100], y_train=y[:100], x_test=x[100:], y_test=y[100:])
    model = tmp_path / "m.snet"
    model.write_text("model M { input x: f32[N, 5]\n target y: class[N] of 2\n"
                     " loss cross_entropy(dense(dropout(dense(x, 16) |> relu, 0.5), 2), y) }")

    def run(name, *extra):
        args = ["train", str(model), "--data", str(data), "--batch", "20", "--no-progress", *extra]
        assert main(args + (["--out", str(tmp_path / name)] if "--resume" not in extra else [])) == 0
        with np.load(tmp_path / f"{name}.npz") as f:
            return {k: f[k] for k in f.files}

    a, b = run("a", "--seed", "3", "--epochs", "3"), run("b", "--seed", "3", "--epochs", "3")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    run("c", "--seed", "3", "--epochs", "1")
    resumed = run("c", "--epochs", "3", "--resume", str(tmp_path / "c.npz"))
    assert all(np.array_equal(a[k], resumed[k]) for k in a)
    other = run("d", "--seed", "4", "--epochs", "3")
    assert not all(np.array_equal(a[k], other[k]) for k in a)


@pytest.mark.slow    # links a shared library
@pytest.mark.skipif(__import__("shutil").which("cc") is None and __import__("shutil").which("gcc") is None,
                    reason="no C compiler to link a shared library")
def test_the_shipped_library_has_no_dropout(tmp_path):
    """`structc compile -o m.so`: its forward entry is the identity through dropout,
    as the JIT's is (the rate is large, so a mask would change every output)."""
    from pathlib import Path

    from structc.cli import main
    example = Path(__file__).parent.parent / "examples" / "digits_dropout.snet"
    net = structc.compile(example, seed=7)
    net.save_params(tmp_path / "p.npz")
    assert main(["compile", str(example), "-o", str(tmp_path / "m.so"), "--params", str(tmp_path / "p.npz")]) == 0
    shipped = structc.load(tmp_path / "m.so")
    x = np.random.default_rng(0).random((9, 64)).astype(np.float32)
    h = x
    for layer in ("dense1", "dense2"):
        h = np.maximum(h @ net.params[f"{layer}.w"] + net.params[f"{layer}.b"], 0)
    z = h @ net.params["dense3.w"] + net.params["dense3.b"]
    expected = np.exp(z - z.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(shipped(x=x), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(net(x=x), expected, rtol=1e-4, atol=1e-6)


KERNELS = {
    "convolution": "model C { input x: f32[N, 2, 9, 11]\n target y: class[N] of 3\n"
                   " h = dropout(relu(conv2d(x, 5, kernel=3)), 0.4)\n loss cross_entropy(dense(flatten(h), 3), y) }",
    "pooling": "model P { input x: f32[N, 2, 10, 14]\n target y: class[N] of 3\n"
               " h = dropout(maxpool2d(relu(conv2d(x, 3, kernel=3)), 2), 0.3)\n"
               " loss cross_entropy(dense(flatten(h), 3), y) }",
    "elementwise": "model E { input x: f32[N, 19]\n target y: class[N] of 3\n h = dropout(tanh(x) * 2.0, 0.5)\n"
                   " loss cross_entropy(dense(h, 3), y) }",
}


@pytest.mark.slow    # compiles three small models
@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_native_gradients_equal_the_interpreters_at_the_same_counters(kind):
    """Dropout after a convolution's, a pooling's or an elementwise kernel's store loop:
    the native gradient equals the interpreter's with the mask fixed at the counters
    the model draws at (seed 0's key, step 1)."""
    from structc.autodiff import differentiate
    from structc.build import build_model
    from structc.interp import evaluate
    from structc.syntax import parse
    src = KERNELS[kind]
    mdef = build_model(parse(src), None)
    net = structc.compile(src)
    key = key_of(0)
    for node in mdef.graph.nodes.values():
        if node.op.name == "dropout_mask":
            node.attrs["counters"] = (int(key[0]), int(key[1]), 1)
    rng = np.random.default_rng(0)
    feed = {}
    for spec in mdef.inputs.values():
        shape = tuple(5 if isinstance(d, str) else d for d in spec.type.shape)
        feed[spec.name] = (rng.integers(0, spec.classes, shape).astype(np.int32) if spec.classes
                           else rng.normal(size=shape).astype(np.float32))
    params = {name: v.copy() for name, v in net.params.items()}
    loss, grads = net.grad(**feed)
    ref = evaluate(differentiate(mdef.graph), feed, params)
    assert loss == pytest.approx(float(ref["loss"]), rel=1e-5)
    for name in grads:
        np.testing.assert_allclose(grads[name], ref[f"grad:{name}"], rtol=1e-3, atol=1e-5, err_msg=name)


def test_a_mask_per_edge_stays_per_edge():
    """sink_gathers computes f(h[g.src]) as f(h)[g.src] for elementwise f: for the
    mask that would give every edge from a node the same mask. (The layer's own
    x * mask keeps the gather used twice; the rewrite must refuse regardless.)"""
    from structc.build import build_model
    from structc.passes.message import sink_gathers
    from structc.syntax import parse
    mdef = build_model(parse("model G { input g: graph(features=4)\n output o = dropout(g.x[g.src], 0.5) }"), None)
    g = mdef.graph
    mask = next(n for n in g.nodes.values() if n.op.name == "dropout_mask")
    product = next(u for u in g.users(mask.id) if g.nodes[u].op.name == "mul")
    g.replace_uses(product, mask.id)       # the mask alone: its gather now has one use
    g.remove(product)
    g = sink_gathers(g)
    mask = next(n for n in g.nodes.values() if n.op.name == "dropout_mask")
    assert g.nodes[mask.inputs[0]].op.name == "gather_edges" and tuple(mask.type.shape) == ("g.edges", 4)


def test_the_held_out_loss_has_no_dropout():
    """Net.loss (what held-out evaluation reports) is the loss without dropout:
    the same model's forward probabilities, scored in numpy; training calls
    before and after it still draw their own masks."""
    net = structc.compile(TINY, seed=1)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 8)).astype(np.float32), rng.integers(0, 3, 40)
    net.train_step(x=x, y=y, lr=0.1)
    probs = net(x=x)
    expected = -np.mean(np.log(probs[np.arange(40), y]))
    assert net.loss(x=x, y=y) == pytest.approx(expected, rel=1e-5)
    with_dropout, _ = net.grad(x=x, y=y)
    assert with_dropout != pytest.approx(expected, rel=1e-3)


@pytest.mark.slow    # links a shared library and a C program
@pytest.mark.skipif(__import__("shutil").which("cc") is None and __import__("shutil").which("gcc") is None,
                    reason="no C compiler to link a shared library and the C driver")
def test_a_c_caller_of_the_shipped_library_gets_new_masks_each_call(tmp_path):
    """C callers leave hyper's dropout slots zero (tests/c/dropout_driver.c): the
    library's sc_train keys dropout from the export seed and counts its calls, so
    each call draws new masks, the same as `Net.grad` in Python with that seed, and
    sc_set_dropout_step replays a step. (Before, the zero step turned dropout off.)"""
    import shutil
    import subprocess
    from pathlib import Path

    from structc import ship
    from structc.api import compile_artifact
    root = Path(__file__).parent.parent
    example = root / "examples" / "digits_dropout.snet"
    net = structc.compile(example, seed=3)        # parameters of seed 3; dropout keyed by seed 0, as exported
    net.set_seed(0)
    ship.write_shared_library(compile_artifact(example.read_text(), str(example), jit=False), tmp_path / "d.so",
                              header=str(tmp_path / "d.h"), params=dict(net.params))
    assert "sc_set_dropout_step" in (tmp_path / "d.h").read_text()
    cc = shutil.which("cc") or shutil.which("gcc")
    subprocess.run([cc, "-O1", "-std=c11", "-include", str(tmp_path / "d.h"), str(root / "tests" / "c" /
                    "dropout_driver.c"), str(tmp_path / "d.so"), "-o", str(tmp_path / "driver"),
                    f"-Wl,-rpath,{tmp_path}"], check=True)
    out = subprocess.run([str(tmp_path / "driver")], capture_output=True, text=True, check=True).stdout.split("\n")
    c_losses = [np.float32(line.split()[1]) for line in out if line.startswith("loss ")]
    i = np.arange(5 * 64)
    x = (((i * 37) % 17) / 16.0).astype(np.float32).reshape(5, 64)
    y = (np.arange(5) % 10).astype(np.int32)
    py_losses = [np.float32(net.grad(x=x, y=y)[0]) for _ in range(3)]
    assert c_losses == py_losses and len(set(c_losses)) == 3       # a new mask each call, as in Python
    assert "steps 3" in out and f"again {out[1].split()[1]}" in out
    shipped = ship.load(tmp_path / "d.so")          # Python on the library: the raw entry, its own slots
    assert [np.float32(shipped.grad(x=x, y=y)[0]) for _ in range(3)] == py_losses
