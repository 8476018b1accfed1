"""The HTTP half of :class:`flyte_gevent.testing.FakeFlyteApi`.

This module answers requests the way the Flyte server does (``ExpediaGroup/flyte`` at 3faa8e7, built with Go 1.15),
down to every detail a pack can observe: links built from the request's headers, the exact rel strings, status codes,
empty error bodies, Go's JSON decoding (lenient about unknown fields and trailing data, strict about types and
timestamps), the unanchored reserved-rel regex, and the connection dropped without a response when a pack completes
an action it could never have taken. ``docs/flyte-api.md`` Part 1 is the specification; the comments below name the
server code a rule comes from whenever the rule is surprising.

The state lives in ``FakeFlyteApi``. :class:`FakeFlyteApp` is a plain WSGI application that drives it through its
underscore methods, so this module never imports ``flyte_gevent.testing``. ``gevent.pywsgi`` (and with it
``http.client`` and ``ssl``) is imported only when a server is built, which keeps ``import flyte_gevent.testing``
light enough to happen before monkey-patching.
"""

import decimal
import errno
import functools
import json
import logging
import math
import posixpath
import re
import time
from http import HTTPStatus
from socket import IPPROTO_TCP, SHUT_RDWR, TCP_NODELAY
from urllib.parse import parse_qs

import gevent

from . import _fake_control
from .models import pack_id

__all__ = [
    "ROUTES",
    "BadRequest",
    "FakeFlyteApp",
    "close_connections",
    "go_json_dumps",
    "go_json_loads",
    "go_time",
    "make_server",
    "pack_id",
]

log = logging.getLogger("flyte_gevent.testing")

#: Route names, as used in the request log and by the fault-injection methods.
ROUTES = ("root", "v1", "health", "register", "list_packs", "get_pack", "delete_pack", "take", "result", "event")

#: ``environ`` key a handler sets to have the connection closed without a response.
DROP_CONNECTION = "flyte_gevent.drop_connection"

# What a handler returns instead of a response to have the connection dropped.
_DROP = None

# Swagger fragments behind the rels (flytepath/flytepaths.go ``flyteDocPaths``). A rel is ``H`` + fragment, where
# ``H/`` is the base the links are built on, so the fragments carry no leading slash here.
_HEALTH_DOC = "swagger#!/info/health"
_LIST_PACKS_DOC = "swagger#!/pack/listPacks"
_TAKE_DOC = "swagger#!/action/takeAction"
_EVENT_DOC = "swagger#/event"
_RESULT_DOC = "swagger#/actionResult"
_PACKS_HELP_DOC = "swagger#/pack"

# pack/handler.go:31. Only the last three alternatives are anchored, so ``up`` and ``self`` match anywhere in a rel
# ("support", "setup", "http://superhost/x"). Go's ``$`` is the end of the text; Python's would also match before a
# final newline, hence ``\Z``.
_RESERVED_REL = re.compile(r"up|self|/actionResult\Z|/takeAction\Z|/event\Z")

# Go 1.15 ``time.Time.UnmarshalJSON`` is ``time.Parse(RFC3339)``: four-digit year, two-digit month, day, minute and
# second, a one- or two-digit hour (Go before 1.20 was lenient there), an optional fraction after a dot, and a
# mandatory zone, either ``Z`` or ``+hh:mm``/``-hh:mm``. No space for ``T``, no lower case, no missing zone.
_RFC3339 = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{1,2}):([0-9]{2}):([0-9]{2})(?:\.[0-9]+)?"
                      r"(?:Z|[+-][0-9]{2}:[0-9]{2})")
_DAYS_IN_MONTH = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

_STATUS_LINES = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}

_JSON_TYPE = ("Content-Type", "application/json; charset=utf-8")
# Go sniffs the type of a body written without one: JSON text comes out as text/plain.
_SNIFFED_TEXT = ("Content-Type", "text/plain; charset=utf-8")


class BadRequest(Exception):
    """The body would make the Flyte server answer 400. The message says why, for ``FakeFlyteApi.violations``."""


# --- Go's JSON ------------------------------------------------------------------------------------------------

def _reject_constant(name):
    raise ValueError(f"invalid character in JSON: {name}")


def _parse_float(text):
    value = float(text)
    if value in (float("inf"), float("-inf")):
        # Go decodes numbers into float64 and refuses what does not fit.
        raise ValueError(f"number {text} out of range")
    return value


def _parse_int(text):
    value = int(text)
    if len(text) > 308:
        # Every number lands in a float64, even an integer: one too large for it fails to decode.
        try:
            float(value)
        except OverflowError:
            raise ValueError(f"number {text[:20]}... out of range") from None
    return value


