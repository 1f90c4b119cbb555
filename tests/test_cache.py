"""The on-disk cache: integrity of metadata and code together, no foreign
code (other users, planted or edited entries), the canonical-program key."""
import contextlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest

import structc
from structc import api, cache
from structc.compiler import cache_key, canonical_program
from structc.native import host_target
from structc.syntax import parse

SRC = "model C { input x: f32[N, 3]\n output y = tanh(x) * 2 }"
OTHER = "model C { input x: f32[N, 3]\n output y = sigmoid(x) + 5 }"
MLP = ("model M {\n  input x: f32[N, 4]\n  target y: class[N] of 3\n"
       "  h = dense(x, 8) |> relu\n  loss cross_entropy(dense(h, 3), y)\n}\n")
ANOTHER_UID = 54321    # no file here belongs to it


@pytest.fixture
def cache_in(tmp_path, monkeypatch):
    """A fresh cache folder of the test's own (not created yet)."""
    d = tmp_path / "cache"
    monkeypatch.setenv("STRUCTC_CACHE_DIR", str(d))
    return d


def _compiles(source, **kw) -> int:
    """How many LLVM compilations `structc.compile(source)` took (0: a hit)."""
    before = api.COMPILE_COUNT
    net = structc.compile(source, **kw)
    if "tanh" in source:
        x = np.ones((2, 3), np.float32)
        np.testing.assert_allclose(net(x=x), 2 * np.tanh(x), rtol=1e-6)
    return api.COMPILE_COUNT - before


def _entry(d: Path) -> Path:
    (entry,) = d.glob("*.entry")
    return entry


def _rewrite(path: Path, data: bytes) -> None:
    """Change an entry's bytes in place (keeping its owner and mode)."""
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# -- integrity: metadata and object together ---------------------------------

def test_entries_are_private_and_hit(cache_in):
    assert _compiles(SRC) == 1
    assert _compiles(SRC) == 0
    assert _mode(cache_in) == 0o700
    assert _mode(_entry(cache_in)) == 0o600 and _mode(cache_in / "key") == 0o600
    (alias,) = cache_in.glob("*.alias")        # the source text's canonical program: no parse on a hit
    objects = [p.name for p in cache_in.glob("*.object")]       # each LLVM module's code, by its text
    assert objects and all(_mode(cache_in / name) == 0o600 for name in objects)
    parser = [p.name for p in cache_in.glob("*.parser")]      # lark's tables, if this process built them here
    assert all(_mode(cache_in / name) == 0o600 for name in parser)
    lowered = [p.name for p in cache_in.glob("*.lowered")]      # each kernel's text, by what determines it
    assert lowered and all(_mode(cache_in / name) == 0o600 for name in lowered)
    assert sorted(p.name for p in cache_in.iterdir()) == sorted([_entry(cache_in).name, alias.name, "key", *objects,
                                                                 *parser, *lowered])


def test_edited_metadata_is_rebuilt_not_run(cache_in):
    """Issue 15: one shape changed in the metadata made a later call segfault."""
    _compiles(SRC)
    entry = _entry(cache_in)
    data = entry.read_bytes()
    assert b'"shape": ["N", 3]' in data
    _rewrite(entry, data.replace(b'"shape": ["N", 3]', b'"shape": ["N", 1]'))
    with pytest.warns(cache.CacheWarning, match="failed its integrity check"):
        assert _compiles(SRC) == 1
    net = structc.compile(SRC)          # the rebuilt entry is whole again
    x = np.ones((100_000, 3), np.float32)
    np.testing.assert_allclose(net(x=x), 2 * np.tanh(x), rtol=1e-6)


def test_edited_object_is_rebuilt(cache_in):
    _compiles(SRC)
    entry = _entry(cache_in)
    data = bytearray(entry.read_bytes())
    data[-200] ^= 0xFF
    _rewrite(entry, bytes(data))
    with pytest.warns(cache.CacheWarning, match="failed its integrity check"):
        assert _compiles(SRC) == 1


