"""Sequence inputs and recurrences over positions: batches of sequences and their
chain-shaped forests, the language, native code against the interpreter and a
per-step numpy reference, no recompilation for new lengths, errors at the boundary."""
import re

import numpy as np
import pytest

import structc
from structc import api
from structc.autodiff import differentiate
from structc.build import build_model
from structc.errors import SnetError
from structc.forest import Forest
from structc.interp import evaluate
from structc.seqdata import Sequences, SequenceBinder
from structc.syntax import parse

# forward from the first position, backward from the last, every kind of readout
BOTH_WAYS = """
model BothWays {
  input  s: sequence of f32[3]
  target y: class[s.sequences] of 4
  target z: class[s.positions] of 4
  param  h0: f32[6] = normal(0.5)
  rec h(t) = init: h0
             next: tanh(dense(h(t.prev), 6, name="fw"))
  rec b(t) = last: tanh(dense(t.x, 6, name="first_b"))
             prev: tanh(dense(b(t.next), 6, name="bw"))
  output states = concat(h(s.steps), b(s.steps))
  loss cross_entropy(dense(concat(h(s.last), b(s.first)), 4, name="out"), y)
  loss cross_entropy(dense(concat(h(s.steps), b(s.steps)), 4, name="tag"), z)
  loss mean(h(s.mean) * b(s.mean))
}
"""


def ragged(rng, lengths, features=3):
    return Sequences.from_list([rng.normal(size=(n, features)) for n in lengths])


def feed_for(net, seqs, **targets):
    return SequenceBinder.from_meta(net.meta).expand({"s": seqs, **targets}, {})


@pytest.fixture(scope="module")
def both_ways():
    return structc.compile(BOTH_WAYS), build_model(parse(BOTH_WAYS))


def check_native(net, mdef, seqs, targets, rtol=2e-3, atol=2e-5):
    """Native forward, loss and gradients against the interpreter (position by position, float64)."""
    params = {k: v.astype(np.float64) for k, v in net.params.items()}
    feed = feed_for(net, seqs, **targets)
    got = net.forward(s=seqs)
    want = evaluate(mdef.graph, feed, params, outputs=list(got))
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)
    loss, grads = net.grad(s=seqs, **targets)
    ref = evaluate(differentiate(mdef.graph), feed, params)
    assert loss == pytest.approx(float(ref["loss"]), rel=1e-4, abs=1e-6)
    for k in grads:
        np.testing.assert_allclose(grads[k], ref[f"grad:{k}"], rtol=rtol, atol=atol, err_msg=k)


# -- batches of sequences ------------------------------------------------------

def test_list_and_flat_agree_and_chains_are_right():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 9, n) for n in (3, 1, 2)]
    a = Sequences.from_list(parts)
    b = Sequences.from_flat(np.concatenate(parts), [0, 3, 4, 6])
    assert a.count == b.count == 3 and a.positions == 6 and a.longest == 3
    np.testing.assert_array_equal(a.words, b.words)
    fwd = a.arrays()
    # step t of every sequence is one level: the first positions, then the seconds, then the third
    assert fwd["level_end"].tolist() == [3, 5, 6]
    assert fwd["rows"].tolist() == [0, 3, 5, 1, 2, 4]           # flat position -> its row
    assert fwd["children"][:, 0].tolist() == [-1, -1, -1, 0, 2, 3]
    assert fwd["roots"].tolist() == [5, 1, 4]                   # each sequence's last position
    rev = a.arrays(reverse=True)
    assert rev["rows"].tolist() == [5, 3, 0, 1, 4, 2] and rev["roots"].tolist() == [5, 1, 4]
    init = a.arrays(init=True)                                  # a start leaf per sequence, one level more
    assert init["level_end"].tolist() == [3, 6, 8, 9]
    assert init["children"][:, 0].tolist() == [-1, -1, -1, 0, 1, 2, 3, 5, 6]
    # backward with start leaves: each sequence's last position reads its start leaf (rows 0-2),
    # and each other position the one after it; the recursion ends at the first positions
    both = a.arrays(reverse=True, init=True)
    assert both["level_end"].tolist() == [3, 6, 8, 9] and both["rows"].tolist() == [8, 6, 3, 4, 7, 5]
    assert both["children"][:, 0].tolist() == [-1, -1, -1, 0, 1, 2, 3, 5, 6]
    assert both["roots"].tolist() == [8, 4, 7]
    assert not fwd["rows"].flags.writeable


