"""The benchmark suite: ``make bench`` (or ``python bench/run.py``). flyte_gevent beside the Go client, same run.

Every scenario runs once per client (the Go client first, then ours; with ``--repeat N`` they take turns N
times), each pack in its own process against a fresh loopback Flyte API of its own (``bench/loopback_api.py``,
also its own process); see ``bench/harness.py`` for how a run is measured. The output is two tables: the
issue's targets, row by row, with both clients' numbers and the ratio ours / Go; and every run in detail, with
the loopback API's CPU per request and how busy it was, so it shows when the server, not a client, was the
limit. The same goes to ``bench/results/latest.json`` (unless ``--output`` says otherwise); each process's log
goes next to it in ``logs/``.

The Go client is the bench pack built with flyte-client v1.4.1 (``../shared/peers/go-client/go-bench-pack``,
found in a ``shared/peers`` directory above the repository, or given with ``--go-peer``; ``--go-peer none``
runs our client alone).

``--server real`` runs issue #12's scenarios instead (``--server all``: both sets): the real Flyte server
(``bench/real_server.py``, a fresh ``flyte-server`` process per run) with 600 actions created before the pack
starts, directly and at 20 ms per request (``bench/delay_proxy.py``), and two replicas of ours sharing the
backlog; its table adds lost races (takes answered 500) and the server's CPU per action.
"""

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import pstats
import shutil
import sys
import tempfile
import time

import harness
import real_server
from harness import CLOCK_TICKS, BenchError, GoPack, LoopbackSource, OurPack, Scenario

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_OUTPUT = os.path.join(HERE, "results", "latest.json")
GO_PEER_PATH = os.path.join("shared", "peers", "go-client", "go-bench-pack")
CLIENTS = ("go", "ours", "ours+journal")
CLIENT_NAMES = {"go": "Go v1.4.1", "ours": "flyte_gevent", "ours+journal": "flyte_gevent + journal"}
#: ours with its crash journal on (``Pack(journal=)``), run only where its cost per action shows: the journal's
#: CPU per action is the difference to plain ours in the same scenario (target: at most +0.1 ms).
JOURNAL_CLIENT, JOURNAL_SCENARIOS, JOURNAL_TARGET_MS = "ours+journal", ("fast", "io1s"), 0.1
#: Pack options of ours that ``--ours`` may override.
OVERRIDABLE = {"max_takers": int, "max_in_flight": int, "polling_interval": float}


def scenarios(quick):
    """The scenarios of issue #9: full size, or (``quick``) tiny ones that only prove the suite works."""
    if quick:
        return [
            Scenario("fast", "Noop", 100),
            Scenario("rtt20", "Noop", 20, latency=0.02),
            Scenario("io1s", "Sleep", 50, input=0.1, options={"max_in_flight": 50}),
            Scenario("io1s_rtt20", "Sleep", 20, input=0.1, latency=0.02, options={"max_in_flight": 20}),
            Scenario("memory", "Hold", 200, input=30.0, options={"max_in_flight": 200}),
            Scenario("idle", idle_seconds=0.3),
        ]
    return [
        Scenario("fast", "Noop", 3000),
        Scenario("rtt20", "Noop", 1500, latency=0.02),
        Scenario("io1s", "Sleep", 1000, input=1.0, options={"max_in_flight": 1000}),
        Scenario("io1s_rtt20", "Sleep", 1000, input=1.0, latency=0.02, options={"max_in_flight": 1000}),
        Scenario("memory", "Hold", 5000, input=120.0, options={"max_in_flight": 5000}),
        Scenario("idle", idle_seconds=10.0),
    ]


#: Every action of a real-server batch gets this input: one flow creates the whole batch, so inputs are equal.
REAL_INPUT = {"n": 1}


def real_scenarios(quick, replicas=2):
    """Against the real Flyte server (issue #12): a backlog created first, then the pack started; directly, at
    20 ms per request (through ``delay_proxy.py``), and as *replicas* processes of ours sharing the backlog."""
    count = 40 if quick else 600
    return [
        Scenario("real", "Noop", count, input=REAL_INPUT, server="real"),
        Scenario("real_rtt20", "Noop", count // 2 if quick else count, input=REAL_INPUT, latency=0.02,
                 server="real"),
        Scenario("real_replicas", "Noop", count, input=REAL_INPUT, server="real", replicas=replicas),
    ]


