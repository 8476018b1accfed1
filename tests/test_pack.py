"""The pack runtime (flyte_gevent.pack, ._poller, ._actions) against the fake Flyte API over loopback.

Registration, the poller's pacing and bounds, one greenlet per action, every FATAL path,
events, label routing, timeouts, and the lifecycle (start/run/stop).
"""

import datetime
import itertools
import logging
import sys
import time

import gevent
import gevent.event
import pytest
import requests

import flyte_gevent.pack as pack_module
from flyte_gevent import (
    Client,
    Command,
    Event,
    EventDef,
    FlyteError,
    FlyteHTTPError,
    NotRegisteredError,
    Pack,
    PackDef,
    current_action,
)
from helpers import wait_until

done = EventDef("Done")
tick = EventDef("Tick")


@pytest.fixture
def quick_registration_retries(monkeypatch):
    """Registration retries back off from 1 s; a tenth of that keeps retry tests short."""
    monkeypatch.setattr(pack_module, "_REGISTER_BACKOFF", (0.1, 0.2))


def echo(input):
    return Event(done, input)


def worker_def(*commands, name="Worker", labels=None):
    return PackDef(name, commands=list(commands) or [Command("Echo", echo, [done])], labels=labels)


def take_times(api, pack_id):
    return [r.at for r in api.requests_for("take") if f"/packs/{pack_id}/" in r.path]


# --- registration and start-up ------------------------------------------------------------------------------


def test_start_retries_registration_until_accepted_and_serves_health_while_it_retries(
        flyte_api, make_pack, quick_registration_retries):
    flyte_api.fail("register", 503, times=2)
    pack = make_pack(worker_def(), health_port=0, health_host="127.0.0.1")
    readiness_while_registering = []

    def probe():
        while not pack.registered:
            if pack.health_port:
                status = requests.get(f"http://127.0.0.1:{pack.health_port}/readyz", timeout=2,
                                      headers={"Connection": "close"}).status_code
                if not pack.registered:  # not a probe that raced with the successful registration
                    readiness_while_registering.append(status)
            gevent.sleep(0.02)

    prober = gevent.spawn(probe)
    pack.start()
    assert pack.registered  # start() returned only once registered
    prober.join(timeout=2)

    assert [r.status for r in flyte_api.requests_for("register")] == [503, 503, 201]
    assert flyte_api.packs["Worker"].registrations == 1
    assert pack.pack_id == "Worker"
    # The health server was answering (not ready yet) before registration succeeded.
    assert readiness_while_registering and set(readiness_while_registering) == {503}


def test_start_with_timeout_during_an_outage_raises_naming_the_pack(flyte_api, make_pack):
    flyte_api.outage()
    pack = make_pack(worker_def(name="Lonely"))
    started = time.monotonic()
    with pytest.raises(FlyteError) as caught:
        pack.start(timeout=0.5)
    elapsed = time.monotonic() - started
    assert "'Lonely'" in str(caught.value)
    assert 0.4 < elapsed < 2.0
    assert not pack.registered


def _refused_rel(flyte_api, monkeypatch):
    pack_def = worker_def(name="Linked")
    pack_def.links = {"support": "https://example.com/support"}  # "up" inside "support": the server refuses it
    monkeypatch.setattr(pack_def, "validate", lambda: None)  # validate() would refuse it before sending
    return pack_def


def _register_answers_400(flyte_api, monkeypatch):
    flyte_api.fail("register", 400)
    return worker_def(name="Linked")


@pytest.mark.parametrize("refusal", [_refused_rel, _register_answers_400], ids=["reserved-rel", "injected-400"])
def test_registration_refused_with_400_raises_at_once_instead_of_retrying(flyte_api, make_pack, monkeypatch,
                                                                          refusal):
    pack = make_pack(refusal(flyte_api, monkeypatch))
    started = time.monotonic()
    with pytest.raises(FlyteHTTPError) as caught:
        pack.start()
    assert caught.value.status == 400
    assert time.monotonic() - started < 0.9  # the first retry would come after 1 s
    assert [r.status for r in flyte_api.requests_for("register")] == [400]
    assert not flyte_api.packs


