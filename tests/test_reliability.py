"""Reliability: no action stranded, no result lost (issue 3).

Each test runs a real :class:`Pack` against the in-process fake Flyte API over
loopback HTTP, injects a fault (outages, error statuses, lost responses, hung
requests, a deleted pack, rotated tokens) and then checks what the server saw:
no action left PENDING, no result lost, and no result posted twice except after
a lost response. Retry delays are the library's own (results back off from
0.5 s, takes from the polling interval), so the faults here last a second or
two at most.
"""

import contextlib
import itertools
import logging
import time

import gevent
import gevent.event
import pytest
from prometheus_client import CollectorRegistry

from flyte_gevent import Client, Command, DeliveryError, Event, FlyteError, FlyteHTTPError, Pack, PackDef
from flyte_gevent._retry import Backoff, LogThrottle
from helpers import wait_until
from packs_for_tests import PACK_NAME, done, make_pack_def, noticed

SECRET_OLD = "old-secret-token-5d1e"
SECRET_NEW = "new-secret-token-9a7c"


# --- helpers -------------------------------------------------------------------------------------------------


class Gate:
    """A ``Wait`` command whose handlers block until the test opens the gate."""

    def __init__(self):
        self.opened = gevent.event.Event()
        self.entered = 0

    def handler(self, input):
        self.entered += 1
        if not self.opened.wait(20):
            raise RuntimeError("gate never opened")
        return Event(done, {"input": input})

    def pack_def(self, **options):
        pack_def = make_pack_def(**options)
        pack_def.commands.append(Command("Wait", self.handler, [done]))
        return pack_def


@contextlib.contextmanager
def running_pack(api, pack_def=None, *, timeout=2.0, jwt=None, jwt_file=None, **options):
    """A started pack against *api* with test-friendly intervals, stopped (quickly) afterwards."""
    options.setdefault("polling_interval", 0.5)
    options.setdefault("health_port", None)
    options.setdefault("flush_timeout", 2.0)
    options.setdefault("metrics", CollectorRegistry())
    client = Client(api.url, timeout=timeout, jwt=jwt, jwt_file=jwt_file)
    pack = Pack(pack_def or make_pack_def(), client, **options)
    pack.start(timeout=5)
    try:
        yield pack
    finally:
        api.clear_faults()
        pack.stop(grace_period=0)
        client.close()


def metric(pack, name, **labels):
    """A sample of the pack's Prometheus registry (0 when never incremented)."""
    return pack._metrics.registry.get_sample_value(name, labels) or 0


def result_requests(api, action_id):
    """The result POSTs for one action that reached the fake (injected faults included)."""
    return [r for r in api.requests_for("result") if f"/actions/{action_id}/" in r.path]


def assert_all_completed_once(api, action_ids, allow_repeats_after=()):
    """No action PENDING or NEW; each completed with one accepted post (two after a lost response)."""
    for aid in action_ids:
        action = api.action(aid)
        assert action.state in ("SUCCESS", "FATAL"), f"{aid} is {action.state}"
        expected = 2 if aid in allow_repeats_after else 1
        assert action.result_posts == expected, f"{aid}: {action.result_posts} result posts, expected {expected}"


def records(caplog, level=logging.WARNING, logger="flyte_gevent", contains=""):
    return [r for r in caplog.records if r.levelno == level and r.name.startswith(logger)
            and contains in r.getMessage()]


# --- result delivery -------------------------------------------------------------------------------------------