@dataclasses.dataclass
class Row:
    """One target of the issue: a metric of one scenario, compared as ours / Go (or, ``limit``, absolute)."""

    key: str
    title: str  # formatted with the scenario's count and latency
    scenario: str
    metric: str
    better: str  # "higher" or "lower"
    target: float | None = None  # the ratio ours / Go must be at least (higher) or at most (lower) this
    limit: float | None = None  # ours alone must be at most (lower) or at least (higher) this
    unit: str = ""  # of the limit

    def describe_target(self):
        sign = "≥" if self.better == "higher" else "≤"
        if self.limit is not None:
            return f"{sign} {self.limit:g}{self.unit}"
        if self.target is None:
            return "-"
        return f"{sign} {self.target:.1f}×" if self.target < 10 else f"{sign} {self.target:g}×"


ROWS = [
    Row("cpu", "CPU per trivial action", "fast", "cpu_ms_per_action", "lower", target=1.0),
    Row("fast", "drain rate, {count:,} trivial actions", "fast", "actions_per_s", "higher", target=1.0),
    Row("rtt20", "drain rate, {count:,} actions, {latency_ms:g} ms per request", "rtt20", "actions_per_s", "higher",
        target=30),
    Row("io1s", "drain rate, {count:,} actions sleeping {input:g} s", "io1s", "actions_per_s", "higher",
        target=1.5),
    Row("io1s_rtt20", "drain rate, {count:,} sleeping {input:g} s, {latency_ms:g} ms per request", "io1s_rtt20",
        "actions_per_s", "higher", target=15),
    Row("memory", "RSS per in-flight action, {count:,} sleeping", "memory", "kb_per_action", "lower", target=1.0),
    Row("idle", "idle CPU (5 s polling)", "idle", "cpu_percent", "lower", limit=0.5, unit=" % of a core"),
    Row("real", "real server: drain rate, {count:,} queued", "real", "actions_per_s", "higher", target=1.0),
    Row("real_rtt20", "real server: drain rate, {count:,} queued, {latency_ms:g} ms per request", "real_rtt20",
        "actions_per_s", "higher", target=2.0),
    Row("real_lost", "real server: lost races per action", "real", "lost_per_action", "lower", limit=0.5),
    Row("real_rtt20_lost", "real server: lost races per action, {latency_ms:g} ms per request", "real_rtt20",
        "lost_per_action", "lower", limit=0.5),
    Row("real_cpu", "real server: pack CPU per action", "real", "cpu_ms_per_action", "lower"),
    Row("real_server_cpu", "real server: server CPU per action", "real", "server_cpu_ms_per_action", "lower"),
    Row("real_replicas_share", "real server, {replicas} replicas: smallest share of the takes", "real_replicas",
        "smallest_share", "higher", limit=0.25, unit=" of an even split"),
    Row("real_replicas_once", "real server, {replicas} replicas: results per action", "real_replicas",
        "results_per_action_max", "lower", limit=1, unit=" (exactly one each)"),
]

#: The headline number of a scenario, whose median run ``--repeat`` reports.
HEADLINE = {"memory": "kb_per_action", "idle": "cpu_percent"}
#: Clients whose replicas can run side by side: the Go pack's health server binds a fixed port (8090).
REPLICA_CLIENTS = ("ours",)


# --- running -------------------------------------------------------------------------------------------------

def find_go_peer():
    """``shared/peers/go-client/go-bench-pack`` in the nearest directory above the repository that has it."""
    return harness.find_shared_peer(GO_PEER_PATH)


