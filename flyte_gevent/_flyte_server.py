"""FlyteServer: a real Flyte API, driven from tests the way flow authors and operators drive it.

On a real Flyte server an action exists only when a flow step creates it from an event: there is no "queue an
action" call. :class:`FlyteServer` does what a person would do by hand — register a trigger pack (a pack with events
and no commands), ``POST /v1/flows``, post the trigger's events, and read flow instances and their actions back from
the audit API (``GET /v1/audit/flows``) — and wraps it in the same helpers :class:`~flyte_gevent.testing.FakeFlyteApi`
offers (``enqueue``, ``wait_for_result``, ``wait_for_events``, ...), so one test can run against either.

It speaks plain HTTP through ``requests``, imported on first use, so importing this module (and
``flyte_gevent.testing``) loads neither ``requests`` nor ``ssl``. Waits sleep with ``time.sleep``, which is gevent's
in a monkey-patched process, so the pack under test keeps running in the same hub.

Usage::

    from flyte_gevent.testing import FlyteServer

    with FlyteServer("http://flyte:8080") as flyte:          # or FlyteServer.launch("/path/to/flyte-server")
        aid = flyte.enqueue("Shell", "Shell", "echo hi", labels={"env": "test"})
        ...                                                   # a Shell pack takes and completes it
        assert flyte.wait_for_result(aid).payload["stdout"] == "hi\\n"

Everything the helper creates on the server (its trigger pack and flows) is named after a random token, so several
helpers — and several test runs — can share one server; :meth:`FlyteServer.close` deletes them again. Actions and
the audit trail stay (the server has no call to delete them).
"""

import collections
import dataclasses
import datetime
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar, cast
from urllib.parse import quote, urlencode

from ._fake_server import as_flow_input, pack_id

_T = TypeVar("_T")

__all__ = [
    "ActionResult",
    "FlowInstance",
    "FlyteServer",
    "FlyteServerError",
    "ReceivedEvent",
    "ServerAction",
    "ServerPack",
    "TriggerPack",
]

NEW, PENDING, SUCCESS, FATAL = "NEW", "PENDING", "SUCCESS", "FATAL"
FINISHED = (SUCCESS, FATAL)

# How often waits ask the server again. Audit reads are cheap on a test server; this keeps waits responsive
# without flooding it.
_POLL_INTERVAL = 0.01

# pongo2 starts a tag, a variable or a comment at these; flows template every string they hold.
_TEMPLATE_OPENERS = ("{{", "{%", "{#")
_BRACE = re.compile(r"[{}]")
_BRACE_TAGS = {"{": "{% templatetag openbrace %}", "}": "{% templatetag closebrace %}"}

# What only the in-process fake can do; named in the AttributeError a FlyteServer raises for them.
_FAKE_ONLY = frozenset({
    "fail", "garbage", "drop_response", "delay", "outage", "restore", "clear_faults", "reset", "latency",
    "race_window", "take_cost", "accepted_tokens", "requests", "requests_for", "clear_requests", "violations",
    "errors", "packs", "actions", "events", "record_requests", "control",
})


@dataclasses.dataclass(frozen=True)
class PackSighting:
    """A registered pack as :func:`why_not_taken` sees it. ``last_seen`` is in seconds since the epoch (None when
    unknown); ``pending`` (actions it holds PENDING) and ``queued_before`` (NEW actions it would take before the
    one in question) are None where the server cannot tell."""

    id: str
    name: str
    labels: dict[str, str]
    last_seen: float | None
    pending: int | None = None
    queued_before: int | None = None


