"""Ops that users add themselves (issue 11 item 6): a module outside the
package defines an op, importing it registers it, `.snet` files use it,
`structc.testing.check_op` checks it, and the cache key follows its definition."""
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

import structc
from structc.ops import REGISTRY, Elementwise
from structc.testing import check_op

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "extension"


def run_outside(folder: Path, code: str, cache: Path) -> subprocess.CompletedProcess:
    """`python -c code` in `folder` (which holds only the user's files), with
    its own structc cache, so nothing of the package's tests is on the path."""
    env = dict(os.environ, STRUCTC_CACHE_DIR=str(cache), PYTHONPATH=str(folder))
    env.pop("STRUCTC_NO_CACHE", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)


def user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "user"
    folder.mkdir()
    for name in ("swish.py", "swish_mlp.snet"):
        shutil.copy(EXAMPLE / name, folder / name)
    return folder


TRAIN = """
    import numpy as np
    import structc, structc.testing
    import swish                                   # registers the op
    structc.testing.check_op("swish")
    net = structc.compile("swish_mlp.snet")
    rng = np.random.default_rng(0)
    x = rng.random((32, 64), dtype=np.float32)
    y = rng.integers(0, 10, 32).astype(np.int32)
    losses = [float(net.train_step(x=x, y=y, lr=0.1)) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.1, losses
    print("trained", losses[0], losses[-1])
"""


