"""The checker's semantic rules: what must be a compile-time error (at the
right span, naming the numbers involved) rather than a model that runs and is
silently wrong, or an exception that is not a `SnetError`."""
import pytest

from structc.build import build_model
from structc.errors import SnetError, SnetShapeError
from structc.syntax import parse


def build(src):
    return build_model(parse(src, "m.snet"))


def error_of(src) -> SnetError:
    with pytest.raises(SnetError) as info:
        build(src)
    return info.value


# -- issue 9 item 1: class labels against logits ----------------------------------------

DENSE = "input x: f32[N, 4]\n"
GRAPH = "input g: graph(features=3)\n  input m: f32[g.nodes]\n"
TREE = ("input t: forest of word(vocab=5)\n  param E: embedding(5, 6)\n"
        "  rec h(n) = leaf: E[n.word]\n             node: tanh(dense(concat(h(n.left), h(n.right)), 6))\n")


@pytest.mark.parametrize("decls, target, loss", [
    (DENSE, "class[N] of 5", "cross_entropy(dense(x, 3), y)"),
    (DENSE, "class[N] of 5", "cross_entropy(dense(x, 7), y)"),
    (GRAPH, "class[g.nodes] of 5", "cross_entropy(dense(g.x, 3), y)"),
    (GRAPH, "class[g.nodes] of 5", "masked_cross_entropy(dense(g.x, 3), y, m)"),
    (TREE, "class[t.nodes] of 5", "cross_entropy(dense(h(t.nodes), 3), y)"),
    (TREE, "class[t.trees] of 5", "cross_entropy(dense(h(t.root), 3), y)"),
], ids=["fewer-logits", "more-logits", "graph-nodes", "masked", "tree-nodes", "tree-roots"])
def test_class_count_must_match_the_logits(decls, target, loss):
    src = f"model M {{\n  {decls}  target y: {target}\n  loss {loss}\n}}"
    err = error_of(src)
    assert isinstance(err, SnetShapeError)
    assert "logits per row but 5 classes" in err.message
    assert err.span.line == src.splitlines().index(f"  loss {loss}") + 1
    assert err.span.col == 8


def test_matching_class_counts_build():
    for decls, target, loss in [(DENSE, "class[N] of 5", "cross_entropy(dense(x, 5), y)"),
                                (GRAPH, "class[g.nodes] of 5", "masked_cross_entropy(dense(g.x, 5), y, m)"),
                                (TREE, "class[t.nodes] of 5", "cross_entropy(dense(h(t.nodes), 5), y)")]:
        build(f"model M {{\n  {decls}  target y: {target}\n  loss {loss}\n}}")


def test_labels_without_a_class_count_are_refused():
    # i32 labels carry no bound, so nothing would stop a label from reading past its row
    err = error_of("model M { input x: f32[N, 4]\n target y: i32[N]\n loss cross_entropy(dense(x, 3), y) }")
    assert "do not say how many classes" in err.message and "class[...] of 3" in err.message


def test_a_symbolic_class_axis_is_refused():
    err = error_of("model M { input x: f32[N, C]\n target y: class[N] of 4\n loss cross_entropy(x, y) }")
    assert "symbolic class axis 'C'" in err.message and "4 classes" in err.message


@pytest.mark.parametrize("target, loss, message", [
    ("class[M] of 5", "cross_entropy(dense(x, 5), y)", "labels i32[M] do not match logits f32[N, 5]"),
    ("f32[N, 2]", "binary_cross_entropy(dense(x, 3), y)", "logits f32[N, 3] and target f32[N, 2] differ"),
    ("f32[N, 1]", "mse(dense(x, 3), y)", "prediction f32[N, 3] and target f32[N, 1] differ"),
    ("class[N, 1] of 7", "binary_cross_entropy(dense(x, 1), y)", "labels of 7 classes; it needs 0/1 targets"),
])
def test_loss_operands_that_disagree_are_refused(target, loss, message):
    err = error_of(f"model M {{ input x: f32[N, 4]\n target y: {target}\n loss {loss} }}")
    assert message in err.message and err.span.line == 3


def test_binary_labels_are_binary_cross_entropy_targets():
    build("model M { input x: f32[N, 4]\n target y: class[N, 1] of 2\n loss binary_cross_entropy(dense(x, 1), y) }")


def test_onehot_columns_must_cover_the_ids():
    err = error_of("model M { input x: f32[N, 4]\n target y: class[N] of 7\n loss mse(onehot(y, 3), dense(x, 3)) }")
    assert "the ids lie in [0, 7) but there are only 3 columns" in err.message
    build("model M { input x: f32[N, 4]\n target y: class[N] of 3\n loss mse(onehot(y, 4), dense(x, 4)) }")


