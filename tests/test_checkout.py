"""`import structc` from a source checkout that was never built: the runtime is
built into a private cache folder, or the import says in one sentence what to do."""
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# An editable install's import hook would find the worktree's built runtime;
# without it the copy behaves as a fresh clone does next to a non-editable install.
PRELUDE = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
           "if 'Editable' not in getattr(f, '__name__', type(f).__name__)]\n")


def fresh_checkout(tmp_path: Path) -> Path:
    """The source tree as a clone has it: no built extension anywhere."""
    tree = tmp_path / "checkout"
    skip = shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "*.egg-info")
    for part in ("structc", "grammar", "runtime", "examples"):
        shutil.copytree(ROOT / part, tree / part, ignore=skip)
    assert not list(tree.rglob("_runtime*"))
    return tree


def run_in(tree: Path, code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + code], cwd=tree, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


@pytest.mark.slow
def test_import_from_an_unbuilt_checkout_builds_the_runtime(tmp_path):
    tree, cache = fresh_checkout(tmp_path), tmp_path / "cache"
    code = ("import numpy as np, structc\n"
            "assert structc.__file__.startswith(" + repr(str(tree)) + "), structc.__file__\n"
            "net = structc.compile('examples/digits_mlp.snet')\n"
            "assert net(x=np.zeros((3, 64), np.float32)).shape == (3, 10)\n"
            "print(structc._runtime.__file__)\n")
    done = run_in(tree, code, STRUCTC_CACHE_DIR=str(cache))
    assert done.returncode == 0, done.stderr
    runtime = done.stdout.strip()
    assert Path(runtime).parent == cache / "runtime"
    assert stat.S_IMODE((cache / "runtime").stat().st_mode) == 0o700
    again = run_in(tree, "import structc; print(structc._runtime.__file__)", STRUCTC_CACHE_DIR=str(cache))
    assert again.stdout.strip() == runtime            # built once, then reused


def test_import_without_a_compiler_says_what_to_do(tmp_path):
    tree, empty = fresh_checkout(tmp_path), tmp_path / "no-tools"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CC"}
    done = subprocess.run([sys.executable, "-c", PRELUDE + "import structc"], cwd=tree, capture_output=True,
                          text=True, env={**env, "PATH": str(empty), "STRUCTC_CACHE_DIR": str(tmp_path / "c")},
                          timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and "pip install -e ." in last, done.stderr
    assert "circular import" not in done.stderr
