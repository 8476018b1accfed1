"""The hot-path transport (take, result, event) against responses no polite server sends.

Every test talks to a :class:`rawserver.RawServer` over loopback, which replays
scripted bytes and records each request and the connection it came on.
"""

import json
import os
import socket
import subprocess
import time

import gevent
import gevent.event
import pytest
from gevent import monkey
from gevent.server import StreamServer

from flyte_gevent import (
    Client,
    ConfigError,
    FlyteConnectionError,
    FlyteHTTPError,
    FlyteProtocolError,
    FlyteTimeout,
    config,
)
from flyte_gevent._http import HTTPPool, RequestNotSent
from helpers import wait_until
from rawserver import CLOSE, RESET, RESET_BEFORE_BODY, RawServer, reply

AID = "5f0c1d2e3a4b5c6d7e8f9012"
RESULT = b'{"event":"Done","payload":null,"createdAt":"2026-01-02T03:04:05Z"}'


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch):
    """A proxy configured on the developer's machine would route around the transport under test."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def action_body(base="http://flyte"):
    return json.dumps({"command": "Echo", "input": {"n": 1}, "links": [
        {"href": f"{base}/v1/packs/P/actions/{AID}/result", "rel": f"{base}/swagger#/actionResult"}]}).encode()


def take(server, client=None, **options):
    client = client or Client(server.url, timeout=options.pop("timeout", 2.0), **options)
    return client.take(f"{server.url}/v1/packs/P/actions/take")


def result(server, client):
    client.post_result(f"{server.url}/v1/packs/P/actions/{AID}/result", RESULT)


def head(status, *headers):
    return ("\r\n".join([f"HTTP/1.1 {status} X", *headers]) + "\r\n\r\n").encode()


# --- interim responses -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("interim", [
    head(103, "Link: </style.css>; rel=preload"),
    head(100),
    head(100) + head(103, "Link: </a>", "Link: </b>"),
], ids=["103 Early Hints", "100 Continue", "100 then 103"])
def test_interim_responses_before_the_final_one_are_skipped(interim):
    body = action_body()
    final = head(200, f"Content-Length: {len(body)}") + body
    with RawServer(interim + final, interim + head(202, "Content-Length: 0")) as server:
        client = Client(server.url, timeout=2.0)
        action = take(server, client)
        assert action is not None and action.id == AID
        result(server, client)
    assert len(server.requests) == 2
    assert {r.connection for r in server.requests} == {0}  # and the connection stayed usable


def test_an_interim_response_arriving_in_pieces_is_skipped_too():
    def step(channel, request):
        for piece in (b"HTTP/1.1 103 Ea", b"rly Hints\r\nLink: </x>\r\n", b"\r\nHTTP/1.1 204 No Content\r\n\r\n"):
            channel.send(piece)
            gevent.sleep(0.01)

    with RawServer(step) as server:
        assert take(server) is None


def test_a_switching_protocols_answer_is_a_bad_response():
    with RawServer(head(101, "Upgrade: websocket", "Connection: Upgrade") + b"\x81\x00") as server:
        with pytest.raises(FlyteConnectionError, match="unexpected 101 response") as caught:
            take(server)
    assert caught.value.request_sent is None


# --- one deadline ------------------------------------------------------------------------------------------------

def test_a_trickling_body_cannot_stretch_the_deadline():
    # Every byte arrives well within the timeout of a single read, but the
    # whole response does not arrive within the request's deadline.
    def step(channel, request):
        body = action_body()
        channel.send(head(200, f"Content-Length: {len(body)}"))
        channel.trickle(body[:10], 0.15)

    with RawServer(step) as server:
        started = time.monotonic()
        with pytest.raises(FlyteTimeout, match=r"no answer within 0\.5 s") as caught:
            take(server, timeout=0.5)
        elapsed = time.monotonic() - started
    assert 0.45 < elapsed < 1.0
    assert caught.value.request_sent is None  # it was sent: the take may have claimed an action


def test_trickling_headers_cannot_stretch_the_deadline():
    def step(channel, request):
        channel.trickle(b"HTTP/1.1 200 OK\r\nX-Slow: " + b"x" * 20, 0.1)

    with RawServer(step) as server:
        started = time.monotonic()
        with pytest.raises(FlyteTimeout):
            take(server, timeout=0.4)
    assert time.monotonic() - started < 0.9


# --- response size cap -------------------------------------------------------------------------------------------

def flood(content_length=None, chunk=b"0" * (1 << 20), limit=40):
    """A step sending up to *limit* MiB of body (less if the client hangs up)."""
    def step(channel, request):
        if content_length is None:
            channel.send(head(200, "Transfer-Encoding: chunked"))
            piece = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        else:
            channel.send(head(200, f"Content-Length: {content_length}"))
            piece = chunk
        try:
            for _ in range(limit):
                channel.send(piece)
        except OSError:
            pass
        return CLOSE
    return step


@pytest.mark.parametrize("content_length", [300 * 1024 * 1024, None], ids=["300 MB Content-Length", "chunked"])
def test_a_response_beyond_the_size_cap_fails_clearly_without_reading_it_all(content_length):
    with RawServer(flood(content_length)) as server:
        with pytest.raises(FlyteProtocolError, match="the response exceeds the 16777216-byte limit") as caught:
            take(server, timeout=5.0)
    assert caught.value.status == 200


def test_the_size_cap_is_a_client_setting():
    body = action_body()
    with RawServer(head(200, f"Content-Length: {len(body)}") + body) as server:
        with pytest.raises(FlyteProtocolError, match="exceeds the 100-byte limit"):
            take(server, max_response_size=100)
    with pytest.raises(ConfigError, match="max_response_size"):
        Client("http://flyte", max_response_size=0)


# --- keep-alive with many descriptors open -----------------------------------------------------------------------

# Run in a child process: in this one, objects earlier tests dropped can be
# freed at any moment and hand their low descriptor numbers to new sockets.
_MANY_DESCRIPTORS = """
from gevent import monkey; monkey.patch_all()
import os, sys
sys.path.insert(0, sys.argv[1])
from rawserver import RawServer, reply
from flyte_gevent import Client
fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
assert fds[-1] > 1024, fds[-1]
with RawServer(*[reply(204)] * 20) as server:
    client = Client(server.url, timeout=2.0)
    for _ in range(20):
        assert client.take(server.url + "/take") is None
