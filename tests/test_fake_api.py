"""FakeFlyteApi against the Flyte protocol (docs/flyte-api.md Part 1), spoken with plain requests."""

import re
import signal
import subprocess
import textwrap
import time

import gevent
import pytest
import requests

from flyte_gevent.pytest_plugin import fake_flyte_api, flyte_api  # noqa: F401  (also with -p no:flyte_gevent)
from flyte_gevent.testing import ActionResult, FakeFlyteApi, pack_id
from helpers import wait_until

ECHO = {"name": "Echo", "labels": {"env": "dev"},
        "commands": [{"name": "Echo", "events": ["Echoed"]}], "events": [{"name": "Echoed"}]}
LAST_SEEN = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z")


@pytest.fixture
def api(flyte_api):  # noqa: F811
    return flyte_api


@pytest.fixture
def http():
    with requests.Session() as session:
        yield session


def register(http, api, body=ECHO):
    response = http.post(api.url + "/v1/packs", json=body, timeout=5)
    assert response.status_code == 201, response
    return response.json()


def take(http, api, pid="Echo.env.dev", query="", headers=None):
    """Poll like the Go client: the literal null with a JSON content type."""
    return http.post(f"{api.url}/v1/packs/{pid}/actions/take{query}", data="null",
                     headers={"Content-Type": "application/json", **(headers or {})}, timeout=5)


def result_href(response):
    [link] = response.json()["links"]
    return link["href"]


# --- the module itself ------------------------------------------------------------------------------------------

