"""The bearer token: where it is sent, how it is reloaded after a rotation, and that it never leaks.

Against the FakeFlyteApi where it can play the part, otherwise against a
stand-in WSGI server that records every request's Host and Authorization.
"""

import contextlib
import json
import logging
import os
import ssl
import subprocess
import sys

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
    FlyteError,
    FlyteHTTPError,
    FlyteProtocolError,
    PackDef,
    config,
)
from flyte_gevent.errors import scrub
from rawserver import RawServer, reply
from test_tls import pki  # noqa: F401 - a fixture, used by name

DONE = EventDef("Done")
PACK_DEF = PackDef("Tok", commands=[Command("Run", lambda input: Event(DONE), [DONE])])
SECRET = "s3cr3t-token-value"
EVENT = b'{"event":"Spontaneous","payload":null,"createdAt":"2026-01-02T03:04:05Z"}'
TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@contextlib.contextmanager
def stand_in(link_base):
    """A Flyte API whose links start with ``link_base(host_header)``; yields (url, seen) where *seen* records
    ``(host, path, authorization)`` for every request."""
    seen = []

    def app(environ, start_response):
        host = environ["HTTP_HOST"]
        seen.append((host, environ["PATH_INFO"], environ.get("HTTP_AUTHORIZATION")))
        base = link_base(host)
        routes = {
            "/v1": (200, {"links": [{"href": f"{base}/v1/packs", "rel": f"{base}/swagger#!/pack/listPacks"}]}),
            "/v1/packs": (201, {"id": "Tok", "links": [
                {"href": f"{base}/v1/packs/Tok/actions/take", "rel": f"{base}/swagger#!/action/takeAction"},
                {"href": f"{base}/v1/packs/Tok/events", "rel": f"{base}/swagger#/event"}]}),
        }
        status, document = routes.get(environ["PATH_INFO"], (204, None))
        body = json.dumps(document).encode() if document else b""
        start_response(f"{status} X", [("Content-Length", str(len(body)))])
        return [body]

    server = WSGIServer(("127.0.0.1", 0), app, log=None, error_log=None)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.stop(timeout=1)


# --- the token stays with the API's origin --------------------------------------------------------------------------

def test_links_to_another_origin_do_not_get_the_token():
    # The server says "localhost" where the pack was configured with 127.0.0.1: the same
    # machine here, but another origin, which could as well be another machine.
    with stand_in(lambda host: "http://" + host.replace("127.0.0.1", "localhost")) as (url, seen):
        client = Client(url, timeout=2.0, jwt=SECRET)
        with pytest.raises(FlyteProtocolError, match=f"outside the Flyte API's origin {url}") as caught:
            client.register(PACK_DEF)
    assert caught.value.request_sent is False
    assert [(host.split(":")[0], auth) for host, _, auth in seen] == [("127.0.0.1", f"Bearer {SECRET}")]


def test_links_inside_the_origin_get_the_token_however_they_are_spelled():
    with stand_in(lambda host: "HTTP://" + host) as (url, seen):
        client = Client(url, timeout=2.0, jwt=SECRET)
        registration = client.register(PACK_DEF)
        assert client.take(registration.take_url) is None
    assert [auth for _, _, auth in seen] == [f"Bearer {SECRET}"] * 3


def test_without_a_token_links_to_another_origin_are_followed():
    with stand_in(lambda host: "http://" + host.replace("127.0.0.1", "localhost")) as (url, seen):
        client = Client(url, timeout=2.0)
        registration = client.register(PACK_DEF)
        assert client.take(registration.take_url) is None
    assert [(host.split(":")[0], path) for host, path, _ in seen] == [
        ("127.0.0.1", "/v1"), ("localhost", "/v1/packs"), ("localhost", "/v1/packs/Tok/actions/take")]


def test_an_https_api_handing_out_http_links_gets_no_token_in_clear(pki):  # noqa: F811
    # A TLS-terminating proxy without X-Forwarded-Proto: the server builds http:// links.
    with stand_in(lambda host: "http://" + host) as (plain_url, plain_seen):
        plain_port = plain_url.rpartition(":")[2]
        with https_links_server(pki, lambda host: f"http://127.0.0.1:{plain_port}") as api:
            client = Client(api, timeout=2.0, ca_file=pki["ca"], jwt=SECRET)
            with pytest.raises(FlyteProtocolError, match="X-Forwarded-Proto") as caught:
                client.register(PACK_DEF)
    assert caught.value.url == f"http://127.0.0.1:{plain_port}/v1/packs"
    assert plain_seen == []  # nothing at all went out in clear


@contextlib.contextmanager
def https_links_server(pki, link_base):  # noqa: F811 - the certificates, not the fixture
    """An HTTPS stand-in whose discovery document points at ``link_base(host)``."""
    def app(environ, start_response):
        base = link_base(environ["HTTP_HOST"])
        body = json.dumps({"links": [{"href": f"{base}/v1/packs", "rel": f"{base}/swagger#!/pack/listPacks"}]})
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body.encode()]

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["cert"], pki["key"])
    server = WSGIServer(("127.0.0.1", 0), app, log=None, error_log=None, ssl_context=context)
    server.start()
    try:
        yield f"https://127.0.0.1:{server.server_port}"
    finally:
        server.stop(timeout=1)


