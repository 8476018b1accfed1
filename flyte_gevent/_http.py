"""A lean keep-alive HTTP/1.1 transport for the hot path (take, result, event).

Measured on loopback, a ``requests`` call costs about 0.45 ms of client CPU and
an ``http.client`` call about 0.06 ms; an action needs two calls, so the calls
made once per action go through this module while discovery and registration
keep using ``requests``. It is deliberately small: no redirects, no proxies (the
client falls back to ``requests`` when a proxy applies), no retries except one
resend when a reused keep-alive connection turns out to be closed before the
request left.
"""

import http.client
import socket
import time
from urllib.parse import urlsplit

from gevent import monkey
from gevent.lock import BoundedSemaphore

__all__ = ["Response", "HTTPPool", "ConnectError"]

# Readiness of an idle socket must be tested without waiting, so use the
# blocking-module original even when select is patched.
_select = monkey.get_original("select", "select")

# Close connections idle for longer than this: load balancers drop idle flows
# silently, and a request sent on such a connection waits out the full timeout.
_MAX_IDLE = 60.0


class ConnectError(OSError):
    """No connection could be made, so the request was certainly not sent."""


class Response:
    """Status, headers and the whole body of one response."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body


class _Origin:
    __slots__ = ("scheme", "host", "port", "idle", "slots")

    def __init__(self, scheme, host, port, max_connections):
        self.scheme = scheme
        self.host = host
        self.port = port
        self.idle = []  # LIFO of (connection, released_at)
        self.slots = BoundedSemaphore(max_connections)  # connections open at once


class HTTPPool:
    """Keep-alive connections per origin, reused last-in first-out.

    :param timeout: seconds for connecting, for each socket read, and for
        waiting for a free connection when *max_connections* are in use.
    :param ssl_context: context for ``https`` URLs (verification is its business).
    :param maxsize: idle connections kept per origin; extra ones are closed.
    :param max_connections: connections open at once per origin. Thousands of
        actions finishing together then queue for a connection instead of
        opening thousands of sockets (file descriptors, a connect storm at the
        API's load balancer).
    """

    def __init__(self, timeout, ssl_context=None, maxsize=10, max_connections=100):
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.maxsize = maxsize
        self.max_connections = max_connections
        self._origins = {}
        self._targets = {}

    def request(self, method, url, body=None, headers=None):
        """Send one request and read the whole response.

        :raises ConnectError: no connection could be made (the request was not sent).
        :raises OSError: other connection errors and timeouts (``TimeoutError``).
        :raises http.client.HTTPException: a malformed or missing response.
        """
        origin, target = self._resolve(url)
        if not origin.slots.acquire(timeout=self.timeout):
            raise ConnectError(f"no free connection within {self.timeout:g} s "
                               f"({self.max_connections} in use)")
        try:
            return self._request(origin, target, method, body, headers)
        finally:
            origin.slots.release()

    def _request(self, origin, target, method, body, headers):
        conn, reused = self._acquire(origin)
        try:
            try:
                conn.request(method, target, body=body, headers=headers or {})
            except (BrokenPipeError, ConnectionResetError):
                if not reused:
                    raise
                # The server closed this idle connection while we were writing:
                # the request never arrived, so sending it again is safe.
                conn.close()
                conn = self._connect(origin)
                conn.request(method, target, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
        except BaseException:
            conn.close()
            raise
        if response.will_close:
            conn.close()
        else:
            self._release(origin, conn)
        return Response(response.status, response.headers, data)

    def close(self):
        """Close every idle connection."""
        for origin in self._origins.values():
            while origin.idle:
                origin.idle.pop()[0].close()

    def _resolve(self, url):
        cached = self._targets.get(url)
        if cached is not None:
            return cached
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme in {url!r}")
        port = parts.port or (443 if scheme == "https" else 80)
        key = (scheme, parts.hostname, port)
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origins[key] = _Origin(scheme, parts.hostname, port, self.max_connections)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        if len(self._targets) > 10_000:  # result URLs are unique per action
            self._targets.clear()
        resolved = self._targets[url] = (origin, target)
        return resolved

    def _acquire(self, origin):
        now = time.monotonic()
        while origin.idle:
            conn, released_at = origin.idle.pop()
            if now - released_at < _MAX_IDLE and not _is_dropped(conn):
                return conn, True
            conn.close()
        return self._connect(origin), False

    def _release(self, origin, conn):
        if len(origin.idle) < self.maxsize:
            origin.idle.append((conn, time.monotonic()))
        else:
            conn.close()

    def _connect(self, origin):
        if origin.scheme == "https":
            conn = http.client.HTTPSConnection(origin.host, origin.port, timeout=self.timeout,
                                               context=self.ssl_context)
        else:
            conn = http.client.HTTPConnection(origin.host, origin.port, timeout=self.timeout)
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise ConnectError(f"cannot connect: {type(exc).__name__}: {exc}") from exc
        # http.client writes headers and body separately; without NODELAY the
        # second write waits for the peer's delayed ACK (40 ms on Linux).
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn


def _is_dropped(conn):
    sock = conn.sock
    if sock is None:
        return True
    try:
        readable, _, _ = _select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    # An idle keep-alive connection has nothing to read; if it is readable the
    # peer closed it (EOF) or sent garbage, and either way it is unusable.
    return bool(readable)