def test_import_patches_nothing_and_stays_light(python, subprocess_env):
    code = ("import sys, socket; import flyte_gevent.testing, flyte_gevent.pytest_plugin; "
            "from gevent import monkey; "
            "print([m for m in ('ssl', 'requests', 'gevent.pywsgi') if m in sys.modules], "
            "monkey.is_module_patched('socket'))")
    out = subprocess.run([python, "-c", code], env=subprocess_env, capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "[] False", out.stderr


def test_pack_id_rule():
    assert pack_id("Shell", None) == "Shell"
    assert pack_id("Shell", {"ABC": "123"}) == "Shell.ABC.123"
    assert pack_id("Demo", {"team": "a", "env": "dev"}) == "Demo.env.dev.team.a"
    assert pack_id("a", {"b": "c.d"}) == pack_id("a", {"b.c": "d"}) == "a.b.c.d"
    assert pack_id("x", {"b": "1", "B": "2", "a": "3"}) == "x.B.2.a.3.b.1"  # byte-wise: upper case first


# --- discovery --------------------------------------------------------------------------------------------------

def test_root_and_v1_documents(api, http):
    h = api.url
    root = http.get(h + "/")
    assert root.status_code == 200
    assert root.headers["Content-Type"] == "application/json; charset=utf-8"
    assert root.json() == {"links": [
        {"href": h + "/", "rel": "self"},
        {"href": h + "/swagger#/info", "rel": "help"},
        {"href": h + "/v1", "rel": h + "/swagger#!/info/v1"}]}
    assert http.get(h + "/v1").json() == {"links": [
        {"href": h + "/v1", "rel": "self"},
        {"href": h + "/", "rel": "up"},
        {"href": h + "/swagger#!/info/v1", "rel": "help"},
        {"href": h + "/health", "rel": h + "/swagger#!/info/health"},
        {"href": h + "/v1/packs", "rel": h + "/swagger#!/pack/listPacks"},
        {"href": h + "/v1/flows", "rel": h + "/swagger#!/flow/listFlows"},
        {"href": h + "/v1/datastore", "rel": h + "/swagger#!/datastore/listDatastoreItems"},
        {"href": h + "/v1/audit/flows", "rel": h + "/swagger#!/flowAudit/findFlows"},
        {"href": h + "/v1/swagger", "rel": h + "/swagger"}]}


@pytest.mark.parametrize("headers, base", [
    ({"X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw:8443"}, "https://gw:8443"),
    ({"X-Flyte-Host": "flyte.example", "X-Forwarded-Host": "gw"}, "http://flyte.example"),
    ({"Host": "other:1"}, "http://other:1"),
])
def test_links_are_built_from_the_request_headers(api, http, headers, base):
    assert http.get(api.url + "/v1", headers=headers).json()["links"][0] == {"href": base + "/v1", "rel": "self"}
    response = http.post(api.url + "/v1/packs", json=ECHO, headers=headers)
    assert response.headers["Location"] == base + "/v1/packs/Echo.env.dev"
    assert response.json()["links"][-1] == {"href": base + "/v1/packs/Echo.env.dev/events",
                                            "rel": base + "/swagger#/event"}
    aid = api.enqueue("Echo", "Echo")
    assert result_href(take(http, api, headers=headers)) == f"{base}/v1/packs/Echo.env.dev/actions/{aid}/result"


def test_health_and_unknown_routes(api, http):
    health = http.get(api.url + "/health")
    assert (health.status_code, health.content, health.headers.get("Content-Type")) == (200, b"", None)
    # Only the router's own answers have bodies.
    missing = http.get(api.url + "/v1/nothing")
    assert (missing.status_code, missing.text) == (404, "Not Found")
    wrong = http.put(api.url + "/v1/packs")
    assert (wrong.status_code, wrong.headers["Allow"]) == (405, "GET, HEAD, POST")
    assert [r.route for r in api.requests] == ["health", None, None]


# --- registration -----------------------------------------------------------------------------------------------

def test_registration_answers_like_appendix_a(api, http):
    h = api.url
    response = http.post(h + "/v1/packs", json=ECHO)
    assert response.status_code == 201
    assert response.headers["Location"] == h + "/v1/packs/Echo.env.dev"
    # The server sets Content-Type after WriteHeader(201); Go ignores it and sniffs the body.
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    body = response.json()
    assert LAST_SEEN.fullmatch(body.pop("lastSeen"))
    assert body == {
        "id": "Echo.env.dev", "name": "Echo", "labels": {"env": "dev"},
        "commands": [{"name": "Echo", "events": ["Echoed"],
                      "links": [{"href": h + "/v1/packs/Echo.env.dev/actions/take?commandName=Echo",
                                 "rel": h + "/swagger#!/action/takeAction"}]}],
        "events": [{"name": "Echoed"}],
        "links": [
            {"href": h + "/v1/packs/Echo.env.dev", "rel": "self"},
            {"href": h + "/v1/packs", "rel": "up"},
            {"href": h + "/v1/packs/Echo.env.dev/actions/take", "rel": h + "/swagger#!/action/takeAction"},
            {"href": h + "/v1/packs/Echo.env.dev/events", "rel": h + "/swagger#/event"}],
        "status": "live"}
    pack = api.wait_for_pack("Echo", timeout=0.1)
    assert (pack.id, pack.labels, pack.body, pack.registrations) == ("Echo.env.dev", {"env": "dev"}, ECHO, 1)


def test_registered_links_come_first_and_command_links_are_replaced(api, http):
    body = {"name": "Shell",
            "links": [{"href": "http://docs/readme", "rel": "help"}, {"href": "http://docs/other"}],
            "commands": [{"name": "Shell", "links": [{"href": "http://docs/cmd", "rel": "self"}]}],
            "events": [{"name": "Output", "links": [{"href": "http://docs/ev", "rel": "help"}]}]}
    document = register(http, api, body)
    assert "labels" not in document
    assert document["links"][:2] == [{"href": "http://docs/readme", "rel": "help"}, {"href": "http://docs/other"}]
    assert [link["rel"] for link in document["links"][2:4]] == ["self", "up"]
    assert document["commands"] == [{"name": "Shell", "events": None, "links": [
        {"href": api.url + "/v1/packs/Shell/actions/take?commandName=Shell",
         "rel": api.url + "/swagger#!/action/takeAction"}]}]
    assert document["events"] == [{"name": "Output", "links": [{"href": "http://docs/ev", "rel": "help"}]}]


@pytest.mark.parametrize("rel", ["up", "self", "support", "setup", "group", "upstream", "myself",
                                 "http://superhost/x", "http://h/swagger#/actionResult", "x/takeAction", "/event"])
def test_reserved_rels_are_refused(api, http, rel):
    response = http.post(api.url + "/v1/packs", json={"name": "P", "links": [{"href": "http://x", "rel": rel}]})
    assert (response.status_code, response.content) == (400, b"")
    assert api.packs == {}
    assert "reserved-rel" in api.violations[-1]


@pytest.mark.parametrize("rel", ["help", "docs", "/event/x", "/event\n", ""])
def test_other_rels_are_accepted(api, http, rel):
    register(http, api, {"name": "P", "links": [{"href": "http://x", "rel": rel}]})


def test_labels_are_omitted_when_empty_and_ids_follow_the_rule(api, http):
    assert "labels" not in register(http, api, {"name": "Shell", "labels": {}})
    document = register(http, api, {"name": "Demo", "labels": {"team": "a", "env": "dev"}})
    assert document["id"] == "Demo.env.dev.team.a"
    assert list(document["labels"]) == ["env", "team"]  # Go marshals map keys sorted
    register(http, api, {"name": "a", "labels": {"b": "c.d"}})
    register(http, api, {"name": "a", "labels": {"b.c": "d"}})
    assert sorted(api.packs) == ["Demo.env.dev.team.a", "Shell", "a.b.c.d"]
    assert api.packs["a.b.c.d"].labels == {"b.c": "d"}  # the collision: last writer wins


def test_registration_is_an_upsert(api, http):
    register(http, api)
    second = dict(ECHO, commands=[{"name": "Other", "events": []}])
    document = register(http, api, second)
    assert document["commands"][0]["events"] == []
    pack = api.packs["Echo.env.dev"]
    assert (len(api.packs), pack.registrations, pack.body) == (1, 2, second)


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'"x"', b'{"name": 5}', b'{"labels": {"a": 1}}',
                                  b'{"commands": {}}', b'{"links": [{"href": true}]}',
                                  b'{"lastSeen": "2022-01-02 10:00:00Z"}', b'{"name": NaN}'])
