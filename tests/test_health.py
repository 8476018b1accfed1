"""Health: the Go-compatible JSON map, custom checks under a timeout, probes, and the pack's health server.

Everything is asked over real HTTP: a HealthServer on a free loopback port, or the
server a Pack starts with health_port=0.
"""

import functools
import logging
import socket
import time

import gevent
import gevent.event
import gevent.socket
import pytest
import requests
from gevent.pool import Group
from gevent.pywsgi import WSGIServer

import flyte_gevent.pack as pack_module
from flyte_gevent import Client, Command, ConfigError, Event, EventDef, Health, PackDef, flyte_api_health_check
from flyte_gevent.health import HealthApp, HealthServer, mount

DEFAULT_MAP = {"DefaultCheck": {"healthy": True, "status": "Pack is running."}}
JSON_TYPE = "application/json; charset=utf-8"

done = EventDef("Done")


class AlwaysUp:
    """The live/ready state a HealthApp reports, for tests about checks alone."""

    def live(self):
        return True, "alive"

    def ready(self):
        return True, "ready"


@pytest.fixture
def make_pack(make_pack):
    """The shared fixture, with a health server on a free loopback port: these tests talk to it."""
    return functools.partial(make_pack, health_port=0)


@pytest.fixture
def serve_checks():
    """Start a HealthServer for some checks on a free loopback port; returns its base URL."""
    servers = []

    def serve(checks, check_timeout=5.0):
        server = HealthServer(HealthApp(AlwaysUp(), checks, check_timeout), "127.0.0.1", 0)
        server.start()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield serve
    for server in servers:
        server.stop()


def get(url, method="GET"):
    # No keep-alive: an idle connection left open would hold up the health server's stop by its 0.2 s timeout.
    return requests.request(method, url, timeout=5, headers={"Connection": "close"})


def healthy_check(name, status="ok"):
    def check():
        return name, Health(True, status)
    return check


# --- the health server of a pack --------------------------------------------------------------------------------


def test_health_port_zero_binds_a_free_port_and_serves_the_default_check(make_pack):
    pack = make_pack(PackDef("Quiet"))
    assert pack.health_port is None  # nothing bound before start
    pack.start()
    assert isinstance(pack.health_port, int) and pack.health_port > 0

    response = get(f"http://127.0.0.1:{pack.health_port}/")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == JSON_TYPE
    assert response.json() == DEFAULT_MAP


def test_health_port_none_runs_no_server(make_pack):
    pack = make_pack(PackDef("Quiet"), health_port=None)
    pack.start()
    assert pack.registered
    assert pack.health_port is None


def test_every_path_and_method_gets_the_go_map_except_the_probes_and_metrics(make_pack):
    pack = make_pack(PackDef("Quiet"))
    pack.start()
    base = f"http://127.0.0.1:{pack.health_port}"

    for method, path in [("GET", "/"), ("GET", "/healthz"), ("GET", "/anything/at/all?x=1"), ("POST", "/"),
                         ("PUT", "/healthz")]:
        response = get(base + path, method)
        assert (response.status_code, response.json()) == (200, DEFAULT_MAP), (method, path)
        assert response.headers["Content-Type"] == JSON_TYPE

    assert get(base + "/livez").json() == {"status": "ok", "reason": "alive"}
    assert get(base + "/readyz").json() == {"status": "ok", "reason": "ready"}
    metrics = get(base + "/metrics")
    assert not metrics.headers["Content-Type"].startswith("application/json")
    assert "DefaultCheck" not in metrics.text


# --- custom checks ------------------------------------------------------------------------------------------------


def test_all_checks_healthy_answers_200_with_each_check(serve_checks):
    base = serve_checks([healthy_check("Database", "connected"), healthy_check("Cache", {"hits": 3})])
    response = get(base + "/healthz")
    assert response.status_code == 200
    assert response.json() == {"Cache": {"healthy": True, "status": {"hits": 3}},
                               "Database": {"healthy": True, "status": "connected"}}


