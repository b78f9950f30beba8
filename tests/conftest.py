import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


def run_cli(*args, env=None, timeout=600):
    """Run ``python -m medscale ARGS`` in a subprocess; returns CompletedProcess (text)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "medscale", *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=REPO, check=False)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is absent")
    return SHARED_DATA