def test_registration_bad_bodies(api, http, body):
    response = http.post(api.url + "/v1/packs", data=body, headers={"Content-Type": "application/json"})
    assert (response.status_code, response.content) == (400, b"")
    assert api.packs == {}


def test_registration_decodes_like_go(api, http):
    """Unknown fields and trailing data are ignored, keys match case-insensitively, null becomes a nameless pack."""
    for body, pid in [(b'{"NAME": "A", "Labels": {"k": "v"}, "whatever": 1} trailing junk', "A.k.v"),
                      (b'{"name": "B", "id": "ignored", "lastSeen": "2020-01-01T00:00:00Z"}', "B"),
                      (b"null", "")]:
        response = http.post(api.url + "/v1/packs", data=body)
        assert response.status_code == 201
        assert response.json()["id"] == pid
    assert http.post(api.url + "/v1/packs", data=b"null").headers["Location"] == api.url + "/v1/packs"


def test_list_get_and_delete(api, http):
    register(http, api, {"name": "Zed"})
    register(http, api)
    listing = http.get(api.url + "/v1/packs").json()
    assert listing["links"] == [{"href": api.url + "/v1/packs", "rel": "self"},
                                {"href": api.url + "/v1", "rel": "up"},
                                {"href": api.url + "/swagger#/pack", "rel": "help"}]
    assert [(p["id"], sorted(p)) for p in listing["packs"]] == [
        ("Echo.env.dev", ["id", "labels", "lastSeen", "links", "name", "status"]),
        ("Zed", ["id", "lastSeen", "links", "name", "status"])]
    one = http.get(api.url + "/v1/packs/Echo.env.dev")
    assert one.status_code == 200
    assert re.fullmatch(r".*:\d\d(\.\d{1,3})?Z", one.json()["lastSeen"])  # read back from MongoDB: milliseconds
    assert one.json()["links"][-1]["href"] == api.url + "/v1/packs/Echo.env.dev/events"
    assert http.get(api.url + "/v1/packs/Nope").status_code == 404
    deleted = http.delete(api.url + "/v1/packs/Zed")
    assert (deleted.status_code, deleted.content) == (204, b"")
    assert http.delete(api.url + "/v1/packs/Zed").status_code == 404
    assert list(api.packs) == ["Echo.env.dev"]
    with pytest.raises(KeyError):
        api.delete_pack("Zed")


# --- take -------------------------------------------------------------------------------------------------------

