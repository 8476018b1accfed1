"""Running one benchmark scenario with one client: processes, the action source, and what is measured.

Three processes take part in a run, each measured from outside through ``/proc``:

* the **action source**, here :class:`LoopbackSource`: ``bench/loopback_api.py``, a loopback Flyte API that
  queues actions when told to and reports when each was queued, taken and completed;
* the **pack** under test: :class:`OurPack` (``bench/pack_proc.py``, a flyte_gevent pack) or :class:`GoPack` (the
  Go client's bench pack), which register pack ``Bench`` with the same three commands;
* this process, which only waits on the source's notifications in between.

:func:`run_scenario` needs from its source only ``url``, ``wait_for_pack``, ``queue_batch`` returning a
:class:`Batch` (``wait_started``, ``wait_all_taken``, ``wait_done``), ``set_latency`` and ``stats``, so another
source (a real Flyte server with actions created by flows, say) can take the place of :class:`LoopbackSource`
without touching how scenarios are run and measured. A source that cannot add latency says so by raising
``NotImplementedError``; one that cannot tell its own requests and CPU leaves ``window`` out of its reports.
"""

import ctypes
import dataclasses
import json
import os
import selectors
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PACK_SCRIPT = os.path.join(HERE, "pack_proc.py")
SERVER_SCRIPT = os.path.join(HERE, "loopback_api.py")
PACK_NAME = "Bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
WARMUP_ACTIONS = 50
# How soon an idle pack polls again in the action scenarios (the Go client's floor); the idle scenario uses 5 s,
# the default of both clients.
POLLING_INTERVAL = 0.5
IDLE_POLLING_INTERVAL = 5.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def find_shared_peer(relative_path):
    """*relative_path* (e.g. ``shared/peers/go-client/go-bench-pack``) in the nearest directory above the
    repository that has it as an executable; None when none has. The peers live beside the checkout, which may
    sit deeper than one level (a worktree, a CI clone)."""
    directory = ROOT
    while True:
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent
        candidate = os.path.join(directory, relative_path)
        if os.access(candidate, os.X_OK):
            return candidate


@dataclasses.dataclass
class Scenario:
    """One workload: ``count`` actions of ``command`` queued at once, or (``idle_seconds``) none at all.

    ``input`` is every action's input; None means ``{"n": i}`` for the i-th. ``latency`` is added by the API to
    every request. ``options`` are Pack options of our client (the Go client has no such knobs).
    """

    name: str
    command: str | None = None
    count: int = 0
    input: object = None
    latency: float = 0.0
    options: dict = dataclasses.field(default_factory=dict)
    idle_seconds: float = 0.0
    timeout: float = 180.0
    #: ``loopback`` (``loopback_api.py``, batches queued at the pack's next take) or ``real`` (the Flyte server,
    #: batches created before the pack starts: :func:`measure_prequeued`)
    server: str = "loopback"
    #: processes of the pack run at once (``real`` only): replicas sharing the work
    replicas: int = 1

    def inputs(self):
        if self.input is None:
            return [{"n": i} for i in range(self.count)]
        return [self.input] * self.count


# --- reading processes through /proc ------------------------------------------------------------------------

def cpu_seconds(pid):
    """User + system CPU time of a process (all its threads, the exited ones too) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # After the command name: state is field 3 of proc_pid_stat(5), utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kb(pid):
    """``(VmRSS, VmHWM)`` of a process in KB: resident now, and the peak so far."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


class BenchError(RuntimeError):
    """A run that could not be measured: a process died, or something did not happen in time."""


def _die_with_parent():
    """In a child, before exec: be sent SIGTERM if this process dies (killed by a timeout, say) before stopping it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _stop_process(process, grace):
    """SIGTERM, then SIGKILL after *grace* seconds. Returns the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    return process.returncode


# --- the action source ---------------------------------------------------------------------------------------