# Python's decoder would also accept NaN and Infinity, which Go (and JSON) do not.
_DECODER = json.JSONDecoder(parse_float=_parse_float, parse_int=_parse_int, parse_constant=_reject_constant)

# json.Marshal escapes HTML-sensitive characters and the JavaScript line separators.
_GO_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                             "\u2028": "\\u2028", "\u2029": "\\u2029"})


def go_json_loads(data):
    """Decode a request body like ``json.NewDecoder(body).Decode(v)``.

    Only the first JSON value counts: whatever follows it is never read. An empty body is an error (Go's ``EOF``).
    Raises :class:`ValueError` (``json.JSONDecodeError`` is one) when Go would fail.
    """
    text = data.decode("utf-8", "replace")
    start = len(text) - len(text.lstrip(" \t\r\n"))
    if start == len(text):
        raise ValueError("EOF")
    return _DECODER.raw_decode(text, start)[0]


def go_json_dumps(value, sort_keys=False):
    """Encode like Go's ``json.Marshal``: compact, UTF-8, with ``<``, ``>``, ``&``, U+2028 and U+2029 escaped.
    Go sorts the keys of maps (but not of structs): pass *sort_keys* for values that are maps all the way down."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False, sort_keys=sort_keys)
    if "<" in text or ">" in text or "&" in text or not text.isascii():
        text = text.translate(_GO_ESCAPES)
    return text.encode("utf-8", "replace")


def go_float(value):
    """A float64 as ``json.Marshal`` writes it: the shortest digits that read back the same, in plain notation
    from 1e-6 up to 1e21 and in exponent notation (``1e+21``, ``1e-7``) outside that."""
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    text = repr(value)  # Python's repr also gives the shortest round-trip digits
    if 1e-6 <= abs(value) < 1e21:
        plain = format(decimal.Decimal(text), "f")
        return plain.rstrip("0").rstrip(".") if "." in plain else plain
    mantissa, _, exponent = text.partition("e")
    sign, digits = exponent[0], exponent[1:]
    if sign == "-" and len(digits) == 2 and digits[0] == "0":
        digits = digits[1]  # encoding/json trims e-07 to e-7
    return f"{mantissa}e{sign}{digits}"


def _float64(value, where):
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{where}: {value} does not fit in a float64, as the server holds every number") from None
    if math.isinf(number) or math.isnan(number):
        raise ValueError(f"{where}: {value} is not a JSON number")
    return number


def _as_read_back(number):
    # What decoding the server's own JSON for this float64 gives in Python: an int when Go writes it without a
    # fraction or exponent, else a float.
    if number.is_integer() and (number == 0 or 1e-6 <= abs(number) < 1e21):
        return int(number)
    return number


def as_go_value(value, where="payload"):
    """*value* as the server keeps it after decoding it into Go's ``interface{}``: every number a float64 (so
    integers beyond 2**53 are rounded), written back as an int when Go would print it without a fraction. Raises
    ValueError for a number no float64 holds, TypeError for what is not JSON."""
    if value is None or type(value) is bool or type(value) is str:
        return value
    if type(value) is int or type(value) is float:
        return _as_read_back(_float64(value, where))
    if isinstance(value, dict):
        return {key: as_go_value(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_go_value(item, f"{where}[{index}]") for index, item in enumerate(value)]
    raise TypeError(f"{where}: {type(value).__name__} is not a JSON value")


def as_flow_input(value, where="input"):
    """*value* as an action carries it when a flow step created it: the flow's JSON decoded into Go values, then
    every string templated (execution/step.go, template/template.go).

    Numbers become float64 (see :func:`as_go_value`); a member whose value is null disappears (templating a nil
    map value deletes the key); null inside an array raises ValueError, because the server's templating panics on
    it and creates no action at all. A top-level null stays null.
    """
    if value is None:
        return None
    return _flow_value(value, where)


def _flow_value(value, where):
    if isinstance(value, dict):
        return {key: _flow_value(item, f"{where}.{key}") for key, item in value.items() if item is not None}
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            if item is None:
                raise ValueError(f"{where}[{index}] is null: the Flyte server cannot template null inside an array "
                                 f"(reflect.Value.Set on a zero Value), so no flow can create this action")
        return [_flow_value(item, f"{where}[{index}]") for index, item in enumerate(value)]
    return as_go_value(value, where)


def go_json_encode(value):
    """Encode a Go ``interface{}`` value the way ``json.Marshal`` does: map keys sorted, numbers as float64 (see
    :func:`go_float`), HTML characters and U+2028/U+2029 escaped. For action inputs, which come from flows."""
    if not _has_float(value):
        # Integers and everything else print alike in Python and Go: the C encoder does it quickly.
        return go_json_dumps(value, sort_keys=True)
    return "".join(_encode_parts(value)).encode("utf-8", "replace")


def _has_float(value):
    if type(value) is float:
        return True
    if isinstance(value, dict):
        return any(_has_float(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_float(item) for item in value)
    return False


def _encode_parts(value):
    if value is None:
        yield "null"
    elif value is True:
        yield "true"
    elif value is False:
        yield "false"
    elif type(value) is str:
        yield _go_string(value)
    elif type(value) is int or type(value) is float:
        yield go_float(_float64(value, "number"))
    elif isinstance(value, dict):
        yield "{"
        for index, key in enumerate(sorted(value)):
            if index:
                yield ","
            yield _go_string(key)
            yield ":"
            yield from _encode_parts(value[key])
        yield "}"
    elif isinstance(value, (list, tuple)):
        yield "["
        for index, item in enumerate(value):
            if index:
                yield ","
            yield from _encode_parts(item)
        yield "]"
    else:
        raise TypeError(f"{type(value).__name__} is not a JSON value")


def _go_string(text):
    encoded = json.dumps(text, ensure_ascii=False)
    if "<" in encoded or ">" in encoded or "&" in encoded or not encoded.isascii():
        encoded = encoded.translate(_GO_ESCAPES)
    return encoded


def go_time(ns, milliseconds=False):
    """Format a UTC time (nanoseconds since the epoch) the way Go marshals a ``time.Time``: RFC 3339 with
    trailing zeros of the fraction dropped (``RFC3339Nano``). With *milliseconds*, first truncate the way a
    round trip through MongoDB does."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    if milliseconds:
        fraction -= fraction % 1_000_000
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if fraction:
        text += "." + f"{fraction:09d}".rstrip("0")
    return text + "Z"


