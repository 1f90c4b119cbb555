"""Tuple unpacking, `(h, c) = lstm_cell(...)`: in a case block and as a statement.
Its grammar (a statement may follow one ending in a name), its refusals (with the
caret's column), and the models it makes possible: a 2-layer LSTM or GRU as one
recursion carrying both layers' states, against a per-step float64 reference,
the interpreter and torch.nn.LSTM(num_layers=2); a tree's node case."""
import re

import numpy as np
import pytest

import structc
from structc.build import build_model
from structc.compiler import canonical_program
from structc.errors import SnetError, SnetNameError, SnetSyntaxError, SnetTypeError
from structc.syntax import Unpack, parse, unparse
from test_sequences import check_native, check_tree_model_against_the_interpreter, ragged, sigmoid

STACKED_LSTM = """
model Stacked {
  input  s: sequence of f32[8]
  target y: class[s.sequences] of 10
  rec (h1, c1, h2, c2)(t) = init: (zeros(32), zeros(32), zeros(32), zeros(32))
                  next: { (a, ac) = lstm_cell(t.x, h1(t.prev), c1(t.prev), 32);
                          (b, bc) = lstm_cell(a, h2(t.prev), c2(t.prev), 32);
                          (a, ac, b, bc) }
  loss cross_entropy(dense(h2(s.last), 10), y)
}
"""

STACKED_GRU = """
model StackedGru {
  input  s: sequence of f32[8]
  target y: class[s.sequences] of 10
  rec (h1, h2)(t) = init: (zeros(32), zeros(32))
                    next: { a = gru_cell(t.x, h1(t.prev), 32);
                            b = gru_cell(a, h2(t.prev), 32);
                            (a, b) }
  loss cross_entropy(dense(h2(s.last), 10), y)
}
"""


def build(body: str, inputs: str = "input x: f32[N, 8]"):
    return build_model(parse(f"model M {{ {inputs}\n{body} }}", "m.snet"))


def refusal(body: str, inputs: str = "input x: f32[N, 8]") -> SnetError:
    with pytest.raises(SnetError) as err:
        build(body, inputs)
    return err.value


# -- the grammar ------------------------------------------------------------------

def test_an_unpacking_parses_as_a_statement_and_in_a_case_block():
    program = parse("model M { input x: f32[N, 8]\n (h, c) = lstm_cell(x, x, x, 8)\n"
                    " input s: sequence of f32[8]\n"
                    " rec g(t) = init: zeros(8) next: { (a, ac,) = lstm_cell(t.x, g(t.prev), g(t.prev), 8); a }\n"
                    " output o = h }")
    stmt = program.models[0].body[1]
    assert isinstance(stmt, Unpack) and stmt.names == ["h", "c"]
    assert [(s.line, s.col) for s in stmt.name_spans] == [(2, 3), (2, 6)]
    (binding,) = program.models[0].body[3].step.bindings
    assert isinstance(binding, Unpack) and binding.names == ["a", "ac"]


@pytest.mark.parametrize("before", ["x = y", "x = relu(y)", "output o = y", "x = f(y) |> g"])
def test_a_statement_after_a_name_is_not_a_call_of_it(before):
    """Newlines are insignificant: `y` then `(a, b) = ...` is two statements, not y(a, b)."""
    body = parse(f"model M {{ {before}\n (a, b) = lstm_cell(y, y, y, 8) }}").models[0].body
    assert [type(s).__name__ for s in body] == [("OutputStmt" if "output" in before else "Assign"), "Unpack"]
    assert body[1].names == ["a", "b"]


@pytest.mark.parametrize("text", [
    "x = relu(y)   # scale = 2\n output o = x",        # a comment's '=' after a call's ')'
    "x = relu(y) # note (a) = b\n output o = x",
])
def test_a_call_followed_by_an_equals_sign_in_a_comment_is_a_call(text):
    assert [type(s).__name__ for s in parse(f"model M {{ {text} }}").models[0].body] == ["Assign", "OutputStmt"]


def test_a_comment_may_stand_between_the_names_and_the_equals_sign():
    body = parse("model M { x = y\n (a, b)   # the cell's two halves\n = lstm_cell(y, y, y, 8) }").models[0].body
    assert isinstance(body[1], Unpack) and body[1].names == ["a", "b"]