def run_once(scenario, client, args, log_dir, attempt):
    """One measured run of *client* in *scenario*, each process fresh."""
    suffix = f"-{attempt + 1}" if args.repeat > 1 else ""
    name = f"{scenario.name}-{client}{suffix}"
    profile = os.path.join(args.profile, f"{name}.prof") if args.profile else None
    if scenario.server == "real":
        return run_real(scenario, client, args, os.path.join(log_dir, name), profile)
    source = LoopbackSource(os.path.join(log_dir, f"{name}-api.log"))
    try:
        log = os.path.join(log_dir, f"{name}.log")
        if client == "go":
            pack = GoPack(args.go_peer, source.url, scenario, log)
        else:
            overrides = args.ours
            if client == JOURNAL_CLIENT:
                journal = tempfile.mkdtemp(prefix="flyte-bench-journal-")
                overrides = dict(overrides, journal=journal)
            pack = OurPack(source.url, scenario, log, profile, overrides)
        load = os.getloadavg()
        try:
            result = harness.run_scenario(scenario, source, pack, warm_up=not args.quick)
        finally:
            pack.stop()
        result["options"] = pack.options
        result["load_average"] = load
        return result
    finally:
        source.close()
        if client == JOURNAL_CLIENT:
            shutil.rmtree(journal, ignore_errors=True)


def run_real(scenario, client, args, log_prefix, profile=None):
    """One run against a fresh real Flyte server: the backlog created, then the pack (or its replicas) started."""
    source = real_server.RealServerSource(args.flyte_server, log_prefix, delay=scenario.latency,
                                          replicas=scenario.replicas)
    packs = []
    try:
        batch = source.queue_batch(scenario.command, scenario.inputs())
        load = os.getloadavg()
        for index, url in enumerate(source.urls[:scenario.replicas]):
            log = f"{log_prefix}{'-' + str(index + 1) if scenario.replicas > 1 else ''}.log"
            if client == "go":
                packs.append(GoPack(args.go_peer, url, scenario, log))
            else:
                packs.append(OurPack(url, scenario, log, profile if index == 0 else None, args.ours))
        result = harness.measure_prequeued(scenario, source, batch, packs)
    finally:
        for pack in packs:
            pack.stop()
        source.close()
    result["options"] = packs[0].options
    result["load_average"] = load
    result["server_cpu_ms_per_action"] = result["real_server"]["cpu_ms_per_action"]
    result["results_per_action_max"] = result["results_per_action"]["max"]
    if "replica_takes" in result:
        even = scenario.count / scenario.replicas
        result["smallest_share"] = min(result["replica_takes"]) / even
    return result


