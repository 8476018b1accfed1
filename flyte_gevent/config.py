"""Settings read from ``FLYTE_*`` environment variables (and the CLI's flags).

Each setting is declared once, as a :class:`Setting` carrying its environment
variables, command-line flag, parser, default and help; :func:`from_environ`,
the CLI's ``--help`` and the README table are all built from :data:`SETTINGS`.
The variables the Go client reads keep their names (``FLYTE_API``,
``FLYTE_LABELS``, ``FLYTE_API_TIMEOUT``, ``FLYTE_JWT``); knobs that only this
library has are prefixed ``FLYTE_GEVENT_``.

A missing or malformed value raises :class:`~flyte_gevent.errors.ConfigError`
whose one-line message names the variable and the bad value (never the value of
a secret).
"""

import dataclasses
import logging
import os
from collections.abc import Callable, Collection, Mapping
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError, redact_url
from .models import path_problem

__all__ = [
    "MIN_POLLING_INTERVAL",
    "PACK_SETTINGS",
    "SETTINGS",
    "Setting",
    "check_count",
    "check_seconds",
    "check_token",
    "from_environ",
    "parse_labels",
    "read_token_file",
]

log = logging.getLogger(__name__)

MIN_POLLING_INTERVAL = 0.5


def parse_labels(text: str) -> dict[str, str]:
    """Parse ``key=value,key2 = value2`` the way the Go client does.

    Items are split on ``,``; each on its first ``=``; keys and values are
    trimmed; a repeated key keeps the last value. An item without ``=`` —
    including the empty item a trailing comma leaves — is an error, and so is
    one holding characters Flyte cannot put into links unescaped (the message
    names them).
    """
    labels: dict[str, str] = {}
    if not text.strip():
        return labels
    for number, item in enumerate(text.split(","), 1):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"item {number} ({item.strip()!r}) is not key=value")
        # Flyte puts labels into the pack id and its links unescaped.
        problem = path_problem(key, value)
        if problem:
            raise ValueError(f"item {number} ({item.strip()!r}) {problem}")
        labels[key] = value
    return labels


def _url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError("the port is not a number between 0 and 65535") from None
    if parts.query or parts.fragment or text.strip().endswith(("?", "#")):
        raise ValueError(API_URL_QUERY_PROBLEM)
    return text.strip()


# Why a query string cannot be part of the API URL: only discovery would carry
# it, so a gateway that needs it would refuse everything after discovery.
API_URL_QUERY_PROBLEM = ("a query string or fragment is not supported: the Flyte server builds its links without "
                         "it, so only discovery would carry it; give the API root, e.g. http://gateway/flyte-api")


def check_token(value: object) -> str | None:
    """*value* without surrounding whitespace, or ``None`` when nothing is left.

    :raises ValueError: the token holds a character an HTTP header cannot carry
        (a control character such as a line break inside it, or one outside
        latin-1); the message never shows the token.
    """
    if not isinstance(value, str):
        raise ValueError(f"the token is a {type(value).__name__}, expected a string")
    value = value.strip()
    if not value.isprintable():
        raise ValueError("the token holds a control or other unprintable character (a line break inside it?), "
                         "which an HTTP header cannot carry")
    if not value.isascii():
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError("the token holds a character outside latin-1, which an HTTP header cannot carry") \
                from None
    return value or None