def test_embedding_rows_must_cover_the_ids():
    # the gather clamps ids past the table: id 6 of a 5-row table would silently read row 4
    err = error_of("model M { target y: class[N] of 7\n param E: embedding(5, 3)\n output o = E[y] }")
    assert "[0, 7)" in err.message and "only 5 rows" in err.message
    err = error_of("model M { input t: forest of word(vocab=9)\n target y: class[t.trees] of 2\n"
                   " param E: embedding(5, 3)\n rec h(n) = leaf: E[n.word]\n node: h(n.left) + h(n.right)\n"
                   " loss cross_entropy(dense(h(t.root), 2), y) }")
    assert "[0, 9)" in err.message and err.span.line == 4


# -- issue 15: operators and calls on values that are not tensors --------------------

HEAD = """model M {
  input x: f32[N, 4]
  input g: graph(features=3, edge_types=2)
  input t: forest of word(vocab=5)
  param E: embedding(5, 4)
  rec h(n) = leaf: E[n.word]
             node: tanh(dense(concat(h(n.left), h(n.right)), 4))
"""


@pytest.mark.parametrize("expr, col, message", [
    ("sum(g.x over -g.edges)", 28, "got g.edges (something to aggregate over"),
    ("g.x + g.edges", 20, "got g.edges"),
    ("-g.src", 15, "got g.src (an index"),
    ("x * t.root", 18, "got t.root (an argument of a recursion"),
    ("h + 1.0", 14, "got the recursion h"),
    ("relu(t)", 19, "got the forest t"),
    ("concat(x, x, axis=1.0)", 14, "option 'axis' takes an integer, got 1.0"),
    ("concat(x, x, axis=g.edges)", 14, "option 'axis' takes an integer, got g.edges"),
    ("sum(x, axes=g.nodes)", 14, "option 'axes' takes a number or a word, got g.nodes"),
    ("sum(x, axes=x)", 14, "option 'axes' takes a number or a word, got a tensor f32[N, 4]"),
    ('sum(x, axes=1, keepdims="no")', 14, "option 'keepdims' takes true or false, got 'no'"),   # was truthy
    ("sum(x, axes=1, keepdims=0)", 14, "option 'keepdims' takes true or false, got 0"),
])
def test_non_tensor_operands_are_snet_errors(expr, col, message):
    err = error_of(HEAD + f"  output o = {expr}\n}}")
    assert message in err.message
    assert (err.span.line, err.span.col) == (8, col)


def test_children_and_child_are_not_operands():
    tree = ("model M { input t: forest of word(vocab=5)\n target y: class[t.trees] of 2\n param E: embedding(5, 6)\n"
            " rec h(n) = leaf: E[n.word]\n node: NODE\n loss cross_entropy(dense(h(t.root), 2), y) }")
    for node, message in [("-n.children", "got n.children"), ("h(n.left) * n", "got a node n"),
                          ("-n.left", "got a child of n"), ("h(n.left) + h", "got the recursion h"),
                          ("dense(concat(h(n.children), axis=0), 6)", "along axis 1 (or -1), got axis=0")]:
        assert message in error_of(tree.replace("NODE", node)).message, node


@pytest.mark.slow
def test_every_language_function_meets_odd_arguments_with_snet_errors():
    """Each function and operator, given graph domains, forests, strings, tensors of
    the wrong kind as operands and options: only SnetError, never a Python error."""
    from structc.layers import SURFACE
    from structc.ops import REGISTRY
    names = sorted(set(SURFACE) | {n for n, op in REGISTRY.items() if op.surface})
    odd = ["g.edges", "g.src", "g", "t", "t.root", "h", "g.type", '"s"', "1.5", "true", "x"]
    exprs = []
    for f in names:
        for a in odd:
            exprs += [f"{f}({a})", f"{f}(x, {a})", f"{f}(x, axis={a})"]
    for a in odd:
        exprs += [f"{a} + {b}" for b in odd] + [f"-{a}", f"{a} @ x", f"sum({a} over g.edges)", f"max(g.x over {a})"]
    for expr in exprs:
        try:
            build(HEAD + f"  output o = {expr}\n}}")
        except SnetError:
            pass


# -- issue 15: work linear in what is written, sizes that fit the ABI -----------------

def timed_error(src, seconds=2.0) -> SnetError:
    import time
    start = time.perf_counter()
    err = error_of(src)
    assert time.perf_counter() - start < seconds, "the checker must answer at once"
    return err


@pytest.mark.parametrize("arity", [65, 10000, 99999999999])
def test_forest_arity_is_bounded(arity):
    err = timed_error(f"model M {{ input t: forest(arity={arity}) of word(vocab=5)\n output o = 1 }}")
    assert f"arity {arity} is more children than a forest can have (at most 64)" in err.message


