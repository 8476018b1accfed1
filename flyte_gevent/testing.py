"""A fake Flyte API for tests: the pack-facing half of the Flyte server, in process, on gevent.

:class:`FakeFlyteApi` serves real HTTP on loopback with ``gevent.pywsgi`` and answers exactly like the Flyte server
(same links and rels, status codes, empty error bodies, pack ids, label matching, a 500 for a repeated result, a
dropped connection for a result from the wrong pack). Tests queue actions, let a pack take and complete them over
HTTP, and then look at what the server saw. Faults can be injected per route: error statuses, lost responses,
delays, latency, take races between replicas, and outages.

Everything is cooperative: run it in the same gevent hub as the pack under test, with the process monkey-patched
first (a pack cannot talk to an in-process gevent server over blocking sockets). Importing this module patches
nothing and imports neither ``requests`` nor ``ssl``; ``gevent.pywsgi`` is loaded by :meth:`FakeFlyteApi.start`.

Usage::

    from gevent import monkey; monkey.patch_all()    # first lines of conftest.py
    from flyte_gevent.testing import FakeFlyteApi

    with FakeFlyteApi() as api:
        run_my_pack(flyte_api=api.url)                # in a greenlet
        api.wait_for_pack("Echo")
        aid = api.enqueue("Echo", "Echo", {"text": "hi"})
        assert api.wait_for_result(aid).payload == {"text": "hi"}

pytest users get the same thing as the ``flyte_api`` fixture (``flyte_gevent.pytest_plugin``), and
``running_pack`` to run a pack against it. From a shell, ``flyte-gevent fake-api --port 8080`` (or
``python -m flyte_gevent.testing --port 8080``) serves one until SIGINT or SIGTERM, with control routes under
``/_fake/`` that ``flyte-gevent fake-api enqueue|results|events|packs|...`` use (``flyte_gevent._fake_control``).

:class:`FlyteServer` (from ``flyte_gevent._flyte_server``) offers the same helpers on a real Flyte API, where it
creates actions through flows and reads results from the audit API; ``flyte_api`` becomes one with
``pytest --flyte-api-url URL``. README.md "Testing your pack" lists where the fake deliberately differs.
"""

if __name__ == "__main__":
    # Serving from the command line: patch before anything else touches socket. A plain import never patches.
    from gevent import monkey

    monkey.patch_all()

import collections
import dataclasses
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TypeVar

import gevent
import gevent.event
import gevent.pool

from . import _fake_server
from ._fake_server import ROUTES, as_flow_input, as_go_value, go_json_dumps, go_json_encode, pack_id
from ._flyte_server import (
    ActionResult,
    FlowInstance,
    FlyteServer,
    FlyteServerError,
    PackSighting,
    ReceivedEvent,
    ServerAction,
    ServerPack,
    TriggerPack,
    explain_new,
)
from ._run_handler import run_handler  # a handler's result without HTTP, for unit tests

