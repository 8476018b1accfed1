"""The benchmark keeps working, and its loopback API speaks correct HTTP with the Flyte server's semantics.

``bench/run.py --quick`` runs every scenario end to end (with the Go client beside ours when its bench pack is
found above the repository, as ``make bench`` does). No speed is asserted, only that every queued action is
taken, run and completed, that the tables are printed and that the JSON report is complete.

``bench/loopback_api.py`` is the server both clients run against in the benchmark; it is checked here over raw
sockets: keep-alive, pipelining, ``Connection: close``, HTTP/1.0, chunked and ``100-continue`` bodies,
unreadable requests, and the take/result/registration answers a pack relies on.

``bench/run.py --server real --quick`` runs the real-server scenarios end to end when the Flyte server binary is
found (``FLYTE_GEVENT_REAL_SERVER``, or ``shared/peers/flyte-server`` above the repository), and
``bench/delay_proxy.py``, which stands between the packs and that server, is checked over raw sockets: it holds
each request, passes every byte through and counts the answers by route.
"""

import json
import os
import socket
import subprocess
import sys
import time

import gevent
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "bench", "run.py")
SERVER = os.path.join(ROOT, "bench", "loopback_api.py")
PROXY = os.path.join(ROOT, "bench", "delay_proxy.py")
SCENARIOS = ["fast", "rtt20", "io1s", "io1s_rtt20", "memory", "idle"]
REAL_SCENARIOS = ["real", "real_rtt20", "real_replicas"]


def real_server_binary():
    """The Flyte server binary the bench would use, or None: what ``bench/real_server.find_server()`` finds."""
    bench = os.path.join(ROOT, "bench")
    if bench not in sys.path:
        sys.path.append(bench)  # the bench's own modules import each other by name
    import real_server  # only when a test asks: it imports the bench's harness
    return real_server.find_server()