def test_another_models_entry_does_not_load_as_this_one(cache_in):
    _compiles(SRC)
    this = _entry(cache_in)
    this.rename(cache_in / "this.keep")
    _compiles(OTHER)
    other = _entry(cache_in)
    os.replace(other, cache_in / this.name)          # the other model's entry, under this key
    with pytest.warns(cache.CacheWarning, match="failed its integrity check"):
        assert _compiles(SRC) == 1


def test_entry_records_its_model(cache_in):
    _compiles(SRC)
    key = _entry(cache_in).stem
    assert cache.load(key, "C") is not None
    assert cache.load(key, "D") is None


def _forge(d: Path, key: str, meta: dict, obj: bytes, secret: bytes) -> None:
    """An entry in the cache's format, MAC'd with `secret`."""
    meta_bytes = json.dumps(dict(meta, cache_key=key)).encode()
    payload = len(meta_bytes).to_bytes(8, "little") + meta_bytes + obj
    path = d / f"{key}.entry"
    path.write_bytes(cache.MAGIC + cache._mac(secret, key, payload) + payload)
    path.chmod(0o600)


def test_planted_code_with_consistent_metadata_does_not_run(cache_in):
    """Foreign code (here another model's object and its own metadata) in a
    well-formed entry: without this user's secret its MAC cannot be made."""
    _compiles(OTHER)
    foreign_meta, foreign_obj = cache.load(_entry(cache_in).stem)
    _compiles(SRC)
    key = cache_key(parse(SRC), None, host_target(), {"jit": True})
    _forge(cache_in, key, foreign_meta, foreign_obj, os.urandom(32))
    with pytest.warns(cache.CacheWarning, match="failed its integrity check"):
        assert _compiles(SRC) == 1
    # The same forgery with the right secret would load: the check is what refused it.
    _forge(cache_in, key, foreign_meta, foreign_obj, (cache_in / "key").read_bytes())
    assert cache.load(key)[1] == foreign_obj


def test_old_format_entries_are_ignored(cache_in):
    _compiles(SRC)
    key = _entry(cache_in).stem
    meta, obj = cache.load(key)
    (cache_in / f"{key}.entry").write_bytes(json.dumps(meta).encode() + obj)
    (cache_in / f"{key}.entry").chmod(0o600)
    with pytest.warns(cache.CacheWarning):
        assert _compiles(SRC) == 1


def test_keys_are_checked_before_use_as_names(cache_in):
    with pytest.raises(ValueError, match="not a cache key"):
        cache.load("../../etc/passwd")


# -- no foreign code: owners and modes ------------------------------------------

def test_group_writable_folder_is_refused(cache_in):
    cache_in.mkdir(mode=0o700)
    cache_in.chmod(0o777)
    with pytest.warns(cache.CacheWarning, match=r"can be written by group or others \(mode 0777\)"):
        assert _compiles(SRC) == 1
    assert not any(cache_in.iterdir()), "nothing is written into a refused folder"
    assert _compiles(SRC) == 1         # nothing read from it either (warned once a process)


def test_folder_of_another_user_is_refused(cache_in):
    cache_in.mkdir(mode=0o700)
    os.chown(cache_in, ANOTHER_UID, -1)
    with pytest.warns(cache.CacheWarning, match=f"belongs to uid {ANOTHER_UID}, not to you"):
        assert _compiles(SRC) == 1
    assert not any(cache_in.iterdir())


@pytest.mark.parametrize("change", ["owner", "mode"])
def test_entry_of_another_user_or_writable_by_others_is_refused(change, cache_in):
    """As root we could read any file: the check must refuse it all the same."""
    _compiles(SRC)
    entry = _entry(cache_in)
    if change == "owner":
        os.chown(entry, ANOTHER_UID, -1)
        expected = f"belongs to uid {ANOTHER_UID}"
    else:
        entry.chmod(0o666)
        expected = r"can be written by group or others \(mode 0666\)"
    with pytest.warns(cache.CacheWarning, match=expected):
        assert _compiles(SRC) == 1
    assert entry.stat().st_uid == os.geteuid() and _mode(entry) == 0o600   # replaced by our own
    assert _compiles(SRC) == 0


