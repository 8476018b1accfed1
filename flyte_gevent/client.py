"""The Flyte API client: discovery, registration, take, result and event calls.

Each method makes one attempt and either returns or raises a
:class:`~flyte_gevent.errors.FlyteError` subclass that says which request failed
and how; retry policy belongs to the pack runtime. The only retry here is the
one a 401 earns: reload the token (once, however many requests saw the 401)
and resend.

Discovery and registration use ``requests`` (one ``Session``); the calls made
for every action use the lean keep-alive transport in :mod:`flyte_gevent._http`
(or ``requests`` too, when a proxy is configured in the environment). Both
trust exactly the same certificate authorities (:class:`_Trust`), and both send
the bearer token only to the configured API's origin.
"""

import collections
import http.client
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast
from urllib.parse import urlsplit

import gevent
import requests
import urllib3.exceptions
from gevent.lock import Semaphore
from marshmallow import ValidationError
from requests.adapters import HTTPAdapter

from . import __version__
from ._http import DEFAULT_MAX_RESPONSE_SIZE, BadResponse, HTTPPool, RequestNotSent, ResponseTooLarge
from ._http import Headers as _ResponseHeaders  # what HTTPPool answers carry, beside a plain mapping
from .config import API_URL_QUERY_PROBLEM, check_count, check_seconds, check_token, read_token_file
from .errors import (
    ConfigError,
    FlyteAuthError,
    FlyteConnectionError,
    FlyteError,
    FlyteHTTPError,
    FlyteProtocolError,
    FlyteTimeout,
    PackNotFoundError,
    redact_url,
    scrub,
)
from .models import Action, PackDef, pack_id
from .schemas import (
    REL_EVENTS,
    REL_HEALTH,
    REL_PACKS,
    REL_RESULT,
    REL_TAKE,
    LinksDocumentSchema,
    PackResponseSchema,
    action_id_from_url,
    find_link,
    flatten_errors,
    load_action,
    registration_body,
)

__all__ = ["Client", "MalformedActionError", "Registration"]

log = logging.getLogger(__name__)

USER_AGENT = f"flyte-gevent/{__version__}"

Token = str | Callable[[], str | None]
"""A bearer token as :class:`Client` takes it: the token itself, or a callable that returns it."""


class Discovery(NamedTuple):
    """What ``GET /v1`` lists: where packs register, the health URL (if any), and every link."""

    packs_url: str
    health_url: str | None
    links: list[dict[str, str]]


class Registration(NamedTuple):
    """Where a registered pack takes actions and sends events."""

    pack_id: str
    take_url: str
    events_url: str
    pack_url: str | None


Headers = Mapping[str, str] | _ResponseHeaders
Answer = tuple[int, Headers, bytes]

_LINKS_DOCUMENT = LinksDocumentSchema()
_PACK_RESPONSE = PackResponseSchema()
_TAKE_BODY = b"null"  # what the Go client sends; the server ignores the body
_DEFAULT_PORTS = {"http": 80, "https": 443}


class MalformedActionError(FlyteProtocolError):
    """A take answered 200 with a body that is not a valid action.

    :ivar taken: whether the body shows that the server handed out an action
        (a JSON object with a ``command`` or a result link): that action is
        PENDING now. ``False`` for a body that is no action at all, such as a
        proxy's HTML error page answered with 200.
    :ivar action: an :class:`~flyte_gevent.models.Action` with the result URL
        when the body has a usable one (so the action can be completed as
        FATAL), otherwise ``None``.
    """

    def __init__(self, message: str, action: Action | None = None, taken: bool | None = None,
                 **kwargs: Any) -> None:
        self.action = action
        self.taken = action is not None if taken is None else bool(taken)
        super().__init__(message, **kwargs)


