"""The benchmark's loopback Flyte API: the pack routes of the Flyte server, lean enough not to be the bottleneck.

``bench/run.py`` starts one of these per measured run, as its own process, and drives it over a pipe. It serves
the routes a pack uses (``GET /`` and ``/v1``, ``POST /v1/packs``, ``GET /v1/packs[/<id>]``, take, result,
events, ``GET /health``) with the Flyte server's semantics for them: links built from the ``Host`` header with the
server's rels, 201 with ``Location`` on registration, take 200 (oldest ``NEW`` action of the pack's name whose
labels fit, ``actionName`` filtering) or 204, result 202 once and 500 on a repeat, 404 for an unknown pack or
action, 400 for a body the server could not decode (including a ``createdAt`` that is not RFC 3339 with a zone),
the connection dropped for a result from a pack that cannot have taken the action, and empty error bodies. It
speaks HTTP/1.1 with keep-alive (``Content-Length`` and chunked request bodies, ``Connection: close``, HTTP/1.0,
``Expect: 100-continue``, pipelined requests answered in order).

It is not a test double: :class:`flyte_gevent.testing.FakeFlyteApi` is the faithful imitation (Go's JSON
decoding, fault injection, request recording). This one exists because that one, on gevent's pywsgi, costs
355-475 µs of CPU per request on a 2-core VM and so caps a loopback run near 1,050-1,400 actions/s, a third of
what the Go client does. Here a request is one ``recv`` and one ``send`` on a single epoll loop, with no greenlet
and no WSGI environ: 80-120 µs, most of it the ``send``.

The control pipe: JSON lines on stdin, answers and notifications as JSON lines on stdout.

* ``{"op": "queue", "batch": B, "pack_name": P, "command": C, "inputs": [...], "at_next_take": true}`` queues
  one action per input for packs named P, either at once or (``at_next_take``) when the next take request
  arrives, before that take looks at the queue; the actions are built on receipt, so queueing them later costs
  the measured window nothing. Notifies ``{"event": "armed", "batch": B}`` when it waits for that take,
  ``{"event": "started", "batch": B, "at": t}`` when queued, ``{"event": "all_taken", ...}`` once every one was
  taken and ``{"event": "done", "batch": B, "actions": {...}, "window": {...}}`` once every one has its result,
  with each action's ``created``/``taken``/``completed`` times (``time.monotonic()``, the system-wide monotonic
  clock), how many were FATAL, and the server's requests and CPU seconds between ``started`` and ``done``.
* ``{"op": "latency", "seconds": S}``: from now on every request is answered S seconds after it arrived (requests
  on one connection are still answered in order). Answers ``{"reply": "latency"}``.
* ``{"op": "stats"}``: answers ``{"reply": "stats", ...}`` with totals: requests, CPU seconds, connections, the
  statuses given per route.

It also notifies ``{"event": "listening", "port": P, "pid": N}`` at start and ``{"event": "registered", "id": I,
"name": N}`` on each registration. End of input on stdin stops it, so it never outlives its driver.

Usage: ``python bench/loopback_api.py [--host 127.0.0.1] [--port 0]`` (from a terminal, type the JSON lines).
"""

import argparse
import collections
import heapq
import itertools
import json
import os
import re
import resource
import select
import socket
import sys
import time

# How much a peer may send before the server gives up on it: a request head, and a request body.
MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
RECV_SIZE = 256 * 1024

_REASONS = {100: "Continue", 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 400: "Bad Request",
            404: "Not Found", 405: "Method Not Allowed", 413: "Content Too Large",
            431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 505: "HTTP Version Not Supported"}
_JSON = b"application/json; charset=utf-8"
_TEXT = b"text/plain; charset=utf-8"
# Go's time.Parse(RFC3339), which the server uses for createdAt: mandatory zone, T separator.
_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{1,2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})\Z")
# pack/handler.go: a pack-level link whose rel matches this (unanchored) is refused with a 400.
_RESERVED_REL = re.compile(r"up|self|/actionResult\Z|/takeAction\Z|/event\Z")
_DROP = object()  # a handler's answer meaning: close the connection without a response


class HttpError(Exception):
    """A request the server cannot read: answered with *status* and the connection closed."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status


def _json(value, sort_keys=False):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys).encode()


def pack_id(name, labels):
    """The server's id rule (pack/pack.go generateId): the name, then ``.key.value`` per label in key order."""
    return name + "".join(f".{key}.{labels[key]}" for key in sorted(labels))