def test_arity_64_is_allowed():
    build("model M { input t: forest(arity=64) of word(vocab=5)\n target y: class[t.trees] of 2\n"
          " param E: embedding(5, 3)\n rec h(n) = leaf: E[n.word]\n node: tanh(dense(sum(h(n.children)), 3))\n"
          " loss cross_entropy(dense(h(t.root), 2), y) }")


@pytest.mark.parametrize("counts, copies", [((2 ** 63,), 2 ** 63), ((1001,), 1001), ((100, 100), 10000),
                                            ((10, 10, 11), 1100)])
def test_repeat_is_bounded_including_nested_repeats(counts, copies):
    body = "h = relu(h)"
    for c in reversed(counts):
        body = f"repeat {c} {{ {body} }}"
    err = timed_error(f"model M {{ input x: f32[N, 4]\n h = x\n {body}\n output o = h }}")
    assert f"would make {copies} copies" in err.message and "the limit is 1000" in err.message


def test_a_thousand_repeated_layers_build_with_their_own_names():
    mdef = build("model M { input x: f32[N, 4]\n h = x\n repeat 10 { repeat 100 { h = relu(dense(h, 4)) } }\n"
                 " output o = h }")
    assert {f"dense{k}.w" for k in (1, 500, 1000)} <= set(mdef.params) and len(mdef.params) == 2000


@pytest.mark.parametrize("decl, expr, message", [
    ("input x: f32[N, 9223372036854775808]", "relu(x)", "dimension 9223372036854775808 is too large"),
    ("input x: f32[N, 9223372036854775807]", "dense(x, 3)", "dimension 9223372036854775807 is too large"),
    ("input x: f32[N, 1048576, 1048576, 4]", "relu(x)", "4398046511104 elements before any symbol"),
    ("input x: f32[N, 1073741824]", "dense(x, 3)", "brings the model to 3221225472 parameters"),
    ("input x: f32[N, 4]", "dense(x, 100000000000)", "brings the model to 400000000000 parameters"),
    ("param E: embedding(100000000000, 4)", "1", "brings the model to 400000000000 parameters"),
    ("input g: graph(features=100000000000000)", "sum(g.x over g.edges)", "elements before any symbol"),
    ("input x: f32[N, 1, 8, 8]", "conv(x, 2, kernel=3, padding=100000000000)", "conv2d here makes"),
    ("target y: class[N] of 99999999999999999", "1", "do not fit int32 labels"),
    ("input t: forest of word(vocab=4294967296)", "1", "does not fit int32 word ids"),
])
def test_static_sizes_are_bounded(decl, expr, message):
    err = timed_error(f"model M {{ {decl}\n output o = {expr} }}")
    assert message in err.message and err.span is not None


def test_initialiser_arguments_must_fit_float32():
    err = error_of("model M { input x: f32[N, 4]\n param W: f32[4, 4] = normal(1e39)\n output o = x @ W }")
    assert "number too large for f32" in err.message and err.span.line == 2


@pytest.mark.parametrize("decl", ["input x: f64[N, 3]", "target x: f64[N, 3]", "param x: f64[3, 3]"])
def test_f64_tensors_are_refused_at_their_type(decl):
    # no kernel computes in float64: `sum` of an f64 input read its bits as float32
    # (3.0s summed to 768 and -5.8e41), and `output s = k` failed inside LLVM
    src = f"model M {{\n  input a: f32[N, 3]\n  {decl}\n  output o = a\n}}"
    err = error_of(src)
    assert "f64" in err.message and "f32" in err.message
    assert (err.span.line, err.span.col) == (3, src.splitlines()[2].index("f64") + 1)


def test_an_output_named_loss_is_refused_beside_a_loss():
    # it used to replace the loss: training then ran on `a * 2`, and the gradient
    # warnings said w did not affect the loss
    src = ("model M {\n  input a: f32[N, 3]\n  target y: f32[N, 3]\n  param w: f32[3, 3]\n"
           "  output loss = mean(a)\n  loss mse(a @ w, y)\n}")
    err = error_of(src)
    assert "'loss'" in err.message
    assert (err.span.line, err.span.col) == (5, 10)


@pytest.mark.parametrize("line", ["output h = softmax(h)", "output x = x * 2.0", "output W = W * 2.0"])
def test_an_output_cannot_take_a_name_already_defined(line):
    # `output h = softmax(h)` kept the earlier `h` for the lines after it (the loss read the
    # logits) where `h = softmax(h)` rebinds it: the reader cannot tell which was meant
    head = "model M {\n  input x: f32[N, 4]\n  target y: class[N] of 3\n  param W: f32[4, 3]\n  h = x @ W\n"
    err = error_of(head + f"  {line}\n  loss cross_entropy(h, y)\n}}")
    assert "is already defined" in err.message and "another name" in err.message
    assert (err.span.line, err.span.col) == (6, 10)


