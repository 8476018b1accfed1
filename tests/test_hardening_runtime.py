"""Hardening the runtime (issue 8): exactly one result, no hangs, no floods, under the faults a review found.

Each test reproduces one defect of the review against a real :class:`Pack` and the fake Flyte API over
loopback (or a stand-in server for answers the fake never gives), then checks what the server saw and what
was logged and counted. The item numbers are those of issue 8.
"""

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import gevent
import gevent.event
import pytest
import requests
from gevent.pywsgi import WSGIServer
from prometheus_client import CollectorRegistry

import flyte_gevent._delivery as delivery_module
import flyte_gevent.pack as pack_module
from flyte_gevent import Client, Command, Event, EventDef, Health, Pack, PackDef
from flyte_gevent._retry import Backoff
from helpers import wait_until

done = EventDef("Done")
tick = EventDef("Tick")
SHUTDOWN = "pack shutting down"


# --- helpers -------------------------------------------------------------------------------------------------


@pytest.fixture
def registry():
    return CollectorRegistry()


def metric(registry, name, **labels):
    return registry.get_sample_value(name, labels) or 0


def records(caplog, level, contains=""):
    return [r for r in caplog.records if r.levelno == level and r.name.startswith("flyte_gevent")
            and contains in r.getMessage()]


def result_statuses(api, action_id):
    return [r.status for r in api.requests_for("result") if f"/actions/{action_id}/" in r.path]


@pytest.fixture
def quick_result_retries(monkeypatch):
    """Result posts back off from 0.5 s; a tenth of that keeps the retry tests short."""
    monkeypatch.setattr(delivery_module, "_RESULT_BACKOFF", (0.05, 0.1))


class _NoLock:
    """A handler lock that does not serialize: None works on 3.11/3.12, but 3.13's handle() does `with self.lock`."""

    def acquire(self):
        return True

    def release(self):
        pass

    __enter__ = acquire

    def __exit__(self, *exc_info):
        self.release()


class SlowLogHandler(logging.Handler):
    """A log handler doing cooperative I/O (a socket or HTTP log shipper): emit() yields to other greenlets.

    It does not serialize its emits, so other greenlets keep logging (and stopping the pack) meanwhile.
    """

    def __init__(self, seconds, contains):
        super().__init__(logging.DEBUG)
        self.seconds, self.contains, self.emitted = seconds, contains, 0

    def createLock(self):  # noqa: N802 - overrides logging.Handler.createLock
        self.lock = _NoLock()

    def emit(self, record):
        if self.contains in record.getMessage():
            self.emitted += 1
            gevent.sleep(self.seconds)


class BrokenLogHandler(logging.Handler):
    """A log handler that raises instead of calling handleError(): a bug outside the library."""

    def __init__(self, contains):
        super().__init__(logging.DEBUG)
        self.contains = contains

    def emit(self, record):
        if self.contains in record.getMessage():
            raise RuntimeError("log shipper down")


@pytest.fixture
def log_handler():
    """``log_handler(handler)`` attaches *handler* to the library's loggers until the test ends."""
    attached = []
    logger = logging.getLogger("flyte_gevent")

    def attach(handler):
        logger.addHandler(handler)
        attached.append(handler)
        return handler

    yield attach
    for handler in attached:
        logger.removeHandler(handler)


def pack_def_with(*commands, name="Hardened"):
    return PackDef(name, commands=list(commands) + [Command("Echo", lambda input: Event(done, input), [done])],
                   event_defs=[tick])


# --- 1. nothing stops the result once the handler has returned or raised ---------------------------------------


def test_a_timeout_due_while_a_handler_failure_is_being_logged_does_not_strand_the_action(
        flyte_api, make_pack, log_handler):
    def fails_late(input):
        gevent.sleep(0.1)
        raise ValueError("boom")

    slow_log = log_handler(SlowLogHandler(0.4, "handler for command 'Late' failed"))
    make_pack(pack_def_with(Command("Late", fails_late, [done], timeout=0.2)), start=True)
    aid = flyte_api.enqueue("Hardened", "Late", None)
    # The 0.2 s timeout comes due while the failure is still being logged (0.1 + 0.4 s).
    result = flyte_api.wait_for_result(aid, timeout=3)
    assert (result.event, result.payload) == ("FATAL", "ValueError: boom")
    assert slow_log.emitted == 1
    assert flyte_api.action(aid).result_posts == 1
    next_one = flyte_api.enqueue("Hardened", "Echo", "next")
    assert flyte_api.wait_for_result(next_one, timeout=3).payload == "next"