def test_one_unhealthy_check_answers_500_and_still_reports_every_check_in_sorted_order(serve_checks):
    def disk():
        return "disk", Health(False, "disk full")

    base = serve_checks([healthy_check("zeta"), disk, healthy_check("Alpha")])
    response = get(base + "/")
    assert response.status_code == 500
    assert response.headers["Content-Type"] == JSON_TYPE
    document = response.json()
    assert document == {"Alpha": {"healthy": True, "status": "ok"},
                        "disk": {"healthy": False, "status": "disk full"},
                        "zeta": {"healthy": True, "status": "ok"}}
    assert list(document) == sorted(document)  # the order in the body itself


def test_a_check_that_raises_is_unhealthy_under_its_name_and_the_others_are_still_reported(serve_checks):
    def broken_check():
        raise ValueError("msg")

    base = serve_checks([healthy_check("Database"), broken_check])
    response = get(base + "/")
    assert response.status_code == 500
    assert response.json() == {"Database": {"healthy": True, "status": "ok"},
                               "broken_check": {"healthy": False, "status": "ValueError: msg"}}


def test_a_check_that_hangs_is_unhealthy_after_the_check_timeout(serve_checks):
    def hanging_check():
        gevent.sleep(30)
        return "hanging_check", Health(True, "never")

    base = serve_checks([hanging_check, healthy_check("Database")], check_timeout=0.3)
    started = time.monotonic()
    response = get(base + "/")
    elapsed = time.monotonic() - started
    assert response.status_code == 500
    assert response.json() == {"Database": {"healthy": True, "status": "ok"},
                               "hanging_check": {"healthy": False,
                                                 "status": "health check timed out after 0.3 s"}}
    assert 0.25 < elapsed < 1.5


def test_a_check_returning_garbage_is_unhealthy_with_a_clear_status(serve_checks):
    def sloppy_check():
        return "ok"

    def half_check():
        return "half", True

    base = serve_checks([sloppy_check, half_check])
    response = get(base + "/")
    assert response.status_code == 500
    document = response.json()
    assert document == {
        "half_check": {"healthy": False, "status": "check returned tuple, expected (name, Health)"},
        "sloppy_check": {"healthy": False, "status": "check returned str, expected (name, Health)"},
    }


# --- the Flyte API check --------------------------------------------------------------------------------------------


def test_flyte_api_health_check_reports_what_the_api_says(flyte_api, make_pack):
    client = Client(flyte_api.url, timeout=2.0)
    pack = make_pack(PackDef("Quiet"), health_checks=[flyte_api_health_check(client)])
    pack.start()
    url = f"http://127.0.0.1:{pack.health_port}/"

    response = get(url)
    assert response.status_code == 200
    assert response.json()["FlyteApi"]["healthy"] is True

    flyte_api.fail("health", 500, times=None)
    response = get(url)
    assert response.status_code == 500  # Go's check said healthy whatever the API answered
    assert response.json()["FlyteApi"]["healthy"] is False
    assert "500" in response.json()["FlyteApi"]["status"]

    flyte_api.clear_faults()
    assert get(url).status_code == 200

    flyte_api.outage()
    response = get(url)
    assert response.status_code == 500
    assert response.json()["FlyteApi"]["healthy"] is False
    assert list(response.json()) == ["FlyteApi"]


# --- probes ---------------------------------------------------------------------------------------------------------


