"""The Python boundary: invalid calls raise ValueError/TypeError, never crash."""
import ast
import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).parent / "fuzz" / "boundary.py"


def test_ten_thousand_invalid_calls_raise_only_value_or_type_errors():
    result = subprocess.run([sys.executable, str(FUZZ), "12000", "0"], capture_output=True, text=True)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    outcomes = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert sum(outcomes.values()) == 12000
    assert outcomes["ValueError"] > 1000 and outcomes["TypeError"] > 1000   # both kinds exercised