def why_not_taken(pack_name: str, labels: dict[str, str], packs, wait_began: float, url: str,
                  limit: int = 10) -> str:
    """Why no pack has taken a NEW action for packs named *pack_name* whose labels include *labels*, in words, for
    the assertion message of a wait that timed out. *packs* are the registered packs (:class:`PackSighting`),
    *wait_began* when the wait started (seconds since the epoch), *url* the API the packs should be pointed at.

    The server hands an action to a pack whose name is the action's, exactly, and whose labels include all of the
    action's; the first rule a registered pack breaks is the one named.
    """
    packs = list(packs)
    named = [p for p in packs if p.name == pack_name]
    if not named:
        if not packs:
            return f"no pack named {pack_name!r} is registered (no pack is)"
        names = sorted({p.name for p in packs})
        text = f"no pack named {pack_name!r} is registered; registered: {_first(names, limit)}"
        near = [n for n in names if n.casefold() == pack_name.casefold()]
        if near:
            verb = "is" if len(near) == 1 else "are"
            text += f"; names are case-sensitive: {_first(near, limit)} {verb} registered"
        return text
    wanted = labels.items()
    fitting = [p for p in named if wanted <= p.labels.items()]
    if not fitting:
        held = "; ".join(f"{p.id!r} has {p.labels!r}" if p.labels else f"{p.id!r} has no labels"
                         for p in named[:limit])
        if len(named) > limit:
            held += f"; and {len(named) - limit} more"
        if len(named) == 1:
            return (f"a pack named {pack_name!r} is registered, but its labels do not include the action's "
                    f"{labels!r}: {held}")
        return (f"packs named {pack_name!r} are registered, but none has labels that include the action's "
                f"{labels!r}: {held}")
    now = time.time()
    clauses = []
    for pack in fitting[:limit]:
        seen = pack.last_seen is not None and pack.last_seen >= wait_began
        if pack.last_seen is None:
            clause = f"pack {pack.id!r} would take it (last seen: unknown)"
        elif seen:
            clause = f"pack {pack.id!r} would take it and was seen {max(now - pack.last_seen, 0):.2f} s ago"
        else:
            clause = (f"pack {pack.id!r} would take it, but was not seen during this wait (last seen "
                      f"{max(now - pack.last_seen, 0):.2f} s ago)")
        busy = []
        if pack.pending:
            busy.append(f"it holds {_count(pack.pending, 'PENDING action')}")
        if pack.queued_before:
            verb = "is" if pack.queued_before == 1 else "are"
            busy.append(f"{_count(pack.queued_before, 'older NEW action')} {verb} queued before this one")
        if busy:
            clause += "; " + " and ".join(busy)
        if not seen:
            clause += f": is it running, and pointed at {url}?"
        elif not busy:
            clause += ": it may not have taken since (an idle pack takes once per polling interval)"
        clauses.append(clause)
    if len(fitting) > limit:
        clauses.append(f"and {len(fitting) - limit} more")
    return "; ".join(clauses)


def _first(names, limit):
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _count(number, noun):
    return f"{number} {noun}" + ("" if number == 1 else "s")


def explain_new(late, packs_for, wait_began, url) -> str:
    """Lines explaining, once per kind of action (pack name and labels), why the NEW ones among *late* were not
    taken; "" when none is NEW. *late* holds objects with ``state``, ``pack_name`` and ``labels``, oldest first;
    ``packs_for(action)`` gives the registered packs as :class:`PackSighting` for the oldest action of a kind."""
    kinds: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
    for action in late:
        if action.state == NEW:
            kinds.setdefault((action.pack_name, tuple(sorted(action.labels.items()))), action)
    lines = []
    for (pack_name, labels), action in kinds.items():
        what = f"{pack_name!r} {dict(labels)!r}" if labels else repr(pack_name)
        reason = why_not_taken(pack_name, dict(labels), packs_for(action), wait_began, url)
        lines.append(f"\n  NEW for {what}: {reason}")
    return "".join(lines)


class FlyteServerError(Exception):
    """The Flyte server answered something the helper did not expect, or could not be reached or started."""


@dataclasses.dataclass(frozen=True)
class ActionResult:
    """The outcome a pack posted for an action.

    ``created_at`` is the ``createdAt`` the pack sent: as a string exactly as sent (or None) on
    :class:`~flyte_gevent.testing.FakeFlyteApi`; as the real server stored it (UTC, milliseconds, the receive time
    when the pack sent none) on :class:`FlyteServer`.
    """

    event: str
    payload: Any
    created_at: str | None


@dataclasses.dataclass(frozen=True)
class ReceivedEvent:
    """A spontaneous event the server accepted.

    ``event`` is "" when the body had none (or was ``null``). ``created_at`` is the string sent, or None, on the fake;
    the server's stored time on a real server. ``body`` is the decoded body as received on the fake, None on a real
    server (which does not keep it).
    """

    pack_id: str
    event: str
    payload: Any
    created_at: str | None
    body: Any


@dataclasses.dataclass(frozen=True)
class ServerPack:
    """A pack as a real server reports it (``GET /v1/packs/<id>``); ``document`` is that response, decoded."""

    id: str
    name: str
    labels: dict[str, str]
    last_seen: str
    status: str
    document: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ServerAction:
    """One action as the audit API shows it.

    ``state`` is NEW, PENDING, SUCCESS or FATAL; ``states`` every ``(state, time)`` it went through. ``trigger`` is
    the event that created it (``{"event", "pack", "payload", "createdAt", "receivedAt"}``) and ``result`` the one
    that completed it, in the shape of ``FakeFlyteApi`` results (``{"event", "payload", "createdAt"}``), or None
    while it is open.
    """

    id: str
    correlation_id: str
    flow_name: str
    step_id: str
    command: str
    pack_name: str
    labels: dict[str, str]
    input: Any
    state: str
    states: tuple[tuple[str, str], ...]
    context: dict[str, str]
    trigger: dict[str, Any]
    result: dict[str, Any] | None

    @classmethod
    def from_audit(cls, document):
        state = document["state"]["value"]
        result = None
        if state in FINISHED:
            stored = document.get("result") or {}
            result = {"event": stored.get("event", ""), "payload": stored.get("payload"),
                      "createdAt": stored.get("createdAt")}
        return cls(
            id=document["id"], correlation_id=document.get("correlationId", ""),
            flow_name=document.get("flowName", ""), step_id=document.get("stepId", ""),
            command=document.get("name", ""), pack_name=document.get("packName", ""),
            labels=dict(document.get("packLabels") or {}), input=document.get("input"), state=state,
            states=tuple((s["value"], s["time"]) for s in document.get("states") or ()),
            context=dict(document.get("context") or {}), trigger=document.get("trigger") or {}, result=result)


