"""The language front end: tuple literals, deep expressions, huge numbers."""
import numpy as np
import pytest

import structc
from structc.build import build_model
from structc.errors import SnetError, SnetSyntaxError
from structc.syntax import Tuple, parse, unparse


def build(body: str, inputs: str = "input x: f32[N, 3, 4, 5]"):
    return build_model(parse(f"model M {{ {inputs}\n{body} }}", "m.snet"))


def output_type(mdef, name="o"):
    return mdef.graph.nodes[mdef.graph.outputs[name]].type


# -- tuple literals -----------------------------------------------------------

@pytest.mark.parametrize("text, items", [("(0,)", [0]), ("(2, 3)", [2, 3]), ("(1, 1, 0, 0,)", [1, 1, 0, 0])])
def test_tuple_literal_parses(text, items):
    expr = parse(f"model M {{ input x: f32[N, 4]\n output o = sum(x, axes={text}) }}").models[0].body[1].value
    tup = expr.kwargs[0].value
    assert isinstance(tup, Tuple)
    assert [n.value for n in tup.items] == items
    assert unparse(expr).startswith("sum(x, axes=(")


def test_parenthesised_expression_is_not_a_tuple():
    expr = parse("model M { input x: f32[N, 4]\n output o = (x) }").models[0].body[1].value
    assert not isinstance(expr, Tuple)


def test_reduction_axes_as_tuples():
    assert output_type(build("output o = sum(x, axes=(0,))")).shape == (3, 4, 5)
    assert output_type(build("output o = mean(x, axes=(2, 3))")).shape == ("N", 3)
    assert output_type(build("output o = sum(x, axes=(1, -1), keepdims=true)")).shape == ("N", 1, 4, 1)


def test_conv_and_pool_options_as_tuples():
    conv = build("output o = conv(x, 8, kernel=(3, 3), stride=(1, 2), padding=(1,1,0,0))",
                 "input x: f32[N, 3, 8, 8]")
    assert output_type(conv).shape == ("N", 8, 8, 3)
    pool = build("output o = maxpool2d(x, (2, 2))", "input x: f32[N, 3, 8, 8]")
    assert output_type(pool).shape == ("N", 3, 4, 4)
    pad2 = build("output o = conv(x, 2, kernel=(3, 5), padding=(1, 2))", "input x: f32[N, 3, 8, 8]")
    assert output_type(pad2).shape == ("N", 2, 8, 8)
    c1 = build("output o = conv1d(x, 4, kernel=(3,), padding=(1, 2))", "input x: f32[N, 3, 8]")
    assert output_type(c1).shape == ("N", 4, 9)
    assert output_type(build("output o = reshape(x, (N, 60))")).shape == ("N", 60)


def test_old_string_forms_still_work():
    conv = build('output o = conv(x, 8, kernel="3x3", stride="1x2", padding="1,1,0,0")', "input x: f32[N, 3, 8, 8]")
    assert output_type(conv).shape == ("N", 8, 8, 3)


@pytest.mark.parametrize("body, message", [
    ('output o = mean(x, axes="2,3")', "axes must be an integer or a tuple of integers such as (2, 3), got '2,3'"),
    ('output o = sum(x, axes=(1.0, 2))', "axes must be an integer or a tuple of integers"),
    ("output o = x + (1, 2)", "expected a tensor or a number, got (1, 2)"),
    ("output o = conv(x, 8, kernel=(x, 2))", "a tuple holds numbers"),
    ("output o = conv(x, 8, kernel=(3, 3, 3))", "kernel must be a positive integer or a pair"),
    ("output o = conv(x, 8, kernel=(3, 0))", "kernel must be a positive integer"),
    ("output o = sum(x, axes=(1, q))", "unknown name 'q'"),
])
def test_bad_tuples_are_snet_errors_with_a_span(body, message):
    with pytest.raises(SnetError) as info:
        build(body, "input x: f32[N, 3, 8, 8]")
    assert message in info.value.message
    assert info.value.span is not None and info.value.span.line == 2


