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
still reported. Probes never call the Flyte API unless a check does
(:func:`flyte_api_health_check`).
"""

import dataclasses
import json
import logging

import gevent
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

__all__ = ["Health", "HealthApp", "HealthServer", "default_check", "flyte_api_health_check", "mount"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Health:
    """The outcome of one health check.

    :param healthy: whether this part of the pack works.
    :param status: any JSON value describing it.
    """

    healthy: bool
    status: object = None


def default_check():
    """The check a pack gets when it is given none (same name and text as Go's)."""
    return "DefaultCheck", Health(True, "Pack is running.")


def flyte_api_health_check(client):
    """A check that asks the Flyte API's health URL and is unhealthy when that fails.

    Unlike the Go client's (always healthy), it reports what it finds. Do not use
    it for liveness: an API outage would then restart every pack.
    """
    def FlyteApi():  # noqa: N802 - the name is the key in the health JSON
        healthy, message = client.check_health()
        return "FlyteApi", Health(healthy, message)

    return FlyteApi


def _check_name(check):
    return getattr(check, "__name__", None) or type(check).__name__


def _run_check(check):
    try:
        result = check()
    except Exception as exc:
        return _check_name(check), Health(False, f"{type(exc).__name__}: {exc}")
    if (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], str)
            and isinstance(result[1], Health)):
        return result
    return _check_name(check), Health(False, f"check returned {type(result).__name__}, expected (name, Health)")


class HealthApp:
    """The WSGI app behind the health server; mountable in another WSGI app (see :func:`mount`).

    :param state: an object with ``live()`` and ``ready()`` methods returning
        ``(ok, reason)`` (the :class:`~flyte_gevent.Pack`).
    :param checks: health check callables (the default check when empty).
    :param check_timeout: seconds a check may take before it is reported unhealthy.
    :param metrics: an object with a ``wsgi_app`` (see :mod:`flyte_gevent.metrics`).
    """

    def __init__(self, state, checks=None, check_timeout=5.0, metrics=None):
        self.state = state
        self.checks = list(checks) if checks else [default_check]
        self.check_timeout = check_timeout
        self.metrics = metrics

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        if path == "/livez":
            return self._probe(start_response, *self.state.live())
        if path == "/readyz":
            return self._probe(start_response, *self.state.ready())
        if path == "/metrics" and self.metrics is not None:
            return self.metrics.wsgi_app(environ, start_response)
        status, document = self.run_checks()
        return _json(start_response, "200 OK" if status else "500 Internal Server Error", document)

    def run_checks(self):
        """Run every check concurrently; ``(all_healthy, {name: {"healthy", "status"}})``."""
        greenlets = [gevent.spawn(_run_check, check) for check in self.checks]
        gevent.joinall(greenlets, timeout=self.check_timeout)
        results = {}
        for check, greenlet in zip(self.checks, greenlets):
            if greenlet.successful():
                name, health = greenlet.value
            else:
                greenlet.kill(block=False)
                name = _check_name(check)
                health = Health(False, f"health check timed out after {self.check_timeout:g} s")
            results[name] = {"healthy": bool(health.healthy), "status": health.status}
        healthy = all(entry["healthy"] for entry in results.values())
        return healthy, dict(sorted(results.items()))

    @staticmethod
    def _probe(start_response, ok, reason):
        return _json(start_response, "200 OK" if ok else "503 Service Unavailable",
                     {"status": "ok" if ok else "unavailable", "reason": reason})


def _json(start_response, status, document):
    body = json.dumps(document, default=str).encode()
    start_response(status, [("Content-Type", "application/json; charset=utf-8"),
                            ("Content-Length", str(len(body)))])
    return [body]


def mount(app, health_app, prefix="/flyte"):
    """Serve *health_app* under *prefix* inside the WSGI *app* (no second port).

    Usage::

        application = mount(application, pack.health_app, prefix="/flyte")
        # GET /flyte/readyz, /flyte/livez, /flyte/metrics, /flyte/healthz
    """
    prefix = "/" + prefix.strip("/")

    def dispatch(environ, start_response):
        path = environ.get("PATH_INFO") or ""
        if path == prefix or path.startswith(prefix + "/"):
            environ = dict(environ)
            environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + prefix
            environ["PATH_INFO"] = path[len(prefix):] or "/"
            return health_app(environ, start_response)
        return app(environ, start_response)

    return dispatch


class HealthServer:
    """A ``gevent.pywsgi.WSGIServer`` for a :class:`HealthApp`.

    :param port: 0 binds a free port; read :attr:`port` after :meth:`start`.
    """

    def __init__(self, app, host="0.0.0.0", port=8090):
        self.app = app
        self.host = host
        self._requested_port = port
        self._server = None

    @property
    def port(self):
        """The bound port (``None`` before start)."""
        return self._server.server_port if self._server is not None else None

    def start(self):
        """Start listening; raises ``OSError`` at once when the port is taken."""
        if self._server is not None:
            return
        server = WSGIServer((self.host, self._requested_port), self.app, log=None, error_log=log,
                            spawn=Pool(64))
        server.start()
        self._server = server
        log.info("health server listening on %s:%s", self.host, self.port)

    def stop(self, timeout=0.2):
        """Stop listening; requests still being answered get *timeout* seconds.

        Kept short because probes and scrapers hold idle keep-alive connections
        open, and stop() waits for those too before closing them.
        """
        server, self._server = self._server, None
        if server is not None:
            server.stop(timeout=timeout)