def test_take_outcomes(api, http):
    assert (take(http, api).status_code, take(http, api).content) == (404, b"")
    register(http, api)
    before = api.packs["Echo.env.dev"].last_seen
    empty = take(http, api)
    assert (empty.status_code, empty.content) == (204, b"")
    assert api.packs["Echo.env.dev"].last_seen > before
    aid = api.enqueue("Echo", "Echo", {"text": "<hi>"})
    response = take(http, api)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert b"\\u003chi\\u003e" in response.content  # Go's HTML escaping
    assert response.json() == {"command": "Echo", "input": {"text": "<hi>"}, "links": [
        {"href": f"{api.url}/v1/packs/Echo.env.dev/actions/{aid}/result", "rel": api.url + "/swagger#/actionResult"}]}
    action = api.action(aid)
    assert (action.state, action.taken_by, action.takes) == ("PENDING", "Echo.env.dev", 1)
    assert [a.id for a in api.pending()] == [aid] and api.new() == []
    assert take(http, api).status_code == 204


@pytest.mark.parametrize("value", [None, "echo -e 'world\\nhello' | sort", 42, [1, "two"]])
def test_take_input_is_always_present(api, http, value):
    register(http, api)
    api.enqueue("Echo", "Echo", value)
    assert take(http, api).json()["input"] == value


def test_take_matches_label_subsets_oldest_first(api, http):
    register(http, api)  # Echo with {"env": "dev"}
    prod = api.enqueue("Echo", "Echo", labels={"env": "prod"})
    first = api.enqueue("Echo", "Echo")
    other_pack = api.enqueue("Other", "Echo")
    second = api.enqueue("Echo", "Echo", labels={"env": "dev"})
    too_specific = api.enqueue("Echo", "Echo", labels={"env": "dev", "team": "a"})
    third = api.enqueue("Echo", "Echo")
    taken = [result_href(take(http, api)).split("/")[-2] for _ in range(3)]
    assert taken == [first, second, third]
    assert take(http, api).status_code == 204
    assert {a.id for a in api.new()} == {prod, other_pack, too_specific}
    register(http, api, {"name": "Echo", "labels": {"env": "dev", "team": "a", "x": "y"}})
    assert result_href(take(http, api, "Echo.env.dev.team.a.x.y")).split("/")[-2] == too_specific


def test_take_filters_on_action_name_and_ignores_command_name(api, http):
    document = register(http, api)
    one = api.enqueue("Echo", "One")
    two = api.enqueue("Echo", "Two")
    assert take(http, api, query="?commandName=Two").json()["command"] == "One"
    assert take(http, api, query="?actionName=Nope").status_code == 204
    api.enqueue("Echo", "One")
    assert take(http, api, query="?actionName=Two").json()["command"] == "Two"
    # The per-command link from the registration uses commandName, so it does not filter either.
    api.enqueue("Echo", "Other")
    command_link = document["commands"][0]["links"][0]["href"]
    assert http.post(command_link, data="null").json()["command"] == "One"
    assert api.action(one).state == api.action(two).state == "PENDING"


def test_take_finds_the_oldest_fitting_action_behind_many_that_never_fit(api, http):
    # How cheap that stays with a long queue is a benchmark's business (the fake's take compares the heads of
    # its per-label queues); here: the order is right, however many actions that never fit sit in front.
    register(http, api)
    api.enqueue_many("Echo", "Echo", range(200), labels={"env": "prod"})  # never matches, always in front
    ids = api.enqueue_many("Echo", "Echo", range(10_000))
    for expected in ids[:200]:
        assert result_href(take(http, api)).split("/")[-2] == expected


# --- results ----------------------------------------------------------------------------------------------------

def taken_action(http, api, command="Echo", labels=None):
    """Queue an action and take it; returns its id and result href."""
    aid = api.enqueue("Echo", command, labels=labels)
    href = result_href(take(http, api))
    assert href.split("/")[-2] == aid
    return aid, href


def test_result_success_fatal_and_repeat(api, http):
    register(http, api)
    aid, href = taken_action(http, api)
    response = http.post(href, json={"event": "Echoed", "payload": {"a": 1}, "createdAt": "2026-01-02T03:04:06.5Z"})
    assert (response.status_code, response.content) == (202, b"")
    assert api.wait_for_result(aid, timeout=0.1) == ActionResult("Echoed", {"a": 1}, "2026-01-02T03:04:06.5Z")
    assert api.action(aid).state == "SUCCESS"
    repeat = http.post(href, json={"event": "Echoed"})
    assert (repeat.status_code, repeat.content) == (500, b"")
    assert api.action(aid).result_posts == 2
    fatal, href = taken_action(http, api)
    assert http.post(href, json={"event": "FATAL", "payload": "ValueError: no"}).status_code == 202
    lower, href = taken_action(http, api)
    assert http.post(href, json={"event": "fatal"}).status_code == 202
    empty, href = taken_action(http, api)
    assert http.post(href, json={}).status_code == 202
    assert [api.action(a).state for a in (fatal, lower, empty)] == ["FATAL", "SUCCESS", "SUCCESS"]
    assert api.action(empty).result == {"event": "", "payload": None, "createdAt": None}
    api.wait_until_idle(timeout=0.1)


