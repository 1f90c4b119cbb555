"""The Python boundary: invalid calls raise ValueError/TypeError, never crash."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).parent / "fuzz" / "boundary.py"
CALLS = 10_000


@pytest.mark.slow
def test_ten_thousand_invalid_calls_raise_only_value_or_type_errors():
    """Dense tensors, forests and graphs, drawn by hypothesis in a subprocess
    (a crash in native code would kill it: the exit status tells)."""
    result = subprocess.run([sys.executable, str(FUZZ), str(CALLS)], capture_output=True, text=True)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    outcomes = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert sum(outcomes.values()) == CALLS
    assert outcomes["ValueError"] > 1000 and outcomes["TypeError"] > 500   # both kinds exercised
