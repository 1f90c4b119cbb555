"""Makes `structc._runtime` importable when structc is imported from a source
checkout that was never built (`python -c "import structc"` in the repository
root picks up the source tree, not the installed package).

An installed structc has the extension next to this file and nothing here
runs. Otherwise the runtime (`runtime/*.c`) is compiled with the compiler
Python was built with into a private per-user folder (mode 0700), keyed by
the sources, the Python ABI and the compiler, and loaded from there. Without
a compiler the import fails with one sentence that says what to do.
"""
from __future__ import annotations

import importlib
import os
import stat
import sys
from pathlib import Path

MODULE = "structc._runtime"
HINT = ("install structc with `pip install -e .` in the checkout (or `pip install .` and run "
        "outside the source tree)")


def ensure_runtime() -> None:
    """Import the built runtime, or build and load one for a source checkout."""
    try:
        importlib.import_module(MODULE)
        return
    except ModuleNotFoundError as err:
        if err.name != MODULE:
            raise
    sources = Path(__file__).resolve().parent.parent / "runtime"
    if not (sources / "pymodule.c").is_file():
        raise ImportError(f"structc's native runtime ({MODULE}) is missing from {Path(__file__).parent}: "
                          f"{HINT}")
    _load(_build(sources))


def _load(path: Path) -> None:
    import importlib.util
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[MODULE] = module
    setattr(sys.modules["structc"], "_runtime", module)     # as an import of the submodule would


def _compile_command() -> list[str]:
    """Python's own shared-library link line (it compiles too), or $CC/cc."""
    import shlex
    import shutil
    import sysconfig
    line = shlex.split(sysconfig.get_config_var("LDSHARED") or "")
    if not line or not shutil.which(line[0]):
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if not cc:
            raise ImportError("structc's native runtime is not built in this source checkout and no C "
                              f"compiler was found to build it: {HINT}")
        line = [*shlex.split(cc), "-shared"]
    return [*line, "-fPIC", "-O2", "-std=c11", "-pthread"]


def _private_dir() -> Path:
    """A folder only this user can write: code loaded from it must be ours."""
    from .cache import cache_dir
    folder = cache_dir() / "runtime"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ImportError(f"{folder} is not private to this user, so structc will not load a runtime "
                          f"built there: {HINT}")
    return folder


def _build(sources: Path) -> Path:
    # only a checkout without the built runtime gets here: an installed structc imports none of these
    import hashlib
    import subprocess
    import sysconfig
    import tempfile
    files = sorted(sources.glob("*.c")) + sorted(sources.glob("*.h"))
    command = _compile_command()
    key = hashlib.sha256()
    for part in [sys.version, sysconfig.get_config_var("EXT_SUFFIX") or "", *command]:
        key.update(part.encode() + b"\0")
    for f in files:
        key.update(f.name.encode() + b"\0" + f.read_bytes())
    folder = _private_dir()
    target = folder / f"_runtime-{key.hexdigest()[:16]}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    if target.is_file():
        return target
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
    os.close(fd)
    include = sysconfig.get_paths()["include"]
    c_files = [str(f) for f in files if f.suffix == ".c"]
    done = subprocess.run([*command, "-I", include, "-I", str(sources), *c_files, "-o", tmp],
                          capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        detail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise ImportError(f"structc's native runtime is not built in this source checkout and building it "
                          f"failed ({detail}): {HINT}")
    os.replace(tmp, target)             # atomic: a concurrent import sees all of it or nothing
    return target
