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

``running_pack(pack_def, **settings)`` starts a pack against ``flyte_api`` with settings that suit tests and always
stops it after the test. A test that starts a pack itself and leaves it running errors at teardown (the pack is
stopped there, so it cannot poll into the next tests).

pytest imports this module at start-up, before any conftest.py has had a chance to patch, so it imports nothing
but pytest: gevent, the fake server and the real-server helper are loaded inside the fixtures.
"""

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import pytest

if TYPE_CHECKING:
    from flyte_gevent import Client, Pack, PackDef
    from flyte_gevent.testing import FakeFlyteApi, FlyteServer

__all__ = ["RunningPack", "fake_flyte_api", "flyte_api", "running_pack"]

URL_VARIABLE = "FLYTE_GEVENT_TEST_API_URL"
JWT_VARIABLE = "FLYTE_GEVENT_TEST_JWT"

_NOT_PATCHED = (
    "flyte_api needs a gevent-patched process: the pack under test talks to an in-process gevent server, which "
    "blocking sockets would freeze. Patch in the first lines of conftest.py, before any other import:\n\n"
    "    from gevent import monkey\n"
    "    monkey.patch_all()\n\n"
    "(or run pytest as: python -m gevent.monkey --module pytest ...)"
)


class RunningPack(Protocol):
    """The type of the :func:`running_pack` fixture, for annotating a test's parameter."""

    def __call__(self, pack_def: "PackDef", *, labels: Mapping[str, str] | None = None,
                 client: "Client | None" = None, start_timeout: float = 5.0, **settings: Any) -> "Pack": ...


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("flyte_gevent")
    group.addoption("--flyte-api-url", metavar="URL", default=None,
                    help="give tests that use the flyte_api fixture the real Flyte API at URL (a FlyteServer "
                         f"helper) instead of the in-process fake; also ${URL_VARIABLE}")


def _real_api_url(config: pytest.Config) -> str | None:
    import os

    url: str | None = config.getoption("flyte_api_url", default=None) or os.environ.get(URL_VARIABLE) or None
    return url


def _require_patched() -> None:
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        pytest.fail(_NOT_PATCHED, pytrace=False)


def _fake() -> "Iterator[FakeFlyteApi]":
    from flyte_gevent.testing import FakeFlyteApi

    watchers = _hub_watchers()
    api = FakeFlyteApi(host="127.0.0.1", port=0)
    api.start()
    try:
        yield api
    finally:
        api.stop()
    problems = [_stop_running_packs(api.url, watchers)]
    if api.errors:
        problems.append("FakeFlyteApi hit internal errors (a bug in flyte_gevent.testing):\n" + "\n".join(api.errors))
    _fail(problems)


def _real(url: str) -> "Iterator[FlyteServer]":
    import os

    from flyte_gevent.testing import FlyteServer

    watchers = _hub_watchers()
    server = FlyteServer(url, jwt=os.environ.get(JWT_VARIABLE) or None)
    try:
        yield server
    finally:
        server.close()
    _fail([_stop_running_packs(server.url, watchers)])


@pytest.fixture
def flyte_api(request: pytest.FixtureRequest) -> "Iterator[FakeFlyteApi | FlyteServer]":
    """The Flyte API for the test: a :class:`~flyte_gevent.testing.FakeFlyteApi` listening on 127.0.0.1 (a free
    port), stopped after the test; or, with ``--flyte-api-url URL``, a :class:`~flyte_gevent.testing.FlyteServer`
    for the real API at URL, which deletes its flows and trigger pack after the test.

    Point the pack under test at ``flyte_api.url``. With the fake, the test fails if the fake itself hit an
    internal error. Either way, it errors at teardown when it left a started pack running against the API.
    """
    _require_patched()
    url = _real_api_url(request.config)
    if url is None:
        yield from _fake()
    else:
        yield from _real(url)


@pytest.fixture
def fake_flyte_api() -> "Iterator[FakeFlyteApi]":
    """Always a :class:`~flyte_gevent.testing.FakeFlyteApi`, whatever ``--flyte-api-url`` says: for tests that
    inject faults, set a race window or read the requests the server saw."""
    _require_patched()
    yield from _fake()


#: What :func:`running_pack` gives a pack unless told otherwise: no health server, the shortest polling interval,
#: and a stop that does not wait long for handlers the test left running.
RUNNING_PACK_DEFAULTS: dict[str, Any] = {"health_port": None, "health_host": "127.0.0.1", "polling_interval": 0.5,
                         "grace_period": 1.0, "flush_timeout": 1.0}