def _go_time_now():
    ns = time.time_ns()
    seconds, fraction = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:09d}".rstrip("0") + "Z"


class Action:
    """One queued action. ``prefix`` is its take body up to the result href, encoded once when it is built."""

    __slots__ = (
        "batch",
        "command",
        "completed",
        "created",
        "event",
        "id",
        "labels",
        "pack_name",
        "prefix",
        "state",
        "taken",
    )

    def __init__(self, action_id, pack_name, command, input, labels, batch):
        self.id = action_id
        self.pack_name = pack_name
        self.labels = frozenset(labels.items())
        self.command = command
        # Sorted keys: the server hands input back from a decoded map, and Go sorts map keys.
        self.prefix = b'{"command":' + _json(command) + b',"input":' + _json(input, sort_keys=True) + b',"links":'
        self.state = "NEW"
        self.created = self.taken = self.completed = None
        self.event = None
        self.batch = batch


class Batch:
    """Actions queued together, and what the driver is told about them."""

    def __init__(self, batch_id, actions):
        self.id = batch_id
        self.actions = actions
        self.taken = 0
        self.completed = 0
        self.start = None  # (requests, CPU seconds) when queued


class Pack:
    __slots__ = ("document", "id", "labels", "name")

    def __init__(self, pack_id, name, labels, document):
        self.id, self.name, self.labels, self.document = pack_id, name, labels, document


class FlyteState:
    """Packs, actions and batches: what the routes read and change. No HTTP in here."""

    def __init__(self, notify):
        self.notify = notify
        self.packs = {}
        self.actions = {}
        # pack name -> NEW actions, oldest first. An OrderedDict, because a take deletes from the front, which
        # a plain dict makes quadratic (it skips the slots of deleted entries to find the first). A take whose
        # labels or actionName do not fit the head scans on; the benchmark never makes it.
        self.queues = collections.defaultdict(collections.OrderedDict)
        self.armed = collections.deque()  # batches to queue at the next take
        self.requests = 0
        self.events = 0
        self._ids = itertools.count(int.from_bytes(os.urandom(3), "big"))
        self._id_prefix = os.urandom(4).hex()

    def new_actions(self, batch_id, pack_name, command, inputs, labels=None):
        """A batch of actions, built now and queued later by :meth:`queue`."""
        actions = []
        batch = Batch(batch_id, actions)
        for input in inputs:
            # 24 hex digits, like the server's Mongo object ids.
            action_id = f"{self._id_prefix}{next(self._ids) & 0xFFFFFFFFFFFFFFFF:016x}"
            actions.append(Action(action_id, pack_name, command, input, labels or {}, batch))
        return batch

    def queue(self, batch, during_take=False):
        """Make a batch's actions NEW, oldest first. *during_take*: a take is being served and counts in."""
        now = time.monotonic()
        batch.start = (self.requests - 1 if during_take else self.requests, time.process_time())
        for action in batch.actions:
            action.created = now
            self.actions[action.id] = action
            self.queues[action.pack_name][action.id] = action
        self.notify({"event": "started", "batch": batch.id, "at": now})

    def before_take(self):
        """Queue the batches armed for the next take: called by each take before it looks at the queue."""
        while self.armed:
            self.queue(self.armed.popleft(), during_take=True)

    def take(self, pack, action_name):
        queue = self.queues.get(pack.name)
        if not queue:
            return None
        found = None
        for action in queue.values():
            if action.labels <= pack.labels and (not action_name or action.command == action_name):
                found = action
                break
        if found is None:
            return None
        del queue[found.id]
        found.state = "PENDING"
        found.taken = time.monotonic()
        batch = found.batch
        batch.taken += 1
        if batch.taken == len(batch.actions):
            self.notify({"event": "all_taken", "batch": batch.id, "at": found.taken})
        return found

    def complete(self, action, event):
        action.state = "FATAL" if event == "FATAL" else "SUCCESS"
        action.event = event
        action.completed = time.monotonic()
        batch = action.batch
        batch.completed += 1
        if batch.completed == len(batch.actions):
            self._report(batch, action.completed)

    def _report(self, batch, at):
        requests, cpu = batch.start
        actions = batch.actions
        self.notify({"event": "done", "batch": batch.id, "at": at,
                     "actions": {"created": [a.created for a in actions], "taken": [a.taken for a in actions],
                                 "completed": [a.completed for a in actions],
                                 "fatal": sum(a.state == "FATAL" for a in actions)},
                     "window": {"requests": self.requests - requests, "cpu_s": time.process_time() - cpu}})
        for action in actions:
            action.batch = None
        batch.actions = []