def test_result_errors(api, http):
    register(http, api)
    aid, href = taken_action(http, api)
    never_taken = api.enqueue("Echo", "Echo")
    base = api.url + "/v1/packs/Echo.env.dev/actions/"
    assert http.post(base + never_taken + "/result", json={"event": "X"}).status_code == 500
    assert http.post(base + "000000000000000000000000/result", json={"event": "X"}).status_code == 404
    assert http.post(api.url + f"/v1/packs/Nope/actions/{never_taken}/result", json={}).status_code == 404
    assert http.post(href, data=b"{oops").status_code == 400
    assert http.post(href, data=b"[]").status_code == 400
    assert http.post(href, json={"event": 1}).status_code == 400
    assert api.action(aid).state == "PENDING"
    assert api.action(never_taken).result_posts == 2


@pytest.mark.parametrize("created_at, status", [
    ("2022-01-02T15:04:05Z", 202),
    ("2022-01-02T15:04:05.123456+00:00", 202),
    ("2026-11-26T21:52:25.383947648Z", 202),
    ("2022-01-02T15:04:05-07:00", 202),
    (None, 202),
    ("2022-01-02T15:04:05.123456", 400),  # naive, e.g. datetime.utcnow().isoformat()
    ("2022-01-02 15:04:05Z", 400),
    (1641135845, 400),
    ("", 400),
    ("2022-01-02t15:04:05Z", 400),
    ("2022-01-02T15:04:05z", 400),
    ("2022-01-02T15:04:05+0000", 400),
    ("2022-02-30T15:04:05Z", 400),
    ("2022-01-02T24:00:00Z", 400),
])
def test_result_created_at_must_be_rfc3339_with_a_zone(api, http, created_at, status):
    register(http, api)
    aid, href = taken_action(http, api)
    assert http.post(href, json={"event": "E", "createdAt": created_at}).status_code == status
    if status == 202:
        assert api.action(aid).result["createdAt"] == created_at


def test_result_from_a_pack_that_cannot_have_taken_the_action_drops_the_connection(api, http):
    register(http, api)
    register(http, api, {"name": "Echo"})  # same name, no labels
    register(http, api, {"name": "Other", "labels": {"env": "dev"}})
    aid, href = taken_action(http, api, labels={"env": "dev"})
    for pid in ("Echo", "Other.env.dev"):
        with pytest.raises(requests.ConnectionError):
            http.post(href.replace("/Echo.env.dev/", f"/{pid}/"), json={"event": "E"})
    assert [r.status for r in api.requests_for("result")] == [None, None]
    assert api.action(aid).state == "PENDING" and "cannot have taken" in api.violations[-1]
    assert http.post(href, json={"event": "E"}).status_code == 202


# --- events -----------------------------------------------------------------------------------------------------

def test_events(api, http):
    events_url = register(http, api)["links"][-1]["href"]
    assert http.post(api.url + "/v1/packs/Nope/events", json={"event": "Tick"}).status_code == 404
    response = http.post(events_url, json={"event": "Tick", "payload": {"time": "09:00"},
                                           "createdAt": "2026-01-02T09:00:00.001Z"})
    assert (response.status_code, response.content) == (202, b"")
    assert http.post(events_url, data=b"null").status_code == 202
    before = api.packs["Echo.env.dev"].last_seen
    for bad in (b'"x"', b"[]", b"5", b"{", b'{"createdAt": "2026-01-02T09:00:00"}', b'{"event": []}'):
        assert (http.post(events_url, data=bad).status_code, api.events[-1].event) == (400, "")
    assert api.packs["Echo.env.dev"].last_seen > before  # refreshed before decoding
    tick, null = api.wait_for_events(2, timeout=0.1)
    assert (tick.pack_id, tick.event, tick.payload, tick.created_at) == (
        "Echo.env.dev", "Tick", {"time": "09:00"}, "2026-01-02T09:00:00.001Z")
    assert (null.event, null.payload, null.body) == ("", None, None)
    assert api.violations and api.violations == [v for v in api.violations if v.startswith("event: 400")]


