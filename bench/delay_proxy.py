"""A TCP proxy that delays every request by a fixed time and counts the answers: a remote API, on loopback.

``bench/run.py --server real`` puts one between a pack and the real Flyte server to measure a pack talking to an
API some milliseconds away (``--delay 0.02``: every request reaches the server 20 ms after the pack sent it, as the
loopback API's ``latency`` answers every request 20 ms late), and one per replica in the replica check, whose
counts tell how many actions each replica took. It forwards bytes unchanged, one upstream connection per client
connection, so keep-alive and pipelining are the client's and the server's own; responses come back at once.

To count, it follows the HTTP/1.1 framing of both directions (``Content-Length`` and chunked bodies, interim
``1xx`` answers, bodiless ``204``/``304``/``HEAD``, close-delimited responses) and pairs each response with its
request: the counts are by route (``take``, ``result``, ``event``, ``register``, ``other``) and status. A stream it
cannot frame is still forwarded, and counted once as ``unframed``.

The control pipe, as ``loopback_api.py``'s: JSON lines on stdin, answers and notifications on stdout.

* notifies ``{"event": "listening", "port": P, "pid": N}`` once it listens;
* ``{"op": "delay", "seconds": S}``: requests arriving from now on are forwarded S seconds late; answers
  ``{"reply": "delay"}``;
* ``{"op": "stats"}``: answers ``{"reply": "stats", "statuses": {"take 200": n, ...}, "connections_opened": n,
  "cpu_s": s}``.

End of input on stdin stops it, so it never outlives its driver.

Usage: ``python bench/delay_proxy.py --upstream 127.0.0.1:PORT [--delay 0.02] [--port 0]``
"""

import argparse
import collections
import heapq
import itertools
import json
import os
import resource
import select
import socket
import sys
import time

RECV_SIZE = 256 * 1024
MAX_HEAD = 64 * 1024


class _Unframed(Exception):
    """The stream is not HTTP/1.1 this proxy can follow: it stops counting on that connection."""


class Framer:
    """Follows one direction of an HTTP/1.1 stream, message by message, without keeping the bytes it has seen.

    :meth:`feed` returns the heads of the messages that started in the data: ``(first line, head bytes)``.
    *responses*: the stream is server to client, so a response to ``HEAD``, a ``1xx``, ``204`` or ``304`` has no
    body; ``is_head()`` says whether the request being answered was a ``HEAD``.
    """

    def __init__(self, responses, is_head=lambda: False):
        self._responses = responses
        self._is_head = is_head
        self._buf = bytearray()
        self._body_left = 0      # bytes of a Content-Length body still to come
        self._chunked = False    # in a chunked body (reading chunk sizes, data and the trailer)
        self._chunk_left = 0     # data bytes (plus CRLF) of the current chunk still to come
        self._trailer = False
        self._to_eof = False     # a close-delimited response body

    def feed(self, data):
        if self._to_eof:
            return []
        heads = []
        self._buf += data
        buf = self._buf
        while buf:
            if self._body_left:
                taken = min(self._body_left, len(buf))
                del buf[:taken]
                self._body_left -= taken
                continue
            if self._chunked:
                if not self._dechunk():
                    break
                continue
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise _Unframed("head too long")
                break
            head = bytes(buf[:end])
            del buf[:end + 4]
            heads.append(self._start(head))
            if self._to_eof:
                buf.clear()
                break
        return heads

    def _start(self, head):
        lines = head.split(b"\r\n")
        first = lines[0].decode("latin-1")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        if self._responses:
            parts = first.split(" ", 2)
            if len(parts) < 2 or not parts[1].isdigit():
                raise _Unframed(f"status line {first!r}")
            status = int(parts[1])
            if status < 200 or status in (204, 304) or self._is_head():
                return first, headers
        if b"chunked" in headers.get(b"transfer-encoding", b""):
            self._chunked, self._chunk_left, self._trailer = True, 0, False
        elif b"content-length" in headers:
            try:
                self._body_left = int(headers[b"content-length"])
            except ValueError:
                raise _Unframed("Content-Length") from None
        elif self._responses:
            self._to_eof = True
        return first, headers

    def _dechunk(self):
        """Consume what it can of a chunked body; False when it needs more data."""
        buf = self._buf
        while buf:
            if self._chunk_left:
                taken = min(self._chunk_left, len(buf))
                del buf[:taken]
                self._chunk_left -= taken
                continue
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise _Unframed("chunk line too long")
                return False
            line = bytes(buf[:end])
            del buf[:end + 2]
            if self._trailer:
                if not line:
                    self._chunked = False
                    return True
                continue
            try:
                size = int(line.partition(b";")[0].strip(), 16)
            except ValueError:
                raise _Unframed("chunk size") from None
            if size == 0:
                self._trailer = True
            else:
                self._chunk_left = size + 2  # the data, then its CRLF
        return False