__all__ = [
    "PROXY_PAGE",
    "ROUTES",
    "ActionRecord",
    "ActionResult",
    "FakeFlyteApi",
    "FlowInstance",
    "FlyteServer",
    "FlyteServerError",
    "PackRecord",
    "ReceivedEvent",
    "RecordedRequest",
    "ServerAction",
    "ServerPack",
    "TriggerPack",
    "pack_id",
    "run_handler",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

NEW, PENDING, SUCCESS, FATAL = "NEW", "PENDING", "SUCCESS", "FATAL"


@dataclasses.dataclass(eq=False)
class PackRecord:
    """A registered pack as the server stores it. Re-registering the same id updates this record in place."""

    id: str
    name: str
    labels: dict[str, str]
    #: The registration body as received (decoded JSON).
    body: Any
    #: How many times this id was registered since it was created (a deletion starts over).
    registrations: int
    #: Refreshed by registration and by every take, result and event request for this id.
    last_seen: datetime
    _view: dict[str, Any] = dataclasses.field(repr=False)
    _label_set: frozenset[tuple[str, str]] = dataclasses.field(repr=False)
    _last_seen_ns: int = dataclasses.field(repr=False)


@dataclasses.dataclass(eq=False, slots=True)
class ActionRecord:
    """One action. States go NEW -> PENDING (taken) -> SUCCESS or FATAL (result posted), never back.

    Times are ``time.monotonic()`` values. ``takes`` counts the take requests that picked this action, including
    one that then lost a race for it (so 2 means two pollers raced); ``result_posts`` counts every result POST for
    this action id that reached the server's handler (injected ``fail`` faults answer before that), whatever the
    outcome: with a lost response and a retry it is 2, the second having been refused with a 500.
    """

    id: str
    pack_name: str
    labels: dict[str, str]
    command: str
    input: Any
    state: str = NEW
    created_at: float = 0.0
    taken_at: float | None = None
    #: Id of the pack that took it.
    taken_by: str | None = None
    completed_at: float | None = None
    #: ``{"event", "payload", "createdAt"}`` once a result was accepted; ``createdAt`` is the string sent, or None.
    result: dict[str, Any] | None = None
    result_posts: int = 0
    takes: int = 0
    _seq: int = dataclasses.field(default=0, repr=False)
    _label_set: frozenset[tuple[str, str]] = dataclasses.field(default=frozenset(), repr=False)
    _queue_key: tuple[Any, ...] = dataclasses.field(default=(), repr=False)
    _command_json: bytes = dataclasses.field(default=b"", repr=False)
    _input_json: bytes = dataclasses.field(default=b"null", repr=False)


@dataclasses.dataclass(eq=False)
class RecordedRequest:
    """One HTTP request as the server received it.

    ``route`` is one of :data:`ROUTES`, or None for a path or method the server does not serve. ``query`` is the
    raw query string. ``status`` is filled in when the response is sent, and stays None when the connection was
    dropped instead (or while the request is in progress).
    """

    route: str | None
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    status: int | None = None
    at: float = 0.0

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)


@dataclasses.dataclass(eq=False)
class _Fault:
    kind: str  # "fail", "drop", "delay_before" or "delay_after"
    route: str | None  # None: every route
    remaining: int | None  # None: until cleared
    status: int = 0
    seconds: float = 0.0
    # What a "fail" answers with besides its status.
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


#: What :meth:`FakeFlyteApi.garbage` answers with by default: the kind of page a proxy or captive portal sends.
PROXY_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head>"
              b"<body><h1>Authentication required</h1><p>Sign in to continue to the network.</p></body></html>\n")
_HTML = "text/html; charset=utf-8"


