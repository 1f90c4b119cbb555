"""Packaging: a built wheel carries the runtime extension, so it installs and
runs the quick start on a machine with no C compiler."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def run(cmd, **kw):
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_the_wheel_installs_and_trains_without_a_compiler(tmp_path):
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "-w", dist])
    wheel, = dist.glob("structc-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--find-links", dist, "structc"])
    # The dependencies come from this environment's site-packages, after the
    # fresh venv's own (a .pth line): only structc is new.
    fresh = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (fresh / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    bare = tmp_path / "bin"              # a PATH with python and structc, no cc
    bare.mkdir()
    for tool in ("python", "structc"):
        (bare / tool).symlink_to(venv / "bin" / tool)
    env = {**os.environ, "PATH": str(bare), "CC": "/bin/false", "PYTHONNOUSERSITE": "1",
           "STRUCTC_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("PYTHONPATH", None)
    work = tmp_path / "work"             # not the checkout: its structc/ must not be imported
    work.mkdir()
    where = run([python, "-c", "import structc, structc._runtime as r; print(structc.__file__); print(r.__file__)"],
                env=env, cwd=work).stdout.split()
    assert all(p.startswith(str(venv)) for p in where), where
    shipped = run([python, "-c", "from structc import syntax; print(syntax._shipped_parser(syntax.grammar_text()))"],
                  env=env, cwd=work).stdout
    assert "Lark" in shipped, "the installed package has no parser tables it can use"
    version = run([venv / "bin" / "structc", "--version"], env=env, cwd=work).stdout
    assert "LLVM" in version and "fingerprint" in version
    out = run([venv / "bin" / "structc", "train", ROOT / "examples" / "digits_mlp.snet", "--data", "digits",
               "--epochs", "1", "--no-progress", "--out", work / "digits.npz"], env=env, cwd=work).stdout
    assert "accuracy" in out
    assert (work / "digits.npz").is_file()