def test_readyz_follows_registration_and_shutdown_while_livez_stays_up(flyte_api, make_pack, monkeypatch):
    monkeypatch.setattr(pack_module, "_REGISTER_BACKOFF", (0.1, 0.2))
    release = gevent.event.Event()

    def blocked(input):
        release.wait(5)
        return Event(done, input)

    pack = make_pack(PackDef("Worker", commands=[Command("Block", blocked, [done])]))
    flyte_api.outage()
    starter = gevent.spawn(pack.start)
    try:
        # Registering against an API that is down: alive, not ready.
        deadline = time.monotonic() + 3
        while pack.health_port is None and time.monotonic() < deadline:
            gevent.sleep(0.01)
        base = f"http://127.0.0.1:{pack.health_port}"
        gevent.sleep(0.3)  # a few failed attempts
        assert not pack.registered
        readyz = get(base + "/readyz")
        assert readyz.status_code == 503
        assert readyz.json()["status"] == "unavailable"
        assert get(base + "/livez").status_code == 200

        flyte_api.restore()
        starter.join(timeout=3)
        assert starter.successful() and pack.registered
        assert get(base + "/readyz").status_code == 200
    finally:
        starter.kill()

    # Shutting down while a handler still runs: not ready, still alive.
    action_id = flyte_api.enqueue("Worker", "Block", "draining")
    deadline = time.monotonic() + 3
    while flyte_api.action(action_id).state != "PENDING" and time.monotonic() < deadline:
        gevent.sleep(0.01)
    stopper = gevent.spawn(pack.stop, grace_period=5)
    gevent.sleep(0.1)
    assert not stopper.dead  # still draining
    readyz = get(base + "/readyz")
    assert (readyz.status_code, readyz.json()) == (503, {"status": "unavailable", "reason": "shutting down"})
    assert get(base + "/livez").status_code == 200

    release.set()
    stopper.join(timeout=3)
    assert stopper.dead
    assert flyte_api.wait_for_result(action_id, timeout=0).payload == "draining"


# --- mounting ---------------------------------------------------------------------------------------------------------


def test_mount_serves_the_health_app_under_a_prefix_inside_another_wsgi_app(make_pack):
    pack = make_pack(PackDef("Quiet"), health_port=None)
    pack.start()

    def application(environ, start_response):
        body = f"app saw {environ['PATH_INFO']}".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    server = WSGIServer(("127.0.0.1", 0), mount(application, pack.health_app, prefix="/flyte"), log=None)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        assert get(base + "/flyte/readyz").json() == {"status": "ok", "reason": "ready"}
        assert get(base + "/flyte/livez").status_code == 200
        assert get(base + "/flyte/healthz").json() == DEFAULT_MAP
        assert get(base + "/flyte").json() == DEFAULT_MAP
        assert get(base + "/orders/7").text == "app saw /orders/7"
        assert get(base + "/flytex").text == "app saw /flytex"  # a prefix match only on a path boundary
    finally:
        server.stop(timeout=1)


# --- duplicate check names ------------------------------------------------------------------------------------------


def test_concurrent_requests_share_one_run_of_the_checks(serve_checks):
    # A flood of GET / must not become a flood of calls to whatever the checks ask (the Flyte API, a database).
    calls = []

    def slow_database():
        calls.append(1)
        gevent.sleep(0.3)
        return "Database", Health(True, f"run {len(calls)}")

    base = serve_checks([slow_database])
    answers = Group().map(lambda _: get(base + "/"), range(20))
    assert [response.status_code for response in answers] == [200] * 20
    assert len(calls) == 1
    assert {response.json()["Database"]["status"] for response in answers} == {"run 1"}
    assert get(base + "/").json()["Database"]["status"] == "run 2"  # a later request runs them afresh