def _is_go_time(value):
    match = _RFC3339.fullmatch(value)
    if match is None:
        return False
    year, month, day, hour, minute, second = map(int, match.groups())
    if not 1 <= month <= 12 or hour > 23 or minute > 59 or second > 59:
        return False
    days = _DAYS_IN_MONTH[month]
    if month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0):
        days = 29
    return 1 <= day <= days


def _json_type(value):
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


# --- decoding request bodies into the server's structs -----------------------------------------------------
#
# Go matches object keys to struct fields case-insensitively, ignores unknown keys and fails on a type mismatch.
# A null leaves a field at its zero value ("" for strings, nil for maps and slices); a null inside a map or a list
# becomes the element type's zero value.

def _string(value, where):
    if value is None:
        return ""
    if type(value) is not str:
        raise BadRequest(f"{where} must be a string, got {_json_type(value)}")
    return value


def _time(value, where):
    if value is None:
        return None
    if type(value) is not str or not _is_go_time(value):
        raise BadRequest(f"{where} must be an RFC 3339 timestamp with a time zone, got {json.dumps(value)}")
    return value


def _fields(value, where):
    """``(casefolded key, value)`` pairs of a JSON object decoded into a struct."""
    if type(value) is not dict:
        raise BadRequest(f"{where} must be an object, got {_json_type(value)}")
    return ((key.casefold(), item) for key, item in value.items())


def _list(value, where, decode):
    if value is None:
        return None
    if type(value) is not list:
        raise BadRequest(f"{where} must be an array, got {_json_type(value)}")
    return [decode(item, f"{where}[{index}]") for index, item in enumerate(value)]


def _labels(value, where):
    if value is None:
        return None
    if type(value) is not dict:
        raise BadRequest(f"{where} must be an object, got {_json_type(value)}")
    return {key: _string(item, f"{where}.{key}") for key, item in value.items()}


def _link(value, where):
    href = rel = ""
    if value is not None:
        for key, item in _fields(value, where):
            if key == "href":
                href = _string(item, f"{where}.href")
            elif key == "rel":
                rel = _string(item, f"{where}.rel")
    return href, rel


def _command(value, where):
    command = {"name": "", "events": None, "links": None}
    if value is not None:
        for key, item in _fields(value, where):
            if key == "name":
                command["name"] = _string(item, f"{where}.name")
            elif key == "events":
                command["events"] = _list(item, f"{where}.events", _string)
            elif key == "links":
                command["links"] = _list(item, f"{where}.links", _link)
    return command


def _event_definition(value, where):
    event = {"name": "", "links": None}
    if value is not None:
        for key, item in _fields(value, where):
            if key == "name":
                event["name"] = _string(item, f"{where}.name")
            elif key == "links":
                event["links"] = _list(item, f"{where}.links", _link)
    return event


