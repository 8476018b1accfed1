# Patch before anything else imports socket or ssl: the tests run packs, the fake
# Flyte API and subprocess helpers in one gevent hub, exactly as a pack would.
from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def subprocess_env():
    """Environment for child Python processes: the project importable, no stray FLYTE_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYTE_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def python():
    return sys.executable