def test_pack_and_received_at_keys_are_violations(api, http):
    events_url = register(http, api)["links"][-1]["href"]
    assert http.post(events_url, json={"event": "E", "Pack": {"name": "Other"}}).status_code == 202
    assert http.post(events_url, json={"event": "E", "receivedAt": "2026-01-02T09:00:00Z"}).status_code == 202
    assert http.post(events_url, json={"event": "E", "pack": "Other"}).status_code == 400  # not a Pack struct
    _, href = taken_action(http, api)
    assert http.post(href, json={"event": "E", "pack": None}).status_code == 202
    smuggled = [re.search(r"carries '(\w+)'", v).group(1) for v in api.violations if "carries" in v]
    assert smuggled == ["Pack", "receivedAt", "pack"]
    assert "event: 400 because pack must be an object, got a string" in api.violations


def test_a_deleted_pack_gets_404_until_it_registers_again(api, http):
    register(http, api)
    _aid, href = taken_action(http, api)
    api.delete_pack("Echo.env.dev")
    assert take(http, api).status_code == 404
    assert http.post(href, json={"event": "E"}).status_code == 404
    assert http.post(api.url + "/v1/packs/Echo.env.dev/events", json={}).status_code == 404
    register(http, api)
    assert http.post(href, json={"event": "E"}).status_code == 202
    assert api.packs["Echo.env.dev"].registrations == 1


# --- faults -----------------------------------------------------------------------------------------------------

def test_fail(api, http):
    register(http, api)
    aid = api.enqueue("Echo", "Echo")
    api.fail("take", 503, times=2)
    assert [(r.status_code, r.content) for r in (take(http, api), take(http, api))] == [(503, b""), (503, b"")]
    assert api.action(aid).state == "NEW"
    assert take(http, api).status_code == 200
    api.fail(None, 502, times=None)
    assert http.get(api.url + "/health").status_code == http.get(api.url + "/nope").status_code == 502
    api.clear_faults()
    assert http.get(api.url + "/health").status_code == 200
    assert [r.status for r in api.requests_for("take")] == [503, 503, 200]
    with pytest.raises(ValueError):
        api.fail("takes", 500)


def test_drop_response_after_the_work_is_done(api, http):
    register(http, api)
    aid = api.enqueue("Echo", "Echo")
    api.drop_response("take")
    with pytest.raises(requests.ConnectionError):
        take(http, api)
    assert api.action(aid).state == "PENDING"  # the server took it; the pack never heard
    assert api.requests_for("take")[-1].status is None
    other, href = taken_action(http, api)
    api.drop_response("result")
    with pytest.raises(requests.ConnectionError):
        http.post(href, json={"event": "E"})
    assert http.post(href, json={"event": "E"}).status_code == 500  # the retry of a completed action
    assert (api.action(other).state, api.action(other).result_posts) == ("SUCCESS", 2)


def test_delay_before_and_after(api, http):
    register(http, api)
    aid = api.enqueue("Echo", "Echo")
    api.delay("take", 1.0, before=False)
    pending = gevent.spawn(take, requests.Session(), api)
    wait_until(lambda: api.action(aid).state == "PENDING", 5, "the take processed")
    assert not pending.ready()  # processed, not yet answered
    assert pending.get(timeout=5).status_code == 200
    api.delay("take", 1.0)
    pending = gevent.spawn(take, requests.Session(), api)
    wait_until(lambda: len(api.requests_for("take")) == 2, 5, "the second take received")
    assert api.requests_for("take")[-1].status is None and not pending.ready()  # received, not yet processed
    assert pending.get(timeout=5).status_code == 204


def test_latency(api, http):
    http.get(api.url + "/health")
    api.latency = 0.1
    started = time.monotonic()
    http.get(api.url + "/health")
    assert time.monotonic() - started >= 0.1


def test_race_window_makes_one_of_two_replicas_lose(api, http):
    register(http, api)
    aid = api.enqueue("Echo", "Echo")
    api.race_window = 0.1
    replicas = [gevent.spawn(take, requests.Session(), api) for _ in range(2)]
    assert sorted(g.get(timeout=2).status_code for g in replicas) == [200, 500]
    assert (api.action(aid).state, api.action(aid).takes) == ("PENDING", 2)