class Request:
    __slots__ = ("arrived", "body", "due", "headers", "keep_alive", "method", "target")

    def __init__(self, method, target, headers, body, keep_alive, arrived):
        self.method, self.target, self.headers, self.body = method, target, headers, body
        self.keep_alive, self.arrived, self.due = keep_alive, arrived, arrived


class Connection:
    __slots__ = ("closing", "continue_sent", "fd", "inbuf", "outbuf", "pending", "sock", "writing")

    def __init__(self, sock):
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.pending = collections.deque()  # parsed requests waiting for their answer time, in arrival order
        self.closing = False  # close once outbuf is flushed
        self.writing = False  # registered for EPOLLOUT
        self.continue_sent = False


def parse_request(buf, now):
    """Cut one request off the front of *buf*: a :class:`Request`, None if incomplete, or raises HttpError.

    ``"continue"`` instead means: the head is complete, asks for ``100-continue``, and the body has not arrived.
    """
    start = 0
    while buf.startswith(b"\r\n", start):  # RFC 9112 2.2: ignore empty lines before a request line
        start += 2
    end = buf.find(b"\r\n\r\n", start)
    if end < 0:
        if len(buf) - start > MAX_HEAD:
            raise HttpError(431)
        if start:
            del buf[:start]
        return None
    lines = bytes(buf[start:end]).split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise HttpError(400)
    method, target, version = parts
    if version == b"HTTP/1.1":
        keep_alive = True
    elif version == b"HTTP/1.0":
        keep_alive = False
    elif version.startswith(b"HTTP/"):
        raise HttpError(505)
    else:
        raise HttpError(400)
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise HttpError(400)  # no obs-fold, no whitespace before the colon
        name = name.lower()
        value = value.strip()
        if name in headers:
            if name in (b"content-length", b"host"):
                if headers[name] != value:
                    raise HttpError(400)
                continue
            value = headers[name] + b", " + value
        headers[name] = value
    connection = headers.get(b"connection", b"").lower()
    if b"close" in connection:
        keep_alive = False
    elif b"keep-alive" in connection:
        keep_alive = True
    body_start = end + 4
    encoding = headers.get(b"transfer-encoding")
    if encoding is not None:
        if b"content-length" in headers or encoding.lower() != b"chunked":
            raise HttpError(400 if b"content-length" in headers else 501)
        parsed = _dechunk(buf, body_start)
        if parsed is None:
            return _waiting_for_body(buf, headers)
        body, body_end = parsed
    else:
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            raise HttpError(400)
        length = int(length)
        if length > MAX_BODY:
            raise HttpError(413)
        body_end = body_start + length
        if len(buf) < body_end:
            return _waiting_for_body(buf, headers)
        body = bytes(buf[body_start:body_end])
    del buf[:body_end]
    return Request(method.decode("latin-1"), target.decode("latin-1"), headers, body, keep_alive, now)


def _waiting_for_body(buf, headers):
    if headers.get(b"expect", b"").lower() == b"100-continue":
        return "continue"
    return None


