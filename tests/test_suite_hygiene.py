"""The test suite cleans up after itself."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")


@pytest.mark.slow
def test_a_session_removes_its_cache_folder(tmp_path):
    """A pytest session (and the subprocesses it starts, which share the cache
    through the environment) leaves no structc-test-cache-* folder behind."""
    project, temp = tmp_path / "project", tmp_path / "temp"
    project.mkdir()
    temp.mkdir()
    shutil.copy(CONFTEST, project / "conftest.py")
    (project / "test_uses_cache.py").write_text(
        "import os, subprocess, sys\n"
        "def test_cache():\n"
        "    cache = os.environ['STRUCTC_CACHE_DIR']\n"
        "    assert os.path.basename(cache).startswith('structc-test-cache-')\n"
        "    code = 'import os; open(os.path.join(os.environ[\"STRUCTC_CACHE_DIR\"], \"entry\"), \"w\").close()'\n"
        "    subprocess.run([sys.executable, '-c', code], check=True)\n"
        "    assert os.listdir(cache) == ['entry']\n")
    env = {k: v for k, v in os.environ.items() if k != "STRUCTC_CACHE_DIR"}
    env["TMPDIR"] = str(temp)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(project)],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    assert not list(temp.glob("structc-test-cache-*"))


@pytest.mark.slow
def test_a_cache_given_by_the_user_is_kept(tmp_path):
    project, cache = tmp_path / "project", tmp_path / "mine"
    project.mkdir()
    cache.mkdir()
    shutil.copy(CONFTEST, project / "conftest.py")
    (project / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    env = dict(os.environ, STRUCTC_CACHE_DIR=str(cache))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(project)],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert cache.is_dir()
