"""Compiled models as shipped artefacts: shared libraries, C use, loading
checks, the on-disk cache, threads and memory."""
import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import structc
from structc import api, cache, ship
from structc.cli import main
from structc.datasets import load_digits

ROOT = Path(__file__).parent.parent
MLP = ROOT / "examples" / "digits_mlp.snet"
CC = shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler to link a shared library")


def _build_library(d: Path, model: Path):
    """`model` as d/digits.so and d/digits.h (AVX2 level, so valgrind can run
    it), with its parameters built in."""
    net = structc.compile(model, seed=7)
    net.save_params(d / "p.npz")
    assert main(["compile", str(model), "-o", str(d / "digits.so"), "-H", str(d / "digits.h"),
                 "--params", str(d / "p.npz"), "--target-cpu", "x86-64-v3"]) == 0
    return d, net


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """The digits MLP as a shared library, with its header."""
    if CC is None:
        pytest.skip("no C compiler")
    return _build_library(tmp_path_factory.mktemp("ship"), MLP)


@pytest.mark.slow
@needs_cc
def test_load_in_a_fresh_process_without_source_or_compiler(library, tmp_path):
    d, net = library
    x = load_digits().x_test[:5]
    np.save(tmp_path / "x.npy", x)
    code = (
        "import numpy as np, structc, structc.api as api\n"
        f"net = structc.load({str(d / 'digits.so')!r})\n"
        f"np.save({str(tmp_path / 'p.npy')!r}, net(x=np.load({str(tmp_path / 'x.npy')!r})))\n"
        "assert api.COMPILE_COUNT == 0\n"
        "loss = net.train_step(x=np.load(" + repr(str(tmp_path / 'x.npy')) + "), y=np.arange(5), lr=0.1)\n"
        "assert np.isfinite(loss)\n")
    env = dict(os.environ, STRUCTC_CACHE_DIR=str(tmp_path / "empty-cache"))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), net(x=x), rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "empty-cache").exists() or not any((tmp_path / "empty-cache").iterdir())