def test_pack_without_commands_never_takes(flyte_api, make_pack):
    pack = make_pack(PackDef("Quiet", event_defs=[tick]))
    pack.start()
    flyte_api.enqueue("Quiet", "Anything", None)
    gevent.sleep(1.0)
    assert flyte_api.requests_for("take") == []
    assert [a.state for a in flyte_api.actions.values()] == ["NEW"]


# --- the poller -----------------------------------------------------------------------------------------------


def test_actions_run_concurrently_one_greenlet_each(flyte_api, make_pack):
    running = peak = 0

    def slow(input):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        gevent.sleep(0.3)
        running -= 1
        return Event(done, input)

    ids = flyte_api.enqueue_many("Worker", "Slow", range(10))
    pack = make_pack(worker_def(Command("Slow", slow, [done])))
    started = time.monotonic()
    pack.start()
    results = flyte_api.wait_for_results(ids, timeout=5)
    elapsed = time.monotonic() - started

    assert [(r.event, r.payload) for r in results] == [("Done", n) for n in range(10)]
    assert peak == 10
    assert elapsed < 1.5  # one after the other would take 3 s


def test_max_in_flight_bounds_actions_and_a_take_waits_for_a_free_slot(flyte_api, make_pack):
    release = gevent.event.Event()
    running = peak = 0

    def blocked(input):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        release.wait(5)
        running -= 1
        return Event(done, input)

    ids = flyte_api.enqueue_many("Worker", "Block", range(4))
    pack = make_pack(worker_def(Command("Block", blocked, [done])), max_in_flight=3)
    pack.start()
    wait_until(lambda: len(flyte_api.pending()) == 3, what="3 actions PENDING")
    third_taken_at = max(a.taken_at for a in flyte_api.pending())
    gevent.sleep(0.8)  # longer than the polling interval: an idle poller would have taken again by now

    assert [flyte_api.action(i).state for i in ids] == ["PENDING", "PENDING", "PENDING", "NEW"]
    assert flyte_api.action(ids[3]).takes == 0
    # A take is a commitment: none was even attempted while every slot was busy.
    assert [at for at in take_times(flyte_api, "Worker") if at > third_taken_at] == []
    assert pack.in_flight == 3

    release.set()
    results = flyte_api.wait_for_results(ids, timeout=5)
    assert [r.payload for r in results] == [0, 1, 2, 3]
    assert peak == 3


def test_after_an_action_the_next_take_happens_at_once(flyte_api, make_pack):
    ids = flyte_api.enqueue_many("Worker", "Echo", range(20))
    pack = make_pack(worker_def(), max_in_flight=1)  # strictly one take after another
    started = time.monotonic()
    pack.start()
    results = flyte_api.wait_for_results(ids, timeout=8)
    elapsed = time.monotonic() - started

    assert [r.payload for r in results] == list(range(20))
    assert elapsed < 2.0  # 20 polling intervals would be 10 s
    assert [r.status for r in flyte_api.requests_for("take")][:20] == [200] * 20


@pytest.mark.parametrize("interval", [0.5, 0.1], ids=["interval-0.5", "floor-applies-to-0.1"])
def test_idle_poller_waits_the_polling_interval_between_empty_takes(flyte_api, make_pack, interval):
    pack = make_pack(worker_def(), polling_interval=interval)
    assert pack.polling_interval == 0.5
    pack.start()
    gevent.sleep(1.2)
    pack.stop()

    times = take_times(flyte_api, "Worker")
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert {r.status for r in flyte_api.requests_for("take")} == {204}
    assert 2 <= len(times) <= 4, times
    assert min(gaps) >= 0.48, gaps


def test_failed_take_waits_before_trying_again_and_the_poller_recovers(flyte_api, make_pack):
    flyte_api.fail("take", 503, times=None)
    pack = make_pack(worker_def())
    pack.start()
    gevent.sleep(1.0)
    failed = take_times(flyte_api, "Worker")
    gaps = [b - a for a, b in itertools.pairwise(failed)]
    assert 2 <= len(failed) <= 3, failed
    assert min(gaps) >= 0.48, gaps

    flyte_api.clear_faults()
    action_id = flyte_api.enqueue("Worker", "Echo", "after the outage")
    assert flyte_api.wait_for_result(action_id, timeout=5).payload == "after the outage"