def test_results_of_actions_finished_during_a_refused_outage_are_delivered_after_restore(flyte_api, caplog):
    gate = Gate()
    with running_pack(flyte_api, gate.pack_def()) as pack:
        ids = flyte_api.enqueue_many(PACK_NAME, "Wait", [{"n": n} for n in range(5)])
        wait_until(lambda: gate.entered == 5, what="all five actions taken")
        flyte_api.outage("refuse")
        gate.opened.set()
        gevent.sleep(1.5)  # every result post is refused at least once
        assert not flyte_api.requests_for("result"), "no result can reach a server that is down"
        flyte_api.restore()
        results = flyte_api.wait_for_results(ids, timeout=8)
        assert [r.payload for r in results] == [{"input": {"n": n}} for n in range(5)]
        assert_all_completed_once(flyte_api, ids)
        assert metric(pack, "flyte_pack_result_retries_total") >= 5
        assert metric(pack, "flyte_pack_results_lost_total") == 0
        assert len(records(caplog, contains="posting a result failed")) == 1, "one line for the outage, not per action"


def test_results_finished_during_a_503_outage_are_delivered_after_restore(flyte_api):
    gate = Gate()
    with running_pack(flyte_api, gate.pack_def()):
        ids = flyte_api.enqueue_many(PACK_NAME, "Wait", [1, 2, 3])
        wait_until(lambda: gate.entered == 3, what="all actions taken")
        flyte_api.outage("503")
        gate.opened.set()
        wait_until(lambda: len(flyte_api.requests_for("result")) >= 6, what="result posts answered 503")
        flyte_api.restore()
        flyte_api.wait_for_results(ids, timeout=8)
        assert_all_completed_once(flyte_api, ids)
        assert not flyte_api.pending()


def test_result_post_that_times_out_is_sent_again_and_lands_once(flyte_api):
    # The first post hangs past the client's 0.5 s timeout; the server still
    # processes it later, after the retry has landed, and refuses it then.
    with running_pack(flyte_api, timeout=0.5) as pack:
        flyte_api.delay("result", 1.5, before=True)
        aid = flyte_api.enqueue(PACK_NAME, "Echo", {"x": 1})
        result = flyte_api.wait_for_result(aid, timeout=5)
        assert (result.event, result.payload["input"]) == ("Done", {"x": 1})
        wait_until(lambda: all(r.status is not None for r in result_requests(flyte_api, aid)), 3,
                   "the hung post answered")
        statuses = sorted(r.status for r in result_requests(flyte_api, aid))
        assert statuses == [202, 500]  # the retry landed; the late original found the action done
        assert flyte_api.action(aid).state == "SUCCESS"
        assert metric(pack, "flyte_pack_results_lost_total") == 0


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_result_post_is_retried_on_overload_and_gateway_errors(flyte_api, status):
    with running_pack(flyte_api) as pack:
        flyte_api.fail("result", status, times=2)
        aid = flyte_api.enqueue(PACK_NAME, "Echo", "hi")
        assert flyte_api.wait_for_result(aid, timeout=6).event == "Done"
        assert [r.status for r in result_requests(flyte_api, aid)] == [status, status, 202]
        assert_all_completed_once(flyte_api, [aid])
        assert metric(pack, "flyte_pack_result_retries_total") == 2


def test_result_answered_500_is_tried_twice_more_then_given_up(flyte_api, caplog):
    caplog.set_level(logging.INFO)
    with running_pack(flyte_api) as pack:
        flyte_api.fail("result", 500, times=None)
        aid = flyte_api.enqueue(PACK_NAME, "Echo", "hi")
        # The action's greenlet ends (and is counted) once delivery is given up.
        wait_until(lambda: metric(pack, "flyte_pack_actions_total", command="Echo", outcome="success") == 1, 8,
                   "result delivery given up")
        gevent.sleep(0.3)
        assert [r.status for r in result_requests(flyte_api, aid)] == [500, 500, 500]
        assert records(caplog, logging.ERROR, contains=aid), "giving up is logged with the action id"
        assert metric(pack, "flyte_pack_results_lost_total") == 1