def test_secret_readable_by_others_is_refused(cache_in):
    _compiles(SRC)
    (cache_in / "key").chmod(0o644)
    with pytest.warns(cache.CacheWarning, match=r"cache key .* can be read or written by group or others .*delete it"):
        assert _compiles(SRC) == 1


def test_entry_that_is_not_a_regular_file_is_refused(cache_in):
    _compiles(SRC)
    entry = _entry(cache_in)
    entry.unlink()
    os.mkfifo(entry, 0o600)         # would block a plain open() for ever
    with pytest.warns(cache.CacheWarning, match="is not a regular file"):
        assert _compiles(SRC) == 1
    assert entry.is_file()


def test_symlinked_entry_is_refused(cache_in, tmp_path):
    _compiles(SRC)
    entry = _entry(cache_in)
    elsewhere = tmp_path / "elsewhere"
    shutil.copyfile(entry, elsewhere)
    entry.unlink()
    entry.symlink_to(elsewhere)
    with pytest.warns(cache.CacheWarning, match="is a symbolic link"):
        assert _compiles(SRC) == 1
    assert not entry.is_symlink()


def test_no_cache_when_disabled(cache_in, monkeypatch):
    assert _compiles(SRC, cache=False) == 1
    assert not cache_in.exists()
    monkeypatch.setenv("STRUCTC_NO_CACHE", "1")
    assert _compiles(SRC) == 1
    assert not cache_in.exists()


# -- as another (non-root) user ----------------------------------------------