class _Changes:
    """Wakes every waiter when the state changes. Costs nothing while nobody waits."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: gevent.event.Event | None = None

    def notify(self) -> None:
        event, self._event = self._event, None
        if event is not None:
            event.set()

    def wait(self, timeout: float) -> None:
        if self._event is None:
            self._event = gevent.event.Event()
        self._event.wait(timeout)


class FakeFlyteApi:
    """An in-process imitation of the Flyte server's pack-facing API.

    State survives :meth:`stop` and :meth:`start` (like a server restarting on its database); a restart listens on
    the same port. Attributes such as :attr:`packs`, :attr:`actions`, :attr:`events` and :attr:`requests` are the
    live containers: read them freely, do not modify them.

    :param host: address to listen on.
    :param port: port to listen on; 0 picks a free one (read :attr:`port` after :meth:`start`).
    :param record_requests: keep every request in :attr:`requests`; a long benchmark may turn it off.
    :param control: also answer the control routes under ``/_fake/`` (queue actions, read results, events and
        packs, inject faults, reset) for driving the fake from another process, as ``flyte-gevent fake-api`` does.
        Off by default: in process, the methods do the same, and a pack under test should meet only Flyte's routes.

    Usage::

        api = FakeFlyteApi().start()
        aid = api.enqueue("Shell", "Shell", "echo hi", labels={"env": "dev"})
        ...
        api.wait_for_result(aid)
        api.stop()
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, record_requests: bool = True,
                 control: bool = False) -> None:
        self.host = host
        self._port = port
        self.record_requests = record_requests
        self.control = control

        #: pack id -> :class:`PackRecord`
        self.packs: dict[str, PackRecord] = {}
        #: action id -> :class:`ActionRecord`, in the order they were queued
        self.actions: dict[str, ActionRecord] = {}
        #: spontaneous events, oldest first
        self.events: list[ReceivedEvent] = []
        #: what a real server would have refused or misread, in words: 400 reasons, ``pack``/``receivedAt`` keys,
        #: results from a pack that cannot have taken the action
        self.violations: list[str] = []
        #: :class:`RecordedRequest` for every request, oldest first
        self.requests: list[RecordedRequest] = []
        #: internal errors of the fake itself; the pytest fixture fails the test when there are any
        self.errors: list[str] = []

        #: seconds added before every request is processed (a slow network)
        self.latency = 0.0
        #: seconds a take sleeps between finding an action and claiming it; concurrent takes of one action then
        #: race, and the loser gets a 500 as a replica would from the real server
        self.race_window = 0.0
        #: seconds each take spends per NEW action of the pack's name, as the real server, which reads them all on
        #: every take (about 18e-6 on loopback with in-memory storage); it widens the race window by as much.
        #: A sleep: it shows as latency, not as CPU
        self.take_cost = 0.0
        #: None, or the tokens accepted in ``Authorization: Bearer <token>``; anything else gets a 401
        self.accepted_tokens: set[str] | None = None

        self._faults: list[_Fault] = []
        self._outage: str | None = None
        self._running = False
        self._server: Any = None
        self._app = _fake_server.FakeFlyteApp(self)
        self._handlers = gevent.pool.Pool()  # unbounded; a Pool because the server wants one
        self._connections: set[Any] = set()
        self._changes = _Changes()
        # pack name -> {(label set, command) -> OrderedDict(action id -> ActionRecord)} of NEW actions, oldest
        # first. A take compares the heads of the groups whose labels fit, so its cost does not grow with the queue.
        self._queues: dict[str, dict[tuple[Any, ...], dict[str, ActionRecord]]] = {}
        self._open = 0  # actions NEW or PENDING
        self._seq = itertools.count()
        self._event_names: collections.Counter[str] = collections.Counter()
        self._id_middle = os.urandom(5).hex()
        self._id_counter = itertools.count(int.from_bytes(os.urandom(3), "big"))

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> "FakeFlyteApi":
        """Start listening (on the same port as before, after a :meth:`stop`). Returns the instance."""
        if not self._running:
            self._listen()
            self._running = True
        return self

    def stop(self) -> None:
        """Stop listening, close every open connection (keep-alive ones too) and end any outage. Idempotent."""
        self._running = False
        self._outage = None
        self._shut_down()

    def __enter__(self) -> "FakeFlyteApi":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port; the one actually bound once started."""
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port``, the value for ``FLYTE_API``."""
        if not self._port:
            raise RuntimeError("FakeFlyteApi has no port yet: call start() first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    def _listen(self) -> None:
        server = _fake_server.make_server(self.host, self._port, self._app, self._handlers, self._connections)
        server.start()
        self._server = server
        self._port = server.server_port

    def _shut_down(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        _fake_server.close_connections(self._connections)
        # Handlers still busy (sleeping in a delay, say) are abandoned; spare the caller if it is one of them.
        current = gevent.getcurrent()
        gevent.killall([g for g in self._handlers if g is not current], block=True, timeout=2)

    def __repr__(self) -> str:
        where = self.url if self._port else "unstarted"
        return (f"<FakeFlyteApi {where} packs={len(self.packs)} actions={len(self.actions)} "
                f"open={self._open} events={len(self.events)}>")

    def reset(self) -> None:
        """Forget every pack, action, event, recorded request and violation, as a server restarted on an empty
        database would, and clear the faults as :meth:`clear_faults` does; ``accepted_tokens`` stay. Packs still
        running get 404s and register again."""
        self.packs.clear()
        self.actions.clear()
        self.events.clear()
        self.violations.clear()
        self.requests.clear()
        self.errors.clear()
        self._queues.clear()
        self._open = 0
        self._event_names.clear()
        self.clear_faults()
        self._changes.notify()

    # --- packs ----------------------------------------------------------------------------------------------

    def delete_pack(self, pack_id: str) -> None:
        """Delete a pack, as ``DELETE /v1/packs/<id>`` does. Its actions survive. Raises KeyError if unknown."""
        del self.packs[pack_id]
        self._changes.notify()

    def wait_for_pack(self, name_or_id: str | None = None, timeout: float = 5.0) -> PackRecord:
        """Wait until a pack with this id, or else this name, is registered (any pack when None) and return it."""
        def ready() -> PackRecord | None:
            if name_or_id is None:
                return next(iter(self.packs.values()), None)
            if name_or_id in self.packs:
                return self.packs[name_or_id]
            return next((p for p in reversed(self.packs.values()) if p.name == name_or_id), None)

        def failure() -> str:
            wanted = "any pack" if name_or_id is None else f"a pack with id or name {name_or_id!r}"
            return f"{wanted} was not registered within {timeout} s; registered: {sorted(self.packs) or 'none'}"
        return self._wait(ready, timeout, failure)

    # --- actions --------------------------------------------------------------------------------------------

    def enqueue(self, pack_name: str, command: str, input: Any = None, labels: dict[str, str] | None = None) -> str:
        """Queue a NEW action for packs named *pack_name* whose labels include *labels*, as a flow step would.

        *input* is any JSON value, and the pack receives it as a real server delivers a flow's input: numbers are
        float64 (integers beyond 2**53 rounded, ``1.0`` written as ``1``), members whose value is null are left
        out, and null inside an array raises ValueError (the server cannot template it, so no flow could create
        such an action). :attr:`ActionRecord.input` holds the input as delivered. Returns the action id (24 hex
        digits).
        """
        if labels is not None and not all(type(k) is str and type(v) is str for k, v in labels.items()):
            raise TypeError(f"labels must map strings to strings, got {labels!r}")
        labels = dict(labels or {})
        input = as_flow_input(input)
        # Encode now: a bad input fails here, in the test, instead of as a 500 later; and takes stay cheap.
        input_json = go_json_encode(input)
        label_set = frozenset(labels.items())
        action = ActionRecord(
            id=self._new_id(), pack_name=pack_name, labels=labels, command=command, input=input,
            created_at=time.monotonic(), _seq=next(self._seq), _label_set=label_set,
            _queue_key=(label_set, command), _command_json=go_json_dumps(command), _input_json=input_json)
        self.actions[action.id] = action
        groups = self._queues.setdefault(pack_name, {})
        queue = groups.get(action._queue_key)
        if queue is None:
            # An OrderedDict, not a dict: a dict's first entry is found by skipping the slots of deleted ones,
            # which makes draining a long queue from the front quadratic.
            queue = groups[action._queue_key] = collections.OrderedDict()
        queue[action.id] = action
        self._open += 1
        self._changes.notify()
        return action.id

    def enqueue_many(self, pack_name: str, command: str, inputs: Iterable[Any],
                     labels: dict[str, str] | None = None) -> list[str]:
        """:meth:`enqueue` one action per input, in order. Returns their ids."""
        return [self.enqueue(pack_name, command, input, labels) for input in inputs]

    def create_actions(self, pack_name: str, command: str, count: int, input: Any = None,
                       labels: dict[str, str] | None = None) -> list[str]:
        """*count* actions with the same *input*: :meth:`enqueue_many` with ``[input] * count``, named like
        :meth:`FlyteServer.create_actions` so a test can give a pack a backlog on either server."""
        return self.enqueue_many(pack_name, command, [input] * count, labels)

    def action(self, action_id: str) -> ActionRecord:
        """The record of one action. Raises KeyError if unknown."""
        return self.actions[action_id]

    def new(self) -> list[ActionRecord]:
        """Actions nobody has taken yet."""
        return [a for a in self.actions.values() if a.state == NEW]

    def pending(self) -> list[ActionRecord]:
        """Actions taken but without a result."""
        return [a for a in self.actions.values() if a.state == PENDING]

    def wait_for_result(self, action_id: str, timeout: float = 5.0) -> ActionResult:
        """Wait for the result of one action. Raises AssertionError naming the action and its state on timeout."""
        return self.wait_for_results([action_id], timeout)[0]

    def wait_for_results(self, action_ids: Iterable[str], timeout: float = 5.0) -> list[ActionResult]:
        """Wait for the results of several actions; returned in the order of *action_ids*. Raises KeyError for an
        unknown id, AssertionError naming the late actions and their states on timeout."""
        actions = [self.actions[aid] for aid in action_ids]
        began = time.time()

        def ready() -> list[ActionResult] | None:
            results = [a.result for a in actions]
            if all(result is not None for result in results):
                return [ActionResult(r["event"], r["payload"], r["createdAt"]) for r in results if r is not None]
            return None

        def failure() -> str:
            late = [a for a in actions if a.result is None]
            return (f"{len(late)} of {len(actions)} actions have no result after {timeout} s: {_describe(late)}"
                    + self._explain_new(late, began))
        return self._wait(ready, timeout, failure)

    def wait_for_action(self, action_id: str, state: str | tuple[str, ...], timeout: float = 5.0) -> ActionRecord:
        """Wait until an action is in *state* (or one of a tuple of states), e.g. PENDING once a pack took it;
        return its record. Raises KeyError for an unknown id, AssertionError naming its state on timeout."""
        action = self.actions[action_id]
        states = (state,) if isinstance(state, str) else tuple(state)
        began = time.time()

        def failure() -> str:
            return (f"action {_describe([action])}, not {'/'.join(states)}, after {timeout} s"
                    + self._explain_new([action], began))
        return self._wait(lambda: action if action.state in states else None, timeout, failure)

    def wait_until_idle(self, timeout: float = 5.0) -> None:
        """Wait until no action is NEW or PENDING. Raises AssertionError listing the stragglers on timeout."""
        began = time.time()

        def failure() -> str:
            late = [a for a in self.actions.values() if a.state in (NEW, PENDING)]
            return f"{len(late)} actions still open after {timeout} s: {_describe(late)}" + \
                self._explain_new(late, began)
        self._wait(lambda: True if self._open == 0 else None, timeout, failure)

    def _explain_new(self, late: list[ActionRecord], began: float) -> str:
        """Why the NEW actions among *late* were not taken (see ``_flyte_server.why_not_taken``); "" when none
        is NEW."""
        return explain_new(sorted(late, key=lambda a: a._seq), self._sightings, began, self.url)

    def _sightings(self, action: ActionRecord) -> list[PackSighting]:
        """Every registered pack as ``_flyte_server.why_not_taken`` sees it, for *action*: packs that would take it
        also say how many actions they hold PENDING and how many NEW ones they would take first."""
        sightings = []
        for pack in self.packs.values():
            pending = queued = None
            if pack.name == action.pack_name and action._label_set <= pack._label_set:
                pending = sum(1 for a in self.actions.values() if a.state == PENDING and a.taken_by == pack.id)
                queued = sum(1 for a in self.actions.values()
                             if a.state == NEW and a.pack_name == pack.name and a._seq < action._seq
                             and a._label_set <= pack._label_set)
            sightings.append(PackSighting(pack.id, pack.name, pack.labels, pack._last_seen_ns / 1e9, pending, queued))
        return sightings

    # --- events and requests --------------------------------------------------------------------------------

    def wait_for_events(self, count: int, timeout: float = 5.0, name: str | None = None) -> list[ReceivedEvent]:
        """Wait until *count* events (named *name*, if given) have arrived; return the first *count* of them."""
        def ready() -> list[ReceivedEvent] | None:
            have = len(self.events) if name is None else self._event_names[name]
            if have < count:
                return None
            matching = self.events if name is None else (e for e in self.events if e.event == name)
            return list(itertools.islice(matching, count))

        def failure() -> str:
            what = "events" if name is None else f"events named {name!r}"
            seen = collections.Counter(e.event for e in self.events)
            return f"expected {count} {what} within {timeout} s; received {dict(seen) or 'none'}"
        return self._wait(ready, timeout, failure)

    def watch_events(self, pack_name: str, event: str, labels: dict[str, str] | None = None) -> None:
        """Nothing to do: the fake records every spontaneous event. A :class:`FlyteServer` needs it (it posts a flow
        that records matching events), so tests that run on both servers call it on both."""

    def requests_for(self, route: str | None) -> list[RecordedRequest]:
        """The recorded requests for one route (None: requests the server does not route)."""
        return [r for r in self.requests if r.route == route]

    def clear_requests(self) -> None:
        """Forget the recorded requests."""
        self.requests.clear()

    # --- faults ---------------------------------------------------------------------------------------------

    def fail(self, route: str | None, status: int, times: int | None = 1, *, body: bytes | str = b"",
             content_type: str = _HTML) -> None:
        """Answer the next *times* requests of *route* (every route when None) with *status* and an empty body,
        without processing them. *times* None: until :meth:`clear_faults`.

        With *body* (bytes, or text sent as UTF-8) the answer carries it, typed *content_type*: a proxy's error
        page, say (``fail("take", 502, body=b"<html>Bad Gateway</html>")``)."""
        if isinstance(body, str):
            body = body.encode("utf-8")
        headers = (("Content-Type", content_type),) if body else ()
        self._faults.append(_Fault("fail", _check_route(route), _check_times(times), status=int(status),
                                   headers=headers, body=bytes(body)))

    def garbage(self, route: str | None, body: bytes | str = PROXY_PAGE, status: int = 200, times: int | None = 1,
                content_type: str = _HTML) -> None:
        """Answer the next *times* requests of *route* with *body* instead of the server's answer, without
        processing them: what a pack gets when a proxy or captive portal answers for the API, by default an HTML
        page with status 200. :meth:`fail` with a body, for the status a pack would take as success."""
        self.fail(route, status, times, body=body, content_type=content_type)

    def drop_response(self, route: str | None, times: int | None = 1) -> None:
        """Process the next *times* requests of *route* normally, then close the connection without answering:
        the server did the work, the client never hears of it."""
        self._faults.append(_Fault("drop", _check_route(route), _check_times(times)))

    def delay(self, route: str | None, seconds: float, times: int | None = 1, before: bool = True) -> None:
        """Sleep *seconds* before processing the next *times* requests of *route* (*before*), or after processing
        them but before answering."""
        kind = "delay_before" if before else "delay_after"
        self._faults.append(_Fault(kind, _check_route(route), _check_times(times), seconds=float(seconds)))

    def outage(self, mode: str = "refuse") -> None:
        """Start an outage until :meth:`restore`.

        ``"refuse"`` closes the listening socket and every open connection, so connections are refused, and
        requests in progress are abandoned unanswered; ``"503"`` answers every request 503 with an empty body.
        """
        if mode not in ("refuse", "503"):
            raise ValueError(f"outage mode must be 'refuse' or '503', not {mode!r}")
        self._outage = mode
        if mode == "refuse":
            self._shut_down()
        elif self._running and self._server is None:  # from "refuse" to "503": listen, to answer 503
            self._listen()

    def restore(self) -> None:
        """End an outage; after ``"refuse"``, listen again on the same port."""
        self._outage = None
        if self._running and self._server is None:
            self._listen()

    def clear_faults(self) -> None:
        """Back to a healthy server: no pending faults, no outage, no latency, no race window, no take cost."""
        self._faults.clear()
        self.latency = 0.0
        self.race_window = 0.0
        self.take_cost = 0.0
        self.restore()

    def _next_fault(self, kind: str, route: str | None) -> _Fault | None:
        """Consume one use of the oldest fault of *kind* that applies to *route*."""
        for fault in self._faults:
            if fault.kind == kind and (fault.route is None or fault.route == route):
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                return fault
        return None

    # --- called by the HTTP side (flyte_gevent._fake_server) ------------------------------------------------

    def _record_request(self, route: str | None, method: str, path: str, query: str, headers: dict[str, str],
                        body: bytes) -> RecordedRequest:
        request = RecordedRequest(route, method, path, query, headers, body, None, time.monotonic())
        self.requests.append(request)
        return request

    def _violation(self, text: str) -> None:
        log.warning("FakeFlyteApi: %s", text)
        self.violations.append(text)

    def _internal_error(self, text: str) -> None:
        self.errors.append(text)

    def _touch(self, pack: PackRecord) -> None:
        now = time.time_ns()
        pack._last_seen_ns = now
        pack.last_seen = datetime.fromtimestamp(now / 1e9, UTC)

    def _upsert_pack(self, pid: str, view: dict[str, Any], body: Any) -> PackRecord:
        """Store a registration under *pid*; the last writer wins."""
        labels = dict(view["labels"] or {})
        now = time.time_ns()
        pack = self.packs.get(pid)
        fields = {"name": view["name"], "labels": labels, "body": body, "_view": view,
                  "_label_set": frozenset(labels.items()), "_last_seen_ns": now,
                  "last_seen": datetime.fromtimestamp(now / 1e9, UTC)}
        if pack is None:
            pack = self.packs[pid] = PackRecord(id=pid, registrations=1, **fields)
        else:
            pack.registrations += 1
            for key, value in fields.items():
                setattr(pack, key, value)
        self._changes.notify()
        return pack

    def _find_new(self, pack: PackRecord, action_name: str) -> ActionRecord | None:
        """The oldest NEW action for this pack's name whose labels are a subset of the pack's (and whose command
        is *action_name*, unless that is empty), or None."""
        groups = self._queues.get(pack.name)
        if not groups:
            return None
        best = None
        for (label_set, command), queue in groups.items():
            if action_name and command != action_name:
                continue
            if label_set and not label_set <= pack._label_set:
                continue
            head = next(iter(queue.values()))
            if best is None or head._seq < best._seq:
                best = head
        return best

    def _backlog(self, pack_name: str, action_name: str) -> int:
        """How many NEW actions of *pack_name* (and command *action_name*, unless empty) a take reads."""
        groups = self._queues.get(pack_name) or {}
        return sum(len(queue) for (_, command), queue in groups.items() if not action_name or command == action_name)

    def _claim(self, action: ActionRecord, pack: PackRecord) -> bool:
        """The conditional NEW -> PENDING update. False when the action is no longer NEW."""
        if action.state != NEW:
            return False
        action.state = PENDING
        action.taken_at = time.monotonic()
        action.taken_by = pack.id
        groups = self._queues[action.pack_name]
        queue = groups[action._queue_key]
        del queue[action.id]
        if not queue:
            del groups[action._queue_key]
            if not groups:
                del self._queues[action.pack_name]
        self._changes.notify()
        return True

    def _complete(self, action: ActionRecord, event: str, payload: Any, created_at: str | None) -> None:
        action.state = FATAL if event == FATAL else SUCCESS
        action.completed_at = time.monotonic()
        # As stored by the server, which decodes the payload into Go values: numbers are float64.
        action.result = {"event": event, "payload": as_go_value(payload), "createdAt": created_at}
        self._open -= 1
        self._changes.notify()

    def _add_event(self, pid: str, event: str, payload: Any, created_at: str | None, body: Any) -> None:
        self.events.append(ReceivedEvent(pid, event, as_go_value(payload), created_at, body))
        self._event_names[event] += 1
        self._changes.notify()

    # --- helpers ----------------------------------------------------------------------------------------------

    def _new_id(self) -> str:
        # Shaped like the server's MongoDB ObjectIds: time, a per-instance random part, a counter.
        return f"{int(time.time()) & 0xFFFFFFFF:08x}{self._id_middle}{next(self._id_counter) & 0xFFFFFF:06x}"

    def _wait(self, ready: Callable[[], _T | None], timeout: float, failure: Callable[[], str]) -> _T:
        deadline = time.monotonic() + timeout
        while True:
            result = ready()
            if result is not None:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(failure())
            self._changes.wait(remaining)


def _describe(actions: list[ActionRecord], limit: int = 10) -> str:
    """One clause per action, for assertion messages: id, command, pack, state and who took it."""
    clauses = []
    for action in actions[:limit]:
        text = f"{action.id} ({action.command!r} for {action.pack_name!r}"
        if action.labels:
            text += f" {action.labels!r}"
        text += f") is {action.state}"
        if action.taken_by is not None:
            text += f", taken by {action.taken_by!r}"
        clauses.append(text)
    if len(actions) > limit:
        clauses.append(f"and {len(actions) - limit} more")
    return "; ".join(clauses)


def _check_route(route: str | None) -> str | None:
    if route is not None and route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; routes are {', '.join(ROUTES)} (or None for all)")
    return route


def _check_times(times: int | None) -> int | None:
    if times is not None and times < 1:
        raise ValueError(f"times must be at least 1, or None for 'until cleared', not {times!r}")
    return times


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    """``python -m flyte_gevent.testing``: serve a FakeFlyteApi, with its control routes under ``/_fake/``, until
    SIGINT or SIGTERM, then exit 0."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m flyte_gevent.testing", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port, 0 for any free one (default %(default)s)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    parser.add_argument("--token", action="append", dest="tokens", metavar="TOKEN",
                        help="require Authorization: Bearer TOKEN (repeat to accept several)")
    args = parser.parse_args(argv)

    api = FakeFlyteApi(args.host, args.port, record_requests=False, control=True)
    api.latency = args.latency
    if args.tokens:
        api.accepted_tokens = set(args.tokens)
    if not _is_loopback(args.host):
        print(f"warning: listening on {args.host}: anyone who can reach this port can queue actions and read "
              f"results through /_fake/; the fake is meant for local use", file=sys.stderr, flush=True)
    stopping = gevent.event.Event()
    handlers = [gevent.signal_handler(signum, stopping.set) for signum in (signal.SIGINT, signal.SIGTERM)]
    try:
        api.start()
        print(f"FakeFlyteApi listening on {api.url}", flush=True)
        print(f"drive it with: flyte-gevent fake-api enqueue|results|events|packs|fail|reset --url {api.url}",
              flush=True)
        stopping.wait()
    finally:
        for handler in handlers:
            handler.cancel()
        api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
