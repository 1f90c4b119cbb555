"""Fuzzed sources: the parser and the checker raise SnetError, never anything else."""
import importlib.util
import sys
import time
from pathlib import Path

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.snet"))
SEEDS = [p.read_text() for p in EXAMPLES] + [
    "model M { input x: f32[N, 4]  target y: class[N] of 3\n"
    "  param W: f32[4, 3] = normal(0.1)\n"
    "  h = x @ W + 1.5 |> relu\n  output p = softmax(h)\n"
    "  loss cross_entropy(h, y) + 0.1 * mean(square(W)) }",
]
TOKENS = ["model", "input", "target", "param", "loss", "output", "class", "of", "f32", "i32", "N", "M",
          "x", "y", "h", "W", "dense", "relu", "softmax", "cross_entropy", "mse", "concat", "flatten",
          "mean", "sum", "reshape", "transpose", "@", "|>", "+", "-", "*", "/", "(", ")", "[", "]", "{", "}",
          ",", ":", "=", ";", ".", "0", "1", "3", "64", "1.5", "1e3", '"s"', "#c\n", "\n", "axes", "keepdims",
          "true", "false", "init", "glorot", "name", "bias",
          "rec", "leaf", "node", "leaf:", "node:", "forest", "word", "vocab", "arity", "embedding", "onehot",
          "t", "n", "n.left", "n.right", "n.children", "n.word", "n.x", "t.root", "t.nodes", "t.trees", "E"]
TOKENS += ["graph", "over", "repeat", "g", "g.x", "g.e", "g.edges", "g.nodes", "g.src", "g.type", "features",
           "edge_types", "per", "self_loops", "norm", "gcn", "max", "masked_cross_entropy"]
TOKENS += ["(0,)", "(2, 3)", "(1, 1, 0, 0)", "kernel", "stride", "padding", "conv", "maxpool2d", "9" * 400, "1e39"]
SEEDS.append("model G { input g: graph(features=4, edge_features=2, edge_types=3)\n target y: class[g.nodes] of 3\n"
             "  h = g.x\n  repeat 2 { h = relu(sum(dense(h, 4, per=g.type) over g.edges) + max(h over g.edges)) }\n"
             "  m = mean(dense(concat(h[g.src], g.e, axis=1), 4) over g.edges, norm=gcn)\n"
             "  output r = sum(h over g.nodes)\n  loss cross_entropy(dense(m, 3), y) }")
SEEDS.append("model S { input s: sequence of f32[3]\n target y: class[s.sequences] of 2\n x = s\n"       # unpacking
             "  rec (h1, c1, h2)(t) = init: (zeros(4), zeros(4), zeros(4))\n"
             "    next: { (a, ac) = lstm_cell(t.x, h1(t.prev), c1(t.prev), 4); (a, ac, gru_cell(a, h2(t.prev), 4)) }\n"
             "  (p, q) = (h2(s.last), h1(s.last))\n  loss cross_entropy(dense(p + q, 2), y) }")
TOKENS += ["(a, b) =", "(a, b)", "sequence", "lstm_cell", "gru_cell", "t.prev", "next:", "init:"]


def _fuzz_sources():
    spec = importlib.util.spec_from_file_location("fuzz_sources", Path(__file__).parent / "fuzz" / "fuzz_sources.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module         # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


FUZZ = _fuzz_sources()
check = FUZZ.check      # parse, then build every model; only SnetError may come out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), max_size=60))
def test_token_soup(tokens):
    check(" ".join(tokens))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(["del", "ins", "dup"]),
                                                   st.sampled_from(TOKENS + list("(){}[],:=@|>+-*/.#\n 0129"))),
                                         min_size=1, max_size=6))
def test_mutated_examples(seed, edits):
    text = seed
    for pos, kind, tok in edits:
        pos %= len(text) + 1
        if kind == "del":
            text = text[:pos] + text[pos + len(tok):]
        elif kind == "ins":
            text = text[:pos] + tok + text[pos:]
        else:
            text = text[:pos] + text[pos:pos + 20] + text[pos:]
    check(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text(text):
    check(text)


@pytest.mark.slow
def test_mutation_fuzz_fixed_seed():
    """5,000 mutants (the full run: `python tests/fuzz/fuzz_sources.py --count 100000`).
    Slowness is CPU time, so a loaded machine does not fail the test; about 6 CPU seconds
    when nothing hangs (an input is stopped after 4)."""
    fuzz = FUZZ
    t0 = time.process_time()
    report = fuzz.run(5000, seed=0, slow=2.0, hang=4.0)
    if not report.ok():
        pytest.fail(report.summary(), pytrace=False)
    assert time.process_time() - t0 < 60
