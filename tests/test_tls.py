"""One TLS trust decision: registration (requests) and take/result/event (the lean transport) trust the same CAs.

A test CA and a server certificate it signed for 127.0.0.1 are made with the
``openssl`` command; an HTTPS loopback server (gevent's pywsgi) plays the Flyte API.
"""

import contextlib
import json
import shutil
import socket
import ssl
import subprocess

import gevent
import pytest
from gevent.pywsgi import WSGIServer
from gevent.server import StreamServer

from flyte_gevent import Client, Command, ConfigError, Event, EventDef, FlyteConnectionError, PackDef
from flyte_gevent._http import HTTPPool
from helpers import wait_until
from rawserver import CLOSE, RawServer, reply

DONE = EventDef("Done")
PACK_DEF = PackDef("Tls", commands=[Command("Run", lambda input: Event(DONE), [DONE])])
TRUST_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No proxy and no trust settings from the developer's machine."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                 "no_proxy", *TRUST_VARIABLES):
        monkeypatch.delenv(name, raising=False)


def openssl(*args, cwd):
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"openssl could not make test certificates: {done.stderr.strip()[:200]}")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Paths of: a CA (``ca``), a server certificate and key it signed for 127.0.0.1 (``cert``,
    ``key``), an unrelated CA (``other_ca``) and a self-signed server certificate (``self_signed``)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for name in ("ca", "other_ca"):
        openssl("req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
                "-subj", f"/CN=flyte-gevent test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                                  "extendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "server.ext", cwd=d)
    openssl("req", "-x509", *ec, "-keyout", "self.key", "-out", "self.pem", "-days", "2", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1", cwd=d)
    return {"ca": str(d / "ca.pem"), "other_ca": str(d / "other_ca.pem"), "cert": str(d / "server.pem"),
            "key": str(d / "server.key"), "self_signed": (str(d / "self.pem"), str(d / "self.key"))}


CLIENT_PORTS = []  # the client port of every request flyte_app answered


def flyte_app(environ, start_response):
    """Just enough of the Flyte API for discovery, registration and an empty take."""
    CLIENT_PORTS.append(environ["REMOTE_PORT"])
    base = f"https://{environ['HTTP_HOST']}"
    pack = f"{base}/v1/packs/Tls"
    routes = {
        ("GET", "/v1"): (200, {"links": [{"href": f"{base}/v1/packs", "rel": f"{base}/swagger#!/pack/listPacks"}]}),
        ("POST", "/v1/packs"): (201, {"id": "Tls", "links": [
            {"href": f"{pack}/actions/take", "rel": f"{base}/swagger#!/action/takeAction"},
            {"href": f"{pack}/events", "rel": f"{base}/swagger#/event"}]}),
        ("POST", "/v1/packs/Tls/actions/take"): (204, None),
    }
    status, document = routes.get((environ["REQUEST_METHOD"], environ["PATH_INFO"]), (404, None))
    body = json.dumps(document).encode() if document is not None else b""
    start_response(f"{status} X", [("Content-Length", str(len(body)))])
    return [body]


@contextlib.contextmanager
def https_server(cert, key):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = WSGIServer(("127.0.0.1", 0), flyte_app, log=None, error_log=None, ssl_context=context)
    server.start()
    try:
        yield f"https://127.0.0.1:{server.server_port}"
    finally:
        server.stop(timeout=1)


@pytest.fixture
def api(pki):
    with https_server(pki["cert"], pki["key"]) as url:
        yield url


def outcomes(client):
    """What registration (requests) and a take (the lean transport, or requests behind a proxy) each got."""
    results = []
    try:
        registration = client.register(PACK_DEF)
        results.append("registered")
    except FlyteConnectionError as exc:
        results.append("refused" if "CERTIFICATE_VERIFY_FAILED" in str(exc) else str(exc))
        registration = None
    take_url = registration.take_url if registration else f"{client.url}/v1/packs/Tls/actions/take"
    try:
        results.append("took" if client.take(take_url) is None else "?")
    except FlyteConnectionError as exc:
        results.append("refused" if "CERTIFICATE_VERIFY_FAILED" in str(exc) else str(exc))
    return results


def test_the_ca_file_is_the_only_trust_anchor_of_both_transports(api, pki, monkeypatch):
    # Whatever the environment says, a ca_file is trusted alone.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki["other_ca"])
    monkeypatch.setenv("SSL_CERT_FILE", pki["other_ca"])
    assert outcomes(Client(api, timeout=2.0, ca_file=pki["ca"])) == ["registered", "took"]
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki["ca"])
    monkeypatch.setenv("SSL_CERT_FILE", pki["ca"])
    assert outcomes(Client(api, timeout=2.0, ca_file=pki["other_ca"])) == ["refused", "refused"]