class LoopbackSource:
    """``bench/loopback_api.py`` as a child process, driven over its stdin/stdout pipe.

    Its stderr goes to *log_path*. It exits when this object closes its stdin, or this process ends.
    """

    def __init__(self, log_path):
        self._log = open(log_path, "wb")
        self._process = subprocess.Popen([sys.executable, SERVER_SCRIPT], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._log, preexec_fn=_die_with_parent)
        os.set_blocking(self._process.stdout.fileno(), False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._process.stdout, selectors.EVENT_READ)
        self._buffer = bytearray()
        self._messages = []  # notifications and replies not consumed yet, oldest first
        self._batches = 0
        self.pid = self._process.pid
        try:
            listening = self._wait_for(lambda m: m.get("event") == "listening", 10, None, "the loopback API to listen")
        except BaseException:
            self.close()
            raise
        self.url = f"http://127.0.0.1:{listening['port']}"

    def close(self):
        try:
            if self._process.poll() is None:
                self._process.stdin.close()  # end of input: it stops
                try:
                    self._process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    _stop_process(self._process, 2)
        finally:
            self._selector.close()
            self._process.stdout.close()
            self._log.close()

    def wait_for_pack(self, name, timeout, alive):
        """Wait for a registration of pack *name*; returns its id."""
        message = self._wait_for(lambda m: m.get("event") == "registered" and m["name"] == name, timeout, alive,
                                 f"pack {name!r} to register")
        return message["id"]

    def queue_batch(self, command, inputs, at_next_take=True):
        """Queue one action per input for pack ``Bench``: now, or when the pack's next take arrives."""
        self._batches += 1
        self._send({"op": "queue", "batch": self._batches, "pack_name": PACK_NAME, "command": command,
                    "inputs": inputs, "at_next_take": at_next_take})
        return Batch(self, self._batches, len(inputs))

    def set_latency(self, seconds):
        """Answer every request *seconds* after it arrives, from now on."""
        self._send({"op": "latency", "seconds": seconds})
        self._wait_for(lambda m: m.get("reply") == "latency", 10, None, "the latency to be set")

    def stats(self):
        """Totals since the start: ``requests``, ``cpu_s`` (the server's CPU seconds), connections, statuses."""
        self._send({"op": "stats"})
        return self._wait_for(lambda m: m.get("reply") == "stats", 10, None, "the loopback API's stats")

    def _send(self, message):
        self._process.stdin.write(json.dumps(message).encode() + b"\n")
        self._process.stdin.flush()

    def _wait_for(self, wanted, timeout, alive, what):
        """The first message (consumed) for which ``wanted`` is true. Checks ``alive()`` at least twice a second."""
        deadline = time.monotonic() + timeout
        while True:
            for index, message in enumerate(self._messages):
                if wanted(message):
                    return self._messages.pop(index)
            if self._process.poll() is not None:
                raise BenchError(f"the loopback API exited with status {self._process.returncode}; "
                                 f"see {self._log.name}")
            if alive is not None:
                alive()
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
            self._read(min(left, 0.5))

    def _read(self, timeout):
        if not self._selector.select(timeout):
            return
        data = os.read(self._process.stdout.fileno(), 1 << 20)
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[:end + 1]
            self._messages.append(json.loads(line))


class Batch:
    """Actions queued together; their progress as the source reports it."""

    def __init__(self, source, batch_id, count):
        self._source, self.id, self.count = source, batch_id, count

    def _wait(self, event, timeout, alive):
        return self._source._wait_for(lambda m: m.get("event") == event and m["batch"] == self.id, timeout, alive,
                                      f"batch {self.id} ({self.count} actions): {event.replace('_', ' ')}")

    def wait_started(self, timeout, alive):
        """Wait until the actions are queued (the pack's take has arrived); returns the source's clock then."""
        return self._wait("started", timeout, alive)["at"]

    def wait_all_taken(self, timeout, alive):
        return self._wait("all_taken", timeout, alive)["at"]

    def wait_done(self, timeout, alive):
        """Wait until every action has its result. Returns the report: per action ``created``, ``taken`` and
        ``completed`` times (``time.monotonic()``), ``fatal`` (how many were FATAL), ``at``, and ``window``: the
        source's ``requests`` and ``cpu_s`` from the batch's start to its last result, when it can tell."""
        return self._wait("done", timeout, alive)


# --- the packs -----------------------------------------------------------------------------------------------

