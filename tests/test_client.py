"""The Client against a Flyte server over real loopback HTTP.

Most tests talk to the FakeFlyteApi (the ``flyte_api`` fixture). Where the fake
cannot answer the way a test needs — an old server without links in its 201
body, a malformed take, a /v1 document without the packs link — a tiny gevent
WSGI server plays the Flyte server instead (:func:`serving`). TLS is in
test_tls.py, the token's journey in test_token.py, and responses only a raw
socket can produce in test_transport.py.
"""

import contextlib
import json
import logging
import socket
import time

import gevent
import pytest
from gevent.pywsgi import WSGIServer

from flyte_gevent import (
    Client,
    Command,
    ConfigError,
    Event,
    EventDef,
    FlyteAuthError,
    FlyteConnectionError,
    FlyteError,
    FlyteHTTPError,
    FlyteProtocolError,
    FlyteTimeout,
    PackDef,
    PackNotFoundError,
)
from flyte_gevent.client import MalformedActionError, Registration
from flyte_gevent.models import Action
from flyte_gevent.schemas import encode_event, registration_body

ECHOED = EventDef("Echoed")


def echo(input):
    return Event(ECHOED, input)


def echo_pack_def(**kwargs):
    kwargs.setdefault("labels", {"env": "dev"})
    return PackDef("Echo", commands=[Command("Echo", echo, [ECHOED])], **kwargs)


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch):
    """Loopback tests must not go through a proxy configured on the developer's machine."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def client(flyte_api):
    client = Client(flyte_api.url, timeout=5.0)
    yield client
    client.close()


@pytest.fixture
def registration(client):
    return client.register(echo_pack_def())


@contextlib.contextmanager
def serving(app):
    """Serve a WSGI *app* on a free loopback port: a stand-in for a Flyte server the fake cannot imitate."""
    server = WSGIServer(("127.0.0.1", 0), app, log=None, error_log=None)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.stop(timeout=1)


def respond(start_response, status, body=b"", headers=()):
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    start_response(f"{status} X", [("Content-Length", str(len(body))), *headers])
    return [body]


def v1_document(base, with_packs=True):
    links = [{"href": f"{base}/v1", "rel": "self"},
             {"href": f"{base}/health", "rel": f"{base}/swagger#!/info/health"}]
    if with_packs:
        links.append({"href": f"{base}/v1/packs", "rel": f"{base}/swagger#!/pack/listPacks"})
    return {"links": links}


def refused_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- discovery ---------------------------------------------------------------------------------------------------

def test_discovery_finds_packs_and_health_links(flyte_api, client):
    discovery = client.discover()
    assert discovery.packs_url == f"{flyte_api.url}/v1/packs"
    assert discovery.health_url == f"{flyte_api.url}/health"
    request = flyte_api.requests_for("v1")[0]
    assert request.method == "GET"
    assert request.headers["accept"] == "application/json"


def test_discovery_and_registration_follow_links_built_for_a_forwarded_host(flyte_api, client):
    # Behind a proxy the server builds hrefs and rels on X-Forwarded-Host, not on
    # the address the client used: the client must match rels by their fragment
    # and use the hrefs it was given.
    forwarded = f"localhost:{flyte_api.port}"
    client._session.headers["X-Forwarded-Host"] = forwarded
    assert client.discover().packs_url == f"http://{forwarded}/v1/packs"

    registration = client.register(echo_pack_def())
    assert registration.take_url == f"http://{forwarded}/v1/packs/Echo.env.dev/actions/take"
    assert registration.events_url == f"http://{forwarded}/v1/packs/Echo.env.dev/events"
    aid = flyte_api.enqueue("Echo", "Echo", {"text": "hi"})
    action = client.take(registration.take_url)
    assert action.id == aid
    assert action.result_url == f"http://{forwarded}/v1/packs/Echo.env.dev/actions/{aid}/result"
    assert [r.headers["host"] for r in flyte_api.requests_for("take")] == [forwarded]


def test_discovery_checks_the_status(flyte_api, client):
    flyte_api.fail("v1", 500)
    with pytest.raises(FlyteHTTPError) as caught:
        client.discover()
    error = caught.value
    assert (error.method, error.url, error.status) == ("GET", f"{flyte_api.url}/v1", 500)
    assert str(error).startswith(f"GET {flyte_api.url}/v1: discovery expected 200, got 500")
    assert client.discover().packs_url == f"{flyte_api.url}/v1/packs"  # nothing bad was cached


@pytest.mark.parametrize("document, reason", [
    (None, "no link with rel .../pack/listPacks in the /v1 document"),
    (b"<html>proxy error</html>", "link document is not JSON"),
    ({"self": "x"}, "malformed link document: links: Missing data for required field."),
    ({"links": [{"rel": "self"}]}, "malformed link document: links.0.href: Missing data for required field."),
])
def test_a_discovery_document_without_a_usable_packs_link_is_a_protocol_error(document, reason):
    def app(environ, start_response):
        base = f"http://{environ['HTTP_HOST']}"
        return respond(start_response, 200, v1_document(base, with_packs=False) if document is None else document)

    with serving(app) as url:
        client = Client(url, timeout=2.0)
        with pytest.raises(FlyteProtocolError) as caught:
            client.discover()
    assert reason in str(caught.value)
    assert (caught.value.method, caught.value.url, caught.value.status) == ("GET", f"{url}/v1", None)
    assert "\n" not in str(caught.value)


def test_links_are_fetched_afresh_for_every_registration(flyte_api, client):
    flyte_api.fail("v1", 500)
    with pytest.raises(FlyteHTTPError):
        client.register(echo_pack_def())
    client.register(echo_pack_def())
    client.register(echo_pack_def())
    assert [r.status for r in flyte_api.requests_for("v1")] == [500, 200, 200]
    assert flyte_api.packs["Echo.env.dev"].registrations == 2


# --- registration ------------------------------------------------------------------------------------------------

def test_registration_returns_the_take_and_events_urls(flyte_api, client):
    pack_def = echo_pack_def(help_url="https://example.com/echo")
    registration = client.register(pack_def)
    base = f"{flyte_api.url}/v1/packs/Echo.env.dev"
    assert registration == Registration("Echo.env.dev", f"{base}/actions/take", f"{base}/events", base)

    request = flyte_api.requests_for("register")[0]
    assert (request.method, request.path, request.status) == ("POST", "/v1/packs", 201)
    assert request.headers["content-type"] == "application/json"
    assert request.json() == registration_body(pack_def)
    assert flyte_api.violations == []


def test_a_pack_without_any_help_url_registers(flyte_api, client):
    registration = client.register(PackDef("Plain", commands=[Command("Run", echo, [ECHOED])]))
    assert registration.pack_id == "Plain"
    assert "links" not in flyte_api.packs["Plain"].body


def test_user_links_resembling_server_rels_are_not_mistaken_for_server_links(flyte_api, client):
    # Go takes the first rel ending in "event": a user's "prevent" link (Go bug 2.11-3).
    pack_def = echo_pack_def(links={"prevent": "http://user.example/prevent", "x#event": "http://user.example/x"})
    registration = client.register(pack_def)
    assert registration.events_url == f"{flyte_api.url}/v1/packs/Echo.env.dev/events"
    assert registration.take_url == f"{flyte_api.url}/v1/packs/Echo.env.dev/actions/take"


def test_a_definition_the_server_refuses_raises_http_400(flyte_api, client):
    # The server's unanchored regex refuses "support" (it contains "up"); PackDef refuses it too, so it is added after.
    pack_def = echo_pack_def()
    pack_def.links["support"] = "https://example.com/support"
    with pytest.raises(FlyteHTTPError) as caught:
        client.register(pack_def)
    error = caught.value
    assert (error.method, error.url, error.status) == ("POST", f"{flyte_api.url}/v1/packs", 400)
    assert "refused the pack definition (400)" in str(error)
    assert flyte_api.packs == {}


@pytest.mark.parametrize("status, error_class", [(500, FlyteHTTPError), (503, FlyteHTTPError),
                                                 (401, FlyteAuthError), (200, FlyteHTTPError)])
def test_registration_needs_exactly_201(flyte_api, client, status, error_class):
    flyte_api.fail("register", status)
    with pytest.raises(error_class) as caught:
        client.register(echo_pack_def())
    assert type(caught.value) is error_class
    assert caught.value.status == status


def old_server(requests_seen, created_body=b"", location=True, pack_status=200):
    """A Flyte server from before 2018: the 201 carries no links; they are at Location."""
    def app(environ, start_response):
        base = f"http://{environ['HTTP_HOST']}"
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        requests_seen.append((method, path))
        if (method, path) == ("GET", "/v1"):
            return respond(start_response, 200, v1_document(base))
        if (method, path) == ("POST", "/v1/packs"):
            headers = [("Location", f"{base}/v1/packs/Echo.env.dev")] if location else []
            return respond(start_response, 201, created_body, headers)
        if (method, path) == ("GET", "/v1/packs/Echo.env.dev"):
            pack = {"id": "Echo.env.dev", "links": [
                {"href": f"{base}/v1/packs/Echo.env.dev/actions/take", "rel": f"{base}/swagger#!/action/takeAction"},
                {"href": f"{base}/v1/packs/Echo.env.dev/events", "rel": f"{base}/swagger#/event"}]}
            return respond(start_response, pack_status, pack if pack_status == 200 else b"")
        return respond(start_response, 404)
    return app


@pytest.mark.parametrize("created_body", [b"", b'{"id": "Echo.env.dev", "name": "Echo"}'],
                         ids=["empty body", "body without links"])
def test_registration_falls_back_to_location_when_the_201_has_no_links(created_body):
    seen = []
    with serving(old_server(seen, created_body)) as url:
        registration = Client(url, timeout=2.0).register(echo_pack_def())
    assert registration == Registration("Echo.env.dev", f"{url}/v1/packs/Echo.env.dev/actions/take",
                                        f"{url}/v1/packs/Echo.env.dev/events", f"{url}/v1/packs/Echo.env.dev")
    assert seen == [("GET", "/v1"), ("POST", "/v1/packs"), ("GET", "/v1/packs/Echo.env.dev")]


def test_a_201_without_links_or_location_is_a_protocol_error():
    with serving(old_server([], location=False)) as url:
        with pytest.raises(FlyteProtocolError, match="registration response has no take and events links") as caught:
            Client(url, timeout=2.0).register(echo_pack_def())
    assert (caught.value.method, caught.value.url) == ("POST", f"{url}/v1/packs")


def test_a_failing_location_fallback_raises_with_the_location_url():
    with serving(old_server([], pack_status=503)) as url:
        with pytest.raises(FlyteHTTPError) as caught:
            Client(url, timeout=2.0).register(echo_pack_def())
    assert (caught.value.method, caught.value.url, caught.value.status) == (
        "GET", f"{url}/v1/packs/Echo.env.dev", 503)


# --- take --------------------------------------------------------------------------------------------------------

def test_take_200_returns_the_action(flyte_api, client, registration):
    aid = flyte_api.enqueue("Echo", "Echo", {"text": "hi"}, labels={"env": "dev"})
    action = client.take(registration.take_url)
    assert action == Action(aid, "Echo", {"text": "hi"},
                            f"{flyte_api.url}/v1/packs/Echo.env.dev/actions/{aid}/result")
    request = flyte_api.requests_for("take")[0]
    assert (request.method, request.body, request.status) == ("POST", b"null", 200)
    assert request.headers["content-type"] == "application/json"
    assert flyte_api.action(aid).state == "PENDING"


def test_take_204_returns_none(flyte_api, client, registration):
    assert client.take(registration.take_url) is None
    assert flyte_api.requests_for("take")[0].status == 204


def test_take_404_means_the_pack_is_gone(flyte_api, client, registration):
    flyte_api.delete_pack("Echo.env.dev")
    with pytest.raises(PackNotFoundError) as caught:
        client.take(registration.take_url)
    error = caught.value
    assert (error.method, error.url, error.status) == ("POST", registration.take_url, 404)
    assert str(error) == f"POST {registration.take_url}: not found (404): the pack is not registered " \
                         f"(take expected 200 or 204)"


def test_take_500_is_an_http_error(flyte_api, client, registration):
    flyte_api.fail("take", 500)
    with pytest.raises(FlyteHTTPError) as caught:
        client.take(registration.take_url)
    assert type(caught.value) is FlyteHTTPError
    assert caught.value.status == 500
    assert client.take(registration.take_url) is None  # the next take is fine


def test_take_401_is_an_auth_error(flyte_api, client, registration):
    flyte_api.accepted_tokens = {"only-this"}
    with pytest.raises(FlyteAuthError) as caught:
        client.take(registration.take_url)
    assert (caught.value.method, caught.value.url, caught.value.status) == ("POST", registration.take_url, 401)


RESULT_PATH = "/v1/packs/Echo/actions/5f0c1d2e3a4b5c6d7e8f9012/result"


def take_answering(body):
    def app(environ, start_response):
        base = f"http://{environ['HTTP_HOST']}"
        return respond(start_response, 200, body(base) if callable(body) else body)
    return app


@pytest.mark.parametrize("body, problem", [
    (lambda base: {"command": 42, "input": {"a": 1},
                   "links": [{"href": base + RESULT_PATH, "rel": base + "/swagger#/actionResult"}]},
     "command: Not a valid string."),
    (lambda base: {"command": "Echo",
                   "links": [{"href": base + RESULT_PATH, "rel": base + "/swagger#/actionResult"}]},
     "input: Missing data for required field."),
])
def test_a_malformed_action_keeps_its_result_url_so_it_can_be_failed(body, problem):
    with serving(take_answering(body)) as url:
        with pytest.raises(MalformedActionError) as caught:
            Client(url, timeout=2.0).take(f"{url}/v1/packs/Echo/actions/take")
    error = caught.value
    assert isinstance(error, FlyteProtocolError)
    assert error.action is not None
    assert error.action.result_url == url + RESULT_PATH
    assert error.action.id == "5f0c1d2e3a4b5c6d7e8f9012"
    assert problem in str(error)
    assert (error.method, error.url, error.status) == ("POST", f"{url}/v1/packs/Echo/actions/take", None)
    assert error.body  # an excerpt of what the server sent


@pytest.mark.parametrize("body, problem", [
    (b"not json at all", "not JSON"),
    ({"command": "Echo", "input": 1}, "links: Missing data for required field."),
    ({"command": "Echo", "input": 1, "links": [{"href": "http://h/x", "rel": "http://h/swagger#/event"}]},
     "links: no link with rel .../actionResult"),
    ([1, 2, 3], "Invalid input type."),
])
def test_a_malformed_action_without_a_result_url_has_no_action(body, problem):
    with serving(take_answering(body)) as url:
        with pytest.raises(MalformedActionError) as caught:
            Client(url, timeout=2.0).take(f"{url}/take")
    assert caught.value.action is None
    assert problem in str(caught.value)
    assert "\n" not in str(caught.value)


# --- results and events ------------------------------------------------------------------------------------------

@pytest.fixture
def taken(flyte_api, client, registration):
    """An action taken by the client and waiting for its result."""
    flyte_api.enqueue("Echo", "Echo", {"text": "hi"})
    return client.take(registration.take_url)


def test_post_result_202_completes_the_action(flyte_api, client, taken):
    client.post_result(taken.result_url, encode_event(Event(ECHOED, {"text": "hi"})))
    result = flyte_api.wait_for_result(taken.id, timeout=2)
    assert (result.event, result.payload) == ("Echoed", {"text": "hi"})
    assert flyte_api.requests_for("result")[0].status == 202
    assert flyte_api.violations == []


@pytest.mark.parametrize("body", [b'"not an object"', b"{", b'{"event":"E","createdAt":"2026-01-02T03:04:05"}'])
def test_post_result_400_is_an_http_error(flyte_api, client, taken, body):
    with pytest.raises(FlyteHTTPError) as caught:
        client.post_result(taken.result_url, body)
    assert type(caught.value) is FlyteHTTPError
    assert (caught.value.method, caught.value.url, caught.value.status) == ("POST", taken.result_url, 400)
    assert str(caught.value).endswith("expected 202, got 400 Bad Request")


def test_post_result_for_an_unknown_action_is_404(flyte_api, client, registration):
    url = f"{flyte_api.url}/v1/packs/Echo.env.dev/actions/000000000000000000000000/result"
    with pytest.raises(PackNotFoundError) as caught:
        client.post_result(url, encode_event(Event(ECHOED)))
    assert caught.value.status == 404


def test_post_result_after_the_pack_was_deleted_is_404(flyte_api, client, taken):
    flyte_api.delete_pack("Echo.env.dev")
    with pytest.raises(PackNotFoundError):
        client.post_result(taken.result_url, encode_event(Event(ECHOED)))


def test_a_repeated_result_is_500(flyte_api, client, taken):
    client.post_result(taken.result_url, encode_event(Event(ECHOED, 1)))
    with pytest.raises(FlyteHTTPError) as caught:
        client.post_result(taken.result_url, encode_event(Event(ECHOED, 2)))
    assert caught.value.status == 500
    assert flyte_api.action(taken.id).result["payload"] == 1


def test_post_event_202_delivers_the_event(flyte_api, client, registration):
    client.post_event(registration.events_url, encode_event(Event("Spontaneous", {"n": 1})))
    (event,) = flyte_api.wait_for_events(1, timeout=2)
    assert (event.pack_id, event.event, event.payload) == ("Echo.env.dev", "Spontaneous", {"n": 1})
    assert set(event.body) == {"event", "payload", "createdAt"}


def test_post_event_errors(flyte_api, client, registration):
    with pytest.raises(FlyteHTTPError) as caught:
        client.post_event(registration.events_url, b"[1]")
    assert caught.value.status == 400
    flyte_api.delete_pack("Echo.env.dev")
    with pytest.raises(PackNotFoundError):
        client.post_event(registration.events_url, encode_event(Event("Spontaneous")))
    assert flyte_api.events == []


# --- JWT -----------------------------------------------------------------------------------------------------------

def exercise_every_request_kind(flyte_api, client):
    """Discovery, registration, take (200 and 204), result, event and health, through one client."""
    registration = client.register(echo_pack_def())
    flyte_api.enqueue("Echo", "Echo", "x")
    action = client.take(registration.take_url)
    assert client.take(registration.take_url) is None
    client.post_result(action.result_url, encode_event(Event(ECHOED, "x")))
    client.post_event(registration.events_url, encode_event(Event("Spontaneous")))
    assert client.check_health()[0] is True
    routes = [r.route for r in flyte_api.requests]
    assert set(routes) == {"v1", "register", "take", "result", "event", "health"}
    return flyte_api.requests


def test_jwt_is_sent_on_every_request_of_every_kind(flyte_api):
    flyte_api.accepted_tokens = {"abc.def.ghi"}
    requests = exercise_every_request_kind(flyte_api, Client(flyte_api.url, timeout=5.0, jwt="abc.def.ghi"))
    assert [(r.route, r.headers.get("authorization")) for r in requests] == [
        (r.route, "Bearer abc.def.ghi") for r in requests]
    assert all(r.status in (200, 201, 202, 204) for r in requests)


def test_no_authorization_header_without_a_jwt(flyte_api, client):
    requests = exercise_every_request_kind(flyte_api, client)
    assert [r for r in requests if "authorization" in r.headers] == []


def test_a_jwt_file_is_reread_after_a_401_and_the_request_retried_once(flyte_api, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    flyte_api.accepted_tokens = {"first-token"}
    client = Client(flyte_api.url, timeout=5.0, jwt_file=str(token_file))
    registration = client.register(echo_pack_def())

    # The token rotates: take (lean transport) recovers with the new file contents.
    flyte_api.accepted_tokens = {"second-token"}
    token_file.write_text("second-token\n")
    flyte_api.clear_requests()
    assert client.take(registration.take_url) is None
    assert [(r.headers["authorization"], r.status) for r in flyte_api.requests] == [
        ("Bearer first-token", 401), ("Bearer second-token", 204)]

    # And again for registration (requests transport).
    flyte_api.accepted_tokens = {"third-token"}
    token_file.write_text("third-token")
    flyte_api.clear_requests()
    client.register(echo_pack_def())
    assert [(r.route, r.headers["authorization"], r.status) for r in flyte_api.requests] == [
        ("v1", "Bearer second-token", 401), ("v1", "Bearer third-token", 200),
        ("register", "Bearer third-token", 201)]


def test_a_401_after_reloading_the_token_is_raised_without_further_retries(flyte_api, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("stale")
    flyte_api.accepted_tokens = {"fresh"}
    client = Client(flyte_api.url, timeout=5.0, jwt_file=str(token_file))
    with pytest.raises(FlyteAuthError):
        client.discover()
    assert [r.status for r in flyte_api.requests] == [401, 401]


def test_a_static_jwt_is_not_retried(flyte_api):
    flyte_api.accepted_tokens = {"other"}
    with pytest.raises(FlyteAuthError):
        Client(flyte_api.url, timeout=5.0, jwt="static").discover()
    assert len(flyte_api.requests) == 1


def test_a_token_provider_is_called_again_after_a_401(flyte_api):
    issued = []

    def provider():
        issued.append(f"token-{len(issued) + 1}")
        return issued[-1]

    client = Client(flyte_api.url, timeout=5.0, jwt=provider)
    flyte_api.accepted_tokens = {"token-1"}
    registration = client.register(echo_pack_def())
    assert issued == ["token-1"]  # called once up front, not per request

    flyte_api.accepted_tokens = {"token-2"}
    client.post_event(registration.events_url, encode_event(Event("Spontaneous")))
    assert issued == ["token-1", "token-2"]
    assert [(r.route, r.headers["authorization"], r.status) for r in flyte_api.requests_for("event")] == [
        ("event", "Bearer token-1", 401), ("event", "Bearer token-2", 202)]


def test_a_failing_token_provider_keeps_the_old_token_and_logs_without_it(flyte_api, caplog):
    calls = []

    def provider():
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("identity provider down")
        return "s3cr3t-token-value"

    client = Client(flyte_api.url, timeout=5.0, jwt=provider)
    flyte_api.accepted_tokens = {"something-else"}
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(FlyteAuthError):
            client.discover()
    assert "could not reload the Flyte API token: RuntimeError: identity provider down" in caplog.text
    assert [r.headers["authorization"] for r in flyte_api.requests] == ["Bearer s3cr3t-token-value"] * 2
    assert "s3cr3t" not in caplog.text


def test_the_token_never_appears_in_errors_or_debug_logs(flyte_api, caplog):
    secret = "s3cr3t-token-value"
    client = Client(flyte_api.url, timeout=5.0, jwt=secret)
    registration = client.register(echo_pack_def())
    flyte_api.accepted_tokens = {"a-different-token"}
    errors = []
    with caplog.at_level(logging.DEBUG):
        for call in (client.discover, lambda: client.register(echo_pack_def()),
                     lambda: client.take(registration.take_url),
                     lambda: client.post_result(registration.take_url.replace("actions/take", "actions/1/result"),
                                                b"{}"),
                     lambda: client.post_event(registration.events_url, b"{}")):
            with pytest.raises(FlyteAuthError) as caught:
                call()
            errors.append(caught.value)
        ok, message = client.check_health()
    assert not ok
    texts = [str(e) for e in errors] + [repr(e) for e in errors] + [message, caplog.text, repr(client)]
    assert [t for t in texts if secret in t] == []
    assert caplog.records  # DEBUG logging really was captured


# --- timeouts and connection errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ["v1", "register", "take", "result", "event"])
def test_every_request_times_out(flyte_api, client, route):
    registration = client.register(echo_pack_def())
    flyte_api.enqueue("Echo", "Echo", "x")
    action = client.take(registration.take_url)
    calls = {
        "v1": lambda c: c.discover(),
        "register": lambda c: c.register(echo_pack_def()),
        "take": lambda c: c.take(registration.take_url),
        "result": lambda c: c.post_result(action.result_url, encode_event(Event(ECHOED))),
        "event": lambda c: c.post_event(registration.events_url, encode_event(Event("Spontaneous"))),
    }
    impatient = Client(flyte_api.url, timeout=0.3)
    flyte_api.delay(route, 2)
    started = time.monotonic()
    with pytest.raises(FlyteTimeout) as caught:
        calls[route](impatient)
    elapsed = time.monotonic() - started
    assert 0.25 < elapsed < 1.5
    assert "no answer within 0.3 s" in str(caught.value)
    assert caught.value.status is None
    assert isinstance(caught.value, FlyteConnectionError)


@pytest.mark.parametrize("call", ["discover", "take"])
def test_a_refused_connection_is_a_connection_error(call):
    url = f"http://127.0.0.1:{refused_port()}"
    client = Client(url, timeout=2.0)
    started = time.monotonic()
    with pytest.raises(FlyteConnectionError) as caught:
        if call == "discover":
            client.discover()
        else:
            client.take(f"{url}/v1/packs/P/actions/take")
    assert time.monotonic() - started < 1.5
    assert not isinstance(caught.value, FlyteTimeout)
    assert caught.value.status is None
    assert "Connection refused" in str(caught.value)


# --- construction ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["ftp://x", "flyte:8080", "", None, "http://", "//flyte:8080", "http://flyte:99999",
                                 "http://flyte:port"])
def test_client_refuses_a_url_that_is_not_http_with_a_host(url):
    with pytest.raises(ConfigError, match="is not an http\\(s\\) URL with a host") as caught:
        Client(url)
    assert caught.value.name == "url"


@pytest.mark.parametrize("timeout", [0, -1, "abc", "10", None, True, float("nan"), float("inf")])
def test_client_refuses_a_timeout_that_is_not_a_positive_number(timeout):
    with pytest.raises(ConfigError, match="must be a positive number of seconds") as caught:
        Client("http://flyte:8080", timeout=timeout)
    assert caught.value.name == "timeout"


def test_client_accepts_integer_and_fractional_timeouts():
    assert Client("http://flyte:8080", timeout=3).timeout == 3.0
    assert Client("http://flyte-api:8080", timeout=0.25).timeout == 0.25


def test_credentials_in_the_api_url_are_redacted(flyte_api):
    refused = Client(f"http://user:s3cret@127.0.0.1:{refused_port()}", timeout=2.0)
    with pytest.raises(FlyteConnectionError) as caught:
        refused.discover()
    assert "s3cret" not in str(caught.value) and "s3cret" not in caught.value.url
    assert "://***@127.0.0.1:" in caught.value.url
    assert "s3cret" not in repr(refused)

    answering = Client(flyte_api.url.replace("http://", "http://user:s3cret@"), timeout=2.0)
    flyte_api.fail("v1", 503)
    with pytest.raises(FlyteHTTPError) as caught:
        answering.discover()
    assert caught.value.url == flyte_api.url.replace("http://", "http://***@") + "/v1"
    assert "s3cret" not in str(caught.value)

    with pytest.raises(ConfigError) as caught:
        Client("ftp://user:s3cret@flyte")
    assert "s3cret" not in str(caught.value)


# --- keep-alive --------------------------------------------------------------------------------------------------

def recording_app(ports, close=False):
    """Answers every POST with 204 and records the client port each request came from."""
    def app(environ, start_response):
        ports.append(environ["REMOTE_PORT"])
        return respond(start_response, 204, headers=[("Connection", "close")] if close else [])
    return app


def test_sequential_takes_results_and_events_share_one_connection():
    ports = []
    with serving(recording_app(ports)) as url:
        client = Client(url, timeout=2.0)
        for _ in range(10):
            assert client.take(f"{url}/v1/packs/P/actions/take") is None
        client.post_result(f"{url}/v1/packs/P/actions/a/result", b"{}")  # any 2xx is accepted, like 202
        for _ in range(10):
            assert client.take(f"{url}/v1/packs/P/actions/take") is None
    assert len(ports) == 21
    assert len(set(ports)) == 1


def test_a_server_that_closes_each_connection_is_handled():
    ports = []
    with serving(recording_app(ports, close=True)) as url:
        client = Client(url, timeout=2.0)
        for _ in range(5):
            assert client.take(f"{url}/v1/packs/P/actions/take") is None
    assert len(set(ports)) == 5


def test_an_idle_connection_closed_by_the_server_is_replaced_transparently(flyte_api, client, registration):
    assert client.take(registration.take_url) is None
    # The server drops every connection (as a restart or an idle timeout would) and comes back.
    flyte_api.outage("refuse")
    flyte_api.restore()
    aid = flyte_api.enqueue("Echo", "Echo", 1)
    assert client.take(registration.take_url).id == aid
    assert [r.status for r in flyte_api.requests_for("take")] == [204, 200]


def test_flyte_errors_share_one_base_class():
    for error_class in (FlyteConnectionError, FlyteTimeout, FlyteHTTPError, FlyteAuthError, PackNotFoundError,
                        FlyteProtocolError, MalformedActionError):
        assert issubclass(error_class, FlyteError)
    error = FlyteHTTPError("boom", method="POST", url="http://u:p@h/x", status=500, body=b"x" * 500)
    assert (error.method, error.url, error.status, error.body) == ("POST", "http://***@h/x", 500, "x" * 200)


def test_close_drops_the_keep_alive_connections():
    ports = []
    with serving(recording_app(ports)) as url:
        client = Client(url, timeout=2.0)
        client.take(f"{url}/take")
        client.close()
        client.take(f"{url}/take")
    assert len(set(ports)) == 2


def test_connections_to_the_api_are_capped_and_requests_queue_for_a_free_one(flyte_api):
    client = Client(flyte_api.url, timeout=5.0, max_connections=2)
    registration = client.register(PackDef("Capped"))
    flyte_api.delay("event", 0.2, times=None)
    started = time.monotonic()
    senders = [gevent.spawn(client.post_event, registration.events_url, b'{"event":"E","payload":null}')
               for _ in range(6)]
    gevent.joinall(senders, timeout=10, raise_error=True)
    # Six 0.2 s requests over two connections take three rounds; uncapped they would overlap in one.
    assert time.monotonic() - started >= 0.55
    assert len(flyte_api.requests_for("event")) == 6


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_max_connections_must_be_a_positive_whole_number(value):
    with pytest.raises(ConfigError, match="max_connections"):
        Client("http://flyte:8080", max_connections=value)


def test_round_trip_is_the_floor_of_recent_request_times(flyte_api, client, registration):
    assert client.round_trip > 0.0  # registration was answered
    flyte_api.latency = 0.05
    for _ in range(3):
        client.take(registration.take_url)
    floor = client.round_trip
    assert floor < 0.05, "slower answers raise the floor only slowly"
    flyte_api.latency = 0.0
    client.take(registration.take_url)
    assert client.round_trip < floor, "a quicker answer lowers it at once"
    quick = client.round_trip
    flyte_api.latency = 0.2
    client.take(registration.take_url)
    assert quick < client.round_trip < quick + 0.05 * 0.2, "one slow answer moves it 2 % of the way"
