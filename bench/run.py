"""The benchmark suite: ``make bench`` (or ``python bench/run.py``).

This process hosts the fake Flyte API (:class:`flyte_gevent.testing.FakeFlyteApi`,
on loopback) and runs the pack under test, ``bench/pack_proc.py``, as a separate
process, once per scenario and client configuration:

* **this** — the library's defaults (concurrent takers, up to ``max_takers=64``),
  with the options a scenario needs (``max_in_flight`` for 1,000 or 5,000 actions
  at once);
* **serial** — the same, but with a single serial taker (``max_takers=1``), the
  way the Go client and the older Python client take actions.

Every action is queued here, so its latency (queued -> result accepted) is read
off one clock. The pack's CPU time comes from ``/proc/<pid>/stat`` and its memory
from ``/proc/<pid>/status``; the fake API's own CPU time per request is measured
in this process during each run, so the output shows how far the fake is from
being the bottleneck.

A batch is queued at the moment the idle pack's next take arrives, so no
scenario measures the polling interval. Before each measured batch, a few
actions warm the pack up (connections, code paths), except with ``--quick``.

Results are printed as a table and written as JSON (``bench/results/latest.json``
unless ``--output`` says otherwise); pack logs go next to it in ``logs/``.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402

from flyte_gevent.testing import FakeFlyteApi  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PACK_SCRIPT = os.path.join(HERE, "pack_proc.py")
DEFAULT_OUTPUT = os.path.join(HERE, "results", "latest.json")
PACK_NAME = "Bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# How soon an idle pack polls again in the action scenarios; only the idle
# scenario runs with the library's default (5 s).
BENCH_POLLING_INTERVAL = 0.5
WARMUP_ACTIONS = 50
VARIANTS = {
    "this": {},
    "serial": {"max_takers": 1},
}


@dataclasses.dataclass
class Scenario:
    """One row of the table.

    ``count`` actions are queued at once (``serial_count`` for the serial taker,
    where a serial taker would need minutes for the full batch); ``idle_seconds``
    instead means: queue nothing and measure CPU for that long.
    """

    name: str
    what: str
    target: str
    command: str | None = None
    count: int = 0
    serial_count: int | None = None
    input: object = None
    latency: float = 0.0
    #: Pack options for both clients (the serial one then gets max_takers=1).
    options: dict = dataclasses.field(default_factory=dict)
    idle_seconds: float = 0.0
    timeout: float = 120.0


def scenarios(quick):
    """The scenarios of issue #4, full size or (``quick``) tiny, for the smoke test."""
    if quick:
        return [
            Scenario("fast", "trivial handler", "n/a (quick)", "Noop", 100),
            Scenario("rtt20", "20 ms per request", "n/a (quick)", "Noop", 100, 10, latency=0.02),
            Scenario("io1s", "handler sleeps 0.1 s", "n/a (quick)", "Sleep", 100, input=0.1,
                     options={"max_in_flight": 100}),
            Scenario("io1s_rtt20", "sleep 0.1 s, 20 ms", "n/a (quick)", "Sleep", 100, 10, input=0.1, latency=0.02,
                     options={"max_in_flight": 100}),
            Scenario("memory", "held at once", "n/a (quick)", "Hold", 200, input=30.0,
                     options={"max_in_flight": 200}),
            Scenario("idle", "no actions, default polling", "n/a (quick)", idle_seconds=0.3),
        ]
    return [
        Scenario("fast", "3,000 queued, trivial handler", ">= 1800/s, <= 0.5 ms CPU", "Noop", 3000),
        Scenario("rtt20", "20 ms per request", ">= 800/s", "Noop", 3000, 200, latency=0.02),
        Scenario("io1s", "1,000 x sleep 1 s", "max <= 1.3 s", "Sleep", 1000, input=1.0,
                 options={"max_in_flight": 1000}),
        Scenario("io1s_rtt20", "sleep 1 s + 20 ms", ">= 600/s", "Sleep", 1000, 200, input=1.0, latency=0.02,
                 options={"max_in_flight": 1000}),
        Scenario("memory", "5,000 sleeping at once", "<= 20 KB/action", "Hold", 5000, input=120.0,
                 options={"max_in_flight": 5000}),
        Scenario("idle", "no actions, default polling", "<= 0.5 % CPU", idle_seconds=10.0),
    ]


