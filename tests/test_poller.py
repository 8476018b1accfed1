"""The taking strategy against a server whose takes race (flyte_gevent._poller).

The fake reproduces the two things of the real Flyte server the strategy is designed around: concurrent takes of
the same action race, the loser answered 500 (``race_window``: the time between a take finding the oldest NEW
action and claiming it), and a take's own cost (``take_cost`` per NEW action, which widens that window as the real
server's read of the backlog does). ``latency`` stands for the round trip. Each test queues a backlog first, then
starts the pack, as ``bench/run.py --server real`` does, and asserts what the server saw: how many takes lost a
race per action taken, how takes overlapped, what a 204 or a persistent 500 did to them. No speed is asserted.
"""

import itertools
import logging

import gevent
import pytest
from prometheus_client import CollectorRegistry

from flyte_gevent import Client, Command, Event, EventDef, Pack, PackDef, _poller
from helpers import wait_until

PACK = "Takers"
done = EventDef("Done")


def pack_def(tag="a"):
    """A pack whose one command answers ``Done`` with *tag*: replicas with different tags tell who took what."""
    def echo(input):
        return Event(done, {"tag": tag})
    return PackDef(PACK, commands=[Command("Echo", echo, [done])])


def start(api, tag="a", *, definition=None, **options):
    """A started pack of *definition* (by default :func:`pack_def` with *tag*) against *api*."""
    options = {"polling_interval": 0.5, "health_port": None, "flush_timeout": 1.0, "grace_period": 0.5,
               "metrics": CollectorRegistry(), **options}
    pack = Pack(definition or pack_def(tag), Client(api.url, timeout=5.0), **options)
    pack.start(timeout=5)
    return pack


def drain(api, count):
    """Queue *count* actions, start a pack, wait until all have results and stop it: ``(ids, won, lost)``, the
    takes answered 200 and 500."""
    wait = drained(api, count)
    pack = start(api)
    try:
        ids = wait()
    finally:
        pack.stop(grace_period=0)
    return ids, len(takes(api, 200)), len(takes(api, 500))


def run_one_at_a_time(api, handler, count):
    """Queue *count* actions for a pack whose Echo command is *handler*, taking one at a time, until all have
    results; their ids."""
    ids = [api.enqueue(PACK, "Echo", {"n": n}) for n in range(count)]
    pack = start(api, definition=PackDef(PACK, commands=[Command("Echo", handler, [done])]), polling_interval=0.2,
                 max_takers=1)
    try:
        api.wait_for_results(ids)
    finally:
        pack.stop(grace_period=0)
    return ids


def drained(api, count, timeout=10.0):
    """Queue *count* actions; a function that waits until all have results and returns their ids."""
    ids = [api.enqueue(PACK, "Echo", {"n": n}) for n in range(count)]

    def wait():
        wait_until(lambda: all(api.actions[aid].result is not None for aid in ids), timeout,
                   f"{count} actions completed")
        return ids
    return wait


def takes(api, status=None):
    return [r for r in api.requests_for("take") if status is None or r.status == status]


def in_flight_at_once(api, duration, since=0.0):
    """The most takes that arrived within *duration* of each other (of those that arrived at *since* or later):
    how many were in flight together."""
    arrivals = sorted(r.at for r in takes(api) if r.at >= since)
    most, first = 0, 0
    for last, at in enumerate(arrivals):
        while at - arrivals[first] >= duration:
            first += 1
        most = max(most, last - first + 1)
    return most


@pytest.fixture
def api(fake_flyte_api):
    return fake_flyte_api


def test_takes_that_would_only_race_go_one_at_a_time_and_few_races_are_lost(api):
    # Every take holds its action 10 ms before claiming it and the network is instant: a second take in flight
    # can only pick the same action and lose.
    api.race_window = 0.01
    ids, won, lost = drain(api, 40)
    assert won == len(ids) and all(api.actions[aid].result_posts == 1 for aid in ids), "each action taken once"
    # The first race sets the spacing and a try or two at overlapping confirms it does not pay; the old strategy
    # (every lost race back to one taker, then up again one per action) lost about one race per action here.
    assert lost <= 0.25 * won, f"{lost} lost races for {won} actions"
    # Until the first lost race is answered nothing says overlapping does not pay, and each action taken allows
    # one more take in flight: a slow start of the second take can let a third leave before the first loss is
    # known. From that answer (its arrival plus the race window, at the earliest) on, no more than two.
    first_loss_answered = min(r.at for r in takes(api, 500)) + api.race_window if lost else 0.0
    assert in_flight_at_once(api, 0.009, since=first_loss_answered) <= 2