def decode_pack(value):
    """Decode a registration body into the fields of the server's ``pack.Pack``.

    Returns a dict with ``name``, ``labels``, ``commands``, ``events`` and ``links`` (None where Go would hold nil).
    ``id`` and ``lastSeen`` are type-checked and dropped, since the server overwrites them; a body of ``null``
    decodes to an empty pack, which the server registers under the id "".
    """
    pack = {"name": "", "labels": None, "commands": None, "events": None, "links": None}
    if value is None:
        return pack
    for key, item in _fields(value, "the pack"):
        if key == "name":
            pack["name"] = _string(item, "name")
        elif key == "labels":
            pack["labels"] = _labels(item, "labels")
        elif key == "commands":
            pack["commands"] = _list(item, "commands", _command)
        elif key == "events":
            pack["events"] = _list(item, "events", _event_definition)
        elif key == "links":
            pack["links"] = _list(item, "links", _link)
        elif key == "id":
            _string(item, "id")
        elif key == "lastseen":
            _time(item, "lastSeen")
    return pack


def decode_event(value):
    """Decode a result or event body into the server's ``execution.Event``.

    Returns ``(event, payload, created_at, smuggled)``: *created_at* is the timestamp as sent (None when absent or
    null) and *smuggled* lists the keys a pack must never send (``pack``, ``receivedAt``) as they were spelled.
    """
    name, payload, created_at, smuggled = "", None, None, []
    if value is None:
        return name, payload, created_at, smuggled
    if type(value) is not dict:
        raise BadRequest(f"the body must be a JSON object, got {_json_type(value)}")
    for key, item in value.items():
        folded = key.casefold()
        if folded == "event":
            name = _string(item, "event")
        elif folded == "payload":
            payload = item
        elif folded == "createdat":
            created_at = _time(item, "createdAt")
        elif folded == "receivedat":
            smuggled.append(key)
            _time(item, "receivedAt")
        elif folded == "pack":
            # The server pre-fills the event's pack from the URL, then decodes the body over it.
            smuggled.append(key)
            if item is not None:
                for field, sub in _fields(item, "pack"):
                    if field in ("id", "name"):
                        _string(sub, f"pack.{field}")
                    elif field == "labels":
                        _labels(sub, "pack.labels")
    return name, payload, created_at, smuggled


# --- links -------------------------------------------------------------------------------------------------------

def _base(environ):
    """``H/``: the scheme and host the server builds its links on (httputil/requestprotoandhostsetter.go)."""
    proto = environ.get("HTTP_X_FORWARDED_PROTO") or "http"
    host = environ.get("HTTP_X_FLYTE_HOST") or environ.get("HTTP_X_FORWARDED_HOST") or environ.get("HTTP_HOST", "")
    if not host.isascii():
        host = host.encode("latin-1").decode("utf-8", "replace")
    return f"{proto}://{host}/"


def _href(base, template, *replacements):
    """httputil/uribuilder.go: substitute path parameters verbatim, each ``Replace`` trimming one trailing slash."""
    path = template
    for parameter, value in replacements:
        path = path.replace(parameter, value, 1)
        path = path.removesuffix("/")
    return base + path[1:]


def _joined_href(base, *elements):
    """``UriBuilder.Path(a, b)``: Go's ``filepath.Join``, which also cleans ``.`` and ``..`` segments."""
    path = "/".join(element for element in elements if element)
    if path:
        path = posixpath.normpath(path)
        if path.startswith("//"):  # Go's Clean keeps one leading slash where POSIX keeps two
            path = "/" + path.lstrip("/")
    return base + path.removeprefix("/")


def _link_view(href, rel):
    return {"href": href, "rel": rel} if rel else {"href": href}


def _root_document(base):
    return {"links": [
        {"href": base, "rel": "self"},
        {"href": base + "swagger#/info", "rel": "help"},
        {"href": base + "v1", "rel": base + "swagger#!/info/v1"},
    ]}


def _v1_document(base):
    return {"links": [
        {"href": base + "v1", "rel": "self"},
        {"href": base, "rel": "up"},
        {"href": base + "swagger#!/info/v1", "rel": "help"},
        {"href": base + "health", "rel": base + _HEALTH_DOC},
        {"href": base + "v1/packs", "rel": base + _LIST_PACKS_DOC},
        {"href": base + "v1/flows", "rel": base + "swagger#!/flow/listFlows"},
        {"href": base + "v1/datastore", "rel": base + "swagger#!/datastore/listDatastoreItems"},
        {"href": base + "v1/audit/flows", "rel": base + "swagger#!/flowAudit/findFlows"},
        {"href": base + "v1/swagger", "rel": base + "swagger"},
    ]}


