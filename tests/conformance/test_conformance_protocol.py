"""The pack-facing protocol, spoken with plain HTTP: the same assertions on FakeFlyteApi and on the real server.

Actions come from ``server.enqueue`` (a flow on the real server, a queued record on the fake); everything else is
ordinary requests a pack would send, so a difference here is a difference a pack would meet.
"""

import datetime
import json
import re

import gevent
import pytest
import requests

from flyte_gevent.testing import FakeFlyteApi

LAST_SEEN_NS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z")
LAST_SEEN_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,3})?Z")


@pytest.fixture
def http():
    with requests.Session() as session:
        yield session


def echo_pack(unique, labels=None):
    body = {"name": f"Echo{unique}", "commands": [{"name": "Echo", "events": ["Echoed"]}],
            "events": [{"name": "Echoed"}]}
    if labels:
        body["labels"] = labels
    return body


def register(http, server, body):
    response = http.post(server.url + "/v1/packs", json=body, timeout=5)
    assert response.status_code == 201, response
    return response


def take(http, server, pid, query=""):
    """Poll like the Go client: the literal null with a JSON content type."""
    return http.post(f"{server.url}/v1/packs/{pid}/actions/take{query}", data="null",
                     headers={"Content-Type": "application/json"}, timeout=5)


def result_href(response):
    [link] = response.json()["links"]
    return link["href"]


def post_result(http, href, body):
    return http.post(href, data=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=5)


# --- discovery and registration -------------------------------------------------------------------------------

def test_discovery_documents(server, http):
    base = server.url + "/"
    root = http.get(server.url + "/", timeout=5)
    assert root.status_code == 200
    assert root.headers["Content-Type"] == "application/json; charset=utf-8"
    assert root.json() == {"links": [{"href": base, "rel": "self"}, {"href": base + "swagger#/info", "rel": "help"},
                                     {"href": base + "v1", "rel": base + "swagger#!/info/v1"}]}
    v1 = http.get(server.url + "/v1", timeout=5).json()
    assert [(link["href"], link["rel"]) for link in v1["links"]] == [
        (base + "v1", "self"), (base, "up"), (base + "swagger#!/info/v1", "help"),
        (base + "health", base + "swagger#!/info/health"),
        (base + "v1/packs", base + "swagger#!/pack/listPacks"),
        (base + "v1/flows", base + "swagger#!/flow/listFlows"),
        (base + "v1/datastore", base + "swagger#!/datastore/listDatastoreItems"),
        (base + "v1/audit/flows", base + "swagger#!/flowAudit/findFlows"),
        (base + "v1/swagger", base + "swagger")]
    health = http.get(server.url + "/health", timeout=5)
    assert (health.status_code, health.content) == (200, b"")


def test_links_are_built_from_forwarding_headers(server, http):
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw.example", "X-Flyte-Host": "flyte.example"}
    document = http.get(server.url + "/v1", headers=headers, timeout=5).json()
    assert document["links"][0] == {"href": "https://flyte.example/v1", "rel": "self"}


def test_registration_is_201_text_plain_with_location_and_links(server, http, unique):
    body = echo_pack(unique, labels={"env": "dev", "team": "a"})
    body["links"] = [{"href": "https://example.com/help", "rel": "help"}]
    response = register(http, server, body)
    pid = f"Echo{unique}.env.dev.team.a"
    base = server.url + "/"
    # The handler writes the status before setting the type, so Go sniffs the JSON body as text.
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.headers["Location"] == f"{base}v1/packs/{pid}"
    document = response.json()
    assert LAST_SEEN_NS.fullmatch(document.pop("lastSeen"))
    assert document == {
        "id": pid, "name": f"Echo{unique}", "labels": {"env": "dev", "team": "a"},
        "commands": [{"name": "Echo", "events": ["Echoed"],
                      "links": [{"href": f"{base}v1/packs/{pid}/actions/take?commandName=Echo",
                                 "rel": base + "swagger#!/action/takeAction"}]}],
        "events": [{"name": "Echoed"}],
        "links": [{"href": "https://example.com/help", "rel": "help"},
                  {"href": f"{base}v1/packs/{pid}", "rel": "self"},
                  {"href": f"{base}v1/packs", "rel": "up"},
                  {"href": f"{base}v1/packs/{pid}/actions/take", "rel": base + "swagger#!/action/takeAction"},
                  {"href": f"{base}v1/packs/{pid}/events", "rel": base + "swagger#/event"}],
        "status": "live"}
    again = http.get(f"{server.url}/v1/packs/{pid}", timeout=5)
    assert again.headers["Content-Type"] == "application/json; charset=utf-8"
    # Read back from storage, lastSeen has millisecond precision.
    assert LAST_SEEN_MS.fullmatch(again.json()["lastSeen"])
    assert server.wait_for_pack(pid).labels == {"env": "dev", "team": "a"}