def test_result_whose_response_was_lost_is_not_posted_again_after_a_500(flyte_api):
    # The server completes the action but the connection drops before the 202:
    # the retry is refused with 500 ("not PENDING"), which means it is done.
    with running_pack(flyte_api) as pack:
        flyte_api.drop_response("result")
        aid = flyte_api.enqueue(PACK_NAME, "Echo", {"k": "v"})
        result = flyte_api.wait_for_result(aid, timeout=5)
        wait_until(lambda: metric(pack, "flyte_pack_actions_total", command="Echo", outcome="success") == 1, 5,
                   "delivery finished")
        gevent.sleep(1.2)  # longer than the next backoff step: a third post would have happened by now
        assert (result.event, result.payload["input"]) == ("Done", {"k": "v"})
        assert flyte_api.action(aid).state == "SUCCESS"
        assert [r.status for r in result_requests(flyte_api, aid)] == [None, 500]
        assert_all_completed_once(flyte_api, [aid], allow_repeats_after={aid})
        assert metric(pack, "flyte_pack_results_lost_total") == 0


def test_result_refused_with_400_completes_the_action_as_fatal_naming_the_event(flyte_api, caplog):
    with running_pack(flyte_api):
        flyte_api.fail("result", 400)
        aid = flyte_api.enqueue(PACK_NAME, "Echo", "hi")
        result = flyte_api.wait_for_result(aid, timeout=5)
        assert result.event == "FATAL"
        assert "Done" in result.payload and "400" in result.payload
        assert [r.status for r in result_requests(flyte_api, aid)] == [400, 202]
        assert flyte_api.action(aid).state == "FATAL"
        assert records(caplog, logging.ERROR, contains=aid)


def test_result_answered_404_registers_the_pack_again_and_is_delivered(flyte_api):
    gate = Gate()
    with running_pack(flyte_api, gate.pack_def()):
        aid = flyte_api.enqueue(PACK_NAME, "Wait", "x")
        wait_until(lambda: gate.entered == 1, what="action taken")
        flyte_api.delete_pack(PACK_NAME)
        deleted_at = time.monotonic()
        gate.opened.set()
        assert flyte_api.wait_for_result(aid, timeout=5).event == "Done"
        assert [r.status for r in result_requests(flyte_api, aid)] == [404, 202]
        assert flyte_api.action(aid).state == "SUCCESS"
        registrations = [r for r in flyte_api.requests_for("register") if r.at > deleted_at]
        assert len(registrations) == 1
        assert flyte_api.packs[PACK_NAME].registrations == 1


def test_result_for_an_action_the_server_does_not_know_is_given_up_after_one_reregistration(flyte_api, caplog):
    with running_pack(flyte_api) as pack:
        flyte_api.fail("result", 404, times=None)
        aid = flyte_api.enqueue(PACK_NAME, "Echo", "hi")
        wait_until(lambda: metric(pack, "flyte_pack_actions_total", command="Echo", outcome="success") == 1, 5,
                   "delivery given up")
        gevent.sleep(0.3)
        assert [r.status for r in result_requests(flyte_api, aid)] == [404, 404]
        # Not silent: the result did not land, so it is lost like any other.
        (line,) = records(caplog, logging.ERROR, contains=aid)
        assert "does not know the action" in line.getMessage()
        assert metric(pack, "flyte_pack_results_lost_total") == 1


def test_result_not_delivered_before_its_deadline_is_logged_as_lost_and_counted(flyte_api, caplog):
    with running_pack(flyte_api, result_deadline=1.0) as pack:
        flyte_api.fail("result", 503, times=None)
        aid = flyte_api.enqueue(PACK_NAME, "Echo", "hi")
        wait_until(lambda: metric(pack, "flyte_pack_results_lost_total") == 1, 5, "result counted as lost")
        lost = records(caplog, logging.ERROR, contains="lost")
        assert len(lost) == 1 and aid in lost[0].getMessage()
        assert len(result_requests(flyte_api, aid)) >= 2
        assert flyte_api.action(aid).state == "PENDING"  # what "lost" means: say so, loudly


# --- events ----------------------------------------------------------------------------------------------------


