"""Prometheus metrics: /metrics on the health server, one private registry per pack, and no prometheus_client."""

import functools
import json
import subprocess
import urllib.error
import urllib.request

import gevent
import prometheus_client
import pytest
from marshmallow import Schema, fields
from prometheus_client.parser import text_string_to_metric_families

import flyte_gevent
from flyte_gevent import Command, Event, EventDef, FlyteHTTPError, PackDef, fatal_event

done = EventDef("Done")
tick = EventDef("Tick")


class NameSchema(Schema):
    name = fields.String(required=True)


def _boom(input):
    raise RuntimeError("boom")


def _slow(input):
    gevent.sleep(0.4)
    return Event(done, None)


def _pack_def(name="Metered"):
    return PackDef(name, event_defs=[tick], commands=[
        Command("ok", lambda input: Event(done, input), [done]),
        Command("boom", _boom, [done]),
        Command("refuse", lambda input: fatal_event("no"), [done]),
        Command("slow", _slow, [done]),
        Command("typed", lambda input: Event(done, input), [done], input_schema=NameSchema),
    ])


@pytest.fixture
def run_pack(run_pack):
    """The shared fixture, with a health server on a free loopback port to scrape /metrics from."""
    return functools.partial(run_pack, health_port=0)


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status, response.headers.get("Content-Type"), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), exc.read().decode()


def scrape(pack):
    """``{(sample name, frozenset(labels)): value}`` from the pack's /metrics."""
    status, content_type, text = _get(f"http://127.0.0.1:{pack.health_port}/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_actions_durations_in_flight_errors_retries_and_events(flyte_api, run_pack):
    pack = run_pack(_pack_def())
    samples = scrape(pack)
    assert value(samples, "flyte_pack_registered") == 1
    assert value(samples, "flyte_pack_info", pack="Metered", version=flyte_gevent.__version__) == 1

    flyte_api.fail("take", 503)          # the next take fails once
    flyte_api.fail("result", 503)        # the first result post is retried once
    ids = [flyte_api.enqueue("Metered", command, input) for command, input in [
        ("ok", {"n": 1}), ("ok", {"n": 2}), ("boom", None), ("refuse", None), ("typed", {"nope": 1}),
        ("typed", {"name": "x"}), ("undeclared", None)]]
    flyte_api.wait_for_results(ids, timeout=10)

    slow = flyte_api.enqueue("Metered", "slow")
    with gevent.Timeout(5):
        while flyte_api.action(slow).state != "PENDING":
            gevent.sleep(0.01)
    assert value(scrape(pack), "flyte_pack_actions_in_flight") == 1
    flyte_api.wait_for_result(slow)
    gevent.sleep(0.05)  # the result is posted before the action's bookkeeping ends

    pack.send_event(Event(tick, {"n": 1}), timeout=5)
    flyte_api.fail("event", 400)
    with pytest.raises(FlyteHTTPError):
        pack.send_event(Event(tick, {"n": 2}), timeout=5)

    samples = scrape(pack)
    completed = {(dict(labels)["command"], dict(labels)["outcome"]): v for (name, labels), v in samples.items()
                 if name == "flyte_pack_actions_total"}
    assert completed == {("ok", "success"): 2, ("boom", "error"): 1, ("refuse", "fatal"): 1,
                         ("typed", "invalid_input"): 1, ("typed", "success"): 1, ("unknown", "unknown_command"): 1,
                         ("slow", "success"): 1}
    assert value(samples, "flyte_pack_actions_taken_total", command="ok") == 2
    assert value(samples, "flyte_pack_actions_taken_total", command="unknown") == 1  # no label per bogus name
    assert value(samples, "flyte_pack_actions_in_flight") == 0
    assert value(samples, "flyte_pack_action_duration_seconds_count", command="slow") == 1
    assert value(samples, "flyte_pack_action_duration_seconds_sum", command="slow") >= 0.4
    assert value(samples, "flyte_pack_action_duration_seconds_bucket", command="slow", le="0.25") == 0
    assert value(samples, "flyte_pack_action_duration_seconds_bucket", command="slow", le="+Inf") == 1
    assert value(samples, "flyte_pack_take_errors_total", reason="server_error") == 1
    assert value(samples, "flyte_pack_result_retries_total") == 1
    assert value(samples, "flyte_pack_events_sent_total", event="Tick") == 1
    assert value(samples, "flyte_pack_events_failed_total", event="Tick") == 1


def test_each_pack_has_its_own_registry(flyte_api, run_pack):
    first, second = run_pack(_pack_def("First")), run_pack(_pack_def("Second"))
    flyte_api.wait_for_results([flyte_api.enqueue("First", "ok"), flyte_api.enqueue("First", "ok"),
                                flyte_api.enqueue("Second", "ok")])
    gevent.sleep(0.05)
    assert value(scrape(first), "flyte_pack_actions_total", command="ok", outcome="success") == 2
    assert value(scrape(second), "flyte_pack_actions_total", command="ok", outcome="success") == 1
    # Nothing lands in prometheus_client's global registry, which the embedding app may own.
    assert prometheus_client.REGISTRY.get_sample_value("flyte_pack_actions_total",
                                                       {"command": "ok", "outcome": "success"}) is None


def test_a_given_registry_is_used_and_metrics_false_turns_them_off(flyte_api, run_pack):
    registry = prometheus_client.CollectorRegistry()
    pack = run_pack(_pack_def("Shared"), metrics=registry)
    flyte_api.wait_for_result(flyte_api.enqueue("Shared", "ok"))
    gevent.sleep(0.05)
    assert registry.get_sample_value("flyte_pack_actions_total", {"command": "ok", "outcome": "success"}) == 1
    assert value(scrape(pack), "flyte_pack_actions_total", command="ok", outcome="success") == 1

    off = run_pack(_pack_def("Unmetered"), metrics=False)
    assert _get(f"http://127.0.0.1:{off.health_port}/metrics")[0] == 404


_WITHOUT_PROMETHEUS = r"""
import sys
sys.modules["prometheus_client"] = None          # "import prometheus_client" now raises ImportError
from gevent import monkey; monkey.patch_all()
import json, urllib.error, urllib.request
import flyte_gevent
from flyte_gevent import Client, Command, Event, Pack, PackDef
from flyte_gevent.testing import FakeFlyteApi

def status(url):
    try:
        return urllib.request.urlopen(url, timeout=3).status
    except urllib.error.HTTPError as exc:
        return exc.code

with FakeFlyteApi() as api:
    pack = Pack(PackDef("Bare", commands=[Command("ok", lambda i: Event("Done", i), ["Done"])]),
                Client(api.url), health_port=0, health_host="127.0.0.1", polling_interval=0.5)
    pack.start(timeout=5)
    result = api.wait_for_result(api.enqueue("Bare", "ok", {"x": 1}))
    base = f"http://127.0.0.1:{pack.health_port}"
    report = {"event": result.event, "metrics": status(base + "/metrics"), "readyz": status(base + "/readyz")}
    try:
        Pack(pack.pack_def, Client(api.url), health_port=None, metrics=True)
    except ImportError as exc:
        report["metrics_true"] = str(exc)
    pack.stop(grace_period=0)
print(json.dumps(report))
"""


def test_without_prometheus_client_the_pack_works_and_metrics_is_404(python, subprocess_env):
    result = subprocess.run([python, "-c", _WITHOUT_PROMETHEUS], env=subprocess_env, capture_output=True, text=True,
                            timeout=20)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == {"event": "Done", "metrics": 404, "readyz": 200,
                      "metrics_true": "metrics=True needs prometheus_client: pip install 'flyte-gevent[metrics]'"}