def run_repeated(scenario, clients, args, log_dir):
    """Run every client ``--repeat`` times, taking turns in an order that alternates from round to round (so both
    meet the same load, and neither always runs first); per client, the run with the median headline number, with
    the median of every row's metric over all runs in ``medians``."""
    key = HEADLINE.get(scenario.name, "actions_per_s")
    clients = [c for c in clients if c != JOURNAL_CLIENT or scenario.name in JOURNAL_SCENARIOS]
    runs = {client: [] for client in clients}
    errors = {}
    if scenario.replicas > 1:
        clients = [client for client in clients if client in REPLICA_CLIENTS]
    for attempt in range(args.repeat):
        # Each round reverses the order of the one before, so neither client always runs first.
        for client in clients if attempt % 2 == 0 else clients[::-1]:
            if client in errors:
                continue
            print(f"running {scenario.name} ({CLIENT_NAMES[client]}) ...", end=" ", file=sys.stderr, flush=True)
            try:
                result = run_once(scenario, client, args, log_dir, attempt)
            except (BenchError, OSError) as exc:  # one broken run must not lose the others
                print("failed", file=sys.stderr, flush=True)
                errors[client] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            print(_headline(scenario, result), file=sys.stderr, flush=True)
            runs[client].append(result)
    chosen = {}
    for client in clients:
        if client in errors:
            chosen[client] = errors[client]
            continue
        ordered = sorted(runs[client], key=lambda run: run[key])
        median = ordered[(len(ordered) - 1) // 2]
        metrics = {row.metric for row in ROWS if row.scenario == scenario.name and row.metric in median}
        metrics |= {"cpu_ms_per_action"} & set(median)  # what the journal's cost is read from
        median["medians"] = {metric: _median([run[metric] for run in runs[client]]) for metric in metrics}
        if len(ordered) > 1:
            median["repeats"] = {metric: [run[metric] for run in runs[client]] for metric in metrics}
        chosen[client] = median
    return chosen


def _median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _headline(scenario, result):
    if scenario.idle_seconds:
        return f"{_idle_cpu(result['cpu_percent'], result['seconds'])} CPU"
    text = f"{result['actions_per_s']:,.0f} actions/s, {result['cpu_ms_per_action']:.3f} ms CPU per action"
    if "lost_per_action" in result:
        text += f", {result['lost_per_action']:.2f} lost races per action"
    if "replica_takes" in result:
        text += f", takes per replica {result['replica_takes']}"
    if "kb_per_action" in result:
        text += f", {result['kb_per_action']:.1f} KB per action in flight"
    return text


def compare(report, chosen):
    """The rows of the issue's table: both clients' numbers, the ratio ours / Go, the target, met or missed."""
    by_name = {entry["scenario"]: entry for entry in report["scenarios"]}
    sizes = {s.name: s for s in chosen}
    rows = []
    for row in ROWS:
        entry = by_name.get(row.scenario)
        if entry is None:
            continue
        scenario = sizes[row.scenario]
        go, ours = entry.get("go"), entry.get("ours")
        go_value = go["medians"].get(row.metric) if go and "error" not in go else None
        ours_value = ours["medians"].get(row.metric) if ours and "error" not in ours else None
        ratio = ours_value / go_value if go_value and ours_value is not None else None
        if report["quick"] or ours_value is None:
            met = None
        elif row.limit is not None:
            met = ours_value <= row.limit if row.better == "lower" else ours_value >= row.limit
        elif ratio is None or row.target is None:
            met = None
        else:
            met = ratio >= row.target if row.better == "higher" else ratio <= row.target
        title = row.title.format(count=scenario.count, input=scenario.input or 0, latency_ms=scenario.latency * 1000,
                                 replicas=scenario.replicas)
        rows.append({"key": row.key, "title": title,
                     "scenario": row.scenario, "metric": row.metric, "go": go_value, "ours": ours_value,
                     "ratio": ratio, "better": row.better, "target": row.describe_target(), "met": met})
    return rows


# --- output --------------------------------------------------------------------------------------------------

def machine():
    """Facts about where the numbers were measured."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    import gevent
    import greenlet
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gevent": gevent.__version__,
        "greenlet": greenlet.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def _value(row, result_key, entry):
    value = row[result_key]
    if value is None:
        result = entry.get(result_key) if entry else None
        if result and "error" in result:
            return "error"
        return "-"
    metric = row["metric"]
    if metric in ("cpu_ms_per_action", "server_cpu_ms_per_action"):
        return f"{value:.3f} ms"
    if metric == "lost_per_action":
        return f"{value:.2f}"
    if metric == "smallest_share":
        return f"{value:.2f} ({', '.join(map(str, entry[result_key]['replica_takes']))} takes)"
    if metric == "actions_per_s":
        return f"{value:,.0f}/s"
    if metric == "kb_per_action":
        return f"{value:.1f} KB (idle {entry[result_key]['idle_rss_kb'] / 1024:.1f} MB)"
    if metric == "cpu_percent":
        return _idle_cpu(value, entry[result_key]["seconds"])
    return f"{value:g}"


def _idle_cpu(percent, seconds):
    if percent == 0:  # not a single clock tick
        return f"< {100 / CLOCK_TICKS / seconds:.2f} %"
    return f"{percent:.2f} %"


def _table(header, rows):
    widths = [max(len(str(cells[i])) for cells in [header] + rows) for i in range(len(header))]
    numeric = [i > 0 and all(_looks_numeric(cells[i]) for cells in rows) for i in range(len(header))]
    out = []
    for cells in [header, ["-" * w for w in widths]] + rows:
        out.append("  ".join(f"{c:>{w}}" if numeric[i] else f"{c:<{w}}"
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip())
    return "\n".join(out)


def _num(value, fmt):
    return "-" if value is None else fmt.format(value)


def _looks_numeric(cell):
    return cell == "-" or (bool(cell) and (cell[0].isdigit() or cell[0] in "<~"))


def format_comparison(report):
    """The issue's targets: one row each, both clients, the ratio and whether it was met."""
    by_name = {entry["scenario"]: entry for entry in report["scenarios"]}
    rows = []
    for row in report["rows"]:
        entry = by_name[row["scenario"]]
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}×"
        if row["met"] is None:
            verdict = "-" if report["quick"] or row["ours"] is None or row["target"] == "-" else "n/a (no Go run)"
        else:
            verdict = "met" if row["met"] else "MISSED"
        better = f"{row['better']} is better"
        busy = " / ".join(_busy(entry.get(client)) for client in ("go", "ours"))
        rows.append([row["title"], _value(row, "go", entry), _value(row, "ours", entry), ratio, better,
                     row["target"], verdict, busy])
    return _table(["", CLIENT_NAMES["go"], CLIENT_NAMES["ours"], "ours/Go", "", "target", "result",
                   "API busy Go / ours"], rows)


