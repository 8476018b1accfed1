"""The keep-alive HTTP/1.1 transport for the requests made for every action: take, result and event.

Why not ``requests`` or ``http.client``: per take+result pair on loopback,
``requests`` costs about 2.7 ms of client CPU and ``http.client`` about 0.46 ms,
half of it in writing headers and body with two ``send()`` calls (a loopback
``send()`` costs far more than a ``recv()`` on the virtual machines packs run
on) and in ``email.feedparser``. Here each request is serialized into one buffer
and written with one ``sendall()``, and responses are parsed by ``httptools``
(llhttp, the parser of Node.js and uvicorn): about 0.15 ms per pair
(``bench/transport_micro.py``). Discovery and registration keep using
``requests``, which also serves every request when a proxy is configured.

What a request guarantees:

* **One deadline.** Connecting, the TLS handshake, sending and reading the whole
  response share one deadline of *timeout* seconds; a server trickling bytes
  cannot stretch it. Waiting for a free connection (at most *max_connections*
  per origin) has its own bound of *timeout* seconds and sends nothing.
* **The final response.** Interim ``1xx`` responses are skipped; redirects are
  returned, never followed; bodies may be sized by ``Content-Length``, chunked,
  or delimited by the connection closing; a response larger than
  *max_response_size* bytes raises :class:`ResponseTooLarge`.
* **Knowing whether the request left.** :class:`RequestNotSent` is raised only
  when the server certainly did not receive the whole request: no connection
  could be made, no connection was free, or writing it failed. Anything else
  (a timeout or a dropped connection after the request was written) may have
  been processed by the server.

When a request is sent a second time, and why that is safe even for a result
(which must not be applied twice): only when it is certain the server did not
process the first copy.

* A pooled connection that the server has closed (or that holds unexpected
  bytes) is seen before anything is written to it, with a ``poll()`` that takes
  no time, and is discarded; the request goes on another connection. This is
  not a resend: nothing was sent.
* Writing the request on a pooled connection fails (the server closed it while
  the request was being written): the server never had the whole request, and a
  server cannot act on a request it has not completely received, so it is sent
  once more on a new connection.
* A pooled connection answers ``408 Request Timeout`` and closes: by definition
  the server did not receive a complete request on it, so it is sent once more
  on a new connection.
* The request was written but the connection closed or reset before any
  response arrived: **not** resent. The usual cause is the server closing an idle
  connection at the very moment the request arrived, but a server that read the
  request and then crashed looks the same, so the caller gets an error that says
  the request may have been processed and decides (a result's delivery policy
  knows how to recognise a duplicate).
"""

import socket
import ssl
import time
from select import POLLIN
from urllib.parse import quote, urlsplit

import httptools
from gevent import monkey
from gevent.lock import BoundedSemaphore

__all__ = [
    "DEFAULT_MAX_RESPONSE_SIZE",
    "BadResponse",
    "HTTPPool",
    "Headers",
    "RequestNotSent",
    "Response",
    "ResponseTooLarge",
]

# The blocking original even when gevent patched select: the idle check must not
# wait, and poll() has no limit on descriptor numbers (select() fails above 1023).
_poll = monkey.get_original("select", "poll")

# Connections idle longer than this are closed rather than reused: load
# balancers commonly drop flows idle for 60 s, some without telling either end,
# and a request sent on such a connection waits out its whole deadline.
_MAX_IDLE = 30.0

# Flyte stores actions in MongoDB, whose documents are at most 16 MiB: no
# genuine answer of the pack API comes near this.
DEFAULT_MAX_RESPONSE_SIZE = 16 * 1024 * 1024

_RECV_SIZE = 65536
_DEFAULT_PORTS = {"http": 80, "https": 443}
# What may stay unescaped in a request target (requests' choice too); anything
# else, such as a space or a non-ASCII character in a link, is percent-encoded.
_TARGET_SAFE = "!#$%&'()*+,/:;=?@[]~"


class RequestNotSent(Exception):
    """The server certainly did not receive the whole request.

    :ivar timed_out: the deadline passed while connecting or sending.
    """

    def __init__(self, message, timed_out=False):
        super().__init__(message)
        self.timed_out = timed_out


class ResponseTooLarge(Exception):
    """The response exceeded the size cap; it was not read further and its connection was closed.

    :ivar status: the response's status code, or ``None`` if its headers had not ended.
    """

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class BadResponse(Exception):
    """The request was sent, but no well-formed response came back (the server may have processed it)."""


