"""An edit lowers only the kernels it changed (issue 14, item 4): kernels are
found by their lowering key (`lower/lowered.py`) and their recorded text
stands in; the IR must be the one a fresh compile gives, and a change to
anything a kernel's text depends on must build it again."""
import json
import re

import numpy as np
import pytest

import structc
from structc import compiler
from structc.lower import module as lower_module
from structc.lower.module import Target
from structc.native import host_target
from structc.ops.matmul import Transpose
from structc.syntax import parse

CNN = """model E {
  input x: f32[N, 1, 8, 8]
  target y: class[N] of 3
  h = conv(x, 4, kernel=3) |> relu |> maxpool2d(2)
  h = dense(flatten(h), 8) |> relu
  loss cross_entropy(dense(h, 3), y)
}"""
X = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 1, 8, 8)
Y = np.array([0, 2])


@pytest.fixture
def cache_in(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("STRUCTC_NO_CACHE", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def no_llvm(monkeypatch):
    """LLVM left out: these tests compare IR text, never run it."""
    monkeypatch.setattr(compiler, "compile_objects", lambda texts, *a, **k: [(b"not run", {}) for _ in texts])


def _lower(source, target=None, parts=("forward", "training")):
    """(the IR text of each module, kernels reused, kernels built) of a compile
    through the module cache (what `structc.compile` does with the cache on)."""
    before = dict(compiler.KERNEL_RECORDS)
    art = compiler.compile_program(parse(source), target=target, parts=list(parts), module_cache=True)
    return (art.part_ir, compiler.KERNEL_RECORDS["reused"] - before["reused"],
            compiler.KERNEL_RECORDS["built"] - before["built"])


def _fresh(source, tmp_path, monkeypatch, target=None, parts=("forward", "training")):
    """The IR of a compile with an empty cache folder."""
    monkeypatch.setenv("STRUCTC_CACHE_DIR", str(tmp_path / f"fresh{len(list(tmp_path.iterdir()))}"))
    return _lower(source, target, parts)[0]


def test_an_edit_lowers_only_the_layers_it_changed_and_the_ir_is_a_fresh_compiles(cache_in, no_llvm, tmp_path,
                                                                                   monkeypatch):
    _lower(CNN)
    edited = CNN.replace("dense(flatten(h), 8)", "dense(flatten(h), 6)")
    ir, reused, built = _lower(edited)
    assert reused >= 6 and built >= 4, (reused, built)     # the convolution's kernels (both ways) are reused
    assert ir == _fresh(edited, tmp_path, monkeypatch)
    assert _lower(edited)[1:] == (reused + built, 0)       # all of them now


# Each change below alters the text of some kernel; keyed on too little, the
# record of the kernel before the change would stand in for it, and the IR
# would differ from a fresh compile's.
CHANGES = {
    "shape": ("conv(x, 4, kernel=3)", "conv(x, 5, kernel=3)"),
    "activation": ("dense(flatten(h), 8) |> relu", "dense(flatten(h), 8) |> tanh"),
    "epilogue": ("dense(flatten(h), 8) |> relu", "dense(flatten(h), 8)"),
    "stride": ("conv(x, 4, kernel=3)", "conv(x, 4, kernel=3, stride=2)"),
    "pool": ("maxpool2d(2)", "maxpool2d(3)"),
    "static batch": ("f32[N, 1, 8, 8]\n  target y: class[N]", "f32[2, 1, 8, 8]\n  target y: class[2]"),
}


@pytest.mark.parametrize("change", [c if c == "shape" else pytest.param(c, marks=pytest.mark.slow) for c in CHANGES])
def test_a_change_to_what_a_kernel_depends_on_builds_it_again(change, cache_in, no_llvm, tmp_path, monkeypatch):
    _lower(CNN)
    changed = CNN.replace(*CHANGES[change])
    assert changed != CNN
    ir, reused, built = _lower(changed)
    assert built > 0
    assert ir == _fresh(changed, tmp_path, monkeypatch)


def test_another_target_reuses_no_record(cache_in, no_llvm, tmp_path, monkeypatch):
    """Same vector width, another CPU name: the same texts, most likely, but
    the key keeps targets apart rather than guess what a target changes."""
    host = host_target()
    other = Target(host.triple, "x86-64-v2" if host.cpu != "x86-64-v2" else "x86-64", host.features)
    _lower(CNN, host, parts=["forward"])
    ir, reused, built = _lower(CNN, other, parts=["forward"])
    assert reused == 0 and built > 0
    assert ir == _fresh(CNN, tmp_path, monkeypatch, other, ["forward"])


NOSY = {"read graph.users": lambda kb, node: kb.graph.users(node.id),
        # a parameter's attributes (its name) are not in the spec: its kernels are shared by every layer
        "read an operand's attrs": lambda kb, node: kb.graph.nodes[node.inputs[0]].attrs}


@pytest.mark.parametrize("read", [r if r == "read graph.users" else pytest.param(r, marks=pytest.mark.slow)
                                  for r in NOSY])
def test_a_lowering_that_reads_outside_its_group_records_nothing(read, cache_in, no_llvm, monkeypatch):
    """The op sees the graph through a view that notes reads beyond the group's
    spec (here: the transpose's users, or its operand's attributes): such a
    kernel is built every time."""
    real = Transpose.lower

    def nosy(self, kb, node, epilogue):
        NOSY[read](kb, node)
        return real(self, kb, node, epilogue)
    monkeypatch.setattr(Transpose, "lower", nosy)
    refused = dict(compiler.KERNEL_RECORDS["refused"])
    _lower(CNN)
    assert compiler.KERNEL_RECORDS["refused"].get(read, 0) > refused.get(read, 0)
    transposes = []
    real_kernel = lower_module.KernelBuilder.kernel

    def kernel(self, name, *a, **k):
        transposes.append(name.startswith("transpose") and self._scope is not None)
        return real_kernel(self, name, *a, **k)
    monkeypatch.setattr(lower_module.KernelBuilder, "kernel", kernel)
    before = compiler.KERNEL_RECORDS["built"]
    _lower(CNN)
    assert compiler.KERNEL_RECORDS["built"] - before == sum(transposes) > 0     # only the transposes, again


def test_a_damaged_record_is_not_used(cache_in, no_llvm, tmp_path, monkeypatch):
    from structc import cache
    ir, within, _ = _lower(CNN)       # records made in the compile serve it too (both parts' same kernels)
    for record in cache_in.glob("*.lowered"):       # each one's text, cut short
        data = record.read_bytes()
        record.write_bytes(data[:len(data) // 2])
    with pytest.warns(cache.CacheWarning, match="integrity"):
        again, reused, built = _lower(CNN)
    assert reused == within and built > 0 and again == ir


@pytest.mark.slow
def test_kernels_from_records_compute_bitwise_what_a_fresh_compile_does(cache_in):
    structc.compile(CNN, training=True)
    edited = CNN.replace("dense(h, 3)", "dense(h, 3) |> tanh")
    before = compiler.KERNEL_RECORDS["reused"]
    net = structc.compile(edited, training=True)
    assert compiler.KERNEL_RECORDS["reused"] > before
    fresh = structc.compile(edited, cache=False, training=True)
    np.testing.assert_array_equal(net(x=X), fresh(x=X))
    assert [net.train_step(0.1, x=X, y=Y) for _ in range(3)] == [fresh.train_step(0.1, x=X, y=Y) for _ in range(3)]
    np.testing.assert_array_equal(net._param_arena, fresh._param_arena)


def _models() -> dict:
    """Every shipped example, the conv step (padding) and repeated layers."""
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "benchmarks"))
    import bench_compile
    import bench_conv
    found = {p.stem: p.read_text() for p in sorted((root / "examples").glob("*.snet"))}
    return dict(found, conv_step=bench_conv.CONV_STEP, dense20=bench_compile.deep(20))


@pytest.mark.slow
def test_every_model_lowered_from_records_is_a_fresh_lowering(tmp_path, no_llvm, monkeypatch):
    """One cache folder for all the models in turn (so each meets the others'
    records, as a user's folder does), each model twice (the second time every
    kernel from its record): its IR is always the one lowered in an empty folder."""
    shared = str(tmp_path / "shared")
    for k, (name, source) in enumerate(_models().items()):
        monkeypatch.setenv("STRUCTC_CACHE_DIR", str(tmp_path / f"fresh{k}"))
        fresh = _lower(source)[0]
        monkeypatch.setenv("STRUCTC_CACHE_DIR", shared)
        assert _lower(source)[0] == fresh, name
        again, reused, built = _lower(source)
        assert again == fresh and reused > 0, name


# -- kernels whose text does not depend on the model's sizes -------------------

def _optimiser_kernels(source) -> list[str]:
    ir = "\n".join(_lower(source)[0])
    return sorted(set(re.findall(r'^define [^@]*@"(sc_[0-9a-f]{16}_update(?:_clip)?)"', ir, re.M)))


def test_a_width_edit_leaves_the_optimiser_kernels_as_they_were(cache_in, no_llvm):
    """The update and its clipping kernel read the arena's sizes at run time
    (`module.run_time_value`): another width changes what the entry passes
    them, not their text, so their cached objects serve the edit."""
    before = _optimiser_kernels(CNN)
    assert len(before) == 2, before
    edited = CNN.replace("dense(flatten(h), 8)", "dense(flatten(h), 6)")
    assert _optimiser_kernels(edited) == before
    assert _optimiser_kernels(edited.replace("dense(h, 3)", "dense(h, 3, bias=false)")) == before


def test_a_width_edit_changes_only_the_matmuls_and_transposes_it_resizes(cache_in, no_llvm):
    """Sums (the bias gradients) and flat elementwise loops read their sizes at
    run time (`module.run_time_numel`): a dense layer's new width leaves every
    kernel but the matmuls' (its weight gradient's parts too) and the weights'
    transposes as it was."""
    def kernels(source):
        ir = "\n".join(_lower(source)[0])
        return set(re.findall(r'^define [^@]*@"(sc_[0-9a-f]{16}_\w+)"', ir, re.M))
    before = kernels(CNN)
    after = kernels(CNN.replace("dense(flatten(h), 8)", "dense(flatten(h), 6)"))
    kinds = lambda symbols: {lower_module.kernel_kind(s) for s in symbols}     # noqa: E731
    assert kinds(before - after) == {"matmul", "matmul_parts", "transpose"}
    assert {"sum", "ew"} <= kinds(before & after)

@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_one_update_kernel_serves_models_of_other_sizes(cache_in, optimizer):
    """The edited model loads the update's object compiled for the first one (the
    same text); its entry passes its own sizes: every parameter moves by its own
    gradient, matrices decayed and vectors not (`decay_end`), Adam's second
    moments kept after the first (`size`)."""
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((4, 1, 8, 8)).astype(np.float32), np.array([0, 2, 1, 1])
    structc.compile(CNN, training=True)
    modules = compiler.MODULE_COUNT
    net = structc.compile(CNN.replace("dense(flatten(h), 8)", "dense(flatten(h), 5)"), training=True)
    assert compiler.MODULE_COUNT > modules       # an edit, not a cache hit of the whole model
    _, grads = net.grad(x=x, y=y)
    net.set_optimizer(optimizer, weight_decay=0.25, decay_biases=False)
    before = {k: v.copy() for k, v in net.params.items()}
    net.train_step(0.01, x=x, y=y)
    for name, g in grads.items():
        p = before[name]
        g = g + (0.25 * p if p.ndim >= 2 else 0)
        if optimizer == "sgd":
            expected = p - 0.01 * g
        else:       # Adam's first step: m = 0.1 g, v = 0.001 g^2
            expected = p - 0.01 / 0.1 * (0.1 * g) / (np.sqrt(0.001 * g * g) / np.sqrt(0.001) + 1e-8)
        np.testing.assert_allclose(net.params[name], expected, rtol=1e-4, atol=1e-6, err_msg=name)


def test_flat_elementwise_kernels_read_their_size_at_run_time(cache_in):
    """An elementwise loop over one flat axis reads the constant factor of its
    size from its frame: the same maths at another size is the same kernel
    (batch norm's per-channel statistics at 3 and 5 channels; a width edit's
    activations), computing what it did at each size."""
    src = ("model B {\n  input x: f32[N, 2, 4, 4]\n  target y: class[N] of 3\n"
           "  h = conv(x, 3, kernel=3, padding=same, bias=false) |> batch_norm |> relu\n"
           "  h = conv(h, 5, kernel=3, padding=same, bias=false) |> batch_norm |> relu\n"
           "  loss cross_entropy(dense(flatten(h), 3), y)\n}\n")
    art = compiler.compile_source(src, parts=["forward", "training"])
    ew = {name: symbol for name, symbol in art.kernel_symbols.items() if re.fullmatch(r"sc_train_ew\d+", name)}
    flat = [s for s in ew.values() if re.search(rf'define [^\n]*@"{s}"[^}}]*chunk\.head', art.llvm_ir)]
    assert 2 * len(set(flat)) <= len(flat)      # each of the first layer's is the second's too
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((4, 2, 4, 4)).astype(np.float32), np.array([0, 2, 1, 1])
    net = structc.compile(src, cache=False, training=True)
    loss, grads = net.grad(x=x, y=y)
    h = x.astype(np.float64)
    for k, name in enumerate(("conv1", "conv2")):
        w = net.params[f"{name}.w"].astype(np.float64)
        z = _conv_same(h, w)
        mean, var = z.mean((0, 2, 3), keepdims=True), z.var((0, 2, 3), keepdims=True)
        g, b = (net.params[f"bn{k + 1}.{p}"].reshape(1, -1, 1, 1) for p in ("g", "b"))
        h = np.maximum((z - mean) / np.sqrt(var + 1e-5) * g + b, 0)
    logits = h.reshape(4, -1) @ net.params["dense1.w"] + net.params["dense1.b"]
    logits -= logits.max(1, keepdims=True)
    expected = np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(4), y])
    np.testing.assert_allclose(loss, expected, rtol=1e-4)