def _busy(result):
    if not result or "error" in result:
        return "-"
    server = result.get("server") or result.get("real_server")
    return f"{server['busy_percent']:.0f} %" if server else "-"


def format_runs(report):
    """Every run in detail, the loopback API's cost included."""
    rows = []
    for entry in report["scenarios"]:
        if entry.get("server") == "real":
            continue
        for client in CLIENTS:
            result = entry.get(client)
            if result is None:
                continue
            cells = [entry["scenario"], CLIENT_NAMES[client]]
            if "error" in result:
                rows.append(cells + ["ERROR: " + result["error"]] + [""] * 14)
                continue
            server = result.get("server") or dict.fromkeys(("requests", "cpu_us_per_request", "busy_percent",
                                                             "requests_per_action"))
            per_request = _num(server["cpu_us_per_request"], "{:.0f}")
            if "cpu_percent" in result:  # a per-request cost means nothing at one take per 5 s
                cells += ["-"] * 6 + [_idle_cpu(result["cpu_percent"], result["seconds"]), "-",
                                      f"{result['rss_kb'] / 1024:.1f}", _num(server["requests"], "{:,}"), "-",
                                      _num(server["busy_percent"], "{:.1f} %"), "-"]
            else:
                latency = result["latency_ms"]
                cells += [f"{result['actions']:,}", f"{result['actions_per_s']:,.0f}", f"{latency['p50']:,.0f}",
                          f"{latency['p99']:,.0f}", f"{latency['max']:,.0f}", f"{result['take_span_ms']:,.0f}",
                          f"{result['cpu_ms_per_action']:.3f}", f"{result['pack_cpu_percent']:.0f} %",
                          f"{result['idle_rss_kb'] / 1024:.1f} / {result['peak_rss_kb'] / 1024:.1f}",
                          _num(server["requests"], "{:,}"), per_request, _num(server["busy_percent"], "{:.0f} %"),
                          _num(server["requests_per_action"], "{:.2f}")]
            cells.append(f"{result['load_average'][0]:.2f}")
            rows.append(cells)
    header = ["scenario", "client", "actions", "actions/s", "p50 ms", "p99 ms", "max ms", "takes ms", "CPU ms/act",
              "pack CPU", "RSS MB idle/peak", "API req", "API µs/req", "API busy", "req/act", "load"]
    return _table(header, rows) if rows else ""


def format_real_runs(report):
    """Every real-server run in detail: drain, the packs' and the server's CPU, lost races, replicas' shares."""
    rows = []
    for entry in report["scenarios"]:
        if entry.get("server") != "real":
            continue
        for client in CLIENTS:
            result = entry.get(client)
            if result is None:
                continue
            cells = [entry["scenario"], CLIENT_NAMES[client]]
            if "error" in result:
                rows.append(cells + ["ERROR: " + result["error"]] + [""] * 11)
                continue
            server = result["real_server"]
            cells += [f"{result['actions']:,}", f"{result['actions_per_s']:,.1f}", f"{result['take_span_ms']:,.0f}",
                      f"{result['cpu_ms_per_action']:.3f}",
                      f"{result['pack_cpu_percent']:.0f} %", f"{server['cpu_ms_per_action']:.2f}",
                      f"{server['busy_percent']:.0f} %", f"{result['lost_races']:,}",
                      f"{result['lost_per_action']:.2f}",
                      f"{result['results_per_action']['min']}-{result['results_per_action']['max']}",
                      " / ".join(map(str, result.get("replica_takes", ()))) or "-",
                      f"{result['load_average'][0]:.2f}"]
            rows.append(cells)
    if not rows:
        return ""
    header = ["scenario", "client", "actions", "actions/s", "takes ms", "CPU ms/act", "pack CPU",
              "server CPU ms/act", "server busy", "lost races", "lost/act", "results/act", "takes per replica",
              "load"]
    return _table(header, rows)


