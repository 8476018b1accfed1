"""Fixtures of the conformance suite: every test here runs against each Flyte server this run has.

``server`` is parametrized: ``[fake]`` is a fresh :class:`~flyte_gevent.testing.FakeFlyteApi`; ``[real]`` is a
:class:`~flyte_gevent.testing.FlyteServer` helper on the real Flyte server, started once per session from
``$FLYTE_GEVENT_REAL_SERVER`` or else ``../shared/peers/flyte-server/flyte-server`` beside the repository (``.ci/run``
sets the variable). Without the binary the ``[real]`` tests skip, saying where they looked.

Tests share that one real server, so they keep out of each other's way by name: pack names carry the test's
``unique`` token (or, for the example packs, whose names are fixed, a ``run`` label carrying it), and each test's
helper has its own trigger pack and flows, deleted after the test.
"""

import os
import uuid

import pytest

from flyte_gevent import Pack
from flyte_gevent.testing import FakeFlyteApi, FlyteServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REAL_SERVER_VARIABLE = "FLYTE_GEVENT_REAL_SERVER"
SHARED_PATH = os.path.join("shared", "peers", "flyte-server", "flyte-server")

# As in tests/conftest.py: short polling, no health port, a quick stop.
PACK_TEST_DEFAULTS = {"health_port": None, "health_host": "127.0.0.1", "polling_interval": 0.5,
                      "grace_period": 1.0, "flush_timeout": 1.0}


def _shared_real_server():
    """``shared/peers/flyte-server/flyte-server`` in the nearest directory above the repository that has it."""
    directory = ROOT
    while os.path.dirname(directory) != directory:
        directory = os.path.dirname(directory)
        candidate = os.path.join(directory, SHARED_PATH)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def real_server_binary():
    """``(path, None)`` for the real server's binary, or ``(None, why there is none)``."""
    configured = os.environ.get(REAL_SERVER_VARIABLE)
    if configured:
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return configured, None
        return None, f"real Flyte server not available: {REAL_SERVER_VARIABLE}={configured!r} is not an executable file"
    path = _shared_real_server()
    if path is not None:
        return path, None
    return None, (f"real Flyte server not available: {REAL_SERVER_VARIABLE} is not set and no directory above "
                  f"{ROOT} holds {SHARED_PATH} (set {REAL_SERVER_VARIABLE} to a flyte-server binary to run these "
                  "tests on it)")


@pytest.fixture(scope="session")
def real_flyte_server():
    """The real Flyte server, started once for the session on a free loopback port and always stopped after."""
    path, reason = real_server_binary()
    if path is None:
        pytest.skip(reason)
    server = FlyteServer.launch(path)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=["fake", "real"])
def server(request):
    """The server under test: a FakeFlyteApi, or a FlyteServer helper on the shared real server."""
    if request.param == "fake":
        api = FakeFlyteApi().start()
        try:
            yield api
        finally:
            api.stop()
        assert not api.errors, f"FakeFlyteApi hit internal errors: {api.errors}"
    else:
        launched = request.getfixturevalue("real_flyte_server")
        with FlyteServer(launched.url) as helper:
            yield helper
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"last lines of the real server's log ({launched.log_path}):\n{launched.log_tail(15)}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # Keep each phase's report on the item, so fixtures can tell in teardown whether the test failed.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def unique():
    """A token no other test uses, for pack names and labels on the shared real server."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def make_pack(server):
    """``make_pack(pack_def, start=True, labels=None, **options)``: a Pack against the server under test, configured
    from the environment as a deployed pack is (labels as ``FLYTE_LABELS``); all are stopped after the test."""
    packs = []

    def make(pack_def, *, start=True, labels=None, **options):
        environ = {"FLYTE_API": server.url, "FLYTE_HEALTH_PORT": "off"}
        if labels:
            environ["FLYTE_LABELS"] = ",".join(f"{k}={v}" for k, v in labels.items())
        pack = Pack.from_env(pack_def, environ=environ, **{**PACK_TEST_DEFAULTS, **options})
        packs.append(pack)
        if start:
            pack.start(timeout=5)
        return pack

    yield make
    for pack in packs:
        pack.stop(grace_period=0)