@pytest.fixture
def other_user():
    """(uid, gid) of a throwaway user. The interpreter lives in root's private
    home, so the other user cannot exec it: tests fork and drop privileges
    instead. Without useradd, a uid no account has does as well."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    name = f"sctest{os.getpid() % 100000}"
    made = shutil.which("useradd") and subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True).returncode == 0
    if made:
        import pwd
        entry = pwd.getpwnam(name)
        yield entry.pw_uid, entry.pw_gid
        subprocess.run(["userdel", name], capture_output=True)
    else:
        yield ANOTHER_UID, ANOTHER_UID


def _as_user(uid: int, gid: int, job) -> str:
    """Run `job()` (returning text) in a forked child as `uid`; its result."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: never return into pytest
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            result = "ok " + job()
        except BaseException:
            result = "failed " + traceback.format_exc()
        with contextlib.suppress(BaseException):
            os.write(write, result.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        result = f.read().decode()
    os.waitpid(pid, 0)
    assert result.startswith("ok "), result
    return result[3:]


@pytest.fixture
def shared():
    """A world-writable sticky folder (like /tmp) that the other user can
    reach (pytest's tmp_path is under a folder private to root); removed after."""
    with tempfile.TemporaryDirectory(prefix="structc-test-shared-") as base:
        d = Path(base)
        d.chmod(0o1777)
        for p in (d, *d.parents):
            p.stat().st_mode & 0o001 or pytest.skip(f"another user cannot reach {d} (through {p})")
        yield d


def _compile_and_report(folder: Path):
    def job():
        os.environ["STRUCTC_CACHE_DIR"] = str(folder)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            before = api.COMPILE_COUNT
            api.compile_artifact(SRC)
            api.compile_artifact(SRC)
        return json.dumps({"compiles": api.COMPILE_COUNT - before,
                           "warnings": [str(w.message) for w in caught]})
    return job


def test_other_user_gets_a_private_cache_that_root_refuses(other_user, shared, monkeypatch):
    uid, gid = other_user
    folder = shared / "theirs"
    report = json.loads(_as_user(uid, gid, _compile_and_report(folder)))
    assert report == {"compiles": 1, "warnings": []}
    assert folder.stat().st_uid == uid and _mode(folder) == 0o700
    for p in folder.iterdir():
        assert p.stat().st_uid == uid and _mode(p) == 0o600
    # Root could read their entries, but they are another user's: refused.
    monkeypatch.setenv("STRUCTC_CACHE_DIR", str(folder))
    with pytest.warns(cache.CacheWarning, match=f"belongs to uid {uid}, not to you"):
        assert _compiles(SRC) == 1


def test_other_user_refuses_a_folder_it_does_not_own(other_user, shared):
    uid, gid = other_user
    mine = shared / "mine"
    mine.mkdir(mode=0o755)
    report = json.loads(_as_user(uid, gid, _compile_and_report(mine)))
    assert report["compiles"] == 2
    assert any(f"belongs to uid {os.geteuid()}, not to you (uid {uid})" in w for w in report["warnings"])
    assert not any(mine.iterdir())


def test_other_user_refuses_an_unreadable_folder_of_root(other_user, shared):
    uid, gid = other_user
    private = shared / "private"
    private.mkdir(mode=0o700)
    report = json.loads(_as_user(uid, gid, _compile_and_report(private)))
    assert report["compiles"] == 2
    assert any("belongs to uid 0" in w for w in report["warnings"])


# -- the key: the canonical program -------------------------------------------

def _key(source, model=None, **options):
    return cache_key(parse(source), model, host_target(), options or {"jit": True})


def test_comments_and_layout_do_not_change_the_key():
    reformatted = ("# a comment\nmodel M {\n\n  input x:f32[N,4]   # features\n"
                   "  target   y: class[N] of 3\n  h = dense(x,8)|>relu\n"
                   "  loss cross_entropy( dense(h, 3), y )  # loss\n}")
    assert _key(reformatted) == _key(MLP)
    assert canonical_program(parse(reformatted)) == canonical_program(parse(MLP))


def test_the_spans_of_a_recursions_state_names_do_not_change_the_key():
    """`rec (h, c)(t)` keeps a span per state name in a tuple: a line added above
    must not make the model look edited (its digest is checked on resume and export)."""
    src = ("model M { input s: sequence of f32[3]\n rec (h, c)(t) = init: (zeros(3), zeros(3))\n"
           " next: lstm_cell(t.x, h(t.prev), c(t.prev), 3)\n output o = h(s.last) }")
    moved = src.replace(" rec (h, c)", "\n# a comment\n rec  (h,c)")
    assert canonical_program(parse(moved)) == canonical_program(parse(src))
    assert canonical_program(parse(src.replace("(h, c)", "(h, k)").replace("c(t.prev)", "k(t.prev)"))) \
        != canonical_program(parse(src))


@pytest.mark.parametrize("old, new", [
    ("dense(x, 8)", "dense(x, 9)"),                  # a number
    ("f32[N, 4]", "f32[B, 4]"),                      # a symbol
    ("h = dense(x, 8) |> relu\n  loss cross_entropy(dense(h, 3), y)",
     "g = dense(x, 8) |> relu\n  loss cross_entropy(dense(g, 3), y)"),   # a name
    ("|> relu", "|> tanh"),                          # a function
    ("dense(x, 8)", "dense(x, 8, bias=false)"),      # an option
    ("model M", "model N"),                          # the model's name
])
def test_any_change_of_meaning_changes_the_key(old, new):
    assert old in MLP
    assert _key(MLP.replace(old, new)) != _key(MLP)


def test_integer_and_float_literals_differ():
    assert _key(SRC) != _key(SRC.replace("* 2", "* 2.0"))


def test_key_covers_model_options_target_compiler_and_llvm(monkeypatch):
    from structc import compiler
    from structc.native import named_target
    base = _key(MLP)
    assert _key(MLP, "M") != base
    assert _key(MLP, jit=False) != base
    assert cache_key(parse(MLP), None, named_target("generic"), {"jit": True}) != base
    monkeypatch.setattr(compiler, "_toolchain", lambda: "llvmlite 0.0, LLVM 0")
    assert _key(MLP) != base
    monkeypatch.undo()
    monkeypatch.setattr(compiler, "compiler_fingerprint", lambda: "0.0+0")
    assert _key(MLP) != base


def test_deep_expressions_are_keyed_without_recursion():
    """The parser's depth may grow (issue 15); the key must not be the limit."""
    program = parse("model D { input x: f32[N, 1]\n output y = " + "x+" * 200 + "x }")
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + 40)    # far less than the expression's depth
    try:
        text = canonical_program(program)
    finally:
        sys.setrecursionlimit(limit)
    assert text.count("(BinOp") == 200