def test_send_event_retries_until_its_deadline_then_raises_delivery_error(flyte_api):
    with running_pack(flyte_api) as pack:
        flyte_api.fail("event", 503, times=None)
        started = time.monotonic()
        with pytest.raises(DeliveryError) as raised:
            pack.send_event(Event(noticed, {"n": 1}), timeout=1.0)
        elapsed = time.monotonic() - started
        assert 0.9 <= elapsed < 2.0
        assert raised.value.last_error is not None and raised.value.last_error.status == 503
        assert len(flyte_api.requests_for("event")) >= 2
        assert metric(pack, "flyte_pack_events_failed_total", event="Noticed") == 1


def test_send_event_is_retried_through_transient_errors(flyte_api):
    with running_pack(flyte_api) as pack:
        flyte_api.fail("event", 502)
        flyte_api.fail("event", 429)
        pack.send_event(Event(noticed, {"n": 2}), timeout=5)
        assert [e.payload for e in flyte_api.events] == [{"n": 2}]
        assert [r.status for r in flyte_api.requests_for("event")] == [502, 429, 202]


def test_send_event_refused_with_400_raises_at_once(flyte_api):
    with running_pack(flyte_api) as pack:
        flyte_api.fail("event", 400)
        with pytest.raises(FlyteHTTPError) as raised:
            pack.send_event(Event(noticed, {"n": 3}), timeout=5)
        assert raised.value.status == 400
        assert len(flyte_api.requests_for("event")) == 1


def test_events_only_pack_deleted_on_the_server_registers_again_and_delivers(flyte_api):
    ticker = PackDef("Ticker", event_defs=["Tick"])
    with running_pack(flyte_api, ticker) as pack:
        flyte_api.delete_pack("Ticker")
        pack.send_event(Event("Tick", {"n": 1}), timeout=5)
        flyte_api.delete_pack("Ticker")
        assert pack.send_event_nowait(Event("Tick", {"n": 2}))
        events = flyte_api.wait_for_events(2, timeout=5)
        assert [e.payload for e in events] == [{"n": 1}, {"n": 2}]
        assert [r.status for r in flyte_api.requests_for("event")] == [404, 202, 404, 202]
        assert len(flyte_api.requests_for("register")) == 3  # start-up, then once per deletion
        assert pack.live() == (True, "alive")


def test_send_event_nowait_buffers_while_the_api_is_down_and_reports_drops(flyte_api):
    with running_pack(flyte_api, event_buffer=2) as pack:
        flyte_api.outage("503")
        assert pack.send_event_nowait(Event(noticed, {"n": 0})) is True
        gevent.sleep(0.2)  # the sender takes it and is now retrying
        accepted = [pack.send_event_nowait(Event(noticed, {"n": n})) for n in range(1, 5)]
        assert accepted == [True, True, False, False]
        assert metric(pack, "flyte_pack_events_dropped_total") == 2
        flyte_api.restore()
        events = flyte_api.wait_for_events(3, timeout=8)
        assert [e.payload["n"] for e in events] == [0, 1, 2]
        gevent.sleep(0.3)
        assert len(flyte_api.events) == 3


# --- polling errors --------------------------------------------------------------------------------------------


def test_takes_back_off_during_an_outage_and_log_one_warning(flyte_api, caplog):
    with running_pack(flyte_api):
        gevent.sleep(0.6)
        flyte_api.clear_requests()
        flyte_api.fail("take", 503, times=None)
        gevent.sleep(3.5)
        takes = [r.at for r in flyte_api.requests_for("take")]
        gaps = [b - a for a, b in itertools.pairwise(takes)]
        # Delays start at the polling interval (0.5 s) and grow, jittered: 0.5, 0.5-1, 0.5-2, ...
        # A fixed 0.5 s spacing would make 7 or more takes; the jittered growth itself is
        # checked without timing in test_backoff_grows_with_jitter_and_is_capped.
        assert 3 <= len(takes) <= 6, f"{len(takes)} takes in 3.5 s"
        assert min(gaps) >= 0.45, f"takes not spaced: {gaps}"
        assert len(records(caplog, contains="take failed")) == 1


