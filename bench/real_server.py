"""The real Flyte server as the benchmark's action source (``bench/run.py --server real``).

:class:`RealServerSource` has the interface of :class:`harness.LoopbackSource` (``url``, ``wait_for_pack``,
``queue_batch`` returning a batch with ``wait_done``, ``set_latency``, ``stats``, ``close``) over a fresh
``flyte-server`` process (``../shared/peers/flyte-server``, storage in memory) started with
:meth:`flyte_gevent.testing.FlyteServer.launch`. What differs is how actions come to exist: a real server creates
them only from flows, so :meth:`~RealServerSource.queue_batch` creates them all (one flow, one event each) and
waits until every one is NEW, before any pack runs; :func:`harness.measure_prequeued` then starts the pack.

What it measures, without adding a request of its own while a batch drains:

* **from the server's log** (read as it grows): registrations, takes that won an action, takes answered 500
  because another take claimed the action first (the server logs ``Could not take action``: lost races), and
  completed actions, so a batch is known to be done the moment its last result is accepted;
* **from ``/proc/<pid>/stat``**: the server's CPU time over the batch;
* **from the audit API**, once the batch is done: each action's NEW, PENDING and SUCCESS/FATAL times (the server
  stores them to the millisecond), for the drain rate;
* **from a** :mod:`delay_proxy` (with ``delay`` or ``replicas``): requests held 20 ms on their way to the server,
  and each replica's own counts (one proxy per replica), so the share of the work each replica took is known.
"""

import datetime
import json
import os
import re
import selectors
import subprocess
import sys
import time

from harness import BenchError, _die_with_parent, cpu_seconds, find_shared_peer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROXY_SCRIPT = os.path.join(HERE, "delay_proxy.py")
SERVER_PATH = os.path.join("shared", "peers", "flyte-server", "flyte-server")
sys.path.insert(0, ROOT)

from flyte_gevent.testing import FlyteServer  # noqa: E402

_REGISTERED = re.compile(r"Pack registered: PackId=(\S+)")
_TAKEN = re.compile(r"Action actionId=(\S+) taken")
_COMPLETED = re.compile(r"Action completed ActionId=(\S+)")
_LOST = "Could not take action"


def find_server():
    """``FLYTE_GEVENT_REAL_SERVER``, else ``shared/peers/flyte-server/flyte-server`` in the nearest directory above
    the repository that has it; None when neither is an executable."""
    configured = os.environ.get("FLYTE_GEVENT_REAL_SERVER")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    return find_shared_peer(SERVER_PATH)


class ServerLog:
    """The server's log, read as it grows: counts what a batch needs, and the ids of completed actions."""

    def __init__(self, path):
        self._file = open(path, "rb")
        self._partial = b""
        self.registered = []      # pack ids, in order
        self.taken = 0
        self.lost = 0             # takes answered 500: another take claimed the action first
        self.completed = set()

    def read(self):
        data = self._file.read()
        if not data:
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            if _LOST in line:
                self.lost += 1
            elif (match := _TAKEN.search(line)) is not None:
                self.taken += 1
            elif (match := _COMPLETED.search(line)) is not None:
                self.completed.add(match.group(1))
            elif (match := _REGISTERED.search(line)) is not None:
                self.registered.append(match.group(1))

    def close(self):
        self._file.close()