def test_with_a_round_trip_a_small_share_of_a_takes_latency_takes_never_try_overlapping_again(api):
    # The real server on loopback: a take is nearly all the server's read of the backlog, which overlapping
    # takes cannot shorten (it serves them one after another), so after the first lost race nothing is gained by
    # trying again, and each try loses races (the strategy before the round-trip share tried every few actions).
    api.race_window = 0.004
    ids, won, lost = drain(api, 150)
    assert won == len(ids)
    assert lost <= 3, f"{lost} lost races for {won} actions: takes kept trying to overlap"


def test_takes_overlap_spaced_apart_when_the_round_trip_is_most_of_a_takes_latency(api):
    # 30 ms of network per request, 3 ms between a take's read and its claim: several takes fit in one latency.
    api.latency = 0.03
    api.race_window = 0.003
    ids, won, lost = drain(api, 60)
    assert won == len(ids)
    assert lost <= 0.5 * won, f"{lost} lost races for {won} actions"
    # Taking one at a time would leave at least a latency (30 ms) between take arrivals, so no gap would be
    # under 20 ms; overlapping takes leave about half of them under it (a quarter is asked for: on a loaded
    # machine the pack's own latency widens some of them).
    arrivals = sorted(r.at for r in takes(api))
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    overlapped = sum(1 for gap in gaps if gap < 0.02)
    assert overlapped >= len(gaps) // 4, f"only {overlapped} of {len(arrivals)} takes overlapped another"
    # Spaced apart once the first races were lost, not sent in bursts.
    assert sum(1 for gap in gaps[10:] if gap < 0.001) <= 2, gaps


def test_a_take_cost_that_grows_with_the_backlog_is_followed_down(api):
    # As on the real server: the window is the take's read of the backlog, 0.5 ms per NEW action here.
    api.take_cost = 0.0005
    api.latency = 0.02
    wait = drained(api, 50)
    pack = start(api)
    spacings = []

    def watch():
        while True:
            spacings.append(getattr(pack._poller, "spacing", None) or 0.0)
            gevent.sleep(0.005)

    watcher = gevent.spawn(watch)
    try:
        ids = wait()
        spacing_at_the_end = getattr(pack._poller, "spacing", None)
    finally:
        watcher.kill()
        pack.stop(grace_period=0)
    won, lost = len(takes(api, 200)), len(takes(api, 500))
    assert won == len(ids)
    assert lost <= 0.5 * won, f"{lost} lost races for {won} actions"
    # At the start a take read 50 actions (25 ms more than at the end, when it reads one or two): the spacing
    # set by the early races narrows as the takes get cheaper, whatever the machine's own latency adds.
    assert spacing_at_the_end < 0.8 * max(spacings), (spacing_at_the_end, max(spacings))


def test_without_races_takers_grow_while_actions_come_and_drop_to_one_after_an_empty_take(api):
    api.latency = 0.02
    wait = drained(api, 80)
    pack = start(api, max_takers=16, polling_interval=0.2)
    try:
        wait()
        assert takes(api, 500) == []
        assert in_flight_at_once(api, 0.02) > 8, "takes in flight together grew with the actions taken"
        # The takes in flight when the backlog ran out answer 204 together, within a few latencies of the last
        # action; the empty takes after those are the idle poller's.
        settled = max(r.at for r in takes(api, 200)) + 0.1
        wait_until(lambda: len([r for r in takes(api, 204) if r.at > settled]) >= 3, 3, "three idle takes")
    finally:
        pack.stop(grace_period=0)
    idle = [r.at for r in takes(api, 204) if r.at > settled]
    # After the backlog, one take per polling interval.
    assert min(b - a for a, b in itertools.pairwise(idle)) >= 0.18, idle


def test_a_persistent_500_during_races_is_still_an_outage_and_takes_back_off(api, monkeypatch, caplog):
    monkeypatch.setattr(_poller, "_RACE_PERIOD", 0.5)
    caplog.set_level(logging.INFO, logger="flyte_gevent")
    api.race_window = 0.005
    wait = drained(api, 20)
    pack = start(api)
    try:
        wait()
        api.enqueue(PACK, "Echo", {"n": "stuck"})
        api.fail("take", 500, times=None)
        wait_until(lambda: any("take failed" in r.getMessage() for r in caplog.records), 3,
                   "the persistent 500s reported as failed takes")
        outage_began = len(takes(api))
        gevent.sleep(1.0)
        during = takes(api)[outage_began:]
        gaps = [b.at - a.at for a, b in itertools.pairwise(during)]
        assert len(during) <= 4 and all(gap >= 0.45 for gap in gaps), f"not backing off: {gaps}"
        assert pack._poller.consecutive_errors >= 2, "counted for readiness"
        assert len([r for r in caplog.records if "take failed" in r.getMessage()]) == 1
    finally:
        pack.stop(grace_period=0)