def check(scenario, result):
    """``(met, text)``: how the "this" client did against the issue's target."""
    name = scenario.name
    if name == "fast":
        rate, cpu = result["actions_per_s"], result["cpu_ms_per_action"]
        return rate >= 1800 and cpu <= 0.5, f"{rate:,.0f}/s, {cpu:.2f} ms CPU"
    if name == "rtt20":
        return result["actions_per_s"] >= 800, f"{result['actions_per_s']:,.0f}/s"
    if name == "io1s":
        return result["latency_ms"]["max"] <= 1300, f"max {result['latency_ms']['max'] / 1000:.2f} s"
    if name == "io1s_rtt20":
        return result["actions_per_s"] >= 600, f"{result['actions_per_s']:,.0f}/s"
    if name == "memory":
        return result["kb_per_action"] <= 20, f"{result['kb_per_action']:.1f} KB/action"
    if name == "idle":
        return result["cpu_percent"] <= 0.5, f"{_idle_cpu(result)} CPU"
    raise ValueError(name)


# --- measuring processes -----------------------------------------------------------------------------------------

def cpu_seconds(pid="self"):
    """User + system CPU time of a process so far (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # After the command name: state is field 3 of stat(5), utime 14 and stime 15.
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


class BenchApi(FakeFlyteApi):
    """The fake Flyte API, plus what the benchmark needs to watch it.

    It counts the HTTP requests it serves, the actions taken and completed, and
    runs an *armed* callback when the next take arrives, before the take looks
    at the queue: that is how a batch is queued exactly when the pack asks.
    """

    def __init__(self):
        super().__init__(record_requests=False)
        self.requests_served = 0
        self.taken = 0
        self.completed = 0
        self.armed = None
        self.fired = gevent.event.Event()
        app = self._app

        def counting_app(environ, start_response):
            self.requests_served += 1
            return app(environ, start_response)

        self._app = counting_app

    def arm(self, callback):
        """Run *callback* (in the take's greenlet) when the next take arrives."""
        self.fired.clear()
        self.armed = callback

    def _find_new(self, pack, action_name):
        armed, self.armed = self.armed, None
        if armed is not None:
            armed()
            self.fired.set()
        return super()._find_new(pack, action_name)

    def _claim(self, action, pack):
        claimed = super()._claim(action, pack)
        self.taken += claimed
        return claimed

    def _complete(self, action, event, payload, created_at):
        super()._complete(action, event, payload, created_at)
        self.completed += 1


@dataclasses.dataclass
class Snapshot:
    """Counters at one moment, so a measurement is the difference of two."""

    at: float
    pack_cpu: float
    api_cpu: float
    requests: int

    @classmethod
    def take(cls, pid, api):
        return cls(time.monotonic(), cpu_seconds(pid), cpu_seconds(), api.requests_served)


# --- running one scenario ----------------------------------------------------------------------------------------

class PackProcess:
    """``bench/pack_proc.py`` as a child process, logging to a file."""

    def __init__(self, api_url, log_path, profile_path=None, **options):
        command = [sys.executable, PACK_SCRIPT, "--api", api_url]
        for key, value in options.items():
            if value is not None:
                command += ["--" + key.replace("_", "-"), str(value)]
        if profile_path:
            command += ["--profile", profile_path]
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.process.pid

    def stop(self):
        """SIGTERM (a graceful stop), then SIGKILL if it does not exit within 20 s."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=5)
        finally:
            self.log.close()

    def check_alive(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"the pack process exited with status {self.process.returncode}; see {self.log.name}")


def run_variant(scenario, variant, quick, log_dir, profile_dir):
    """Run *scenario* against a fresh pack process in *variant* configuration; a dict of measurements."""
    api = BenchApi().start()
    options = dict(scenario.options)
    options.update(VARIANTS[variant])
    if not scenario.idle_seconds:
        options["polling_interval"] = BENCH_POLLING_INTERVAL
    profile = os.path.join(profile_dir, f"{scenario.name}-{variant}.prof") if profile_dir else None
    count = scenario.count if variant == "this" else (scenario.serial_count or scenario.count)
    warmup = None if quick or scenario.idle_seconds else _Batch(api, "Noop", [{"warmup": i} for i in
                                                                            range(WARMUP_ACTIONS)])
    if warmup is not None:
        api.arm(warmup.queue)  # taken by the pack's first take, right after it registers
    pack = PackProcess(api.url, os.path.join(log_dir, f"{scenario.name}-{variant}.log"), profile, **options)
    try:
        api.wait_for_pack(PACK_NAME, timeout=30)
        if scenario.idle_seconds:
            return _measure_idle(api, pack, scenario)
        if warmup is not None:
            api.wait_until_idle(timeout=30)
        pack.check_alive()
        idle_rss, _ = memory_kb(pack.pid)
        api.latency = scenario.latency
        inputs = [{"n": i} for i in range(count)] if scenario.input is None else [scenario.input] * count
        batch = _Batch(api, scenario.command, inputs, pack.pid)
        api.arm(batch.queue)
        if not api.fired.wait(timeout=10):
            raise RuntimeError("the pack did not take within 10 s")
        held_rss = None
        if scenario.command == "Hold":
            _wait_for(lambda: api.taken - batch.taken_before >= count, scenario.timeout, pack,
                      f"{count} actions taken")
            gevent.sleep(0.1 if quick else 0.5)  # let the pack read the last take responses and start their handlers
            held_rss, _ = memory_kb(pack.pid)
            os.kill(pack.pid, signal.SIGUSR1)
        api.wait_until_idle(timeout=scenario.timeout)
        end = Snapshot.take(pack.pid, api)
        rss, peak_rss = memory_kb(pack.pid)
        result = batch.summary(end)
        result.update(idle_rss_kb=idle_rss, rss_kb=rss, peak_rss_kb=peak_rss, options=options)
        if held_rss is not None:
            result.update(held_rss_kb=held_rss, kb_per_action=(held_rss - idle_rss) / count)
        return result
    finally:
        api.latency = 0.0
        pack.stop()
        api.stop()


class _Batch:
    """Actions queued together when the pack's next take arrives."""

    def __init__(self, api, command, inputs, pid=None):
        self.api, self.command, self.inputs, self.pid = api, command, inputs, pid
        self.ids = []
        self.start = None
        self.taken_before = 0

    def queue(self):
        self.taken_before = self.api.taken
        if self.pid is not None:
            self.start = Snapshot.take(self.pid, self.api)
            self.start.requests -= 1  # the take being served belongs to the batch
        self.ids = self.api.enqueue_many(PACK_NAME, self.command, self.inputs)

    def summary(self, end):
        start = self.start
        actions = [self.api.actions[i] for i in self.ids]
        latencies = sorted(a.completed_at - a.created_at for a in actions)
        window = max(a.completed_at for a in actions) - min(a.created_at for a in actions)
        requests = end.requests - start.requests
        api_cpu = end.api_cpu - start.api_cpu
        return {
            "actions": len(actions),
            "fatal": sum(a.state == "FATAL" for a in actions),
            "seconds": window,
            # When the last action was taken: how long the queue took to drain.
            "last_taken_ms": (max(a.taken_at for a in actions) - min(a.created_at for a in actions)) * 1000,
            "actions_per_s": len(actions) / window,
            "latency_ms": {"p50": _percentile(latencies, 50) * 1000, "p99": _percentile(latencies, 99) * 1000,
                           "max": latencies[-1] * 1000},
            "cpu_ms_per_action": (end.pack_cpu - start.pack_cpu) * 1000 / len(actions),
            "pack_cpu_percent": (end.pack_cpu - start.pack_cpu) * 100 / (end.at - start.at),
            "api": _api_summary(requests, api_cpu, end.at - start.at),
        }


def _measure_idle(api, pack, scenario):
    gevent.sleep(min(1.0, scenario.idle_seconds / 2))  # past registration and the first take
    start = Snapshot.take(pack.pid, api)
    gevent.sleep(scenario.idle_seconds)
    end = Snapshot.take(pack.pid, api)
    rss, peak_rss = memory_kb(pack.pid)
    return {
        "seconds": end.at - start.at,
        "cpu_percent": (end.pack_cpu - start.pack_cpu) * 100 / (end.at - start.at),
        "requests": end.requests - start.requests,
        "rss_kb": rss,
        "peak_rss_kb": peak_rss,
        "api": _api_summary(end.requests - start.requests, end.api_cpu - start.api_cpu, end.at - start.at),
    }


def _api_summary(requests, cpu, seconds):
    per_request = cpu / requests if requests else None
    return {
        "requests": requests,
        "cpu_us_per_request": per_request * 1e6 if per_request else None,
        # What the fake could serve on one core at that cost: two requests per action.
        "ceiling_requests_per_s": 1 / per_request if per_request else None,
        "busy_percent": cpu * 100 / seconds,
        "requests_per_s": requests / seconds,
    }


def _wait_for(condition, timeout, pack, what):
    deadline = time.monotonic() + timeout
    while not condition():
        pack.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        gevent.sleep(0.02)


def _percentile(values, percent):
    index = min(len(values) - 1, max(0, round(percent / 100 * len(values)) - 1))
    return values[index]


# --- output ------------------------------------------------------------------------------------------------------

def machine():
    """Facts about where the numbers were measured."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    import gevent as g
    import greenlet
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "gevent": g.__version__,
        "greenlet": greenlet.__version__,
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
    }


COLUMNS = [("scenario", 10, "<"), ("client", 6, "<"), ("actions", 7, ">"), ("actions/s", 9, ">"),
           ("p50 ms", 6, ">"), ("p99 ms", 6, ">"), ("max ms", 6, ">"), ("CPU ms/act", 10, ">"),
           ("pack CPU", 8, ">"), ("RSS MB", 6, ">"), ("API µs/req", 10, ">"), ("API CPU", 7, ">"),
           ("vs serial", 9, ">"), ("target", 24, "<"), ("result", 0, "<")]


def format_table(report):
    """The results as a fixed-width text table, two rows (this, serial) per scenario."""
    lines = [_row([name for name, _, _ in COLUMNS]),
             _row(["-" * max(width, len(name)) for name, width, _ in COLUMNS])]
    for entry in report["scenarios"]:
        for variant in VARIANTS:
            if variant not in entry:
                continue
            result = entry[variant]
            first = variant == next(v for v in VARIANTS if v in entry)
            cells = [entry["scenario"] if first else "", variant]
            if "error" in result:
                cells += [""] * (len(COLUMNS) - 5) + [entry["target"] if first else "", "ERROR: " + result["error"]]
                lines.append(_row(cells))
                continue
            api = result["api"]
            if "cpu_percent" in result:  # idle: the fake's per-request cost means nothing at one request per 5 s
                cells += ["-"] * 6 + [_idle_cpu(result), f"{result['rss_kb'] / 1024:.1f}", "-"]
            else:
                latency = result["latency_ms"]
                cells += [str(result["actions"]), f"{result['actions_per_s']:,.0f}", f"{latency['p50']:,.0f}",
                          f"{latency['p99']:,.0f}", f"{latency['max']:,.0f}", f"{result['cpu_ms_per_action']:.3f}",
                          f"{result['pack_cpu_percent']:.0f} %", f"{result['peak_rss_kb'] / 1024:.1f}",
                          _num(api["cpu_us_per_request"], "{:.0f}")]
            cells.append(f"{api['busy_percent']:.0f} %")
            if variant == "this":
                ratio = entry.get("ratio")
                cells += ["" if ratio is None else f"{ratio:.1f}x", entry["target"], entry.get("result", "")]
            else:
                cells += ["", "", result.get("note", "")]
            lines.append(_row(cells))
    return "\n".join(lines)


def _row(cells):
    out = []
    for (name, width, align), cell in zip(COLUMNS, cells):
        width = max(width, len(name))
        out.append(f"{cell:{align}{width}}" if width else cell)
    return "  ".join(out).rstrip()


def _idle_cpu(result):
    if result["cpu_percent"] == 0:  # not a single clock tick
        return f"< {100 / CLOCK_TICKS / result['seconds']:.2f} %"
    return f"{result['cpu_percent']:.2f} %"


def _num(value, fmt):
    return "-" if value is None else fmt.format(value)


def format_notes(report):
    """What the table needs to be read right: the fake API's ceiling, memory, configurations, machine."""
    lines = []
    runs = [(entry["scenario"], variant, entry[variant]["api"]) for entry in report["scenarios"]
            for variant in VARIANTS if "api" in entry.get(variant, {}) and entry[variant]["api"]["requests"]]
    if runs:
        name, variant, api = max(runs, key=lambda run: run[2]["requests_per_s"])
        lines.append(f"Fake API (its own process): in the busiest run ({name}/{variant}, "
                     f"{api['requests_per_s']:,.0f} requests/s) it used {api['cpu_us_per_request']:.0f} µs of CPU "
                     f"per request, so one core would serve ~{api['ceiling_requests_per_s']:,.0f} requests/s "
                     f"(~{api['ceiling_requests_per_s'] / 2:,.0f} actions/s); it was {api['busy_percent']:.0f} % busy. "
                     f"API µs/req includes queueing the batch; at low rates, idle timers dominate it.")
    memory = next((e for e in report["scenarios"] if e["scenario"] == "memory"), None)
    for variant in VARIANTS:
        result = (memory or {}).get(variant, {})
        if "kb_per_action" in result:
            lines.append(f"memory/{variant}: pack RSS {result['idle_rss_kb'] / 1024:.1f} MB idle, "
                         f"{result['held_rss_kb'] / 1024:.1f} MB with {result['actions']:,} actions in flight: "
                         f"{result['kb_per_action']:.1f} KB per in-flight action.")
    tuned = [f"{e['scenario']}: {', '.join(f'{k}={v}' for k, v in e['options'].items())}"
             for e in report["scenarios"] if e.get("options")]
    lines.append("this = the library's defaults (max_takers=64, Prometheus metrics on, health server on), "
                 f"polling_interval {BENCH_POLLING_INTERVAL:g} s (idle: the default 5 s)"
                 + (f"; per scenario {'; '.join(tuned)}" if tuned else "")
                 + (f"; overridden on the command line: {report['this_overrides']}" if report.get("this_overrides")
                    else "")
                 + ". serial = the same with max_takers=1, one take at a time like the Go client.")
    lines.append("Latency: queued -> result accepted by the API. vs serial: ratio of actions/s (idle: of CPU). "
                 f"CPU is read in {1000 // CLOCK_TICKS} ms clock ticks.")
    m = report["machine"]
    lines.append(f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['platform']}; Python {m['python']}, "
                 f"gevent {m['gevent']}, greenlet {m['greenlet']}; load average at start "
                 f"{' '.join(f'{x:.2f}' for x in m['load_average_at_start'])}, at end "
                 f"{' '.join(f'{x:.2f}' for x in m.get('load_average_at_end', ()))}.")
    return "\n".join(lines)


