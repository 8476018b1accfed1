"""The keep-alive HTTP/1.1 transport for the requests made for every action: take, result and event.

Why not ``requests`` or ``http.client``: per take+result pair on loopback,
``requests`` costs about 2.3 ms of client CPU and ``http.client`` about 0.48 ms,
half of it in writing headers and body with two ``send()`` calls (a loopback
``send()`` costs far more than a ``recv()`` on the virtual machines packs run
on) and in ``email.feedparser``. Here each request is serialized into one buffer
and written with one ``send()``, responses are parsed by ``httptools`` (llhttp,
the parser of Node.js and uvicorn), and each connection does its own waiting
(see :class:`_Connection`): about 0.18 ms per pair (``bench/transport_micro.py``). Discovery and registration keep using
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

import gevent.socket
import httptools
from gevent import get_hub, monkey
from gevent.hub import Waiter
from gevent.lock import BoundedSemaphore

from .errors import describe

__all__ = [
    "DEFAULT_MAX_RESPONSE_SIZE",
    "BadResponse",
    "HTTPPool",
    "Headers",
    "RequestNotSent",
    "Response",
    "ResponseTooLarge",
]

# The standard library's socket class even when gevent patched it: connections
# are plain non-blocking sockets that do their own waiting (see _Connection).
_PlainSocket = monkey.get_original("socket", "socket")
_READ, _WRITE = 1, 2  # event loop watcher events

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
    """One socket to an origin, the response parser that lives as long as it does, and the waiting on it.

    The socket is a plain non-blocking one, and the connection does its own
    waiting on the event loop of the hub it was made in: one read watcher for
    its whole life (and a write watcher, made when a write first has to wait),
    and for each wait a timer set to what is left of the request's deadline.
    gevent's cooperative socket would arm a ``gevent.Timeout`` for every wait
    and go through a Python layer for every call; on the path every action
    takes, that was up to a quarter of the client's time. A connection is
    therefore used only in the hub (thread) that made it: the pool keeps idle
    connections per hub (see :class:`_Origin`).

    Whether an idle connection is still good is asked of the socket as it
    leaves the pool, with a ``poll()`` that does not wait, rather than left to
    the read watcher while it sits idle: a greenlet can be resumed (by an event
    being set, say) before the loop polls again, so a close that arrived since
    the last poll would go unseen and the request be sent on a dead connection.

    TLS runs over the same socket through an :class:`ssl.SSLObject` and two
    memory buffers, so one set of waits serves both; what the TLS layer asks
    for (to read before it can write, say) is done in :meth:`_tls_call`.
    """

    __slots__ = ("_idle_check", "_incoming", "_loop", "_outgoing", "_readable", "_tls", "_writable", "hub", "parser",
                 "reader", "released_at", "sock")

    def __init__(self, sock, hub, tls=None, incoming=None, outgoing=None):
        sock.setblocking(False)
        self.sock = sock
        self.hub = hub
        self._loop = hub.loop
        self._tls, self._incoming, self._outgoing = tls, incoming, outgoing
        self._readable = self._loop.io(sock.fileno(), _READ)
        self._readable.ref = False  # a wait's timer keeps the loop running
        self._writable = None
        self.reader = _Reader()
        self.parser = httptools.HttpResponseParser(self.reader)
        self.reader.parser = self.parser
        self.released_at = 0.0
        self._idle_check = _poll()
        self._idle_check.register(sock.fileno(), POLLIN)  # POLLHUP and POLLERR are always reported

    def close(self):
        """Stop and close the watchers and the socket (in the connection's own hub)."""
        self.reader.parser = None  # break the reference cycle now rather than at the next GC
        for watcher in (self._readable, self._writable):
            if watcher is not None:
                watcher.stop()
                watcher.close()
        self._readable = self._writable = None
        self.sock.close()

    # -- in the pool ------------------------------------------------------------

    def rest(self):
        """Go idle in the pool."""
        self.released_at = time.monotonic()

    def resume(self):
        """Leave the pool; whether the connection can carry a request (neither closed by the peer nor holding bytes)."""
        if self._tls is None:
            return not self._idle_check.poll(0)  # readable: end of stream, a reset, or bytes nobody asked for
        # TLS records can arrive on an idle connection without application data (a
        # TLS 1.3 session ticket), or have come with the response's last bytes and
        # wait in the buffer unread (the server's close_notify).
        if self._idle_check.poll(0) or self._incoming.pending:
            return self._tls_still_open()
        return not self._tls.pending()

    def _tls_still_open(self):
        """Read what arrived without waiting; only TLS records without application data leave the connection open."""
        try:
            data = self.sock.recv(_RECV_SIZE)
        except BlockingIOError:
            data = None
        except OSError:
            return False
        if data == b"":
            return False
        if data:
            self._incoming.write(data)
        try:
            self._tls.read(1)
        except ssl.SSLWantReadError:
            return True
        except OSError:
            pass
        return False  # application data, a close_notify, or a broken record

    # -- one request ----------------------------------------------------------------

    def write(self, data, deadline):
        """Write all of *data* by *deadline*; raises ``OSError`` (``TimeoutError`` when out of time)."""
        if self._tls is None:
            self._send(data, deadline)
        else:
            self._tls_call(self._tls.write, deadline, data)

    def read(self, deadline, answer_due=False):
        """The next bytes from the server, ``b""`` once it closed.

        :param answer_due: the first read after a request was sent. The answer
            cannot be there yet (the server needs a scheduling round at the
            least), so a plain connection waits until the socket is readable
            before reading: a read that fails costs a system call and an
            exception, more than the pass through the event loop it would save.
            Later reads try the socket first: the rest of a response has often
            arrived with its start.
        """
        if self._tls is not None:
            try:
                return self._tls_call(self._tls.read, deadline, _RECV_SIZE)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""  # closed, with or without TLS's close_notify (as ssl's suppress_ragged_eofs reads it)
        if answer_due:
            self._wait(self._readable, deadline)
        return self._recv(deadline)

    def handshake(self, deadline):
        self._tls_call(self._tls.do_handshake, deadline)

    def _send(self, data, deadline):
        sock = self.sock
        sent = 0
        view = None
        while True:
            try:
                sent += sock.send(data if view is None else view[sent:])
            except BlockingIOError:
                if self._writable is None:
                    self._writable = self._loop.io(sock.fileno(), _WRITE)
                    self._writable.ref = False
                self._wait(self._writable, deadline)
                continue
            if sent >= len(data):
                return
            view = memoryview(data)

    def _tls_call(self, operation, deadline, *args):
        """Run a TLS operation to its end: send what it produces, receive what it waits for."""
        while True:
            try:
                result = operation(*args)
            except ssl.SSLWantReadError:
                self._flush(deadline)  # what the TLS layer has to say before it can go on
                self._tls_receive(deadline)
            else:
                self._flush(deadline)
                return result

    def _flush(self, deadline):
        if self._outgoing.pending:
            self._send(self._outgoing.read(), deadline)

    def _tls_receive(self, deadline):
        if self._incoming.eof:
            raise ConnectionAbortedError("the connection closed during the TLS exchange")
        data = self._recv(deadline)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    def _recv(self, deadline):
        """The next bytes the socket has, waiting for them if none has come yet; ``b""`` once the peer closed."""
        sock = self.sock
        while True:
            try:
                return sock.recv(_RECV_SIZE)
            except BlockingIOError:
                self._wait(self._readable, deadline)

    def _wait(self, watcher, deadline):
        """Park this greenlet until *watcher* is ready; ``TimeoutError`` once *deadline* passes first."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        waiter = Waiter(self.hub)
        timer = self._loop.timer(remaining)
        watcher.start(waiter.switch, True)
        timer.start(waiter.switch, False)
        try:
            ready = waiter.get()
        finally:
            watcher.stop()
            timer.close()
        if not ready:
            raise TimeoutError("timed out")


class _Origin:
    """Where requests go, the connections open to it at once, and its idle connections per hub.

    A connection waits on the event loop of the hub (thread) that made it, so
    each hub reuses only its own; a pool used from several threads keeps idle
    connections for each.
    """

    __slots__ = ("host", "idle", "port", "scheme", "slots")

    def __init__(self, scheme, host, port, max_connections):
        self.scheme = scheme
        self.host = host
        self.port = port
        # hub -> LIFO of _Connection: the most recently used is the least likely to have been dropped
        self.idle = {}
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
            return self._exchange(origin, get_hub(), data, time.monotonic() + self.timeout)
        finally:
            origin.slots.release()

    def close(self):
        """Close every idle connection (those of another thread's hub in that thread, when its loop next runs)."""
        here = get_hub()
        for origin in self._origins.values():
            for hub, idle in list(origin.idle.items()):
                del origin.idle[hub]
                if hub is here:
                    _close_all(idle)
                elif hub.loop is not None:  # its watchers belong to that thread's loop, which may be running
                    hub.loop.run_callback_threadsafe(_close_all, idle)
                else:  # that hub was destroyed, and its loop's watchers with it
                    for conn in idle:
                        conn.sock.close()

    # -- one request ---------------------------------------------------------

    def _exchange(self, origin, hub, data, deadline):
        conn = self._idle_connection(origin, hub)
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
        conn = self._connect(origin, hub, deadline)
        try:
            _send(conn, data, deadline)
        except _SendFailed as exc:
            conn.close()
            cause = exc.__cause__
            raise RequestNotSent(f"writing the request failed: {describe(cause)}",
                                 timed_out=isinstance(cause, TimeoutError)) from None
        return self._finish(origin, conn, self._receive(conn, deadline))

    def _receive(self, conn, deadline):
        reader, parser = conn.reader, conn.parser
        reader.reset()
        received = 0
        try:
            while not reader.complete:
                chunk = conn.read(deadline, answer_due=not received)
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
        idle = origin.idle.get(conn.hub)
        if idle is None:
            idle = origin.idle[conn.hub] = []
        if not conn.reader.keep_alive or len(idle) >= self.maxsize:
            conn.close()
        else:
            conn.rest()
            idle.append(conn)
        return response

    # -- connections ---------------------------------------------------------

    def _idle_connection(self, origin, hub):
        idle = origin.idle.get(hub)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.released_at < _MAX_IDLE and conn.resume():
                return conn
            conn.close()
        return None

    def _connect(self, origin, hub, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RequestNotSent("cannot connect: no time left", timed_out=True)
        try:
            # gevent's connect (its resolver, every address in turn, the timeout); the socket is then
            # handed over to a plain one, which the connection waits on itself.
            connected = gevent.socket.create_connection((origin.host, origin.port), timeout=remaining)
        except OSError as exc:
            raise RequestNotSent(f"cannot connect: {describe(exc)}", timed_out=isinstance(exc, TimeoutError)) \
                from None
        sock = _PlainSocket(connected.family, connected.type, connected.proto, fileno=connected.detach())
        conn = None
        try:
            # One write per request, but a request larger than a segment must
            # not wait for the peer's delayed ACK (40 ms on Linux).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if origin.scheme != "https":
                return _Connection(sock, hub)
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = self._tls_context().wrap_bio(incoming, outgoing, server_hostname=origin.host)
            conn = _Connection(sock, hub, tls, incoming, outgoing)
            conn.handshake(deadline)
            return conn
        except BaseException as exc:  # killed mid-handshake too: nothing is left open
            if conn is not None:
                conn.close()
            else:
                sock.close()
            if not isinstance(exc, OSError):  # ssl.SSLError (a failed verification too) is an OSError
                raise
            raise RequestNotSent(f"cannot connect: {describe(exc)}", timed_out=isinstance(exc, TimeoutError)) \
                from None

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
        if not _printable_ascii(target):
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
    return _printable_ascii(target) and "#" not in target and not target.endswith("?")


def _printable_ascii(text):
    """Whether *text* can go into a request line as it is: printable ASCII without a space."""
    return text.isascii() and text.isprintable() and " " not in text


def _serialize(method, target, host, headers, body):
    block = _header_block(tuple(headers.items()) if headers else ())
    length = f"Content-Length: {len(body) if body else 0}\r\n" if body is not None or method not in ("GET", "HEAD") \
        else ""
    try:
        start = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n".encode("latin-1")  # ASCII (see _resolve)
    except UnicodeEncodeError:
        raise ValueError("the request line holds a character outside latin-1") from None
    return b"".join((start, block, f"{length}\r\n".encode("ascii"), body or b""))


_header_blocks: dict[tuple[tuple[str, str], ...], bytes] = {}


def _header_block(items):
    """The header lines of *items* (``(name, value)`` pairs), checked and encoded once per set of headers.

    The same few sets come again and again (one per token value).
    """
    block = _header_blocks.get(items)
    if block is None:
        lines = []
        for name, value in items:
            if "\n" in value or "\r" in value:
                raise ValueError(f"the {name} header holds a line break")  # never the value: it may be a token
            lines.append(f"{name}: {value}\r\n")
        try:
            block = "".join(lines).encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError("a header holds a character outside latin-1") from None  # without the value
        if len(_header_blocks) > 64:  # a rotating token makes new ones
            _header_blocks.clear()
        _header_blocks[items] = block
    return block


def _send(conn, data, deadline):
    try:
        conn.write(data, deadline)
    except OSError as exc:
        raise _SendFailed() from exc
    except BaseException:  # the greenlet was killed mid-write: part of a request is on the connection
        conn.close()
        raise


def _close_all(connections):
    for conn in connections:
        conn.close()

