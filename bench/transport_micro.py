"""Client CPU per take+result pair, transport by transport, in one run against one loopback server.

    .venv/bin/python bench/transport_micro.py [--pairs 1000] [--rounds 3] [--json]

A take (``POST .../actions/take``, answered 200 with a one-action JSON body)
and a result (``POST .../result``, answered 202) are made *pairs* times in a
row over one keep-alive connection, for each transport in turn, *rounds*
times (interleaved, so a noisy moment hits them all); the median round is
reported. The server runs in a child process, so only the client's CPU
(user + system, ``time.process_time``) is counted. The client is
gevent-patched, as a pack is.

Transports:

* ``requests``: one ``requests.Session``;
* ``http.client (0.1.0)``: what flyte_gevent 0.1.0 did per request — a pooled
  ``http.client.HTTPConnection`` checked with ``select()`` before reuse, headers
  and body written by ``request()``, the response read by ``getresponse()``;
* ``flyte_gevent._http``: the transport of this version (one ``sendall()`` per
  request, httptools parsing);
* ``Client.take + post_result``: the same pair through the public client, which
  adds header building, status checks and loading the action through the
  marshmallow schema.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AID = "5f0c1d2e3a4b5c6d7e8f9012"
RESULT_BODY = b'{"event":"Done","payload":{"ok":true},"createdAt":"2026-01-02T03:04:05Z"}'


# -- the server (child process, plain threads) ---------------------------------------------------------------------

def _action(host):
    base = f"http://{host}"
    return json.dumps({"command": "Echo", "input": {"text": "hello"}, "links": [
        {"href": f"{base}/v1/packs/Bench/actions/{AID}/result", "rel": f"{base}/swagger#/actionResult"}]}).encode()


def _serve_connection(conn, host):
    take = _action(host)
    take_response = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(take), take))
    result_response = b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
    buffer = b""
    with conn:
        while True:
            while b"\r\n\r\n" not in buffer:
                data = conn.recv(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                data = conn.recv(65536)
                if not data:
                    return
                buffer += data
            buffer = buffer[length:]
            conn.sendall(take_response if head.split(b" ", 2)[1].endswith(b"/take") else result_response)


def serve():
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    host = f"127.0.0.1:{listener.getsockname()[1]}"
    print(host, flush=True)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_serve_connection, args=(conn, host), daemon=True).start()


# -- the transports (this process, gevent-patched) ------------------------------------------------------------------

def _requests(base):
    import requests

    session = requests.Session()
    headers = {"Accept": "application/json", "Content-Type": "application/json"}

    def pair():
        take = session.post(f"{base}/v1/packs/Bench/actions/take", data=b"null", headers=headers)
        assert take.status_code == 200 and take.content
        result = session.post(f"{base}/v1/packs/Bench/actions/{AID}/result", data=RESULT_BODY, headers=headers)
        assert result.status_code == 202
    return pair


def _http_client_0_1_0(base):
    """0.1.0's per-request path, reduced to one origin: select() idle check, request(), getresponse().read()."""
    import http.client

    from gevent import monkey

    original_select = monkey.get_original("select", "select")
    host, port = base.removeprefix("http://").split(":")
    idle = []
    headers = {"Accept": "application/json", "Content-Type": "application/json", "User-Agent": "bench"}

    def request(path, body):
        conn = None
        while idle:
            candidate = idle.pop()
            if not original_select([candidate.sock], [], [], 0)[0]:
                conn = candidate
                break
            candidate.close()
        if conn is None:
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        idle.append(conn)
        return response.status, data

    def pair():
        status, data = request("/v1/packs/Bench/actions/take", b"null")
        assert status == 200 and data
        status, _ = request(f"/v1/packs/Bench/actions/{AID}/result", RESULT_BODY)
        assert status == 202
    return pair


def _flyte_gevent_http(base):
    from flyte_gevent._http import HTTPPool

    pool = HTTPPool(timeout=10.0)
    headers = {"Accept": "application/json", "Content-Type": "application/json", "User-Agent": "bench"}
    take_url, result_url = f"{base}/v1/packs/Bench/actions/take", f"{base}/v1/packs/Bench/actions/{AID}/result"

    def pair():
        take = pool.request("POST", take_url, b"null", headers)
        assert take.status == 200 and take.body
        result = pool.request("POST", result_url, RESULT_BODY, headers)
        assert result.status == 202
    return pair


def _client(base):
    from flyte_gevent import Client

    client = Client(base, timeout=10.0)
    take_url = f"{base}/v1/packs/Bench/actions/take"

    def pair():
        action = client.take(take_url)
        client.post_result(action.result_url, RESULT_BODY)
    return pair


TRANSPORTS = {
    "requests": _requests,
    "http.client (0.1.0)": _http_client_0_1_0,
    "flyte_gevent._http": _flyte_gevent_http,
    "Client.take + post_result": _client,
}


def measure(pair, pairs):
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(pairs):
        pair()
    return (time.process_time() - cpu) / pairs, (time.perf_counter() - wall) / pairs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1000, help="take+result pairs per transport and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve()

    from gevent import monkey

    monkey.patch_all()
    sys.path.insert(0, ROOT)
    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        base = "http://" + server.stdout.readline().strip()
        pairs = {name: make(base) for name, make in TRANSPORTS.items()}
        for pair in pairs.values():  # connect, warm caches
            for _ in range(50):
                pair()
        samples = {name: [] for name in pairs}
        for _ in range(args.rounds):
            for name, pair in pairs.items():
                samples[name].append(measure(pair, args.pairs))
    finally:
        server.kill()
        server.wait()
    rows = {name: {"cpu_ms_per_pair": statistics.median(s[0] for s in runs) * 1000,
                   "wall_ms_per_pair": statistics.median(s[1] for s in runs) * 1000}
            for name, runs in samples.items()}
    if args.json:
        print(json.dumps({"pairs": args.pairs, "rounds": args.rounds, "python": sys.version.split()[0],
                          "transports": rows}, indent=2))
        return 0
    baseline = rows["http.client (0.1.0)"]["cpu_ms_per_pair"]
    print(f"take+result pairs over loopback: {args.pairs} per round, median of {args.rounds} rounds "
          f"(Python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")
    print(f"{'transport':<28} {'CPU ms/pair':>12} {'wall ms/pair':>13} {'CPU vs 0.1.0':>13}")
    for name, row in rows.items():
        print(f"{name:<28} {row['cpu_ms_per_pair']:>12.3f} {row['wall_ms_per_pair']:>13.3f} "
              f"{row['cpu_ms_per_pair'] / baseline:>12.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