def test_checks_sharing_a_name_are_all_reported_under_numbered_keys_with_one_warning(serve_checks, caplog):
    def replica_db():
        return "Database", Health(False, "replica down")

    base = serve_checks([healthy_check("Database", "primary up"), replica_db, healthy_check("Cache"),
                         healthy_check("Database", "third")])
    with caplog.at_level(logging.WARNING, logger="flyte_gevent.health"):
        first, second = get(base + "/"), get(base + "/")
    assert first.status_code == second.status_code == 500  # the unhealthy one is not overwritten by a healthy one
    assert first.json() == second.json() == {
        "Cache": {"healthy": True, "status": "ok"},
        "Database": {"healthy": True, "status": "primary up"},
        "Database#2": {"healthy": False, "status": "replica down"},
        "Database#3": {"healthy": True, "status": "third"},
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # once per name, not once per probe
    assert "'Database'" in warnings[0] and "Database#2" in warnings[0]


def test_the_same_check_listed_twice_is_a_configuration_error(make_pack):
    check = healthy_check("Database")
    with pytest.raises(ConfigError, match="health_checks: the health check 'check' is listed twice"):
        make_pack(PackDef("Quiet"), health_checks=[check, healthy_check("Cache"), check])


# --- the health port: configuration errors --------------------------------------------------------------------------


def test_a_health_port_in_use_is_a_configuration_error_naming_the_setting_and_the_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HealthServer(HealthApp(AlwaysUp()), "127.0.0.1", port)
        with pytest.raises(ConfigError) as error:
            server.start()
    assert error.value.name == "FLYTE_HEALTH_PORT"
    assert str(error.value) == (f"health port {port} on 127.0.0.1 is already in use: set FLYTE_HEALTH_PORT, "
                                "--health-port or health_port to a free port (0 picks one, 'off' runs no server)")
    assert server.port is None


def test_a_health_host_that_is_not_an_address_here_is_a_configuration_error_naming_the_setting():
    server = HealthServer(HealthApp(AlwaysUp()), "192.0.2.1", 0)  # TEST-NET-1: never an address of this machine
    with pytest.raises(ConfigError) as error:
        server.start()
    assert error.value.name == "FLYTE_GEVENT_HEALTH_HOST"
    assert "192.0.2.1" in str(error.value)
    assert "FLYTE_GEVENT_HEALTH_HOST, --health-host or health_host" in str(error.value)


# --- the health port: hostile and broken clients --------------------------------------------------------------------


@pytest.fixture
def health_server():
    """``health_server(**limits)``: a HealthServer for AlwaysUp on a free loopback port; stopped after the test."""
    servers = []

    def start(**limits):
        server = HealthServer(HealthApp(AlwaysUp()), "127.0.0.1", 0, **limits)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def connect():
    """``connect(port, n=1)``: *n* raw TCP connections to the health server (all closed after the test)."""
    opened = []

    def open_connections(port, n=1):
        def one():
            try:
                return gevent.socket.create_connection(("127.0.0.1", port), timeout=3)
            except OSError:
                return None

        group = Group()
        greenlets = [group.spawn(one) for _ in range(n)]
        group.join(timeout=5)
        group.kill()
        sockets = [g.value for g in greenlets if g.value is not None]
        opened.extend(sockets)
        assert len(sockets) == n, f"only {len(sockets)} of {n} connections were accepted"
        return sockets

    yield open_connections
    for sock in opened:
        sock.close()


def ended_by_server(sock, timeout):
    """Read *sock* until the server ends the connection; ``(ended, everything read)``; False if still open."""
    received = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return True, received
        if not data:
            return True, received
        received += data
    return False, received


def still_open(sock):
    ended, _ = ended_by_server(sock, 0.02)
    return not ended


def probe(port, path="/livez"):
    """A probe as the kubelet sends it, given one second to answer."""
    return requests.get(f"http://127.0.0.1:{port}{path}", timeout=1, headers={"Connection": "close"})


def test_probes_answer_within_a_second_with_hundreds_of_idle_and_dribbling_connections_open(health_server, connect,
                                                                                             capfd):
    server = health_server()  # default limits: 256 connections
    dribblers = connect(server.port, 30)
    for sock in dribblers:  # each has begun a request, and never sends the rest
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: dribbler\r\n")
    gevent.sleep(0.05)  # the server has read what they sent
    flood = dribblers + connect(server.port, 300)  # past the limit: the oldest are closed to make room

    for path in ("/livez", "/readyz", "/livez"):
        response = probe(server.port, path)
        assert response.status_code == 200, path
    assert response.json() == {"status": "ok", "reason": "alive"}
    assert any(still_open(sock) for sock in flood)  # the flood is still there: the probes got in beside it
    assert "Traceback" not in capfd.readouterr().err  # the connections closed to make room end quietly


def test_idle_and_slow_connections_are_closed_after_the_request_timeout(health_server, connect):
    server = health_server(request_timeout=0.3)
    silent, dribbler, partial, keep_alive = connect(server.port, 4)
    partial.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")  # headers begun, never finished
    keep_alive.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")  # answered, then left idle

    def dribble():  # one byte every 50 ms: each read is quick, the request never completes
        try:
            for _ in range(100):
                dribbler.sendall(b"G")
                gevent.sleep(0.05)
        except OSError:
            pass

    dribbling = gevent.spawn(dribble)
    try:
        results = {name: ended_by_server(sock, 3) for name, sock in
                   [("silent", silent), ("dribbler", dribbler), ("partial", partial), ("keep_alive", keep_alive)]}
    finally:
        dribbling.kill()
    assert {name: ended for name, (ended, _) in results.items()} == dict.fromkeys(results, True)
    assert results["silent"][1] == b""
    assert results["partial"][1].startswith(b"HTTP/1.1 408 ")
    answer, _, rest = results["keep_alive"][1].partition(b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"alive"' in rest
    assert probe(server.port).status_code == 200


def test_a_body_that_never_arrives_is_answered_then_the_connection_is_closed(health_server, connect):
    server = health_server(request_timeout=0.3)
    (sock,) = connect(server.port)
    sock.sendall(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nthe start of it")
    ended, received = ended_by_server(sock, 3)
    assert ended
    assert received.startswith(b"HTTP/1.1 200 ") and b"DefaultCheck" in received


def test_a_request_head_over_the_limit_is_refused_without_a_traceback(health_server, connect, capfd):
    server = health_server()
    big, many = connect(server.port, 2)
    big.sendall(b"GET /livez HTTP/1.1\r\nX-Pad: " + b"a" * 10_000 + b"\r\n\r\n")
    many.sendall(b"GET /livez HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n")
    ended, received = ended_by_server(big, 3)
    assert ended and received.startswith(b"HTTP/1.1 431 ")
    ended, received = ended_by_server(many, 3)
    assert ended and received.startswith(b"HTTP/1.1 400 ")
    assert probe(server.port).status_code == 200
    assert "Traceback" not in capfd.readouterr().err


def test_past_the_connection_limit_the_longest_waiting_connection_makes_room_for_a_probe(health_server, connect):
    server = health_server(max_connections=10, request_timeout=30)
    idle = [connect(server.port)[0] for _ in range(10)]  # one by one: the server sees them in this order
    newer = [connect(server.port)[0] for _ in range(3)]  # each pushes out the oldest
    assert probe(server.port).status_code == 200          # and so does the probe
    assert [still_open(sock) for sock in idle] == [False] * 4 + [True] * 6
    assert all(still_open(sock) for sock in newer)
    assert probe(server.port).status_code == 200


def test_a_client_that_stops_reading_is_cut_off_after_the_request_timeout(capfd):
    status = "x" * 16_000_000  # far more than the socket buffers hold

    def huge():
        return "Huge", Health(True, status)

    server = HealthServer(HealthApp(AlwaysUp(), [huge]), "127.0.0.1", 0, request_timeout=0.3)
    server.start()
    try:
        sock = gevent.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(3)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        gevent.sleep(0.8)  # not reading: the server's send stalls past its 0.3 s
        ended, received = ended_by_server(sock, 5)
        sock.close()
    finally:
        server.stop()
    assert ended
    assert received.startswith(b"HTTP/1.1 200 ") and len(received) < len(status)  # the server gave up sending
    assert "Traceback" not in capfd.readouterr().err