class _Token:
    """The bearer token: where it comes from, its current value, and one reload per rotation.

    A static token and the first read of a token file are checked when the
    client is built (:class:`~flyte_gevent.ConfigError`); a provider's answers
    and later reads of the file are checked as they come, and an unusable one
    is logged (without its value) while the previous token stays in use.

    After a rotation, every request in flight comes back 401 at about the same
    time. Each request remembers the *generation* of the token it was sent
    with; only the first 401 of a generation reloads (the others wait for that
    reload, then resend with its token), and a 401 for a token older than the
    current one simply resends.
    """

    _REMEMBERED = 4  # past values kept for scrubbing: requests still in flight may have carried them

    def __init__(self, jwt: Token | None = None, jwt_file: str | None = None) -> None:
        self._provider = jwt if callable(jwt) else None
        self._file = jwt_file
        self._header: str | None = None  # the Authorization header's value
        self._secrets: collections.deque[str] = collections.deque(maxlen=self._REMEMBERED)
        self._lock = Semaphore()
        self.generation = 0
        self.reloadable = bool(self._provider or self._file)
        self.configured = bool(self.reloadable or jwt is not None)
        if self._provider is None and jwt is not None:
            try:
                self._set(check_token(jwt))
            except ValueError as exc:
                raise ConfigError(f"jwt=<redacted>: {exc}", "jwt") from None
        if self._file is not None and self._provider is None:
            try:
                self._set(read_token_file(self._file))
            except ValueError as exc:
                raise ConfigError(f"jwt_file={self._file!r}: {exc}", "jwt_file") from None
        elif self._provider is not None:
            self._reload()

    def current(self) -> tuple[int, str | None]:
        """``(generation, header value or None)`` to send a request with."""
        return self.generation, self._header

    def refresh(self, generation: int) -> str | None:
        """After a 401 for a request sent with *generation*: the header value to resend it with.

        Reloads only if no other request has done so since that request was
        sent; requests arriving meanwhile wait for the reload in progress.
        """
        with self._lock:
            if self.generation == generation:
                self._reload()
                self.generation += 1
            return self.current()[1]

    def scrub(self, text: str) -> str:
        """*text* without any value this token has held."""
        return scrub(text, self._secrets)

    def _set(self, value: str | None) -> None:
        # Built once per token, not per request: the same string each time is hashed once (the transport's
        # header cache is keyed by it) and compared by identity.
        self._header = f"Bearer {value}" if value else None
        if value and value not in self._secrets:
            self._secrets.append(value)

    def _reload(self) -> None:
        """Fetch the token again; failures are logged (never with a token) and keep the old one."""
        source = "token provider" if self._provider else f"token file {self._file!r}"
        try:
            value = check_token(self._provider()) if self._provider else read_token_file(self._file or "")
        except ValueError as exc:
            log.error("could not reload the Flyte API token: the %s: %s; keeping the previous token", source,
                      self.scrub(str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - a broken provider must not take the pack down
            log.error("could not reload the Flyte API token: %s: %s", type(exc).__name__, self.scrub(str(exc)))
            return
        self._set(value)


class _Trust:
    """The one TLS trust decision, shared by both transports.

    The certificate authorities are those of ``ca_file`` alone when it is set,
    otherwise the system's store (OpenSSL's default locations, which honour
    ``SSL_CERT_FILE`` and ``SSL_CERT_DIR``) — the store the Go client uses too.
    ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE`` and certifi play no part: if
    registration trusted other CAs than take and result, a pack could register
    and then fail every take.

    The context is built when first needed (loading the system store takes tens
    of milliseconds), except with a ``ca_file``, which is loaded at once so that
    a bad bundle is a :class:`~flyte_gevent.ConfigError` when the client is built.
    """

    def __init__(self, ca_file: str | None = None, insecure: bool = False) -> None:
        self.ca_file = ca_file
        self.insecure = insecure
        self._context: ssl.SSLContext | None = None
        if ca_file is not None:
            self.context()

    def context(self) -> ssl.SSLContext:
        """The :class:`ssl.SSLContext` for every ``https`` connection of the client."""
        if self._context is None:
            try:
                context = ssl.create_default_context(cafile=self.ca_file)
            except OSError as exc:  # a missing or unreadable bundle (ssl.SSLError is an OSError too)
                raise ConfigError(f"ca_file={self.ca_file!r}: cannot load CA certificates: {exc}", "ca_file") \
                    from None
            if self.insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._context = context
        return self._context


class _TrustAdapter(HTTPAdapter):
    """requests' adapter, verifying with the client's one context instead of certifi or ``verify=``.

    Uses the two hooks requests documents for a custom context: the pool key
    carries the context (for direct and proxied connections alike), and
    :meth:`cert_verify` keeps urllib3 from loading another bundle into it.
    """

    def __init__(self, trust: _Trust, **kwargs: Any) -> None:
        self._trust = trust
        super().__init__(**kwargs)

    def build_connection_pool_key_attributes(
            self, request: requests.PreparedRequest, verify: object,
            cert: str | tuple[str, str] | None = None) -> tuple[Any, Any]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, True, cert)
        if host_params["scheme"] == "https":
            context = self._trust.context()
            pool_kwargs.pop("ca_certs", None)
            pool_kwargs.pop("ca_cert_dir", None)
            pool_kwargs["ssl_context"] = context
            pool_kwargs["cert_reqs"] = context.verify_mode  # type: ignore[typeddict-item]  # urllib3 takes either
        return host_params, pool_kwargs

    def cert_verify(self, conn: Any, url: str, verify: object, cert: object) -> None:
        if url.lower().startswith("https"):
            conn.cert_reqs = self._trust.context().verify_mode
        conn.ca_certs = None
        conn.ca_cert_dir = None


class Client:
    """A connection to one Flyte API.

    :param url: the Flyte API root, e.g. ``http://flyte:8080`` or
        ``http://gateway/flyte-api`` (``/v1`` is appended); no query string.
    :param timeout: seconds each request may take, from connecting to the last
        byte of the response (and, separately, the longest wait for a free connection).
    :param insecure: skip TLS certificate verification (off by default).
    :param jwt: a bearer token, or a callable returning one; the callable is
        called again (once per rotation) when the API answers 401.
    :param jwt_file: a file holding the token, re-read (once per rotation) when the API answers 401.
    :param ca_file: a PEM bundle: the only CAs trusted for the API's
        certificate. Without it, the system's store is used.
    :param pool_size: keep-alive connections kept open; a :class:`~flyte_gevent.Pack`
        raises it to match its concurrency.
    :param max_connections: most connections open to the API at once; further
        requests wait (up to *timeout*) for one to be free.
    :param max_response_size: the most bytes a response may have (16 MiB); a
        larger one fails its request with :class:`~flyte_gevent.FlyteProtocolError`.

    The token is sent only to the API's own origin (the scheme, host and port
    of *url*): a request to a link elsewhere is refused before it is sent.

    :raises ConfigError: a bad URL, timeout, token, token file or CA bundle.

    Usage::

        client = Client("http://flyte:8080", timeout=10.0)
        pack = Pack(pack_def, client)
    """

    def __init__(self, url: str, timeout: float = 10.0, insecure: bool = False, jwt: Token | None = None, *,
                 jwt_file: str | None = None, ca_file: str | None = None, pool_size: int = 10,
                 max_connections: int = 100, max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE) -> None:
        self.url = _check_url(url)
        self.timeout = check_seconds("timeout", timeout)
        check_count("max_connections", max_connections)
        self.max_response_size = check_count("max_response_size", max_response_size)
        self.insecure = bool(insecure)
        self.ca_file = ca_file
        self._trust = _Trust(ca_file, self.insecure)
        self._token = _Token(jwt, jwt_file)
        self._origin = cast("tuple[str, str, int | None]", _origin(self.url))  # the URL was checked
        self._origin_prefix = f"{self._origin[0]}://{urlsplit(self.url).netloc.rpartition('@')[2]}/"
        self._health_url: str | None = None
        self._pool_size = pool_size
        self._round_trip = 0.0

        self._session = requests.Session()
        self._session.headers["User-Agent"] = USER_AGENT
        self._mount_adapters(pool_size)

        # Proxies configured in the environment apply to requests; the lean
        # transport does not speak to proxies, so it steps aside.
        self._lean: HTTPPool | None = None
        if not requests.utils.get_environ_proxies(self.url):
            self._lean = HTTPPool(self.timeout, self._trust.context, maxsize=pool_size,
                                  max_connections=max_connections, max_response_size=self.max_response_size)
        if self.insecure:
            log.warning("TLS certificate verification is disabled for %s", redact_url(self.url))

    def __repr__(self) -> str:
        return f"Client({redact_url(self.url)!r}, timeout={self.timeout})"

    @property
    def round_trip(self) -> float:
        """Seconds the quickest recent requests to the API took, ``0.0`` before the first answer.

        An estimate of the network's round trip: the floor of request times
        follows a quicker answer at once and slower ones only slowly, so the
        requests the server answers without work (result posts, empty takes)
        set it. The taking strategy compares it with a take's latency.
        """
        return self._round_trip

    def size_pools(self, concurrency: int) -> None:
        """Keep at least *concurrency* + 2 connections, so no request waits for a socket or churns one."""
        size = max(concurrency + 2, 10)
        if size <= self._pool_size:
            return
        self._pool_size = size
        self._mount_adapters(size)
        if self._lean is not None:
            self._lean.maxsize = size

    def close(self) -> None:
        """Close all keep-alive connections."""
        self._session.close()
        if self._lean is not None:
            self._lean.close()

    # -- the protocol -----------------------------------------------------

    def discover(self) -> Discovery:
        """``GET /v1`` and pick out the packs and health links (fetched fresh on every call)."""
        url = self.url.rstrip("/") + "/v1"
        status, _, body = self._send("GET", url, via_requests=True)
        if status != 200:
            raise _http_error("GET", url, status, body, "discovery expected 200", pack_url=False)
        document = self._load(_LINKS_DOCUMENT, body, "GET", url, "link document")
        packs_url = find_link(document["links"], REL_PACKS)
        if packs_url is None:
            raise FlyteProtocolError(f"no link with rel .../{REL_PACKS} in the /v1 document",
                                     method="GET", url=url, body=body)
        self._health_url = find_link(document["links"], REL_HEALTH)
        return Discovery(packs_url, self._health_url, document["links"])

    def register(self, pack_def: PackDef) -> Registration:
        """Register *pack_def* (an idempotent upsert) and return where to take actions and send events.

        Links come from the 201 body; a server whose body has none (servers
        before 2018) is asked again at the ``Location`` it gave.

        :raises FlyteProtocolError: also when, with a token, the links point
            outside the API's origin (the token would not be sent there).
        """
        packs_url = self.discover().packs_url
        data = json.dumps(registration_body(pack_def), separators=(",", ":")).encode()
        status, headers, body = self._send("POST", packs_url, data, via_requests=True)
        if status != 201:
            reason = ("the Flyte API refused the pack definition (400)" if status == 400
                      else "registration expected 201")
            raise _http_error("POST", packs_url, status, body, reason, pack_url=False)
        pack: dict[str, Any] = (self._load(_PACK_RESPONSE, body, "POST", packs_url, "registration response")
                                if body else {})
        links = pack.get("links") or []
        take_url, events_url = find_link(links, REL_TAKE), find_link(links, REL_EVENTS)
        location = headers.get("Location")
        if (take_url is None or events_url is None) and location:
            status, _, body = self._send("GET", location, via_requests=True)
            if status != 200:
                raise _http_error("GET", location, status, body, "reading the registered pack expected 200")
            pack = self._load(_PACK_RESPONSE, body, "GET", location, "pack document")
            links = pack.get("links") or []
            take_url, events_url = find_link(links, REL_TAKE), find_link(links, REL_EVENTS)
        if take_url is None or events_url is None:
            raise FlyteProtocolError("registration response has no take and events links",
                                     method="POST", url=packs_url, body=body)
        # Refuse now, with one clear error, rather than on every take and event.
        self._check_origin("POST", take_url)
        self._check_origin("POST", events_url)
        return Registration(pack.get("id") or pack_id(pack_def.name, pack_def.labels), take_url, events_url,
                            location or find_link(links, "self"))

    def take(self, take_url: str) -> Action | None:
        """Take the next action: an :class:`~flyte_gevent.models.Action`, or ``None`` when there is none (204).

        :raises PackNotFoundError: 404, the pack is not registered (deleted).
        :raises MalformedActionError: 200 with a body that is not a valid action
            (its ``taken`` says whether the body shows one was handed out).
        """
        status, _, body = self._send("POST", take_url, _TAKE_BODY)
        if status == 204:
            return None
        if status != 200:
            raise _http_error("POST", take_url, status, body, "take expected 200 or 204")
        try:
            return load_action(json.loads(body))
        except (ValueError, ValidationError) as exc:
            raise _malformed_action(exc, body, take_url) from None

    def post_result(self, result_url: str, body: bytes) -> None:
        """Post an encoded result (see :func:`~flyte_gevent.schemas.encode_event`); 202 or an error."""
        self._post_expect_202(result_url, body)

    def post_event(self, events_url: str, body: bytes) -> None:
        """Post an encoded spontaneous event; 202 or an error."""
        self._post_expect_202(events_url, body)

    def check_health(self) -> tuple[bool, str]:
        """Ask the Flyte API's health URL: ``(True, message)`` on 200, ``(False, message)`` otherwise."""
        try:
            url = self._health_url or self.discover().health_url
            if url is None:
                return False, "the Flyte API lists no health link"
            status, _, _ = self._send("GET", url, via_requests=True)
        except FlyteError as exc:
            self._health_url = None
            return False, str(exc)
        if status == 200:
            return True, f"Flyte API at {redact_url(url)} is healthy"
        self._health_url = None
        return False, f"Flyte API health check {redact_url(url)} answered {status}"

    # -- plumbing ---------------------------------------------------------

    def _post_expect_202(self, url: str, body: bytes) -> None:
        # The server answers 202; a proxy or a later server may answer 200 or 204, which is as final.
        status, _, response_body = self._send("POST", url, body)
        if not 200 <= status < 300:
            raise _http_error("POST", url, status, response_body, "expected 202")

    def _send(self, method: str, url: str, body: bytes | None = None, via_requests: bool = False) -> Answer:
        token = self._token
        if not token.configured:
            return self._send_once(method, url, body, via_requests, None)
        self._check_origin(method, url)
        generation, authorization = token.current()
        status, headers, data = self._send_once(method, url, body, via_requests, authorization)
        if status == 401 and token.reloadable:
            status, headers, data = self._send_once(method, url, body, via_requests, token.refresh(generation))
        if status >= 300 and data:
            # An error body ends up in exception text; a server echoing the request must not leak the token.
            data = token.scrub(data.decode("latin-1")).encode("latin-1")
        return status, headers, data

    def _send_once(self, method: str, url: str, body: bytes | None, via_requests: bool,
                   authorization: str | None) -> Answer:
        started = time.monotonic()
        try:
            if via_requests or self._lean is None:
                answer = self._send_with_requests(method, url, body, authorization)
            else:
                headers = {"Accept": "application/json", "Content-Type": "application/json",
                           "User-Agent": USER_AGENT}
                if authorization:
                    headers["Authorization"] = authorization
                response = self._lean.request(method, url, body, headers)
                answer = response.status, response.headers, response.body
            seconds = time.monotonic() - started
            floor = self._round_trip
            # A new low at once; above the floor, 2 % of the way up per answer (see round_trip).
            self._round_trip = seconds if seconds < floor or not floor else floor + 0.02 * (seconds - floor)
            return answer
        except RequestNotSent as exc:
            error = FlyteTimeout if exc.timed_out else FlyteConnectionError
            raise error(self._token.scrub(str(exc)), method=method, url=url, request_sent=False) from None
        except ResponseTooLarge as exc:
            raise FlyteProtocolError(str(exc), method=method, url=url, status=exc.status) from None
        except _Deadline:
            raise FlyteTimeout(f"no answer within {self.timeout:g} s", method=method, url=url) from None
        except requests.ConnectTimeout as exc:
            raise FlyteTimeout(f"cannot connect within {self.timeout:g} s ({self._cause(exc)})", method=method,
                               url=url, request_sent=False) from None
        except (requests.Timeout, TimeoutError) as exc:
            raise FlyteTimeout(f"no answer within {self.timeout:g} s ({self._cause(exc)})", method=method,
                               url=url) from None
        except (requests.RequestException, OSError, BadResponse, http.client.HTTPException, ValueError) as exc:
            raise FlyteConnectionError(self._cause(exc), method=method, url=url,
                                       request_sent=False if _not_connected(exc) else None) from None

    def _send_with_requests(self, method: str, url: str, body: bytes | None, authorization: str | None) -> Answer:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if authorization:
            headers["Authorization"] = authorization
        # requests' timeout bounds each socket operation; the deadline bounds
        # the whole request, as on the lean transport. A gevent.Timeout is a
        # BaseException, so urllib3 closes the connection instead of pooling it.
        deadline = gevent.Timeout(self.timeout)
        deadline.start()
        try:
            response = self._session.request(method, url, data=body, headers=headers, timeout=self.timeout,
                                             allow_redirects=False, stream=True)
            with response:
                size, chunks = 0, list[bytes]()
                for chunk in response.iter_content(65536):
                    size += len(chunk)
                    if size > self.max_response_size:
                        raise ResponseTooLarge(f"the response exceeds the {self.max_response_size}-byte limit",
                                               response.status_code)
                    chunks.append(chunk)
            return response.status_code, response.headers, b"".join(chunks)
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            raise _Deadline() from None
        finally:
            deadline.close()

    def _check_origin(self, method: str, url: str) -> None:
        """Refuse to send the token anywhere but the API's origin (scheme, host and port of its URL)."""
        if not self._token.configured or url.startswith(self._origin_prefix) or _origin(url) == self._origin:
            return
        api = f"{self._origin[0]}://{urlsplit(self.url).netloc.rpartition('@')[2]}"
        hint = (" (a TLS-terminating proxy in front of it must set X-Forwarded-Proto: https)"
                if self._origin[0] == "https" and url.lower().startswith("http:") else "")
        raise FlyteProtocolError(f"the link leads outside the Flyte API's origin {api}, and the bearer token is "
                                 f"only sent there, so the request was not made{hint}",
                                 method=method, url=url, request_sent=False)

    def _cause(self, exc: BaseException) -> str:
        return self._token.scrub(_cause(exc))

    def _load(self, schema: Any, body: bytes, method: str, url: str, what: str) -> Any:
        try:
            return schema.load(json.loads(body))
        except ValueError as exc:
            raise FlyteProtocolError(f"{what} is not JSON ({exc})", method=method, url=url,
                                     body=self._token.scrub(body.decode("latin-1"))) from None
        except ValidationError as exc:
            raise FlyteProtocolError(f"malformed {what}: " + "; ".join(flatten_errors(exc.messages)),
                                     method=method, url=url, body=self._token.scrub(body.decode("latin-1"))) \
                from None

    def _mount_adapters(self, size: int) -> None:
        adapter = _TrustAdapter(self._trust, pool_connections=2, pool_maxsize=size)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)