def test_take_cost_grows_with_the_backlog_and_widens_the_race(api, http):
    register(http, api)
    api.enqueue_many("Echo", "Echo", range(50), labels={"env": "prod"})  # read on every take, never a fit
    api.take_cost = 0.002
    started = time.monotonic()
    assert take(http, api).status_code == 204
    assert time.monotonic() - started >= 50 * 0.002  # every NEW action of the name is read, fitting or not
    aid = api.enqueue("Echo", "Echo")
    replicas = [gevent.spawn(take, requests.Session(), api) for _ in range(2)]
    assert sorted(g.get(timeout=2).status_code for g in replicas) == [200, 500]
    assert api.action(aid).takes == 2
    api.clear_faults()
    assert api.take_cost == 0.0


def test_the_real_api_url_comes_from_the_option_else_the_environment(monkeypatch):
    # (tests/conformance/test_conformance_plugin.py runs a pack's tests with --flyte-api-url on a real server.)
    from flyte_gevent import pytest_plugin

    class Config:
        option = None

        def getoption(self, name, default=None):
            return self.option if name == "flyte_api_url" else default

    config = Config()
    monkeypatch.delenv(pytest_plugin.URL_VARIABLE, raising=False)
    assert pytest_plugin._real_api_url(config) is None
    monkeypatch.setenv(pytest_plugin.URL_VARIABLE, "http://flyte.test:8080")
    assert pytest_plugin._real_api_url(config) == "http://flyte.test:8080"
    config.option = "http://other.test:8080"
    assert pytest_plugin._real_api_url(config) == "http://other.test:8080"


def test_fake_flyte_api_fixture_is_always_the_fake(fake_flyte_api):  # noqa: F811
    assert isinstance(fake_flyte_api, FakeFlyteApi)
    assert fake_flyte_api.url.startswith("http://127.0.0.1:")


def test_outage_refuse_and_restore_on_the_same_port(api, http):
    register(http, api)
    port = api.port
    api.outage("refuse")
    with pytest.raises(requests.ConnectionError):
        http.get(api.url + "/v1", timeout=2)  # the keep-alive connection is gone, and so is the listener
    with pytest.raises(requests.ConnectionError):
        requests.get(api.url + "/v1", timeout=2)
    api.restore()
    assert api.port == port
    assert http.get(api.url + "/v1/packs/Echo.env.dev").status_code == 200  # state survived


def test_an_outage_abandons_requests_in_flight(api, http):
    register(http, api)
    aid = api.enqueue("Echo", "Echo")
    api.delay("take", 0.2)
    in_flight = gevent.spawn(take, requests.Session(), api)
    gevent.sleep(0.05)
    api.outage("refuse")
    with pytest.raises(requests.ConnectionError):
        in_flight.get(timeout=2)
    assert api.action(aid).state == "NEW"  # a crashed server takes nothing
    api.outage("503")  # listening again, but only to say 503
    assert take(http, api).status_code == 503
    api.clear_faults()
    assert take(http, api).status_code == 200


def test_outage_503(api, http):
    api.outage("503")
    response = http.post(api.url + "/v1/packs", json=ECHO)
    assert (response.status_code, response.content) == (503, b"")
    assert api.packs == {}
    api.restore()
    register(http, api)


def test_internal_errors_are_recorded(api, http, monkeypatch):
    # (HEAD and OPTIONS, which the router answers in its own ways, are in tests/conformance.)
    def broken(*args):
        raise RuntimeError("boom")
    monkeypatch.setattr(api._app, "_health", broken)
    assert http.get(api.url + "/health").status_code == 500
    assert api.errors == ["GET /health: RuntimeError: boom"]
    api.errors.clear()  # or the fixture fails the test, which is the point of recording them


def test_stop_closes_keep_alive_connections_and_start_reuses_the_port(http):
    api = FakeFlyteApi().start()
    port = api.port
    assert http.get(api.url + "/health").status_code == 200
    api.stop()
    api.stop()
    with pytest.raises(requests.ConnectionError):
        http.get(api.url + "/health", timeout=2)
    with api:
        assert api.port == port
        assert http.get(api.url + "/health").status_code == 200