def test_a_tuple_value_is_still_a_tuple():
    """`(a, b)` closing a case block, or a call's (3, 3), is no unpacking."""
    step = parse("model M { input s: sequence of f32[3]\n rec (h, c)(t) = init: (zeros(3), zeros(3))\n"
                 " next: { (a, b) = lstm_cell(t.x, h(t.prev), c(t.prev), 3); (a, b) }\n"
                 " output o = sum(h(s.last), axes=(0, 1)) }").models[0].body[1].step
    assert type(step.value).__name__ == "Tuple"


@pytest.mark.parametrize("text", [
    "(h, c) = lstm_cell(x, x, x, 8)",
    "(a, b, d) = (relu(x), x * 2, -x)",
])
def test_unparse_of_an_unpacking_parses_back_to_it(text):
    def statement(src):
        return parse(f"model M {{ input x: f32[N, 8]\n {src} }}").models[0].body[1]
    first = statement(text)
    assert canonical_program(statement(unparse(first))) == canonical_program(first)


def test_unparse_of_a_case_block_with_bindings_parses_back_to_it():
    def step(block):
        return parse("model M { input s: sequence of f32[8]\n rec (h1, c1, h2, c2)(t) = init: "
                     f"(zeros(4), zeros(4), zeros(4), zeros(4)) next: {block}\n"
                     " output o = h2(s.last) }").models[0].body[1].step
    block = step("{ (a, ac) = lstm_cell(t.x, h1(t.prev), c1(t.prev), 4); z = a * 2;\n"
                 "  (b, bc) = lstm_cell(z, h2(t.prev), c2(t.prev), 4); (a, ac, b, bc) }")
    text = unparse(block)
    assert text.startswith("{ (a, ac) = lstm_cell(") and "; z = (a * 2); (b, bc) = " in text
    assert canonical_program(step(text)) == canonical_program(block)


@pytest.mark.parametrize("body, message, column", [
    ("(h, c[0]) = lstm_cell(x, x, x, 8)", "an unpacking binds names, as in (h, c) = lstm_cell(...); got c[0]", 6),
    ("(h) = relu(x)", "an unpacking binds two names or more; bind one value with h = ...", 3),
    ("(h,) = relu(x)", "an unpacking binds two names or more", 3),
])
def test_an_unpacking_binds_plain_names(body, message, column):
    with pytest.raises(SnetSyntaxError, match=re.escape(message)) as err:
        parse(f"model M {{ input x: f32[N, 8]\n {body}\n output o = x }}")
    assert (err.value.span.line, err.value.span.col) == (2, column)


# -- refusals, at their spans ----------------------------------------------------------

CELL = "lstm_cell(x, x, x, 8)"


@pytest.mark.parametrize("body, error, message, at", [
    (f"(h, c, d) = {CELL}", SnetTypeError, "lstm_cell gives 2 values (h, c); 3 names", "lstm_cell"),
    ("(h, c) = gru_cell(x, x, 8)", SnetTypeError,
     "gru_cell gives one value, not a tuple of 2: bind it to one name, h = gru_cell(...)", "gru_cell"),
    ("(h, c) = relu(x)", SnetTypeError, "relu gives one value, not a tuple of 2", "relu"),
    ("(h, c) = x", SnetTypeError, "the value gives one value, not a tuple of 2", "x"),
    ("(h, c) = (x, x, x)", SnetTypeError, "the tuple gives 3 values; 2 names", "(x"),
    (f"(h, h) = {CELL}", SnetNameError, "'h' is bound twice in this unpacking", "h)"),
    (f"(h, x) = {CELL}", SnetNameError, "cannot assign to 'x': it is a declared input", "x)"),
    (f"param w: f32[8]\n (w, c) = {CELL}", SnetNameError, "cannot assign to 'w': it is a declared parameter", "w,"),
    ("(h, c) = (x, q)", SnetNameError, "unknown name 'q'", "q"),
    ("(h, c) = lstm_cel(x, x, x, 8)", SnetNameError, "unknown function 'lstm_cel'", "lstm_cel"),
])
def test_a_bad_unpacking_statement_is_refused_at_its_span(body, error, message, at):
    err = refusal(body + "\n output o = x")
    assert isinstance(err, error) and message in err.message, err.message
    line = body.split("\n")[-1]
    assert (err.span.line, err.span.col) == (body.count("\n") + 2, line.index(at) + 1), err.span


SEQ = "input s: sequence of f32[8]\n param w: f32[8]"