@pytest.fixture
def running_pack(flyte_api: "FakeFlyteApi | FlyteServer") -> Iterator[RunningPack]:
    """``running_pack(pack_def, *, labels=None, client=None, start_timeout=5.0, **settings)``: a started
    :class:`~flyte_gevent.Pack` for *pack_def* against ``flyte_api``, stopped after the test whether it passed or
    not (running handlers get no grace period then, and are completed as FATAL).

    *settings* are :class:`~flyte_gevent.Pack` keyword arguments, over :data:`RUNNING_PACK_DEFAULTS` (no health
    server, polling every 0.5 s, a 1 s grace period and flush timeout). *labels* are merged over the definition's
    (:meth:`~flyte_gevent.PackDef.with_labels`). *client* replaces the default ``Client(flyte_api.url,
    timeout=5.0)``, which carries ``$FLYTE_GEVENT_TEST_JWT`` on a real Flyte API. Returns once the pack is
    registered; raises what :meth:`~flyte_gevent.Pack.start` raises when it cannot register within
    *start_timeout* seconds. Enqueue before starting the pack when you can: its first take then finds the action.
    """
    from flyte_gevent import Client, Pack
    from flyte_gevent.testing import FakeFlyteApi

    packs: list[Pack] = []

    def start(pack_def: "PackDef", *, labels: Mapping[str, str] | None = None, client: "Client | None" = None,
              start_timeout: float = 5.0, **settings: Any) -> "Pack":
        if labels:
            pack_def = pack_def.with_labels(labels)
        if client is None:
            import os

            jwt = None if isinstance(flyte_api, FakeFlyteApi) else os.environ.get(JWT_VARIABLE) or None
            client = Client(flyte_api.url, timeout=5.0, jwt=jwt)
        pack = Pack(pack_def, client, **{**RUNNING_PACK_DEFAULTS, **settings})
        packs.append(pack)
        pack.start(timeout=start_timeout)
        return pack

    try:
        yield start
    finally:
        for pack in packs:
            pack.stop(grace_period=0)


# --- packs a test leaves running ----------------------------------------------------------------------------------
#
# A started pack keeps polling after its test: into the next tests' logs, against a server that is gone. Finding
# one means looking through the garbage collector's objects, a few tens of milliseconds in a test process, which
# no test should pay when nothing was left behind. A running pack always has something waiting in the gevent hub
# (its poller's timer or socket, its health server's listener), so the check first compares the hub's count of
# active watchers with its count before the fixture started, and only looks further when that count grew.

def _hub_watchers() -> int | None:
    """How many watchers the gevent hub's loop has active (libev's count), or None where the loop does not say."""
    import gevent

    count: int | None = getattr(gevent.get_hub().loop, "activecnt", None)
    return count


def _running_packs(url: str, watchers_before: int | None) -> "list[Pack]":
    """The packs started against *url* and not stopped."""
    import sys

    pack_module = sys.modules.get("flyte_gevent.pack")
    if pack_module is None:
        return []
    watchers = _hub_watchers()
    if watchers is not None and watchers_before is not None and watchers <= watchers_before:
        return []
    import gc

    pack_class = pack_module.Pack
    url = url.rstrip("/")
    return [obj for obj in gc.get_objects()
            if issubclass(type(obj), pack_class) and obj.registered and obj.live()[0]
            and obj.client.url.rstrip("/") == url]


def _stop_running_packs(url: str, watchers_before: int | None) -> str | None:
    """Stop the packs a test left running against *url*; what to fail the test with, or None."""
    packs = _running_packs(url, watchers_before)
    if not packs:
        return None
    for pack in packs:
        pack.stop(grace_period=0, flush_timeout=0)
    named = ", ".join(f"{pack.pack_def.name!r} (pack id {pack.pack_id!r})" for pack in packs)
    noun, it = ("pack", "it") if len(packs) == 1 else ("packs", "them")
    return (f"the test left {len(packs)} started {noun} running: {named} against {url}. flyte_gevent stopped {it} "
            f"now; stop {it} in the test (pack.stop(), in a finally) or start {it} with the running_pack fixture, "
            f"which always stops its packs")


def _fail(problems: list[str | None]) -> None:
    """Fail the test with the *problems* that are not None, if any."""
    found = [problem for problem in problems if problem]
    if found:
        pytest.fail("\n\n".join(found), pytrace=False)