def _conv_same(x, w):
    """3x3 cross-correlation with padding 1, float64."""
    n, c, hh, ww = x.shape
    p = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], hh, ww))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,oc->nohw", p[:, :, i:i + hh, j:j + ww], w[:, :, i, j])
    return out

# -- small kernels in modules cut by their content ------------------------------

def test_stable_chunks_keep_the_runs_an_edit_does_not_touch():
    """Replacing one name (an edited kernel: a new text, so a new name, at the
    same place in the call order) changes at most the run that held it and the
    one after (when the old name ended its run or the new one does)."""
    names = [f"sc_{k:016x}_ew" for k in range(60)]
    order = {n: k for k, n in enumerate(names)}
    runs = lower_module.stable_chunks(names, order, 4)
    assert 8 <= len(runs) <= 30 and sum(map(len, runs)) == 60
    for k in range(0, 60, 7):
        new = f"sc_{k + 1000:016x}_ew"
        edited = names[:k] + [new] + names[k + 1:]
        changed = [run for run in lower_module.stable_chunks(edited, dict(order, **{new: k}), 4)
                   if run not in runs]
        assert 1 <= len(changed) <= 2 and new in changed[0], (k, changed)


WIDE = ("model W {\n  input x: f32[N, 5]\n  target y: class[N] of 3\n  h = x\n"
        + "".join(f"  h = dense(h, {w}) |> {act}\n" for w, act in [(12, "relu"), (10, "tanh"), (9, "relu"),
                                                                    (7, "sigmoid"), (11, "relu"), (8, "tanh"),
                                                                    (13, "relu"), (5, "tanh"), (14, "sigmoid"),
                                                                    (6, "relu"), (15, "tanh"), (4, "relu")])
        + "  loss cross_entropy(dense(h, 3), y)\n}\n")