@pytest.mark.parametrize("step, error, message, at", [
    ("{ (h, q) = lstm_cell(t.x, h(t.prev), c(t.prev), 8); (h, q) }", SnetNameError,
     "'h' is a state of this recursion", "h,"),
    ("{ (a, c) = lstm_cell(t.x, h(t.prev), c(t.prev), 8); (a, c) }", SnetNameError,
     "'c' is a state of this recursion", "c)"),
    ("{ (a, ac, z) = lstm_cell(t.x, h(t.prev), c(t.prev), 8); (a, ac) }", SnetTypeError,
     "lstm_cell gives 2 values (h, c); 3 names", "lstm_cell"),
    ("{ (a, b) = gru_cell(t.x, h(t.prev), 8); (a, b) }", SnetTypeError,
     "gru_cell gives one value, not a tuple of 2: bind it to one name, a = gru_cell(...)", "gru_cell"),
    ("{ (a, a) = lstm_cell(t.x, h(t.prev), c(t.prev), 8); (a, a) }", SnetNameError,
     "'a' is bound twice in this unpacking", "a)"),
    ("{ z = t.x; (a, ac) = lstm_cell(z, h(t.prev), c(t.prev), 8); (a, ac, z) }", SnetTypeError,
     "the next case gives 3 values for 2 states (h, c)", "(a, ac, z)"),
])
def test_a_bad_unpacking_in_a_case_block_is_refused_at_its_span(step, error, message, at):
    err = refusal(f"rec (h, c)(t) = init: (zeros(8), zeros(8))\n next: {step}\n output o = h(s.last)", SEQ)
    assert isinstance(err, error) and message in err.message, err.message
    assert (err.span.line, err.span.col) == (4, len(" next: ") + step.index(at) + 1), err.span


def test_names_bound_in_a_case_block_stay_in_it():
    err = refusal("rec (h, c)(t) = first: { (a, ac) = lstm_cell(t.x, t.x, t.x, 8); (a, ac) }\n"
                  " next: { (a, ac) = lstm_cell(t.x, h(t.prev), c(t.prev), 8); (a, ac) }\n"
                  " output o = relu(a)", SEQ)
    assert isinstance(err, SnetNameError) and err.message.startswith("unknown name 'a'")
    assert (err.span.line, err.span.col) == (5, 18)


@pytest.mark.parametrize("name, what", [("a", "relu"), ("w", "param"), ("x", "input")])
def test_a_case_block_unpacking_shadows_a_model_name_only_inside_it(name, what):
    """As a case block's plain binding does (examples/logic_treelstm.snet binds s, its
    target), an unpacking there may reuse a model's name, even a parameter's or an
    input's; after the recursion the name is the model's again (the binding is restored)."""
    mdef = build("param w: f32[3, 8]\n a = relu(x)\n input s: sequence of f32[8]\n"
                 f" rec (h, c)(t) = first: {{ ({name}, ac) = lstm_cell(t.x, t.x, t.x, 8); ({name} * 2, ac) }}\n"
                 f"   next: {{ ({name}, ac) = lstm_cell(t.x, h(t.prev), c(t.prev), 8); ({name} * 2, ac) }}\n"
                 f" output o = {name}")
    out = mdef.graph.nodes[mdef.graph.outputs["o"]]
    assert out.op.name == what and out.type.shape[1:] == (8,)


def test_a_repeated_block_may_unpack():
    mdef = build("h = x\n c = x\n repeat 2 { (h, c) = lstm_cell(x, h, c, 8) }\n output o = h + c")
    assert sum(n.op.name == "lstm_gates" for n in mdef.graph.nodes.values()) == 2


@pytest.mark.parametrize("upper", [
    "rec h2(t) = init: zeros(16) next: gru_cell(h1(t), h2(t.prev), 16)",
    "rec b1(t) = init: zeros(16) prev: gru_cell(t.x, b1(t.next), 16)\n"
    " rec h2(t) = init: zeros(16) next: gru_cell(concat(h1(t), b1(t)), h2(t.prev), 16)",
])
def test_a_second_recursion_reading_the_first_at_its_position_is_told_the_one_recursion_form(upper):
    """h1(t) in h2's case (a stacked, or stacked bidirectional, recurrence) stays
    refused, and the message shows the form that stacks layers in one direction."""
    err = refusal(f"rec h1(t) = init: zeros(16) next: gru_cell(t.x, h1(t.prev), 16)\n {upper}\n"
                  " output o = h2(s.last)", "input s: sequence of f32[8]")
    assert isinstance(err, SnetTypeError)
    assert err.message.startswith("h1 applies to the positions of sequence 's': h1(s.last), h1(s.steps) or "
                                  "h1(s.mean); a recursion cannot read another at its own position")
    assert ("rec (h1, h2)(t) = init: (zeros(H), zeros(H)) next: { a = gru_cell(t.x, h1(t.prev), H); "
            "(a, gru_cell(a, h2(t.prev), H)) }") in err.message
    line = (" " + upper).split("\n")[-1]
    assert (err.span.line, err.span.col) == (upper.count("\n") + 3, line.index("h1(t)") + 4), err.span   # its t