def test_keep_alive_requests_are_not_held_back_by_delayed_acks(api, http):
    register(http, api)
    take(http, api)
    started = time.monotonic()
    for _ in range(25):
        take(http, api)
    assert time.monotonic() - started < 0.5  # 25 x 40 ms without TCP_NODELAY


# --- auth -------------------------------------------------------------------------------------------------------

def test_bearer_tokens(api, http):
    api.accepted_tokens = {"t1"}
    missing = http.get(api.url + "/v1")
    assert (missing.status_code, missing.content) == (401, b"")
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="token"'
    wrong = http.get(api.url + "/v1", headers={"Authorization": "Bearer t2"})
    assert wrong.headers["WWW-Authenticate"] == 'Bearer realm="token", error="invalid_token"'
    for header in ("Bearer t1", "bearer t1", "BEARER t1", "t1"):
        assert http.get(api.url + "/health", headers={"Authorization": header}).status_code == 200
    api.accepted_tokens = {"t2"}  # rotation
    assert http.get(api.url + "/health", headers={"Authorization": "Bearer t1"}).status_code == 401
    assert http.get(api.url + "/health", headers={"Authorization": "Bearer t2"}).status_code == 200
    api.accepted_tokens = None
    assert http.get(api.url + "/health").status_code == 200


# --- waiting ----------------------------------------------------------------------------------------------------

def test_waits_time_out_with_a_clear_message(api, http):
    aid = api.enqueue("Echo", "Echo")
    with pytest.raises(AssertionError, match=f"{aid} \\('Echo' for 'Echo'\\) is NEW"):
        api.wait_for_result(aid, timeout=0.05)
    with pytest.raises(AssertionError, match=r"1 actions still open .* is NEW"):
        api.wait_until_idle(timeout=0.05)
    with pytest.raises(AssertionError, match="'Echo' was not registered"):
        api.wait_for_pack("Echo", timeout=0.05)
    with pytest.raises(AssertionError, match="expected 1 events named 'Tick'"):
        api.wait_for_events(1, timeout=0.05, name="Tick")
    with pytest.raises(AssertionError, match=f"action {aid} \\('Echo' for 'Echo'\\) is NEW, not PENDING/SUCCESS"):
        api.wait_for_action(aid, ("PENDING", "SUCCESS"), timeout=0.05)
    with pytest.raises(KeyError):
        api.wait_for_result("nope", timeout=0.05)


def test_waits_wake_up_when_the_server_changes_state(api, http):
    def pack():
        gevent.sleep(0.05)
        register(http, api)
        href = result_href(take(http, api))
        events_url = api.url + "/v1/packs/Echo.env.dev/events"
        http.post(events_url, json={"event": "Other"})
        http.post(events_url, json={"event": "Tick"})
        http.post(href, json={"event": "Echoed", "payload": 1})

    aid = api.enqueue("Echo", "Echo")
    worker = gevent.spawn(pack)
    assert api.wait_for_pack(timeout=2).id == "Echo.env.dev"
    assert [e.event for e in api.wait_for_events(1, name="Tick", timeout=2)] == ["Tick"]
    assert api.wait_for_results([aid], timeout=2) == [ActionResult("Echoed", 1, None)]
    api.wait_until_idle(timeout=1)
    worker.get(timeout=1)


# --- outside the test process -----------------------------------------------------------------------------------

def test_command_line_server(python, subprocess_env):
    child = subprocess.Popen([python, "-m", "flyte_gevent.testing", "--port", "0"], env=subprocess_env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with gevent.Timeout(20):
            line = child.stdout.readline()
        url = re.fullmatch(r"FakeFlyteApi listening on (http://127\.0\.0\.1:\d+)\n", line).group(1)
        assert requests.get(url + "/v1", timeout=5).json()["links"][0] == {"href": url + "/v1", "rel": "self"}
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_fixture_refuses_an_unpatched_process(python, subprocess_env, tmp_path):
    (tmp_path / "test_unpatched.py").write_text(textwrap.dedent("""
        def test_it(flyte_api):
            pass
    """))
    out = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:flyte_gevent", "-p", "flyte_gevent.pytest_plugin",
                          "-p", "no:cacheprovider", str(tmp_path)], cwd=tmp_path, env=subprocess_env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "monkey.patch_all()" in out.stdout and "first lines of conftest.py" in out.stdout
