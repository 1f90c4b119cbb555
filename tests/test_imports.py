"""`import structc` (every `structc` command pays it) loads what a compile or
a call needs, and not what only some commands use: those import it when run."""
import json
import subprocess
import sys

#: imported where used (shipping a library, building a checkout's runtime, progress bars, plots, interop)
NOT_AT_IMPORT = ["subprocess", "tqdm", "matplotlib", "torch", "onnx", "mpi4py", "tensorboardX"]


def test_import_structc_leaves_out_what_only_some_commands_use(tmp_path):
    code = f"import sys, json, structc; print(json.dumps([m for m in {NOT_AT_IMPORT!r} if m in sys.modules]))"
    # run outside the checkout: `python -c` puts the working directory first on sys.path, and a
    # checkout without a built runtime (CI installs the package, non-editable) bootstraps one
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert json.loads(done.stdout) == []
