"""Health checks and the pack's health server.

A health check is a callable returning ``(name, Health(healthy, status))``, as in
the Go client. The health server is a ``gevent.pywsgi.WSGIServer`` running
:class:`HealthApp`, which answers:

=============  ============================================================
``/livez``     200 while the pack's service greenlets are alive, else 503
``/readyz``    200 when registered and taking actions, 503 before
               registration and while shutting down
``/metrics``   Prometheus metrics (404 without prometheus_client)
anything else  the Go client's JSON map ``{"<check>": {"healthy", "status"}}``,
               200 when every check is healthy, 500 otherwise (``/`` and
               ``/healthz`` included, since Go answered every path)
=============  ============================================================

Checks run concurrently, each under a timeout; a check that raises, hangs or
returns garbage is reported unhealthy under its ``__name__`` while the others are
still reported. Checks that report the same name are all kept, the second as
``name#2`` and so on (with one warning), so a healthy check never hides an
unhealthy one. Probes never call the Flyte API unless a check does
(:func:`flyte_api_health_check`).

The port is often reachable from far more than the kubelet, so the server bounds
what any client can hold (see :class:`HealthServer`): each request must arrive
within ``request_timeout``, its head within ``max_request_head`` bytes, and past
``max_connections`` the connection that has waited longest for a request is
closed to make room, so a probe is answered however many idle connections are
open.
"""

import dataclasses
import errno
import json
import logging
import socket
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, cast
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import gevent
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer

from .errors import ConfigError
from .models import hook_name

if TYPE_CHECKING:
    from .client import Client

__all__ = ["Health", "HealthApp", "HealthServer", "default_check", "flyte_api_health_check", "mount"]

log = logging.getLogger(__name__)

#: Seconds a request may take to arrive, counted from when the server starts
#: waiting for it (the connection's accept, or the end of the previous answer).
REQUEST_TIMEOUT = 5.0
#: Connections open at once; past it the longest-waiting one is closed.
MAX_CONNECTIONS = 256
#: Bytes of request line and headers one request may send.
MAX_REQUEST_HEAD = 8192


@dataclasses.dataclass(frozen=True)
class Health:
    """The outcome of one health check.

    :param healthy: whether this part of the pack works.
    :param status: any JSON value describing it.
    """

    healthy: bool
    status: object = None


Check = Callable[[], tuple[str, Health]]
"""A Go-style health check: called with nothing, returns a name and a :class:`Health`."""


class PackState(Protocol):
    """What :class:`HealthApp` asks the pack: whether it is alive and ready, each with a reason."""

    def live(self) -> tuple[bool, str]: ...

    def ready(self) -> tuple[bool, str]: ...


class MetricsApp(Protocol):
    """What :class:`HealthApp` serves ``/metrics`` from (see :mod:`flyte_gevent.metrics`)."""

    @property
    def wsgi_app(self) -> WSGIApplication: ...


def default_check() -> tuple[str, Health]:
    """The check a pack gets when it is given none (same name and text as Go's)."""
    return "DefaultCheck", Health(True, "Pack is running.")


def flyte_api_health_check(client: "Client") -> Check:
    """A check that asks the Flyte API's health URL and is unhealthy when that fails.

    Unlike the Go client's (always healthy), it reports what it finds. Do not use
    it for liveness: an API outage would then restart every pack.
    """
    def FlyteApi() -> tuple[str, Health]:  # noqa: N802 - the name is the key in the health JSON
        healthy, message = client.check_health()
        return "FlyteApi", Health(healthy, message)

    return FlyteApi



def _run_check(check: Check) -> tuple[str, Health]:
    try:
        result = check()
    except Exception as exc:  # noqa: BLE001 - a failing check reports unhealthy, naming its exception
        return hook_name(check), Health(False, f"{type(exc).__name__}: {exc}")
    if (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], str)
            and isinstance(result[1], Health)):
        return result
    return hook_name(check), Health(False, f"check returned {type(result).__name__}, expected (name, Health)")


