"""pytest plugin: the ``flyte_api`` fixture — an in-process fake Flyte API, or a real Flyte deployment on request.

Installed with flyte_gevent (``pytest11`` entry point), so pack authors get the fixtures without any set-up beyond
monkey-patching in the first lines of their ``conftest.py``::

    from gevent import monkey; monkey.patch_all()

    def test_echo(flyte_api):
        aid = flyte_api.enqueue("Echo", "Echo", {"text": "hi"})
        ...

``flyte_api`` is a started :class:`flyte_gevent.testing.FakeFlyteApi`. Run pytest with ``--flyte-api-url URL`` (or
set ``FLYTE_GEVENT_TEST_API_URL``) and the same tests get a :class:`flyte_gevent.testing.FlyteServer` for the real
Flyte API at *URL* instead: ``enqueue`` posts a flow and an event there, ``wait_for_result`` reads the audit API, and
the flows and trigger pack it made are deleted after each test. ``FLYTE_GEVENT_TEST_JWT`` is its token, for a server
with authentication. Tests that inject faults or read recorded requests need the fake whatever the option says: they
take ``fake_flyte_api``.

pytest imports this module at start-up, before any conftest.py has had a chance to patch, so it imports nothing
but pytest: gevent, the fake server and the real-server helper are loaded inside the fixtures.
"""

import pytest

__all__ = ["fake_flyte_api", "flyte_api"]

URL_VARIABLE = "FLYTE_GEVENT_TEST_API_URL"
JWT_VARIABLE = "FLYTE_GEVENT_TEST_JWT"

_NOT_PATCHED = (
    "flyte_api needs a gevent-patched process: the pack under test talks to an in-process gevent server, which "
    "blocking sockets would freeze. Patch in the first lines of conftest.py, before any other import:\n\n"
    "    from gevent import monkey\n"
    "    monkey.patch_all()\n\n"
    "(or run pytest as: python -m gevent.monkey --module pytest ...)"
)


def pytest_addoption(parser):
    group = parser.getgroup("flyte_gevent")
    group.addoption("--flyte-api-url", metavar="URL", default=None,
                    help="give tests that use the flyte_api fixture the real Flyte API at URL (a FlyteServer "
                         f"helper) instead of the in-process fake; also ${URL_VARIABLE}")


def _real_api_url(config):
    import os

    return config.getoption("flyte_api_url", default=None) or os.environ.get(URL_VARIABLE) or None


def _require_patched():
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        pytest.fail(_NOT_PATCHED, pytrace=False)


def _fake():
    from flyte_gevent.testing import FakeFlyteApi

    api = FakeFlyteApi(host="127.0.0.1", port=0)
    api.start()
    try:
        yield api
    finally:
        api.stop()
    if api.errors:
        pytest.fail("FakeFlyteApi hit internal errors (a bug in flyte_gevent.testing):\n" + "\n".join(api.errors),
                    pytrace=False)


@pytest.fixture
def flyte_api(request):
    """The Flyte API for the test: a :class:`~flyte_gevent.testing.FakeFlyteApi` listening on 127.0.0.1 (a free
    port), stopped after the test; or, with ``--flyte-api-url URL``, a :class:`~flyte_gevent.testing.FlyteServer`
    for the real API at URL, which deletes its flows and trigger pack after the test.

    Point the pack under test at ``flyte_api.url``. With the fake, the test fails if the fake itself hit an
    internal error.
    """
    _require_patched()
    url = _real_api_url(request.config)
    if url is None:
        yield from _fake()
        return
    import os

    from flyte_gevent.testing import FlyteServer

    with FlyteServer(url, jwt=os.environ.get(JWT_VARIABLE) or None) as server:
        yield server


@pytest.fixture
def fake_flyte_api():
    """Always a :class:`~flyte_gevent.testing.FakeFlyteApi`, whatever ``--flyte-api-url`` says: for tests that
    inject faults, set a race window or read the requests the server saw."""
    _require_patched()
    yield from _fake()