def run_repeated(scenario, variant, args, log_dir):
    """Run one scenario and configuration ``--repeat`` times; the run with the median headline number."""
    key = "cpu_percent" if scenario.idle_seconds else "actions_per_s"
    runs = []
    for attempt in range(args.repeat):
        print(f"running {scenario.name} ({variant}) ...", end=" ", file=sys.stderr, flush=True)
        try:
            result = run_variant(scenario, variant, args.quick, log_dir, args.profile)
        except Exception as exc:  # one broken run must not lose the others
            print("failed", file=sys.stderr, flush=True)
            return {"error": f"{type(exc).__name__}: {exc}"}
        print(f"{result[key]:,.2f} {'% CPU' if scenario.idle_seconds else 'actions/s'}", file=sys.stderr, flush=True)
        runs.append(result)
    runs.sort(key=lambda run: run[key])
    chosen = runs[(len(runs) - 1) // 2]
    if len(runs) > 1:
        chosen["repeats"] = [run[key] for run in runs]
    return chosen


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the flyte_gevent benchmark scenarios of issue #4.")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test (numbers mean nothing)")
    parser.add_argument("--scenario", action="append", metavar="NAME",
                        help="run only this scenario (repeatable): fast, rtt20, io1s, io1s_rtt20, memory, idle")
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS),
                        help="run only this client configuration (repeatable)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="JSON results file (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run each scenario and client N times and report the median run (default 1)")
    parser.add_argument("--this", action="append", default=[], metavar="OPTION=VALUE",
                        help="override a Pack option of the 'this' client, e.g. max_takers=64 (repeatable)")
    parser.add_argument("--profile", metavar="DIR", help="cProfile each pack process into DIR/<scenario>-<variant>.prof")
    args = parser.parse_args(argv)

    chosen = scenarios(args.quick)
    if args.scenario:
        known = {s.name for s in chosen}
        unknown = set(args.scenario) - known
        if unknown:
            parser.error(f"unknown scenario {', '.join(sorted(unknown))}; choose from {', '.join(sorted(known))}")
        chosen = [s for s in chosen if s.name in args.scenario]
    variants = args.variant or list(VARIANTS)
    for setting in args.this:
        key, _, value = setting.partition("=")
        if key not in ("max_takers", "max_in_flight", "polling_interval") or not value:
            parser.error(f"--this {setting!r}: expected max_takers=N, max_in_flight=N or polling_interval=S")
        VARIANTS["this"][key] = value
    overrides = dict(VARIANTS["this"])
    output_dir = os.path.dirname(os.path.abspath(args.output))
    log_dir = os.path.join(output_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)

    report = {"generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "quick": args.quick, "this_overrides": overrides, "machine": machine(), "scenarios": []}
    for scenario in chosen:
        entry = {"scenario": scenario.name, "what": scenario.what, "target": scenario.target,
                 "options": scenario.options}
        for variant in variants:
            entry[variant] = run_repeated(scenario, variant, args, log_dir)
        this, serial = entry.get("this"), entry.get("serial")
        if this and "error" not in this:
            if not args.quick:
                entry["met"], text = check(scenario, this)
                entry["result"] = ("ok: " if entry["met"] else "MISSED: ") + text
            if serial and "error" not in serial:
                key = "cpu_percent" if scenario.idle_seconds else "actions_per_s"
                if serial[key]:
                    entry["ratio"] = this[key] / serial[key]
        if serial and "error" not in serial and scenario.serial_count and scenario.serial_count != scenario.count:
            serial["note"] = f"{serial['actions']} actions: serial takes are slow"
        report["scenarios"].append(entry)
    report["machine"]["load_average_at_end"] = os.getloadavg()

    print(format_table(report))
    print()
    print(format_notes(report))
    os.makedirs(output_dir, exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    shown = os.path.relpath(args.output)
    print(f"\nJSON: {os.path.abspath(args.output) if shown.startswith('..') else shown}")
    failed = [e["scenario"] for e in report["scenarios"] for v in variants if "error" in e.get(v, {})]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