class HealthApp:
    """The WSGI app behind the health server; mountable in another WSGI app (see :func:`mount`).

    :param state: an object with ``live()`` and ``ready()`` methods returning
        ``(ok, reason)`` (the :class:`~flyte_gevent.Pack`).
    :param checks: health check callables (the default check when empty).
    :param check_timeout: seconds a check may take before it is reported unhealthy.
    :param metrics: an object with a ``wsgi_app`` (see :mod:`flyte_gevent.metrics`).
    """

    def __init__(self, state: PackState, checks: Iterable[Check] | None = None, check_timeout: float = 5.0,
                 metrics: MetricsApp | None = None) -> None:
        self.state = state
        self.checks: list[Check] = list(checks) if checks else [default_check]
        self.check_timeout = check_timeout
        self.metrics = metrics
        #: Greenlets running a check right now (a pack lets a check call its ``stop()`` without waiting on itself).
        self.check_greenlets: set[gevent.Greenlet[Any, Any]] = set()
        # The greenlet of the run in progress, which concurrent requests share.
        self._run: gevent.Greenlet[[], tuple[bool, dict[str, Any]]] | None = None
        self._warned_names: set[str] = set()
        seen: set[int] = set()
        for check in self.checks:
            if id(check) in seen:
                raise ConfigError(f"health_checks: the health check {hook_name(check)!r} is listed twice",
                                  "health_checks")
            seen.add(id(check))

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/livez":
            return self._probe(start_response, *self.state.live())
        if path == "/readyz":
            return self._probe(start_response, *self.state.ready())
        if path == "/metrics" and self.metrics is not None:
            return self.metrics.wsgi_app(environ, start_response)
        status, document = self.run_checks()
        return _json(start_response, "200 OK" if status else "500 Internal Server Error", document)

    def run_checks(self) -> tuple[bool, dict[str, Any]]:
        """Run every check concurrently; ``(all_healthy, {name: {"healthy", "status"}})``.

        Requests that arrive while a run is in progress share its answer instead
        of starting their own: a flood of requests to the health port then costs
        whatever the checks call (the Flyte API, a database) one run at a time.
        A request cut short leaves the shared run to finish, within the check
        timeout.
        """
        if self._run is None or self._run.dead:
            self._run = gevent.spawn(self._run_once)
            self._run.name = "health-checks"
        return self._run.get()

    def _run_once(self) -> tuple[bool, dict[str, Any]]:
        greenlets = [gevent.spawn(_run_check, check) for check in self.checks]
        self.check_greenlets.update(greenlets)
        try:
            gevent.joinall(greenlets, timeout=self.check_timeout)
        finally:
            # Checks past their timeout are not left running.
            gevent.killall([greenlet for greenlet in greenlets if not greenlet.dead], block=False)
            self.check_greenlets.difference_update(greenlets)
        results: dict[str, dict[str, Any]] = {}
        for check, greenlet in zip(self.checks, greenlets):
            if greenlet.successful():
                name, health = cast("tuple[str, Health]", greenlet.value)
            else:
                name = hook_name(check)
                health = Health(False, f"health check timed out after {self.check_timeout:g} s")
            results[self._unique(name, results)] = {"healthy": bool(health.healthy), "status": health.status}
        healthy = all(entry["healthy"] for entry in results.values())
        return healthy, dict(sorted(results.items()))

    def _unique(self, name: str, results: dict[str, Any]) -> str:
        """*name*, or ``name#2``, ``name#3``... when an earlier check of this run took it.

        Names are only known once checks have run, so a clash cannot be refused
        up front; keeping every entry means an unhealthy check is never hidden
        behind a healthy one of the same name. Checks run in list order, so each
        keeps its key from one request to the next.
        """
        if name not in results:
            return name
        number = 2
        while f"{name}#{number}" in results:
            number += 1
        key = f"{name}#{number}"
        if name not in self._warned_names:
            self._warned_names.add(name)
            log.warning("two health checks are named %r: the later one is reported as %r; give each check its "
                        "own name", name, key)
        return key

    @staticmethod
    def _probe(start_response: StartResponse, ok: bool, reason: str) -> list[bytes]:
        return _json(start_response, "200 OK" if ok else "503 Service Unavailable",
                     {"status": "ok" if ok else "unavailable", "reason": reason})