@pytest.mark.parametrize("build, error, message", [
    (lambda: Sequences.from_list([np.zeros((2, 3)), np.zeros((0, 3))]), ValueError, "sequence 1 is empty"),
    (lambda: Sequences.from_list([np.array([1, 2]), []]), ValueError, "sequence 1 is empty"),     # [] is float64
    (lambda: Sequences.from_list([np.zeros((2, 3)), np.zeros((2, 4))]), ValueError, "sequence 1 has shape"),
    (lambda: Sequences.from_list([np.array([1, -2])]), ValueError, "sequence 0: word id -2 at position 1"),
    (lambda: Sequences.from_list([np.array([[1.0, np.nan]])]), ValueError, "sequence 0: the features at"),
    (lambda: Sequences.from_list([np.zeros((2, 2, 2))]), ValueError, r"sequence 0: expected \[length\]"),
    (lambda: Sequences.from_list([]), ValueError, "at least one sequence"),
    (lambda: Sequences.from_list(np.zeros((2, 3))), TypeError, "a list of arrays"),
    (lambda: Sequences.from_flat(np.zeros(5, int), [0, 2, 2, 5]), ValueError, "sequence 1 has length 0"),
    (lambda: Sequences.from_flat(np.zeros(5, int), [1, 5]), ValueError, "must start at 0"),
    (lambda: Sequences.from_flat(np.zeros(5, int), [0, 4]), ValueError, "end at 4, but the data has 5"),
    (lambda: Sequences.from_flat(np.zeros(5, int), [0, 3, 2, 5]), ValueError, "sequence 1 has length -1"),
    (lambda: Sequences.from_flat(np.zeros(5, int), [[0, 5]]), ValueError, "1-D integer array"),
    (lambda: Sequences.from_flat(np.zeros(5, int), [0.0, 5.0]), ValueError, "1-D integer array"),
])
def test_bad_batches_raise_naming_the_sequence(build, error, message):
    with pytest.raises(error, match=message):
        build()


# -- the language: native against the interpreter, no recompilation --------------

def test_both_directions_and_every_readout_match_interpreter(both_ways):
    net, mdef = both_ways
    rng = np.random.default_rng(1)
    for lengths in ([4, 1, 7, 2], [1], [9]):
        seqs = ragged(rng, lengths)
        y = rng.integers(0, 4, len(lengths)).astype(np.int32)
        z = rng.integers(0, 4, seqs.positions).astype(np.int32)
        check_native(net, mdef, seqs, {"y": y, "z": z})


def test_steps_come_back_in_the_given_order(both_ways):
    """h(s.steps) row i is position i of the flat data: per-position outputs line up with targets."""
    net, _ = both_ways
    rng = np.random.default_rng(2)
    seqs = ragged(rng, [3, 5])
    alone = [net.forward(s=Sequences.from_list([seqs[i]]))["states"] for i in range(2)]
    np.testing.assert_allclose(net.forward(s=seqs)["states"], np.concatenate(alone), rtol=1e-5, atol=1e-6)


# the other two chains (first: forward, init: backward), words, two states and every readout
OTHER_WAYS = """
model OtherWays {
  input  s: sequence of word(vocab=9)
  param  E: f32[9, 3] = normal(0.5)
  rec (h, c)(t) = first: (tanh(E[t.word]), E[t.word])
                  next: (tanh(dense(concat(E[t.word], h(t.prev), c(t.prev)), 3, name="f")), c(t.prev) + E[t.word])
  rec b(t) = init: zeros(3)
             prev: tanh(dense(concat(E[t.word], b(t.next)), 3, name="r"))
  output steps = concat(h(s.steps), c(s.steps), b(s.steps))
  output means = concat(c(s.mean), b(s.mean))
  output ends = concat(c(s.last), b(s.first))
}
"""