def test_an_output_of_a_new_name_is_read_by_the_lines_after_it():
    head = "model M {\n  input x: f32[N, 4]\n  target y: class[N] of 3\n  param W: f32[4, 3]\n"
    g = build_model(parse(head + "  output h = x @ W\n  loss cross_entropy(h, y)\n}")).graph
    assert g.outputs["h"] in _ancestors(g, g.outputs["loss"])


def _ancestors(g, nid):
    seen, stack = set(), [nid]
    while stack:
        for i in g.nodes[stack.pop()].inputs:
            if i not in seen:
                seen.add(i)
                stack.append(i)
    return seen


@pytest.mark.parametrize("expr, message", [
    ("flatten(x, 2)", "flatten: takes 1 positional argument but 2 were given"),
    ("dense(x, 3, 4)", "dense: takes 2 positional arguments but 3 were given"),
    ("relu(x, 1, 2)", None),
])
def test_argument_counts_are_the_ones_written(expr, message):
    # the layer's own first parameter (the builder's context) was counted:
    # flatten(x, 2) said "takes 2 positional arguments but 3 were given"
    err = error_of(f"model M {{\n  input x: f32[N, 4]\n  output o = {expr}\n}}")
    if message is None:
        assert "got 3" in err.message
    else:
        assert err.message == message


@pytest.mark.parametrize("decls, assign", [
    ("input g: graph(features=2)\n  input k: graph(features=2)", "g = k"),
    ("input t: forest of word(vocab=5)\n  input u: forest of word(vocab=5)", "t = u"),
    ("input s: sequence of f32[2]\n  input u: sequence of f32[2]", "s = u"),
    ("input g: graph(features=2)", "g = x"),
], ids=["graph", "forest", "sequence", "graph-to-tensor"])
def test_a_structured_input_cannot_be_assigned(decls, assign):
    # `g = k` was taken: every later g.x, g.edges read graph k, and g was still
    # required at the call and ignored
    src = f"model M {{\n  input x: f32[N, 2]\n  {decls}\n  {assign}\n  output o = x\n}}"
    err = error_of(src)
    name = assign.split()[0]
    assert err.message.startswith(f"cannot assign to '{name}': it is a declared input")
    assert (err.span.line, err.span.col) == (src.splitlines().index(f"  {assign}") + 1, 3)


@pytest.mark.parametrize("init", ["normal(-1)", "uniform(-0.5)"])
def test_a_negative_initialiser_scale_is_refused(init):
    # numpy's own "scale < 0" ValueError came out of compile, with no span
    err = error_of(f"model M {{\n  input x: f32[N, 4]\n  param W: f32[4, 4] = {init}\n  output o = x @ W\n}}")
    assert "must not be negative" in err.message
    assert (err.span.line, err.span.col) == (3, 24)


@pytest.mark.parametrize("dtype", ["i32", "i64"])
def test_an_integer_parameter_is_refused(dtype):
    # its initial values were stored as float32 bits: `ones` read back as 1065353216
    src = f"model M {{\n  input x: f32[N, 3]\n  param w: {dtype}[3] = ones\n  output o = x + w\n}}"
    err = error_of(src)
    assert "a parameter must be a float tensor" in err.message
    assert (err.span.line, err.span.col) == (3, 12)


@pytest.mark.parametrize("expr, message", [
    ('leaky_relu(x, alpha="a")', "leaky_relu: option 'alpha' takes a number, got"),
    ("leaky_relu(x, alpha=nan)", "leaky_relu: option 'alpha' takes a number, got"),
    ("elu(x, alpha=inf)", "elu: option 'alpha' takes a number, got"),
    ("elu(x, alpha=(1, 2))", "elu: option 'alpha' takes a number, got"),
    ("leaky_relu(x, alpha=1e39)", "number too large for f32"),
])
def test_a_number_option_takes_a_float32_number(expr, message):
    # a word was passed on as its text and became float(text): nan and inf gave NaN
    # outputs silently, "a" a ValueError with no span; 1e39 became alpha = inf
    err = error_of(f"model M {{\n  input x: f32[N, 4]\n  output o = {expr}\n}}")
    assert message in err.message
    assert err.span.line == 3


@pytest.mark.parametrize("expr, shown", [
    ("layer_norm(x, eps=inf)", "got inf"),
    ("batch_norm(x, momentum=x)", "got a tensor f32[N, 4]"),
])
def test_a_bad_value_is_shown_as_written(expr, shown):
    # these messages printed Python's repr: "got Word(text='inf', span=Span(...))", "got Value(%0: f32[N, 4])"
    err = error_of(f"model M {{\n  input x: f32[N, 4]\n  input g: graph(features=2)\n  output o = {expr}\n}}")
    assert err.message.endswith(shown), err.message