# --- results: every FATAL path ------------------------------------------------------------------------------


class Opaque:
    pass


def _raise_value_error(input):
    raise ValueError("bad project")


def _raise_without_message(input):
    raise RuntimeError()


def _exit(input):
    sys.exit()


def _exit_with_code(input):
    sys.exit(3)


SERIALIZE = "result payload of event 'Done' cannot be serialized: "

FATAL_CASES = {
    "raises": (_raise_value_error, "ValueError: bad project"),
    "raises-empty-message": (_raise_without_message, "RuntimeError"),
    "returns-none": (lambda input: None, "handler for command 'Broken' returned NoneType, expected an Event"),
    "returns-dict": (lambda input: {"issueId": "FOO-1"},
                     "handler for command 'Broken' returned dict, expected an Event"),
    "returns-str": (lambda input: "done", "handler for command 'Broken' returned str, expected an Event"),
    "payload-set": (lambda input: Event(done, {"items": {1, 2}}),
                    SERIALIZE + "payload.items: set is not JSON serializable"),
    "payload-object": (lambda input: Event(done, {"who": [1, Opaque()]}),
                       SERIALIZE + "payload.who.1: Opaque is not JSON serializable"),
    "payload-nan": (lambda input: Event(done, {"ratio": float("nan")}),
                    SERIALIZE + "payload.ratio: nan is not a valid JSON number"),
    "sys-exit": (_exit, "SystemExit"),
    "sys-exit-3": (_exit_with_code, "SystemExit: 3"),
}


@pytest.mark.parametrize("handler, expected", FATAL_CASES.values(), ids=FATAL_CASES.keys())
def test_handler_failure_completes_the_action_as_fatal_and_the_poller_goes_on(flyte_api, make_pack, handler,
                                                                               expected):
    bad = flyte_api.enqueue("Worker", "Broken", {"project": "NOPE"})
    pack = make_pack(worker_def(Command("Broken", handler, [done]), Command("Echo", echo, [done])))
    pack.start()
    result = flyte_api.wait_for_result(bad)
    assert (result.event, result.payload) == ("FATAL", expected)

    good = flyte_api.enqueue("Worker", "Echo", "still here")
    assert flyte_api.wait_for_result(good, timeout=3).payload == "still here"
    assert [flyte_api.action(i).result_posts for i in (bad, good)] == [1, 1]
    assert not flyte_api.violations


def test_unknown_command_is_fatal_naming_only_the_command(flyte_api, make_pack):
    unknown = flyte_api.enqueue("Worker", "Nope", {"x": 1})
    good = flyte_api.enqueue("Worker", "Echo", "next")
    pack = make_pack(worker_def())
    pack.start()
    result = flyte_api.wait_for_result(unknown)
    assert (result.event, result.payload) == ("FATAL", "Unknown command 'Nope'")
    assert flyte_api.wait_for_result(good).payload == "next"
    assert [a.result_posts for a in flyte_api.actions.values()] == [1, 1]


def test_command_timeout_and_pack_action_timeout_complete_as_fatal(flyte_api, make_pack):
    def hang(input):
        gevent.sleep(10)
        return Event(done, "never")

    own = flyte_api.enqueue("Worker", "OwnTimeout")
    default = flyte_api.enqueue("Worker", "PackTimeout")
    pack = make_pack(worker_def(Command("OwnTimeout", hang, [done], timeout=0.2), Command("PackTimeout", hang, [done])),
                     action_timeout=0.4)
    started = time.monotonic()
    pack.start()
    results = flyte_api.wait_for_results([own, default], timeout=3)
    assert [(r.event, r.payload) for r in results] == [("FATAL", "timed out after 0.2 s"),
                                                        ("FATAL", "timed out after 0.4 s")]
    assert time.monotonic() - started < 1.5