class _Deadline(Exception):
    """The whole-request deadline of a request made with requests passed (raised by a gevent.Timeout)."""


def _origin(url: str) -> tuple[str, str, int | None] | None:
    """``(scheme, host, port)`` of *url*, with the default port filled in; ``None`` if it has none."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        return None


def _check_url(url: str) -> str:
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is not None:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"Flyte API URL {redact_url(str(url))!r} is not an http(s) URL with a host", "url")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ConfigError(f"Flyte API URL {redact_url(url)!r}: {API_URL_QUERY_PROBLEM}", "url")
    return url


def _cause(exc: BaseException) -> str:
    # requests nests the useful text a few exceptions deep; keep it short.
    text = str(exc) or type(exc).__name__
    if isinstance(exc, requests.RequestException) and exc.args and isinstance(exc.args[0], Exception):
        inner = exc.args[0]
        text = str(getattr(inner, "reason", None) or inner)
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


def _not_connected(exc: BaseException) -> bool:
    # requests wraps urllib3's MaxRetryError, whose reason says whether a connection was made at all.
    reason = getattr(exc.args[0], "reason", None) if isinstance(exc, requests.ConnectionError) and exc.args else None
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


def _http_error(method: str, url: str, status: int, body: bytes, expectation: str,
                pack_url: bool = True) -> FlyteHTTPError:
    """The FlyteError for an unexpected status; a 404 means "pack deleted" only on a pack's own URLs."""
    text = f"{expectation}, got {status} {http.client.responses.get(status, '')}".rstrip()
    if status == 401:
        return FlyteAuthError(f"unauthorized (401): the token is missing, expired or not allowed ({expectation})",
                              method=method, url=url, status=status, body=body)
    if status == 404 and pack_url:
        return PackNotFoundError(f"not found (404): the pack is not registered ({expectation})",
                                 method=method, url=url, status=status, body=body)
    return FlyteHTTPError(text, method=method, url=url, status=status, body=body)