def format_notes(report):
    """What the tables need to be read right: the API's ceiling, the clients' settings, the machine."""
    lines = []
    runs = [(entry["scenario"], client, entry[client]) for entry in report["scenarios"] for client in CLIENTS
            if entry.get(client) and "actions" in entry[client] and entry[client].get("server")
            and entry[client]["server"]["cpu_us_per_request"]]
    if runs:
        name, client, result = max(runs, key=lambda run: run[2]["server"]["requests_per_s"])
        server = result["server"]
        ceiling = 1e6 / server["cpu_us_per_request"]
        lines.append(
            f"Loopback API (its own process, one core at most): in the busiest run ({name}, {CLIENT_NAMES[client]}: "
            f"{server['requests_per_s']:,.0f} requests/s) it used {server['cpu_us_per_request']:.0f} µs of CPU per "
            f"request and was {server['busy_percent']:.0f} % busy; at that cost one core serves ~{ceiling:,.0f} "
            f"requests/s, ~{ceiling / server['requests_per_action']:,.0f} actions/s at "
            f"{server['requests_per_action']:.2f} requests per action.")
    if any(entry.get("server") == "real" for entry in report["scenarios"]):
        lines.append("Real server (flyte-server, storage in memory, a fresh process per run): the backlog is created "
                     "through one flow before the pack starts; the window runs from the last pack's registration to "
                     "the last result (drain rate: first take -> last result, from the audit's millisecond times). "
                     "Lost races: takes answered 500 because another take claimed the same action (the server "
                     "logs each); server CPU: the server process's CPU over the window, per action. 20 ms per "
                     "request: bench/delay_proxy.py holds every request 20 ms on its way to the server. Replicas: "
                     "processes of ours, each through its own proxy, whose counts give each one's takes.")
    lines.append("Drain rate: actions / (last result accepted - first take), on the API's clock. Latency: queued -> "
                 "result accepted. takes ms: first take -> last take. CPU: the pack process's user + system time "
                 f"between the batch's first take and its last result, read in {1000 // CLOCK_TICKS} ms clock ticks "
                 "(pack CPU is that time as % of one core). RSS per in-flight action: (RSS with all held - RSS idle "
                 "after warm-up) / actions. API busy: the API's CPU time as % of one core over the batch. load: the "
                 "1-minute load average as the run started.")
    if report["repeat"] > 1:
        lines.append(f"--repeat {report['repeat']}: the clients took turns (the order alternating); each target row is "
                     f"the median of its metric over the {report['repeat']} runs, each detail row the client's median "
                     f"run by drain rate (memory: by KB per action; idle: by CPU). All runs are in the JSON.")
    tuned = sorted({f"{e['scenario']}: {', '.join(f'{k}={v}' for k, v in e['ours']['options'].items())}"
                    for e in report["scenarios"] if e.get("ours") and "options" in e["ours"]})
    lines.append(f"{CLIENT_NAMES['ours']} {report['version']}: the library's defaults (Prometheus metrics and health "
                 f"server on) plus, per scenario, {'; '.join(tuned) or 'nothing'}"
                 + (f" (overridden with --ours: {report['ours_overrides']})" if report["ours_overrides"] else "")
                 + ".")
    for cost in report.get("journal_cost", []):
        lines.append(f"Journal ({CLIENT_NAMES[JOURNAL_CLIENT]}, its own directory in the temp dir, sync=normal): "
                     f"{cost['ms_per_action']:+.3f} ms CPU per action in {cost['scenario']} ({cost['with']:.3f} ms "
                     f"with, {cost['without']:.3f} ms without, medians; target at most +{JOURNAL_TARGET_MS:g} ms).")
    if report["go_peer"]:
        peer = report["go_peer"]
        lines.append(f"{CLIENT_NAMES['go']}: {peer['path']} (sha256 {peer['sha256'][:12]}), one take at a time, "
                     f"each action in its own goroutine; polling interval {harness.POLLING_INTERVAL:g} s "
                     f"(idle: {harness.IDLE_POLLING_INTERVAL:g} s, as ours).")
    else:
        lines.append(f"{CLIENT_NAMES['go']}: not run ({report['go_peer_note']}).")
    m = report["machine"]
    lines.append(f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), Linux {m['kernel']}; Python {m['python']}, "
                 f"gevent {m['gevent']}, greenlet {m['greenlet']}; load average at start "
                 f"{' '.join(f'{x:.2f}' for x in m['load_average_at_start'])}, at end "
                 f"{' '.join(f'{x:.2f}' for x in m.get('load_average_at_end', ()))}. Other load shows up as pack "
                 f"CPU well below 100 % in fast: compare ratios, not absolute numbers, across machines.")
    return "\n".join(lines)