def test_take_500_is_a_lost_race_retried_soon_and_quietly(flyte_api, caplog):
    with running_pack(flyte_api):
        gevent.sleep(0.3)
        flyte_api.fail("take", 500)
        aid = flyte_api.enqueue(PACK_NAME, "Echo", "raced")
        assert flyte_api.wait_for_result(aid, timeout=3).event == "Done"
        takes = flyte_api.requests_for("take")
        refused = next(i for i, r in enumerate(takes) if r.status == 500)
        assert takes[refused + 1].at - takes[refused].at < 0.35, "retried at the polling interval, not soon"
        assert not records(caplog), [r.getMessage() for r in records(caplog)]


def test_take_500s_that_persist_are_an_outage_after_a_few_seconds(flyte_api, caplog):
    # A database error answers 500 to every take; lost races never last that long.
    with running_pack(flyte_api) as pack:
        gevent.sleep(0.3)
        flyte_api.fail("take", 500, times=None)
        gevent.sleep(2.0)
        assert not records(caplog), "a short run of take 500s is routine between replicas"
        # Counted as lost races, not as failed takes.
        assert metric(pack, "flyte_pack_take_errors_total", reason="race") > 0
        assert metric(pack, "flyte_pack_take_errors_total", reason="server_error") == 0
        wait_until(lambda: records(caplog, contains="take failed"), 3, "the persistent 500s reported")
        assert len(records(caplog, contains="take failed")) == 1
        quiet_retries = [r for r in flyte_api.requests_for("take") if r.status == 500]
        assert len(quiet_retries) < 60, f"{len(quiet_retries)} takes: hammering the server"


def test_log_throttle_logs_a_repeated_message_once_per_interval_with_a_count(caplog):
    caplog.set_level(logging.INFO)
    throttle = LogThrottle(logging.getLogger("flyte_gevent.test"), interval=0.3)
    for _ in range(5):
        throttle.log(logging.WARNING, "same", "take failed: %s", "boom")
    throttle.log(logging.WARNING, "other", "take failed: %s", "other")
    time.sleep(0.35)
    throttle.log(logging.WARNING, "same", "take failed: %s", "boom")
    assert [r.getMessage() for r in caplog.records] == [
        "take failed: boom", "take failed: other", "take failed: boom (4 more times in the last 0 s)"]


def test_backoff_grows_with_jitter_and_is_capped():
    backoff = Backoff(0.5, 4.0)
    delays = [backoff.next() for _ in range(50)]
    assert delays[0] == 0.5
    assert delays[1] <= 1.0 and delays[2] <= 2.0  # the ceiling doubles per attempt ...
    assert all(0.5 <= d <= 4.0 for d in delays)  # ... up to the cap
    assert max(delays) > 2.0  # and later delays use the room it gives
    assert len({round(d, 6) for d in delays[5:]}) > 10, "no jitter"
    backoff.reset()
    assert backoff.next() == 0.5


# --- the pack deleted on the server ----------------------------------------------------------------------------


def test_pack_deleted_mid_run_registers_again_once_and_completes_every_action(flyte_api, caplog):
    with running_pack(flyte_api, max_in_flight=20, max_takers=8) as pack:
        ids = flyte_api.enqueue_many(PACK_NAME, "Sleep", [{"seconds": 0.1, "tag": n} for n in range(60)])
        wait_until(lambda: sum(flyte_api.action(a).state == "SUCCESS" for a in ids) >= 10, what="10 done")
        deleted_at = time.monotonic()
        flyte_api.delete_pack(PACK_NAME)
        flyte_api.wait_until_idle(timeout=15)
        registrations = [r for r in flyte_api.requests_for("register") if r.at > deleted_at]
        assert len(registrations) == 1, f"{len(registrations)} registrations after one deletion"
        not_found = [r for r in flyte_api.requests if r.at > deleted_at and r.status == 404]
        assert not_found, "nothing noticed the deletion"
        for aid in ids:
            posts_404 = sum(r.status == 404 for r in result_requests(flyte_api, aid))
            assert flyte_api.action(aid).state == "SUCCESS"
            assert flyte_api.action(aid).result_posts - posts_404 == 1
        assert pack.live()[0]
        # a second deletion is handled the same way
        flyte_api.delete_pack(PACK_NAME)
        aid = flyte_api.enqueue(PACK_NAME, "Echo", "again")
        assert flyte_api.wait_for_result(aid, timeout=8).event == "Done"


