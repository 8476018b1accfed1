"""Exceptions raised by flyte_gevent.

Two families:

* :class:`ConfigError` — something the pack author or operator configured is
  wrong (an environment variable, a pack definition). Raised before any network
  traffic; the message is one line that names the setting and the bad value.
* :class:`FlyteError` — talking to the Flyte API failed. Every instance carries
  the request ``method`` and ``url``, the HTTP ``status`` when there was one, and
  a short ``body`` excerpt. Tokens and URL credentials never appear in them
  (:func:`scrub` takes tokens out of text that comes from lower layers).
"""

import re
from collections.abc import Iterable
from typing import Any, overload
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "ConfigError",
    "DeliveryError",
    "FlyteAuthError",
    "FlyteConnectionError",
    "FlyteError",
    "FlyteHTTPError",
    "FlyteProtocolError",
    "FlyteTimeout",
    "NotPatchedError",
    "NotRegisteredError",
    "PackDefError",
    "PackNotFoundError",
]

_BODY_EXCERPT = 200


def describe(exc: BaseException) -> str:
    """``"ValueError: text"``, or the type's name alone for an exception without text (or whose text fails)."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - an exception whose str() fails still gets named
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ConfigError(ValueError):
    """A configuration value is missing or malformed.

    :param message: one line naming the setting and saying what is wrong.
    :param name: the setting (usually the environment variable) at fault.
    """

    def __init__(self, message: str, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


class PackDefError(ConfigError):
    """A pack definition would be refused by Flyte or would break its links."""


class NotPatchedError(RuntimeError):
    """gevent's monkey-patching was not applied before the pack started."""


@overload
def redact_url(url: str) -> str: ...
@overload
def redact_url(url: None) -> None: ...


def redact_url(url: str | None) -> str | None:
    """Return *url* without user:password credentials, for messages and logs."""
    if not url or "@" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.username is None and parts.password is None:
        return url
    # The host and port as written: parts.port would raise for a bad port, and
    # parts.hostname drops an IPv6 address's brackets.
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, "***@" + host, parts.path, parts.query, parts.fragment))


# A URL with a scheme, up to the end of its authority (where urlsplit ends it): "user:pass@host:port" and all.
_URL_AUTHORITY = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s/?#]*")


def redact_urls(text: str) -> str:
    """*text* with user:password credentials cut out of every URL in it (``http://***@db/``).

    For free text that may quote a URL: an exception's message, say, which
    becomes a FATAL payload that anyone reading the flow's audit trail sees.
    """
    if "@" not in text:
        return text
    return _URL_AUTHORITY.sub(lambda match: _without_userinfo(match.group(0)), text)


def _without_userinfo(url: str) -> str:
    scheme, _, authority = url.partition("://")
    if "@" not in authority:
        return url
    return f"{scheme}://***@{authority.rpartition('@')[2]}"


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """*text* with every non-empty string in *secrets* replaced by ``<redacted>``.

    For text that a lower layer (an HTTP library, a token provider, a server's
    error body) produced and that could hold a token: exception messages end up
    in logs and in the health endpoint's JSON.
    """
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, "<redacted>")
    return text


class FlyteError(Exception):
    """A request to the Flyte API failed.

    :ivar method: HTTP method of the failed request, or ``None``.
    :ivar url: the URL requested (credentials removed), or ``None``.
    :ivar status: the HTTP status code, or ``None`` when no response arrived.
    :ivar body: up to 200 characters of the response body ('' when empty).
    :ivar request_sent: ``False`` when the server certainly did not receive the
        request (no connection, the write failed, or the client refused to
        send it), so sending it again cannot apply it twice; ``None`` when that
        is not known.
    """

    def __init__(self, message: str, *, method: str | None = None, url: str | None = None, status: int | None = None,
                 body: str | bytes | None = None, request_sent: bool | None = None) -> None:
        self.request_sent = request_sent
        self.method = method
        self.url = redact_url(url)
        self.status = status
        if isinstance(body, bytes):
            body = body[:_BODY_EXCERPT].decode("utf-8", "replace")
        self.body = (body or "")[:_BODY_EXCERPT]
        self.reason = message
        super().__init__(self._format())

    def _format(self) -> str:
        where = f"{self.method} {self.url}: " if self.method and self.url else ""
        text = f"{where}{self.reason}"
        if self.body:
            text += f" (body: {self.body!r})"
        return text


class FlyteConnectionError(FlyteError):
    """No HTTP response: connection refused or reset, DNS or TLS failure, a malformed response.

    :ivar request_sent: ``False`` when the server certainly did not receive the
        request (no connection could be made, or writing it failed); ``None``
        when it may have been processed.
    """


class FlyteTimeout(FlyteConnectionError):
    """The Flyte API did not answer within the client's timeout."""


class FlyteHTTPError(FlyteError):
    """The Flyte API answered with a status code the request does not expect."""


class FlyteAuthError(FlyteHTTPError):
    """401: the token is missing, expired or not allowed (even after a reload)."""


class PackNotFoundError(FlyteHTTPError):
    """404 on a pack URL: the pack was deleted on the server (or never registered)."""


class FlyteProtocolError(FlyteError):
    """The Flyte API answered, but not with what the protocol promises."""


class NotRegisteredError(FlyteError):
    """An event was sent before the pack was started."""


class DeliveryError(FlyteError):
    """An event could not be delivered before its deadline.

    :ivar last_error: the error of the last attempt.
    """

    def __init__(self, message: str, last_error: BaseException | None = None, **kwargs: Any) -> None:
        self.last_error = last_error
        if last_error is not None:
            for key in ("method", "url", "status"):
                kwargs.setdefault(key, getattr(last_error, key, None))
        super().__init__(message, **kwargs)