@pytest.mark.slow
@needs_cc
def test_c_program_links_the_library_and_agrees_with_python(library, tmp_path):
    d, net = library
    exe = d / "digits_infer"
    # Linked with the example's own documented command, in the library's folder, ...
    source = ROOT / "examples" / "c" / "digits_infer.c"
    line = next(ln.lstrip(" *") for ln in source.read_text().splitlines() if ln.lstrip(" *").startswith("cc "))
    command = [CC] + [str(source) if w == "examples/c/digits_infer.c" else w for w in shlex.split(line)[1:]]
    subprocess.run(command + ["-std=c11"], check=True, cwd=d)
    x = load_digits().x_test[3]
    # ... and run from another folder: the program finds digits.so through its rpath.
    out = subprocess.run([str(exe)], input=" ".join(map(str, x)), capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    probs = np.array(out.stdout.split("\n")[0].split(), dtype=np.float64)
    np.testing.assert_allclose(probs, net(x=x[None])[0], rtol=1e-4, atol=1e-6)
    assert out.stdout.split("\n")[1] == f"digit {int(np.argmax(probs))}"


@pytest.mark.slow
@needs_cc
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed")
@pytest.mark.parametrize("model,batch", [("digits_mlp", 13), ("digits_cnn", 13), ("wide", 203)])
def test_native_code_is_clean_under_valgrind(model, batch, tmp_path, monkeypatch):
    """Every mode of the training entry and the forward pass on an odd batch
    (tails of every tile, convolution and pooling loop), under memcheck. The
    wide model's first layer copies B's one k block (K 64, N 784:
    `gemm.ONE_BLOCK_COPY`); its third is a product whose tasks copy B's k blocks to a
    thread's scratch (`gemm.WIDE_ROWS`: K 401 > KC, N 784 (3,136 bytes a row), 203
    rows) and run its panels in pairs (`gemm.PAIR_WIDTHS`, turned on for AVX2 here:
    49 panels of 16 columns, so an odd one too, and remainder rows); its second
    layer's input gradient dY @ W^T (W [784, 401]: k blocks of 384 and 17)
    copies them from W, transposing (`gemm._copy_transposed`), as does the output
    layer's (W [784, 10]: one k block, shorter than a vector). The wide model runs
    the last training mode (Adam) only: every mode runs the same forward and
    backward kernels, the digits models run every update, and under memcheck
    the wide model's four modes took 257 s on a Zen 4 (one: about a third). Its
    layers are 784 wide, the least over `WIDE_ROWS` with an odd count of 16-column
    panels: at 1,040 the one mode took 87 s, at 784 69 s. It had two more layers,
    784 -> 400 -> 784, whose products were those of 784 -> 401 -> 784 at a k block's
    16 rows, not 17, and whole panels only (no lines of `lower/` more were run to
    emit them): 65 s, 35 s without them."""
    source = ROOT / "examples" / f"{model}.snet"
    if model == "wide":
        import structc.lower.gemm as gemm
        from test_gemm import calls_of
        paired = calls_of(monkeypatch, gemm, "_pair_tiles")
        transposed = calls_of(monkeypatch, gemm, "_copy_transposed")
        monkeypatch.setattr(gemm, "PAIR_WIDTHS", (8, 16))
        monkeypatch.setenv("STRUCTC_NO_CACHE", "1")     # a cached text would not say which
        source = tmp_path / "wide.snet"
        source.write_text("model Wide { input x: f32[N, 64]\n target y: class[N] of 10\n"
                          " h = dense(x, 784) |> relu\n h = dense(h, 401) |> relu\n h = dense(h, 784) |> relu\n"
                          " loss cross_entropy(dense(h, 10), y) }\n")
    d, _ = _build_library(tmp_path, source)
    assert model != "wide" or (paired and transposed)
    exe = tmp_path / "driver"
    first_mode = 3 if model == "wide" else 0
    subprocess.run([CC, "-O1", "-std=c11", f"-DBATCH={batch}", f"-DFIRST_MODE={first_mode}", "-include", str(d / "digits.h"),
                    str(ROOT / "tests" / "c" / "train_driver.c"), str(d / "digits.so"), "-o", str(exe),
                    f"-Wl,-rpath,{d}"], check=True)
    result = subprocess.run(["valgrind", "-q", "--error-exitcode=99", "--track-origins=yes", str(exe)],
                            capture_output=True, text=True, env=dict(os.environ, STRUCTC_NUM_THREADS="2"))
    assert result.returncode == 0, result.stderr
    assert "mode 3 loss" in result.stdout


@pytest.mark.slow
@needs_cc
def test_header_declares_what_the_library_exports(library):
    d, _ = library
    header = (d / "digits.h").read_text()
    for symbol in ("sc_forward", "sc_forward_workspace", "sc_train", "sc_train_workspace", "sc_metadata",
                   "SC_PARAM_DENSE1_W", "SC_PARAM_SIZE"):
        assert symbol in header


@pytest.mark.slow
@needs_cc
def test_incompatible_library_is_refused(library, monkeypatch):
    d, _ = library
    from structc.compiler import ABI_VERSION
    monkeypatch.setattr(ship, "ABI_VERSION", 99)
    with pytest.raises(ship.ShipError, match=rf"built by structc .* \(ABI {ABI_VERSION}\); this is structc .* \(ABI 99\)"):
        structc.load(d / "digits.so")


@pytest.mark.slow
@needs_cc
def test_library_for_missing_cpu_features_is_refused(library, monkeypatch):
    d, _ = library
    monkeypatch.setattr(ship, "missing_features", lambda target: ["avx512fp16"])
    with pytest.raises(ship.ShipError, match="needs features this machine lacks: avx512fp16"):
        structc.load(d / "digits.so")


@pytest.mark.slow
@needs_cc
def test_generic_target_runs_everywhere(tmp_path):
    assert main(["compile", str(MLP), "-o", str(tmp_path / "g.so"), "--target-cpu", "generic"]) == 0
    net = structc.load(tmp_path / "g.so", seed=3)
    ref = structc.compile(MLP, seed=3)
    x = load_digits().x_test[:7]
    np.testing.assert_allclose(net(x=x), ref(x=x), rtol=1e-4, atol=1e-6)


@needs_cc
def test_output_never_writes_through_a_planted_temporary_name(tmp_path):
    """Issue 15: `-o DIR/model.so` wrote through a symlink at DIR/model.so.tmp."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for name in ("g.so.tmp", "g.h.tmp"):
        (tmp_path / name).symlink_to(victim)
    assert main(["compile", str(MLP), "-o", str(tmp_path / "g.so"), "-H", str(tmp_path / "g.h"),
                 "--target-cpu", "generic"]) == 0
    assert victim.read_text() == "precious"
    assert not (tmp_path / "g.so").is_symlink() and not (tmp_path / "g.h").is_symlink()
    assert (tmp_path / "g.so").stat().st_mode & 0o111, "a library keeps the linker's mode"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.h", "g.h.tmp", "g.so", "g.so.tmp", "victim"]
    assert structc.load(tmp_path / "g.so").name == "DigitsMLP"


@needs_cc
def test_library_from_a_cached_artifact(tmp_path, monkeypatch):
    """`compile_artifact(jit=False)` (what `structc compile -o` can use) hits
    the cache the second time and still links a working library."""
    monkeypatch.setenv("STRUCTC_CACHE_DIR", str(tmp_path / "cache"))
    src = "model C { input x: f32[N, 3]\n output y = tanh(x) * 2 }"
    api.compile_artifact(src, jit=False)
    before = api.COMPILE_COUNT
    art = api.compile_artifact(src, jit=False)
    assert api.COMPILE_COUNT == before and not art.llvm_ir
    ship.write_shared_library(art, tmp_path / "c.so")
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(structc.load(tmp_path / "c.so")(x=x), 2 * np.tanh(x), rtol=1e-6)
    api.compile_artifact(src)
    jit_hit = api.compile_artifact(src)          # in-process code, without its LLVM IR
    with pytest.raises(ship.ShipError, match="position-independent"):
        ship.write_shared_library(jit_hit, tmp_path / "d.so")


def test_not_a_model_library(tmp_path):
    (tmp_path / "junk.so").write_bytes(b"\x7fELF garbage")
    with pytest.raises(ship.ShipError, match="not a structc model library"):
        structc.load(tmp_path / "junk.so")


def test_unknown_target_cpu(capsys):
    assert main(["compile", str(MLP), "--target-cpu", "pentium2"]) == 1
    assert "unknown target CPU 'pentium2'" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete_key"])
def test_damaged_cache_entry_is_rebuilt(damage, tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTC_CACHE_DIR", str(tmp_path))
    src = "model C { input x: f32[N, 3]\n output y = tanh(x) * 2 }"
    structc.compile(src)
    entry = next(tmp_path.glob("*.entry"))
    expect = pytest.warns(cache.CacheWarning, match="failed its integrity check")
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:100])
    elif damage == "garbage":
        entry.write_bytes(os.urandom(entry.stat().st_size))
    else:
        (tmp_path / "key").unlink()     # a new secret: every old entry is rebuilt
        expect = contextlib.nullcontext()
    before = api.COMPILE_COUNT
    with expect:
        net = structc.compile(src)
    assert api.COMPILE_COUNT == before + 1
    np.testing.assert_allclose(net(x=np.ones((1, 3), np.float32)), 2 * np.tanh(np.ones((1, 3))), rtol=1e-6)
    assert cache.load(entry.stem) is not None


@pytest.mark.slow
def test_two_processes_compiling_at_once_both_succeed(tmp_path):
    code = ("import numpy as np, structc\n"
            "net = structc.compile('model P { input x: f32[N, 5]\\n output y = sigmoid(x) + 1 }')\n"
            "assert abs(float(net(x=np.zeros((2, 5), np.float32))[0, 0]) - 1.5) < 1e-6\n")
    env = dict(os.environ, STRUCTC_CACHE_DIR=str(tmp_path))
    # cwd away from the checkout: `python -c` puts the cwd first on sys.path, and the
    # source tree's structc/ has no built _runtime (the installed package does).
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path) for _ in range(3)]
    assert [p.wait() for p in procs] == [0, 0, 0]
    assert len(list(tmp_path.glob("*.entry"))) == 1 and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_threads_calling_two_instances_get_correct_results():
    src = ("model T { input x: f32[N, 50]\n target y: class[N] of 4\n"
           " loss cross_entropy(dense(dense(x, 64) |> relu, 4), y) }")
    nets = [structc.compile(src, seed=s) for s in (1, 2)]
    x = np.random.default_rng(0).normal(size=(200, 50)).astype(np.float32)
    expected = [n(x=x) for n in nets]
    errors = []
    raised = []
    done = []

    def hammer(k):
        # a thread's exception only warns: record it, and count the calls that returned
        try:
            for _ in range(200):
                if not np.allclose(nets[k](x=x), expected[k], rtol=1e-6):
                    errors.append(k)
                done.append(k)
        except BaseException as e:
            raised.append(repr(e))
    threads = [threading.Thread(target=hammer, args=(k,)) for k in (0, 1, 0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not raised, raised[:3]
    assert len(done) == 4 * 200
    assert not errors


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_many_calls_do_not_grow_memory():
    net = structc.compile("model M { input x: f32[N, 8]\n target y: class[N] of 3\n"
                          " loss cross_entropy(dense(x, 3), y) }")
    x, y = np.ones((4, 8), np.float32), np.array([0, 1, 2, 0])
    for _ in range(2000):
        net(x=x)
        net.train_step(x=x, y=y, lr=0.01)
    before = rss_kib()
    for _ in range(50_000):
        net(x=x)
        net.train_step(x=x, y=y, lr=0.01)
    assert rss_kib() - before < 2048, "resident memory grew by more than 2 MiB over 100,000 calls"


@needs_cc
def test_a_shipped_library_flushes_subnormal_results_too(tmp_path):
    """The library carries its own copy of the runtime: its entries flush results
    below float32's smallest normal number to 0 as the JIT's do, and leave the
    caller's numpy as it was."""
    src = tmp_path / "half.snet"
    src.write_text("model Half { input x: f32[N]\n output y = x * 0.5 }\n")
    assert main(["compile", str(src), "-o", str(tmp_path / "half.so"), "--target-cpu", "x86-64-v3"]) == 0
    net = structc.load(tmp_path / "half.so")
    tiny = np.float32(2e-38)
    np.testing.assert_array_equal(net(x=np.full(4, tiny, np.float32)), 0.0)
    np.testing.assert_array_equal(net(x=np.array([4 * tiny], np.float32)), [2 * tiny])
    assert tiny * np.float32(0.5) > 0, "the flush leaked into the caller's numpy"


SMALL = "model S { input x: f32[N, 3]\n target y: class[N] of 2\n loss cross_entropy(dense(x, 2), y) }\n"


@pytest.mark.parametrize("change,message", [
    (lambda p: p.update(other=np.ones(3)), r"unexpected \['other'\]"),      # another model's file
    (lambda p: p.pop("dense1.b"), r"missing \['dense1.b'\]"),
    (lambda p: p["dense1.w"].__setitem__((0, 0), np.nan), "not finite"),
    (lambda p: p.update({"dense1.w": p["dense1.w"] * 1e300}), "not finite"),   # float64 beyond float32
    (lambda p: p.update({"dense1.w": p["dense1.w"] * (1 + 1j)}), "complex"),
])
def test_params_that_do_not_fit_are_refused(change, message, tmp_path, capsys):
    """`--params` was held to less than `load_params`: another model's file with extra
    names, NaN, infinity (float64 overflowing float32) and complex values were built in."""
    src = tmp_path / "s.snet"
    src.write_text(SMALL)
    params = {k: np.array(v, np.float64) for k, v in structc.compile(SMALL).params.items()}
    change(params)
    np.savez(tmp_path / "p.npz", **params)
    assert main(["compile", str(src), "-o", str(tmp_path / "s.so"), "--params", str(tmp_path / "p.npz")]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "s.so").exists()
    art = api.compile_artifact(SMALL, jit=False)
    with pytest.raises(ship.ShipError, match=message):
        ship.write_shared_library(art, tmp_path / "s.so", params=params)


@pytest.mark.parametrize("content", [b"PK\x03\x04 truncated", None])
def test_params_that_are_not_an_archive_are_a_clear_error(content, tmp_path, capsys):
    """A damaged .npz ended in zipfile's traceback, a bare .npy in 'does not support
    the context manager protocol'."""
    src = tmp_path / "s.snet"
    src.write_text(SMALL)
    path = tmp_path / "p.npz"
    if content is None:
        path = tmp_path / "p.npy"
        np.save(path, np.zeros(3))
    else:
        path.write_bytes(content)
    assert main(["compile", str(src), "-o", str(tmp_path / "s.so"), "--params", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"cannot read parameters: {path}" in err and ("bare array" in err or "not a parameter file" in err), err


def test_params_without_a_library_are_refused(tmp_path, capsys):
    """`compile m.snet --params p.npz` without -o compiled into the cache and dropped them."""
    src = tmp_path / "s.snet"
    src.write_text(SMALL)
    structc.compile(SMALL).save_params(tmp_path / "p.npz")
    assert main(["compile", str(src), "--params", str(tmp_path / "p.npz")]) == 1
    assert "--params needs -o/--output" in capsys.readouterr().err


@pytest.mark.parametrize("flags,said", [(["-o", "s.so", "-H", "s.so"], "-H and -o name the same file"),
                                        (["-o", "p.npz", "--params", "p.npz"], "--params and -o name the same"),
                                        (["-o", "s.snet"], "the source and -o name the same file")])
def test_one_file_named_twice_is_refused_before_anything_is_written(flags, said, tmp_path, capsys, monkeypatch):
    """`-o s.so -H s.so` wrote the header over the library (or the library over its
    parameters, or its source), with no error."""
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "s.snet"
    src.write_text(SMALL)
    structc.compile(SMALL).save_params(tmp_path / "p.npz")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(["compile", "s.snet", *flags]) == 1
    assert said in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@needs_cc
@pytest.mark.parametrize("cpu", ["generic", "x86-64-v2"])
def test_four_columns_compile_for_four_lane_targets(cpu, tmp_path):
    """A product with 4 output columns (a `dense(h, 4)`) failed to compile for SSE
    targets ("vector1 needs to be of VectorType"): the narrow kernel's vectors along k
    held a single k there. The library's outputs and a training step agree with the
    host's compile."""
    src = tmp_path / "four.snet"
    src.write_text("model Four { input x: f32[N, 7]\n target y: class[N] of 4\n"
                   " h = dense(x, 4) |> tanh\n loss cross_entropy(dense(h, 4), y) }\n")
    assert main(["compile", str(src), "-o", str(tmp_path / "f.so"), "--target-cpu", cpu]) == 0
    net, ref = structc.load(tmp_path / "f.so", seed=3), structc.compile(src, seed=3)
    x = np.random.default_rng(0).normal(size=(11, 7)).astype(np.float32)
    y = np.arange(11) % 4
    np.testing.assert_allclose(net(x=x), ref(x=x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.train_step(x=x, y=y, lr=0.1), ref.train_step(x=x, y=y, lr=0.1), rtol=1e-5)
    for name in ref.params:
        np.testing.assert_allclose(net.params[name], ref.params[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("second, clash", [("w", "parameter 'W'"), ("size", "SC_PARAM_SIZE")])
def test_parameters_the_header_would_name_alike_are_refused(second, clash, tmp_path, capsys):
    """`W` and `w` were both `#define SC_PARAM_W` (C keeps the last, with only a warning: the
    offset of the other parameter), and a parameter `size` redefined SC_PARAM_SIZE, the
    arena's length. Nothing is written."""
    src = tmp_path / "c.snet"
    src.write_text(f"model C {{ input x: f32[N, 3]\n param W: f32[3, 2] = normal(1.0)\n"
                   f" param {second}: f32[3, 2] = normal(1.0)\n output y = x @ W - x @ {second} }}\n")
    assert main(["compile", str(src), "-o", str(tmp_path / "c.so"), "-H", str(tmp_path / "c.h")]) == 1
    err = capsys.readouterr().err
    assert f"SC_PARAM_{second.upper()}" in err and clash in err and f"'{second}'" in err, err
    assert not (tmp_path / "c.so").exists() and not (tmp_path / "c.h").exists()


def test_header_says_which_entries_write_hyper():
    """sc_train and sc_update write the clip scale into `hyper` (every call), yet the
    header declared `const float *hyper`: a C program passing a `static const` array
    compiled without a warning and crashed writing read-only memory."""
    meta = api.compile_artifact(SMALL, jit=False, parts=["forward", "training", "update"]).meta
    found = re.findall(r"int32_t (\w+)\(float \*params[^;]*?(const )?float \*hyper", ship.header_text(meta))
    assert dict(found) == {"sc_forward": "const ", "sc_train": "", "sc_update": ""}, found


def test_header_of_a_dropout_model_declares_the_wrapper_writable():
    meta = api.compile_artifact("model D { input x: f32[N, 3]\n target y: class[N] of 2\n"
                                " loss cross_entropy(dense(dropout(x, 0.5), 2), y) }", jit=False,
                                parts=["forward", "training", "update"]).meta
    meta = dict(meta, entries=dict(meta["entries"], train=dict(meta["entries"]["train"], symbol=ship.RAW_TRAIN)))
    text = ship.header_text(meta)
    for name in ("sc_train", ship.RAW_TRAIN, "sc_update"):
        (decl,) = [d for d in text.split(";") if f"int32_t {name}(" in d]
        assert "const float *hyper" not in decl and "float *hyper" in decl, decl


@needs_cc
def test_a_truncated_library_is_refused_not_a_crash(tmp_path):
    """A library cut short (a copy interrupted, a full disk) was opened as it was: the
    process died of SIGBUS when the loader touched the missing pages, or it loaded
    whatever was left. In a child process, so a regression cannot take pytest down."""
    src = tmp_path / "s.snet"
    src.write_text(SMALL)
    assert main(["compile", str(src), "-o", str(tmp_path / "s.so"), "--inference", "--target-cpu", "generic"]) == 0
    data = (tmp_path / "s.so").read_bytes()
    code = ("import sys, structc\nfrom structc.ship import ShipError\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n        structc.load(path)\n    except ShipError as e:\n        print(e)\n")
    paths = []
    for size in (100, len(data) // 3, len(data) - 1):
        paths.append(tmp_path / f"cut{size}.so")
        paths[-1].write_bytes(data[:size])
    out = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and all("is truncated" in line and "rebuild it or copy it again" in line
                                   for line in lines), out.stdout
    assert structc.load(tmp_path / "s.so").name == "S"


def test_header_gives_each_inputs_element_type_and_shape():
    """The header gave the outputs' types but only the inputs' names: nothing told a C
    caller that labels are int32 (PyTorch's and many C programs' are int64, read here
    as pairs of garbage labels) nor what range they must be in."""
    meta = api.compile_artifact(SMALL, jit=False, parts=["forward", "training"]).meta
    text = ship.header_text(meta)
    assert "sc_forward: inputs, in order: x f32[N, 3]; outputs:" in text
    assert "sc_train: inputs, in order: x f32[N, 3], y i32[N] (values 0 to 1); outputs:" in text


WORD_TREES = """model Words {
  input t: forest(arity=2) of word(vocab=4)
  param E: embedding(4, 3) = normal(0.5)
  rec h(n) = leaf: E[n.word]
             node: tanh(dense(concat(h(n.children)), 3))
  output o = h(t.root)
}"""


@needs_cc
def test_a_library_carries_the_words_of_its_parameters(tmp_path, capsys):
    """The numbering beside --params (NAME.numbering.json) stayed behind: structc.load gave
    a net without net.vocab, so the trained words could not be passed as strings."""
    from structc.forest import Vocab
    from structc.train import save_numbering
    src = tmp_path / "w.snet"
    src.write_text(WORD_TREES)
    net = structc.compile(WORD_TREES, seed=3)
    net.save_params(tmp_path / "p.npz")
    save_numbering(net, tmp_path / "p.npz", Vocab.build(["good", "bad", "film"], unk="<unk>").numbering())
    assert main(["compile", str(src), "-o", str(tmp_path / "w.so"), "--params", str(tmp_path / "p.npz")]) == 0
    shipped = structc.load(tmp_path / "w.so")
    assert shipped.vocab == {"good": 0, "bad": 1, "film": 2, "<unk>": 3} and shipped.vocab.unk == 3
    assert shipped.numbering == {"words": ["good", "bad", "film", "<unk>"], "unk": 3}
    np.testing.assert_array_equal(shipped(t="(good (bad awful))"), net(t=structc.Forest.from_tuples([(0, (1, 3))])))
    assert main(["compile", str(src), "-o", str(tmp_path / "bare.so")]) == 0       # no parameters: no words
    bare = structc.load(tmp_path / "bare.so")
    assert bare.vocab is None and bare.numbering is None
    with pytest.raises(ValueError, match="no vocabulary was given"):
        bare(t="(good bad)")