# --- authentication --------------------------------------------------------------------------------------------


def test_rotated_token_is_reloaded_from_the_jwt_file_on_401(flyte_api, tmp_path, caplog):
    token_file = tmp_path / "token"
    token_file.write_text(SECRET_OLD + "\n")
    flyte_api.accepted_tokens = {SECRET_OLD}
    pack = Pack.from_env(make_pack_def(), {"FLYTE_API": flyte_api.url, "FLYTE_JWT_FILE": str(token_file)},
                         polling_interval=0.5, health_port=None, metrics=False)
    pack.start(timeout=5)
    try:
        # The secret is rotated: the file first (as a mounted secret would be), then the server.
        token_file.write_text(SECRET_NEW + "\n")
        flyte_api.clear_requests()
        flyte_api.accepted_tokens = {SECRET_NEW}
        aid = flyte_api.enqueue(PACK_NAME, "Echo", "rotated")
        assert flyte_api.wait_for_result(aid, timeout=5).event == "Done"
        pack.send_event(Event(noticed, {}), timeout=5)
        assert flyte_api.requests[0].status == 401
        assert [r.status for r in flyte_api.requests if r.status == 401] == [401], "reloaded once, not per request"
        assert all(r.headers.get("authorization") == f"Bearer {SECRET_NEW}" for r in flyte_api.requests[1:])
        assert not records(caplog, logging.ERROR) and not records(caplog, logging.WARNING)
    finally:
        pack.stop(grace_period=0)
    assert SECRET_OLD not in caplog.text and SECRET_NEW not in caplog.text