def _dechunk(buf, at):
    """``(body, end)`` of a chunked body starting at *at* in *buf*, None if incomplete; raises HttpError."""
    chunks = []
    size_total = 0
    while True:
        line_end = buf.find(b"\r\n", at)
        if line_end < 0:
            if len(buf) - at > 1024:
                raise HttpError(400)
            return None
        size_text = bytes(buf[at:line_end]).partition(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HttpError(400) from None
        if size_text.startswith((b"-", b"+", b"0x", b"0X")):
            raise HttpError(400)
        at = line_end + 2
        if size == 0:
            break
        size_total += size
        if size_total > MAX_BODY:
            raise HttpError(413)
        if len(buf) < at + size + 2:
            return None
        if buf[at + size:at + size + 2] != b"\r\n":
            raise HttpError(400)
        chunks.append(bytes(buf[at:at + size]))
        at += size + 2
    while True:  # trailer fields, up to the empty line
        line_end = buf.find(b"\r\n", at)
        if line_end < 0:
            if len(buf) - at > MAX_HEAD:
                raise HttpError(431)
            return None
        empty = line_end == at
        at = line_end + 2
        if empty:
            return b"".join(chunks), at


class LoopbackApi:
    """The HTTP server: one epoll loop for the listening socket, every connection and the control pipe."""

    def __init__(self, host, port, control_in, control_out):
        self.listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                             backlog=socket.SOMAXCONN)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.control_in = control_in
        self.control_out = control_out
        self.control_buf = bytearray()
        self.state = FlyteState(self.notify)
        self.epoll = select.epoll()
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.epoll.register(control_in, select.EPOLLIN)
        self.connections = {}
        self.timers = []  # (due, seq, connection): the head request of that connection is due
        self.seq = itertools.count()
        self.latency = 0.0
        self.running = True
        self.statuses = collections.Counter()  # (route, status) -> count
        self.connections_opened = 0
        self.accept_errors = 0
        self._date = (0, b"")
        self._bases = {}

    # --- the loop ------------------------------------------------------------------------------------------

    def notify(self, message):
        self.control_out.write(json.dumps(message) + "\n")
        self.control_out.flush()

    def serve(self):
        self.notify({"event": "listening", "port": self.port, "pid": os.getpid()})
        epoll, listener_fd, control_fd = self.epoll, self.listener.fileno(), self.control_in
        connections = self.connections
        while self.running:
            timeout = -1
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - time.monotonic())
            for fd, mask in epoll.poll(timeout):
                if fd == listener_fd:
                    self._accept()
                elif fd == control_fd:
                    self._control()
                else:
                    connection = connections.get(fd)
                    if connection is None:
                        continue
                    if mask & select.EPOLLIN or mask & (select.EPOLLHUP | select.EPOLLERR):
                        self._read(connection)
                    if mask & select.EPOLLOUT and connection.fd in connections:
                        self._flush(connection)
            if self.timers:
                self._run_timers()
        for connection in list(connections.values()):
            self._close(connection)
        self.listener.close()

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as error:
                # Out of file descriptors, say. The listener stays readable, so pause a moment instead of spinning;
                # the count shows up in the stats the benchmark reports.
                self.accept_errors += 1
                print(f"loopback_api: accept: {error}", file=sys.stderr, flush=True)
                time.sleep(0.005)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = Connection(sock)
            self.connections[connection.fd] = connection
            self.connections_opened += 1
            self.epoll.register(connection.fd, select.EPOLLIN | select.EPOLLRDHUP)

    def _read(self, connection):
        try:
            data = connection.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(connection)
            return
        if connection.closing:
            return  # input after a response that ends the connection is discarded
        connection.inbuf += data
        now = time.monotonic()
        while connection.inbuf and not connection.closing:
            try:
                request = parse_request(connection.inbuf, now)
            except HttpError as error:
                self._error(connection, error.status)
                return
            if request is None:
                return
            if request == "continue":
                if not connection.continue_sent:
                    connection.continue_sent = True
                    self._write(connection, b"HTTP/1.1 100 Continue\r\n\r\n")
                return
            connection.continue_sent = False
            self.state.requests += 1
            if self.latency > 0:
                request.due = now + self.latency
            if connection.pending or request.due > now:
                connection.pending.append(request)
                if len(connection.pending) == 1:
                    heapq.heappush(self.timers, (request.due, next(self.seq), connection))
            else:
                self._answer(connection, request)

    def _run_timers(self):
        now = time.monotonic()
        timers = self.timers
        while timers and timers[0][0] <= now:
            _, _, connection = heapq.heappop(timers)
            if connection.fd not in self.connections or not connection.pending:
                continue
            self._answer(connection, connection.pending.popleft())
            if connection.pending and connection.fd in self.connections:
                heapq.heappush(timers, (max(connection.pending[0].due, now), next(self.seq), connection))

    def _error(self, connection, status):
        connection.inbuf.clear()
        connection.pending.clear()
        self.statuses[("unreadable", status)] += 1
        self._respond(connection, status, False, b"", _TEXT, b"", head=False)

    def _write(self, connection, data):
        if connection.outbuf:
            connection.outbuf += data
            return
        try:
            sent = connection.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(connection)
            return
        if sent < len(data):
            connection.outbuf += data[sent:]
            if not connection.writing:
                connection.writing = True
                self.epoll.modify(connection.fd, select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP)

    def _flush(self, connection):
        try:
            sent = connection.sock.send(connection.outbuf)
        except BlockingIOError:
            return
        except OSError:
            self._close(connection)
            return
        del connection.outbuf[:sent]
        if not connection.outbuf:
            if connection.closing:
                self._close(connection)
                return
            connection.writing = False
            self.epoll.modify(connection.fd, select.EPOLLIN | select.EPOLLRDHUP)

    def _close(self, connection):
        if self.connections.pop(connection.fd, None) is None:
            return
        try:
            self.epoll.unregister(connection.fd)
        except (OSError, ValueError):
            pass
        connection.sock.close()

    # --- responses -----------------------------------------------------------------------------------------

    def _date_header(self):
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, b"Date: " + time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
                          + b"\r\n")
        return self._date[1]

    def _respond(self, connection, status, keep_alive, body, content_type, extra, head):
        """Write one response; *extra* is raw header lines. Without keep-alive the connection closes after it."""
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, "Unknown").encode()), self._date_header()]
        if body or content_type is _JSON:
            lines.append(b"Content-Type: " + content_type + b"\r\n")
        if status != 204:  # RFC 9110 8.6: never a Content-Length on a 204
            lines.append(b"Content-Length: %d\r\n" % len(body))
        if extra:
            lines.append(extra)
        if not keep_alive:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        if not head:
            lines.append(body)
        self._write(connection, b"".join(lines))
        if not keep_alive and connection.fd in self.connections:
            connection.closing = True
            connection.inbuf.clear()
            if not connection.outbuf:
                self._close(connection)

    def _answer(self, connection, request):
        target = request.target
        if target.startswith(("http://", "https://")):
            # The absolute-form, which a server must accept; its authority replaces Host (RFC 9112 3.2.2).
            _, _, authority_path = target.partition("//")
            authority, _, rest = authority_path.partition("/")
            request.headers[b"host"] = authority.encode("latin-1")
            target = "/" + rest
        path, _, query = target.partition("?")
        try:
            route, answer = self._route(request, path, query)
        except Exception as error:  # noqa: BLE001 - a bug here: say so on stderr, answer 500, keep serving
            print(f"loopback_api: {request.method} {request.target}: {type(error).__name__}: {error}",
                  file=sys.stderr, flush=True)
            route, answer = "error", (500, b"", None, b"")
        if answer is _DROP:
            self.statuses[(route, "dropped")] += 1
            connection.pending.clear()
            connection.inbuf.clear()
            self._close(connection)
            return
        status, body, content_type, extra = answer
        self.statuses[(route, status)] += 1
        self._respond(connection, status, request.keep_alive, body, content_type or _TEXT, extra,
                      head=request.method == "HEAD")

    def _base(self, request):
        host = request.headers.get(b"host", b"")
        base = self._bases.get(host)
        if base is None:
            base = self._bases[host] = "http://" + host.decode("utf-8", "replace") + "/"
        return base

    def _route(self, request, path, query):
        method = request.method
        parts = path.split("/")
        # ['', 'v1', 'packs', id, 'actions', aid, 'result'] and shorter
        if len(parts) >= 4 and parts[1] == "v1" and parts[2] == "packs":
            pack = self.state.packs.get(parts[3])
            if len(parts) == 6 and parts[4] == "actions" and parts[5] == "take":
                return "take", self._only("POST", method) or self._take(request, pack, query)
            if len(parts) == 7 and parts[4] == "actions" and parts[6] == "result":
                return "result", self._only("POST", method) or self._result(request, pack, parts[5])
            if len(parts) == 5 and parts[4] == "events":
                return "event", self._only("POST", method) or self._event(request, pack)
            if len(parts) == 4 and parts[3]:
                if method == "DELETE":
                    return "delete_pack", self._delete_pack(pack)
                return "get_pack", self._only("GET", method) or self._get_pack(request, pack)
        if path in ("/v1/packs", "/v1/packs/"):
            if method == "POST":
                return "register", self._register(request)
            return "list_packs", self._only("GET", method) or self._list_packs(request)
        if path == "/v1":
            return "v1", self._only("GET", method) or (200, _json(self._v1_document(self._base(request))), _JSON, b"")
        if path == "/":
            return "root", self._only("GET", method) or (200, _json(self._root_document(self._base(request))),
                                                         _JSON, b"")
        if path == "/health":
            return "health", self._only("GET", method) or (200, b"", None, b"")
        return None, (404, b"Not Found", _TEXT, b"")

    @staticmethod
    def _only(allowed, method):
        if method == allowed or (allowed == "GET" and method == "HEAD"):
            return None
        return 405, b"Method Not Allowed", _TEXT, b"Allow: " + allowed.encode() + b"\r\n"

    def _take(self, request, pack, query):
        if pack is None:
            return 404, b"", None, b""
        state = self.state
        state.before_take()
        action_name = ""
        if "actionName=" in query:
            for pair in query.split("&"):
                key, _, value = pair.partition("=")
                if key == "actionName":
                    action_name = value
                    break
        action = state.take(pack, action_name)
        if action is None:
            return 204, b"", None, b""
        base = self._base(request)
        link = (f'[{{"href":"{base}v1/packs/{pack.id}/actions/{action.id}/result",'
                f'"rel":"{base}swagger#/actionResult"}}]}}').encode()
        return 200, action.prefix + link, _JSON, b""

    def _result(self, request, pack, action_id):
        if pack is None:
            return 404, b"", None, b""
        event = _decode_event(request.body)
        if event is None:
            return 400, b"", None, b""
        action = self.state.actions.get(action_id)
        if action is None:
            return 404, b"", None, b""
        if action.pack_name != pack.name or not action.labels <= pack.labels:
            return _DROP  # execution/pack.go: the handler panics on a nil action; Go's server drops the connection
        if action.state != "PENDING":
            return 500, b"", None, b""  # a repeated result, or one for an action never taken
        self.state.complete(action, event)
        return 202, b"", None, b""

    def _event(self, request, pack):
        if pack is None:
            return 404, b"", None, b""
        if _decode_event(request.body) is None:
            return 400, b"", None, b""
        self.state.events += 1
        return 202, b"", None, b""

    def _register(self, request):
        try:
            body = json.loads(request.body)
        except ValueError:
            return 400, b"", None, b""
        if not isinstance(body, dict) or not isinstance(body.get("name", ""), str):
            return 400, b"", None, b""
        labels = body.get("labels") or {}
        links = body.get("links") or []
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            return 400, b"", None, b""
        if not isinstance(links, list) or any(not isinstance(link, dict) for link in links):
            return 400, b"", None, b""
        if any(_RESERVED_REL.search(str(link.get("rel") or "")) for link in links):
            return 400, b"", None, b""
        name = body.get("name", "")
        pid = pack_id(name, labels)
        base = self._base(request)
        self.state.packs[pid] = Pack(pid, name, frozenset(labels.items()), body)
        self.notify({"event": "registered", "id": pid, "name": name})
        location = f"Location: {base}v1/packs/{pid}\r\n".encode()
        # The server sets Content-Type after WriteHeader(201), which Go ignores, so the body's type is sniffed.
        return 201, _json(self._pack_document(self.state.packs[pid], base)), _TEXT, location

    def _get_pack(self, request, pack):
        if pack is None:
            return 404, b"", None, b""
        return 200, _json(self._pack_document(pack, self._base(request))), _JSON, b""

    def _delete_pack(self, pack):
        if pack is None:
            return 404, b"", None, b""
        del self.state.packs[pack.id]
        return 204, b"", None, b""

    def _list_packs(self, request):
        base = self._base(request)
        packs = []
        for pack in sorted(self.state.packs.values(), key=lambda p: p.name):
            entry = {"id": pack.id, "name": pack.name}
            if pack.labels:
                entry["labels"] = dict(sorted(pack.labels))
            entry.update(lastSeen=_go_time_now(), links=[{"href": f"{base}v1/packs/{pack.id}", "rel": "self"}],
                         status="live")
            packs.append(entry)
        links = [{"href": base + "v1/packs", "rel": "self"}, {"href": base + "v1", "rel": "up"},
                 {"href": base + "swagger#/pack", "rel": "help"}]
        return 200, _json({"links": links, "packs": packs}), _JSON, b""

    @staticmethod
    def _root_document(base):
        return {"links": [{"href": base, "rel": "self"}, {"href": base + "swagger#/info", "rel": "help"},
                          {"href": base + "v1", "rel": base + "swagger#!/info/v1"}]}

    @staticmethod
    def _v1_document(base):
        return {"links": [
            {"href": base + "v1", "rel": "self"},
            {"href": base, "rel": "up"},
            {"href": base + "swagger#!/info/v1", "rel": "help"},
            {"href": base + "health", "rel": base + "swagger#!/info/health"},
            {"href": base + "v1/packs", "rel": base + "swagger#!/pack/listPacks"},
            {"href": base + "v1/flows", "rel": base + "swagger#!/flow/listFlows"},
            {"href": base + "v1/datastore", "rel": base + "swagger#!/datastore/listDatastoreItems"},
            {"href": base + "v1/audit/flows", "rel": base + "swagger#!/flowAudit/findFlows"},
            {"href": base + "v1/swagger", "rel": base + "swagger"},
        ]}

    @staticmethod
    def _pack_document(pack, base):
        """The 201 / GET body (pack/view.go): the request's fields, command links replaced by per-command take
        links, then the registered pack links followed by the server's four."""
        body = pack.document
        take = f"{base}v1/packs/{pack.id}/actions/take"
        document = {"id": pack.id, "name": pack.name}
        if pack.labels:
            document["labels"] = dict(sorted(pack.labels))
        document["commands"] = [
            {"name": command.get("name", ""), "events": command.get("events") or [],
             "links": [{"href": f"{take}?commandName={command.get('name', '')}",
                        "rel": base + "swagger#!/action/takeAction"}]}
            for command in body.get("commands") or [] if isinstance(command, dict)]
        document["events"] = body.get("events") or []
        document["lastSeen"] = _go_time_now()
        document["status"] = "live"
        document["links"] = list(body.get("links") or []) + [
            {"href": f"{base}v1/packs/{pack.id}", "rel": "self"},
            {"href": f"{base}v1/packs", "rel": "up"},
            {"href": take, "rel": base + "swagger#!/action/takeAction"},
            {"href": f"{base}v1/packs/{pack.id}/events", "rel": base + "swagger#/event"},
        ]
        return document

    # --- the control pipe ----------------------------------------------------------------------------------

    def _control(self):
        data = os.read(self.control_in, 1 << 20)
        if not data:
            self.running = False
            return
        self.control_buf += data
        while True:
            end = self.control_buf.find(b"\n")
            if end < 0:
                return
            line = bytes(self.control_buf[:end])
            del self.control_buf[:end + 1]
            if line.strip():
                self._command(json.loads(line))

    def _command(self, message):
        op = message["op"]
        state = self.state
        if op == "queue":
            if not message["inputs"]:
                raise ValueError("queue: no inputs")
            batch = state.new_actions(message["batch"], message["pack_name"], message["command"], message["inputs"],
                                      message.get("labels"))
            if message.get("at_next_take"):
                state.armed.append(batch)
                self.notify({"event": "armed", "batch": batch.id})
            else:
                state.queue(batch)
        elif op == "latency":
            self.latency = float(message["seconds"])
            self.notify({"reply": "latency"})
        elif op == "stats":
            self.notify({"reply": "stats", "requests": state.requests, "cpu_s": time.process_time(),
                         "events": state.events, "connections_opened": self.connections_opened,
                         "connections_open": len(self.connections), "accept_errors": self.accept_errors,
                         "statuses": {f"{route} {status}": n for (route, status), n in sorted(
                             self.statuses.items(), key=lambda item: (str(item[0][0]), str(item[0][1])))}})
        else:
            raise ValueError(f"unknown op {op!r}")


def _decode_event(body):
    """The event name of a result or event body the server would accept, else None (a 400)."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if value is None:
        return ""
    if not isinstance(value, dict):
        return None
    event = value.get("event")
    if event is None:
        event = ""
    created_at = value.get("createdAt")
    if not isinstance(event, str) or (created_at is not None and not (
            isinstance(created_at, str) and _RFC3339.match(created_at))):
        return None
    return event


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    # A client that opens a connection per request in flight (the Go client does, beyond two idle ones) can hold
    # thousands at once.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = LoopbackApi(args.host, args.port, sys.stdin.fileno(), sys.stdout)
    server.serve()


if __name__ == "__main__":
    main()