class Proxy:
    """``bench/delay_proxy.py`` as a child process in front of *upstream* (``host:port``)."""

    def __init__(self, upstream, delay, log_path):
        self._log = open(log_path, "wb")
        self._process = subprocess.Popen([sys.executable, PROXY_SCRIPT, "--upstream", upstream, "--delay",
                                          str(delay)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._log, preexec_fn=_die_with_parent)
        os.set_blocking(self._process.stdout.fileno(), False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._process.stdout, selectors.EVENT_READ)
        self._buffer = bytearray()
        self.pid = self._process.pid
        try:
            self.url = f"http://127.0.0.1:{self._ask(None, 'listening')['port']}"
        except BaseException:
            self.close()
            raise

    def set_delay(self, seconds):
        self._ask({"op": "delay", "seconds": seconds}, "delay")

    def stats(self):
        return self._ask({"op": "stats"}, "stats")

    def _ask(self, message, answer):
        if message is not None:
            self._process.stdin.write(json.dumps(message).encode() + b"\n")
            self._process.stdin.flush()
        deadline = time.monotonic() + 10
        while True:
            while (end := self._buffer.find(b"\n")) >= 0:
                reply = json.loads(bytes(self._buffer[:end]))
                del self._buffer[:end + 1]
                if reply.get("reply") == answer or reply.get("event") == answer:
                    return reply
            if self._process.poll() is not None:
                raise BenchError(f"the delay proxy exited with status {self._process.returncode}; "
                                 f"see {self._log.name}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"timed out waiting for the delay proxy's {answer!r}")
            if self._selector.select(left):
                self._buffer += os.read(self._process.stdout.fileno(), 1 << 16)

    def close(self):
        try:
            if self._process.poll() is None:
                self._process.stdin.close()
                try:
                    self._process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait(timeout=5)
        finally:
            self._selector.close()
            self._process.stdout.close()
            self._log.close()


class RealServerSource:
    """A fresh real Flyte server (and its proxies), the action source of one measured run.

    :param binary: the ``flyte-server`` executable.
    :param log_prefix: path prefix for the server's and the proxies' logs.
    :param delay: seconds each request is held on its way to the server (through a proxy); 0 for none.
    :param replicas: how many packs will run: with more than one, each gets its own proxy (``urls``), whose
        counts tell each replica's share.
    """

    def __init__(self, binary, log_prefix, delay=0.0, replicas=1):
        self._server = FlyteServer.launch(binary)
        self._proxies = []
        self._log = None
        try:
            self._log = ServerLog(self._server.log_path)
            self.log_path = self._server.log_path
            self.pid = self._server.pid
            upstream = self._server.url.rpartition("//")[2]
            if delay or replicas > 1:
                for index in range(replicas):
                    self._proxies.append(Proxy(upstream, delay, f"{log_prefix}-proxy{index + 1}.log"))
        except BaseException:
            self.close()
            raise
        self._log_prefix = log_prefix
        self.urls = [proxy.url for proxy in self._proxies] or [self._server.url]
        self.url = self.urls[0]

    def close(self):
        for proxy in self._proxies:
            proxy.close()
        if self._log is not None:
            self._log.close()
        if self._server.log_path and os.path.exists(self._server.log_path):
            # FlyteServer.close removes its work directory: keep the log beside the others.
            with open(self._server.log_path, "rb") as src, open(f"{self._log_prefix}-server.log", "wb") as dst:
                dst.write(src.read())
        self._server.close()

    def wait_for_pack(self, name, timeout, alive, count=1):
        """Wait until pack *name* (an id: the benchmark's packs have no labels) registered *count* times."""
        deadline = time.monotonic() + timeout
        while self._log.registered.count(name) < count:
            self._check(deadline, alive, f"pack {name!r} to register ({self._log.registered.count(name)} of "
                                         f"{count})")
        return name

    def queue_batch(self, command, inputs, at_next_take=False):
        """Create one NEW action per input for pack ``Bench`` (all inputs must be equal: one flow makes them) and
        wait until they all exist. A real server cannot hold them back until a take arrives: queue first, then
        start the pack."""
        if at_next_take:
            raise NotImplementedError("a real server creates actions from flows; queue them before the pack starts")
        if any(input != inputs[0] for input in inputs):
            raise ValueError("the real-server source creates a batch from one flow: every input must be equal")
        started = time.monotonic()
        ids = self._server.create_actions("Bench", command, len(inputs), inputs[0], timeout=30 + 0.05 * len(inputs))
        return RealBatch(self, ids, time.monotonic() - started)

    def set_latency(self, seconds):
        if not self._proxies:
            raise NotImplementedError("start the source with a delay to add latency")
        for proxy in self._proxies:
            proxy.set_delay(seconds)

    def stats(self):
        """Totals so far: the server's CPU seconds and log counts, and each proxy's counts."""
        self._log.read()
        return {"cpu_s": cpu_seconds(self.pid), "taken": self._log.taken, "lost": self._log.lost,
                "completed": len(self._log.completed), "proxies": [proxy.stats() for proxy in self._proxies]}

    def audit(self, ids):
        """Every action of *ids* as the audit API shows it now."""
        wanted = set(ids)
        flow_name = self._server.action(ids[0]).flow_name
        instances = self._server.flow_instances(flow_name, limit=len(ids) + 10)
        return [a for i in instances for a in i.actions.values() if a.id in wanted]

    def _check(self, deadline, alive, what):
        if not _running(self.pid):
            raise BenchError(f"the Flyte server exited; see {self.log_path}")
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.005)  # the log is read in between: a batch's end is known within 5 ms
        self._log.read()


class RealBatch:
    """Actions created together on the real server."""

    def __init__(self, source, ids, queue_seconds):
        self._source, self.ids, self.count, self.queue_seconds = source, ids, len(ids), queue_seconds
        self._start = None

    def mark_start(self):
        """The measured window begins (the pack has registered): note the server's counters."""
        self._start = self._source.stats()

    def wait_done(self, timeout, alive):
        """Wait until every action has its result; the report :func:`harness.measure_prequeued` summarizes: per
        action ``created``, ``taken`` and ``completed`` times (seconds since the epoch, to the millisecond),
        ``fatal``, ``results`` (how many each action got: exactly one each), and the server's CPU, takes and
        lost races over the window."""
        source = self._source
        deadline = time.monotonic() + timeout
        wanted = set(self.ids)
        while not wanted <= source._log.completed:
            done = len(wanted & source._log.completed)
            source._check(deadline, alive, f"{self.count} actions to complete ({done} done)")
        end = source.stats()
        actions = source.audit(self.ids)
        if len(actions) != self.count:
            raise BenchError(f"the audit shows {len(actions)} of the batch's {self.count} actions")
        times = {"created": [], "taken": [], "completed": []}
        results = []
        for action in actions:
            by_state = {}
            for state, at in action.states:
                by_state.setdefault(state, []).append(_epoch(at))
            finished = by_state.get("SUCCESS", []) + by_state.get("FATAL", [])
            results.append(len(finished))
            times["created"].append(by_state["NEW"][0])
            times["taken"].append(by_state["PENDING"][0])
            times["completed"].append(max(finished))
        start = self._start or {"cpu_s": end["cpu_s"], "taken": 0, "lost": 0}
        return {"actions": dict(times, fatal=sum(a.state == "FATAL" for a in actions)), "results": results,
                "real_window": {"cpu_s": end["cpu_s"] - start["cpu_s"], "taken": end["taken"] - start["taken"],
                                "lost": end["lost"] - start["lost"], "proxy_totals": end["proxies"],
                                "queue_seconds": self.queue_seconds}}


def _running(pid):
    """Whether process *pid* (a child of this one) is still running: it exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _epoch(text):
    """Seconds since the epoch of the audit's RFC 3339 UTC times ("2026-12-01T17:34:44.603Z")."""
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