def test_current_action_inside_a_handler_is_the_action_being_handled(flyte_api, make_pack):
    def whoami(input):
        action = current_action()
        return Event(done, {"id": action.id, "command": action.command, "input": action.input})

    ids = flyte_api.enqueue_many("Worker", "WhoAmI", ["a", "b"])
    pack = make_pack(worker_def(Command("WhoAmI", whoami, [done])))
    pack.start()
    results = flyte_api.wait_for_results(ids)
    assert [r.payload for r in results] == [{"id": ids[0], "command": "WhoAmI", "input": "a"},
                                            {"id": ids[1], "command": "WhoAmI", "input": "b"}]
    assert current_action() is None


# --- events ---------------------------------------------------------------------------------------------------


def test_send_event_delivers_with_created_at_and_no_pack_key(flyte_api, make_pack):
    pack = make_pack(PackDef("Ticker", event_defs=[tick]))
    pack.start()
    pack.send_event(Event(tick, {"n": 1}))

    [event] = flyte_api.events  # delivered by the time send_event returns
    assert (event.pack_id, event.event, event.payload) == ("Ticker", "Tick", {"n": 1})
    assert sorted(event.body) == ["createdAt", "event", "payload"]
    assert event.created_at.endswith("Z")
    created = datetime.datetime.fromisoformat(event.created_at)
    assert created.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.UTC) - created).total_seconds()) < 5
    assert not flyte_api.violations


def test_send_event_before_start_raises_not_registered(flyte_api, make_pack):
    pack = make_pack(PackDef("Ticker", event_defs=[tick]))
    with pytest.raises(NotRegisteredError, match="'Ticker'"):
        pack.send_event(Event(tick, {"n": 1}))
    with pytest.raises(NotRegisteredError):
        pack.send_event_nowait(Event(tick, {"n": 1}))
    assert flyte_api.requests_for("event") == []


def test_send_event_with_unserializable_payload_raises_value_error_naming_where(flyte_api, make_pack):
    pack = make_pack(PackDef("Ticker", event_defs=[tick]))
    pack.start()
    with pytest.raises(ValueError) as caught:
        pack.send_event(Event(tick, {"a": {"b": {1, 2}}}))
    assert "payload.a.b" in str(caught.value) and "set" in str(caught.value)
    with pytest.raises(ValueError, match=r"payload\.ratio"):
        pack.send_event_nowait(Event(tick, {"ratio": float("inf")}))
    assert flyte_api.requests_for("event") == []


def test_send_event_nowait_queues_and_delivers(flyte_api, make_pack):
    pack = make_pack(PackDef("Ticker", event_defs=[tick]))
    pack.start()
    assert pack.send_event_nowait(Event(tick, {"n": 1})) is True
    [event] = flyte_api.wait_for_events(1, timeout=3)
    assert (event.event, event.payload) == ("Tick", {"n": 1})
    assert "createdAt" in event.body


def test_send_event_nowait_returns_false_when_the_buffer_is_full(flyte_api, make_pack):
    pack = make_pack(PackDef("Ticker", event_defs=[tick]), event_buffer=1)
    pack.start()
    flyte_api.delay("event", 0.5)  # holds the first delivery while more events are queued
    assert pack.send_event_nowait(Event(tick, 1)) is True
    gevent.sleep(0.1)  # the sender takes event 1 off the queue and waits on the slow server
    assert pack.send_event_nowait(Event(tick, 2)) is True  # fills the one-event buffer
    assert pack.send_event_nowait(Event(tick, 3)) is False  # dropped

    assert [e.payload for e in flyte_api.wait_for_events(2, timeout=3)] == [1, 2]
    gevent.sleep(0.2)
    assert [e.payload for e in flyte_api.events] == [1, 2]


# --- routing --------------------------------------------------------------------------------------------------


def test_actions_for_labels_the_pack_lacks_are_never_taken(flyte_api, make_pack):
    elsewhere = flyte_api.enqueue("Worker", "Echo", "prod", labels={"env": "prod"})
    here = flyte_api.enqueue("Worker", "Echo", "dev", labels={"env": "dev"})
    pack = make_pack(worker_def(labels={"env": "dev"}))
    pack.start()
    assert pack.pack_id == "Worker.env.dev"
    assert flyte_api.wait_for_result(here).payload == "dev"
    gevent.sleep(0.6)  # at least one more take after the last action
    assert flyte_api.action(elsewhere).state == "NEW"
    assert flyte_api.action(elsewhere).takes == 0