@pytest.mark.parametrize("rel, status", [("support", 400), ("setup", 400), ("http://superhost/x", 400),
                                         ("x/takeAction", 400), ("help", 201), ("docs", 201)])
def test_reserved_rels_are_refused_by_an_unanchored_regex(server, http, unique, rel, status):
    body = {"name": f"Rel{unique}", "links": [{"href": "https://example.com", "rel": rel}]}
    response = http.post(server.url + "/v1/packs", json=body, timeout=5)
    assert response.status_code == status
    if status == 400:
        assert response.content == b""


def test_registration_bodies_the_server_refuses(server, http):
    for body in (b"", b"{", b'{"name": 5}', b'{"labels": {"a": 1}}', b'{"commands": {}}'):
        response = http.post(server.url + "/v1/packs", data=body, headers={"Content-Type": "application/json"},
                             timeout=5)
        assert (response.status_code, response.content) == (400, b""), body


def test_a_pack_id_with_dot_segments_gets_a_cleaned_location(server, http, unique):
    response = register(http, server, {"name": f"A B{unique}/../C{unique}"})
    assert response.json()["id"] == f"A B{unique}/../C{unique}"
    assert response.headers["Location"] == f"{server.url}/v1/packs/C{unique}"


# --- take, result, event --------------------------------------------------------------------------------------

def test_take_outcomes(server, http, unique):
    pid = register(http, server, echo_pack(unique)).json()["id"]
    nothing = take(http, server, pid)
    assert (nothing.status_code, nothing.content) == (204, b"")
    unknown = take(http, server, f"Nope{unique}")
    assert (unknown.status_code, unknown.content) == (404, b"")
    aid = server.enqueue(f"Echo{unique}", "Echo", {"text": "hi"})
    taken = take(http, server, pid)
    assert taken.status_code == 200
    assert taken.headers["Content-Type"] == "application/json; charset=utf-8"
    base = server.url + "/"
    assert taken.json() == {"command": "Echo", "input": {"text": "hi"},
                            "links": [{"href": f"{base}v1/packs/{pid}/actions/{aid}/result",
                                       "rel": base + "swagger#/actionResult"}]}
    assert server.action(aid).state == "PENDING"
    assert take(http, server, pid).status_code == 204


def test_take_hands_out_the_oldest_action_whose_labels_fit(server, http, unique):
    name = f"Echo{unique}"
    plain = register(http, server, echo_pack(unique)).json()["id"]
    dev = register(http, server, echo_pack(unique, labels={"env": "dev", "team": "a"})).json()["id"]
    first = server.enqueue(name, "Echo", "for dev", labels={"env": "dev"})
    second = server.enqueue(name, "Echo", "for anyone")
    third = server.enqueue(name, "Echo", "for prod", labels={"env": "prod"})
    # The unlabelled pack cannot take labelled actions; it gets the unlabelled one although it is newer.
    assert take(http, server, plain).json()["input"] == "for anyone"
    assert take(http, server, plain).status_code == 204
    # A pack with more labels than an action asks for still matches.
    assert take(http, server, dev).json()["input"] == "for dev"
    assert take(http, server, dev).status_code == 204
    assert [server.action(a).state for a in (first, second, third)] == ["PENDING", "PENDING", "NEW"]


