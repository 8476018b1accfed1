"""pytest plugin: the ``flyte_api`` fixture, a started :class:`flyte_gevent.testing.FakeFlyteApi`.

Installed with flyte_gevent (``pytest11`` entry point), so pack authors get the fixture without any set-up beyond
monkey-patching in the first lines of their ``conftest.py``::

    from gevent import monkey; monkey.patch_all()

    def test_echo(flyte_api):
        aid = flyte_api.enqueue("Echo", "Echo", {"text": "hi"})
        ...

pytest imports this module at start-up, before any conftest.py has had a chance to patch, so it imports nothing
but pytest: gevent and the fake server are loaded inside the fixture.
"""

import pytest

__all__ = ["flyte_api"]

_NOT_PATCHED = (
    "flyte_api needs a gevent-patched process: the pack under test talks to an in-process gevent server, which "
    "blocking sockets would freeze. Patch in the first lines of conftest.py, before any other import:\n\n"
    "    from gevent import monkey\n"
    "    monkey.patch_all()\n\n"
    "(or run pytest as: python -m gevent.monkey --module pytest ...)"
)


@pytest.fixture
def flyte_api():
    """A :class:`~flyte_gevent.testing.FakeFlyteApi` listening on 127.0.0.1 (a free port), stopped after the test.

    Point the pack under test at ``flyte_api.url``. The test fails if the fake itself hit an internal error.
    """
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        pytest.fail(_NOT_PATCHED, pytrace=False)

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