def _status(last_seen_ns):
    age = time.time_ns() - last_seen_ns
    if age < 600 * 1_000_000_000:
        return "live"
    if age < 86400 * 1_000_000_000:
        return "warning"
    return "critical"


def _pack_document(pack, base, last_seen):
    """pack/view.go ``toPackResponse``: the stored pack with server links added. Field order is the Go struct's."""
    view, pid = pack._view, pack.id
    document = {"id": pid, "name": view["name"]}
    if view["labels"]:
        document["labels"] = dict(sorted(view["labels"].items()))
    if view["commands"]:
        take_rel = base + _TAKE_DOC
        # Command help links are stored but never returned: each command gets the take link instead, which carries
        # commandName although the take handler reads actionName.
        document["commands"] = [
            {"name": command["name"], "events": command["events"],
             "links": [{"href": _href(base, "/v1/packs/:packId/actions/take?commandName=:commandName",
                                      (":packId", pid), (":commandName", command["name"])),
                        "rel": take_rel}]}
            for command in view["commands"]]
    if view["events"]:
        document["events"] = [
            {"name": event["name"], "links": [_link_view(*link) for link in event["links"]]} if event["links"]
            else {"name": event["name"]}
            for event in view["events"]]
    document["lastSeen"] = last_seen
    links = [_link_view(*link) for link in view["links"] or ()]
    links.append({"href": _href(base, "/v1/packs/:packId", (":packId", pid)), "rel": "self"})
    links.append({"href": base + "v1/packs", "rel": "up"})
    links.append({"href": _href(base, "/v1/packs/:packId/actions/take", (":packId", pid)), "rel": base + _TAKE_DOC})
    links.append({"href": _href(base, "/v1/packs/:packId/events", (":packId", pid)), "rel": base + _EVENT_DOC})
    document["links"] = links
    document["status"] = _status(pack._last_seen_ns)
    return document


# --- routing -----------------------------------------------------------------------------------------------------

_METHODS = {
    "/": {"GET": "root"},
    "/v1": {"GET": "v1"},
    "/health": {"GET": "health"},
    "packs": {"GET": "list_packs", "POST": "register"},
    "pack": {"GET": "get_pack", "DELETE": "delete_pack"},
    "take": {"POST": "take"},
    "result": {"POST": "result"},
    "event": {"POST": "event"},
}
# The routes whose handler answers 200 through httputil.WriteResponse, which never calls WriteHeader.
_WRITES_STATUS_IMPLICITLY = frozenset({"root", "v1", "list_packs", "get_pack"})
_OPTIONS_ALLOW = "DELETE, GET, HEAD, POST, PUT, CONNECT, PATCH"
_ALLOW = {key: ", ".join(m for method in methods for m in ((method, "HEAD") if method == "GET" else (method,)))
          for key, methods in _METHODS.items()}


def resolve(method, path):
    """Map a request to ``(route, params, allow)``.

    *route* is None when nothing matches; then *allow* is None for an unknown path (404) or the ``Allow`` header
    value for a known path with the wrong method (405). HEAD is served like GET, as the server's router does.
    """
    params = ()
    if path.startswith("/v1/packs"):
        if path == "/v1/packs":
            key = "packs"
        elif path == "/v1/packs/":
            return None, (), None  # an empty last segment matches no route
        elif path[9] == "/":
            parts = path[10:].split("/")
            count = len(parts)
            if count == 1:
                key, params = "pack", (parts[0],)
            elif count == 2 and parts[1] == "events":
                key, params = "event", (parts[0],)
            elif count == 3 and parts[1] == "actions" and parts[2] == "take":
                key, params = "take", (parts[0],)
            elif count == 4 and parts[1] == "actions" and parts[3] == "result":
                key, params = "result", (parts[0], parts[2])
            else:
                return None, (), None
        else:
            return None, (), None
    elif path in _METHODS:
        key = path
    else:
        return None, (), None
    route = _METHODS[key].get("GET" if method == "HEAD" else method)
    return route, params, _ALLOW[key]


def _form_value(environ, body, name):
    """Go's ``Request.FormValue``: a url-encoded POST body first, then the query string. JSON bodies are never read."""
    content_type = environ.get("CONTENT_TYPE")
    if content_type and content_type.partition(";")[0].strip().lower() == "application/x-www-form-urlencoded":
        values = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).get(name)
        if values:
            return values[0]
    query = environ.get("QUERY_STRING")
    if query:
        values = parse_qs(query, keep_blank_values=True).get(name)
        if values:
            return values[0]
    return ""