class PackProcess:
    """A pack under test as a child process, logging to a file."""

    #: how this client is named in the output
    label = ""

    def __init__(self, command, log_path):
        self._log = open(log_path, "wb")
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self.pid = self._process.pid

    def release(self):
        """Let every ``Hold`` action finish now."""
        os.kill(self.pid, signal.SIGUSR1)

    def check_alive(self):
        if self._process.poll() is not None:
            raise BenchError(f"the {self.label} pack exited with status {self._process.returncode}; "
                             f"see {self._log.name}")

    def stop(self):
        """A graceful stop: SIGTERM, then SIGKILL if it has not exited within 20 s."""
        try:
            _stop_process(self._process, 20)
        finally:
            self._log.close()


class OurPack(PackProcess):
    """``bench/pack_proc.py``: a flyte_gevent pack with the library's defaults plus the scenario's options."""

    label = "flyte_gevent"

    def __init__(self, api_url, scenario, log_path, profile_path=None, overrides=None):
        options = dict(scenario.options)
        options["polling_interval"] = IDLE_POLLING_INTERVAL if scenario.idle_seconds else POLLING_INTERVAL
        options.update(overrides or {})
        self.options = options
        command = [sys.executable, PACK_SCRIPT, "--api", api_url]
        for key, value in options.items():
            command += ["--" + key.replace("_", "-"), str(value)]
        if profile_path:
            command += ["--profile", profile_path]
        super().__init__(command, log_path)


class GoPack(PackProcess):
    """The Go client v1.4.1 as a bench pack (``../shared/peers/go-client/go-bench-pack``).

    It takes one action at a time and runs each in its own goroutine; its health server binds port 8090, so only
    one runs at a time. It has no options besides the polling interval.
    """

    label = "Go"

    def __init__(self, binary, api_url, scenario, log_path):
        polling = IDLE_POLLING_INTERVAL if scenario.idle_seconds else POLLING_INTERVAL
        self.options = {"polling_interval": polling}
        super().__init__([binary, "-api", api_url, "-polling-interval", str(polling)], log_path)


# --- one run -------------------------------------------------------------------------------------------------

def run_scenario(scenario, source, pack, warm_up=True):
    """Measure *pack* (started against *source*) in *scenario*; a dict of measurements.

    After registration (and *warm_up* actions, which open connections and warm code paths), the batch is
    queued when the idle pack's next take arrives, so no run measures the polling interval. The drain rate
    counts from the first take of the batch to its last result; the pack's CPU is read when the source reports
    the batch queued and when it reports the last result.
    """
    alive = pack.check_alive
    source.wait_for_pack(PACK_NAME, 30, alive)
    if scenario.idle_seconds:
        return _measure_idle(scenario, source, pack)
    if warm_up:
        source.queue_batch("Noop", [{"warmup": i} for i in range(WARMUP_ACTIONS)]).wait_done(30, alive)
    idle_rss, _ = memory_kb(pack.pid)
    if scenario.latency:
        source.set_latency(scenario.latency)
    batch = source.queue_batch(scenario.command, scenario.inputs())
    batch.wait_started(10 + POLLING_INTERVAL, alive)
    cpu_start, clock_start = cpu_seconds(pack.pid), time.monotonic()
    held_rss = None
    if scenario.command == "Hold":
        batch.wait_all_taken(scenario.timeout, alive)
        time.sleep(0.5 if warm_up else 0.1)  # the pack reads the last take responses and starts their handlers
        held_rss, _ = memory_kb(pack.pid)
        pack.release()
    report = batch.wait_done(scenario.timeout, alive)
    cpu_end, clock_end = cpu_seconds(pack.pid), time.monotonic()
    rss, peak_rss = memory_kb(pack.pid)
    result = _batch_summary(report)
    result.update(cpu_ms_per_action=(cpu_end - cpu_start) * 1000 / batch.count,
                  pack_cpu_percent=(cpu_end - cpu_start) * 100 / (clock_end - clock_start),
                  idle_rss_kb=idle_rss, rss_kb=rss, peak_rss_kb=peak_rss)
    if held_rss is not None:
        result.update(held_rss_kb=held_rss, kb_per_action=(held_rss - idle_rss) / batch.count)
    return result