def _run_bench(args, env, timeout):
    process = subprocess.Popen([sys.executable, RUN] + args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, stdout.decode(), stderr.decode()


def test_quick_bench_completes_every_scenario_for_every_client_and_writes_the_tables_and_json(tmp_path,
                                                                                            subprocess_env):
    output = tmp_path / "latest.json"
    status, stdout, stderr = _run_bench(["--quick", "--output", str(output)], subprocess_env, timeout=50)
    assert status == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"

    report = json.loads(output.read_text())
    assert report["quick"] is True
    clients = ["ours"] + (["go"] if report["go_peer"] else [])
    assert [entry["scenario"] for entry in report["scenarios"]] == SCENARIOS
    for entry in report["scenarios"]:
        for client in clients:
            result = entry[client]
            assert "error" not in result, (entry["scenario"], client, result)
            if entry["scenario"] == "idle":
                assert 0 <= result["cpu_percent"] < 100
                continue
            # Every queued action was taken, run and completed without a FATAL result.
            assert result["actions"] == entry["count"] and result["fatal"] == 0, (entry["scenario"], client)
            assert result["actions_per_s"] > 0 and result["cpu_ms_per_action"] >= 0
            assert result["server"]["requests"] >= 2 * result["actions"]
    memory = next(entry for entry in report["scenarios"] if entry["scenario"] == "memory")
    for client in clients:
        assert memory[client]["held_rss_kb"] > 0 and "kb_per_action" in memory[client]
    rows = {row["key"]: row for row in report["rows"]}
    assert list(rows) == ["cpu", "fast", "rtt20", "io1s", "io1s_rtt20", "memory", "idle"]
    assert rows["fast"]["ours"] > 0
    if "go" in clients:
        assert rows["fast"]["ratio"] == pytest.approx(rows["fast"]["ours"] / rows["fast"]["go"])

    lines = stdout.splitlines()
    for row in rows.values():
        assert any(line.startswith(row["title"]) for line in lines), f"no row {row['title']!r}:\n{stdout}"
    for name in SCENARIOS:
        assert any(line.startswith(name + " ") for line in lines), f"no run of {name}:\n{stdout}"
    assert "Loopback API" in stdout and "Machine:" in stdout


def test_quick_real_server_bench_completes_every_scenario_and_reports_races_cpu_and_replica_shares(
        tmp_path, subprocess_env):
    binary = real_server_binary()
    if binary is None:
        pytest.skip("no Flyte server binary: set FLYTE_GEVENT_REAL_SERVER, or put it in "
                    "shared/peers/flyte-server/ above the repository")
    output = tmp_path / "real.json"
    status, stdout, stderr = _run_bench(["--server", "real", "--flyte-server", binary, "--quick", "--output",
                                         str(output)], subprocess_env, timeout=60)
    assert status == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    report = json.loads(output.read_text())
    assert [entry["scenario"] for entry in report["scenarios"]] == REAL_SCENARIOS
    for entry in report["scenarios"]:
        clients = ["ours"] + (["go"] if report["go_peer"] and entry["replicas"] == 1 else [])
        for client in clients:
            result = entry[client]
            assert "error" not in result, (entry["scenario"], client, result)
            # Every action created on the server was taken and got exactly one result.
            assert result["actions"] == entry["count"] and result["fatal"] == 0, (entry["scenario"], client)
            assert result["results_per_action"] == {"min": 1, "max": 1}, (entry["scenario"], client)
            assert result["lost_races"] >= 0 and result["real_server"]["cpu_ms_per_action"] >= 0
    replicas = report["scenarios"][-1]["ours"]
    assert len(replicas["replica_takes"]) == 2 and sum(replicas["replica_takes"]) == replicas["actions"]
    rows = {row["key"] for row in report["rows"]}
    assert {"real", "real_rtt20", "real_lost", "real_replicas_share", "real_replicas_once"} <= rows
    assert "lost races per action" in stdout and "takes per replica" in stdout


def test_turnaround_probe_drains_the_real_server_with_every_taker_each_action_once(tmp_path, subprocess_env):
    binary = real_server_binary()
    if binary is None:
        pytest.skip("no Flyte server binary: set FLYTE_GEVENT_REAL_SERVER, or put it in "
                    "shared/peers/flyte-server/ above the repository")
    output = tmp_path / "probe.json"
    process = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "turnaround_probe.py"), "--server", binary,
                              "--rounds", "1", "--actions", "20", "--go-peer", "none", "--log-dir", str(tmp_path),
                              "--json", str(output)], cwd=ROOT, env=subprocess_env, stdin=subprocess.DEVNULL,
                             capture_output=True, timeout=120)
    assert process.returncode == 0, process.stderr.decode()
    runs = {run["client"]: run for run in json.loads(output.read_text())["runs"]}
    assert set(runs) == {"raw", "raw+hold", "pipelined+hold", "ours"}
    assert all(run["results"] == [1, 1] and run["per_second"] > 0 for run in runs.values()), runs
    # One connection's takes, pipelined or not, are served one after another: none can lose a race.
    assert [runs[client]["lost"] for client in ("raw", "raw+hold", "pipelined+hold")] == [0, 0, 0]


def test_bench_refuses_a_go_peer_that_is_not_an_executable_file(tmp_path, subprocess_env):
    status, _stdout, stderr = _run_bench(["--go-peer", str(tmp_path / "missing"), "--quick"], subprocess_env,
                                        timeout=20)
    assert status == 2
    assert f"--go-peer: {tmp_path / 'missing'} is not an executable file" in stderr


# --- the loopback API ----------------------------------------------------------------------------------------

