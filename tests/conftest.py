# Patch before anything else imports socket or ssl: the tests run packs, the fake
# Flyte API and subprocess helpers in one gevent hub, exactly as a pack would.
from gevent import monkey

monkey.patch_all()

import functools  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_addoption(parser):
    parser.addoption("--shard", metavar="K/N",
                     help="run only slice K of N of the collected tests (dealt round-robin); "
                          ".ci/pytest-shards runs the N slices side by side")


def pytest_collection_modifyitems(config, items):
    spec = config.getoption("--shard")
    if not spec:
        return
    try:
        number, count = (int(part) for part in spec.split("/"))
        if not 1 <= number <= count:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"--shard {spec!r}: expected K/N with 1 <= K <= N") from None
    kept = items[number - 1::count]
    config.hook.pytest_deselected(items=[item for index, item in enumerate(items) if index % count != number - 1])
    items[:] = kept


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