def test_a_comment_change_is_a_cache_hit(cache_in):
    assert _compiles(SRC) == 1
    assert _compiles("# the same model, commented\n" + SRC.replace("\n", "   # twice\n\n")) == 0


def test_a_hit_reports_its_own_file(cache_in, tmp_path):
    a, b = tmp_path / "a.snet", tmp_path / "b.snet"
    a.write_text(SRC)
    b.write_text("# b\n" + SRC)
    assert api.compile_artifact(a.read_text(), str(a)).meta["file"] == str(a)
    art = api.compile_artifact(b.read_text(), str(b))
    assert art.meta["file"] == str(b) and not art.llvm_ir    # a hit


def test_compile_artifact_shares_the_cache_with_structc_compile(cache_in):
    before = api.COMPILE_COUNT
    art = api.compile_artifact(SRC)
    structc.compile(SRC)
    assert api.COMPILE_COUNT == before + 1
    pic = api.compile_artifact(SRC, jit=False)      # a library's code is another entry
    assert api.COMPILE_COUNT == before + 2 and not pic.jit and pic.object != art.object
    assert api.compile_artifact(SRC, jit=False).object == pic.object
    assert api.COMPILE_COUNT == before + 2


# -- kernels cached by their own content (issue 14 item 4) ---------------------

DEEP = ("model D {\n  input x: f32[N, 4]\n  target y: class[N] of 3\n"
        "  h = dense(x, 8) |> relu\n  h = dense(h, WIDTH) |> relu\n  loss cross_entropy(dense(h, 3), y)\n}\n")
XD = np.linspace(-1, 1, 20, dtype=np.float32).reshape(5, 4)
YD = np.array([0, 1, 2, 1, 0])


def _modules(fn) -> int:
    """How many LLVM modules `fn()` optimised and code-generated."""
    from structc import compiler
    before = compiler.MODULE_COUNT
    fn()
    return compiler.MODULE_COUNT - before


def _same_as_cold(net, source):
    cold = structc.compile(source, cache=False, training=True)
    np.testing.assert_array_equal(net(x=XD), cold(x=XD))
    assert [net.train_step(0.1, x=XD, y=YD) for _ in range(2)] == [cold.train_step(0.1, x=XD, y=YD)
                                                                    for _ in range(2)]


@pytest.mark.slow
def test_an_edit_recompiles_only_the_kernels_it_changed(cache_in):
    first = DEEP.replace("WIDTH", "6")
    whole = _modules(lambda: structc.compile(first, training=True))
    edited = DEEP.replace("WIDTH", "5")
    nets = []
    again = _modules(lambda: nets.append(structc.compile(edited, training=True)))
    # the first layer's kernels (forward, gradient, transpose) are reused; entries and the layers touched are not
    assert 0 < again < whole - 3, (again, whole)
    _same_as_cold(nets[0], edited)
    assert _modules(lambda: structc.compile("# a note\n" + edited, training=True)) == 0