def test_take_filters_on_action_name_and_ignores_command_name(server, http, unique):
    pid = register(http, server, echo_pack(unique)).json()["id"]
    server.enqueue(f"Echo{unique}", "Other", "other")
    server.enqueue(f"Echo{unique}", "Echo", "echo")
    assert take(http, server, pid, "?actionName=Echo").json()["input"] == "echo"
    assert take(http, server, pid, "?actionName=Echo").status_code == 204
    # The per-command links carry commandName, which the server does not read.
    assert take(http, server, pid, "?commandName=Echo").json()["input"] == "other"


def test_input_arrives_as_a_flow_delivers_it(server, http, unique):
    pid = register(http, server, echo_pack(unique)).json()["id"]
    value = {"int": 1, "float": 1.0, "half": 0.5, "big": 2 ** 53 + 1, "tiny": 1e-7, "small": 0.000015,
             "huge": 1e21, "gone": None, "list": [1.5, {"x": None, "y": "<&>"}], "text": "{{ not templated }}"}
    server.enqueue(f"Echo{unique}", "Echo", value)
    body = take(http, server, pid).content
    assert body.startswith(b'{"command":"Echo","input":{"big":9007199254740992,"float":1,"half":0.5,"huge":1e+21,'
                           b'"int":1,"list":[1.5,{"y":"\\u003c\\u0026\\u003e"}],"small":0.000015,'
                           b'"text":"{{ not templated }}","tiny":1e-7},"links":'), body
    for bare in ("text", 7, True, None, [1, "two"]):
        server.enqueue(f"Echo{unique}", "Echo", bare)
        assert take(http, server, pid).json()["input"] == bare
    with pytest.raises(ValueError, match=r"input\[1\] is null"):
        server.enqueue(f"Echo{unique}", "Echo", [1, None])


def test_result_outcomes(server, http, unique):
    pid = register(http, server, echo_pack(unique)).json()["id"]
    ok, failed, empty = (server.enqueue(f"Echo{unique}", "Echo", n) for n in ("ok", "failed", "empty"))
    hrefs = {}
    for _ in range(3):
        response = take(http, server, pid)
        hrefs[response.json()["input"]] = result_href(response)
    accepted = post_result(http, hrefs["ok"], {"event": "Echoed", "payload": {"n": 2 ** 53 + 1, "none": None},
                                               "createdAt": "2022-01-02T15:04:05.123456789+02:00"})
    assert (accepted.status_code, accepted.content) == (202, b"")
    assert (server.wait_for_result(ok).event, server.wait_for_result(ok).payload) == (
        "Echoed", {"n": 9007199254740992, "none": None})
    assert server.action(ok).state == "SUCCESS"
    # A repeated result, however well formed, is refused: the action is no longer PENDING.
    assert post_result(http, hrefs["ok"], {"event": "Echoed"}).status_code == 500
    assert post_result(http, hrefs["failed"], {"event": "FATAL", "payload": "ValueError: no"}).status_code == 202
    assert server.wait_for_result(failed).payload == "ValueError: no"
    assert server.action(failed).state == "FATAL"
    assert post_result(http, hrefs["empty"], {}).status_code == 202
    assert (server.wait_for_result(empty).event, server.action(empty).state) == ("", "SUCCESS")


def test_result_errors(server, http, unique):
    pid = register(http, server, echo_pack(unique)).json()["id"]
    server.enqueue(f"Echo{unique}", "Echo")
    href = result_href(take(http, server, pid))
    never_taken = server.enqueue(f"Echo{unique}", "Echo")
    base = f"{server.url}/v1/packs/{pid}/actions"
    cases = [(f"{base}/0123456789abcdef01234567/result", b'{"event":"E"}', 404),
             (f"{server.url}/v1/packs/Nope{unique}/actions/0123456789abcdef01234567/result", b'{"event":"E"}', 404),
             (href, b"not json", 400),
             (href, b'{"event": 5}', 400),
             (href, b'{"event":"E","createdAt":"2022-01-02T15:04:05.123456"}', 400),
             (href, b'{"event":"E","createdAt":1641135845}', 400),
             (href, b'{"event":"E","payload":{"n":1e400}}', 400),
             (href, b'{"event":"E","payload":{"n":1' + b"0" * 400 + b"}}", 400),
             (f"{base}/{never_taken}/result", b'{"event":"E"}', 500)]
    for url, body, status in cases:
        response = http.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=5)
        assert (response.status_code, response.content) == (status, b""), (url, body)
    assert server.action(never_taken).state == "NEW"