def test_a_result_url_outside_the_origin_is_refused_before_sending():
    with RawServer(reply(202)) as other:
        client = Client("http://127.0.0.1:9", timeout=2.0, jwt=SECRET)
        with pytest.raises(FlyteProtocolError, match="outside the Flyte API's origin") as caught:
            client.post_result(f"{other.url}/v1/packs/P/actions/1/result", EVENT)
    assert caught.value.request_sent is False
    assert other.requests == []


# --- one reload per rotation ---------------------------------------------------------------------------------------

def test_a_rotation_reloads_the_token_once_however_many_requests_saw_the_401(flyte_api):
    issued = []

    def provider():
        gevent.sleep(0.05)  # a provider that takes a while, like a call to an identity service
        issued.append(f"token-{len(issued) + 1}")
        return issued[-1]

    client = Client(flyte_api.url, timeout=5.0, jwt=provider)
    flyte_api.accepted_tokens = {"token-1"}
    registration = client.register(PACK_DEF)
    flyte_api.accepted_tokens = {"token-2"}  # rotated on the server
    flyte_api.clear_requests()
    senders = [gevent.spawn(client.post_event, registration.events_url, EVENT) for _ in range(50)]
    gevent.joinall(senders, timeout=10, raise_error=True)
    assert issued == ["token-1", "token-2"]
    answers = [(r.headers["authorization"], r.status) for r in flyte_api.requests_for("event")]
    assert sorted(set(answers)) == [("Bearer token-1", 401), ("Bearer token-2", 202)]
    assert len(flyte_api.events) == 50