def test_an_edit_leaves_most_modules_of_small_kernels_as_they_were(cache_in, no_llvm):
    """The small kernels of a pipeline (fused elementwise code, sums, ...) are
    modules of a few each (`stable_chunks`), not one per pipeline: an edit of one
    layer changes the modules around that layer's kernels, and the others keep
    their text, so their objects come from the cache."""
    def small_modules(source):
        return [t for t in _lower(source)[0]
                if not t.startswith(lower_module.ENTRY_CODE) and len(re.findall(r"^define ", t, re.M)) > 1]
    before = set(small_modules(WIDE))
    after = small_modules(WIDE.replace("dense(h, 7)", "dense(h, 6)"))
    kept = [t for t in after if t in before]
    assert kept and len(kept) < len(after), (len(kept), len(after))


def test_defined_once_leaves_a_part_that_repeats_nothing_as_it_is():
    """`defined_once` matches whole definitions (a regex over the part's IR text:
    most of the IR-text stage) only in a module that defines what an earlier
    part did; the others are returned as they are, and their names noted."""
    first = 'define hidden void @"sc_1_ew"(ptr %".1") {\nentry:\n  ret void\n}\n'
    second = 'define hidden void @"sc_2_ew"(ptr %".1") {\nentry:\n  ret void\n}\n'
    defined: set[str] = set()
    out = lower_module.defined_once([first], defined)
    assert out[0] is first and defined == {"sc_1_ew"}
    again = lower_module.defined_once([second + first], defined)
    assert again[0] == second + 'declare hidden void @"sc_1_ew"(ptr %".1")\n' and defined == {"sc_1_ew", "sc_2_ew"}