class Headers:
    """Response headers in the order received, looked up without regard to case."""

    __slots__ = ("_raw",)

    def __init__(self, raw):
        self._raw = raw

    def get(self, name, default=None):
        wanted = name.lower().encode("latin-1")
        for key, value in self._raw:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return default

    def items(self):
        return [(key.decode("latin-1"), value.decode("latin-1")) for key, value in self._raw]


class Response:
    """Status, headers and the whole body of one final response."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body


class _Reader:
    """The parser's callbacks: collects one final response, skipping interim ``1xx`` ones."""

    __slots__ = ("chunks", "complete", "headers", "in_body", "keep_alive", "parser", "status")

    def reset(self):
        self.status = None
        self.headers = self.chunks = ()  # lists once a response begins (on_message_begin)
        self.in_body = False  # the final response's headers have ended
        self.complete = False  # the final response has ended
        self.keep_alive = False  # the connection may carry another request

    def on_message_begin(self):
        if self.complete:
            self.keep_alive = False  # bytes after the response: the connection cannot be trusted again
        else:  # the first response, or the one after an interim response
            self.headers = []
            self.chunks = []

    def on_header(self, name, value):
        if not self.complete:
            self.headers.append((name, value))

    def on_headers_complete(self):
        if not self.complete:
            self.status = self.parser.get_status_code()
            self.in_body = self.status >= 200

    def on_body(self, data):
        if not self.complete:
            self.chunks.append(data)

    def on_message_complete(self):
        # An interim response (100 Continue, 103 Early Hints) is followed by the
        # real one on the same connection. 101 never gets here: we ask for no
        # upgrade, and the parser raises HttpParserUpgrade for it.
        if not self.complete and self.status >= 200:
            self.complete = True
            # Asked now: the parser forgets the response's keep-alive state once it is over.
            self.keep_alive = self.parser.should_keep_alive()

    def ends_at_close(self):
        """Whether the final response's body is delimited by the connection closing (no length, not chunked)."""
        if not self.in_body or self.complete:
            return False
        for name, value in self.headers:
            name = name.lower()
            if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
                return False
        return True


class _Connection:
    """One socket to an origin and the response parser that lives as long as it does."""

    __slots__ = ("_idle_check", "parser", "reader", "released_at", "sock", "tls")

    def __init__(self, sock, tls):
        self.sock = sock
        self.tls = tls
        self.reader = _Reader()
        self.parser = httptools.HttpResponseParser(self.reader)
        self.reader.parser = self.parser
        self.released_at = 0.0
        self._idle_check = _poll()
        self._idle_check.register(sock.fileno(), POLLIN)  # POLLHUP and POLLERR are always reported

    def close(self):
        self.reader.parser = None  # break the reference cycle now rather than at the next GC
        self.sock.close()

    def looks_open(self):
        """Whether the idle connection can carry a request: the peer has neither closed it nor sent anything."""
        if not self._idle_check.poll(0):
            return not (self.tls and self.sock.pending())
        if not self.tls:
            return False  # end of stream, a reset, or bytes nobody asked for
        # TLS records can arrive on an idle connection without application data
        # (a TLS 1.3 session ticket): read without waiting to find out.
        self.sock.settimeout(0)
        try:
            self.sock.recv(1)
        except (ssl.SSLWantReadError, BlockingIOError):
            return True
        except OSError:
            return False
        return False


class _Origin:
    __slots__ = ("host", "idle", "port", "scheme", "slots")

    def __init__(self, scheme, host, port, max_connections):
        self.scheme = scheme
        self.host = host
        self.port = port
        self.idle = []  # LIFO of _Connection: the most recently used is the least likely to have been dropped
        self.slots = BoundedSemaphore(max_connections)  # connections open at once


class _SendFailed(Exception):
    """Writing the request failed, so the server does not have all of it."""


