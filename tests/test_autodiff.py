"""autodiff: a value read by several ops, or twice by one, gets the sum of every
reader's cotangent (the whole-model gradient checks of the examples are slow, so
the fast suite checks the accumulation here, in the interpreter and native code)."""
import numpy as np

import structc
from structc.autodiff import differentiate
from structc.build import build_model
from structc.interp import evaluate
from structc.syntax import parse
from structc.testing import check_model_grads

# h is read four times: twice by one mul, once by the add, once by tanh
NONLINEAR = """model T {
  input  x: f32[N, 4]
  target y: f32[N, 3]
  param  w: f32[4, 3] = normal(0.5)
  h = x @ w
  loss mse(h * h + h + tanh(h), y)
}
"""

# loss = sum(3 h) = sum(3 x w): dloss/dw = 3 x^T 1, exactly
THRICE = """model S {
  input  x: f32[N, 4]
  param  w: f32[4, 3] = normal(0.5)
  h = x @ w
  loss sum(h + h + h)
}
"""


def test_a_value_read_four_times_gets_every_cotangent():
    rng = np.random.default_rng(0)
    mdef = build_model(parse(NONLINEAR, "t.snet"))
    feed = {"x": rng.normal(size=(5, 4)), "y": rng.normal(size=(5, 3))}
    check_model_grads(mdef, feed, {"w": rng.normal(size=(4, 3))})


def test_a_value_read_three_times_has_three_times_the_gradient():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    want = 3 * x.sum(axis=0)[:, None] * np.ones((1, 3))
    mdef = build_model(parse(THRICE, "s.snet"))
    got = evaluate(differentiate(mdef.graph), {"x": x.astype(np.float64)},
                   {"w": np.zeros((4, 3))}, outputs=["grad:w"])["grad:w"]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    net = structc.compile(THRICE)
    _, grads = net.grad(x=x)
    np.testing.assert_allclose(grads["w"], want, rtol=1e-5)