class LoopbackApi:
    """``bench/loopback_api.py`` as a child process: its control pipe, and raw HTTP connections to it."""

    def __init__(self, log_path):
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen([sys.executable, SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log)
        self.port = self.message(lambda m: m.get("event") == "listening")["port"]
        self.batches = 0

    def control(self, message):
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        self.process.stdin.flush()

    def message(self, wanted):
        """The next control message for which *wanted* is true, skipping the others."""
        with gevent.Timeout(5, AssertionError("no such message from the loopback API within 5 s")):
            while True:
                message = json.loads(self.process.stdout.readline())
                if wanted(message):
                    return message

    def queue(self, pack_name, command, inputs, at_next_take=False):
        """Queue a batch; unless *at_next_take*, return once the server says it is queued."""
        self.batches += 1
        batch = self.batches
        self.control({"op": "queue", "batch": batch, "pack_name": pack_name, "command": command,
                      "inputs": inputs, "at_next_take": at_next_take})
        wanted = "armed" if at_next_take else "started"
        self.message(lambda m: m.get("event") == wanted and m["batch"] == batch)
        return batch

    def connect(self):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        return sock, sock.makefile("rb")

    def register(self, sock, reader, name, labels=None):
        body = json.dumps({"name": name, "labels": labels or {}, "commands": [{"name": "Noop", "events": ["Done"]}],
                           "events": [{"name": "Done"}]}).encode()
        sock.sendall(post("/v1/packs", body, host=f"127.0.0.1:{self.port}"))
        status, _headers, document = read_response(reader)
        assert status == 201, status
        return json.loads(document)

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=5)
        self.process.stdout.close()
        self.log.close()


def post(path, body=b"", host="api.test:8080", extra=b""):
    return (b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path.encode(), host.encode(), len(body), extra, body))


def get(path, host="api.test:8080", version=b"HTTP/1.1", extra=b""):
    return b"GET %s %s\r\nHost: %s\r\n%s\r\n" % (path.encode(), version, host.encode(), extra)


def read_response(reader):
    """``(status, headers, body)`` of the next response; headers lower-cased, body by Content-Length."""
    status_line = reader.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    status = int(status_line.split()[1])
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if status == 204 or status < 200:
        assert "content-length" not in headers or status < 200, headers
        return status, headers, b""
    body = reader.read(int(headers["content-length"]))
    return status, headers, body


def at_eof(reader):
    return reader.read(1) == b""