def read_token_file(path: str) -> str:
    """The token held in the file at *path* (see :func:`check_token`).

    :raises ValueError: the file cannot be read, is empty, or holds an unusable token.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ValueError(f"cannot read the token file: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise ValueError("the token file is not UTF-8 text") from None
    token = check_token(text)
    if token is None:
        raise ValueError("the token file is empty")
    return token


def _token_file(text: str) -> str:
    path = text.strip()
    read_token_file(path)  # a missing or unusable file is a configuration error at start, not a 401 later
    return path


def _float_seconds(text: str, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not (value >= 0 if allow_zero else value > 0) or value == float("inf"):
        raise ValueError("expected zero or a positive number of seconds" if allow_zero
                         else "expected a positive number of seconds")
    return value


def _positive_float(text: str) -> float:
    return _float_seconds(text, allow_zero=False)


def _non_negative_float(text: str) -> float:
    return _float_seconds(text, allow_zero=True)


def _optional_positive_float(text: str) -> float | None:
    if text.strip().lower() in ("", "none", "off", "0"):
        return None
    return _positive_float(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("expected a whole number") from None
    if value < 1:
        raise ValueError("expected a whole number of at least 1")
    return value


def _port(text: str) -> int | None:
    if text.strip().lower() in ("off", "none", "disabled"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError("expected a port number (0 for any free port) or 'off'") from None
    if not 0 <= value <= 65535:
        raise ValueError("expected a port number between 0 and 65535")
    return value


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _polling_interval(text: str) -> float:
    value = _positive_float(text)
    if value < MIN_POLLING_INTERVAL:
        log.warning("polling interval %g s is below the %g s floor; using %g s",
                    value, MIN_POLLING_INTERVAL, MIN_POLLING_INTERVAL)
        value = MIN_POLLING_INTERVAL
    return value


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value
    return parse


def _text(text: str) -> str:
    return text.strip()


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: where it is read from, how it is parsed, and what it means.

    :param name: the keyword it becomes (``Client``/``Pack`` argument or CLI option).
    :param env: environment variables, the first one set wins.
    :param flag: the command-line flag, or ``None`` for environment-only settings.
    :param parse: text -> value; raises ``ValueError`` with a reason.
    :param default: the value when nothing is set (``REQUIRED`` for none).
    :param help: one line for ``--help`` and the docs.
    :param secret: never echo the value.
    :param target: ``"client"``, ``"pack"`` or ``"cli"`` — who consumes it.
    """

    name: str
    env: tuple[str, ...]
    flag: str | None
    parse: Callable[[str], Any]
    default: object
    help: str
    secret: bool = False
    target: str = "pack"
    metavar: str | None = None


REQUIRED = object()

SETTINGS = (
    Setting("api", ("FLYTE_API", "FLYTE_API_URL"), "--api", _url, REQUIRED,
            "Flyte API root URL, e.g. http://flyte:8080 or http://gateway/flyte-api, no query string "
            "(FLYTE_API wins over FLYTE_API_URL)",
            target="client", metavar="URL"),
    Setting("labels", ("FLYTE_LABELS",), "--labels", parse_labels, None,
            "pack labels as key=value[,key=value...], merged over the pack definition's",
            target="labels", metavar="LABELS"),
    Setting("timeout", ("FLYTE_API_TIMEOUT",), "--api-timeout", _positive_float, 10.0,
            "seconds each request to the Flyte API may take, from connecting to the last byte of the answer",
            target="client", metavar="SECONDS"),
    Setting("jwt", ("FLYTE_JWT",), None, check_token, None,
            "bearer token sent to the Flyte API's origin (surrounding whitespace is stripped)", secret=True,
            target="client"),
    Setting("jwt_file", ("FLYTE_JWT_FILE",), "--jwt-file", _token_file, None,
            "file holding the bearer token, read at start and again (once per rotation) when the API answers 401",
            target="client", metavar="PATH"),
    Setting("insecure", ("FLYTE_API_INSECURE",), "--insecure", _bool, False,
            "skip TLS certificate verification of the Flyte API", target="client"),
    Setting("ca_file", ("FLYTE_CA_CERT_FILE",), "--ca-file", _text, None,
            "PEM bundle: the only CAs trusted for the Flyte API's certificate (default: the system's store)",
            target="client", metavar="PATH"),
    Setting("health_port", ("FLYTE_HEALTH_PORT",), "--health-port", _port, 8090,
            "health server port; 0 picks a free port, 'off' disables it", metavar="PORT"),
    Setting("health_host", ("FLYTE_GEVENT_HEALTH_HOST",), "--health-host", _text, "0.0.0.0",
            "address the health server binds", metavar="HOST"),
    Setting("polling_interval", ("FLYTE_GEVENT_POLLING_INTERVAL",), "--polling-interval", _polling_interval, 5.0,
            "seconds between takes while idle (floor 0.5)", metavar="SECONDS"),
    Setting("max_in_flight", ("FLYTE_GEVENT_MAX_IN_FLIGHT",), "--max-in-flight", _positive_int, 100,
            "most actions run at once; a take is made only when a slot is free", metavar="N"),
    Setting("max_takers", ("FLYTE_GEVENT_MAX_TAKERS",), "--max-takers", _positive_int, 64,
            "most takes in flight at once while there is a backlog", metavar="N"),
    Setting("action_timeout", ("FLYTE_GEVENT_ACTION_TIMEOUT",), "--action-timeout", _optional_positive_float,
            None, "default seconds a handler may run before its action is completed as FATAL", metavar="SECONDS"),
    Setting("grace_period", ("FLYTE_GEVENT_GRACE_PERIOD",), "--grace-period", _non_negative_float, 30.0,
            "seconds running actions get to finish at shutdown", metavar="SECONDS"),
    Setting("flush_timeout", ("FLYTE_GEVENT_FLUSH_TIMEOUT",), "--flush-timeout", _non_negative_float, 10.0,
            "seconds after the grace period to deliver results and queued events at shutdown", metavar="SECONDS"),
    Setting("event_deadline", ("FLYTE_GEVENT_EVENT_DEADLINE",), "--event-deadline", _positive_float, 60.0,
            "seconds a spontaneous event is retried before it is given up", metavar="SECONDS"),
    Setting("event_buffer", ("FLYTE_GEVENT_EVENT_BUFFER",), "--event-buffer", _positive_int, 1000,
            "events send_event_nowait() can queue before it drops them", metavar="N"),
    Setting("result_deadline", ("FLYTE_GEVENT_RESULT_DEADLINE",), "--result-deadline", _positive_float, 600.0,
            "seconds a result post is retried before it is given up as lost", metavar="SECONDS"),
    Setting("journal", ("FLYTE_GEVENT_JOURNAL",), "--journal", _text, None,
            "directory of the crash journal: taken actions are written there, so a killed pack's actions are "
            "completed by the next start (a local filesystem, one per pod); off when unset", metavar="DIR"),
    Setting("journal_sync", ("FLYTE_GEVENT_JOURNAL_SYNC",), "--journal-sync", _choice("normal", "full"), "normal",
            "normal: the journal survives a killed process; full: also a crash of the machine (an fsync per "
            "batch of writes)", metavar="normal|full"),
    Setting("allow_unpatched", ("FLYTE_GEVENT_ALLOW_UNPATCHED",), None, _bool, False,
            "start even though gevent's monkey-patching was not applied (experts only)"),
    Setting("log_level", ("FLYTE_GEVENT_LOG_LEVEL",), "--log-level",
            _choice("debug", "info", "warning", "error", "critical"), "info",
            "log level: debug, info, warning, error or critical", target="cli", metavar="LEVEL"),
    Setting("log_format", ("FLYTE_GEVENT_LOG_FORMAT",), "--log-format", _choice("text", "json"), "text",
            "text, or json for one JSON object per line (with action_id and command while an action runs)",
            target="cli", metavar="text|json"),
)