print(len(server.requests), server.connections)
"""


def test_keep_alive_works_with_more_than_1024_descriptors_open(python, subprocess_env):
    child = subprocess.run([python, "-c", _MANY_DESCRIPTORS, os.path.dirname(__file__)], env=subprocess_env,
                           capture_output=True, text=True, timeout=30)
    assert child.returncode == 0, child.stderr
    requests, connections = map(int, child.stdout.split())
    assert (requests, connections) == (20, 1)


# --- body framing and connection reuse ---------------------------------------------------------------------------

def test_a_chunked_body_is_read_and_the_connection_reused():
    body = action_body()
    chunked = head(200, "Transfer-Encoding: chunked") + b"".join(
        b"%x\r\n%s\r\n" % (len(piece), piece) for piece in (body[:7], body[7:])) + b"0\r\n\r\n"
    with RawServer(chunked, reply(204)) as server:
        client = Client(server.url, timeout=2.0)
        assert take(server, client).id == AID
        assert take(server, client) is None
    assert server.connections == 1


@pytest.mark.parametrize("status_line, extra", [("HTTP/1.1 200 OK", ["Connection: close"]), ("HTTP/1.0 200 OK", [])],
                         ids=["HTTP/1.1 with Connection: close", "HTTP/1.0"])
def test_a_body_delimited_by_the_connection_closing(status_line, extra):
    body = action_body()

    def step(channel, request):
        channel.send(("\r\n".join([status_line, *extra]) + "\r\n\r\n").encode() + body)
        return CLOSE

    with RawServer(step, reply(204)) as server:
        client = Client(server.url, timeout=2.0)
        assert take(server, client).id == AID
        assert take(server, client) is None
    assert [r.connection for r in server.requests] == [0, 1]


def test_connection_close_is_honoured():
    with RawServer(reply(204, close=True), reply(204)) as server:
        client = Client(server.url, timeout=2.0)
        assert take(server, client) is None
        assert take(server, client) is None
    assert [r.connection for r in server.requests] == [0, 1]


def test_a_connection_with_bytes_after_the_response_is_not_reused():
    with RawServer(head(204) + b"HTTP/1.1 200 OK\r\nstray", reply(204)) as server:
        client = Client(server.url, timeout=2.0)
        assert take(server, client) is None
        assert take(server, client) is None
    assert [r.connection for r in server.requests] == [0, 1]


@pytest.mark.parametrize("answer, text", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{\"command\"", "closed in the middle of the response"),
    (b"SMTP ready\r\n\r\n", "malformed response"),
    (b"", "closed before a response"),
], ids=["truncated", "not HTTP", "nothing"])
def test_a_broken_response_is_a_connection_error_that_may_have_been_processed(answer, text):
    def step(channel, request):
        channel.send(answer)
        return CLOSE

    with RawServer(step) as server:
        with pytest.raises(FlyteConnectionError, match=text) as caught:
            take(server)
    assert caught.value.request_sent is None


# --- stale pooled connections and when a request is sent again ---------------------------------------------------

@pytest.mark.parametrize("ending", [CLOSE, RESET])
def test_a_pooled_connection_the_server_closed_is_seen_before_sending(ending):
    def answer_then_end(channel, request):
        channel.send(head(202, "Content-Length: 0"))  # keep-alive by the headers...
        return ending  # ...but the server hangs up right after

    with RawServer(answer_then_end, reply(202)) as server:
        client = Client(server.url, timeout=2.0)
        result(server, client)
        gevent.sleep(0.05)  # the FIN or RST arrives while the connection is idle in the pool
        result(server, client)
    assert [r.connection for r in server.requests] == [0, 1]  # each result arrived exactly once


# A real thread and the standard library's blocking sockets, which go on while the test's hub is blocked.
_real_socket = monkey.get_original("socket", "socket")
_start_thread, _real_lock, _real_sleep = monkey.get_original("_thread", "start_new_thread"), \
    monkey.get_original("_thread", "allocate_lock"), monkey.get_original("time", "sleep")


def _thread_server(*answers):
    """A loopback server in a real thread: answers one request per accepted connection with *answers*, in order,
    then closes that connection; returns ``(url, closed)``, *closed* a lock released when the first one closed."""
    listener = _real_socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(5)
    closed = _real_lock()
    closed.acquire()

    def serve():
        with listener:
            for number, answer in enumerate(answers):
                try:
                    sock, _ = listener.accept()
                except OSError:
                    return
                with sock:
                    sock.settimeout(5)
                    head = b""
                    while b"\r\n\r\n" not in head:
                        data = sock.recv(65536)
                        if not data:
                            break
                        head += data
                    sock.sendall(answer)
                if number == 0:
                    closed.release()

    _start_thread(serve, ())
    return f"http://127.0.0.1:{listener.getsockname()[1]}", closed


def test_a_close_arriving_while_the_hub_is_busy_is_seen_before_sending():
    # The FIN arrives while this greenlet computes (the event loop does not run): the idle
    # connection must still not carry the next request, which would then fail unanswered.
    url, closed = _thread_server(head(202, "Content-Length: 0"), head(201, "Content-Length: 0"))
    pool = HTTPPool(timeout=2.0)
    assert pool.request("POST", f"{url}/a", b"null").status == 202
    assert closed.acquire(timeout=2)
    _real_sleep(0.05)  # blocks the hub: the loop does not poll while the FIN arrives
    assert pool.request("POST", f"{url}/b", b"null").status == 201
    pool.close()


def test_a_pool_used_from_another_thread_makes_connections_of_that_thread():
    # A connection waits on the event loop of the thread that made it; another thread gets its own.
    with RawServer(*[reply(204)] * 4) as server:
        pool = HTTPPool(timeout=2.0)
        url = f"{server.url}/take"
        assert pool.request("POST", url, b"null").status == 204
        outcome = []
        done = _real_lock()
        done.acquire()

        def other_thread():
            try:
                outcome.append(pool.request("POST", url, b"null").status)
            except Exception as exc:  # noqa: BLE001  # the test reports it
                outcome.append(repr(exc))
            finally:
                done.release()

        _start_thread(other_thread, ())
        # The server runs in this hub: let it serve while the other thread waits for its answer.
        deadline = time.monotonic() + 2
        while not done.acquire(blocking=False):
            assert time.monotonic() < deadline, "the other thread did not finish"
            gevent.sleep(0.01)
        assert outcome == [204]
        assert pool.request("POST", url, b"null").status == 204
        pool.close()
    assert [r.connection for r in server.requests] == [0, 1, 0]


def _stop(stop, request, waiting):
    """Run *request* and stop it once *waiting()*: ``kill`` it, or let a ``caller_timeout`` of the caller's own end it.

    The caller's timeout is a fixed 1 s, long enough for the server to have accepted the connection on a loaded
    machine: the tests first warm up what connecting needs (the resolver's thread) and build large bodies before.
    """
    if stop == "kill":
        greenlet = gevent.spawn(request)
        wait_until(waiting, timeout=2)
        gevent.sleep(0.05)
        assert not greenlet.dead
        greenlet.kill(timeout=1)
        assert greenlet.dead
    else:
        with pytest.raises(gevent.Timeout):
            with gevent.Timeout(1.0):
                request()
        assert waiting()


@pytest.mark.parametrize("stop", ["kill", "caller_timeout"])
def test_a_request_stopped_waiting_for_its_answer_closes_its_connection(stop):
    # Its connection is closed at once, never reused: the next request goes on a new one.
    ended = []

    def never_answer(channel, request):
        ended.append(channel.sock.recv(1) == b"")  # returns when the client closes the connection
        return CLOSE

    with RawServer(reply(204), never_answer, reply(201)) as server:
        pool = HTTPPool(timeout=5.0)
        assert pool.request("POST", f"{server.url}/a", b"null").status == 204
        _stop(stop, lambda: pool.request("POST", f"{server.url}/b", b"null"), lambda: len(server.requests) == 2)
        wait_until(lambda: ended == [True])  # the client closed the connection
        assert pool.request("POST", f"{server.url}/c", b"null").status == 201
        pool.close()
    assert [(r.target, r.connection) for r in server.requests] == [("/a", 0), ("/b", 0), ("/c", 1)]


def _reading_to_the_end(stopped, accepted, ended):
    """A server's handler that reads nothing until *stopped* is set, then all the client sent; *accepted* gets
    each connection, *ended* whether the client closed it (end of stream within two seconds)."""
    def handle(sock, address):
        accepted.append(address)
        stopped.wait(2)
        sock.settimeout(2)
        try:
            while sock.recv(1 << 20):
                pass
            ended.append(True)
        except OSError:
            ended.append(False)
    return handle


@pytest.mark.parametrize("stop", ["kill", "caller_timeout"])
def test_a_request_stopped_while_writing_closes_its_connection(stop):
    # The server reads nothing, so a request larger than the socket buffers waits to be written.
    stopped, accepted, ended = gevent.event.Event(), [], []
    server = StreamServer(("127.0.0.1", 0), _reading_to_the_end(stopped, accepted, ended))
    server.start()
    try:
        pool = HTTPPool(timeout=5.0)
        socket.getaddrinfo("127.0.0.1", server.server_port)  # the resolver's thread is started
        big = b"x" * (64 << 20)
        _stop(stop, lambda: pool.request("POST", f"http://127.0.0.1:{server.server_port}/big", big),
              lambda: len(accepted) == 1)
        stopped.set()
        wait_until(lambda: ended, timeout=3)
        assert ended == [True]  # closed by the client, not left open half-written
        pool.close()
    finally:
        server.stop(timeout=0)


def test_a_failed_write_on_a_pooled_connection_is_sent_again_on_a_new_one():
    # The server resets the pooled connection while the request is being
    # written: it never had the whole request, so sending it again is safe.
    big = b'{"event":"E","payload":"' + b"x" * (16 << 20) + b'"}'
    with RawServer(reply(202), RESET_BEFORE_BODY, reply(202)) as server:
        client = Client(server.url, timeout=5.0)
        client.post_event(f"{server.url}/v1/packs/P/events", b'{"event":"E","payload":null}')
        client.post_event(f"{server.url}/v1/packs/P/events", big)
    assert [(r.connection, len(r.body)) for r in server.requests] == [(0, 28), (1, len(big))]
    assert [r.connection for r in server.partial] == [0]


def test_a_failed_write_on_a_new_connection_is_known_not_to_have_been_sent():
    big = b'{"event":"E","payload":"' + b"x" * (16 << 20) + b'"}'
    with RawServer(RESET_BEFORE_BODY) as server:
        with pytest.raises(FlyteConnectionError, match="writing the request failed") as caught:
            Client(server.url, timeout=5.0).post_event(f"{server.url}/v1/packs/P/events", big)
    assert caught.value.request_sent is False
    assert server.requests == []


def test_a_connection_closed_after_the_request_was_written_is_not_sent_again():
    # The request reached the server; whether it was processed is unknown, and a
    # result must not be applied twice, so the client reports and does not resend.
    def swallow(channel, request):
        return CLOSE

    with RawServer(reply(202), swallow, reply(202)) as server:
        client = Client(server.url, timeout=2.0)
        result(server, client)
        with pytest.raises(FlyteConnectionError, match="closed before a response") as caught:
            result(server, client)
    assert caught.value.request_sent is None
    assert len(server.requests) == 2
    assert len(server.steps) == 1  # the spare answer was never asked for


def test_a_408_on_a_pooled_connection_is_sent_again_on_a_new_one():
    # 408 says the server did not receive a complete request: nothing was processed.
    with RawServer(reply(202), reply(408, close=True), reply(202)) as server:
        client = Client(server.url, timeout=2.0)
        result(server, client)
        result(server, client)
    assert [r.connection for r in server.requests] == [0, 0, 1]


def test_a_408_on_a_new_connection_is_an_answer():
    with RawServer(reply(408, close=True)) as server:
        with pytest.raises(FlyteHTTPError) as caught:
            result(server, Client(server.url, timeout=2.0))
    assert caught.value.status == 408
    assert len(server.requests) == 1


def test_a_refused_connection_is_known_not_to_have_been_sent():
    with RawServer() as server:
        url = server.url
    with pytest.raises(FlyteConnectionError, match="cannot connect") as caught:
        Client(url, timeout=1.0).take(f"{url}/take")
    assert caught.value.request_sent is False


def test_waiting_too_long_for_a_free_connection_fails_without_sending():
    def slow(channel, request):
        gevent.sleep(0.6)
        channel.send(head(204))

    with RawServer(slow, reply(204)) as server:
        pool = HTTPPool(timeout=1.0, max_connections=1)
        holder = gevent.spawn(pool.request, "POST", f"{server.url}/a", b"null")
        gevent.sleep(0.1)
        pool.timeout = 0.2  # the waiting request gives up long before the holder is answered
        started = time.monotonic()
        with pytest.raises(RequestNotSent, match=r"no free connection within 0.2 s \(1 in use\)") as caught:
            pool.request("POST", f"{server.url}/b", b"null")
        assert 0.15 < time.monotonic() - started < 0.5
        assert caught.value.timed_out
        assert holder.get(timeout=2).status == 204
    assert [r.target for r in server.requests] == ["/a"]


# --- redirects, addresses and URLs --------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_are_returned_not_followed(status):
    with RawServer() as server:
        server.add(reply(status, headers=[("Location", f"{server.url}/elsewhere")]), reply(202))
        with pytest.raises(FlyteHTTPError) as caught:
            result(server, Client(server.url, timeout=2.0))
    assert caught.value.status == status
    assert [r.target for r in server.requests] == [f"/v1/packs/P/actions/{AID}/result"]


def test_an_ipv6_literal_api_url_works():
    body = action_body("http://[::1]")
    with RawServer(head(200, f"Content-Length: {len(body)}") + body, host="::1") as server:
        assert server.url.startswith("http://[::1]:")
        assert take(server).result_url == f"http://[::1]/v1/packs/P/actions/{AID}/result"
    assert server.requests[0].headers["host"] == f"[::1]:{server.port}"


def test_the_request_line_and_headers_of_a_take():
    with RawServer(reply(204)) as server:
        take(server, jwt="abc.def")
    (request,) = server.requests
    assert (request.method, request.target, request.body) == ("POST", "/v1/packs/P/actions/take", b"null")
    assert request.headers["host"] == f"127.0.0.1:{server.port}"
    assert request.headers["content-length"] == "4"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept"] == "application/json"
    assert request.headers["authorization"] == "Bearer abc.def"
    assert request.headers["user-agent"].startswith("flyte-gevent/")


def test_a_link_with_a_space_or_non_ascii_character_is_percent_encoded():
    with RawServer(reply(202)) as server:
        Client(server.url, timeout=2.0).post_event(f"{server.url}/v1/packs/My Pack.é/events", b"{}")
    assert server.requests[0].target == "/v1/packs/My%20Pack.%C3%A9/events"


@pytest.mark.parametrize("suffix", ["/flyte-api", "/flyte-api/"])
def test_an_api_url_with_a_base_path_discovers_under_it(suffix):
    document = json.dumps({"links": [{"href": "http://gw/v1/packs", "rel": "http://gw/swagger#!/pack/listPacks"}]})
    with RawServer(reply(200, document.encode())) as server:
        assert Client(server.url + suffix, timeout=2.0).discover().packs_url == "http://gw/v1/packs"
    assert server.requests[0].target == "/flyte-api/v1"


@pytest.mark.parametrize("url", ["http://gw/flyte-api/?tenant=a", "http://gw/flyte-api?tenant=a", "http://gw/?",
                                 "http://gw/flyte-api#top"])
def test_an_api_url_with_a_query_string_is_refused(url):
    with pytest.raises(ConfigError, match="a query string or fragment is not supported") as caught:
        Client(url)
    assert caught.value.name == "url"
    with pytest.raises(ConfigError, match=r"FLYTE_API=.*a query string or fragment is not supported") as caught:
        config.from_environ({"FLYTE_API": url}, names={"api"})
    assert caught.value.name == "FLYTE_API"
