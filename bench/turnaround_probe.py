"""How the real Flyte server's drain rate follows a pack's turnaround, and what pipelined takes would change.

Not a benchmark of flyte_gevent: the taker here is a bare HTTP loop on one keep-alive connection (no per-action
work; each result posted on a second connection), so the numbers describe the server and the most any client can
get from it. Each round runs, each against a fresh ``flyte-server`` with ``--actions`` actions queued first:

* ``raw``: take; on 200 take again at once (and post the result);
* ``raw+hold``: the same, holding every next take back ``--hold-us`` microseconds (a busy wait, as a pack's own
  work between a take's answer and its next take would);
* ``pipelined+hold``: the same hold, with one more take always sent on the connection before the previous one is
  answered (HTTP/1.1 pipelining: the server answers them in order, so no take races another);
* ``ours``: flyte_gevent's bench pack (``bench/pack_proc.py``) with the library's defaults;
* ``go``: the Go client's bench pack, when ``shared/peers`` has it (``--go-peer none`` to leave it out).

The order of the clients alternates from round to round. The drain rate is measured as ``bench/run.py --server
real`` measures it (first take to last result, from the audit), and each line says how many takes lost a race and
whether every action got exactly one result.

    .venv/bin/python bench/turnaround_probe.py [--rounds 4] [--actions 600] [--hold-us 400] [--json FILE]
"""

import argparse
import json
import os
import re
import socket
import statistics
import sys
import time
from urllib.parse import urlsplit

import harness
import real_server
import run

PACK_JSON = b'{"name":"Bench","commands":[{"name":"Noop","events":["Done"]}],"events":[]}'
RESULT_JSON = b'{"event":"Done","payload":{"n":1}}'
_CONTENT_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)")
_RESULT_HREF = re.compile(rb'"href":"[a-z]+://[^/"]+(/[^"]*/result)"')


class Connection:
    """A blocking keep-alive HTTP/1.1 connection that can have several requests outstanding (answered in order)."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def send(self, method, path, body):
        self.sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: "
                          f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)

    def receive(self):
        """The oldest unanswered request's ``(status, body)``."""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        match = _CONTENT_LENGTH.search(head)
        length = int(match[1]) if match else 0
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(head.split(None, 2)[1]), body

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buffer += data

    def close(self):
        self.sock.close()


def raw_drain(url, depth, hold):
    """Register pack ``Bench``, then take until the backlog is gone, *depth* takes outstanding, each next take held
    back *hold* seconds after the answer before it."""
    parts = urlsplit(url)
    takes, results = Connection(parts.hostname, parts.port), Connection(parts.hostname, parts.port)
    try:
        takes.send("POST", "/v1/packs", PACK_JSON)
        status, _ = takes.receive()
        if status != 201:
            raise harness.BenchError(f"registration answered {status}")
        take_path = "/v1/packs/Bench/actions/take"
        for _ in range(depth):
            takes.send("POST", take_path, b"null")
        outstanding = depth
        while outstanding:
            status, body = takes.receive()
            outstanding -= 1
            if status == 500:  # a lost race (none is expected on one connection): take again
                takes.send("POST", take_path, b"null")
                outstanding += 1
                continue
            if status != 200:
                continue  # 204: the backlog is gone (a take still outstanding answers too)
            due = time.perf_counter() + hold
            while time.perf_counter() < due:
                pass
            takes.send("POST", take_path, b"null")
            outstanding += 1
            results.send("POST", _RESULT_HREF.search(body)[1].decode(), RESULT_JSON)
            status, _ = results.receive()
            if status != 202:
                raise harness.BenchError(f"a result answered {status}")
    finally:
        takes.close()
        results.close()


def one_run(client, args):
    source = real_server.RealServerSource(args.server, os.path.join(args.log_dir, client))
    pack = None
    try:
        batch = source.queue_batch("Noop", [{"n": 1}] * args.actions)
        scenario, log = harness.Scenario("real", "Noop", args.actions), os.path.join(args.log_dir, f"{client}-pack.log")
        alive = None
        if client in ("go", "ours"):
            pack = (harness.GoPack(args.go_peer, source.url, scenario, log) if client == "go"
                    else harness.OurPack(source.url, scenario, log))
            alive = pack.check_alive
            source.wait_for_pack(harness.PACK_NAME, 30, alive)
            batch.mark_start()
        else:  # the bare taker registers and drains in this process
            batch.mark_start()
            raw_drain(source.url, depth=2 if client == "pipelined+hold" else 1,
                      hold=args.hold_us * 1e-6 if client.endswith("+hold") else 0.0)
        report = batch.wait_done(120, alive)
    finally:
        if pack is not None:
            pack.stop()
        source.close()
    taken, completed = report["actions"]["taken"], report["actions"]["completed"]
    return {"per_second": args.actions / (max(completed) - min(taken)), "lost": report["real_window"]["lost"],
            "results": (min(report["results"]), max(report["results"]))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default=real_server.find_server(), help="flyte-server binary")
    parser.add_argument("--go-peer", default=run.find_go_peer(), help="the Go bench pack, or 'none'")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--actions", type=int, default=600)
    parser.add_argument("--hold-us", type=float, default=400.0)
    parser.add_argument("--log-dir", default=os.path.join(run.HERE, "results", "logs"))
    parser.add_argument("--json", help="also write every run to this file")
    args = parser.parse_args(argv)
    if not args.server:
        parser.error("no flyte-server binary: give --server or set FLYTE_GEVENT_REAL_SERVER")
    os.makedirs(args.log_dir, exist_ok=True)
    clients = ["raw", "raw+hold", "pipelined+hold", "ours"] + (["go"] if args.go_peer and args.go_peer != "none"
                                                                else [])
    rates = {client: [] for client in clients}
    runs = []
    for round_number in range(args.rounds):
        for client in clients if round_number % 2 == 0 else clients[::-1]:
            result = one_run(client, args)
            rates[client].append(result["per_second"])
            runs.append(dict(result, client=client, round=round_number + 1))
            print(f"round {round_number + 1} {client:15s} {result['per_second']:6.1f} actions/s, "
                  f"{result['lost']} lost races, results per action {result['results'][0]}-{result['results'][1]}",
                  flush=True)
    print(f"\nmedians over {args.rounds} rounds ({args.actions} actions, hold {args.hold_us:g} µs):")
    for client in clients:
        line = f"{client:15s} {statistics.median(rates[client]):6.1f} actions/s"
        for base in ("raw", "go"):
            if base in rates and base != client:
                ratio = statistics.median(a / b for a, b in zip(rates[client], rates[base]))
                line += f"  {ratio:.2f}× {base}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"actions": args.actions, "hold_us": args.hold_us, "runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