def test_a_401_for_an_older_token_resends_without_reloading(flyte_api, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("old")
    client = Client(flyte_api.url, timeout=5.0, jwt_file=str(token_file))
    flyte_api.accepted_tokens = {"old"}
    registration = client.register(PACK_DEF)
    # One request is slow to be answered; meanwhile the token rotates and a second request reloads it.
    flyte_api.accepted_tokens = {"new"}
    token_file.write_text("new")
    flyte_api.delay("event", 0.3, times=1)
    slow = gevent.spawn(client.post_event, registration.events_url, EVENT)
    gevent.sleep(0.05)
    client.post_event(registration.events_url, EVENT)
    token_file.write_text("newer")  # a reload now would pick this up and fail
    slow.get(timeout=5)
    assert sorted((r.headers["authorization"], r.status) for r in flyte_api.requests_for("event")) == [
        ("Bearer new", 202), ("Bearer new", 202), ("Bearer old", 401), ("Bearer old", 401)]


# --- token values that a header cannot carry ------------------------------------------------------------------------

def test_surrounding_whitespace_is_stripped_from_a_token(flyte_api):
    flyte_api.accepted_tokens = {SECRET}
    client = Client(flyte_api.url, timeout=2.0, jwt=f"  {SECRET}\n")
    registration = client.register(PACK_DEF)
    assert client.take(registration.take_url) is None
    assert {r.headers["authorization"] for r in flyte_api.requests} == {f"Bearer {SECRET}"}


@pytest.mark.parametrize("value", [f"{SECRET}\nsecond-line", f"{SECRET}\x00", f"{SECRET}\u20ac", f"{SECRET}\r\nX: 1"],
                         ids=["two lines", "NUL", "not latin-1", "header injection"])
def test_a_token_a_header_cannot_carry_is_a_config_error_that_does_not_show_it(value, tmp_path):
    with pytest.raises(ConfigError) as caught:
        Client("http://flyte:8080", jwt=value)
    assert caught.value.name == "jwt"
    assert "an HTTP header cannot carry" in str(caught.value) and SECRET not in str(caught.value)

    with pytest.raises(ConfigError) as caught:
        config.from_environ({"FLYTE_API": "http://flyte", "FLYTE_JWT": value}, names={"api", "jwt"})
    assert caught.value.name == "FLYTE_JWT"
    assert "FLYTE_JWT=<redacted>" in str(caught.value) and SECRET not in str(caught.value)

    token_file = tmp_path / "token"
    token_file.write_text(value)
    with pytest.raises(ConfigError) as caught:
        Client("http://flyte:8080", jwt_file=str(token_file))
    assert caught.value.name == "jwt_file"
    assert SECRET not in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        config.from_environ({"FLYTE_JWT_FILE": str(token_file)}, names={"jwt_file"})
    assert caught.value.name == "FLYTE_JWT_FILE"
    assert SECRET not in str(caught.value)


def test_an_unusable_token_from_a_provider_is_logged_without_it_and_the_old_one_kept(flyte_api, caplog):
    answers = [SECRET, f"rotated-{SECRET}\n\nwith a second line"]

    client = Client(flyte_api.url, timeout=2.0, jwt=lambda: answers.pop(0))
    flyte_api.accepted_tokens = {"something-else"}
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(FlyteAuthError) as caught:
            client.discover()
    assert "could not reload the Flyte API token: the token provider: the token holds a control" in caplog.text
    assert [r.headers["authorization"] for r in flyte_api.requests] == [f"Bearer {SECRET}"] * 2
    assert SECRET not in caplog.text and SECRET not in str(caught.value)


def test_an_unusable_token_file_after_a_rotation_keeps_the_old_token(flyte_api, tmp_path, caplog):
    token_file = tmp_path / "token"
    token_file.write_text(SECRET)
    client = Client(flyte_api.url, timeout=2.0, jwt_file=str(token_file))
    token_file.write_text(f"{SECRET}-2\n{SECRET}-3\n")
    flyte_api.accepted_tokens = {"something-else"}
    with pytest.raises(FlyteAuthError):
        client.discover()
    assert [r.headers["authorization"] for r in flyte_api.requests] == [f"Bearer {SECRET}"] * 2
    assert "could not reload the Flyte API token: the token file" in caplog.text
    assert SECRET not in caplog.text


def test_an_error_body_echoing_the_token_is_scrubbed():
    echo = f'{{"error": "bad credentials", "sent": "Bearer {SECRET}"}}'.encode()
    with RawServer(reply(500, echo), reply(401, echo)) as server:
        client = Client(server.url, timeout=2.0, jwt=SECRET)
        errors = []
        for _ in range(2):
            with pytest.raises(FlyteHTTPError) as caught:
                client.post_event(f"{server.url}/v1/packs/P/events", EVENT)
            errors.append(caught.value)
    assert [e.status for e in errors] == [500, 401]
    assert "Bearer <redacted>" in errors[0].body
    assert [e for e in errors if SECRET in str(e) or SECRET in e.body] == []


def test_scrub_takes_every_secret_out_of_a_text():
    text = "header value 'Bearer abc.def' refused; retry with ghi"
    assert scrub(text, ["abc.def", "ghi", ""]) == "header value 'Bearer <redacted>' refused; retry with <redacted>"
    assert scrub(text, []) == text


def test_the_token_never_reaches_exceptions_logs_or_health_output(flyte_api, caplog):
    client = Client(flyte_api.url, timeout=2.0, jwt=SECRET)
    registration = client.register(PACK_DEF)
    flyte_api.accepted_tokens = {"a-different-token"}
    texts = []
    with caplog.at_level(logging.DEBUG):
        for call in (client.discover, lambda: client.take(registration.take_url),
                     lambda: client.post_event(registration.events_url, EVENT)):
            with pytest.raises(FlyteError) as caught:
                call()
            texts += [str(caught.value), repr(caught.value), caught.value.body]
        texts.append(client.check_health()[1])
    texts.append(caplog.text)
    assert [t for t in texts if SECRET in t] == []


# --- a token file that cannot be read is a configuration error --------------------------------------------------------

@pytest.mark.parametrize("make, problem", [
    (lambda d: d / "missing", "cannot read the token file: No such file or directory"),
    (lambda d: d, "cannot read the token file: Is a directory"),
    (lambda d: (d / "empty").write_text(" \n") and d / "empty", "the token file is empty"),
], ids=["missing", "a directory", "empty"])
def test_a_token_file_that_cannot_be_read_is_a_config_error(tmp_path, make, problem):
    path = str(make(tmp_path))
    with pytest.raises(ConfigError, match=problem) as caught:
        Client("http://flyte:8080", jwt_file=path)
    assert caught.value.name == "jwt_file"
    assert str(caught.value).startswith(f"jwt_file={path!r}: ")
    with pytest.raises(ConfigError, match=problem) as caught:
        config.from_environ({"FLYTE_JWT_FILE": path}, names={"jwt_file"})
    assert caught.value.name == "FLYTE_JWT_FILE"


@pytest.mark.parametrize("how", ["environment", "flag"])
def test_the_cli_exits_78_naming_the_token_file_setting(subprocess_env, tmp_path, how):
    missing = str(tmp_path / "missing-token")
    env = {**subprocess_env, "FLYTE_API": "http://127.0.0.1:9", "FLYTE_HEALTH_PORT": "off"}
    args = [os.path.join(os.path.dirname(sys.executable), "flyte-gevent"), "run", "cli_targets:pack_def"]
    if how == "environment":
        env["FLYTE_JWT_FILE"] = missing
        named = "FLYTE_JWT_FILE"
    else:
        args += ["--jwt-file", missing]
        named = "--jwt-file"
    done = subprocess.run(args, cwd=TESTS, env=env, capture_output=True, text=True, timeout=20)
    assert done.returncode == 78, done.stderr
    assert done.stderr.strip() == f"Error: {named}={missing!r}: cannot read the token file: No such file or directory"