@dataclasses.dataclass(frozen=True)
class FlowInstance:
    """One execution of a flow (one correlation id), with its actions by step id."""

    correlation_id: str
    flow_name: str
    steps: list[Any]
    actions: dict[str, ServerAction]

    @classmethod
    def from_audit(cls, document):
        actions = {step: ServerAction.from_audit(a) for step, a in (document.get("actions") or {}).items()}
        return cls(document["correlationId"], document.get("name", ""), document.get("steps") or [], actions)


class TriggerPack:
    """An events-only pack registered through a :class:`FlyteServer`: the source of events that start flows."""

    def __init__(self, server, name, labels, events):
        self.server = server
        self.name = name
        self.labels = dict(labels or {})
        self.id = pack_id(name, self.labels)
        self.events = list(events)

    def send(self, event: str, payload: Any = None) -> None:
        """Post *event* with *payload* as this pack; the server answers 202 and starts matching flows."""
        self.server.post_event(self.id, event, payload)

    def _declare(self, event):
        if event not in self.events:
            self.events.append(event)
            self.server._register_trigger(self)

    def __repr__(self):
        return f"<TriggerPack {self.id!r} events={self.events!r}>"


@dataclasses.dataclass
class _EnqueueFlow:
    """A one-step flow this helper posted to create actions of one kind: event *event* of the trigger pack
    becomes an action with this command, labels and input."""

    name: str
    event: str
    known: set[str] = dataclasses.field(default_factory=set)  # ids of the actions it created so far