@pytest.fixture(scope="module")
def loopback_api(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("loopback_api") / "stderr.log"
    api = LoopbackApi(log_path)
    yield api
    api.close()
    # The server reports its own bugs on stderr (and answers 500): there must be none.
    assert log_path.read_text() == ""


def test_loopback_api_keeps_the_connection_alive_and_answers_pipelined_requests_in_order(loopback_api):
    sock, reader = loopback_api.connect()
    with sock, reader:
        sock.sendall(get("/v1") + get("/health") + post("/v1/packs", b'{"name": "Pipelined"}') + get("/nowhere"))
        status, headers, body = read_response(reader)
        assert status == 200 and headers["content-type"] == "application/json; charset=utf-8"
        links = {link["rel"]: link["href"] for link in json.loads(body)["links"]}
        assert links["http://api.test:8080/swagger#!/pack/listPacks"] == "http://api.test:8080/v1/packs"
        assert read_response(reader)[0] == 200
        status, headers, body = read_response(reader)
        assert status == 201 and headers["location"] == "http://api.test:8080/v1/packs/Pipelined"
        assert read_response(reader)[:1] == (404,)
        sock.sendall(get("/health"))  # still open
        assert read_response(reader)[0] == 200


def test_loopback_api_closes_after_connection_close_and_after_an_http_1_0_request(loopback_api):
    for request in (get("/health", extra=b"Connection: close\r\n"), get("/health", version=b"HTTP/1.0")):
        sock, reader = loopback_api.connect()
        with sock, reader:
            sock.sendall(request)
            status, headers, _ = read_response(reader)
            assert status == 200 and headers["connection"] == "close"
            assert at_eof(reader)


def test_loopback_api_reads_chunked_bodies_and_answers_expect_100_continue(loopback_api):
    sock, reader = loopback_api.connect()
    with sock, reader:
        body = b'{"name": "Chunked"}'
        chunks = b"5;ext=1\r\n" + body[:5] + b"\r\n%x\r\n" % (len(body) - 5) + body[5:] + b"\r\n0\r\nX-T: 1\r\n\r\n"
        sock.sendall(b"POST /v1/packs HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
        status, _headers, document = read_response(reader)
        assert status == 201 and json.loads(document)["id"] == "Chunked"

        body = b'{"name": "Continued"}'
        sock.sendall(b"POST /v1/packs HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
                     % len(body))
        assert read_response(reader)[0] == 100
        sock.sendall(body)
        status, _headers, document = read_response(reader)
        assert status == 201 and json.loads(document)["id"] == "Continued"


@pytest.mark.parametrize("request_bytes, status", [
    (b"NONSENSE\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
    (b"POST /v1/packs HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}", 400),
    (b"POST /v1/packs HTTP/1.1\r\nHost: h\r\nContent-Length: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400),
])
def test_loopback_api_answers_an_unreadable_request_with_an_error_and_closes(loopback_api, request_bytes, status):
    sock, reader = loopback_api.connect()
    with sock, reader:
        sock.sendall(request_bytes)
        got, headers, _ = read_response(reader)
        assert (got, headers["connection"]) == (status, "close")
        assert at_eof(reader)


def test_loopback_api_takes_and_completes_actions_like_the_flyte_server(loopback_api):
    api = loopback_api
    sock, reader = api.connect()
    with sock, reader:
        document = api.register(sock, reader, "Taker", {"env": "dev"})
        assert document["id"] == "Taker.env.dev"
        links = {link["rel"]: link["href"] for link in document["links"]}
        base = f"http://127.0.0.1:{api.port}/"
        take = links[base + "swagger#!/action/takeAction"]
        assert take == base + "v1/packs/Taker.env.dev/actions/take"
        assert links[base + "swagger#/event"] == base + "v1/packs/Taker.env.dev/events"
        path = take[len(base) - 1:]
        host = f"127.0.0.1:{api.port}"

        batch = api.queue("Taker", "Noop", [{"n": 1}, "two"])
        results = []
        for expected in ({"n": 1}, "two"):
            sock.sendall(post(path, b"null", host=host))
            status, _headers, body = read_response(reader)
            assert status == 200
            action = json.loads(body)
            assert (action["command"], action["input"]) == ("Noop", expected)
            [link] = action["links"]
            assert link["rel"] == base + "swagger#/actionResult"
            assert link["href"].startswith(base + "v1/packs/Taker.env.dev/actions/")
            results.append(link["href"][len(base) - 1:])
        sock.sendall(post(path, host=host))
        assert read_response(reader)[0] == 204  # and no Content-Length (read_response checks)
        api.message(lambda m: m.get("event") == "all_taken" and m["batch"] == batch)

        done = b'{"event":"Done","payload":null,"createdAt":"2026-01-02T03:04:05.123456789Z"}'
        sock.sendall(post(results[0], b'{"event":"Done","createdAt":"2026-01-02T03:04:05"}', host=host))
        assert read_response(reader)[0] == 400  # a createdAt without a zone
        sock.sendall(post(results[0], done, host=host))
        assert read_response(reader)[0] == 202
        sock.sendall(post(results[0], done, host=host))
        assert read_response(reader)[0] == 500  # not PENDING any more
        unknown = results[0].rsplit("/", 2)[0] + "/000000000000000000000000/result"
        sock.sendall(post(unknown, done, host=host))
        assert read_response(reader)[0] == 404
        sock.sendall(post("/v1/packs/Nobody/actions/take", host=host))
        assert read_response(reader)[0] == 404
        sock.sendall(post(results[1], b'{"event":"FATAL","payload":"no"}', host=host))
        assert read_response(reader)[0] == 202

    report = api.message(lambda m: m.get("event") == "done" and m["batch"] == batch)
    assert report["actions"]["fatal"] == 1
    created, taken, completed = (report["actions"][key] for key in ("created", "taken", "completed"))
    assert all(c <= t <= d for c, t, d in zip(created, taken, completed))
    assert report["window"]["requests"] >= 4


def test_loopback_api_queues_a_batch_when_the_next_take_arrives(loopback_api):
    api = loopback_api
    sock, reader = api.connect()
    with sock, reader:
        api.register(sock, reader, "Armed")
        batch = api.queue("Armed", "Noop", [1], at_next_take=True)
        sock.sendall(post("/v1/packs/Armed/actions/take"))
        status, _, body = read_response(reader)
        assert status == 200 and json.loads(body)["input"] == 1
        api.message(lambda m: m.get("event") == "started" and m["batch"] == batch)


def test_loopback_api_drops_the_connection_on_a_result_from_a_pack_that_cannot_have_taken_it(loopback_api):
    api = loopback_api
    sock, reader = api.connect()
    with sock, reader:
        api.register(sock, reader, "Owner")
        api.register(sock, reader, "Stranger")
        api.queue("Owner", "Noop", [None])
        sock.sendall(post("/v1/packs/Owner/actions/take"))
        href = json.loads(read_response(reader)[2])["links"][0]["href"]
        action_id = href.rsplit("/", 2)[1]
        sock.sendall(post(f"/v1/packs/Stranger/actions/{action_id}/result", b'{"event":"Done"}'))
        assert at_eof(reader)  # no response at all, as from the Flyte server


def test_loopback_api_with_latency_still_answers_one_connections_requests_in_order(loopback_api):
    api = loopback_api
    api.control({"op": "latency", "seconds": 0.05})
    api.message(lambda m: m.get("reply") == "latency")
    try:
        sock, reader = api.connect()
        with sock, reader:
            sock.sendall(get("/v1") + get("/nowhere") + get("/health"))
            assert [read_response(reader)[0] for _ in range(3)] == [200, 404, 200]
    finally:
        api.control({"op": "latency", "seconds": 0})
        api.message(lambda m: m.get("reply") == "latency")


# --- the delay proxy -----------------------------------------------------------------------------------------

class DelayProxy:
    """``bench/delay_proxy.py`` as a child process in front of *port*, and its control pipe."""

    def __init__(self, port, delay, log_path):
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen([sys.executable, PROXY, "--upstream", f"127.0.0.1:{port}", "--delay",
                                         str(delay)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self.port = self.reply("listening")["port"]

    def reply(self, wanted, message=None):
        if message is not None:
            self.process.stdin.write(json.dumps(message).encode() + b"\n")
            self.process.stdin.flush()
        with gevent.Timeout(5, AssertionError(f"no {wanted!r} from the delay proxy within 5 s")):
            while True:
                answer = json.loads(self.process.stdout.readline())
                if wanted in (answer.get("reply"), answer.get("event")):
                    return answer

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=5)
        self.process.stdout.close()
        self.log.close()


def test_delay_proxy_holds_each_request_passes_answers_through_and_counts_them_by_route(loopback_api, tmp_path):
    api = loopback_api
    proxy = DelayProxy(api.port, 0.05, tmp_path / "proxy.log")
    try:
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        reader = sock.makefile("rb")
        with sock, reader:
            body = json.dumps({"name": "Proxied", "commands": [{"name": "Noop", "events": ["Done"]}]}).encode()
            started = time.monotonic()
            sock.sendall(post("/v1/packs", body, host=f"127.0.0.1:{api.port}"))
            status, _, _ = read_response(reader)
            assert status == 201 and time.monotonic() - started >= 0.05
            api.queue("Proxied", "Noop", [1])
            # Pipelined, one of them chunked: the proxy follows both framings and pairs answers with requests.
            chunked = (b"POST /v1/packs/Proxied/actions/take HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                       b"\r\n4\r\nnull\r\n0\r\n\r\n")
            sock.sendall(post("/v1/packs/Proxied/actions/take") + chunked + get("/health"))
            status, _, document = read_response(reader)
            assert status == 200 and json.loads(document)["input"] == 1
            assert read_response(reader)[0] == 204
            assert read_response(reader)[0] == 200
        stats = proxy.reply("stats", {"op": "stats"})
        assert stats["statuses"] == {"register 201": 1, "take 200": 1, "take 204": 1, "other 200": 1}
        assert stats["connections_opened"] == 1
    finally:
        proxy.close()
    assert (tmp_path / "proxy.log").read_text() == ""
