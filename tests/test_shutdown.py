"""Graceful shutdown: Pack.stop() in process, and SIGTERM to a pack process.

A stop takes no more actions, lets running handlers finish within the grace
period, completes the ones still running as FATAL "pack shutting down", flushes
results and queued events, and returns, so the process exits 0. Every test
checks the server's view afterwards: nothing left PENDING, one result each.
"""

import json
import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import gevent
import pytest
from prometheus_client import CollectorRegistry

from flyte_gevent import Client, Event, Pack
from helpers import wait_until
from packs_for_tests import PACK_NAME, make_pack_def, noticed

SHUTDOWN = "pack shutting down"
PACK_SCRIPT = os.path.join(os.path.dirname(__file__), "packs_for_tests.py")


def new_pack(api, **options):
    options.setdefault("polling_interval", 0.5)
    options.setdefault("health_port", None)
    options.setdefault("metrics", CollectorRegistry())
    return Pack(make_pack_def(), Client(api.url, timeout=options.pop("timeout", 2.0)), **options)


def readyz(pack):
    """Status and reason of the pack's readiness probe, over HTTP."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{pack.health_port}/readyz", timeout=2) as response:
            return response.status, json.load(response)["reason"]
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)["reason"]


def sleeps(api, *seconds):
    return api.enqueue_many(PACK_NAME, "Sleep", [{"seconds": s, "tag": i} for i, s in enumerate(seconds)])


def assert_completed_once(api, ids):
    for aid in ids:
        action = api.action(aid)
        assert action.state in ("SUCCESS", "FATAL"), f"{aid} left {action.state}"
        assert action.result_posts == 1, f"{aid}: {action.result_posts} result posts"


# --- in process ------------------------------------------------------------------------------------------------


def test_stop_finishes_quick_actions_cuts_long_ones_flushes_events_and_is_not_ready(flyte_api):
    pack = new_pack(flyte_api, health_port=0, health_host="127.0.0.1", grace_period=1.0, flush_timeout=3.0)
    pack.start(timeout=5)
    try:
        assert readyz(pack)[0] == 200
        quick, slow = sleeps(flyte_api, 0.4, 0.4, 0.4), sleeps(flyte_api, 30, 30)
        wait_until(lambda: len(flyte_api.pending()) == 5, what="all five actions taken")
        flyte_api.fail("event", 503, times=2)  # the queued events need retries during the flush
        assert all(pack.send_event_nowait(Event(noticed, {"n": n})) for n in range(3))

        started = time.monotonic()
        stopping = gevent.spawn(pack.stop)
        gevent.sleep(0.1)
        assert readyz(pack) == (503, "shutting down")
        stopping.get(timeout=6)
        elapsed = time.monotonic() - started
    finally:
        pack.stop(grace_period=0)

    assert 0.9 <= elapsed < 3.0, f"stop took {elapsed:.1f} s with a 1 s grace period"
    for aid in quick:
        assert flyte_api.action(aid).state == "SUCCESS"
    for aid in slow:
        assert flyte_api.action(aid).result == {"event": "FATAL", "payload": SHUTDOWN,
                                                "createdAt": flyte_api.action(aid).result["createdAt"]}
    assert_completed_once(flyte_api, quick + slow)
    assert sorted(e.payload["n"] for e in flyte_api.events) == [0, 1, 2]
    assert not [r for r in flyte_api.requests_for("take") if r.at > started + 0.1], "took actions while stopping"
    assert not [r for r in flyte_api.requests if r.route == "delete_pack"], "a stop must never delete the pack"
    assert pack.live() == (False, "stopped")


def test_action_taken_while_stopping_is_completed_not_stranded(flyte_api):
    # The take is answered only after the grace period has ended: the action is
    # ours (PENDING on the server), so it must still get a result.
    pack = new_pack(flyte_api, grace_period=0.3, flush_timeout=3.0)
    pack.start(timeout=5)
    gevent.sleep(0.1)
    flyte_api.delay("take", 1.0, before=True)
    gevent.sleep(0.6)  # the idle taker is now waiting on the delayed take
    aid = flyte_api.enqueue(PACK_NAME, "Echo", "late")
    pack.stop()
    action = flyte_api.action(aid)
    assert action.state != "PENDING", "taken during shutdown and never completed"
    assert (action.result["event"], action.result["payload"]) == ("FATAL", SHUTDOWN)
    assert_completed_once(flyte_api, [aid])


def test_stop_when_results_cannot_be_delivered_gives_up_after_the_flush_timeout_and_says_so(flyte_api, caplog):
    pack = new_pack(flyte_api, grace_period=2.0, flush_timeout=1.0)
    pack.start(timeout=5)
    try:
        [aid] = sleeps(flyte_api, 0.5)
        wait_until(lambda: flyte_api.action(aid).state == "PENDING", what="action taken")
        flyte_api.outage("refuse")
        started = time.monotonic()
        pack.stop()
        elapsed = time.monotonic() - started
    finally:
        flyte_api.restore()
    assert elapsed < 3.5, f"stop took {elapsed:.1f} s with a 1 s flush timeout"
    lost = [r for r in caplog.records if r.levelno == logging.ERROR and aid in r.getMessage()]
    assert lost and "lost" in lost[0].getMessage()
    # Not guaranteed, and said so: the server never re-offers it.
    assert flyte_api.action(aid).state == "PENDING"


def test_a_later_stop_with_a_shorter_grace_period_shortens_the_stop_in_progress(flyte_api):
    pack = new_pack(flyte_api, grace_period=20.0, flush_timeout=3.0)
    pack.start(timeout=5)
    [aid] = sleeps(flyte_api, 30)
    wait_until(lambda: flyte_api.action(aid).state == "PENDING", what="action taken")
    first = gevent.spawn(pack.stop)  # waits up to 20 s for the handler
    gevent.sleep(0.2)
    started = time.monotonic()
    pack.stop(grace_period=0)  # e.g. an orchestrator's deadline coming closer
    assert time.monotonic() - started < 2.0
    first.join(timeout=1)
    assert first.dead
    assert flyte_api.action(aid).result["payload"] == SHUTDOWN
    assert_completed_once(flyte_api, [aid])


def test_stop_while_registration_is_still_retrying_returns_promptly(flyte_api):
    flyte_api.outage("refuse")
    pack = new_pack(flyte_api)
    starting = gevent.spawn(pack.start)
    gevent.sleep(1.5)
    started = time.monotonic()
    pack.stop()
    assert time.monotonic() - started < 1.0
    starting.get(timeout=2)  # start returns without raising
    assert not pack.registered


# --- a pack process and SIGTERM --------------------------------------------------------------------------------


@pytest.fixture
def pack_process(flyte_api, python, subprocess_env):
    """Start tests/packs_for_tests.py as a pack process; killed at the end whatever happens."""
    processes = []

    def start(**env):
        environment = dict(subprocess_env, FLYTE_API=flyte_api.url, FLYTE_HEALTH_PORT="off",
                           FLYTE_GEVENT_POLLING_INTERVAL="0.5", **env)
        process = subprocess.Popen([python, PACK_SCRIPT], env=environment, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=5)


def finish(process, timeout):
    """Wait for *process* to exit; its return code and stderr (shown when an assertion fails)."""
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate(timeout=5)
        raise AssertionError(f"the pack process did not exit within {timeout} s:\n{stderr}") from None
    return process.returncode, stderr


def test_sigterm_finishes_short_actions_fails_long_ones_and_exits_0(flyte_api, pack_process):
    process = pack_process(FLYTE_GEVENT_GRACE_PERIOD="1.5")
    flyte_api.wait_for_pack(PACK_NAME, timeout=10)
    short, long = sleeps(flyte_api, 0.5, 0.5, 0.5), sleeps(flyte_api, 60, 60)
    wait_until(lambda: len(flyte_api.pending()) == 5, 5, "all five actions taken")

    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code, stderr = finish(process, timeout=10)
    elapsed = time.monotonic() - started

    assert code == 0, stderr
    assert 1.4 <= elapsed < 4.5, f"exited after {elapsed:.1f} s with a 1.5 s grace period"
    for aid in short:
        assert flyte_api.action(aid).state == "SUCCESS", stderr
    for aid in long:
        assert flyte_api.action(aid).result["event"] == "FATAL"
        assert flyte_api.action(aid).result["payload"] == SHUTDOWN
    assert_completed_once(flyte_api, short + long)
    assert not flyte_api.pending()
    assert "SIGTERM received" in stderr


def test_second_sigterm_forces_a_quick_stop(flyte_api, pack_process):
    process = pack_process(FLYTE_GEVENT_GRACE_PERIOD="30")
    flyte_api.wait_for_pack(PACK_NAME, timeout=10)
    long = sleeps(flyte_api, 60, 60)
    wait_until(lambda: len(flyte_api.pending()) == 2, 5, "both actions taken")

    process.send_signal(signal.SIGTERM)
    gevent.sleep(0.5)
    assert process.poll() is None, "the first signal must wait for the grace period"
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code, stderr = finish(process, timeout=15)
    elapsed = time.monotonic() - started

    assert code == 0, stderr
    # Cut short: the grace period was 30 s (a forced stop leaves results a few seconds to be posted).
    assert elapsed < 10.0, f"forced stop took {elapsed:.1f} s"
    for aid in long:
        assert flyte_api.action(aid).result["payload"] == SHUTDOWN, stderr
    assert_completed_once(flyte_api, long)