def _json(start_response: StartResponse, status: str, document: object) -> list[bytes]:
    body = json.dumps(document, default=str).encode()
    start_response(status, [("Content-Type", "application/json; charset=utf-8"),
                            ("Content-Length", str(len(body)))])
    return [body]


def mount(app: WSGIApplication, health_app: WSGIApplication, prefix: str = "/flyte") -> WSGIApplication:
    """Serve *health_app* under *prefix* inside the WSGI *app* (no second port).

    Usage::

        application = mount(application, pack.health_app, prefix="/flyte")
        # GET /flyte/readyz, /flyte/livez, /flyte/metrics, /flyte/healthz
    """
    prefix = "/" + prefix.strip("/")

    def dispatch(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or ""
        if path == prefix or path.startswith(prefix + "/"):
            environ = dict(environ)
            environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + prefix
            environ["PATH_INFO"] = path[len(prefix):] or "/"
            return health_app(environ, start_response)
        return app(environ, start_response)

    return dispatch


class HealthServer:
    """The pack's health port: a ``gevent.pywsgi`` server for a :class:`HealthApp`.

    Anyone who can reach the port is a client, so what one can hold is bounded
    and none of it can keep a probe from being answered:

    * **time**: a request (request line, headers and any body) must arrive within
      *request_timeout* seconds of when the server starts waiting for it, however
      the bytes trickle in; otherwise the connection is closed (``408`` once part
      of a request has arrived). An idle keep-alive connection is closed after
      the same time. Every send is bounded by it too.
    * **size**: a request head over *max_request_head* bytes is answered ``431``
      and closed; a request with a body is answered, then closed.
    * **connections**: when a new connection would make more than
      *max_connections*, the one that has waited longest for a request is
      closed. A probe sends its request as soon as it connects, so it gets in
      however many idle connections a client opens; connections being answered
      (for at most the check timeout) are never cut.

    Malformed requests are logged at DEBUG only: a client's mistake is not the
    pack's, and a hostile client must not be able to flood the pack's log.

    :param port: 0 binds a free port; read :attr:`port` after :meth:`start`.
    """

    def __init__(self, app: WSGIApplication, host: str = "0.0.0.0", port: int = 8090, *,
                 request_timeout: float = REQUEST_TIMEOUT, max_connections: int = MAX_CONNECTIONS,
                 max_request_head: int = MAX_REQUEST_HEAD) -> None:
        self.app = app
        self.host = host
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.max_request_head = max_request_head
        self._requested_port = port
        self._server: _Server | None = None

    @property
    def port(self) -> int | None:
        """The bound port (``None`` before start)."""
        return self._server.server_port if self._server is not None else None

    def start(self) -> None:
        """Start listening.

        :raises ConfigError: the port is taken or not allowed, or the host is not
            an address of this machine (naming the setting to change).
        """
        if self._server is not None:
            return
        server = _Server((self.host, self._requested_port), self.app, log=None, error_log=log, spawn=Pool(),
                         handler_class=_Handler, request_timeout=self.request_timeout,
                         connections=_Connections(self.max_connections), max_request_head=self.max_request_head)
        try:
            server.start()
        except OSError as exc:
            raise _bind_error(exc, self.host, self._requested_port) from None
        self._server = server
        log.info("health server listening on %s:%s", self.host, self.port)

    def stop(self, timeout: float = 0.2) -> None:
        """Stop listening; requests still being answered get *timeout* seconds.

        Kept short because probes and scrapers hold idle keep-alive connections
        open, and stop() waits for those too before closing them.
        """
        server, self._server = self._server, None
        if server is not None:
            server.stop(timeout=timeout)


_PORT_SETTING = "FLYTE_HEALTH_PORT, --health-port or health_port"
_HOST_SETTING = "FLYTE_GEVENT_HEALTH_HOST, --health-host or health_host"


def _bind_error(exc: OSError, host: str, port: int) -> Exception:
    """The ConfigError for a health port that cannot be bound, or *exc* itself when it is not a setting's fault."""
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(f"health port {port} on {host} is already in use: set {_PORT_SETTING} to a free port "
                           "(0 picks one, 'off' runs no server)", "FLYTE_HEALTH_PORT")
    if exc.errno == errno.EACCES:
        return ConfigError(f"health port {port} on {host}: permission denied (ports below 1024 need privileges): "
                           f"set {_PORT_SETTING} to another port", "FLYTE_HEALTH_PORT")
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        return ConfigError(f"health host {host!r} is not an address of this machine ({exc.strerror or exc}): set "
                           f"{_HOST_SETTING} to one, or 0.0.0.0 for all", "FLYTE_GEVENT_HEALTH_HOST")
    return exc


class _Connections:
    """The health server's open connections, and which to close when there are too many.

    A connection is *waiting* from its accept, or from the end of its last
    answer, until its next request head has arrived; then it is *answering*.
    When a new connection would make more than *limit*, the ones waiting longest
    are shut down: a flood of idle connections loses its oldest members, while a
    probe, which sends its request right after connecting, is among the newest.
    The new connection itself is always let in, so the limit is only passed
    while every other connection is being answered, which the check timeout
    bounds.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[_Handler, socket.socket] = {}  # handler -> its socket
        self._waiting: dict[_Handler, None] = {}  # handler -> None, longest waiting first (dicts keep insertion order)

    def opened(self, handler: "_Handler", sock: socket.socket) -> None:
        self._open[handler] = sock
        while len(self._open) > self.limit and self._waiting:
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            evicted = self._open.pop(oldest)
            try:
                # Its greenlet, blocked reading, sees the end of the stream and finishes as usual.
                evicted.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._waiting[handler] = None

    def waiting(self, handler: "_Handler") -> None:
        if handler in self._open:
            self._waiting.pop(handler, None)
            self._waiting[handler] = None  # to the back of the line

    def answering(self, handler: "_Handler") -> None:
        self._waiting.pop(handler, None)

    def closed(self, handler: "_Handler") -> None:
        self._open.pop(handler, None)
        self._waiting.pop(handler, None)


class _RequestTimeout(TimeoutError):
    """A request did not arrive within the request timeout (an OSError, so pywsgi ends the connection)."""


class _HeadTooLarge(ValueError):
    """A request head went past the size limit."""


class _RequestReader:
    """A connection's input, read under the current request's deadline and head budget.

    pywsgi reads the request line, the headers and any body through ``readline``
    and ``read``. Each read waits only until the deadline, so a client sending a
    byte now and then cannot stretch a request out; while the head is being read,
    reads stop at the budget (``_HeadTooLarge`` once it is spent).
    """

    def __init__(self, rfile: BinaryIO) -> None:
        self._rfile = rfile
        self._deadline: float | None = None
        self._head_left: int | None = None  # None once the head is complete

    @property
    def closed(self) -> bool:
        return self._rfile.closed

    def close(self) -> None:
        self._rfile.close()

    def begin_request(self, timeout: float, head_limit: int) -> None:
        self._deadline = time.monotonic() + timeout
        self._head_left = head_limit

    def end_head(self) -> None:
        self._head_left = None

    def readline(self, size: int | None = -1) -> bytes:
        if self._head_left is None:
            return self._before_deadline(self._rfile.readline, size)
        if self._head_left <= 0:
            raise _HeadTooLarge("request head too large")
        size = self._head_left if size is None or size < 0 else min(size, self._head_left)
        line = self._before_deadline(self._rfile.readline, size)
        self._head_left -= len(line)
        return line

    def read(self, size: int | None = -1) -> bytes:
        return self._before_deadline(self._rfile.read, size)

    def _before_deadline(self, read: Callable[[Any], bytes], size: int | None) -> bytes:
        if self._deadline is None:
            return read(size)
        # Bytes already buffered are returned at once even past the deadline; only waiting is cut short.
        left = max(self._deadline - time.monotonic(), 0.001)
        with gevent.Timeout(left, _RequestTimeout("the request did not arrive in time")):
            return read(size)


def _error_response(status: HTTPStatus) -> bytes:
    reason = status.phrase
    return (f"HTTP/1.1 {status.value} {reason}\r\nConnection: close\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(reason)}\r\n\r\n{reason}").encode("latin-1")


_CLIENT_ERRORS = {status: (str(status.value), _error_response(status)) for status in (
    HTTPStatus.BAD_REQUEST, HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)}


class _Handler(WSGIHandler):
    """pywsgi's handler with the health server's bounds (see :class:`HealthServer`)."""

    server: "_Server"

    def __init__(self, sock: socket.socket, address: Any, server: "_Server") -> None:
        super().__init__(sock, address, server)
        self.rfile: _RequestReader = _RequestReader(self.rfile)  # type: ignore[assignment, arg-type]  # a file to pywsgi
        sock.settimeout(server.request_timeout)  # bounds each send to a client that does not read

    def handle(self) -> None:
        try:
            super().handle()
        except OSError as exc:
            # pywsgi sends its error answers (400, 408, 414...) unguarded: a client gone by then is no server error.
            log.debug("health server: connection to %s failed: %s", self.client_address, exc)

    def read_requestline(self) -> str:
        self.server.connections.waiting(self)
        self.rfile.begin_request(self.server.request_timeout, self.server.max_request_head)
        return super().read_requestline()

    def read_request(self, raw_requestline: str) -> Any:
        parsed = super().read_request(raw_requestline)
        self.rfile.end_head()
        self.server.connections.answering(self)
        if self.content_length or "transfer-encoding" in self.headers:
            # Nothing here reads a body; pywsgi discards it under the deadline, and the connection is not
            # reused, so a body that stops halfway cannot leave the stream out of step.
            self.close_connection = True
        return parsed

    def _handle_client_error(self, ex: BaseException) -> tuple[str, bytes] | None:
        # pywsgi's hook for a request it cannot use: answer it and close, without the traceback pywsgi
        # prints for errors that are not ValueErrors (http.client's "got more than 100 headers").
        log.debug("health server: refused a request from %s: %s", self.client_address,
                  f"{type(ex).__name__}: {ex}")
        if isinstance(ex, TimeoutError):
            return _CLIENT_ERRORS[HTTPStatus.REQUEST_TIMEOUT]
        if isinstance(ex, OSError):
            return None  # the connection broke, or was shut to make room: nobody to answer, just close
        if isinstance(ex, _HeadTooLarge):
            return _CLIENT_ERRORS[HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE]
        return _CLIENT_ERRORS[HTTPStatus.BAD_REQUEST]

    def handle_error(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        if t is not None and issubclass(t, (TimeoutError, ConnectionError)):
            # The client stopped reading or went away (a send timed out, a reset): its loss, not a server bug,
            # so no traceback, and the connection is done.
            log.debug("health server: connection to %s failed: %s", self.client_address, v)
            self.close_connection = True
            return
        super().handle_error(t, v, tb)

    def log_error(self, msg: str, *args: object) -> None:
        log.debug("health server: %s", msg % args if args else msg)


class _Server(WSGIServer):
    """A ``WSGIServer`` that keeps track of its connections (see :class:`_Connections`)."""

    def __init__(self, listener: tuple[str, int], application: WSGIApplication, *, request_timeout: float,
                 connections: _Connections, max_request_head: int, **kwargs: Any) -> None:
        super().__init__(listener, application, **kwargs)
        self.request_timeout = request_timeout
        self.connections = connections
        self.max_request_head = max_request_head

    def handle(self, sock: socket.socket, address: Any) -> None:
        handler = cast(_Handler, self.handler_class(sock, address, self))
        self.connections.opened(handler, sock)
        try:
            handler.handle()
        finally:
            self.connections.closed(handler)
