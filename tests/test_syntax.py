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