# --- lifecycle ------------------------------------------------------------------------------------------------


def test_stop_returns_and_leaves_nothing_pending(flyte_api, make_pack):
    release = gevent.event.Event()  # never set: the handler is still running at shutdown

    def stuck(input):
        release.wait(30)
        return Event(done, "finished")

    def quick(input):
        gevent.sleep(0.1)
        return Event(done, "finished")

    stuck_id = flyte_api.enqueue("Worker", "Stuck")
    quick_id = flyte_api.enqueue("Worker", "Quick")
    pack = make_pack(worker_def(Command("Stuck", stuck, [done]), Command("Quick", quick, [done])))
    pack.start()
    wait_until(lambda: len(flyte_api.pending()) == 2, what="both actions taken")
    started = time.monotonic()
    pack.stop(grace_period=0.3)

    assert time.monotonic() - started < 2.0
    assert flyte_api.pending() == []
    assert flyte_api.wait_for_result(quick_id, timeout=0).payload == "finished"
    assert (flyte_api.action(stuck_id).result["event"], flyte_api.action(stuck_id).result["payload"]) == \
        ("FATAL", "pack shutting down")
    assert [flyte_api.action(i).result_posts for i in (stuck_id, quick_id)] == [1, 1]
    assert "Worker" in flyte_api.packs  # never deleted: replicas share the id


def test_run_in_a_greenlet_returns_after_stop(flyte_api, make_pack):
    pack = make_pack(worker_def())
    runner = gevent.spawn(pack.run)
    wait_until(lambda: pack.registered, what="registration")
    action_id = flyte_api.enqueue("Worker", "Echo", "via run")
    assert flyte_api.wait_for_result(action_id, timeout=3).payload == "via run"

    pack.stop()
    runner.join(timeout=3)
    assert runner.dead and runner.successful()


def test_a_dead_poller_fails_liveness_stops_the_pack_and_makes_run_raise(flyte_api, make_pack, monkeypatch):
    import flyte_gevent._poller as poller

    def broken_run(self):
        raise ZeroDivisionError("bug in the poller")

    monkeypatch.setattr(poller.Poller, "run", broken_run)
    pack = make_pack(worker_def(name="Broken"))
    runner = gevent.spawn(pack.run)
    runner.join(timeout=5)
    assert runner.dead, "run() must return once the poller died, not leave a pack that only looks alive"
    assert isinstance(runner.exception, RuntimeError)
    assert "poller greenlet died: ZeroDivisionError: bug in the poller" in str(runner.exception)
    ok, reason = pack.live()
    assert not ok and reason == "stopped"


def test_readiness_names_a_failed_start(flyte_api, make_pack):
    flyte_api.fail("register", 400)
    pack = make_pack(worker_def(name="Refused"))
    with pytest.raises(FlyteHTTPError):
        pack.start()
    ok, reason = pack.ready()
    assert not ok
    assert reason.startswith("registration failed: ") and "400" in reason


