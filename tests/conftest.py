import os
import tempfile

import pytest

# Tests compile into a private cache so they never depend on (or pollute) the user's.
os.environ.setdefault("STRUCTC_CACHE_DIR", tempfile.mkdtemp(prefix="structc-test-cache-"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")


@pytest.fixture
def rng():
    import numpy as np
    return np.random.default_rng(0)
