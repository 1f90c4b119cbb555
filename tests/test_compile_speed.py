"""Compiling less and in parallel, and saying where the time goes (issue 14):
behaviour only; the timings themselves are benchmarks/bench_compile.py's."""
import dataclasses
import os
import re
import subprocess
import sys
import threading

import networkx as nx
import numpy as np
import pytest

import structc
from structc import api
from structc.build import build_model
from structc.compiler import compile_source, forward_graph, train_graph
from structc.lower import module as lower_module
from structc.passes import run_pipeline
from structc.syntax import parse

MLP = ("model M {\n  input x: f32[N, 6]\n  target y: class[N] of 3\n"
       "  h = dense(x, 8) |> relu\n  loss cross_entropy(dense(h, 3), y)\n}\n")
X = np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6)
Y = np.array([0, 1, 2, 1])


@pytest.fixture
def cache_in(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("STRUCTC_NO_CACHE", raising=False)
    return tmp_path / "cache"


def _compiles(fn) -> int:
    before = api.COMPILE_COUNT
    fn()
    return api.COMPILE_COUNT - before


@pytest.mark.slow
def test_inference_compiles_the_forward_entry_only_and_training_when_first_needed(cache_in):
    net = structc.compile(MLP, cache=False)
    assert net.meta["deferred"] == ["training", "update", "evaluation"] and set(dict(net._entries)) == {"forward"}
    out = net(x=X)
    assert set(dict(net._entries)) == {"forward"}          # a forward call compiles nothing more
    before = api.COMPILE_COUNT
    losses = [net.train_step(0.1, x=X, y=Y) for _ in range(3)]
    assert api.COMPILE_COUNT == before + 1 and net.meta["deferred"] == ["update", "evaluation"]   # on its first use
    # The same as compiling everything at once.
    whole = structc.compile(MLP, cache=False, training=True)
    assert whole.meta["parts"] == ["forward", "training"] and whole.meta["deferred"] == ["update", "evaluation"]
    np.testing.assert_array_equal(whole(x=X), out)
    assert [whole.train_step(0.1, x=X, y=Y) for _ in range(3)] == losses


@pytest.mark.slow
def test_grad_and_update_compile_the_training_part_too():
    net = structc.compile(MLP, cache=False)
    loss, grads = net.grad(x=X, y=Y)
    assert np.isfinite(loss) and set(grads) == set(net.params)
    assert net.meta["deferred"] == ["update", "evaluation"]     # each compiled on its first use
    assert _compiles(lambda: net.apply_update(0.1)) == 1 and net.meta["deferred"] == ["evaluation"]
    assert _compiles(lambda: net.apply_update(0.1)) == 0
    net.loss(x=X, y=Y)
    assert net.meta["deferred"] == []


@pytest.mark.slow
def test_a_forward_only_entry_is_not_taken_for_the_whole_model(cache_in):
    assert _compiles(lambda: structc.compile(MLP)) == 1                    # the forward part, cached
    art = None

    def whole():
        nonlocal art
        art = api.compile_artifact(MLP)
    assert _compiles(whole) == 1           # the training part was missing: compiled (that part only)
    assert art.meta["parts"] == ["forward", "training"] and set(art.meta["entries"]) == {"forward", "train"}
    assert "forward.llvm.opt" not in art.timings and "training.llvm.opt" in art.timings
    assert _compiles(whole) == 0 and art.meta["deferred"] == ["update", "evaluation"]   # both from the cache now


@pytest.mark.slow
def test_a_deferred_part_is_cached_once_compiled(cache_in):
    net = structc.compile(MLP)
    assert _compiles(lambda: net.train_step(0.1, x=X, y=Y)) == 1
    again = structc.compile(MLP)
    assert _compiles(lambda: again.train_step(0.1, x=X, y=Y)) == 0        # loaded, not compiled


def test_a_library_for_inference_only_refuses_training_clearly():
    art = compile_source(MLP, parts=["forward"])
    net = structc.Net(art.meta, structc.native.JitModule(art.object, structc.native.host_target()))
    np.testing.assert_array_equal(net(x=X), structc.compile(MLP, cache=False)(x=X))
    with pytest.raises(TypeError, match="compiled for inference only"):
        net.train_step(0.1, x=X, y=Y)


def test_timings_name_every_stage():
    t = compile_source(MLP, parts=["forward", "training", "update"]).timings
    for stage in ["parse", "build", "prepare", "train.autodiff", "forward.simplify", "train.cse", "forward.fuse",
                  "train.plan", "forward.lower", "train.lower", "update.lower", "forward.llvm.opt",
                  "training.llvm.opt", "training.llvm.codegen", "update.llvm.opt", "total"]:
        assert stage in t and t[stage] >= 0 and stage in t.cpu, stage
    assert t["total"] >= t["train.lower"]
    assert "training.llvm.opt" in t.table() and "cpu ms" in t.table()


@pytest.mark.slow
def test_cli_compile_timings(tmp_path):
    src = tmp_path / "m.snet"
    src.write_text(MLP)
    env = {"STRUCTC_NO_CACHE": "1"}
    done = subprocess.run([sys.executable, "-m", "structc", "compile", str(src), "--timings"],
                          capture_output=True, text=True, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    assert "training.llvm.codegen" in done.stdout and "train.autodiff" in done.stdout


@pytest.mark.slow
def test_modules_split_across_threads_compute_the_same(monkeypatch):
    """A part cut into several modules (compiled concurrently) is the same program."""
    monkeypatch.setattr(lower_module, "SPLIT_MIN_CHARS", 0)
    monkeypatch.setenv("STRUCTC_COMPILE_THREADS", "3")
    split = compile_source(MLP)
    assert len(split.objects) > 2           # several modules per part
    assert "define hidden" in split.llvm_ir  # kernels another module calls
    monkeypatch.setenv("STRUCTC_COMPILE_THREADS", "1")
    whole = compile_source(MLP)
    # per part: its entry points (the entry pipeline), its memory-bound kernels (the training
    # part's clip norm), its light kernels (softmax, cross-entropy: O1) and its vector code
    # (the short pipeline): the forward part's matmul drivers and micro-kernels, the training
    # part's matmul drivers, transposes, bias sums and update; the MLP has no kernel left for O3
    assert [structc.native.pipeline_of(t) for t in whole.part_ir] == \
        ["entry", "light", "short", "entry", "memory", "light", "short"]
    kinds = re.findall(r'^define [^@]*@"sc_[0-9a-f]+_([a-z]+)"', whole.part_ir[6], re.M)
    assert "transpose" in kinds and set(kinds) == {"transpose", "matmul", "sum", "update"}
    nets = [structc.Net(a.meta, structc.native.JitModule(a.object, structc.native.host_target()))
            for a in (split, whole)]
    np.testing.assert_array_equal(nets[0](x=X), nets[1](x=X))
    assert [nets[0].train_step(0.1, x=X, y=Y) for _ in range(3)] == [nets[1].train_step(0.1, x=X, y=Y)
                                                                      for _ in range(3)]


@pytest.mark.slow
def test_models_compiled_in_two_threads_at_once():
    """Each thread's LLVM work runs in its own context, past llvmlite's lock."""
    sources = [MLP, MLP.replace("relu", "tanh")]
    nets = [None, None]

    def build(k):
        nets[k] = structc.compile(sources[k], cache=False, training=True)
    threads = [threading.Thread(target=build, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, src in enumerate(sources):
        np.testing.assert_array_equal(nets[k](x=X), structc.compile(src, cache=False)(x=X))


def _deep(n: int) -> str:
    body = "\n".join("  h = dense(h, 8) |> relu" for _ in range(n))
    return f"model Deep {{\n  input x: f32[N, 8]\n  target y: class[N] of 4\n  h = x\n{body}\n" \
           "  loss cross_entropy(dense(h, 4), y)\n}\n"


def _graph_walks(monkeypatch, source: str) -> int:
    """The graph walks (networkx ancestors/descendants/has_path, `Graph.reachable`,
    which `Graph.ancestors` is made of) the passes and autodiff make on the train
    graph of `source`."""
    from structc.graph import Graph
    count = [0]
    for owner, name in ((nx, "ancestors"), (nx, "descendants"), (nx, "has_path"), (Graph, "reachable")):
        real = getattr(owner, name)

        def counted(*args, real=real, **kwargs):
            count[0] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, counted)
    mdef = build_model(parse(source))
    run_pipeline(forward_graph(mdef))
    run_pipeline(train_graph(mdef, 1))
    monkeypatch.undo()
    return count[0]


def test_passes_make_no_walk_per_layer(monkeypatch):
    """A whole-graph walk per layer (one per output in dce, per parameter in
    autodiff) makes compiling a deep model quadratic in its depth."""
    assert _graph_walks(monkeypatch, _deep(40)) == _graph_walks(monkeypatch, _deep(10))


def _through_the_passes(source: str):
    """The train graph of `source` after every pass, and its memory plan (no lowering, no LLVM)."""
    from structc.compiler import arena_layout
    from structc.passes.message import prepare
    from structc.passes.plan import plan_memory
    mdef = build_model(parse(source))
    mdef = dataclasses.replace(mdef, graph=prepare(mdef.graph.copy()))
    offsets, _, update_size, decay_end = arena_layout(mdef, frozenset())
    g = run_pipeline(train_graph(mdef, update_size, decay_end=decay_end))
    plan_memory(g, offsets)
    return g


@pytest.mark.slow
def test_deep_model_and_many_rounds_of_message_passing_go_through_the_passes():
    """200 dense layers, and a GNN of 10 rounds."""
    assert len(_through_the_passes(_deep(200)).groups) > 600
    gnn = ("model G {\n  input g: graph(features=16)\n  target y: class[g.nodes] of 3\n  h = g.x\n"
           "  repeat 10 { h = relu(sum(dense(h, 16) over g.edges, self_loops=true, norm=gcn)) }\n"
           "  loss cross_entropy(dense(h, 3), y)\n}\n")
    assert len(_through_the_passes(gnn).groups) > 40


@pytest.mark.slow
def test_a_warm_load_does_not_parse(cache_in, monkeypatch):
    """The cache's alias of the source text gives its canonical program: building
    the parser (most of a warm load) is skipped. Another text (a comment) parses
    and finds the same code."""
    assert _compiles(lambda: api.compile_artifact(MLP)) == 1

    def no_parse(*args, **kwargs):
        raise AssertionError("parsed on a warm load")
    with monkeypatch.context() as m:
        m.setattr(api, "parse", no_parse)
        art = api.compile_artifact(MLP, "m.snet")
        assert art.meta["parts"] == ["forward", "training"] and art.meta["file"] == "m.snet"
        with pytest.raises(AssertionError, match="parsed"):
            api.compile_artifact("# a comment\n" + MLP)
    assert _compiles(lambda: api.compile_artifact("# a comment\n" + MLP)) == 0


@pytest.mark.slow
def test_kernel_timings_time_each_kernel_apart():
    art = compile_source(MLP, kernel_timings=True)
    kernels = [k for k in art.timings if ".llvm.kernel " in k]
    assert any("sc_train_matmul" in k for k in kernels) and any(k.endswith(" sc_forward") for k in kernels)
    assert len(art.objects) == len(kernels)          # one module per kernel or entry point
    assert sum(" sc_mk" in k for k in kernels) > 1   # the micro-kernels too, each apart
    net = structc.Net(art.meta, structc.native.JitModule(art.object, structc.native.host_target()))
    np.testing.assert_array_equal(net(x=X), structc.compile(MLP, cache=False)(x=X))


@pytest.mark.slow
def test_kernel_timings_with_every_part_a_library_gets():
    """With the held-out loss part too (what `structc compile -o --kernel-timings`
    builds), the loss kernels it shares with the training part are defined once:
    the module left with declarations only is not compiled (it once had no
    function to name the timing after, and the CLI crashed)."""
    from structc.compiler import PARTS
    art = compile_source(MLP.replace("|> relu", "|> batch_norm |> relu"), parts=list(PARTS), kernel_timings=True)
    kernels = [k for k in art.timings if ".llvm.kernel " in k]
    assert any(k.startswith("evaluation.") for k in kernels) and len(art.objects) == len(kernels)
    assert all(" sc_" in k for k in kernels)

def test_modules_start_compiling_longest_first():
    """A part's modules go to the LLVM threads by their estimated cost
    (`native.compile_cost`), the longest first, so that no long module starts
    last and keeps the compile waiting on one thread; results keep the order
    the modules were added in."""
    from concurrent.futures import Future

    from structc import native
    from structc.compiler import Timings, _ModuleObjects
    started = []

    class Pool:     # the order of submission, each done at once
        def submit(self, fn, text):
            started.append(text)
            done = Future()
            done.set_result((text.encode(), {}))
            return done
    jobs = _ModuleObjects(native.host_target(), True, 2, False, Timings())
    jobs.close()
    jobs.pool = Pool()
    light = lower_module.LIGHT_CODE + "x" * 3000        # 3000 chars at the light pipeline's cost per char
    texts = [lower_module.VECTOR_CODE + "x" * 100, "; O3\n" + "x" * 1000, light, lower_module.ENTRY_CODE + "x" * 50]
    jobs.add(texts)
    assert [r[0] for r in jobs.results()] == [t.encode() for t in texts]
    costs = [native.compile_cost(t) for t in started]
    assert costs == sorted(costs, reverse=True) and started[0] == "; O3\n" + "x" * 1000

@pytest.mark.slow
def test_bench_compile_against_another_checkout(capsys):
    """`bench_compile.py --against PYTHON:CHECKOUT` times cold training compiles of
    both checkouts, alternated (here the same one twice): a row per model, with
    the collection each compile left behind."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    import bench_compile
    assert bench_compile.main(["--against", f"{sys.executable}:{root}", "--models", "perceptron", "--rounds", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| perceptron |")]
    assert len(rows) == 1 and re.fullmatch(r"\| perceptron \|( [\d.]+ / [\d.]+ \([\d.]+\) \|){2} [\d.]+ \| \d+ / \d+ \|",
                                           rows[0])

@pytest.mark.slow
def test_training_entries_compiled_in_the_background():
    net = structc.compile(MLP, cache=False, training="background")
    out = net(x=X)                  # the forward entry is ready at once
    assert np.isfinite(net.train_step(0.1, x=X, y=Y))    # waits for the thread if still compiling
    assert net.meta["deferred"] == ["update", "evaluation"] and out.shape == (4, 3)
    worker = [t for t in threading.enumerate() if t.name == "structc-compile-training"]
    for t in worker:
        t.join()
    with pytest.raises(ValueError, match="training must be"):
        structc.compile(MLP, training="later")


def test_a_compile_leaves_its_instructions_to_reference_counting():
    """Each kernel's llvmlite instructions are freed once its text is made, not
    left in cycles (block <-> instruction, a loop's branch and phi) for one
    collection of them all after the compile (`module.drop_body`)."""
    import gc
    from llvmlite import ir
    src = ("model T {\n  input t: forest of word(vocab=20)\n  target y: class[t.trees] of 3\n"
           "  param E: embedding(20, 8)\n  rec h(n) = leaf: E[n.word]\n"
           "             node: tanh(dense(concat(h(n.left), h(n.right)), 8))\n"
           "  loss cross_entropy(dense(h(t.root), 3), y)\n}\n")
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        art = api.compile_artifact(src, cache=False, parts=None)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = sum(isinstance(o, ir.instructions.Instruction) for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was:
            gc.enable()
    made = len(re.findall(r"^  (?:%\S+ = )?[a-z]", art.llvm_ir, re.M))     # instruction lines of every module
    assert made > 2000 and left < made // 20, (left, made)


@pytest.mark.slow
def test_recursion_over_trees_compiled_in_both_parts_at_once():
    """A tree body is an entry point of its own in each part's module (the kernel
    table spans the parts: one part must not call the other's body)."""
    src = ("model T {\n  input t: forest of word(vocab=20)\n  target y: class[t.trees] of 3\n"
           "  param E: embedding(20, 8)\n  rec h(n) = leaf: E[n.word]\n"
           "             node: tanh(dense(concat(h(n.left), h(n.right)), 8))\n"
           "  loss cross_entropy(dense(h(t.root), 3), y)\n}\n")
    net = structc.compile(src, cache=False, training=True)
    trees = ["(1 (2 3))", "(4 5)"]
    assert net(t=trees).shape == (2, 3) and np.isfinite(net.train_step(0.1, t=trees, y=np.array([0, 2])))


@pytest.mark.slow
@pytest.mark.skipif(not (os.environ.get("CC") or __import__("shutil").which("cc")), reason="needs a C compiler")
def test_cli_library_for_inference_only(tmp_path):
    src = tmp_path / "m.snet"
    src.write_text(MLP)
    done = subprocess.run([sys.executable, "-m", "structc", "compile", str(src), "-o", str(tmp_path / "m.so"),
                           "-H", str(tmp_path / "m.h"), "--inference"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "(forward) compiled" in done.stdout and "sc_train" not in (tmp_path / "m.h").read_text()
    net = structc.load(tmp_path / "m.so")
    np.testing.assert_allclose(net(x=X), structc.compile(MLP, cache=False)(x=X), rtol=1e-6)
    with pytest.raises(TypeError, match="inference only"):
        net.train_step(0.1, x=X, y=Y)


def test_no_training_part_without_a_loss():
    src = "model F { input x: f32[N, 3]\n output y = tanh(x) }"
    with pytest.raises(ValueError, match="has no training part"):
        api.compile_artifact(src, cache=False, parts=["training"])
    net = structc.compile(src, cache=False)
    assert net.meta["deferred"] == []
    with pytest.raises(TypeError, match="declares no loss"):
        net.train_step(0.1, x=np.ones((2, 3), np.float32))


def test_a_transpose_of_vector_blocks_is_not_unrolled():
    """O3 copied the 16x16 block loop of a transpose once per iteration
    (LeNet-5's weight-gradient transposes: 0.6 s of LLVM each); `unroll=False`
    keeps it a loop. The optimised IR's size says which it was (43 kB against 250 kB).
    Its blocks are explicit vector code, so its module gets the short pipeline."""
    from structc.native import host_target, optimized_ir
    src = "model T {\n  input x: f32[256, 120]\n  output y = transpose(x)\n}\n"
    art = compile_source(src)
    [text] = [t for t in art.part_ir if re.search(r'^define [^@]*@"sc_[0-9a-f]+_transpose"', t, re.M)]
    assert text.startswith(lower_module.VECTOR_CODE)
    assert "llvm.loop.unroll.disable" in text
    assert len(optimized_ir(text, host_target())) < 120_000
    x = np.arange(256 * 120, dtype=np.float32).reshape(256, 120)
    np.testing.assert_array_equal(structc.compile(src, cache=False)(x=x), x.T)


def test_loop_ids_are_distinct_per_chunk_and_kernels_still_shared():
    """Loop metadata is numbered per llvmlite module; a kernel's text must not
    depend on it (the training part calls the forward part's kernels of the
    same text), and each loop gets an ID of its own in its chunk."""
    text = lower_module._with_loop_ids("a !llvm.loop !no_unroll\nb !llvm.loop !no_unroll")
    assert "!1 = distinct !{!1, !0}" in text and "!2 = distinct !{!2, !0}" in text
    assert "a !llvm.loop !1" in text and "b !llvm.loop !2" in text


def test_repeated_layers_share_their_kernels():
    """Layers of the same shape and options are one kernel each (they read
    frames of their own, so their text does not name their buffers)."""
    layers = "".join("  h = dense(h, 16) |> relu\n" for _ in range(5))
    src = f"model R {{\n  input x: f32[N, 16]\n  h = x\n{layers}  output y = h\n}}\n"
    art = compile_source(src)
    asked = [name for name in art.kernel_symbols if name.startswith("sc_forward_matmul") and "_k0" not in name]
    assert len(asked) == 5 and len({art.kernel_symbols[n] for n in asked}) == 1
    net = structc.compile(src, cache=False)
    x = np.linspace(-1, 1, 48, dtype=np.float32).reshape(3, 16)
    h = x
    for k in range(5):
        h = np.maximum(h @ net.params[f"dense{k + 1}.w"] + net.params[f"dense{k + 1}.b"], 0)
    np.testing.assert_allclose(net(x=x), h, rtol=1e-5, atol=1e-6)


def _entry_block(source: str, entry: str = "sc_train") -> str:
    text = next(t for t in compile_source(source).part_ir if f'define i32 @"{entry}"' in t)
    fn = text[text.index(f'define i32 @"{entry}"'):]
    return fn[fn.index("entry:"):fn.index("body:")]


def test_an_entry_computes_each_task_count_once():
    """Each kernel call's task count and work come from the dims; repeated
    layers compute the same ones, made once in the entry block
    (`_NumberingBuilder`), and the work of identical calls is summed as one
    term times their count: the arithmetic other than the workspace offsets
    (an add per buffer) does not grow with the depth. Dense200's training
    entry was ~11k lines of it in one block, ~0.3 s of code generation."""
    counts = {}
    for depth in (10, 40):
        block = _entry_block(_deep(depth))
        rhs = [line.split(" = ", 1)[1] for line in block.splitlines() if " = " in line]
        assert len(rhs) == len(set(rhs))        # nothing computed twice
        counts[depth] = {op: sum(r.startswith(op + " ") for r in rhs) for op in ("mul", "icmp", "select", "sdiv")}
    assert counts[10] == counts[40] and counts[10]["icmp"] > 0
    x = np.linspace(-1, 1, 40, dtype=np.float32).reshape(5, 8)
    y = np.array([0, 1, 2, 3, 1])
    net = structc.compile(_deep(12), cache=False, training=True)
    before = {k: v.copy() for k, v in net.params.items()}
    loss = net.train_step(0.1, x=x, y=y)
    h = x
    for k in range(12):
        h = np.maximum(h @ before[f"dense{k + 1}.w"] + before[f"dense{k + 1}.b"], 0)
    z = h @ before["dense13.w"] + before["dense13.b"]
    z = z - z.max(1, keepdims=True)
    expected = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(5), y])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)

def test_the_garbage_collector_is_off_while_lowering_and_restored_after(monkeypatch):
    """Each generation-2 collection walks every llvmlite object the lowering
    made (half of a compile's Python time); the collector pauses for the
    compile and is on again after it, or stays off if the caller had it off."""
    import gc

    from structc import compiler
    seen = []
    real = compiler.lower_entry

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)
    monkeypatch.setattr(compiler, "lower_entry", spy)
    monkeypatch.setattr(compiler, "compile_objects", lambda texts, *a, **k: [(b"", {}) for _ in texts])
    assert gc.isenabled()
    compile_source(MLP)
    assert seen and not any(seen) and gc.isenabled()
    gc.disable()
    try:
        api.compile_artifact(MLP, cache=False)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_collector_comes_back_when_a_compile_fails():
    import gc
    with pytest.raises(structc.SnetError):
        compile_source("model M {\n  input x: f32[N, 6]\n  output y = nosuchlayer(x)\n}\n")
    assert gc.isenabled()


def test_matmul_micro_kernels_get_the_short_pipeline(cache_in, monkeypatch):
    """The micro-kernels and the matmul driver are explicit vector code: a
    module of them alone is marked (`VECTOR_CODE`) and optimised with the
    short pipeline, whose k loop is the one O3 makes, in about half the LLVM
    time; any other module keeps O3."""
    import re

    from structc import native
    src = ("model G {\n  input x: f32[13, 40]\n  output y = dense(x, 40) |> relu\n}\n")
    ran = []
    real = native._short_pipeline
    monkeypatch.setattr(native, "_short_pipeline", lambda: ran.append(1) or real())
    art = api.compile_artifact(src, parts=["forward"])
    marked = [t for t in art.part_ir if t.startswith(lower_module.VECTOR_CODE)]
    assert marked and len(ran) == len(marked) < len(art.part_ir)
    for text in art.part_ir:
        names = re.findall(r'^define [^@]*@"([^"]+)"', text, re.M)
        assert (text in marked) == all(n.startswith("sc_mk") or n.endswith("_matmul") for n in names)
    x = np.linspace(-1, 1, 13 * 40, dtype=np.float32).reshape(13, 40)
    net = structc.compile(src, cache=False)
    np.testing.assert_allclose(net(x=x), np.maximum(x @ net.params["dense1.w"] + net.params["dense1.b"], 0),
                               rtol=1e-5, atol=1e-5)


def test_constants_are_made_and_printed_once():
    """A vector constant's text is its lanes', formatted at every use unless the
    same object is used again (llvmlite keeps its text): one object per type and
    value, -0.0 apart from 0.0."""
    from llvmlite import ir

    from structc.lower.codegen import CG, F32, I64
    module = ir.Module()
    cg = CG(module, ir.Function(module, ir.FunctionType(ir.VoidType(), []), name="f"))
    v16 = ir.VectorType(F32, 16)
    assert cg.const(1.0, v16) is cg.const(1, v16) and cg.i64(3) is cg.i64(3)
    assert cg.const(-0.0, v16) is not cg.const(0.0, v16)
    assert str(cg.const(-0.0, F32)) == str(ir.Constant(F32, -0.0)) != str(cg.const(0.0, F32))
    assert str(cg.const(2.0, v16)) == str(ir.Constant(v16, [ir.Constant(F32, 2.0)] * 16))
    assert cg.splat(cg.i64(5), 4) is cg.splat(ir.Constant(I64, 5), 4)
    assert str(cg.splat(cg.i64(5), 4)) == "<4 x i64> <i64 5, i64 5, i64 5, i64 5>"


def test_llvm_starts_on_the_forward_part_while_the_training_part_is_lowered(monkeypatch):
    """With two threads, the forward part's modules go to LLVM as soon as their
    text is made: on two idle cores that work overlaps the training part's
    lowering in Python instead of waiting for it."""
    from structc import compiler
    monkeypatch.setenv("STRUCTC_COMPILE_THREADS", "2")
    started = threading.Event()
    seen = []
    real_compile, real_lower = compiler.compile_objects, compiler.lower_entry

    def compile_objects(texts, *args, **kwargs):
        started.set()
        return real_compile(texts, *args, **kwargs)

    def lower_entry(module, g, plan, symbols, name, *args, **kwargs):
        if name == "sc_train":
            seen.append(started.wait(timeout=5))
        return real_lower(module, g, plan, symbols, name, *args, **kwargs)
    monkeypatch.setattr(compiler, "compile_objects", compile_objects)
    monkeypatch.setattr(compiler, "lower_entry", lower_entry)
    art = compile_source(MLP)
    assert seen == [True] and art.meta["parts"] == ["forward", "training"]
    net = structc.Net(art.meta, structc.native.JitModule(art.object, structc.native.host_target()))
    np.testing.assert_array_equal(net(x=X), structc.compile(MLP, cache=False)(x=X))