def test_without_a_ca_file_both_use_the_system_store_which_honours_ssl_cert_file(api, pki, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", pki["ca"])
    assert outcomes(Client(api, timeout=2.0)) == ["registered", "took"]


def test_requests_ca_bundle_does_not_give_registration_a_trust_of_its_own(api, pki, monkeypatch):
    # Before: registration trusted REQUESTS_CA_BUNDLE, takes did not, so a pack registered and then failed every take.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki["ca"])
    monkeypatch.setenv("CURL_CA_BUNDLE", pki["ca"])
    assert outcomes(Client(api, timeout=2.0)) == ["refused", "refused"]


def test_the_system_store_by_default_refuses_an_unknown_ca(api):
    assert outcomes(Client(api, timeout=2.0)) == ["refused", "refused"]


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_insecure_accepts_any_certificate_on_both_transports(pki):
    with https_server(*pki["self_signed"]) as url:
        assert outcomes(Client(url, timeout=2.0, insecure=True)) == ["registered", "took"]
        assert outcomes(Client(url, timeout=2.0)) == ["refused", "refused"]


def test_tls_connections_are_kept_alive(api, pki):
    # A TLS 1.3 server may send session tickets after the handshake: the idle
    # check must not mistake them for a closed connection.
    client = Client(api, timeout=2.0, ca_file=pki["ca"])
    take_url = f"{api}/v1/packs/Tls/actions/take"
    del CLIENT_PORTS[:]
    for _ in range(5):
        assert client.take(take_url) is None
        gevent.sleep(0.02)
    assert len(CLIENT_PORTS) == 5 and len(set(CLIENT_PORTS)) == 1


@contextlib.contextmanager
def connect_proxy():
    """An HTTP CONNECT proxy on loopback (what HTTPS_PROXY points at); yields the CONNECT targets it saw."""
    tunnels = []

    def pipe(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.close()

    def handle(client, address):
        head = b""
        while b"\r\n\r\n" not in head:
            data = client.recv(4096)
            if not data:
                return
            head += data
        target = head.split(b" ")[1].decode()
        tunnels.append(target)
        host, _, port = target.rpartition(":")
        upstream = socket.create_connection((host, int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        gevent.joinall([gevent.spawn(pipe, client, upstream), gevent.spawn(pipe, upstream, client)])

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", tunnels
    finally:
        server.stop(timeout=1)


def test_behind_a_proxy_every_request_trusts_the_same_cas(api, pki, monkeypatch):
    with connect_proxy() as (proxy, tunnels):
        monkeypatch.setenv("HTTPS_PROXY", proxy)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki["other_ca"])
        assert outcomes(Client(api, timeout=2.0, ca_file=pki["ca"])) == ["registered", "took"]
        assert outcomes(Client(api, timeout=2.0, ca_file=pki["other_ca"])) == ["refused", "refused"]
    assert tunnels and set(tunnels) == {api.removeprefix("https://")}


def test_an_unreadable_ca_file_is_a_config_error(tmp_path):
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match=r"ca_file=.*missing\.pem.*cannot load CA certificates") as caught:
        Client("https://flyte.example", ca_file=missing)
    assert caught.value.name == "ca_file"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match="cannot load CA certificates"):
        Client("https://flyte.example", ca_file=str(garbage))


def _server_context(pki):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["cert"], pki["key"])
    return context


@pytest.mark.parametrize("ending", ["close_notify", "fin"])
def test_a_pooled_tls_connection_the_server_closed_is_seen_before_sending(pki, ending):
    # The server ends the idle connection, with TLS's close_notify or with a bare FIN: the next
    # request goes on a new connection and nothing fails.
    def answer_then_end(channel, request):
        channel.send(b"HTTP/1.1 202 X\r\nContent-Length: 0\r\n\r\n")  # keep-alive by the headers...
        if ending == "close_notify":
            channel.sock = channel.sock.unwrap()  # ...but the server says goodbye right after
        return CLOSE

    with RawServer(answer_then_end, reply(201), ssl_context=_server_context(pki)) as server:
        client = Client(server.url, timeout=2.0, ca_file=pki["ca"])
        client.post_event(f"{server.url}/v1/packs/P/events", b"{}")
        gevent.sleep(0.05)  # the goodbye arrives while the connection is idle in the pool
        client.post_event(f"{server.url}/v1/packs/P/events", b"{}")
    assert [r.connection for r in server.requests] == [0, 1]


def test_a_request_killed_during_the_tls_handshake_closes_its_connection(pki):
    # The server accepts but never answers the handshake; the request is killed while it waits.
    accepted, ended = [], []

    def handle(sock, address):
        accepted.append(address)
        sock.settimeout(3)
        try:
            while sock.recv(65536):  # the ClientHello, then the end of stream once the client closes
                pass
            ended.append(True)
        except OSError:
            ended.append(False)

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        pool = HTTPPool(timeout=5.0, tls_context=lambda: ssl.create_default_context(cafile=pki["ca"]))
        request = gevent.spawn(pool.request, "POST", f"https://127.0.0.1:{server.server_port}/x", b"{}")
        wait_until(lambda: accepted, timeout=2)
        gevent.sleep(0.05)
        assert not request.dead
        request.kill(timeout=1)
        assert request.dead
        wait_until(lambda: ended, timeout=3)
        assert ended == [True]  # closed, not left open
        pool.close()
    finally:
        server.stop(timeout=0)