def test_a_record_file_keeps_its_texts_as_bytes_and_refuses_parts_that_do_not_fit():
    from structc.lower.lowered import record_file, record_from_file
    record = {"version": 2, "body": 'define internal void @"@kernel"() {\n  ret void\n}\n', "vector_code": False,
              "slots": [[["value", 7], 0, "i64"]],
              "callees": [["d", ["void", [], False], "declare void @d()", None, False],
                          ["h", ["void", [], False], None, "define internal void @h() { ret void }  é", True]]}
    meta, payload = record_file(record)
    assert record["body"].encode() in payload and "ret void" not in json.dumps(meta)
    assert record_from_file(json.loads(json.dumps(meta)), payload) == record
    assert record_from_file(meta, payload[:-1]) is None and record_from_file(meta, payload + b"x") is None
    assert record_from_file(dict(meta, text_bytes=meta["text_bytes"][:1]), payload) is None


def test_the_entry_passes_the_edited_models_sizes_to_the_shared_update(cache_in, no_llvm):
    """The update's records name its run-time values by what they are
    (`["value", n]`) under a key that holds the sizes: after an edit, with the
    first model's records in the cache, the entry stores the new sizes."""
    from structc.build import build_model
    every = ("forward", "training", "update")
    _lower(CNN, parts=every)
    edited = CNN.replace("dense(flatten(h), 8)", "dense(flatten(h), 6)")
    _, size, update_size, decay_end = compiler.arena_layout(build_model(parse(edited), None), frozenset())
    (entry,) = [t for t in _lower(edited, parts=every)[0] if 'define i32 @"sc_update"' in t]
    body = entry[entry.index('define i32 @"sc_update"'):]
    stored = re.findall(r"store i64 (\d+)", body[:body.index("\n}")])
    assert sorted(map(int, stored)) == sorted([update_size, update_size, decay_end]), (stored, size)
