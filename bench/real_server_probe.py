"""What the real Flyte server does under concurrent takes: lost races (500s) and the cost of a take vs the backlog.

Not a benchmark of flyte_gevent: the takers here are bare HTTP loops (take; on 200 post the result at once; on 500
take again; stop on 204), so the numbers describe the server, for designing a taking strategy against it.

For each taker count it starts a fresh server (``flyte_gevent.testing.FlyteServer.launch``), queues ``--actions``
actions through one flow and that many events, then lets the takers drain them, counting take answers and the
server process's CPU time (``/proc/<pid>/stat``). Then, on one more fresh server, it measures the server CPU one take
costs with ``--backlogs`` NEW actions queued.

    .venv/bin/python bench/real_server_probe.py [--server PATH] [--actions 600] [--takers 1,4,64]

The server binary comes from ``--server``, else ``FLYTE_GEVENT_REAL_SERVER``, else
``../shared/peers/flyte-server/flyte-server`` beside the repository.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import collections  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from flyte_gevent.testing import FlyteServer  # noqa: E402

PACK = {"name": "Probe", "commands": [{"name": "Noop", "events": ["Done"]}], "events": [{"name": "Done"}]}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def server_cpu(pid):
    """User + system CPU seconds the process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Taker:
    """One keep-alive connection that takes and completes actions like a pack with a trivial handler."""

    def __init__(self, url, pack_id):
        parts = urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        self.take_path = f"/v1/packs/{pack_id}/actions/take"

    def post(self, path, body):
        self.connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = self.connection.getresponse()
        return response.status, response.read()

    def take(self):
        return self.post(self.take_path, b"null")

    def complete(self, take_body):
        href = json.loads(take_body)["links"][0]["href"]
        status, _ = self.post(urlsplit(href).path, b'{"event":"Done","payload":null}')
        return status

    def drain(self, statuses, results):
        """Take until a 204; a 500 (a lost race) is taken again at once, as the loser would."""
        while True:
            status, body = self.take()
            statuses[status] += 1
            if status == 200:
                results[self.complete(body)] += 1
            elif status != 500:
                return


def queue(server, count):
    started = time.monotonic()
    server.create_actions("Probe", "Noop", count, None, timeout=60 + 0.05 * count)
    return time.monotonic() - started


def drain_run(binary, actions, takers):
    with FlyteServer.launch(binary) as server:
        queue_seconds = queue(server, actions)
        server.register_pack(PACK)
        statuses, results = collections.Counter(), collections.Counter()
        pool = gevent.pool.Group()
        cpu_before, started = server_cpu(server.pid), time.monotonic()
        for _ in range(takers):
            pool.spawn(Taker(server.url, "Probe").drain, statuses, results)
        pool.join(raise_error=True)
        elapsed, cpu = time.monotonic() - started, server_cpu(server.pid) - cpu_before
        done = results[202]
        requests_made = sum(statuses.values()) + sum(results.values())
        return {"takers": takers, "actions": actions, "completed": done, "seconds": elapsed,
                "per_second": done / elapsed, "take_200": statuses[200], "take_500": statuses[500],
                "take_204": statuses[204], "other": {k: v for k, v in statuses.items() if k not in (200, 500, 204)},
                "lost_per_action": statuses[500] / max(done, 1), "server_cpu_ms_per_action": 1000 * cpu / max(done, 1),
                "server_cpu_ms_per_request": 1000 * cpu / max(requests_made, 1), "queue_seconds": queue_seconds}


def backlog_run(binary, backlogs, takes):
    """Server CPU per take with N NEW actions queued: *takes* single takes (each removes one from the backlog)."""
    rows = []
    with FlyteServer.launch(binary) as server:
        server.register_pack(PACK)
        taker = Taker(server.url, "Probe")
        queued = 0
        for backlog in sorted(backlogs):
            queue(server, backlog - queued)
            queued = backlog
            cpu_before, started = server_cpu(server.pid), time.monotonic()
            for _ in range(takes):
                status, _body = taker.take()
                assert status == 200, status
            cpu, elapsed = server_cpu(server.pid) - cpu_before, time.monotonic() - started
            queued -= takes
            rows.append({"backlog": backlog, "server_cpu_ms_per_take": 1000 * cpu / takes,
                         "ms_per_take": 1000 * elapsed / takes})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = os.environ.get("FLYTE_GEVENT_REAL_SERVER") or os.path.join(
        os.path.dirname(ROOT), "shared", "peers", "flyte-server", "flyte-server")
    parser.add_argument("--server", default=default, help="flyte-server binary (default %(default)s)")
    parser.add_argument("--actions", type=int, default=600, help="actions queued per run (default %(default)s)")
    parser.add_argument("--takers", default="1,4,64", help="concurrent taker counts (default %(default)s)")
    parser.add_argument("--backlogs", default="100,600,2000",
                        help="backlog sizes for the cost-per-take rows (default %(default)s)")
    parser.add_argument("--backlog-takes", type=int, default=50, help="takes measured per backlog size")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    runs = [drain_run(args.server, args.actions, int(n)) for n in args.takers.split(",")]
    print(f"{args.actions} actions queued, then N concurrent takers (take; 200 -> post result; 500 -> take again)")
    print(f"{'takers':>6} {'actions/s':>9} {'200':>5} {'500':>6} {'204':>4} {'500s/action':>11} "
          f"{'srv ms CPU/action':>17} {'srv ms CPU/request':>18}")
    for run in runs:
        print(f"{run['takers']:>6} {run['per_second']:>9.1f} {run['take_200']:>5} {run['take_500']:>6} "
              f"{run['take_204']:>4} {run['lost_per_action']:>11.2f} {run['server_cpu_ms_per_action']:>17.2f} "
              f"{run['server_cpu_ms_per_request']:>18.2f}" + (f"  other: {run['other']}" if run["other"] else ""))
    rows = backlog_run(args.server, [int(n) for n in args.backlogs.split(",")], args.backlog_takes)
    print(f"\nserver CPU per take vs NEW backlog ({args.backlog_takes} single takes each)")
    print(f"{'backlog':>7} {'srv ms CPU/take':>15} {'ms/take':>8}")
    for row in rows:
        print(f"{row['backlog']:>7} {row['server_cpu_ms_per_take']:>15.2f} {row['ms_per_take']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"drain": runs, "backlog": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