def measure_prequeued(scenario, source, batch, packs):
    """Measure *packs* (one, or replicas of one pack) draining *batch*, queued before they started.

    This is how a real server is measured (:mod:`real_server`): it makes actions only from flows, so they are all
    created first, then the packs start. The window opens when the last pack has registered (so start-up is not
    counted) and closes with the last result. Besides the drain rate and the packs' CPU: how many results each
    action got (exactly one each), lost races (takes answered 500 because another take claimed the action) per
    action, the server's CPU per action, and with replicas each one's share of the takes.
    """
    def alive():
        for pack in packs:
            pack.check_alive()
    source.wait_for_pack(PACK_NAME, 30, alive, count=len(packs))
    batch.mark_start()
    cpu_start, clock_start = sum(cpu_seconds(pack.pid) for pack in packs), time.monotonic()
    report = batch.wait_done(scenario.timeout, alive)
    cpu_end, clock_end = sum(cpu_seconds(pack.pid) for pack in packs), time.monotonic()
    result = _batch_summary(report)
    window = report["real_window"]
    count = batch.count
    result.update(cpu_ms_per_action=(cpu_end - cpu_start) * 1000 / count,
                  pack_cpu_percent=(cpu_end - cpu_start) * 100 / (clock_end - clock_start),
                  results_per_action={"min": min(report["results"]), "max": max(report["results"])},
                  lost_races=window["lost"], lost_per_action=window["lost"] / count,
                  queue_seconds=window["queue_seconds"],
                  real_server={"cpu_ms_per_action": window["cpu_s"] * 1000 / count,
                               "busy_percent": window["cpu_s"] * 100 / (clock_end - clock_start),
                               "takes_won": window["taken"]})
    if len(packs) > 1:
        # Counted from each proxy's start: a replica may take actions before the last one has registered.
        result["replica_takes"] = [proxy["statuses"].get("take 200", 0) for proxy in window["proxy_totals"]]
        result["replica_lost"] = [proxy["statuses"].get("take 500", 0) for proxy in window["proxy_totals"]]
    return result


def _batch_summary(report):
    actions = report["actions"]
    created, taken, completed = actions["created"], actions["taken"], actions["completed"]
    count = len(completed)
    first_take, last_result = min(taken), max(completed)
    window = last_result - first_take
    latencies = sorted(done - queued for queued, done in zip(created, completed))
    result = {
        "actions": count,
        "fatal": actions["fatal"],
        "seconds": window,
        "actions_per_s": count / window,
        # When the last action was taken, after the first: how long the queue took to drain.
        "take_span_ms": (max(taken) - first_take) * 1000,
        "latency_ms": {"p50": _percentile(latencies, 50) * 1000, "p99": _percentile(latencies, 99) * 1000,
                       "max": latencies[-1] * 1000},
    }
    server = report.get("window")
    if server:
        result["server"] = _server_summary(server["requests"], server["cpu_s"], report["at"] - min(created),
                                           count)
    return result


def _measure_idle(scenario, source, pack):
    time.sleep(min(1.0, scenario.idle_seconds / 2))  # past registration and the first take
    before, cpu_start, clock_start = source.stats(), cpu_seconds(pack.pid), time.monotonic()
    time.sleep(scenario.idle_seconds)
    pack.check_alive()
    after, cpu_end, clock_end = source.stats(), cpu_seconds(pack.pid), time.monotonic()
    seconds = clock_end - clock_start
    rss, peak_rss = memory_kb(pack.pid)
    return {
        "seconds": seconds,
        "cpu_percent": (cpu_end - cpu_start) * 100 / seconds,
        "rss_kb": rss,
        "peak_rss_kb": peak_rss,
        "server": _server_summary(after["requests"] - before["requests"], after["cpu_s"] - before["cpu_s"],
                                  seconds, None),
    }


def _server_summary(requests, cpu, seconds, actions):
    per_request = cpu / requests if requests else None
    return {
        "requests": requests,
        "requests_per_action": requests / actions if actions else None,
        "cpu_us_per_request": per_request * 1e6 if per_request else None,
        "busy_percent": cpu * 100 / seconds,
        "requests_per_s": requests / seconds,
    }


def _percentile(values, percent):
    index = min(len(values) - 1, max(0, round(percent / 100 * len(values)) - 1))
    return values[index]