def test_a_result_from_a_pack_that_cannot_have_taken_the_action_gets_no_answer(server, http, unique):
    pid = register(http, server, echo_pack(unique, labels={"env": "dev"})).json()["id"]
    other = register(http, server, echo_pack(unique)).json()["id"]
    aid = server.enqueue(f"Echo{unique}", "Echo", labels={"env": "dev"})
    take(http, server, pid)
    with pytest.raises(requests.ConnectionError):
        http.post(f"{server.url}/v1/packs/{other}/actions/{aid}/result", data=b'{"event":"E"}', timeout=5)
    assert server.action(aid).state == "PENDING"


def test_events(server, http, unique):
    pid = register(http, server, echo_pack(unique)).json()["id"]
    server.watch_events(f"Echo{unique}", "Seen")
    url = f"{server.url}/v1/packs/{pid}/events"
    cases = [(b'{"event":"Seen","payload":{"n":1},"createdAt":"2026-01-02T09:00:00.001Z"}', 202),
             (b'{"event":"Seen","payload":"after"} trailing garbage', 202),
             (b"null", 202), (b'"x"', 400), (b"", 400), (b'{"event":5}', 400),
             (b'{"event":"Seen","createdAt":"2022-01-02 15:04:05Z"}', 400)]
    for body, status in cases:
        response = http.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=5)
        assert (response.status_code, response.content) == (status, b""), body
    unknown = http.post(f"{server.url}/v1/packs/Nope{unique}/events", json={"event": "Seen"}, timeout=5)
    assert unknown.status_code == 404
    events = server.wait_for_events(2, name="Seen")
    # (in either order: a real server times events to the millisecond)
    assert sorted((e.pack_id, e.event, json.dumps(e.payload)) for e in events) == [
        (pid, "Seen", '"after"'), (pid, "Seen", '{"n": 1}')]


def test_a_deleted_pack_gets_404_until_it_registers_again(server, http, unique):
    body = echo_pack(unique)
    pid = register(http, server, body).json()["id"]
    aid = server.enqueue(f"Echo{unique}", "Echo", "kept")
    href = result_href(take(http, server, pid))
    server.delete_pack(pid)
    with pytest.raises(KeyError):
        server.delete_pack(pid)
    assert http.get(f"{server.url}/v1/packs/{pid}", timeout=5).status_code == 404
    assert take(http, server, pid).status_code == 404
    assert http.post(f"{server.url}/v1/packs/{pid}/events", json={"event": "X"}, timeout=5).status_code == 404
    assert post_result(http, href, {"event": "Echoed"}).status_code == 404
    # Actions are separate documents: registering again recreates the id, and the old result link works again.
    assert register(http, server, body).json()["id"] == pid
    assert post_result(http, href, {"event": "Echoed", "payload": "late"}).status_code == 202
    assert server.wait_for_result(aid).payload == "late"


def test_takes_results_and_events_refresh_last_seen_even_when_refused(server, http, unique):
    pid = register(http, server, echo_pack(unique)).json()["id"]
    aid = server.enqueue(f"Echo{unique}", "Echo")

    def last_seen():
        text = http.get(f"{server.url}/v1/packs/{pid}", timeout=5).json()["lastSeen"]
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))

    def refreshes(send):
        before = last_seen()
        gevent.sleep(0.005)  # lastSeen reads back in milliseconds
        response = send()
        assert last_seen() > before
        return response

    taken = refreshes(lambda: take(http, server, pid))
    assert taken.status_code == 200
    refused = refreshes(lambda: http.post(f"{server.url}/v1/packs/{pid}/events", data=b"not json", timeout=5))
    assert refused.status_code == 400
    completed = refreshes(lambda: post_result(http, result_href(taken), {"event": "Echoed"}))
    assert completed.status_code == 202
    assert server.action(aid).state == "SUCCESS"