def test_token_that_stays_invalid_is_logged_loudly_backed_off_and_never_printed(flyte_api, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    token_file = tmp_path / "token"
    token_file.write_text(SECRET_OLD)
    flyte_api.accepted_tokens = {SECRET_OLD}
    gate = Gate()
    with running_pack(flyte_api, gate.pack_def(), jwt_file=str(token_file)) as pack:
        aid = flyte_api.enqueue(PACK_NAME, "Wait", "x")
        wait_until(lambda: gate.entered == 1, what="action taken")
        flyte_api.accepted_tokens = {SECRET_NEW}  # the file still holds the old one
        flyte_api.clear_requests()
        gate.opened.set()
        gevent.sleep(2.5)
        takes = flyte_api.requests_for("take")
        assert all(r.status == 401 for r in takes)
        assert len(takes) <= 2 * 5, f"{len(takes)} takes in 2.5 s: not backing off"  # a retry after each reload
        # Loud (ERROR), once for the takes and once for the held result, not once per attempt.
        assert len(records(caplog, logging.ERROR, contains="refuses the token")) == 1
        assert len(records(caplog, logging.ERROR, contains=aid)) == 1
        assert flyte_api.action(aid).state == "PENDING"
        token_file.write_text(SECRET_NEW)  # the operator fixes the secret: the held result goes through
        flyte_api.wait_for_result(aid, timeout=8)
        assert_all_completed_once(flyte_api, [aid])
        with pytest.raises(DeliveryError) as raised:
            flyte_api.accepted_tokens = {"a-third-token"}
            pack.send_event(Event(noticed, {}), timeout=1)
        assert SECRET_NEW not in str(raised.value)
    assert SECRET_OLD not in caplog.text and SECRET_NEW not in caplog.text


# --- start-up and per-action timeout ---------------------------------------------------------------------------


def test_start_keeps_retrying_while_the_api_is_down_and_warns_once(flyte_api, caplog):
    flyte_api.outage("503")
    pack = Pack(make_pack_def(), Client(flyte_api.url, timeout=2), polling_interval=0.5, health_port=None,
                metrics=False)
    starting = gevent.spawn(pack.start)
    try:
        gevent.sleep(2.5)
        assert not starting.ready() and not pack.registered
        attempts = len(flyte_api.requests_for("v1"))
        assert 2 <= attempts <= 4, f"{attempts} registration attempts in 2.5 s"
        assert len(records(caplog, contains="cannot register")) == 1, "one warning per interval, not per attempt"
        flyte_api.restore()
        starting.get(timeout=5)
        assert pack.registered
        aid = flyte_api.enqueue(PACK_NAME, "Echo", "up")
        assert flyte_api.wait_for_result(aid, timeout=5).event == "Done"
    finally:
        starting.kill()
        pack.stop(grace_period=0)


def test_start_with_a_timeout_raises_when_the_api_stays_down(flyte_api):
    flyte_api.outage("refuse")
    pack = Pack(make_pack_def(), Client(flyte_api.url, timeout=1), polling_interval=0.5, health_port=None,
                metrics=False)
    started = time.monotonic()
    try:
        with pytest.raises(FlyteError) as raised:
            pack.start(timeout=1.5)
        assert 1.4 <= time.monotonic() - started < 3.0
        assert "1.5 s" in str(raised.value)
        assert not pack.registered
    finally:
        pack.stop(grace_period=0)


@pytest.mark.parametrize("where", ["command", "pack"])
def test_action_running_past_its_timeout_is_completed_as_fatal(flyte_api, where):
    finished = []

    def slow(input):
        gevent.sleep(5)
        finished.append(input)
        return Event(done, input)

    pack_def = PackDef(PACK_NAME, commands=[Command("Slow", slow, [done], timeout=0.5 if where == "command" else None)])
    options = {"action_timeout": 0.5} if where == "pack" else {}
    with running_pack(flyte_api, pack_def, **options) as pack:
        aid = flyte_api.enqueue(PACK_NAME, "Slow", "x")
        result = flyte_api.wait_for_result(aid, timeout=4)
        assert (result.event, result.payload) == ("FATAL", "timed out after 0.5 s")
        assert_all_completed_once(flyte_api, [aid])
        wait_until(lambda: metric(pack, "flyte_pack_actions_total", command="Slow", outcome="timeout") == 1, 2,
                   "the timeout counted")
        gevent.sleep(0.2)
        assert not finished


def test_a_retried_event_getting_through_ends_the_takes_backoff_early(flyte_api):
    # The first take fails, so takes back off one polling interval (3 s here). When a
    # retried event then gets through, the API is back: takes resume at once.
    flyte_api.fail("take", 503, times=1)
    with running_pack(flyte_api, polling_interval=3.0) as pack:
        wait_until(lambda: flyte_api.requests_for("take"), what="the first (failing) take")
        flyte_api.fail("event", 503, times=1)
        started = time.monotonic()
        action = flyte_api.enqueue(PACK_NAME, "Echo", {"n": 1})
        pack.send_event(Event(noticed, {"n": 1}))  # 503, then accepted after ~0.5 s
        assert flyte_api.wait_for_result(action, timeout=2.5).event == "Done"
        assert time.monotonic() - started < 2.0, "the take waited out its whole backoff"


def test_a_refused_connection_is_known_not_to_have_reached_the_server(flyte_api):
    client = Client(flyte_api.url, timeout=1.0)
    registration = client.register(make_pack_def())
    flyte_api.outage()
    with pytest.raises(FlyteError) as caught:
        client.post_event(registration.events_url, b'{"event":"X","payload":null}')
    assert caught.value.request_sent is False
    flyte_api.restore()
    flyte_api.delay("event", 2.0)
    with pytest.raises(FlyteError) as caught:
        client.post_event(registration.events_url, b'{"event":"X","payload":null}')
    assert caught.value.request_sent is None  # sent, answer unknown