_BY_NAME = {setting.name: setting for setting in SETTINGS}

#: The settings that make a pack: its Client's, the Pack's own, and the labels (what a runner resolves for it).
PACK_SETTINGS = frozenset(s.name for s in SETTINGS if s.target in ("client", "pack", "labels"))


def read(setting: Setting, text: str, source: str) -> Any:
    """Parse *text* for *setting*; *source* names where it came from in the error."""
    try:
        return setting.parse(text)
    except ValueError as exc:
        shown = "<redacted>" if setting.secret else repr(redact_url(text))
        raise ConfigError(f"{source}={shown}: {exc}", source) from None


def from_environ(environ: Mapping[str, str] | None = None, names: Collection[str] | None = None,
                 overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read settings from *environ* (``os.environ``): ``{name: value}`` for every setting in *names*.

    :param overrides: values that win over the environment (already parsed), e.g. CLI flags.
        ``None`` wins too (``--health-port off``), except for a required setting.
    :raises ConfigError: a required setting is missing or a value is malformed.
    """
    environ = os.environ if environ is None else environ
    overrides = overrides or {}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if names is not None and setting.name not in names:
            continue
        if setting.name in overrides and (overrides[setting.name] is not None or setting.default is not REQUIRED):
            values[setting.name] = overrides[setting.name]
            continue
        for variable in setting.env:
            text = environ.get(variable)
            if text is not None and (text.strip() or setting.parse is _bool):
                values[setting.name] = read(setting, text, variable)
                break
        else:
            if setting.default is REQUIRED:
                raise ConfigError(f"{' or '.join(setting.env)} is not set: {setting.help}", setting.env[0])
            values[setting.name] = setting.default
    return values


def check_seconds(name: str, value: object, allow_zero: bool = False) -> float:
    """*value* as float seconds, for settings given as Python arguments; ``ConfigError`` naming *name* if bad."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0 or \
            (value == 0 and not allow_zero) or value == float("inf"):
        kind = "zero or a positive" if allow_zero else "a positive"
        raise ConfigError(f"{name}={value!r}: must be {kind} number of seconds", name)
    return float(value)


def check_count(name: str, value: object) -> int:
    """*value* if it is a whole number of at least 1; ``ConfigError`` naming *name* otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r}: expected a whole number of at least 1", name)
    return value


def setting(name: str) -> Setting:
    """The :class:`Setting` called *name*."""
    return _BY_NAME[name]
