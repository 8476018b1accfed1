"""A loopback server that answers with scripted bytes and records what it received.

For responses no well-behaved server library would produce (interim 1xx
responses, a body trickling in, a connection closed at a chosen moment, garbage
after a response) and for facts only the socket shows (which connection a
request came on, whether a request arrived at all).

Usage::

    with RawServer(reply(200, b"{}"), reply(204)) as server:
        client = Client(server.url)
        ...
    assert [r.path for r in server.requests] == [...]

Each positional *step* answers one request, in order, whatever connection it
arrives on; a request with no step left gets its connection closed. A step is
bytes to send, or a callable ``step(channel, request)`` that does anything it
likes with the :class:`Channel`. A step that returns ``CLOSE`` (or a
:func:`reply` made with ``close=True``) closes the connection after it; one
that returns ``RESET`` resets it. The step ``RESET_BEFORE_BODY`` resets the
connection as soon as the request's head has arrived, before its body is read
(the request is recorded in :attr:`RawServer.partial`).
"""

import collections
import socket
import struct
import time

import gevent
from gevent.server import StreamServer

__all__ = ["CLOSE", "RESET", "RESET_BEFORE_BODY", "Channel", "RawServer", "Request", "reply"]

CLOSE = "close"
RESET = "reset"
RESET_BEFORE_BODY = "reset before body"

Request = collections.namedtuple("Request", "connection method target headers body")
Request.__doc__ = """One request as received: the number of the connection (0, 1, ...) it came on,
its method and target, its headers (lower-cased names) and body."""


class Channel:
    """One accepted connection, as a step sees it."""

    def __init__(self, sock, number):
        self.sock = sock
        self.number = number
        self.buffer = b""

    def send(self, data):
        self.sock.sendall(data)

    def trickle(self, data, interval):
        """Send *data* one byte at a time, *interval* seconds apart; stops quietly when the client has gone."""
        try:
            for i in range(len(data)):
                self.sock.sendall(data[i:i + 1])
                gevent.sleep(interval)
        except OSError:
            pass

    def reset(self):
        """Close with a TCP reset (RST) instead of an orderly FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def read_head(self):
        """The request line and headers as bytes, or ``None`` when the client closed first."""
        while b"\r\n\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buffer += data
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head

    def read_body(self, length):
        """Exactly *length* bytes of body, or ``None`` when the client closed first."""
        while len(self.buffer) < length:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buffer += data
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return body


def reply(status, body=b"", headers=(), close=False, reason="X"):
    """A step answering with *status*, *body* (with its Content-Length) and *headers*."""
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers)]
    if close:
        lines.append("Connection: close")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def step(channel, request):
        channel.send(data)
        return CLOSE if close else None
    return step


class RawServer:
    """Serve scripted *steps* on a free loopback port (``host="::1"`` for IPv6; *ssl_context* for TLS).

    :ivar requests: every complete request received, in order.
    :ivar partial: requests whose head arrived but whose body did not (the client gave up).
    :ivar connections: how many connections were accepted.
    """

    def __init__(self, *steps, host="127.0.0.1", ssl_context=None):
        self.steps = collections.deque(steps)
        self.host = host
        self.requests = []
        self.partial = []
        self.connections = 0
        options = {"ssl_context": ssl_context} if ssl_context is not None else {}
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(128)
        self._server = StreamServer(listener, self._serve, **options)
        self.port = listener.getsockname()[1]
        scheme = "https" if ssl_context is not None else "http"
        self.url = f"{scheme}://[{host}]:{self.port}" if family == socket.AF_INET6 else f"{scheme}://{host}:{self.port}"

    def __enter__(self):
        self._server.start()
        return self

    def __exit__(self, *exc_info):
        self._server.stop(timeout=1)

    def add(self, *steps):
        """Append steps to the script."""
        self.steps.extend(steps)

    def wait_for_requests(self, count, timeout=2.0):
        """Wait until *count* requests have arrived (or fail)."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{count} requests expected, {len(self.requests)} arrived")
            gevent.sleep(0.01)

    def _serve(self, sock, address):
        number = self.connections
        self.connections += 1
        channel = Channel(sock, number)
        try:
            while True:
                head = channel.read_head()
                if head is None:
                    return
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                headers = {}
                for line in header_lines:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                if self.steps and self.steps[0] == RESET_BEFORE_BODY:
                    self.steps.popleft()
                    self.partial.append(Request(number, method, target, headers, channel.buffer))
                    channel.reset()
                    return
                body = channel.read_body(int(headers.get("content-length", 0)))
                if body is None:
                    self.partial.append(Request(number, method, target, headers, channel.buffer))
                    return
                request = Request(number, method, target, headers, body)
                if not self.steps:
                    self.requests.append(request)
                    return
                step = self.steps.popleft()
                self.requests.append(request)
                outcome = channel.send(step) if isinstance(step, bytes) else step(channel, request)
                if outcome == CLOSE:
                    return
                if outcome == RESET:
                    channel.reset()
                    return
        except OSError:
            return
        finally:
            sock.close()