def test_concurrent_takes_hand_each_action_out_once_and_losers_get_500(server, http, unique):
    pid = register(http, server, echo_pack(unique)).json()["id"]
    if isinstance(server, FakeFlyteApi):
        # The real server reads the NEW actions, then claims the oldest with an update conditional on NEW; a take
        # that reads in between reads the same one. The fake shows it on request.
        server.take_cost = 0.0002
    sessions = [requests.Session() for _ in range(16)]

    def drain(session):
        statuses, taken = [], []
        while True:
            response = take(session, server, pid)
            statuses.append(response.status_code)
            if response.status_code == 200:
                taken.append(result_href(response).rsplit("/", 2)[1])
            elif response.status_code == 204:
                return statuses, taken

    lost = 0
    try:
        # On the real server the window is the time a take spends decoding and sorting what it read, under a
        # millisecond for 40 actions: 16 takers lose a few to a few dozen times per round. Rounds make sure of one.
        for _ in range(5):
            ids = server.create_actions(f"Echo{unique}", "Echo", 40)
            outcomes = [g.get(timeout=20) for g in [gevent.spawn(drain, s) for s in sessions]]
            statuses = [s for outcome, _ in outcomes for s in outcome]
            taken = [aid for _, ids_taken in outcomes for aid in ids_taken]
            assert sorted(taken) == sorted(ids), "every action handed out exactly once"
            assert set(statuses) <= {200, 204, 500}
            assert all(server.action(aid).state == "PENDING" for aid in ids)
            lost += statuses.count(500)
            if lost:
                break
    finally:
        for session in sessions:
            session.close()
    assert lost > 0, "concurrent takes of one pack race, and the losers get 500"


# --- routing details ------------------------------------------------------------------------------------------

def test_router_answers(server, http, unique):
    pid = register(http, server, echo_pack(unique)).json()["id"]
    missing = http.get(server.url + "/nope", timeout=5)
    assert (missing.status_code, missing.content) == (404, b"Not Found")
    wrong = http.post(server.url + "/v1", timeout=5)
    assert (wrong.status_code, wrong.headers["Allow"], wrong.content) == (405, "GET, HEAD", b"Method Not Allowed")
    wrong = http.put(f"{server.url}/v1/packs/{pid}/events", timeout=5)
    assert (wrong.status_code, wrong.headers["Allow"]) == (405, "POST")
    # An empty id at the end of the path matches no route at all.
    for method in ("GET", "POST", "DELETE"):
        response = http.request(method, server.url + "/v1/packs/", timeout=5)
        assert (response.status_code, response.content) == (404, b"Not Found"), method
    # Every path answers OPTIONS with the same methods (listed from a Go map, so in no fixed order).
    for path in ("/", "/v1/packs", f"/v1/packs/{pid}/actions/take", "/nope"):
        response = http.options(server.url + path, timeout=5)
        assert (response.status_code, response.content) == (200, b""), path
        assert sorted(response.headers["Allow"].split(", ")) == sorted(
            ["DELETE", "GET", "HEAD", "POST", "PUT", "CONNECT", "PATCH"]), path


def test_head_requests(server, http, unique):
    pid = register(http, server, echo_pack(unique)).json()["id"]
    assert http.head(server.url + "/health", timeout=5).status_code == 200
    assert http.head(server.url + "/nope", timeout=5).status_code == 404
    assert http.head(f"{server.url}/v1/packs/{pid}/events", timeout=5).status_code == 405
    # The router runs the GET handler without path parameters: the pack looked up is "", unknown here.
    assert http.head(f"{server.url}/v1/packs/{pid}", timeout=5).status_code == 404
    # A handler that answers 200 without writing the status first makes the router's HEAD wrapper panic.
    for path in ("/", "/v1", "/v1/packs"):
        with pytest.raises(requests.ConnectionError):
            http.head(server.url + path, timeout=5)
