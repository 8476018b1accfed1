"""One delivery mechanism, two policies (flyte_gevent._delivery): the same answers, for a result and for an event.

Each case makes the fake Flyte API answer a result post and an event post the same way, then checks what each
kind did with it: a result is delivered exactly once (or lost, said at ERROR and counted), an event at least once
(or the sender gets an exception). Retry delays are shortened; the policy is the library's.
"""

import logging

import pytest
from prometheus_client import CollectorRegistry

import flyte_gevent._delivery as delivery_module
from flyte_gevent import Command, DeliveryError, Event, EventDef, FlyteHTTPError, PackDef
from helpers import wait_until

done = EventDef("Done")
tick = EventDef("Tick")

# answers injected before the fake processes the post -> (result statuses, event the server completed the action
# with, "lost", or None for an injected 2xx the fake never processed), (event statuses, "sent" or what is raised)
CASES = {
    "2xx-is-accepted": ([204], ([204], None), ([204], "sent")),
    "400": ([400], ([400, 202], "FATAL"), ([400], FlyteHTTPError)),
    "404-registers-again": ([404], ([404, 202], "Done"), ([404, 202], "sent")),
    "overload-and-gateway-errors": ([429, 503], ([429, 503, 202], "Done"), ([429, 503, 202], "sent")),
    "one-500": ([500], ([500, 202], "Done"), ([500, 202], "sent")),
    "500s-persist": ([500] * 5, ([500, 500, 500], "lost"), ([500] * 5 + [202], "sent")),
    "gateway-then-500s": ([502] + [500] * 4, ([502, 500, 500, 500], "lost"), ([502] + [500] * 4 + [202], "sent")),
    "no-retry-can-fix-it": ([403], ([403], "lost"), ([403], FlyteHTTPError)),
}


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(delivery_module, "_RESULT_BACKOFF", (0.02, 0.05))
    monkeypatch.setattr(delivery_module, "_EVENT_BACKOFF", (0.02, 0.05))


@pytest.mark.parametrize("answers, result, event", CASES.values(), ids=CASES.keys())
def test_results_and_events_meet_the_same_answers_with_their_own_policy(flyte_api, make_pack, caplog, quick_retries,
                                                                         answers, result, event):
    registry = CollectorRegistry()
    pack = make_pack(PackDef("Deliverer", commands=[Command("Echo", lambda input: Event(done, input), [done])],
                             event_defs=[tick]), start=True, metrics=registry)
    for status in answers:
        flyte_api.fail("result", status)
    aid = flyte_api.enqueue("Deliverer", "Echo", "x")
    wait_until(lambda: registry.get_sample_value("flyte_pack_actions_total",
                                                 {"command": "Echo", "outcome": "success"}), 3, "the action done")
    (result_statuses, result_event) = result
    assert [r.status for r in flyte_api.requests_for("result")] == result_statuses
    lost = registry.get_sample_value("flyte_pack_results_lost_total", {})
    if result_event == "lost":
        assert flyte_api.action(aid).result is None
        assert lost == 1
        assert [r for r in caplog.records if r.levelno == logging.ERROR and aid in r.getMessage()]
    else:
        assert lost == 0
        if result_event is not None:
            assert flyte_api.action(aid).result["event"] == result_event

    flyte_api.clear_faults()
    for status in answers:
        flyte_api.fail("event", status)
    (event_statuses, sent) = event
    if sent == "sent":
        pack.send_event(Event(tick, {"n": 1}), timeout=3)
        assert registry.get_sample_value("flyte_pack_events_sent_total", {"event": "Tick"}) == 1
    else:
        with pytest.raises(sent) as raised:
            pack.send_event(Event(tick, {"n": 1}), timeout=3)
        assert raised.value.status == answers[-1]
        assert registry.get_sample_value("flyte_pack_events_failed_total", {"event": "Tick"}) == 1
    assert [r.status for r in flyte_api.requests_for("event")] == event_statuses


def test_an_event_not_accepted_by_its_deadline_raises_delivery_error_with_the_last_error(flyte_api, make_pack,
                                                                                           quick_retries):
    pack = make_pack(PackDef("Deliverer", event_defs=[tick]), start=True)
    flyte_api.fail("event", 503, times=None)
    with pytest.raises(DeliveryError) as raised:
        pack.send_event(Event(tick, {"n": 1}), timeout=0.3)
    assert raised.value.last_error.status == 503
    assert "event 'Tick' not delivered: not accepted within 0.3 s" in str(raised.value)