def route_of(request_line):
    """The route a request line names: ``take``, ``result``, ``event``, ``register`` or ``other``."""
    method, _, rest = request_line.partition(" ")
    path = rest.partition(" ")[0].partition("?")[0]
    if path.endswith("/actions/take"):
        return "take"
    if path.endswith("/result"):
        return "result"
    if path.endswith("/events"):
        return "event"
    if method == "POST" and path.rstrip("/").endswith("/v1/packs"):
        return "register"
    return "other"


class Pipe:
    """A client connection and its upstream connection."""

    def __init__(self, client, upstream):
        self.client, self.upstream = client, upstream
        self.to_upstream = collections.deque()  # (due, data) from the client, not yet due
        self.up_out = bytearray()    # due bytes the upstream socket has not accepted yet
        self.client_out = bytearray()
        self.routes = collections.deque()  # (route, is HEAD) of requests not answered yet, in order
        self.requests = Framer(False)
        self.responses = Framer(True, lambda: bool(self.routes) and self.routes[0][1])
        self.framed = True
        self.closing = False  # the upstream closed: close the client once client_out is flushed


class DelayProxy:
    """The proxy's one epoll loop: listener, control pipe, both sockets of every pipe, and the delay timers."""

    def __init__(self, host, port, upstream, delay, control_in, control_out):
        self.listener = socket.create_server((host, port), backlog=socket.SOMAXCONN)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.upstream = upstream
        self.delay = delay
        self.control_in, self.control_out = control_in, control_out
        self.control_buf = bytearray()
        self.epoll = select.epoll()
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.epoll.register(control_in, select.EPOLLIN)
        self.sockets = {}  # fd -> (pipe, "client" | "upstream")
        self.timers = []   # (due, seq, pipe)
        self.seq = itertools.count()
        self.statuses = collections.Counter()
        self.connections_opened = 0
        self.running = True

    def notify(self, message):
        self.control_out.write(json.dumps(message) + "\n")
        self.control_out.flush()

    def serve(self):
        self.notify({"event": "listening", "port": self.port, "pid": os.getpid()})
        listener_fd = self.listener.fileno()
        while self.running:
            timeout = max(0.0, self.timers[0][0] - time.monotonic()) if self.timers else -1
            for fd, mask in self.epoll.poll(timeout):
                if fd == listener_fd:
                    self._accept()
                elif fd == self.control_in:
                    self._control()
                elif fd in self.sockets:
                    pipe, side = self.sockets[fd]
                    if mask & select.EPOLLOUT:
                        self._flush(pipe, side)
                    if fd in self.sockets and mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                        self._read(pipe, side)
            self._run_timers()
        for pipe, _ in list(self.sockets.values()):
            self._close(pipe)

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except BlockingIOError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError as error:
                print(f"delay_proxy: connect {self.upstream}: {error}", file=sys.stderr, flush=True)
                client.close()
                continue
            pipe = Pipe(client, upstream)
            for sock, side in ((client, "client"), (upstream, "upstream")):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.sockets[sock.fileno()] = (pipe, side)
                self.epoll.register(sock.fileno(), select.EPOLLIN)
            self.connections_opened += 1

    def _read(self, pipe, side):
        sock = pipe.client if side == "client" else pipe.upstream
        try:
            data = sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if side == "client":
            if not data:
                self._close(pipe)
                return
            self._follow(pipe, pipe.requests, data)
            if self.delay > 0:
                due = time.monotonic() + self.delay
                pipe.to_upstream.append((due, data))
                if len(pipe.to_upstream) == 1:
                    heapq.heappush(self.timers, (due, next(self.seq), pipe))
            else:
                self._send(pipe, "upstream", data)
            return
        if not data:
            pipe.closing = True
            if not pipe.client_out:
                self._close(pipe)
            else:
                self.epoll.modify(pipe.upstream.fileno(), 0)
            return
        self._follow(pipe, pipe.responses, data)
        self._send(pipe, "client", data)

    def _follow(self, pipe, framer, data):
        if not pipe.framed:
            return
        try:
            heads = framer.feed(data)
        except _Unframed:
            pipe.framed = False
            self.statuses["unframed"] += 1
            return
        for first, _ in heads:
            if framer is pipe.requests:
                pipe.routes.append((route_of(first), first.startswith("HEAD ")))
                continue
            status = int(first.split(" ", 2)[1])
            if status < 200:
                continue
            route = pipe.routes.popleft()[0] if pipe.routes else "unpaired"
            self.statuses[f"{route} {status}"] += 1

    def _run_timers(self):
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, pipe = heapq.heappop(self.timers)
            if pipe.client.fileno() < 0:
                continue  # closed since
            while pipe.to_upstream and pipe.to_upstream[0][0] <= now:
                self._send(pipe, "upstream", pipe.to_upstream.popleft()[1])
            if pipe.to_upstream:
                heapq.heappush(self.timers, (pipe.to_upstream[0][0], next(self.seq), pipe))

    def _send(self, pipe, side, data):
        sock, out = (pipe.upstream, pipe.up_out) if side == "upstream" else (pipe.client, pipe.client_out)
        if sock.fileno() < 0:
            return
        if not out:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close(pipe)
                return
            data = data[sent:]
            if not data:
                return
            self.epoll.modify(sock.fileno(), select.EPOLLIN | select.EPOLLOUT)
        out += data

    def _flush(self, pipe, side):
        sock, out = (pipe.upstream, pipe.up_out) if side == "upstream" else (pipe.client, pipe.client_out)
        try:
            sent = sock.send(out)
        except BlockingIOError:
            return
        except OSError:
            self._close(pipe)
            return
        del out[:sent]
        if not out:
            if side == "client" and pipe.closing:
                self._close(pipe)
                return
            self.epoll.modify(sock.fileno(), 0 if side == "upstream" and pipe.closing else select.EPOLLIN)

    def _close(self, pipe):
        for sock in (pipe.client, pipe.upstream):
            fd = sock.fileno()
            if fd >= 0:
                self.sockets.pop(fd, None)
                try:
                    self.epoll.unregister(fd)
                except (OSError, ValueError):
                    pass
                sock.close()

    def _control(self):
        data = os.read(self.control_in, 1 << 16)
        if not data:
            self.running = False
            return
        self.control_buf += data
        while (end := self.control_buf.find(b"\n")) >= 0:
            line = bytes(self.control_buf[:end])
            del self.control_buf[:end + 1]
            if not line.strip():
                continue
            message = json.loads(line)
            if message["op"] == "delay":
                self.delay = float(message["seconds"])
                self.notify({"reply": "delay"})
            elif message["op"] == "stats":
                self.notify({"reply": "stats", "statuses": dict(sorted(self.statuses.items())),
                             "connections_opened": self.connections_opened, "cpu_s": time.process_time()})
            else:
                raise ValueError(f"unknown op {message['op']!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, metavar="HOST:PORT")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each request is held (default 0)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    proxy = DelayProxy(args.host, args.port, (host.strip("[]"), int(port)), args.delay, sys.stdin.fileno(),
                       sys.stdout)
    proxy.serve()


if __name__ == "__main__":
    main()