def _request_headers(environ):
    headers = {key[5:].replace("_", "-").lower(): value for key, value in environ.items() if key.startswith("HTTP_")}
    if environ.get("CONTENT_TYPE"):
        headers["content-type"] = environ["CONTENT_TYPE"]
    if environ.get("CONTENT_LENGTH"):
        headers["content-length"] = environ["CONTENT_LENGTH"]
    return headers


def _empty(status, *headers):
    return status, list(headers), b""


class FakeFlyteApp:
    """The WSGI application behind a ``FakeFlyteApi``: records each request, applies the injected faults, then
    answers like the Flyte server. Handlers return ``(status, headers, body)``, or None to drop the connection."""

    def __init__(self, api):
        self.api = api

    def __call__(self, environ, start_response):
        api = self.api
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO") or "/"
        if not path.isascii():
            # WSGI hands over the unquoted path as latin-1; the server sees UTF-8.
            path = path.encode("latin-1").decode("utf-8", "replace")
        body = environ["wsgi.input"].read()
        if api.control and _fake_control.is_control_path(path):
            # The operator's routes: none of the pack-facing machinery (latency, faults, tokens, the log) applies.
            status, headers, payload = _fake_control.respond(api, method, path, environ.get("QUERY_STRING", ""),
                                                             body)
            start_response(_STATUS_LINES.get(status) or f"{status} Unknown", headers)
            return [b"" if method == "HEAD" else payload]
        route, params, allow = resolve(method, path)
        record = None
        if api.record_requests:
            record = api._record_request(route, method, path, environ.get("QUERY_STRING", ""),
                                         _request_headers(environ), body)
        try:
            response = self._respond(environ, route, params, allow, body)
        except Exception as error:  # a bug in the fake: answer 500, but make sure the test sees it
            log.exception("FakeFlyteApi failed on %s %s", method, path)
            api._internal_error(f"{method} {path}: {type(error).__name__}: {error}")
            response = _empty(500)
        if response is _DROP:
            environ[DROP_CONNECTION] = True
            return []
        status, headers, payload = response
        if record is not None:
            record.status = status
        start_response(_STATUS_LINES.get(status) or f"{status} Unknown", headers)
        return [b"" if method == "HEAD" else payload]

    def _respond(self, environ, route, params, allow, body):
        api = self.api
        if api.latency > 0:
            gevent.sleep(api.latency)
        if api._outage == "503":
            return _empty(503)
        if api._faults:
            fault = api._next_fault("fail", route)
            if fault is not None:
                return fault.status, list(fault.headers), fault.body
            fault = api._next_fault("delay_before", route)
            if fault is not None:
                gevent.sleep(fault.seconds)
        if api._outage == "refuse":  # the outage began while this request waited
            return _DROP
        tokens = api.accepted_tokens
        if tokens is not None:
            refusal = _check_token(environ.get("HTTP_AUTHORIZATION"), tokens)
            if refusal is not None:
                return refusal
        method = environ["REQUEST_METHOD"]
        if method == "OPTIONS":
            # vestigo answers OPTIONS itself, on every path, listing methods from a map (so in no fixed order).
            response = 200, [("Allow", _OPTIONS_ALLOW)], b""
        elif route is None:
            # The router's own answers, the only error responses with a body.
            if allow is None:
                response = 404, [_SNIFFED_TEXT], b"Not Found"
            else:
                response = 405, [("Allow", allow), _SNIFFED_TEXT], b"Method Not Allowed"
        else:
            if "yaml" in environ.get("CONTENT_TYPE", "") or "yaml" in environ.get("HTTP_ACCEPT", ""):
                self._report_yaml(environ, route)
            if method == "HEAD":
                # vestigo's HEAD wrapper calls the GET handler without the path parameters...
                params = ("",) * len(params)
            response = getattr(self, "_" + route)(environ, params, body)
            if method == "HEAD" and route in _WRITES_STATUS_IMPLICITLY and response[0] == 200:
                # ...and then writes the status the handler set, which is none (0) when the handler let the body
                # write an implicit 200: WriteHeader(0) panics, and the connection closes without an answer.
                response = _DROP
        if api._faults:
            fault = api._next_fault("delay_after", route)
            if fault is not None:
                gevent.sleep(fault.seconds)
            if api._next_fault("drop", route) is not None:
                return _DROP
        if api._outage == "refuse":
            return _DROP
        return response

    def _report_yaml(self, environ, route):
        # The server speaks YAML when asked exactly this way; the fake has no YAML parser and says so.
        if environ.get("CONTENT_TYPE") == "application/x-yaml":
            self.api._violation(f"{route}: Content-Type application/x-yaml; the server converts YAML to JSON first, "
                                f"FakeFlyteApi reads the body as JSON")
        if environ.get("HTTP_ACCEPT") == "application/x-yaml":
            self.api._violation(f"{route}: Accept application/x-yaml; the server would answer in YAML, "
                                f"FakeFlyteApi answers in JSON")

    def _decode(self, route, body, decoder):
        """``(value, decoder(value))`` for a body Go would decode, else None with the reason in ``violations``."""
        try:
            value = go_json_loads(body)
            return value, decoder(value)
        except BadRequest as error:
            self.api._violation(f"{route}: 400 because {error}")
        except ValueError as error:
            self.api._violation(f"{route}: 400 because the body is not valid JSON ({error})")
        return None

    # --- discovery -------------------------------------------------------------------------------------------

    def _root(self, environ, params, body):
        return 200, [_JSON_TYPE], go_json_dumps(_root_document(_base(environ)))

    def _v1(self, environ, params, body):
        return 200, [_JSON_TYPE], go_json_dumps(_v1_document(_base(environ)))

    def _health(self, environ, params, body):
        return _empty(200)

    # --- packs -----------------------------------------------------------------------------------------------

    def _register(self, environ, params, body):
        api = self.api
        decoded = self._decode("register", body, decode_pack)
        if decoded is None:
            return _empty(400)
        value, pack = decoded
        for _href, rel in pack["links"] or ():
            if _RESERVED_REL.search(rel):
                api._violation(f"register: 400 because the pack link rel {rel!r} matches the server's reserved-rel "
                               f"regex up|self|/actionResult$|/takeAction$|/event$ (unanchored)")
                return _empty(400)
        record = api._upsert_pack(pack_id(pack["name"], pack["labels"]), pack, value)
        base = _base(environ)
        location = _joined_href(base, "/v1/packs", record.id)
        # Go writes header bytes as they are, turning CR and LF into spaces; WSGI wants latin-1 strings.
        location = location.replace("\r", " ").replace("\n", " ").encode("utf-8").decode("latin-1")
        document = _pack_document(record, base, go_time(record._last_seen_ns))
        # PostPack sets Content-Type after WriteHeader(201), which Go ignores; the body's type is then sniffed.
        return 201, [("Location", location), _SNIFFED_TEXT], go_json_dumps(document)

    def _list_packs(self, environ, params, body):
        base = _base(environ)
        packs = []
        # FindAll projects _id, name, lastSeen and labels, sorted by name.
        for pack in sorted(self.api.packs.values(), key=lambda p: p.name):
            entry = {"id": pack.id, "name": pack.name}
            if pack.labels:
                entry["labels"] = dict(sorted(pack.labels.items()))
            entry["lastSeen"] = go_time(pack._last_seen_ns, milliseconds=True)
            entry["links"] = [{"href": _href(base, "/v1/packs/:packId", (":packId", pack.id)), "rel": "self"}]
            entry["status"] = _status(pack._last_seen_ns)
            packs.append(entry)
        links = [{"href": base + "v1/packs", "rel": "self"},
                 {"href": base + "v1", "rel": "up"},
                 {"href": base + _PACKS_HELP_DOC, "rel": "help"}]
        return 200, [_JSON_TYPE], go_json_dumps({"links": links, "packs": packs})

    def _get_pack(self, environ, params, body):
        pack = self.api.packs.get(params[0])
        if pack is None:
            return _empty(404)
        # Read back from MongoDB, so lastSeen has millisecond precision here.
        document = _pack_document(pack, _base(environ), go_time(pack._last_seen_ns, milliseconds=True))
        return 200, [_JSON_TYPE], go_json_dumps(document)

    def _delete_pack(self, environ, params, body):
        if params[0] not in self.api.packs:
            return _empty(404)
        self.api.delete_pack(params[0])
        return _empty(204)

    # --- actions and events ----------------------------------------------------------------------------------

    def _take(self, environ, params, body):
        api = self.api
        pack = api.packs.get(params[0])
        if pack is None:
            return _empty(404)
        api._touch(pack)
        action_name = _form_value(environ, body, "actionName")
        action = api._find_new(pack, action_name)
        # The server loads every NEW action of the pack's name on each take (FindNew), then claims the one it
        # picked with an update conditional on NEW: the longer that takes, the more concurrent takes pick the same.
        window = api.take_cost * api._backlog(pack.name, action_name) if api.take_cost > 0 else 0.0
        if action is None:
            if window > 0:
                gevent.sleep(window)
            return _empty(204)
        action.takes += 1
        window += api.race_window
        if window > 0:
            gevent.sleep(window)
        if not api._claim(action, pack):
            # The conditional NEW -> PENDING update found nothing to update: another poller won.
            return _empty(500)
        base = _base(environ)
        link = go_json_dumps([{"href": _href(base, "/v1/packs/:packId/actions/:actionId/result",
                                             (":packId", params[0]), (":actionId", action.id)),
                               "rel": base + _RESULT_DOC}])
        return 200, [_JSON_TYPE], (b'{"command":' + action._command_json + b',"input":' + action._input_json
                                   + b',"links":' + link + b"}")

    def _result(self, environ, params, body):
        api = self.api
        pid, aid = params
        action = api.actions.get(aid)
        if action is not None:
            action.result_posts += 1
        pack = api.packs.get(pid)
        if pack is None:
            return _empty(404)
        api._touch(pack)
        decoded = self._decode("result", body, decode_event)
        if decoded is None:
            return _empty(400)
        name, payload, created_at, smuggled = decoded[1]
        self._report_smuggled("result", pid, smuggled)
        if action is None:
            return _empty(404)
        if action.pack_name != pack.name or not action._label_set <= pack._label_set:
            # execution/pack.go returns (nil, nil) and the handler panics logging the nil action; Go's server
            # recovers and closes the connection without writing anything.
            api._violation(f"result: pack {pid!r} posted a result for action {aid} of pack name "
                           f"{action.pack_name!r} with labels {action.labels!r}, which it cannot have taken; "
                           f"the server drops the connection")
            return _DROP
        if action.state != "PENDING":
            return _empty(500)  # "action is not in PENDING state": a repeated result, or one never taken
        api._complete(action, name, payload, created_at)
        return _empty(202)

    def _event(self, environ, params, body):
        api = self.api
        pid = params[0]
        pack = api.packs.get(pid)
        if pack is None:
            return _empty(404)
        api._touch(pack)  # before decoding: even a 400 is a sign of life
        decoded = self._decode("event", body, decode_event)
        if decoded is None:
            return _empty(400)
        value, (name, payload, created_at, smuggled) = decoded
        self._report_smuggled("event", pid, smuggled)
        api._add_event(pid, name, payload, created_at, value)
        return _empty(202)

    def _report_smuggled(self, route, pid, keys):
        for key in keys:
            if key.casefold() == "pack":
                why = "the server decodes it over the pack taken from the URL, changing the pack flows match on"
            else:
                why = "the server overwrites it; a pack never sends it"
            self.api._violation(f"{route} from pack {pid!r}: the body carries {key!r}: {why}")


