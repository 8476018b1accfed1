# Patch before anything else imports socket or ssl: the tests run packs, the fake
# Flyte API and subprocess helpers in one gevent hub, exactly as a pack would.
from gevent import monkey

monkey.patch_all()

import functools  # noqa: E402
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


# Settings that keep packs under test quick: short polling, no fixed health port, and a stop that
# does not wait long for handlers a test left blocked.
PACK_TEST_DEFAULTS = {"health_port": None, "health_host": "127.0.0.1", "polling_interval": 0.5,
                      "grace_period": 1.0, "flush_timeout": 1.0}


@pytest.fixture
def make_pack(flyte_api):
    """``make_pack(pack_def, start=False, **options)``: a Pack against the fake; all are stopped after the test."""
    from flyte_gevent import Client, Pack

    packs = []

    def make(pack_def, *, start=False, **options):
        pack = Pack(pack_def, Client(flyte_api.url, timeout=5.0), **{**PACK_TEST_DEFAULTS, **options})
        packs.append(pack)
        if start:
            pack.start(timeout=5)
        return pack

    yield make
    for pack in packs:
        pack.stop(grace_period=0)


@pytest.fixture
def run_pack(make_pack):
    """Like ``make_pack``, but the pack is started (registered) before it is returned."""
    return functools.partial(make_pack, start=True)