def test_every_readout_of_the_other_chains_matches_a_per_position_reference():
    """Position by position in float64, sequence by sequence in the order given
    (lengths 1 to 200): per-position rows in that order, means and ends per sequence."""
    net = structc.compile(OTHER_WAYS, seed=1)
    p = {k: v.astype(np.float64) for k, v in net.params.items()}

    def dense(v, name):
        return v @ p[f"{name}.w"] + p[f"{name}.b"]

    def reference(words):
        hs, cs, bs = [], [], [None] * len(words)
        for i, w in enumerate(words):
            e = p["E"][w]
            h, c = (np.tanh(e), e) if i == 0 else (np.tanh(dense(np.concatenate([e, h, c]), "f")), c + e)
            hs.append(h)
            cs.append(c)
        b = np.zeros(3)
        for i in reversed(range(len(words))):
            b = bs[i] = np.tanh(dense(np.concatenate([p["E"][words[i]], b]), "r"))
        return np.array(hs), np.array(cs), np.array(bs)
    rng = np.random.default_rng(6)
    for lengths in ([5, 1, 3, 200], [1], [2, 2]):
        words = [rng.integers(0, 9, n) for n in lengths]
        got = net.forward(s=words)
        refs = [reference(w) for w in words]
        np.testing.assert_allclose(got["steps"], np.concatenate([np.concatenate(r, axis=1) for r in refs]),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["means"], [np.concatenate([c.mean(0), b.mean(0)]) for _, c, b in refs],
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["ends"], [np.concatenate([c[-1], b[0]]) for _, c, b in refs],
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_no_recompilation_for_new_lengths():
    before = api.COMPILE_COUNT
    net = structc.compile(BOTH_WAYS.replace("BothWays", "Once"), cache=False, training=True)   # both parts, once
    assert api.COMPILE_COUNT == before + 1
    rng = np.random.default_rng(3)
    for lengths in ([1], [60], [5, 17, 2], list(rng.integers(1, 40, 64))):
        seqs = ragged(rng, lengths)
        y = rng.integers(0, 4, len(lengths)).astype(np.int32)
        z = rng.integers(0, 4, seqs.positions).astype(np.int32)
        assert net.forward(s=seqs)["states"].shape == (seqs.positions, 12)
        assert np.isfinite(net.train_step(s=seqs, y=y, z=z, lr=0.05))
    assert api.COMPILE_COUNT == before + 1


# -- errors: in the language, and at the boundary before native code runs -------------

@pytest.mark.parametrize("body, message", [
    ("rec h(t) = first: t.x next: h(t.next)", "runs forward (... next: ...) reads t.prev, not t.next"),
    ("rec h(t) = last: t.x prev: h(t.prev)", "runs backward (... prev: ...) reads t.next, not t.prev"),
    ("rec h(t) = first: t.x + t.prev next: h(t.prev)", "the first position has no t.prev"),
    ("rec h(t) = first: h(t.prev) next: h(t.prev)", "before any h: call h in the 'next:' case"),
    ("rec h(t) = init: t.x next: h(t.prev)", "'init:' is the state before the first step"),
    ("rec h(t) = first: t.x prev: h(t.next)", "expected 'next:' after 'first:'"),
    ("rec h(t) = init: zeros(3) next: t.word", "carry feature vectors: use t.x"),
])
def test_recursion_mistakes_are_reported_in_sequence_words(body, message):
    src = f"model M {{ input s: sequence of f32[3]\n {body}\n output o = h(s.steps) }}"
    with pytest.raises(SnetError, match=re.escape(message)):
        build_model(parse(src))


def test_the_end_a_recursion_does_not_reach_is_an_error():
    src = ("model M { input s: sequence of f32[3]\n rec h(t) = first: t.x next: h(t.prev)\n"
           " output o = h(s.first) }")
    with pytest.raises(SnetError, match=r"runs forward, so it ends at s.last: h\(s.first\) is its first case"):
        build_model(parse(src))


@pytest.mark.parametrize("use, column", [("dense(s[0], 3)", 27), ("dense(s, 3)", 21)])
def test_a_cells_pair_outside_a_recursion_says_where_it_goes(use, column):
    """lstm_cell gives (h, c): that pair is neither indexable nor a tensor, and the
    error says how to name its values, or where it belongs."""
    src = ("model M { input x: f32[N, 8]\n target y: class[N] of 3\n s = lstm_cell(x, x, x, 8)\n"
           f" loss cross_entropy({use}, y) }}")
    with pytest.raises(SnetError, match=re.escape("is unpacked into names, `(h, c) = lstm_cell(x, h0, c0, H)`, "
                                                  "or is the states of a recursion's case: `rec (h, c)(t)")) as err:
        build_model(parse(src))
    assert (err.value.span.line, err.value.span.col) == (4, column), err.value.span


def test_a_sequence_model_refuses_a_forest_and_a_forest_model_sequences(both_ways):
    net, _ = both_ways
    with pytest.raises(TypeError, match="'s' is a sequence input, got a Forest"):
        net(s=Forest.from_tuples([(1, 2)]))
    with pytest.raises(TypeError, match="sequence input"):
        net(s=np.zeros((3, 3)))
    tree_net = structc.compile("model T { input t: forest of word(vocab=5)\n"
                               " rec h(n) = leaf: onehot(n.word) node: h(n.left) + h(n.right)\n"
                               " output o = h(t.root) }")
    with pytest.raises(TypeError, match="expected a Forest"):
        tree_net(t=Sequences.from_list([np.array([1, 2])]))


def test_a_misspelt_input_is_listed_beside_the_names_a_caller_passes(both_ways):
    """Not beside the arrays a sequence or forest input becomes (s.children, t.level_end, ...)."""
    net, _ = both_ways
    seqs = ragged(np.random.default_rng(0), [2, 1])
    with pytest.raises(TypeError, match=r"has no input 'Y' \(inputs: s, y, z\)$"):
        net.grad(s=seqs, Y=np.zeros(2, np.int32), z=np.zeros(3, np.int32))
    with pytest.raises(TypeError, match=r"has no input 'q' \(inputs: s, y, z\)$"):
        net(s=seqs, q=1)
    tree_net = structc.compile("model T { input t: forest of word(vocab=5)\n target y: class[t.trees] of 2\n"
                               " rec h(n) = leaf: onehot(n.word) node: h(n.left) + h(n.right)\n"
                               " loss cross_entropy(dense(h(t.root), 2), y) }")
    with pytest.raises(TypeError, match=r"has no input 'Y' \(inputs: t, y\)$"):
        tree_net.grad(t=Forest.from_tuples([(1, 2)]), Y=np.zeros(1, np.int32))


def test_bad_inputs_are_refused_before_native_code(both_ways):
    net, _ = both_ways
    with pytest.raises(ValueError, match="positions carry 2 features, the model expects 3"):
        net(s=[np.zeros((2, 2))])
    with pytest.raises(ValueError, match="expects feature vectors"):
        net(s=[np.array([1, 2])])
    words = structc.compile("model W { input s: sequence of word(vocab=10)\n"
                            " param E: embedding(10, 4)\n"
                            " rec h(t) = first: E[t.word] next: tanh(dense(h(t.prev), 4))\n"
                            " output o = h(s.last) }")
    with pytest.raises(ValueError, match=r"sequence 1, position 2: word id 10 is out of range \[0, 10\)"):
        words(s=[np.array([1, 2]), np.array([3, 4, 10])])
    with pytest.raises(ValueError, match="has 2 rows|axis 0"):
        net.grad(s=ragged(np.random.default_rng(0), [2, 3, 4]), y=np.zeros(2, np.int32),
                 z=np.zeros(9, np.int32))


# -- gated cells against a per-step numpy reference (float64) -----------------------

GRU = """
model Gru {
  input  s: sequence of f32[5]
  target y: class[s.sequences] of 3
  rec h(t) = init: zeros(6)
             next: gru_cell(t.x, h(t.prev), 6, name="cell")
  loss cross_entropy(dense(h(s.last), 3, name="out"), y)
}
"""


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def gru_step(p, x, state):
    (h,) = state
    rz = sigmoid(np.concatenate([x, h]) @ p["cell.wg"] + p["cell.bg"])
    r, z = np.split(rz, 2)
    n = np.tanh(np.concatenate([x, r * h]) @ p["cell.wn"] + p["cell.bn"])
    return ((1 - z) * n + z * h,)


def reference_loss(p, seqs, y, step, states):
    """Mean cross-entropy of dense(last h) over the sequences, one position at a time
    from zero states (`states` of them, each [6])."""
    total = 0.0
    for i in range(seqs.count):
        state = tuple(np.zeros(6) for _ in range(states))
        for x in seqs[i].astype(np.float64):
            state = step(p, x, state)
        logits = state[0] @ p["out.w"] + p["out.b"]
        total += np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[y[i]]
    return total / seqs.count


def check_against_reference(net, seqs, y, step, states, rng):
    """Native loss equals the reference's; native gradients match its central differences."""
    p = {k: v.astype(np.float64) for k, v in net.params.items()}
    loss, grads = net.grad(s=seqs, y=y)
    assert loss == pytest.approx(reference_loss(p, seqs, y, step, states), rel=1e-5)
    v = {k: rng.normal(size=a.shape) for k, a in p.items()}
    eps = 1e-5
    plus = reference_loss({k: p[k] + eps * v[k] for k in p}, seqs, y, step, states)
    minus = reference_loss({k: p[k] - eps * v[k] for k in p}, seqs, y, step, states)
    analytic = sum(float(np.sum(grads[k] * v[k])) for k in p)
    assert analytic == pytest.approx((plus - minus) / (2 * eps), rel=2e-3, abs=1e-6)


@pytest.fixture(scope="module")
def gru():
    return structc.compile(GRU), build_model(parse(GRU))


@pytest.mark.slow         # the fast subset keeps the LSTM's batch of one
@pytest.mark.parametrize("lengths", [[1, 60, 13, 2, 37], [23]], ids=["ragged", "one"])
def test_gru_matches_a_per_step_reference(gru, lengths):
    net, mdef = gru
    rng = np.random.default_rng(4)
    net.params["cell.bg"][...] = rng.normal(size=12) * 0.5     # no gate starts at exactly 1/2
    seqs = ragged(rng, lengths, features=5)
    y = rng.integers(0, 3, len(lengths)).astype(np.int32)
    check_against_reference(net, seqs, y, gru_step, 1, rng)
    check_native(net, mdef, seqs, {"y": y})


LSTM = """
model Lstm {
  input  s: sequence of f32[5]
  target y: class[s.sequences] of 3
  rec (h, c)(t) = init: (zeros(6), zeros(6))
                  next: lstm_cell(t.x, h(t.prev), c(t.prev), 6, name="cell")
  loss cross_entropy(dense(h(s.last), 3, name="out"), y)
}
"""


def lstm_step(p, x, state):
    h, c = state
    i, f, u, o = np.split(np.concatenate([x, h]) @ p["cell.w"] + p["cell.b"], 4)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(u)
    return sigmoid(o) * np.tanh(c), c


@pytest.fixture(scope="module")
def lstm():
    return structc.compile(LSTM), build_model(parse(LSTM))


@pytest.mark.parametrize("lengths", [pytest.param([1, 60, 13, 2, 37], marks=pytest.mark.slow), [23]],
                         ids=["ragged", "one"])
def test_lstm_matches_a_per_step_reference(lstm, lengths):
    net, mdef = lstm
    rng = np.random.default_rng(5)
    net.params["cell.b"][...] = rng.normal(size=24) * 0.5
    seqs = ragged(rng, lengths, features=5)
    y = rng.integers(0, 3, len(lengths)).astype(np.int32)
    check_against_reference(net, seqs, y, lstm_step, 2, rng)
    check_native(net, mdef, seqs, {"y": y})


def _tree_grad(mdef):
    g = differentiate(mdef.graph)
    return next(n for n in g.nodes.values() if n.op.name == "tree_map_grad")


def _count(program, op: str) -> int:
    return sum(n.op.name == op for n in program.graph.nodes.values())


def test_backward_reads_the_kept_gates_instead_of_recomputing_them(lstm):
    """The forward keeps each step's gates; the backward programs run no gate
    matmul of their own: the children's one (the delta dg W_h^T per level), the
    parameters' two (dW_x and dW_h, once over every position). The gates'
    cotangent dg is computed once, per level, and read by the parameters' program."""
    grad = _tree_grad(lstm[1])
    assert grad.attrs["kept"] == 1
    assert _count(grad.attrs["bwd_in"], "matmul") == 1
    assert _count(grad.attrs["bwd_par"], "matmul") + _count(grad.attrs["bwd_par"], "matmul_parts") == 2
    assert _count(grad.attrs["bwd_in"], "lstm_gates_dg") == 1
    assert _count(grad.attrs["bwd_par"], "lstm_gates_dg") == 0


@pytest.mark.parametrize("src, pairs", [(LSTM, 1), (GRU, 2)], ids=["lstm", "gru"])
def test_a_cells_gates_are_one_product_a_level(src, pairs):
    """x @ W[:F] + (h @ W[F:] + b) runs in a level as one matmul_pair (the bias in
    its epilogue), not two products and an add; the GRU has two such gates."""
    tm = next(n for n in build_model(parse(src)).graph.nodes.values() if n.op.name == "tree_map")
    assert _count(tm.attrs["fwd"], "matmul_pair") == pairs
    assert _count(tm.attrs["fwd"], "matmul") == 0
    assert all(n.attrs.get("row_stable") for n in tm.attrs["fwd"].graph.nodes.values()
               if n.op.name == "matmul_pair")


@pytest.mark.slow          # a compile of its own
@pytest.mark.parametrize("cell", [LSTM, GRU], ids=["lstm", "gru"])
def test_two_threads_give_the_one_threads_gradients(cell):
    """Kept gates, the gates' one product a level and the cotangent blocks give
    the same gradients when the body's kernels split their rows over two threads."""
    src = cell.replace("model ", "model Wide").replace("6, name", "48, name").replace("zeros(6)", "zeros(48)")
    net = structc.compile(src, seed=2)
    rng = np.random.default_rng(7)
    seqs = ragged(rng, rng.integers(1, 30, 40), features=5)
    y = rng.integers(0, 3, 40).astype(np.int32)
    got, before = {}, structc.native.get_num_threads()
    try:
        for threads in (1, 2):
            structc.set_num_threads(threads)
            got[threads] = net.grad(s=seqs, y=y)
    finally:
        structc.set_num_threads(before)
    assert got[2][0] == pytest.approx(got[1][0], rel=1e-6)
    for k in got[1][1]:
        np.testing.assert_allclose(got[2][1][k], got[1][1][k], rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.slow
def test_lstm_matches_torch_nn_lstm(lstm):
    """The same weights in torch.nn.LSTM (gates i, f, g, o; W = [W_ih; W_hh]^T, b = b_ih + b_hh) give the same loss."""
    torch = pytest.importorskip("torch")
    net, _ = lstm
    rng = np.random.default_rng(6)
    seqs = ragged(rng, [4, 9, 1], features=5)
    y = np.array([0, 2, 1], np.int32)
    cell = torch.nn.LSTM(5, 6)
    w = net.params["cell.w"]
    with torch.no_grad():
        cell.weight_ih_l0.copy_(torch.tensor(w[:5].T))
        cell.weight_hh_l0.copy_(torch.tensor(w[5:].T))
        cell.bias_ih_l0.copy_(torch.tensor(net.params["cell.b"]))
        cell.bias_hh_l0.zero_()
    last = [cell(torch.tensor(seqs[i][:, None, :]))[0][-1, 0] for i in range(3)]
    logits = torch.stack(last) @ torch.tensor(net.params["out.w"]) + torch.tensor(net.params["out.b"])
    want = torch.nn.functional.cross_entropy(logits, torch.tensor(y, dtype=torch.long)).item()
    assert net.grad(s=seqs, y=y)[0] == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_digits_lstm_example_gradients_and_native():
    """The example (structured input, so not in test_examples): float64 finite
    differences of the whole model, and native against the interpreter."""
    from pathlib import Path
    from structc.testing import check_model_grads
    path = Path(__file__).resolve().parent.parent / "examples" / "digits_lstm.snet"
    mdef, net = build_model(parse(path.read_text(), str(path))), structc.compile(path)
    rng = np.random.default_rng(7)
    seqs = ragged(rng, [8, 8, 3], features=8)
    y = np.array([1, 7, 4], np.int32)
    check_model_grads(mdef, feed_for(net, seqs, y=y), {k: v.copy() for k, v in net.params.items()})
    check_native(net, mdef, seqs, {"y": y})


def test_data_sets_are_matched_to_sequence_models(both_ways):
    from structc import datasets
    net, _ = both_ways
    with pytest.raises(ValueError, match=r"declares sequence input 's' \(of f32\[3\]\).*try --data digits_rows"):
        datasets.check_name_fits("digits", net)
    dense = structc.compile("model D { input x: f32[N, 64]\n target y: class[N] of 10\n"
                            " loss cross_entropy(dense(x, 10), y) }")
    with pytest.raises(ValueError, match="holds labelled sequences"):
        datasets.check_name_fits("digits_rows", dense)
    rows = datasets.load("digits_rows")
    assert rows.train.count + rows.test.count == 1797 and rows.train.longest == 8
    np.testing.assert_array_equal(rows.train[0].reshape(-1), datasets.load("digits").x_train[0])


@pytest.mark.slow
def test_cells_work_in_a_tree_node_case():
    src = """
model TreeCells {
  input  t: forest of f32[3]
  target y: class[t.trees] of 2
  rec (h, c)(n) = leaf: (tanh(dense(n.x, 4)), zeros(4))
                  node: lstm_cell(h(n.left), h(n.right), c(n.left) + c(n.right), 4)
  rec g(n) = leaf: tanh(dense(n.x, 4, name="gl"))
             node: gru_cell(g(n.left), g(n.right), 4)
  loss cross_entropy(dense(concat(h(t.root), g(t.root)), 2), y)
}
"""
    check_tree_model_against_the_interpreter(src, seed=0, draws=8)


def check_tree_model_against_the_interpreter(src: str, seed: int, draws: int) -> dict:
    """A model over `forest of f32[3]` with 2 classes: its native loss and gradients on three
    small random trees against the interpreter's in float64; returns the gradients."""
    from structc.forest import bind_forest
    net, mdef = structc.compile(src, seed=seed), build_model(parse(src))
    rng = np.random.default_rng(draws)
    leaf = lambda: rng.normal(size=3)      # noqa: E731
    forest = Forest.from_tuples([((leaf(), leaf()), leaf()), leaf(), (leaf(), (leaf(), leaf()))])
    y = np.array([0, 1, 1], np.int32)
    feed = {**bind_forest("t", forest, net.meta["forests"][0])[0], "y": y}
    params = {k: v.astype(np.float64) for k, v in net.params.items()}
    loss, grads = net.grad(t=forest, y=y)
    ref = evaluate(differentiate(mdef.graph), feed, params)
    assert loss == pytest.approx(float(ref["loss"]), rel=1e-4)
    for k in grads:
        np.testing.assert_allclose(grads[k], ref[f"grad:{k}"], rtol=2e-3, atol=2e-5, err_msg=k)
    return grads


@pytest.mark.slow
def test_word_sequences_reach_their_embedding_from_every_position():
    """sequence of word(vocab=V): E[t.word] in the step case; the embedding's gradient
    comes from every position (native against the interpreter)."""
    src = """
model Words {
  input  s: sequence of word(vocab=7)
  target y: class[s.sequences] of 2
  param  E: embedding(7, 4) = normal(0.5)
  rec (h, c)(t) = init: (zeros(5), zeros(5))
                  next: lstm_cell(E[t.word], h(t.prev), c(t.prev), 5)
  loss cross_entropy(dense(h(s.mean), 2), y)
}
"""
    net, mdef = structc.compile(src), build_model(parse(src))
    seqs = Sequences.from_list([np.array([1, 2, 3]), np.array([6]), np.array([0, 5, 5, 4])])
    y = np.array([1, 0, 1], np.int32)
    check_native(net, mdef, seqs, {"y": y})
    grads = net.grad(s=seqs, y=y)[1]["E"]
    assert np.all(np.abs(grads).sum(axis=1) > 0)      # every word of the batch has a gradient


def test_structc_check_shows_the_sequence_input_not_its_arrays(capsys):
    from pathlib import Path
    from structc.cli import main
    path = Path(__file__).resolve().parent.parent / "examples" / "digits_lstm.snet"
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "model DigitsLSTM(s: sequence of f32[8], y: i32[s.sequences])" in out and "children" not in out


def test_distributed_training_shards_sequences_by_length():
    """Sequences are split like forests: by cost (their lengths), largest first."""
    from structc import datasets
    from structc.distributed import check_splittable, feeder, item_costs
    from pathlib import Path
    data = datasets.load("digits_rows")
    data.bind(structc.compile(Path(__file__).resolve().parent.parent / "examples" / "digits_lstm.snet"))
    check_splittable(data)                      # no longer refused
    costs = item_costs(data)
    assert costs.shape == (data.train.count,) and set(costs.tolist()) == {8.0}
    feed = feeder(data)([3, 1])
    assert feed["s"].count == 2 and np.array_equal(feed["s"][0], data.train[3]) and feed["y"].tolist() == [
        int(data.y_train[3]), int(data.y_train[1])]
    assert feeder(data)([]) == {}


def test_sequences_pickle_and_copy_as_they_were_checked():
    import copy
    import pickle
    seqs = Sequences.from_list([np.array([1, 2]), np.array([3])])
    for again in (pickle.loads(pickle.dumps(seqs)), copy.deepcopy(seqs)):
        np.testing.assert_array_equal(again.words, seqs.words)
        np.testing.assert_array_equal(again.offsets, seqs.offsets)
        assert not again.words.flags.writeable


def test_the_cells_gradient_reads_the_activations_the_forward_wrote(lstm):
    """Each step's forward kernel writes the gates' activations too
    (lstm_gates_acts, kept per level); the backward reads them with c and c'
    (one tanh) instead of the gates (four exponentials again)."""
    grad = _tree_grad(lstm[1])
    keep = grad.attrs["keep"]
    assert [keep.nodes[k].op.name for k in keep.outputs.values() if k != keep.outputs["h"]] == ["lstm_gates_acts"]
    program = grad.attrs["bwd_in"].graph
    assert "lstm_gates_acts" not in {n.op.name for n in program.nodes.values()}
    dg = next(n for n in program.nodes.values() if n.op.name == "lstm_gates_dg")
    assert [program.nodes[i].attrs.get("name") for i in dg.inputs[:3]] == ["@keep0", "@C.1", "@h"]


def test_the_cells_gradient_is_one_kernel(lstm):
    """lstm_gates's VJP runs the gate math once per step: the kernel that
    writes dg (the gates' gradient) writes dc (the state's) too."""
    g = _tree_grad(lstm[1]).attrs["bwd_in"].graph
    ops = [{g.nodes[m].op.name for m in gr.members} for gr in g.groups]
    with_dg = [names for names in ops if "lstm_gates_dg" in names]
    assert len(with_dg) == 1 and "lstm_gates_dc" in with_dg[0]
    assert sum("lstm_gates_dc" in names for names in ops) == 1


def test_the_lstm_benchmarks_floor_counts_the_products_the_step_needs():
    """bench_lstm's FLOP floor: per position the gates' product forward, the
    weights' gradient (the same), and the state's cotangent through W_h; no
    cotangent into the features (data), and structc's backward node case makes
    none: its products write the state's [rows, H] cotangent only."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    from bench_lstm import F, H, SRC, flop
    assert flop(np.array([3, 1])) == 2 * 4 * (2 * (F + H) + H) * 4 * H
    assert flop(np.array([3, 1]), cell="gru") == 2 * 4 * (2 * (F + H) + H) * 3 * H
    train = differentiate(build_model(parse(SRC)).graph)
    grads = [n for n in train.nodes.values() if n.op.name == "tree_map_grad"]
    body = grads[0].attrs["bwd_in"].graph
    products = [n for n in body.nodes.values() if n.op.name.startswith("matmul")]
    assert products and {n.shape[1] for n in products} == {H}