class HTTPPool:
    """Keep-alive connections per origin, reused last-in first-out.

    :param timeout: the deadline of each request in seconds (connect, send and
        the whole response), and the longest wait for a free connection.
    :param tls_context: a zero-argument callable returning the
        :class:`ssl.SSLContext` for ``https`` origins (called when the first one
        is met), so the pool trusts exactly what its owner decided.
    :param maxsize: idle connections kept per origin; extra ones are closed.
    :param max_connections: connections open at once per origin. Thousands of
        actions finishing together then queue for a connection instead of
        opening thousands of sockets (file descriptors, a connect storm at the
        API's load balancer).
    :param max_response_size: the most bytes a response (headers and body) may have.
    """

    def __init__(self, timeout, tls_context=None, maxsize=10, max_connections=100,
                 max_response_size=DEFAULT_MAX_RESPONSE_SIZE):
        self.timeout = timeout
        self._tls_context = tls_context
        self.maxsize = maxsize
        self.max_connections = max_connections
        self.max_response_size = max_response_size
        self._origins = {}
        self._targets = {}   # url -> (origin, target, Host header)
        self._prefixes = {}  # "scheme://host:port" as written -> (origin, Host header)

    def request(self, method, url, body=None, headers=None):
        """Send one request and read its whole final response.

        :param body: bytes, or ``None`` for none (a POST always says ``Content-Length``).
        :param headers: a mapping of header names to values (``Host`` and
            ``Content-Length`` are added); values must not hold line breaks.
        :raises RequestNotSent: the server certainly did not receive the request.
        :raises TimeoutError: the deadline passed after the request was sent.
        :raises ResponseTooLarge: the response exceeded *max_response_size*.
        :raises BadResponse: a malformed, truncated or missing response.
        :raises OSError: the connection failed after the request was sent.
        """
        try:
            origin, target, host = self._resolve(url)
            data = _serialize(method, target, host, headers, body)
        except ValueError as exc:
            raise RequestNotSent(str(exc)) from None
        if not origin.slots.acquire(timeout=self.timeout):
            raise RequestNotSent(f"no free connection within {self.timeout:g} s "
                                 f"({self.max_connections} in use)", timed_out=True)
        try:
            return self._exchange(origin, data, time.monotonic() + self.timeout)
        finally:
            origin.slots.release()

    def close(self):
        """Close every idle connection."""
        for origin in self._origins.values():
            while origin.idle:
                origin.idle.pop().close()

    # -- one request ---------------------------------------------------------

    def _exchange(self, origin, data, deadline):
        conn = self._idle_connection(origin)
        if conn is not None:
            try:
                _send(conn, data, deadline)
            except _SendFailed:
                conn.close()  # closed by the server under our feet; the request did not all leave
            else:
                response = self._receive(conn, deadline)
                if response.status != 408:
                    return self._finish(origin, conn, response)
                conn.close()  # an idle connection timed out by the server: it did not get our request
        conn = self._connect(origin, deadline)
        try:
            _send(conn, data, deadline)
        except _SendFailed as exc:
            conn.close()
            cause = exc.__cause__
            raise RequestNotSent(f"writing the request failed: {_describe(cause)}",
                                 timed_out=isinstance(cause, TimeoutError)) from None
        return self._finish(origin, conn, self._receive(conn, deadline))

    def _receive(self, conn, deadline):
        reader, parser, sock = conn.reader, conn.parser, conn.sock
        reader.reset()
        received = 0
        try:
            while not reader.complete:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("timed out")
                sock.settimeout(remaining)
                chunk = sock.recv(_RECV_SIZE)
                if not chunk:
                    if reader.ends_at_close():
                        break  # complete, and the connection is finished with
                    raise BadResponse("the connection closed before a response" if not received
                                      else "the connection closed in the middle of the response")
                received += len(chunk)
                if received > self.max_response_size:
                    raise ResponseTooLarge(f"the response exceeds the {self.max_response_size}-byte limit",
                                           reader.status if reader.in_body else None)
                try:
                    parser.feed_data(chunk)
                except httptools.HttpParserUpgrade:
                    raise BadResponse(f"unexpected {reader.status} response (no protocol upgrade was asked for)") \
                        from None
                except httptools.HttpParserError as exc:
                    if not reader.complete:
                        raise BadResponse(f"malformed response: {exc}") from None
                    reader.keep_alive = False  # garbage after a complete response
        except BaseException:
            conn.close()
            raise
        response = Response(reader.status, Headers(reader.headers), b"".join(reader.chunks))
        reader.headers = reader.chunks = ()  # an idle connection keeps nothing of the response it carried
        return response

    def _finish(self, origin, conn, response):
        if not conn.reader.keep_alive or len(origin.idle) >= self.maxsize:
            conn.close()
        else:
            conn.released_at = time.monotonic()
            origin.idle.append(conn)
        return response

    # -- connections ---------------------------------------------------------

    def _idle_connection(self, origin):
        now = time.monotonic()
        while origin.idle:
            conn = origin.idle.pop()
            if now - conn.released_at < _MAX_IDLE and conn.looks_open():
                return conn
            conn.close()
        return None

    def _connect(self, origin, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RequestNotSent("cannot connect: no time left", timed_out=True)
        try:
            sock = socket.create_connection((origin.host, origin.port), timeout=remaining)
        except OSError as exc:
            raise RequestNotSent(f"cannot connect: {_describe(exc)}", timed_out=isinstance(exc, TimeoutError)) \
                from None
        try:
            # One write per request, but a request larger than a segment must
            # not wait for the peer's delayed ACK (40 ms on Linux).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if origin.scheme == "https":
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                sock = self._tls_context().wrap_socket(sock, server_hostname=origin.host)
        except OSError as exc:  # ssl.SSLError (a failed verification too) is an OSError
            sock.close()
            raise RequestNotSent(f"cannot connect: {_describe(exc)}", timed_out=isinstance(exc, TimeoutError)) \
                from None
        return _Connection(sock, origin.scheme == "https")

    def _resolve(self, url):
        """``(origin, request target, Host header)`` for *url*.

        :raises ValueError: a URL this pool cannot send to.
        """
        cached = self._targets.get(url)
        if cached is not None:
            return cached
        # Each result URL is new, but its scheme and host were met before (in the take URL): reuse
        # what parsing them gave, and take the target as written when parsing it would not change it.
        start = url.find("://") + 3
        slash = url.find("/", start) if start > 2 else -1
        if slash > 0:
            known = self._prefixes.get(url[:slash])
            if known is not None:
                target = url[slash:]
                if _plain_target(target):
                    return known[0], target, known[1]
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(f"unsupported URL scheme {parts.scheme!r}")
        if scheme == "https" and self._tls_context is None:
            raise ValueError("an https URL, but this pool has no TLS context")
        host, port = parts.hostname, parts.port or _DEFAULT_PORTS[scheme]  # .port raises ValueError when bad
        netloc = parts.netloc.rpartition("@")[2]  # the Host header: as written, without credentials
        if not host or not netloc.isprintable() or " " in netloc:
            raise ValueError("the URL has no usable host")
        if not netloc.isascii():  # an internationalized name travels in its ASCII (IDNA) form
            netloc = host.encode("idna").decode("ascii") + (f":{parts.port}" if parts.port else "")
        key = (scheme, host, port)
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origins[key] = _Origin(scheme, host, port, self.max_connections)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        if not target.isascii() or not target.isprintable() or " " in target:
            target = quote(target, safe=_TARGET_SAFE)
        if len(self._targets) > 1_000:  # only repeated URLs (take, events) are worth keeping
            self._targets.clear()
        resolved = self._targets[url] = (origin, target, netloc)
        if slash > 0 and parts.netloc == url[start:slash] and url[:start - 3].lower() == scheme:
            if len(self._prefixes) > 100:
                self._prefixes.clear()
            self._prefixes[url[:slash]] = (origin, netloc)
        return resolved


def _plain_target(target):
    """Whether *target* (from the first ``/`` after the host) is what ``urlsplit`` would make of it.

    That is, printable ASCII without a space, a fragment or an empty query.
    """
    return target.isascii() and target.isprintable() and " " not in target and "#" not in target \
        and not target.endswith("?")


def _serialize(method, target, host, headers, body):
    block = _header_block(tuple(headers.items()) if headers else ())
    length = f"Content-Length: {len(body) if body else 0}\r\n" if body is not None or method not in ("GET", "HEAD") \
        else ""
    head = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{block}{length}\r\n"
    try:
        head = head.encode("latin-1")  # the target and host are ASCII (see _resolve), the block was checked
    except UnicodeEncodeError:
        raise ValueError("the request line holds a character outside latin-1") from None
    return head + body if body else head


_header_blocks: dict[tuple[tuple[str, str], ...], str] = {}


def _header_block(items):
    """The header lines of *items* (``(name, value)`` pairs), checked and rendered once per set of headers.

    The same few sets come again and again (one per token value).
    """
    block = _header_blocks.get(items)
    if block is None:
        lines = []
        for name, value in items:
            if "\n" in value or "\r" in value:
                raise ValueError(f"the {name} header holds a line break")  # never the value: it may be a token
            lines.append(f"{name}: {value}\r\n")
        block = "".join(lines)
        try:
            block.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError("a header holds a character outside latin-1") from None  # without the value
        if len(_header_blocks) > 64:  # a rotating token makes new ones
            _header_blocks.clear()
        _header_blocks[items] = block
    return block


def _send(conn, data, deadline):
    # send() rather than sendall(): a request almost always fits the socket
    # buffer, and gevent's sendall() asks the kernel for the buffer size first
    # (one more system call per request).
    sock = conn.sock
    try:
        sent = 0
        while sent < len(data):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out")
            sock.settimeout(remaining)
            sent += sock.send(data if not sent else memoryview(data)[sent:])
    except OSError as exc:
        raise _SendFailed() from exc


def _describe(exc):
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