@pytest.mark.slow   # subprocesses
def test_a_user_op_from_outside_the_package_checks_and_trains(tmp_path):
    folder = user_folder(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["swish.py", "swish_mlp.snet"]
    done = run_outside(folder, TRAIN, tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert "trained" in done.stdout


@pytest.mark.slow   # subprocesses
def test_check_op_fails_a_wrong_vjp_from_outside(tmp_path):
    folder = user_folder(tmp_path)
    source = (folder / "swish.py").read_text()
    wrong = source.replace("return [g * (out + s * (1.0 - out))]", "return [g * s]")
    assert wrong != source
    (folder / "swish.py").write_text(wrong)
    done = run_outside(folder, """
        import structc.testing, swish
        try:
            structc.testing.check_op(swish.Swish)
        except AssertionError as e:
            print("FAILED:", e)
        else:
            print("PASSED")
    """, tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert "FAILED: check_op('swish')" in done.stdout and "gradient mismatch" in done.stdout, done.stdout


FORWARD = """
    import numpy as np
    import structc, swish
    net = structc.compile("model Tiny {{ input x: f32[4]\\n  output y = swish(x) }}")
    y = net(x=np.full(4, 2.0, np.float32))        # the one output
    print("{tag}", structc.api.COMPILE_COUNT, float(np.ravel(y)[0]))
"""


@pytest.mark.slow   # subprocesses
def test_a_changed_user_op_is_compiled_again_not_loaded_stale_from_the_cache(tmp_path):
    folder = user_folder(tmp_path)
    cache = tmp_path / "cache"
    first = run_outside(folder, FORWARD.format(tag="v1"), cache)
    assert first.returncode == 0, first.stderr
    again = run_outside(folder, FORWARD.format(tag="v1"), cache)
    assert again.stdout.split()[1] == "0", again.stdout       # the unchanged op: a cache hit
    source = (folder / "swish.py").read_text()
    (folder / "swish.py").write_text(source.replace("return cg.mul(x, cg.sigmoid(x))",
                                                    "return cg.mul(cg.mul(x, cg.sigmoid(x)), cg.const(2.0, x))"))
    changed = run_outside(folder, FORWARD.format(tag="v2"), cache)
    assert changed.returncode == 0, changed.stderr
    tag, compiles, y = changed.stdout.split()
    assert compiles == "1", changed.stdout
    assert float(y) == pytest.approx(2 * float(first.stdout.split()[2]), rel=1e-6)


def test_a_name_taken_by_another_op_is_refused():
    with pytest.raises(ValueError, match="'relu' is already defined by structc.ops.elementwise.Relu"):
        class MyRelu(Elementwise):
            name = "relu"
    assert type(REGISTRY["relu"]).__name__ == "Relu"


def test_check_op_names_an_unknown_op():
    with pytest.raises(ValueError, match="no op named 'nope'"):
        check_op("nope")


def test_check_op_checks_a_builtin_op_by_name_and_class():
    check_op("softplus")
    check_op(type(REGISTRY["leaky_relu"]))


EDIT_WITHOUT_REIMPORT = """
    import numpy as np
    from pathlib import Path
    import structc, swish
    def y():
        net = structc.compile("model Tiny {\\n  input x: f32[4]\\n  output y = swish(x)\\n}")
        return float(np.ravel(net(x=np.full(4, 2.0, np.float32)))[0])
    before = y()
    source = Path("swish.py").read_text()
    Path("swish.py").write_text(source.replace("return cg.mul(x, cg.sigmoid(x))",
                                               "return cg.mul(cg.mul(x, cg.sigmoid(x)), cg.const(2.0, x))"))
    print(before, y())      # the loaded op is still the old one
"""


@pytest.mark.slow   # subprocesses
def test_a_file_edited_without_reimport_does_not_poison_the_cache(tmp_path):
    # The key follows the code that is compiled (the loaded class), not the
    # file: else the old code would be stored under the new file's key and
    # the next process, running the new op, would load it.
    folder = user_folder(tmp_path)
    cache = tmp_path / "cache"
    done = run_outside(folder, EDIT_WITHOUT_REIMPORT, cache)
    assert done.returncode == 0, done.stderr
    before, after = map(float, done.stdout.split())
    assert after == before
    fresh = run_outside(folder, FORWARD.format(tag="v2"), cache)
    assert fresh.returncode == 0, fresh.stderr
    assert float(fresh.stdout.split()[2]) == pytest.approx(2 * before, rel=1e-6)


@pytest.mark.slow   # subprocesses
def _probe_definition(code: str, k: float) -> str:
    """What the cache key reads of class Probe defined by `code` with {k} = k, in a
    module of its own (named as a user's would be)."""
    from structc.ops.base import _definition
    module = types.ModuleType("user_ext_probe")
    sys.modules["user_ext_probe"] = module
    try:
        exec(code.format(k=k), module.__dict__)
        return _definition(module.Probe)
    finally:
        del sys.modules["user_ext_probe"]


def test_the_key_follows_a_module_function_the_op_calls(tmp_path):
    code = textwrap.dedent("""
        from structc.ops import Elementwise
        def factor():
            return {k}
        class Probe(Elementwise):
            def emit(self, cg, x):
                return cg.mul(x, cg.const(factor(), x))
    """)
    seen = [_probe_definition(code, k) for k in (2.0, 3.0)]
    assert seen[0] != seen[1]


def test_check_op_fails_a_reference_of_the_wrong_shape(monkeypatch):
    op = REGISTRY["softplus"]
    monkeypatch.setattr(type(op), "reference", lambda self, x: np.sum(np.logaddexp(0, x)))
    with pytest.raises(AssertionError, match=r"check_op\('softplus'\), sample 0 .*shape rule gives \[3, 5\], "
                                             r"the reference returns \[\]"):
        check_op("softplus")


STATE_PROBES = {
    "a module constant": ("FACTOR = {k}\n", "cg.const(FACTOR, x)"),
    "a constant a helper reads": ("FACTOR = {k}\ndef factor():\n    return FACTOR\n", "cg.const(factor(), x)"),
    "a table of constants": ("TABLE = {{'a': ({k}, 1)}}\n", "cg.const(TABLE['a'][0], x)"),
    "an array": ("import numpy as np\nARRAY = np.array([1.0, {k}])\n", "cg.const(float(ARRAY[1]), x)"),
    "a default argument": ("", "cg.const(factor, x)", "factor={k}"),
    "a closure": ("def make(factor):\n    def emit(self, cg, x):\n        return cg.mul(x, cg.const(factor, x))\n"
                  "    return emit\n", None),
}


@pytest.mark.parametrize("probe", list(STATE_PROBES))
def test_the_key_follows_the_values_an_op_reads(probe):
    """The key hashed an op's code but not the values it reads: a module constant (also
    through a helper), a default argument or a closure's cell. Editing `FACTOR = 2.0` to
    `3.0` in the op's module loaded the code compiled for 2.0 from the cache. The same
    definition still gives the same key (no object addresses in it: a cache hit)."""
    head, expr, *default = STATE_PROBES[probe]
    if expr is None:
        body = "class Probe(Elementwise):\n    emit = make({k})\n"
    else:
        extra = f", {default[0]}" if default else ""
        body = f"class Probe(Elementwise):\n    def emit(self, cg, x{extra}):\n        return cg.mul(x, {expr})\n"
    code = "from structc.ops import Elementwise\n" + head + body
    seen = [_probe_definition(code, k) for k in (2.0, 3.0, 3.0)]
    assert seen[0] != seen[1] and seen[1] == seen[2]


# -- mistakes a user makes when writing an op ----------------------------------------

@pytest.fixture
def user_ops():
    """Ops (and layers) a test registers are taken out again after it (the
    cache key and other tests see only structc's own)."""
    from structc.layers.context import SURFACE
    before, layers = set(REGISTRY), set(SURFACE)
    yield
    for name in set(REGISTRY) - before:
        del REGISTRY[name]
    for name in set(SURFACE) - layers:
        del SURFACE[name]


@pytest.mark.parametrize("layer", ["mean", "dense", "dropout", "zeros"])
def test_a_callable_op_named_like_a_layer_is_refused(user_ops, layer):
    """A user op with `surface = True` named like a layer of the language
    (`mean`, `dense`, ...) was registered, but `.snet` calls still reached the
    layer: `mean(x)` gave the layer's mean, not the user's op, with no error."""
    with pytest.raises(ValueError, match=rf"op {layer!r} has the name of the layer "
                                         rf"structc\.layers\.\w+\.{layer}.*choose another name"):
        class Shadow(Elementwise):
            name = layer
            surface = True

            def reference(self, x):
                return 2 * x

            def emit(self, cg, x):
                return cg.mul(x, cg.const(2.0, x))
    assert layer not in REGISTRY


def test_an_op_not_called_from_snet_may_share_a_layers_name(user_ops):
    class Helper(Elementwise):      # surface = False: the language never sees it
        name = "flatten"
    assert type(REGISTRY["flatten"]) is Helper


def test_a_layer_named_like_a_callable_op_is_refused(user_ops):
    from structc.layers.context import SURFACE, surface

    class Twice(Elementwise):
        name = "twice_user_op"
        surface = True
    with pytest.raises(ValueError, match="layer 'twice_user_op' has the name of the op .*Twice"):
        surface("twice_user_op")(lambda ctx, x: x)
    assert "twice_user_op" not in SURFACE


VJP_MISTAKES = {
    "no return": lambda self, b, g, out, x: None,
    "a bare value": lambda self, b, g, out, x: g * 2.0,
    "a number": lambda self, b, g, out, x: [2.0],
}


@pytest.mark.parametrize("mistake", list(VJP_MISTAKES))
def test_a_vjp_that_returns_no_list_of_values_is_named(user_ops, mistake):
    """A VJP that forgot its `return`, or returned a Value (not a list of one),
    failed deep in autodiff with `object of type 'NoneType' has no len()`."""
    Wrong = type("Wrong", (Elementwise,), {
        "name": "wrong_vjp", "surface": True, "vjp": VJP_MISTAKES[mistake],
        "reference": lambda self, x: 2 * x, "emit": lambda self, cg, x: cg.mul(x, cg.const(2.0, x))})
    src = "model T {\n  param w: f32[4] = ones\n  target t: f32[4]\n  loss mse(wrong_vjp(w), t)\n}"
    with pytest.raises(AssertionError, match=r"wrong_vjp\.vjp must return a list with one Value \(or None\) "
                                             r"per input \(1 here\), got "):
        structc.compile(src, cache=False)
    with pytest.raises(AssertionError, match=r"check_op\('wrong_vjp'\), sample 0 .*VJP vs finite differences "
                                             r"failed: wrong_vjp\.vjp must return a list"):
        check_op(Wrong)


def test_an_op_registered_without_surface_says_so_when_called(user_ops):
    class Hidden(Elementwise):
        name = "hidden_user_op"

        def reference(self, x):
            return x
    with pytest.raises(structc.SnetNameError, match=r"'hidden_user_op' is an op of .*Hidden that \.snet "
                                                    r"cannot call: set `surface = True` in its class"):
        structc.compile("model T {\n  input x: f32[4]\n  output y = hidden_user_op(x)\n}", cache=False)


@pytest.mark.parametrize("name", ["my-op", "swish2.0", "soft plus", "2x", "σ"])
def test_a_callable_op_whose_name_snet_cannot_spell_is_refused(user_ops, name):
    """`surface = True` under a name that is not a .snet name registered, and every call
    of it was a parse error (`my-op(x)`: "unknown name 'my'")."""
    with pytest.raises(ValueError, match=rf"op {re.escape(repr(name))} has surface = True, but \.snet cannot "
                                         rf"call it: .*choose one such as '\w+'"):
        type("Unspellable", (Elementwise,), {"name": name, "surface": True})
    assert name not in REGISTRY
    type("Helper", (Elementwise,), {"name": name})        # an op the language never calls may take any name
    assert name in REGISTRY


def test_a_callable_op_named_like_a_keyword_is_called(user_ops):
    """The language reserves no word for calls: the parser lexes a keyword (`loss`,
    `graph`, `f32`, `leaf`, ...) in an expression as a name, so an op may take it."""
    from structc.build import build_model
    from structc.ops.base import LAYER_NAMES
    from structc.syntax import grammar_text, parse
    grammar = grammar_text()
    words = set(re.findall(r'"([A-Za-z_]\w*)"', grammar))
    for line in re.findall(r"^(?:DTYPE|CASE|STEP)\S*: /(.*)/$", grammar, re.M):
        words |= set(re.search(r"\(([\w|]+)\)", line).group(1).split("|"))
    words = sorted(words - set(REGISTRY) - set(LAYER_NAMES))     # input, param: ops of structc's own
    assert {"model", "loss", "graph", "class", "of", "frozen", "f32", "leaf", "next"} <= set(words)
    for word in words:
        type(f"Op_{word}", (Elementwise,), {"name": word, "surface": True, "reference": lambda self, x: x})
    calls = "\n".join(f"  h{k + 1} = {word}(h{k})" for k, word in enumerate(words))
    mdef = build_model(parse(f"model T {{\n  input h0: f32[4]\n{calls}\n  output y = h{len(words)}\n}}"), "T")
    assert sorted({n.op.name for n in mdef.graph.nodes.values()} & set(words)) == words