@pytest.mark.slow
def test_a_damaged_cached_kernel_is_recompiled_not_loaded(cache_in):
    source = DEEP.replace("WIDTH", "6")
    structc.compile(source, training=True)
    objects = sorted(cache_in.glob("*.object"), key=lambda p: p.stat().st_size)
    for entry in cache_in.glob("*.entry"):     # the whole model's entries: gone, so its kernels are looked up
        entry.unlink()
    with open(objects[-1], "r+b") as f:       # the largest kernel, truncated
        f.truncate(objects[-1].stat().st_size // 2)
    nets = []
    with pytest.warns(cache.CacheWarning, match="integrity"):
        assert _modules(lambda: nets.append(structc.compile(source, training=True))) == 1
    _same_as_cold(nets[0], source)


# -- a bounded folder ----------------------------------------------------------

def test_the_folder_is_bounded_and_keeps_what_was_used_last(cache_in, monkeypatch):
    """Every edit adds kernels: past STRUCTC_CACHE_MAX_MB the files used longest
    ago go, the newest and the secret stay, and a pruned model just recompiles."""
    from structc import cache
    monkeypatch.setattr(cache, "_counted", {})
    for k in range(6):
        cache.store(f"{k:016x}", {"model": "M"}, bytes(40_000))
        os.utime(next(cache_in.glob(f"{k:016x}.*")), (1000 + k, 1000 + k))   # the clock ticks coarsely
    assert cache.load(f"{0:016x}", "M") is not None           # used now: the newest use
    monkeypatch.setenv("STRUCTC_CACHE_MAX_MB", str(150_000 / 2**20))
    cache.store(f"{6:016x}", {"model": "M"}, bytes(40_000))
    left = {p.name.split(".")[0] for p in cache_in.glob("*.entry")}
    assert f"{6:016x}" in left and f"{0:016x}" in left and f"{1:016x}" not in left
    assert sum(p.stat().st_size for p in cache_in.iterdir()) <= 150_000
    assert (cache_in / "key").exists()


@pytest.mark.parametrize("bad", ["lots", "0", "-5"])
def test_a_bad_bound_is_refused(bad, monkeypatch):
    from structc import cache
    monkeypatch.setenv("STRUCTC_CACHE_MAX_MB", bad)
    with pytest.raises(ValueError, match="STRUCTC_CACHE_MAX_MB"):
        cache.max_bytes()


def test_the_readme_states_the_bound_in_force():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"(`STRUCTC_CACHE_MAX_MB`, default {cache.DEFAULT_MAX_MB} MiB)" in readme


# -- the parser's tables ------------------------------------------------------

def _fresh_parser(monkeypatch, build_allowed: bool):
    """`syntax.parser()` as a new process would make it with no shipped tables
    (another lark version's); without `build_allowed`, building lark's tables
    (rather than loading them) fails the test."""
    from structc import syntax
    syntax.parser.cache_clear()
    monkeypatch.setattr(syntax, "_shipped_parser", lambda grammar: None)
    if not build_allowed:
        monkeypatch.setattr(syntax, "Lark", type("NoBuild", (), {
            "__init__": lambda *a, **k: pytest.fail("built the parser's tables again"),
            "load": syntax.Lark.load}))
    try:
        return syntax.parser()
    finally:
        syntax.parser.cache_clear()
        monkeypatch.setattr(syntax, "Lark", __import__("lark").Lark)


def test_the_parser_tables_are_cached_and_parse_the_same(cache_in, monkeypatch):
    """Building the LALR tables was most of a cold parse (90 ms); a new process
    loads them from the cache (10 ms) and parses to the same program, spans and all."""
    from structc import syntax
    built = _fresh_parser(monkeypatch, build_allowed=True)
    assert len(list(cache_in.glob("*.parser"))) == 1
    loaded = _fresh_parser(monkeypatch, build_allowed=False)
    source = Path(__file__).resolve().parent.parent.joinpath("examples", "lenet5.snet").read_text()
    programs = []
    for p in (built, loaded):
        monkeypatch.setattr(syntax, "parser", lambda p=p: p)
        programs.append(parse(source, "lenet5.snet"))
    assert programs[0] == programs[1]        # spans are fields: positions included
    with pytest.raises(structc.SnetError, match="expected"):
        parse("model M { input x: f32[N, 3]\n output y = tanh(x +) }")


def test_a_damaged_parser_entry_is_rebuilt_and_no_cache_stores_none(cache_in, monkeypatch):
    _fresh_parser(monkeypatch, build_allowed=True)
    (entry,) = cache_in.glob("*.parser")
    _rewrite(entry, entry.read_bytes()[:-10] + b"x" * 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cache.CacheWarning)
        with pytest.raises(pytest.fail.Exception, match="built the parser"):
            _fresh_parser(monkeypatch, build_allowed=False)
        assert _fresh_parser(monkeypatch, build_allowed=True) is not None
    shutil.rmtree(cache_in)
    monkeypatch.setenv("STRUCTC_NO_CACHE", "1")
    _fresh_parser(monkeypatch, build_allowed=True)
    assert not cache_in.exists()