def test_a_top_level_unpacking_gives_the_cells_two_halves():
    net = structc.compile("model M { input x: f32[N, 3]\n input h0: f32[N, 4]\n input c0: f32[N, 4]\n"
                          " (h, c) = lstm_cell(x, h0, c0, 4, name=\"cell\")\n output h1 = h\n output c1 = c }")
    rng = np.random.default_rng(0)
    x, h0, c0 = (rng.normal(size=(2, k)).astype(np.float32) for k in (3, 4, 4))
    net.params["cell.b"][...] = rng.normal(size=16)
    p = {k: v.astype(np.float64) for k, v in net.params.items()}
    h, c = lstm_step(p, "cell", x, h0, c0)
    got = net.forward(x=x, h0=h0, c0=c0)
    np.testing.assert_allclose(got["h1"], h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["c1"], c, rtol=1e-5, atol=1e-6)


# -- stacked recurrences against a per-step float64 reference ----------------------------

def lstm_step(p, layer, x, h, c):
    """torch.nn.LSTM's cell: gates i, f, g, o from [x, h] @ W + b."""
    i, f, u, o = np.split(np.concatenate([x, h], axis=-1) @ p[f"{layer}.w"] + p[f"{layer}.b"], 4, axis=-1)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(u)
    return sigmoid(o) * np.tanh(c), c


def gru_step(p, layer, x, h):
    rz = sigmoid(np.concatenate([x, h]) @ p[f"{layer}.wg"] + p[f"{layer}.bg"])
    r, z = np.split(rz, 2)
    n = np.tanh(np.concatenate([x, r * h]) @ p[f"{layer}.wn"] + p[f"{layer}.bn"])
    return (1 - z) * n + z * h


def stacked_lstm_last(p, xs):
    h1 = c1 = h2 = c2 = np.zeros(32)
    for x in xs:
        h1, c1 = lstm_step(p, "lstm1", x, h1, c1)
        h2, c2 = lstm_step(p, "lstm2", h1, h2, c2)
    return h2


def stacked_gru_last(p, xs):
    h1 = h2 = np.zeros(32)
    for x in xs:
        h1 = gru_step(p, "gru1", x, h1)
        h2 = gru_step(p, "gru2", h1, h2)
    return h2


def reference_loss(p, seqs, y, last):
    """Mean cross-entropy of dense(h2 at each sequence's last position), one position at a time."""
    total = 0.0
    for i in range(seqs.count):
        logits = last(p, seqs[i].astype(np.float64)) @ p["dense1.w"] + p["dense1.b"]
        total += np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[y[i]]
    return total / seqs.count


def check_every_gradient(net, seqs, y, last, rng):
    """The loss equals the reference's, and each parameter's gradient its central
    difference along a random direction of that parameter alone."""
    p = {k: v.astype(np.float64) for k, v in net.params.items()}
    loss, grads = net.grad(s=seqs, y=y)
    assert set(grads) == set(p)
    assert loss == pytest.approx(reference_loss(p, seqs, y, last), rel=1e-5)
    eps = 1e-5
    for k in p:
        v = rng.normal(size=p[k].shape)
        plus = reference_loss({**p, k: p[k] + eps * v}, seqs, y, last)
        minus = reference_loss({**p, k: p[k] - eps * v}, seqs, y, last)
        assert float(np.sum(grads[k] * v)) == pytest.approx((plus - minus) / (2 * eps), rel=2e-3, abs=1e-6), k


@pytest.fixture(scope="module")
def stacked_lstm():
    net, mdef = structc.compile(STACKED_LSTM, seed=3), build_model(parse(STACKED_LSTM))
    rng = np.random.default_rng(9)
    for layer in ("lstm1", "lstm2"):        # no gate starts at exactly 1/2
        net.params[f"{layer}.b"][...] = rng.normal(size=128) * 0.5
    return net, mdef