class FlyteServer:
    """A real Flyte API server, for tests.

    :param url: the API root, as a pack's ``FLYTE_API`` (``http://host:port``).
    :param jwt: bearer token for servers with authentication on; sent only to *url*'s origin.
    :param timeout: seconds each request may take.
    :param verify: verify TLS certificates (a CA bundle path works too).

    Every helper request goes to *url* + a fixed API path; links in the server's answers are only read, never
    followed, so the token never leaves *url*'s origin. Instances are not thread-safe; use one per test.
    """

    def __init__(self, url: str, *, jwt: str | None = None, timeout: float = 10.0, verify: bool | str = True):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._jwt = jwt
        self._verify = verify
        self._session: Any = None  # a requests.Session, made on first use
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None
        #: the server's log file when started by :meth:`launch`, else None
        self.log_path: str | None = None
        self._token = uuid.uuid4().hex[:10]
        self._counter = itertools.count(1)
        self._trigger: TriggerPack | None = None
        self._flows: list[str] = []  # names of the flows posted through this helper, for close()
        self._enqueue_flows: dict[tuple[Any, ...], _EnqueueFlow] = {}
        self._watch_flows: list[tuple[str, str]] = []  # (flow name, event name)
        self._where: dict[str, tuple[str, str]] = {}  # action id -> (flow name, correlation id)

    # --- lifecycle ------------------------------------------------------------------------------------------

    @classmethod
    def launch(cls, binary: str, *, host: str = "127.0.0.1", environ: dict[str, str] | None = None,
               start_timeout: float = 10.0, **options: Any) -> "FlyteServer":
        """Start the ``flyte-server`` executable *binary* on a free port of *host* and return a helper for it.

        The server keeps its state in memory, so it starts empty. *environ* replaces the process environment
        (the server reads ``LOGLEVEL``, ``FLYTE_TTL_IN_SECONDS`` and the like from it). Its output goes to
        :attr:`log_path`. :meth:`close` stops it: SIGTERM, then SIGKILL after 5 s. Raises
        :class:`FlyteServerError` when it does not listen within *start_timeout* seconds.
        """
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            raise FlyteServerError(f"Flyte server binary {binary!r}: not an executable file")
        workdir = tempfile.mkdtemp(prefix="flyte-server-")
        # The server changes into its assets directory before it writes the port file: the path must be absolute.
        portfile = os.path.join(workdir, "port.json")
        log_path = os.path.join(workdir, "server.log")
        try:
            with open(log_path, "wb") as log:
                process = subprocess.Popen([binary, "-host", host, "-port", "0", "-portfile", portfile],
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           env=environ, preexec_fn=_die_with_parent())  # noqa: PLW1509 - see _die_with_parent
        except OSError as error:
            shutil.rmtree(workdir, ignore_errors=True)
            raise FlyteServerError(f"cannot start the Flyte server {binary!r}: {error}") from None
        try:
            port = _wait_for_portfile(process, portfile, start_timeout, log_path)
        except BaseException:
            _terminate(process)
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        url_host = f"[{host}]" if ":" in host else host
        server = cls(f"http://{url_host}:{port}", **options)
        server._process, server._workdir, server.log_path = process, workdir, log_path
        return server

    @property
    def pid(self) -> int | None:
        """The server's process id when started by :meth:`launch`, else None."""
        return self._process.pid if self._process is not None else None

    def close(self) -> None:
        """Undo what this helper created — its flows and trigger pack — or, for a server it launched, stop the
        server (its state goes with it). Idempotent; never raises for a server that is already gone."""
        if self._process is not None:
            _terminate(self._process)
            self._process = None
            shutil.rmtree(cast(str, self._workdir), ignore_errors=True)  # set with the process
        elif self._session is not None:
            for name in self._flows:
                self._quietly("DELETE", "/v1/flows/" + quote(name, safe=""))
            if self._trigger is not None:
                self._quietly("DELETE", "/v1/packs/" + quote(self._trigger.id, safe=""))
        self._flows.clear()
        self._trigger = None
        self._enqueue_flows.clear()
        self._watch_flows.clear()
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        launched = f" pid={self.pid}" if self._process is not None else ""
        return f"<FlyteServer {self.url}{launched}>"

    def __getattr__(self, name):
        if name in _FAKE_ONLY:
            raise AttributeError(
                f"FlyteServer has no {name!r}: fault injection and request records exist only on FakeFlyteApi, "
                f"the in-process fake (use the fake_flyte_api fixture for this test)")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def log_tail(self, lines: int = 20) -> str:
        """The last *lines* lines of a launched server's log ("" for a server this helper did not start)."""
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 64 * 1024))
            text = log.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    # --- packs ----------------------------------------------------------------------------------------------

    def register_pack(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/packs`` with *body* (a pack definition); returns the 201 response body."""
        document: dict[str, Any] = self._request("POST", "/v1/packs", json_body=body, expect=(201,)).json()
        return document

    def register_trigger_pack(self, name: str, events=(), labels: dict[str, str] | None = None) -> TriggerPack:
        """Register an events-only pack named *name* declaring *events*, to send flow-starting events from."""
        trigger = TriggerPack(self, name, labels, events)
        self._register_trigger(trigger)
        return trigger

    def _register_trigger(self, trigger):
        body = {"name": trigger.name, "events": [{"name": e} for e in trigger.events]}
        if trigger.labels:
            body["labels"] = trigger.labels
        self.register_pack(body)

    def get_pack(self, pack_id: str) -> ServerPack | None:
        """``GET /v1/packs/<id>``; None when the server does not know the id."""
        response = self._request("GET", "/v1/packs/" + quote(pack_id, safe=""), expect=(200, 404))
        return None if response.status_code == 404 else _server_pack(response.json())

    def wait_for_pack(self, name_or_id: str, timeout: float = 5.0) -> ServerPack:
        """Wait until a pack with this id, or else this name, is registered, and return it."""
        def ready() -> ServerPack | None:
            pack = self.get_pack(name_or_id)
            if pack is not None:
                return pack
            listed = self._request("GET", "/v1/packs").json().get("packs") or []
            for entry in listed:
                if entry.get("name") == name_or_id:
                    return self.get_pack(entry["id"])
            return None
        return self._wait(ready, timeout, lambda: f"no pack with id or name {name_or_id!r} registered within "
                                                  f"{timeout} s")

    def delete_pack(self, pack_id: str) -> None:
        """``DELETE /v1/packs/<id>``, as the dead-pack cleanup does; its actions survive. KeyError if unknown."""
        response = self._request("DELETE", "/v1/packs/" + quote(pack_id, safe=""), expect=(204, 404))
        if response.status_code == 404:
            raise KeyError(pack_id)

    # --- flows and events -----------------------------------------------------------------------------------

    def post_flow(self, flow: dict[str, Any] | str) -> str:
        """``POST /v1/flows``: a dict is sent as JSON, a string as YAML (``Content-Type: application/x-yaml``,
        exactly: with a charset the server parses it as JSON). Returns the flow's name; :meth:`close` deletes it.

        The server answers 500, not 400, to a flow that does not match its schema (``name`` and ``steps`` are
        required, each step needs ``event`` and ``command`` with ``packName`` and ``name``).
        """
        if isinstance(flow, str):
            response = self._request("POST", "/v1/flows", data=flow.encode("utf-8"),
                                     headers={"Content-Type": "application/x-yaml"}, expect=(201,))
        else:
            response = self._request("POST", "/v1/flows", json_body=flow, expect=(201,))
        name: str = response.headers.get("Location", "").rstrip("/").rpartition("/")[2]
        if not name and isinstance(flow, dict):
            name = flow.get("name", "")
        if name and name not in self._flows:
            self._flows.append(name)
        return name

    def delete_flow(self, name: str) -> None:
        """``DELETE /v1/flows/<name>``: no new executions start; running ones and the audit trail stay."""
        self._request("DELETE", "/v1/flows/" + quote(name, safe=""), expect=(204,))
        if name in self._flows:
            self._flows.remove(name)

    def post_event(self, pack_id: str, event: str, payload: Any = None) -> None:
        """Post a spontaneous event as pack *pack_id* (``POST /v1/packs/<id>/events``); expects 202. Flows start
        after the answer, asynchronously."""
        self._request("POST", f"/v1/packs/{quote(pack_id, safe='')}/events",
                      json_body={"event": event, "payload": payload}, expect=(202,))

    @property
    def flows(self) -> list[str]:
        """Names of the flows posted through this helper and not deleted yet."""
        return list(self._flows)

    @property
    def trigger(self) -> TriggerPack:
        """This helper's own trigger pack, registered on first use; :meth:`enqueue` and friends send through it."""
        if self._trigger is None:
            self._trigger = self.register_trigger_pack(f"FlyteGeventTests{self._token}")
        trigger: TriggerPack = self._trigger
        return trigger

    def unique_name(self, prefix: str) -> str:
        """*prefix* followed by this helper's token and a counter: a flow or pack name no other test uses."""
        return f"{prefix}{self._token}n{next(self._counter)}"

    # --- the audit API --------------------------------------------------------------------------------------

    def flow_instances(self, flow_name: str | None = None, *, step_id: str | None = None,
                       action_name: str | None = None, action_pack_name: str | None = None,
                       limit: int = 50) -> list[FlowInstance]:
        """``GET /v1/audit/flows``: executions, most recently changed first, filtered like the server filters."""
        query = {"limit": str(limit)}
        for key, value in (("flowName", flow_name), ("stepId", step_id), ("actionName", action_name),
                           ("actionPackName", action_pack_name)):
            if value is not None:
                query[key] = value
        document = self._request("GET", "/v1/audit/flows?" + urlencode(query)).json()
        return [FlowInstance.from_audit(flow) for flow in document.get("flows") or ()]

    def flow_instance(self, correlation_id: str) -> FlowInstance | None:
        """``GET /v1/audit/flows/<correlation id>``; None when unknown."""
        response = self._request("GET", "/v1/audit/flows/" + quote(correlation_id, safe=""), expect=(200, 404))
        return None if response.status_code == 404 else FlowInstance.from_audit(response.json())

    def wait_for_step(self, flow_name: str, step_id: str, state: str | tuple[str, ...] | None = None, count: int = 1,
                      timeout: float = 5.0) -> list[ServerAction]:
        """Wait until *count* executions of *flow_name* have an action for *step_id* in *state* (a state, a tuple
        of states, or None for any); return those actions, oldest first."""
        states = (state,) if isinstance(state, str) else state

        def ready() -> list[ServerAction] | None:
            found = [i.actions[step_id] for i in self.flow_instances(flow_name, limit=max(50, count * 2))
                     if step_id in i.actions and (states is None or i.actions[step_id].state in states)]
            return sorted(found, key=_creation_order) if len(found) >= count else None

        def failure() -> str:
            seen = collections.Counter(f"{step}={action.state}"
                                       for instance in self.flow_instances(flow_name, limit=max(50, count * 2))
                                       for step, action in instance.actions.items())
            wanted = "any state" if states is None else "/".join(states)
            text = (f"flow {flow_name!r}: expected {count} action(s) of step {step_id!r} in {wanted} within "
                    f"{timeout} s; actions by step and state: {dict(seen) or 'none'}")
            tail = self.log_tail(5)
            return text + (f"; server log:\n{tail}" if tail else "")
        return self._wait(ready, timeout, failure)

    # --- what FakeFlyteApi offers, on a real server ---------------------------------------------------------

    def enqueue(self, pack_name: str, command: str, input: Any = None,
                labels: dict[str, str] | None = None, timeout: float = 5.0) -> str:
        """Create a NEW action for packs named *pack_name* whose labels include *labels*, and return its id.

        It posts (once per kind of action) a one-step flow whose command is *command* with *input* as a literal —
        its strings escaped, so they arrive verbatim — then sends the flow's event through :attr:`trigger` and
        waits until the action exists. *input* reaches the pack as a flow delivers it: numbers as float64,
        members whose value is null left out; null inside an array is refused (ValueError), since the server's
        flow engine cannot template it and would create no action.
        """
        return self.enqueue_many(pack_name, command, [input], labels, timeout=timeout)[0]

    def enqueue_many(self, pack_name: str, command: str, inputs, labels: dict[str, str] | None = None,
                     timeout: float = 5.0) -> list[str]:
        """:meth:`enqueue` one action per input, created in order (so taken in order); returns their ids."""
        inputs = list(inputs)
        keys = [_input_key(input) for input in inputs]
        ids = []
        start = 0
        while start < len(inputs):
            # A run of equal inputs shares one flow; its events can all be sent before waiting.
            end = start + 1
            while end < len(inputs) and keys[end] == keys[start]:
                end += 1
            ids.extend(self.create_actions(pack_name, command, end - start, inputs[start], labels, timeout=timeout))
            start = end
        return ids

    def create_actions(self, pack_name: str, command: str, count: int, input: Any = None,
                       labels: dict[str, str] | None = None, timeout: float | None = None) -> list[str]:
        """Create *count* NEW actions quickly — one flow, *count* events — and wait until they all exist; returns
        their ids, oldest first. The way to give a pack a backlog on a real server. *timeout* defaults to 5 s plus
        5 ms per action."""
        if count < 1:
            return []
        labels = dict(labels or {})
        if not all(type(k) is str and type(v) is str for k, v in labels.items()):
            raise TypeError(f"labels must map strings to strings, got {labels!r}")
        as_flow_input(input)  # refuse what the flow engine could not deliver, before posting anything
        flow = self._enqueue_flow(pack_name, command, labels, input)
        for _ in range(count):
            self.post_event(self.trigger.id, flow.event, None)
        timeout = 5.0 + 0.005 * count if timeout is None else timeout
        wanted = len(flow.known) + count

        def ready() -> list[ServerAction] | None:
            instances = self.flow_instances(flow.name, limit=wanted)
            if len(instances) < wanted:
                return None
            fresh = [i.actions["enqueue"] for i in instances
                     if "enqueue" in i.actions and i.actions["enqueue"].id not in flow.known]
            return sorted(fresh, key=_creation_order) if len(fresh) >= count else None

        def failure() -> str:
            made = len(self.flow_instances(flow.name, limit=wanted)) - len(flow.known)
            text = (f"the server created {made} of {count} actions ({command!r} for {pack_name!r}) within "
                    f"{timeout} s of their events")
            tail = self.log_tail(5)
            return text + (f"; server log:\n{tail}" if tail else "")
        actions = self._wait(ready, timeout, failure)
        for action in actions:
            flow.known.add(action.id)
            self._where[action.id] = (flow.name, action.correlation_id)
        return [a.id for a in actions]

    def action(self, action_id: str) -> ServerAction:
        """The action as the audit API shows it now. KeyError for an id this helper did not create."""
        flow_name, correlation_id = self._where[action_id]
        instance = self.flow_instance(correlation_id)
        for action in (instance.actions.values() if instance else ()):
            if action.id == action_id:
                return action
        raise FlyteServerError(f"action {action_id} is missing from the audit of flow {flow_name!r}")

    def new(self) -> list[ServerAction]:
        """Actions created by this helper that nobody has taken yet."""
        return [a for a in self._own_actions() if a.state == NEW]

    def pending(self) -> list[ServerAction]:
        """Actions created by this helper that were taken but have no result."""
        return [a for a in self._own_actions() if a.state == PENDING]

    def wait_for_result(self, action_id: str, timeout: float = 5.0) -> ActionResult:
        """Wait for the result of one action. Raises AssertionError naming the action and its state on timeout."""
        return self.wait_for_results([action_id], timeout)[0]

    def wait_for_results(self, action_ids, timeout: float = 5.0) -> list[ActionResult]:
        """Wait for the results of several actions; returned in the order of *action_ids*. KeyError for an id
        this helper did not create; AssertionError naming the late actions and their states on timeout."""
        action_ids = list(action_ids)
        for aid in action_ids:
            self._where[aid]  # KeyError early for an unknown id
        done: dict[str, ServerAction] = {}
        began = time.time()

        def ready() -> list[ActionResult] | None:
            open_ids = [aid for aid in action_ids if aid not in done]
            for action in self._fetch(open_ids):
                if action.state in FINISHED:
                    done[action.id] = action
            if len(done) < len(action_ids):
                return None
            return [_action_result(done[aid]) for aid in action_ids]

        def failure() -> str:
            late = self._fetch([aid for aid in action_ids if aid not in done])
            return (f"{len(action_ids) - len(done)} of {len(action_ids)} actions have no result after {timeout} s: "
                    + "; ".join(_describe(a) for a in late[:10])
                    + self._explain_new(late, began))
        return self._wait(ready, timeout, failure)

    def wait_for_action(self, action_id: str, state: str | tuple[str, ...], timeout: float = 5.0) -> ServerAction:
        """Wait until an action this helper created is in *state* (or one of a tuple of states), e.g. PENDING
        once a pack took it; return it. KeyError for an unknown id, AssertionError naming its state on timeout."""
        self._where[action_id]  # KeyError early for an unknown id
        states = (state,) if isinstance(state, str) else tuple(state)
        began = time.time()

        def ready() -> ServerAction | None:
            action = self.action(action_id)
            return action if action.state in states else None

        def failure() -> str:
            action = self.action(action_id)
            return (f"action {_describe(action)}, not "
                    f"{'/'.join(states)}, after {timeout} s" + self._explain_new([action], began))
        return self._wait(ready, timeout, failure)

    def wait_until_idle(self, timeout: float = 5.0) -> None:
        """Wait until no action this helper created is NEW or PENDING."""
        began = time.time()

        def failure() -> str:
            late = [a for a in self._own_actions() if a.state not in FINISHED]
            return f"{len(late)} actions still open after {timeout} s: " + "; ".join(
                _describe(a) for a in late[:10]) + self._explain_new(late, began)
        self._wait(lambda: True if all(a.state in FINISHED for a in self._own_actions()) else None, timeout, failure)

    def watch_events(self, pack_name: str, event: str, labels: dict[str, str] | None = None) -> str:
        """Record events named *event* from packs named *pack_name* (whose labels include *labels*), for
        :meth:`wait_for_events`. A real server keeps no log of events, so this posts a flow they trigger; its
        actions go to a pack nobody runs and stay NEW. Results are events too on a real server: an action
        completed with *event* by such a pack is recorded as well. Returns the flow's name."""
        name = self.unique_name("flyte_gevent_watch_")
        step: dict[str, Any] = {"id": "watch", "event": {"packName": pack_name, "name": event},
                "command": {"packName": f"FlyteGeventSink{self._token}", "name": "Record"}}
        if labels:
            step["event"]["packLabels"] = {k: _literal(v) for k, v in labels.items()}
        self.post_flow({"name": name, "description": "flyte_gevent.testing: records events", "steps": [step]})
        self._watch_flows.append((name, event))
        return name

    def wait_for_events(self, count: int, timeout: float = 5.0, name: str | None = None) -> list[ReceivedEvent]:
        """Wait until *count* watched events (named *name*, if given) have arrived; return the first *count*,
        oldest first — as the server timed their arrival, to the millisecond (events within one millisecond may
        come in either order). Only events a :meth:`watch_events` flow matched are seen."""
        flows = [flow for flow, event in self._watch_flows if name is None or event == name]
        if not flows:
            raise ValueError(f"no watch_events() for {'any event' if name is None else repr(name)}: a real server "
                             f"keeps no log of events, call watch_events(pack_name, event) first")

        def received():
            events = []
            for flow in flows:
                for instance in self.flow_instances(flow, limit=max(50, count * 2)):
                    action = instance.actions.get("watch")
                    if action is not None:
                        received_at = _time_key(action.trigger.get("receivedAt", ""))
                        events.append(((received_at, _creation_order(action)), _received_event(action.trigger)))
            return [event for _, event in sorted(events, key=lambda pair: pair[0])]

        def ready() -> list[ReceivedEvent] | None:
            events = received()
            return events[:count] if len(events) >= count else None

        def failure() -> str:
            seen = collections.Counter(event.event for event in received())
            what = "watched events" if name is None else f"events named {name!r}"
            return f"expected {count} {what} within {timeout} s; received {dict(seen) or 'none'}"
        return self._wait(ready, timeout, failure)

    # --- internals ------------------------------------------------------------------------------------------

    def _enqueue_flow(self, pack_name, command, labels, input):
        key = (pack_name, command, tuple(sorted(labels.items())), _input_key(input))
        flow = self._enqueue_flows.get(key)
        if flow is None:
            number = next(self._counter)
            flow = _EnqueueFlow(name=f"flyte_gevent_{self._token}_enqueue{number}", event=f"Enqueue{number}")
            command_def = {"packName": pack_name, "name": command, "input": _literal(input)}
            if labels:
                command_def["packLabels"] = {k: _literal(v) for k, v in labels.items()}
            self.post_flow({"name": flow.name, "description": "flyte_gevent.testing: creates actions",
                            "steps": [{"id": "enqueue", "event": {"packName": self.trigger.name, "name": flow.event},
                                       "command": command_def}]})
            self.trigger._declare(flow.event)
            self._enqueue_flows[key] = flow
        return flow

    def _explain_new(self, late: list[ServerAction], began: float) -> str:
        """Why the NEW actions among *late* were not taken, from the packs the server lists (see
        :func:`why_not_taken`); "" when none is NEW."""
        if not any(action.state == NEW for action in late):
            return ""
        listed = self._request("GET", "/v1/packs").json().get("packs") or []
        sightings = [PackSighting(entry.get("id", ""), entry.get("name", ""), dict(entry.get("labels") or {}),
                                  _epoch_seconds(entry.get("lastSeen")))
                     for entry in listed]
        return explain_new(sorted(late, key=_creation_order), lambda action: sightings, began, self.url)

    def _own_actions(self) -> list[ServerAction]:
        return self._fetch(list(self._where))

    def _fetch(self, action_ids: list[str]) -> list[ServerAction]:
        """The current state of these actions (created by this helper), one audit request per flow."""
        by_flow: dict[str, set[str]] = {}
        for aid in action_ids:
            by_flow.setdefault(self._where[aid][0], set()).add(aid)
        found: list[ServerAction] = []
        for flow_name, ids in by_flow.items():
            if len(ids) == 1:
                [aid] = ids
                instance = self.flow_instance(self._where[aid][1])
                instances = [instance] if instance else []
            else:
                known = sum(1 for where in self._where.values() if where[0] == flow_name)
                instances = self.flow_instances(flow_name, limit=known)
            found.extend(a for i in instances for a in i.actions.values() if a.id in ids)
        return found

    def _http(self):
        if self._session is None:
            import requests  # here, not at import time: importing flyte_gevent.testing must not load ssl

            session = requests.Session()
            session.headers["Accept"] = "application/json"
            if self._jwt:
                session.headers["Authorization"] = f"Bearer {self._jwt}"
            session.verify = self._verify
            session.trust_env = False  # no proxies from the environment, and no .netrc credentials
            self._session = session
        return self._session

    def _request(self, method, path, *, json_body=None, data=None, headers=None, expect=(200,)):
        import requests

        url = self.url + path
        try:
            response = self._http().request(method, url, json=json_body, data=data, headers=headers,
                                            timeout=self.timeout, allow_redirects=False)
        except requests.RequestException as error:
            text = f"{method} {url} failed: {type(error).__name__}: {error}"
            if self._process is not None and self._process.poll() is not None:
                text += f"; the server exited with {self._process.returncode}; log:\n{self.log_tail()}"
            raise FlyteServerError(text) from None
        if response.status_code not in expect:
            excerpt = response.text[:200].strip()
            raise FlyteServerError(f"{method} {url} answered {response.status_code}, expected "
                                   f"{' or '.join(map(str, expect))}" + (f": {excerpt}" if excerpt else ""))
        return response

    def _quietly(self, method, path):
        try:
            self._request(method, path, expect=(200, 202, 204, 404))
        except FlyteServerError:
            pass

    def _wait(self, ready: Callable[[], _T | None], timeout: float, failure: Callable[[], str]) -> _T:
        deadline = time.monotonic() + timeout
        while True:
            result = ready()
            if result is not None:
                return result
            if time.monotonic() >= deadline:
                raise AssertionError(failure())
            time.sleep(_POLL_INTERVAL)


def _literal(value):
    """*value* written into a flow so that templating gives it back unchanged: braces in strings that pongo2
    would read as template syntax are written as ``{% templatetag %}`` tags."""
    if isinstance(value, str):
        if any(opener in value for opener in _TEMPLATE_OPENERS):
            return _BRACE.sub(lambda match: _BRACE_TAGS[match.group()], value)
        return value
    if isinstance(value, dict):
        return {key: _literal(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_literal(item) for item in value]
    return value


def _input_key(input):
    # JSON text, so that 1, 1.0 and True (equal in Python) stay different kinds of action.
    return json.dumps(input, sort_keys=True)


def _creation_order(action):
    # The order the server hands actions out in: by the time they became NEW (milliseconds, as stored), ties
    # broken by id (ObjectIds grow within one server process).
    return _time_key(action.states[0][1] if action.states else ""), action.id


def _time_key(text):
    """A sort key for Go's RFC 3339 UTC times, whose fractions drop trailing zeros ("…:05Z", "…:05.12Z")."""
    seconds, _, fraction = text.rstrip("Z").partition(".")
    return seconds, fraction.ljust(9, "0")


def _action_result(action):
    return ActionResult(action.result["event"], action.result["payload"], action.result["createdAt"])


def _received_event(trigger):
    pack = trigger.get("pack") or {}
    return ReceivedEvent(pack_id=pack.get("id", ""), event=trigger.get("event", ""), payload=trigger.get("payload"),
                         created_at=trigger.get("createdAt"), body=None)


def _describe(action: ServerAction) -> str:
    """An action in an assertion message, as ``FakeFlyteApi`` writes it: id, command, pack name, labels, state."""
    labels = f" {action.labels!r}" if action.labels else ""
    return f"{action.id} ({action.command!r} for {action.pack_name!r}{labels}) is {action.state}"


def _epoch_seconds(text):
    """A Go RFC 3339 time as seconds since the epoch; None when it is missing or unreadable."""
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _server_pack(document):
    return ServerPack(id=document.get("id", ""), name=document.get("name", ""),
                      labels=dict(document.get("labels") or {}), last_seen=document.get("lastSeen", ""),
                      status=document.get("status", ""), document=document)


def _wait_for_portfile(process, portfile, timeout, log_path):
    deadline = time.monotonic() + timeout
    while True:
        if os.path.exists(portfile):
            with open(portfile) as f:
                return int(json.load(f)["port"])
        if process.poll() is not None:
            with open(log_path, "rb") as log:
                tail = log.read().decode("utf-8", "replace").strip().splitlines()[-10:]
            raise FlyteServerError(f"the Flyte server exited with {process.returncode} before listening; log:\n"
                                   + "\n".join(tail))
        if time.monotonic() >= deadline:
            raise FlyteServerError(f"the Flyte server did not listen within {timeout} s (no {portfile})")
        time.sleep(0.01)


def _die_with_parent():
    """On Linux, a ``preexec_fn`` that has the kernel kill the server when the process that started it dies, so
    not even a test run killed with SIGKILL leaves it behind. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def set_death_signal():
        prctl(pr_set_pdeathsig, signal.SIGKILL)
    return set_death_signal


def _terminate(process):
    """SIGTERM (the server removes its unpacked assets and exits), then SIGKILL if it is still there after 5 s."""
    if process.poll() is None:
        try:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        except OSError:
            pass