def test_replicas_share_the_backlog_each_action_once_and_their_races_are_quiet(api, caplog):
    caplog.set_level(logging.INFO, logger="flyte_gevent")
    api.race_window = 0.005
    # Which replica wins a race is a matter of timing, so each one's share is drawn by chance, in runs: the backlog
    # is long enough for the lead to change hands many times (of 60 actions, a replica took under a tenth in 1 to
    # 2 runs in 20).
    wait = drained(api, 400, timeout=20.0)
    # Started together, as replicas of one deployment are: one started a few hundred milliseconds ahead would
    # take much of the backlog alone before the other registered.
    starting = [gevent.spawn(start, api, tag) for tag in "ab"]
    gevent.joinall(starting, raise_error=True)
    replicas = [greenlet.value for greenlet in starting]
    try:
        ids = wait()
    finally:
        for pack in replicas:
            pack.stop(grace_period=0)
    results = [api.actions[aid].result for aid in ids]
    by_tag = {tag: sum(1 for r in results if r["payload"] == {"tag": tag}) for tag in "ab"}
    assert sum(by_tag.values()) == len(ids) == len(takes(api, 200)), "each action taken and completed once"
    assert min(by_tag.values()) >= len(ids) // 10, f"a replica hardly took any: {by_tag}"
    assert takes(api, 500), "the replicas did race"
    noisy = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy, noisy


# -- a slot's greenlet goes on taking -------------------------------------------------------------


def test_a_slots_greenlet_takes_and_runs_a_backlog_in_turn_each_action_in_a_fresh_context(api, caplog):
    """While a backlog lasts, the greenlet that ran an action makes the next take itself; what an action bound in
    its contextvars (the log context included) is gone for the next take and action, as in a new greenlet."""
    from contextvars import ContextVar

    from flyte_gevent.log import ActionContextFilter

    caplog.set_level(logging.WARNING, logger="flyte_gevent.poller")
    caplog.handler.addFilter(ActionContextFilter())
    bound = ContextVar("bound", default=None)
    ran = []

    def remember(input):
        ran.append((gevent.getcurrent(), bound.get()))
        bound.set(input["n"])
        if len(ran) == 5:
            api.fail("take", 503, times=1)  # the take after this action fails, and is logged
        return Event(done, {"n": input["n"]})

    ids = [api.enqueue(PACK, "Echo", {"n": n}) for n in range(5)]
    pack = start(api, definition=PackDef(PACK, commands=[Command("Echo", remember, [done])]), polling_interval=0.2,
                 max_in_flight=1)
    try:
        api.wait_for_results(ids)
        wait_until(lambda: any("take failed" in r.getMessage() for r in caplog.records), 3, "the failed take logged")
    finally:
        pack.stop(grace_period=0)
    assert len({greenlet for greenlet, _ in ran}) == 1, "one slot: one greenlet ran the five actions in turn"
    assert [value for _, value in ran] == [None] * 5, "each action starts with nothing bound by the one before"
    failed = [r for r in caplog.records if "take failed" in r.getMessage()]
    assert [r.action_id for r in failed] == [None], "the take after an action is logged without that action"


def test_taking_one_at_a_time_each_handed_over_action_starts_with_nothing_bound_by_the_one_before(api):
    """One take at a time, each action is handed to a greenlet that may have taken or run others before: what an
    action bound in its contextvars is gone for the next, as with max_in_flight=1 above."""
    from contextvars import ContextVar

    bound = ContextVar("bound", default=None)
    seen = []

    def remember(input):
        seen.append(bound.get())
        bound.set(input["n"])
        return Event(done, {"n": input["n"]})

    ids = run_one_at_a_time(api, remember, 8)
    assert seen == [None] * 8, "each action starts with nothing bound by the one before"
    assert all(api.actions[aid].result_posts == 1 for aid in ids)


def test_taking_one_at_a_time_the_next_take_leaves_before_the_action_just_taken_runs(api):
    """A take that brought an action hands it to a greenlet of its own and makes the next take before the action
    runs: handlers and result posts never hold up the takes behind them, and each action runs in a greenlet of its
    own."""
    ran = []

    def slow(input):
        ran.append((input["n"], gevent.getcurrent()))
        gevent.sleep(0.1)
        return Event(done, {"n": input["n"]})

    ids = run_one_at_a_time(api, slow, 5)
    brought = [r.at for r in takes(api, 200)]
    first_result = min(r.at for r in api.requests_for("result"))
    assert len(brought) == 5 and max(brought) < first_result, "all five taken before the first handler ended"
    assert len({greenlet for _, greenlet in ran}) == 5, "each action ran in a greenlet of its own"
    assert all(api.actions[aid].result_posts == 1 for aid in ids)
