"""`import structc` (every `structc` command pays it) loads what a compile or
a call needs, and not what only some commands use: those import it when run."""
import json
import os
import subprocess
import sys

import pytest

#: imported where used (shipping a library, building a checkout's runtime, progress bars, plots, interop)
NOT_AT_IMPORT = ["subprocess", "tqdm", "matplotlib", "torch", "onnx", "mpi4py", "tensorboardX",
                 "networkx"]      # ~0.16 s: networkx input to a GNN and drawings only


def test_import_structc_leaves_out_what_only_some_commands_use(tmp_path):
    code = f"import sys, json, structc; print(json.dumps([m for m in {NOT_AT_IMPORT!r} if m in sys.modules]))"
    # run outside the checkout: `python -c` puts the working directory first on sys.path, and a
    # checkout without a built runtime (CI installs the package, non-editable) bootstraps one
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert json.loads(done.stdout) == []


WARM = """
import json, sys
import numpy as np
import structc
net = structc.compile(sys.argv[1], training=True)
loss = net.train_step(x=np.ones((2, 3), np.float32), y=np.array([0, 1], np.int32), lr=0.1)
print(json.dumps([net.meta["deferred"], float(loss), "networkx" in sys.modules]))
"""


@pytest.mark.slow
def test_compiles_and_warm_loads_import_no_networkx(tmp_path):
    """The graph IR keeps its own edges: a compile, a warm load from the cache,
    its calls and training steps run without networkx (~0.16 s to import)."""
    source = tmp_path / "m.snet"
    source.write_text("model M {\n  input x: f32[N, 3]\n  target y: class[N] of 2\n"
                      "  loss cross_entropy(dense(x, 2), y)\n}\n")
    env = dict(os.environ, STRUCTC_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("STRUCTC_NO_CACHE", None)
    runs = [subprocess.run([sys.executable, "-c", WARM, str(source)], capture_output=True, text=True, check=True,
                           cwd=tmp_path, env=env) for _ in range(2)]
    cold, warm = (json.loads(run.stdout.strip().splitlines()[-1]) for run in runs)
    assert not cold[2] and not warm[2] and warm[0] == ["update", "evaluation"] and warm[1] == cold[1]