def test_a_shutdown_arriving_while_a_handler_failure_is_being_logged_does_not_strand_the_action(
        flyte_api, make_pack, log_handler):
    gate = gevent.event.Event()

    def fails_on_signal(input):
        gate.wait(5)
        raise RuntimeError("boom")

    log_handler(SlowLogHandler(0.5, "handler for command 'Gated' failed"))
    pack = make_pack(pack_def_with(Command("Gated", fails_on_signal, [done])), start=True)
    aid = flyte_api.enqueue("Hardened", "Gated", None)
    wait_until(lambda: flyte_api.action(aid).state == "PENDING", what="the action taken")
    gate.set()
    gevent.sleep(0.1)  # the handler has raised; its failure is being logged
    stopper = gevent.spawn(pack.stop, grace_period=0)  # cancels handlers still running, at once
    stopper.join(timeout=5)
    assert stopper.dead
    action = flyte_api.action(aid)
    assert action.state == "FATAL", f"left {action.state}"
    assert action.result["payload"] == "RuntimeError: boom"  # its own outcome, not "pack shutting down"
    assert action.result_posts == 1


def test_an_unexpected_exception_after_the_handler_still_ends_in_one_fatal_result(
        flyte_api, make_pack, log_handler, registry):
    def fails(input):
        raise ValueError("boom")

    log_handler(BrokenLogHandler("handler for command 'Fails' failed"))
    pack = make_pack(pack_def_with(Command("Fails", fails, [done])), start=True, metrics=registry)
    aid = flyte_api.enqueue("Hardened", "Fails", None)
    result = flyte_api.wait_for_result(aid, timeout=3)
    assert result.event == "FATAL"
    assert "RuntimeError: log shipper down" in result.payload
    assert flyte_api.action(aid).result_posts == 1
    wait_until(lambda: metric(registry, "flyte_pack_actions_in_flight") == 0, 2, "the action's bookkeeping ended")
    next_one = flyte_api.enqueue("Hardened", "Echo", "next")
    assert flyte_api.wait_for_result(next_one, timeout=3).payload == "next"
    assert pack.live() == (True, "alive")


# --- 2. an ambiguous 500 after a gateway error is retried, and never dropped silently --------------------------


@pytest.mark.parametrize("gateway", [502, 504])
def test_a_result_answered_by_a_gateway_then_500_is_retried_until_it_lands(
        flyte_api, make_pack, registry, quick_result_retries, gateway):
    pack = make_pack(pack_def_with(), start=True, metrics=registry)
    flyte_api.fail("result", gateway)
    flyte_api.fail("result", 500)  # a database error, say: the action is still PENDING
    aid = flyte_api.enqueue("Hardened", "Echo", "x")
    assert flyte_api.wait_for_result(aid, timeout=3).payload == "x"
    assert result_statuses(flyte_api, aid) == [gateway, 500, 202]
    assert metric(registry, "flyte_pack_results_lost_total") == 0
    assert pack.registered


def test_a_result_whose_landing_cannot_be_confirmed_is_logged_at_error_and_counted_as_lost(
        flyte_api, make_pack, registry, caplog, quick_result_retries):
    make_pack(pack_def_with(), start=True, metrics=registry)
    flyte_api.fail("result", 502)
    flyte_api.fail("result", 500, times=None)
    aid = flyte_api.enqueue("Hardened", "Echo", "x")
    wait_until(lambda: metric(registry, "flyte_pack_results_lost_total") == 1, 3, "the result counted as lost")
    assert result_statuses(flyte_api, aid) == [502, 500, 500, 500]
    (line,) = records(caplog, logging.ERROR, aid)
    assert "cannot be confirmed" in line.getMessage()


# --- 3. a take still in flight when the flush ends gets its answer -----------------------------------------------