def test_a_malformed_taken_action_is_completed_as_fatal_not_stranded():
    # The fake never sends a malformed action, so a stand-in server does: a 200 take without
    # "command". The action is PENDING on the server all the same, so the pack must complete it.
    import json

    from gevent.pywsgi import WSGIServer

    results, takes = [], []

    def app(environ, start_response):
        base = f"http://{environ['HTTP_HOST']}"
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        status, body = "404 Not Found", b""
        if (method, path) == ("GET", "/v1"):
            status, body = "200 OK", {"links": [{"href": f"{base}/v1/packs",
                                                 "rel": f"{base}/swagger#!/pack/listPacks"}]}
        elif (method, path) == ("POST", "/v1/packs"):
            status, body = "201 Created", {"id": "Worker", "links": [
                {"href": f"{base}/v1/packs/Worker/actions/take", "rel": f"{base}/swagger#!/action/takeAction"},
                {"href": f"{base}/v1/packs/Worker/events", "rel": f"{base}/swagger#/event"}]}
        elif path.endswith("/take"):
            takes.append(path)
            status, body = ("200 OK", {"input": {"x": 1}, "links": [
                {"href": f"{base}/v1/packs/Worker/actions/abc123/result", "rel": f"{base}/swagger#/actionResult"}]}) \
                if len(takes) == 1 else ("204 No Content", b"")
        elif path.endswith("/result"):
            results.append((path, json.loads(environ["wsgi.input"].read())))
            status = "202 Accepted"
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
        start_response(status, [("Content-Length", str(len(body))), ("Content-Type", "application/json")])
        return [body]

    server = WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()
    try:
        pack = Pack(worker_def(), Client(f"http://127.0.0.1:{server.server_port}", timeout=5.0), health_port=None,
                    polling_interval=0.5)
        pack.start(timeout=5)
        wait_until(lambda: results, what="the malformed action's result")
        pack.stop(grace_period=0)
    finally:
        server.stop(timeout=1)
    (path, body), = results
    assert path == "/v1/packs/Worker/actions/abc123/result"
    assert body["event"] == "FATAL"
    assert body["payload"].startswith("malformed action from the Flyte API: take answered 200 with a malformed action")
    assert "command: Missing data for required field." in body["payload"]


# --- what a FATAL and the log say (issue #10 item 9) ------------------------------------------------------------


@pytest.mark.parametrize("message, expected", [
    ("cannot reach http://user:secret@db/orders", "ConnectionError: cannot reach http://***@db/orders"),
    ("'postgres://app:pa55@db.internal:5432/x' refused",
     "ConnectionError: 'postgres://***@db.internal:5432/x' refused"),
    ("two: https://a:b@one.example and ftp://c@two.example/f", ("ConnectionError: two: https://***@one.example and "
                                                               "ftp://***@two.example/f")),
    ("mail admin@example.com about http://example.com/a@b", ("ConnectionError: mail admin@example.com about "
                                                            "http://example.com/a@b")),
])
def test_credentials_in_urls_of_a_handlers_exception_are_redacted_from_the_fatal_payload(flyte_api, make_pack,
                                                                                         message, expected):
    def leaky(input):
        raise ConnectionError(message)

    action = flyte_api.enqueue("Worker", "Leaky", None)
    make_pack(worker_def(Command("Leaky", leaky, [done])), start=True)
    result = flyte_api.wait_for_result(action)
    assert (result.event, result.payload) == ("FATAL", expected)


def test_the_log_line_for_bad_input_reads_as_one_sentence(flyte_api, make_pack, caplog):
    from marshmallow import Schema, fields

    class CheckUrl(Schema):
        url = fields.Url(required=True)
        retries = fields.Integer()

    action = flyte_api.enqueue("Worker", "checkUrl", {"url": "not a url", "retries": "many"})
    make_pack(worker_def(Command("checkUrl", echo, [done], input_schema=CheckUrl)), start=True)
    result = flyte_api.wait_for_result(action)
    assert result.payload == ("invalid input for command 'checkUrl':\n"
                              "url: Not a valid URL.\nretries: Not a valid integer.")
    (record,) = [r for r in caplog.records if r.getMessage().startswith("invalid input")]
    assert record.getMessage() == "invalid input for command 'checkUrl': url: Not a valid URL.; retries: Not a " \
                                  "valid integer."


def test_an_undeclared_spontaneous_event_is_warned_about_once_per_name(flyte_api, make_pack, caplog):
    pack = make_pack(PackDef("Ticker", event_defs=[tick]), start=True)
    for payload in (1, 2):
        pack.send_event(Event(tick, payload))            # declared: no warning
        pack.send_event(Event("Tock", payload))          # not declared: warned about once
        pack.send_event_nowait(Event("Tack", payload))   # neither here
    flyte_api.wait_for_events(6)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        ("pack 'Ticker' sent event 'Tock', which it does not declare (event_defs or a command's output_events); "
         "Flyte accepts it, but its registration does not list it"),
        ("pack 'Ticker' sent event 'Tack', which it does not declare (event_defs or a command's output_events); "
         "Flyte accepts it, but its registration does not list it"),
    ]