LENGTHS = {"ragged": [5, 1, 12, 3, 8, 2, 11, 4, 7, 10, 6, 9], "one": [9]}


@pytest.mark.parametrize("lengths", [pytest.param(LENGTHS["ragged"], marks=pytest.mark.slow), LENGTHS["one"]],
                         ids=list(LENGTHS))
def test_stacked_lstm_matches_a_per_step_reference_and_the_interpreter(stacked_lstm, lengths):
    net, mdef = stacked_lstm
    assert sorted(net.params) == ["dense1.b", "dense1.w", "lstm1.b", "lstm1.w", "lstm2.b", "lstm2.w"]
    assert net.params["lstm2.w"].shape == (64, 128)        # layer 2 reads layer 1's h: [32 + 32, 4 * 32]
    rng = np.random.default_rng(len(lengths))
    seqs = ragged(rng, lengths, features=8)
    y = rng.integers(0, 10, len(lengths)).astype(np.int32)
    check_every_gradient(net, seqs, y, stacked_lstm_last, rng)
    check_native(net, mdef, seqs, {"y": y})


@pytest.mark.slow
def test_stacked_lstm_matches_torch_two_layer_lstm(stacked_lstm):
    """torch.nn.LSTM(8, 32, num_layers=2) with the same weights (layer k: W = [W_ih; W_hh]^T,
    b = b_ih + b_hh, gates i, f, g, o) gives the same loss."""
    torch = pytest.importorskip("torch", reason="torch is the `torch` extra")
    net, _ = stacked_lstm
    rng = np.random.default_rng(11)
    lengths = [4, 12, 1, 7]
    seqs = ragged(rng, lengths, features=8)
    y = rng.integers(0, 10, len(lengths)).astype(np.int32)
    lstm = torch.nn.LSTM(8, 32, num_layers=2).double()
    with torch.no_grad():
        for k, (layer, inputs) in enumerate((("lstm1", 8), ("lstm2", 32))):
            w = torch.tensor(net.params[f"{layer}.w"], dtype=torch.float64)
            getattr(lstm, f"weight_ih_l{k}").copy_(w[:inputs].T)
            getattr(lstm, f"weight_hh_l{k}").copy_(w[inputs:].T)
            getattr(lstm, f"bias_ih_l{k}").copy_(torch.tensor(net.params[f"{layer}.b"]))
            getattr(lstm, f"bias_hh_l{k}").zero_()
        last = torch.stack([lstm(torch.tensor(seqs[i][:, None, :], dtype=torch.float64))[0][-1, 0]
                            for i in range(len(lengths))])
        logits = last @ torch.tensor(net.params["dense1.w"], dtype=torch.float64) \
            + torch.tensor(net.params["dense1.b"], dtype=torch.float64)
        want = torch.nn.functional.cross_entropy(logits, torch.tensor(y, dtype=torch.long)).item()
    assert net.grad(s=seqs, y=y)[0] == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_stacked_gru_matches_a_per_step_reference_and_the_interpreter():
    net, mdef = structc.compile(STACKED_GRU, seed=4), build_model(parse(STACKED_GRU))
    rng = np.random.default_rng(12)
    for layer in ("gru1", "gru2"):
        net.params[f"{layer}.bg"][...] = rng.normal(size=64) * 0.5
    seqs = ragged(rng, [3, 12, 1, 6], features=8)
    y = rng.integers(0, 10, 4).astype(np.int32)
    check_every_gradient(net, seqs, y, stacked_gru_last, rng)
    check_native(net, mdef, seqs, {"y": y})


@pytest.mark.slow
def test_a_tree_node_case_may_unpack_its_cells():
    src = """
model TreeStack {
  input  t: forest of f32[3]
  target y: class[t.trees] of 2
  rec (h, c, g, d)(n) = leaf: (tanh(dense(n.x, 4)), zeros(4), zeros(4), zeros(4))
      node: { (a, ac) = lstm_cell(h(n.left), h(n.right), c(n.left) + c(n.right), 4);
              (b, bc) = lstm_cell(a, g(n.left) + g(n.right), d(n.left) + d(n.right), 4);
              (a, ac, b, bc) }
  loss cross_entropy(dense(g(t.root), 2), y)
}
"""
    grads = check_tree_model_against_the_interpreter(src, seed=5, draws=13)
    assert set(grads) == {"dense1.b", "dense1.w", "dense2.b", "dense2.w", "lstm1.b", "lstm1.w", "lstm2.b", "lstm2.w"}