def test_a_take_in_flight_past_the_flush_deadline_gets_its_answer_and_its_action_a_result(flyte_api):
    client = Client(flyte_api.url, timeout=3.0)
    pack = Pack(pack_def_with(), client, health_port=None, polling_interval=0.5, grace_period=0, flush_timeout=0.2)
    pack.start(timeout=5)
    try:
        flyte_api.delay("take", 1.0)  # the next take is answered after a second, with the action queued now
        wait_until(lambda: any(r.status is None for r in flyte_api.requests_for("take")), 2, "a take in flight")
        aid = flyte_api.enqueue("Hardened", "Echo", "late")
        started = time.monotonic()
        pack.stop()
        elapsed = time.monotonic() - started
    finally:
        pack.stop(grace_period=0)
    action = flyte_api.action(aid)
    assert action.state == "FATAL", f"taken during shutdown and left {action.state}"
    assert action.result["payload"] == SHUTDOWN
    assert action.result_posts == 1
    assert elapsed < 3.0, f"stop took {elapsed:.1f} s"


def test_a_result_post_in_flight_past_the_flush_deadline_gets_its_answer(flyte_api, registry, caplog):
    pack = Pack(pack_def_with(), Client(flyte_api.url, timeout=3.0), health_port=None, polling_interval=0.5,
                grace_period=0, flush_timeout=0.2, metrics=registry)
    pack.start(timeout=5)
    try:
        flyte_api.delay("result", 1.0)  # the server takes a second to answer the result
        aid = flyte_api.enqueue("Hardened", "Echo", "slow to land")
        wait_until(lambda: flyte_api.requests_for("result"), 2, "the result post in flight")
        pack.stop()
    finally:
        pack.stop(grace_period=0)
    assert flyte_api.action(aid).result["payload"] == "slow to land"
    assert result_statuses(flyte_api, aid) == [202]
    assert metric(registry, "flyte_pack_results_lost_total") == 0, "a result that landed counted as lost"
    assert not records(caplog, logging.ERROR)


# --- 4. an events-only pack without a health server runs until stopped ------------------------------------------


EVENTS_ONLY_PACK = textwrap.dedent("""
    from gevent import monkey; monkey.patch_all()
    import os
    from flyte_gevent import Client, Pack, PackDef
    pack = Pack(PackDef("Ticker", event_defs=["Tick"]), Client(os.environ["FLYTE_API"]), health_port=None)
    pack.run()
    print("stopped cleanly", flush=True)
""")