def test_reduction_over_several_axes_matches_numpy():
    net = structc.compile("model R { input x: f32[N, 3, 4, 5]\n"
                          "  output s = sum(x, axes=(1, 3))\n"
                          "  output m = mean(x, axes=(2, 3)) }")
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    out = net.forward(x=x)
    np.testing.assert_allclose(out["s"], x.sum(axis=(1, 3)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["m"], x.mean(axis=(2, 3)), rtol=1e-5, atol=1e-5)


# -- deep expressions and huge numbers (issue 15) ------------------------------

def deep_stack(depth: int, fn):
    """Run fn with `depth` frames already on the stack, as under pytest, a CLI or a notebook."""
    return fn() if depth == 0 else deep_stack(depth - 1, fn)


def check(source: str):
    program = parse(source, "deep.snet")
    return [build_model(program, name) for name in program.model_names]


@pytest.mark.parametrize("terms", [332, 1000, 10_000])
def test_long_sums_build(terms):
    source = "model M { input x: f32[N, 4]\n output o = " + " + ".join(["x"] * terms) + " }"
    (mdef,) = deep_stack(100, lambda: check(source))
    assert sum(1 for n in mdef.graph.nodes.values() if n.op.name == "add") == terms - 1


def test_long_sum_of_mixed_operators_keeps_left_to_right_order():
    (mdef,) = check("model M { input x: f32[N, 4]\n output o = " + "x * 2 - x / 2 + " * 500 + "x }")
    assert output_type(mdef).shape == ("N", 4)
    assert unparse(parse("model M { output o = a - b + c * d }").models[0].body[0].value) == "((a - b) + (c * d))"


NESTED = {
    "calls": lambda n: "relu(" * n + "x" + ")" * n,
    "minus": lambda n: "-" * n + "x",
    "pipes": lambda n: "x" + " |> relu" * n,
    "right operands": lambda n: "x - (" * n + "x" + ")" * n,
}


@pytest.mark.parametrize("form", NESTED)
def test_nesting_within_the_limit_builds(form):
    source = f"model M {{ input x: f32[N, 4]\n output o = {NESTED[form](100)} }}"
    deep_stack(150, lambda: check(source))


@pytest.mark.parametrize("form", NESTED)
@pytest.mark.parametrize("depth", [332, 10_000])
def test_nesting_past_the_limit_is_a_clean_error(form, depth):
    source = f"model M {{ input x: f32[N, 4]\n output o = {NESTED[form](depth)} }}"
    with pytest.raises(SnetSyntaxError, match=r"nested too deeply \(more than 150 levels"):
        deep_stack(150, lambda: check(source))


def test_nested_repeats_past_the_limit_are_a_clean_error():
    source = "model M { input x: f32[N, 4]\n" + "repeat 1 { " * 400 + "x = relu(x)" + " }" * 400 + " output o = x }"
    with pytest.raises(SnetSyntaxError, match="nested too deeply"):
        check(source)


def test_parentheses_alone_nest_freely():
    check("model M { input x: f32[N, 4]\n output o = " + "(" * 10_000 + "x" + ")" * 10_000 + " }")


BIG = "9" * 5000


@pytest.mark.parametrize("source, col", [
    (f"model M {{ input x: f32[N, 4]\n output o = x * {BIG} }}", 17),
    (f"model M {{ input x: f32[N, {BIG}]\n output o = x }}", 0),
    (f"model M {{ input x: f32[N, 4]  target y: class[N] of {BIG}\n output o = x }}", 0),
    (f"model M {{ input x: f32[N, 4]\n repeat {BIG} {{ x = relu(x) }}\n output o = x }}", 9),
    (f"model M {{ input x: f32[N, 4]\n output o = dense(x, {BIG}) }}", 22),
])
def test_huge_integer_literals_are_a_clean_error(source, col):
    with pytest.raises(SnetSyntaxError, match=r"number too large \(5000 digits") as info:
        check(source)
    span = info.value.span
    assert source.splitlines()[span.line - 1][span.col - 1:span.end_col - 1] == BIG
    if col:
        assert span.col == col


def test_float_literal_beyond_the_float_range_is_a_clean_error():
    with pytest.raises(SnetSyntaxError, match="number too large"):
        check("model M { input x: f32[N, 4]\n output o = x * 1e999 }")


B300 = "9" * 300


@pytest.mark.parametrize("expr, message", [
    ("x * " + "9" * 400, r"number too large \(400 digits"),                 # was an OverflowError
    (f"x * ({B300} * {B300})", "number too large"),                        # folded: past float64
    ("x * (1e300 * 1e300)", "number too large"),                           # folded: was inf, silently
    ("x * (1e308 / 1e-10)", "number too large"),
    (f"x * {B300}", r"number too large for f32"),                          # fits float64, not f32
    ("x * 1e39", r"number too large for f32"),                             # was inf in f32, silently
    ("maximum(x, -1e39)", r"number too large for f32"),
])
def test_numbers_beyond_the_float_ranges_are_clean_errors(expr, message):
    with pytest.raises(SnetError, match=message) as info:
        check(f"model M {{ input x: f32[N, 4]\n output o = {expr} }}")
    assert info.value.span.line == 2


def test_numbers_within_the_f32_range_build():
    check("model M { input x: f32[N, 4]\n output o = x * 3e38 + 1e-30 - 1e38 }")


@pytest.mark.parametrize("init", ["(2, 3)", "(0,)", "3", "true"])
def test_layer_init_must_name_an_initialiser(init):
    # init=(2, 3) was stored as the initialiser ("2" with arguments 3), silently
    with pytest.raises(SnetError, match="init must be an initialiser such as glorot or he"):
        check(f"model M {{ input x: f32[N, 4]\n output o = dense(x, 3, init={init}) }}")


def test_layer_init_by_name_still_works():
    (mdef,) = check('model M { input x: f32[N, 4]\n output o = dense(x, 3, init=he) + dense(x, 3, init="he") }')
    assert mdef.params["dense1.w"].init == mdef.params["dense2.w"].init == ("he", ())
