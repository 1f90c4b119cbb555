import os
import shutil
import tempfile

import pytest

# Tests compile into a private cache so they never depend on (or pollute) the
# user's; subprocesses inherit it through the environment. A cache this session
# made is removed when it ends, so runs do not pile folders up in the temp dir.
if "STRUCTC_CACHE_DIR" in os.environ:
    _SESSION_CACHE = None
else:
    _SESSION_CACHE = os.environ["STRUCTC_CACHE_DIR"] = tempfile.mkdtemp(prefix="structc-test-cache-")

# Tests compare 1 and 2 threads: on a loaded machine the pool's back-off would
# run the 2-thread side on one thread and check nothing. Its own tests turn it on.
os.environ.setdefault("STRUCTC_BACKOFF", "0")
# Likewise entries of moderate work measured serial against pooled: tests count the
# pool's jobs and compare thread counts. Its own tests turn it on.
os.environ.setdefault("STRUCTC_ADAPT", "0")


def pytest_sessionfinish(session, exitstatus):
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture
def rng():
    import numpy as np
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def op_artifacts():
    """Op nets compiled once for the session (`structc.testing.op_net`'s `compiled`):
    tests/test_ops.py checks each sample's net, tests/test_nan.py the same net with
    NaN, inf and both; the net is the same (the values differ), and each of its
    4 compiles took ~0.2 s, 298 samples. Only for tests that leave the compiler as it is."""
    return {}