def test_an_events_only_pack_without_a_health_server_runs_until_sigterm(flyte_api, python, subprocess_env):
    process = subprocess.Popen([python, "-c", EVENTS_ONLY_PACK], env=dict(subprocess_env, FLYTE_API=flyte_api.url),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        flyte_api.wait_for_pack("Ticker", timeout=10)
        gevent.sleep(0.5)
        assert process.poll() is None, f"the pack exited by itself:\n{process.communicate()[1]}"
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "stopped cleanly" in stdout
    assert "LoopExit" not in stderr


# --- 5. stop() from inside the pack ----------------------------------------------------------------------------


def test_a_handler_that_stops_the_pack_gets_its_own_result_and_the_pack_stops(flyte_api, make_pack):
    pack = None

    def shutdown(input):
        pack.stop()
        return Event(done, "stopping as asked")

    pack = make_pack(pack_def_with(Command("Shutdown", shutdown, [done])))
    runner = gevent.spawn(pack.run)
    wait_until(lambda: pack.registered, what="registration")
    aid = flyte_api.enqueue("Hardened", "Shutdown", None)
    runner.join(timeout=5)
    assert runner.dead, "run() did not return after a handler stopped the pack"
    assert runner.successful()
    assert (flyte_api.action(aid).result["event"], flyte_api.action(aid).result["payload"]) == \
        ("Done", "stopping as asked")
    assert pack.live() == (False, "stopped")
    later = gevent.spawn(pack.stop)
    later.join(timeout=1)
    assert later.dead, "a later stop() hangs"


def test_stop_from_a_pack_task_and_from_a_health_check_stops_the_pack_and_the_check_is_answered(
        flyte_api, make_pack):
    def stopper():
        gevent.sleep(0.2)
        tasked.stop()

    tasked = make_pack(pack_def_with(name="Tasked"), start=True)
    tasked.spawn(stopper)
    wait_until(lambda: tasked.live() == (False, "stopped"), 5, "the pack stopped by its task")

    def check():
        checked.stop()
        return "Stopper", Health(True, "asked to stop")

    checked = make_pack(pack_def_with(name="Checked"), health_port=0, health_checks=[check], start=True)
    answer = requests.get(f"http://127.0.0.1:{checked.health_port}/", timeout=5, headers={"Connection": "close"})
    assert (answer.status_code, answer.json()) == (200, {"Stopper": {"healthy": True, "status": "asked to stop"}})
    wait_until(lambda: checked.live() == (False, "stopped"), 5, "the pack stopped by its health check")


# --- 6. backoff after thousands of failures --------------------------------------------------------------------


def test_backoff_stays_within_its_cap_after_thousands_of_attempts():
    backoff = Backoff(0.5, 60.0)
    backoff.attempt = 5000  # about 40 days of failed takes
    delays = [backoff.next() for _ in range(20)]
    assert all(0.5 <= d <= 60.0 for d in delays)
    assert max(delays) > 5.0, "the ceiling collapsed instead of being capped"


@pytest.fixture
def fast_forwarded_backoff(monkeypatch):
    """Every Backoff starts as if 2,000 attempts had already failed (about 9 hours of failed takes)."""
    original = Backoff.__init__

    def init(self, base, cap):
        original(self, base, cap)
        self.attempt = 2000

    monkeypatch.setattr(Backoff, "__init__", init)


def test_takes_keep_backing_off_after_thousands_of_failures(flyte_api, make_pack, fast_forwarded_backoff, caplog):
    pack = make_pack(pack_def_with(), start=True)
    flyte_api.clear_requests()
    flyte_api.fail("take", 503, times=None)
    gevent.sleep(1.2)
    takes = flyte_api.requests_for("take")
    assert len(takes) <= 3, f"{len(takes)} takes in 1.2 s: the poller is hot-looping"
    assert not [r for r in caplog.records if r.exc_info], "a traceback per take"
    assert pack.live() == (True, "alive")


def test_start_keeps_retrying_registration_after_thousands_of_failures(flyte_api, make_pack, monkeypatch,
                                                                         fast_forwarded_backoff):
    monkeypatch.setattr(pack_module, "_REGISTER_BACKOFF", (0.1, 0.2))
    flyte_api.outage("503")
    pack = make_pack(pack_def_with())
    starting = gevent.spawn(pack.start)
    gevent.sleep(0.6)
    assert not starting.dead, f"start() gave up: {starting.exception!r}"
    assert len(flyte_api.requests_for("v1")) >= 2
    flyte_api.restore()
    starting.get(timeout=3)
    assert pack.registered


# --- 7. takes answered 404 are failed takes ----------------------------------------------------------------------


def test_takes_answered_404_back_off_fail_readiness_and_reregister_at_a_limited_rate(
        flyte_api, make_pack, monkeypatch, caplog):
    monkeypatch.setattr(pack_module, "_NOT_READY_AFTER_ERRORS", 2)
    pack = make_pack(pack_def_with(), start=True)
    gevent.sleep(0.1)
    flyte_api.clear_requests()
    flyte_api.fail("take", 404, times=None)  # a proxy sending take to the wrong place, say
    gevent.sleep(1.5)
    takes = [r.at for r in flyte_api.requests_for("take")]
    gaps = [b - a for a, b in itertools.pairwise(takes)]
    assert min(gaps) >= 0.45, f"takes not backing off: {gaps}"
    assert len(flyte_api.requests_for("register")) <= 2
    assert len(records(caplog, logging.WARNING, "registered it again")) <= 1, "one line per re-registration"
    ok, reason = pack.ready()
    assert not ok and "taking actions failed" in reason and "404" in reason
    flyte_api.clear_faults()
    aid = flyte_api.enqueue("Hardened", "Echo", "back")
    assert flyte_api.wait_for_result(aid, timeout=5).payload == "back"


# --- 15. any 2xx is an accepted result or event -----------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 204])
def test_a_result_or_event_accepted_with_any_2xx_is_delivered(flyte_api, make_pack, registry, caplog, status):
    pack = make_pack(pack_def_with(), start=True, metrics=registry)
    flyte_api.fail("result", status)  # a proxy (or a future server) answering other than 202
    aid = flyte_api.enqueue("Hardened", "Echo", "x")
    wait_until(lambda: metric(registry, "flyte_pack_actions_total", command="Echo", outcome="success") == 1, 3,
               "the action completed")
    assert result_statuses(flyte_api, aid) == [status]
    assert metric(registry, "flyte_pack_results_lost_total") == 0
    assert metric(registry, "flyte_pack_result_retries_total") == 0
    flyte_api.fail("event", status)
    pack.send_event(Event(tick, {"n": 1}), timeout=3)
    assert [r.status for r in flyte_api.requests_for("event")] == [status]
    assert metric(registry, "flyte_pack_events_sent_total", event="Tick") == 1
    assert not records(caplog, logging.ERROR) and not records(caplog, logging.WARNING)


# --- 16. a take answered with something that is not an action ---------------------------------------------------


def stand_in_api(take_answer):
    """A minimal Flyte API on loopback whose take always answers ``take_answer`` = (status, content type, body)."""
    takes = []

    def app(environ, start_response):
        base = f"http://{environ['HTTP_HOST']}"
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        status, content_type, body = "404 Not Found", "application/json", b""
        if (method, path) == ("GET", "/v1"):
            status, body = "200 OK", {"links": [{"href": f"{base}/v1/packs",
                                                 "rel": f"{base}/swagger#!/pack/listPacks"}]}
        elif (method, path) == ("POST", "/v1/packs"):
            status, body = "201 Created", {"id": "Hardened", "links": [
                {"href": f"{base}/v1/packs/Hardened/actions/take", "rel": f"{base}/swagger#!/action/takeAction"},
                {"href": f"{base}/v1/packs/Hardened/events", "rel": f"{base}/swagger#/event"}]}
        elif path.endswith("/take"):
            takes.append(time.monotonic())
            status, content_type, body = take_answer
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
        start_response(status, [("Content-Length", str(len(body))), ("Content-Type", content_type)])
        return [body]

    server = WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()
    return server, takes


@pytest.mark.parametrize("answer, taken", [
    (("200 OK", "text/html", b"<html><body>502 Bad Gateway</body></html>"), False),
    (("200 OK", "application/json", {"unexpected": True}), False),
    (("200 OK", "application/json", {"command": "Echo", "input": None, "links": []}), True),
], ids=["html-page", "json-not-an-action", "action-without-result-link"])
def test_a_malformed_take_answer_is_a_throttled_take_error_naming_an_action_only_when_there_is_one(
        caplog, answer, taken):
    server, takes = stand_in_api(answer)
    pack = Pack(pack_def_with(), Client(f"http://127.0.0.1:{server.server_port}", timeout=5.0), health_port=None,
                polling_interval=0.5, metrics=False)
    try:
        pack.start(timeout=5)
        wait_until(lambda: len(takes) >= 2, 5, "two takes")
    finally:
        pack.stop(grace_period=0)
        server.stop(timeout=1)
    stranded = records(caplog, logging.ERROR, "an action was taken")
    if taken:
        assert len(stranded) == 1, "logged once, not on every take"
        assert "stays PENDING" in stranded[0].getMessage()
    else:
        assert stranded == [], "no action was taken: the body shows none"
        assert len(records(caplog, logging.WARNING, "take")) == 1
    gaps = [b - a for a, b in itertools.pairwise(takes)]
    assert min(gaps) >= 0.45, f"takes not backing off: {gaps}"


# --- 17. stop() closes the client's connections -------------------------------------------------------------------


def established_connections_to(port):
    """Sockets of this process connected to *port* (the client's ends of keep-alive connections)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                remote, state = fields[2], fields[3]
                if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/net/tcp")
def test_stop_closes_the_clients_keep_alive_connections(flyte_api):
    pack = Pack(pack_def_with(), Client(flyte_api.url, timeout=5.0), health_port=None, polling_interval=0.5,
                max_takers=8, metrics=False)
    pack.start(timeout=5)
    ids = flyte_api.enqueue_many("Hardened", "Echo", range(100))
    flyte_api.wait_for_results(ids, timeout=10)
    assert established_connections_to(flyte_api.port) > 1  # a busy run keeps several open
    pack.stop(grace_period=0)
    gevent.sleep(0.1)
    assert established_connections_to(flyte_api.port) == 0