def _malformed_action(exc: Exception, body: bytes, take_url: str) -> MalformedActionError:
    problems = flatten_errors(exc.messages) if isinstance(exc, ValidationError) else [f"not JSON ({exc})"]
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    result_url = _result_link(data.get("links")) if isinstance(data, dict) else None
    if result_url is None and not (isinstance(data, dict) and "command" in data):
        # Not an action at all (a proxy's error page answered with 200, say): nothing was handed out.
        return MalformedActionError("take answered 200 with a body that is not an action: " + "; ".join(problems),
                                    taken=False, method="POST", url=take_url, body=body)
    # The body is an action the server handed out, so it is PENDING on the server now; if its
    # result link is usable, the pack can still complete it as FATAL instead of stranding it.
    action = None
    if result_url is not None:
        command = data.get("command") if isinstance(data.get("command"), str) else None
        # A malformed action may lack its command: only its result URL is used, to complete it as FATAL.
        action = Action(action_id_from_url(result_url), command, data.get("input"), result_url)  # type: ignore[arg-type]
    return MalformedActionError("take answered 200 with a malformed action: " + "; ".join(problems),
                                action=action, taken=True, method="POST", url=take_url, body=body)


def _result_link(links: object) -> str | None:
    try:
        return find_link(_LINKS_DOCUMENT.load({"links": links})["links"], REL_RESULT)
    except ValidationError:
        return None