def _check_token(header, tokens):
    """The auth layer (auth/oidc.go): 401 and no body, with the WWW-Authenticate header Flyte sends."""
    if not header:
        return _empty(401, ("WWW-Authenticate", 'Bearer realm="token"'))
    # golang-jwt's AuthorizationHeaderExtractor strips a case-insensitive "Bearer " and accepts a bare token too.
    token = header[7:] if len(header) > 6 and header[:7].upper() == "BEARER " else header
    if token not in tokens:
        return _empty(401, ("WWW-Authenticate", 'Bearer realm="token", error="invalid_token"'))
    return None


# --- the server --------------------------------------------------------------------------------------------------

@functools.cache
def _server_class():
    from gevent.pywsgi import WSGIHandler, WSGIServer

    class Handler(WSGIHandler):
        # Outages shut connections down under the handlers' feet; that is expected, not worth a traceback.
        ignored_socket_errors = WSGIHandler.ignored_socket_errors + (errno.EBADF, errno.ENOTCONN, errno.ESHUTDOWN)

        def run_application(self):
            super().run_application()
            if self.environ.get(DROP_CONNECTION):
                # The application wrote nothing; closing now is a connection dropped without a response.
                self.close_connection = True

    class Server(WSGIServer):
        handler_class = Handler

        def __init__(self, listener, application, connections, **kwargs):
            super().__init__(listener, application, **kwargs)
            self.connections = connections

        def handle(self, sock, address):
            # pywsgi writes the status line and headers, then the body, in two sends. Without TCP_NODELAY the
            # second one waits for the client's delayed ACK: 40 ms per request on Linux.
            sock.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
            self.connections.add(sock)
            try:
                super().handle(sock, address)
            finally:
                self.connections.discard(sock)

    return Server


def make_server(host, port, application, spawn, connections):
    """An unstarted ``WSGIServer`` for *application* on (*host*, *port*): keep-alive, TCP_NODELAY on every accepted
    socket, no access log, handlers spawned into the group *spawn*, open sockets kept in the set *connections*."""
    return _server_class()((host, port), application, connections, spawn=spawn, log=None, error_log=log,
                           environ={"SERVER_NAME": host})


def close_connections(connections):
    """Shut down every open connection. Handlers waiting for the next request on it see EOF and exit."""
    for sock in list(connections):
        try:
            sock.shutdown(SHUT_RDWR)
        except OSError:
            pass
