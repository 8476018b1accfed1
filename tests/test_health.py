"""Health: the Go-compatible JSON map, custom checks under a timeout, probes, and the pack's health server.

Everything is asked over real HTTP: a HealthServer on a free loopback port, or the
server a Pack starts with health_port=0.
"""

import functools
import time

import gevent
import gevent.event
import pytest
import requests
from gevent.pywsgi import WSGIServer

import flyte_gevent.pack as pack_module
from flyte_gevent import Client, Command, Event, EventDef, Health, PackDef, flyte_api_health_check
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
    # No keep-alive: an idle connection left open would hold up the health server's stop by its 1 s timeout.
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