def journal_cost(report):
    """The journal's CPU per action: ours with it minus ours without, per scenario where both ran (medians)."""
    costs = []
    for entry in report["scenarios"]:
        runs = [entry.get(client) for client in ("ours", JOURNAL_CLIENT)]
        if all(run and "error" not in run and "cpu_ms_per_action" in run.get("medians", {}) for run in runs):
            without, with_journal = (run["medians"]["cpu_ms_per_action"] for run in runs)
            costs.append({"scenario": entry["scenario"], "with": with_journal, "without": without,
                          "ms_per_action": with_journal - without})
    return costs


def write_profiles(directory):
    """Next to each ``.prof``, a ``.txt`` with its top entries by own time; the paths written."""
    written = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".prof"):
            continue
        path = os.path.join(directory, name)
        text_path = path[:-5] + ".txt"
        with open(text_path, "w") as f:
            stats = pstats.Stats(path, stream=f)
            stats.sort_stats("tottime").print_stats(40)
        written.append(text_path)
    return written


def _shown(path):
    relative = os.path.relpath(path)
    return os.path.abspath(path) if relative.startswith("..") else relative


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the benchmark scenarios of issue #9: flyte_gevent beside the "
                                                 "Go client, each in its own process, same loopback API.")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test (numbers mean nothing)")
    parser.add_argument("--server", choices=("loopback", "real", "all"), default="loopback",
                        help="the loopback API's scenarios (issue #9, the default), the real Flyte server's (issue "
                             "#12: real, real_rtt20, real_replicas), or both")
    parser.add_argument("--flyte-server", metavar="PATH",
                        help=f"the real Flyte server binary (default: FLYTE_GEVENT_REAL_SERVER, else "
                             f"{real_server.SERVER_PATH} in the nearest directory above the repository that has it)")
    parser.add_argument("--replicas", type=int, default=2, metavar="N",
                        help="processes of ours in the real_replicas scenario (default %(default)s)")
    parser.add_argument("--scenario", action="append", metavar="NAME",
                        help="run only this scenario (repeatable): fast, rtt20, io1s, io1s_rtt20, memory, idle; "
                             "real, real_rtt20, real_replicas (with --server real or all)")
    parser.add_argument("--client", action="append", choices=CLIENTS, help="run only this client (repeatable)")
    parser.add_argument("--go-peer", metavar="PATH",
                        help=f"the Go client's bench pack, or 'none' (default: {GO_PEER_PATH} in the nearest "
                             f"directory above the repository that has it)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run each scenario and client N times and report the median run (default 1)")
    parser.add_argument("--ours", "--this", action="append", default=[], metavar="OPTION=VALUE",
                        help="override a Pack option of ours in every scenario: max_takers=N, max_in_flight=N or "
                             "polling_interval=S (repeatable)")
    parser.add_argument("--profile", metavar="DIR",
                        help="cProfile our pack process into DIR/<scenario>-ours.prof (and a .txt of its top entries)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="JSON results file (default %(default)s)")
    args = parser.parse_args(argv)

    if args.replicas < 2:
        parser.error(f"--replicas: at least 2, got {args.replicas}")
    chosen = []
    if args.server in ("loopback", "all"):
        chosen += scenarios(args.quick)
    if args.server in ("real", "all"):
        args.flyte_server = args.flyte_server or real_server.find_server()
        if args.flyte_server is None:
            parser.error(f"--server {args.server}: no Flyte server binary (FLYTE_GEVENT_REAL_SERVER, "
                         f"{real_server.SERVER_PATH} above {ROOT}); give one with --flyte-server")
        if not os.access(args.flyte_server, os.X_OK) or os.path.isdir(args.flyte_server):
            parser.error(f"--flyte-server: {args.flyte_server} is not an executable file")
        chosen += real_scenarios(args.quick, args.replicas)
    if args.scenario:
        known = [s.name for s in chosen]
        unknown = sorted(set(args.scenario) - set(known))
        if unknown:
            parser.error(f"--scenario: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
        chosen = [s for s in chosen if s.name in args.scenario]
    if args.repeat < 1:
        parser.error(f"--repeat: must be at least 1, got {args.repeat}")
    overrides = {}
    for setting in args.ours:
        key, _, value = setting.partition("=")
        try:
            overrides[key] = OVERRIDABLE[key](value)
        except (KeyError, ValueError):
            parser.error(f"--ours {setting!r}: expected one of max_takers=N, max_in_flight=N, polling_interval=S")
    args.ours = overrides
    go_peer_note = None
    if args.go_peer is None:
        args.go_peer = find_go_peer()
        if args.go_peer is None:
            go_peer_note = f"no {GO_PEER_PATH} above {ROOT}; give one with --go-peer"
    elif args.go_peer == "none":
        args.go_peer, go_peer_note = None, "--go-peer none"
    elif not os.access(args.go_peer, os.X_OK) or os.path.isdir(args.go_peer):
        parser.error(f"--go-peer: {args.go_peer} is not an executable file")
    clients = [c for c in (args.client or CLIENTS) if c != "go" or args.go_peer]
    if not clients:
        parser.error(f"--client go: no Go peer ({go_peer_note})")
    output_dir = os.path.dirname(os.path.abspath(args.output))
    log_dir = os.path.join(output_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)

    import flyte_gevent
    report = {"generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "quick": args.quick, "repeat": args.repeat, "version": flyte_gevent.__version__,
              "ours_overrides": overrides,
              "machine": machine(), "go_peer_note": go_peer_note,
              "go_peer": {"path": os.path.abspath(args.go_peer), "sha256": _sha256(args.go_peer)} if args.go_peer
              else None,
              "flyte_server": {"path": os.path.abspath(args.flyte_server), "sha256": _sha256(args.flyte_server)}
              if args.flyte_server else None,
              "scenarios": []}
    started = time.monotonic()
    for scenario in chosen:
        entry = {"scenario": scenario.name, "command": scenario.command, "count": scenario.count,
                 "input": scenario.input, "latency_s": scenario.latency, "idle_seconds": scenario.idle_seconds,
                 "server": scenario.server, "replicas": scenario.replicas}
        entry.update(run_repeated(scenario, clients, args, log_dir))
        report["scenarios"].append(entry)
    report["seconds"] = time.monotonic() - started
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["rows"] = compare(report, chosen)
    report["journal_cost"] = journal_cost(report)

    if args.quick:
        print("--quick: tiny batches; these numbers mean nothing.")
    print(format_comparison(report))
    print()
    loopback_runs = format_runs(report)
    if loopback_runs:
        print(loopback_runs)
        print()
    real_runs = format_real_runs(report)
    if real_runs:
        print(real_runs)
        print()
    print(format_notes(report))
    if args.profile:
        for path in write_profiles(args.profile):
            print(f"profile: {_shown(path)}")
    os.makedirs(output_dir, exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"\nJSON: {_shown(args.output)}")
    failed = [e["scenario"] for e in report["scenarios"] for c in CLIENTS if "error" in e.get(c, {})]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
