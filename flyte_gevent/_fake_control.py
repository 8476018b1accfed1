"""The control surface of a standalone fake Flyte API: HTTP routes under ``/_fake/``, and the ``flyte-gevent
fake-api`` commands that use them.

A :class:`~flyte_gevent.testing.FakeFlyteApi` in a test is driven through its methods. One served by
``flyte-gevent fake-api`` runs in a process of its own, so it answers these routes too (``control=True``), letting a
shell or a script do what a test does: queue actions, read their results, events and registrations, inject faults,
start over. The fake is for local use: it binds 127.0.0.1 unless told otherwise, and anyone who can reach its port
can use these routes.

The routes cannot collide with the Flyte API's, which all live under ``/``, ``/v1``, ``/health`` and ``/swagger``, and
no link the fake hands out leads to them, so a pack following its links never meets them. They skip everything the
fake does to the pack-facing routes — latency, faults, outages in ``"503"`` mode, token checks, the request log —
and answer plain JSON (errors as ``{"error": "..."}``):

- ``GET /_fake``: the list of routes;
- ``GET /_fake/packs``: registered packs; ``?name=NAME_OR_ID&wait=S`` first waits up to S seconds for that one;
- ``POST /_fake/actions`` ``{"pack", "command", "input", "labels"}``: queue an action, answered 201 ``{"id"}``;
- ``GET /_fake/actions``: actions with state and result; ``?id=A&id=B`` only those; ``?wait=S`` first waits up to
  S seconds until they (or all) have finished;
- ``GET /_fake/events``: spontaneous events, oldest first; ``?name=E`` only those; ``?wait=S&count=N`` first
  waits up to S seconds for N (default 1) of them;
- ``POST /_fake/faults`` ``{"kind": "fail" | "drop" | "delay", "route", "times", ...}``: as the methods of that
  name; ``DELETE /_fake/faults`` clears them all;
- ``POST /_fake/reset``: forget packs, actions, events, requests and faults, as a restart on an empty database.

A ``GET`` that waits answers 200 whether or not what it waited for happened: ``"done"`` says which, and ``"problem"``
says what is missing (for late actions, why no pack takes them).
"""

import json
import math
import os
import sys
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    import argparse

__all__ = ["PREFIX", "add_commands", "is_control_path", "respond", "run"]

#: The reserved path prefix.
PREFIX = "/_fake"

#: Environment variable naming the fake the CLI commands talk to.
URL_VARIABLE = "FLYTE_GEVENT_FAKE_API_URL"
DEFAULT_URL = "http://127.0.0.1:8080"

# The longest wait a control request may ask for.
_MAX_WAIT = 3600.0

EX_OK, EX_FAILED, EX_USAGE, EX_UNAVAILABLE, EX_CONFIG = 0, 1, 2, 69, 78

_INDEX = [
    "GET /_fake/packs[?name=NAME_OR_ID&wait=SECONDS]",
    "POST /_fake/actions {pack, command, input, labels}",
    "GET /_fake/actions[?id=ID...&wait=SECONDS]",
    "GET /_fake/events[?name=EVENT&count=N&wait=SECONDS]",
    "POST /_fake/faults {kind: fail|drop|delay, route, times, status, body, contentType, seconds, before}",
    "DELETE /_fake/faults",
    "POST /_fake/reset",
]


class _Refused(Exception):
    """The control request is malformed: answered 400, or *status*, with the message."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


# --- the routes ---------------------------------------------------------------------------------------------------

def is_control_path(path):
    """Whether *path* is under the reserved prefix."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def respond(api, method, path, query, body):
    """Answer a control request for the ``FakeFlyteApi`` *api*: ``(status, headers, body)``."""
    routes = _ROUTES.get(path[len(PREFIX):].rstrip("/"))
    if routes is None:
        return _json(404, {"error": f"no control route {path}; GET {PREFIX} lists them"})
    handler = routes.get(method)
    if handler is None:
        return _json(405, {"error": f"{path} takes {', '.join(routes)}, not {method}"},
                     ("Allow", ", ".join(routes)))
    try:
        params = parse_qs(query, keep_blank_values=True)
        status, document = handler(api, params, body)
    except _Refused as refusal:
        return _json(refusal.status, {"error": str(refusal)})
    return _json(status, document)


def _index(api, params, body):
    return 200, {"routes": _INDEX}


def _packs(api, params, body):
    name = _one(params, "name")
    wait = _wait(params)
    problem = None
    if wait is not None:
        try:
            api.wait_for_pack(name or None, timeout=wait)
        except AssertionError as error:
            problem = str(error)
    packs = [pack_view(p) for p in api.packs.values() if not name or name in (p.id, p.name)]
    return 200, _waited({"packs": packs}, wait, problem)


def _enqueue(api, params, body):
    request = _body(body)
    pack, command = request.get("pack"), request.get("command")
    for key, value in (("pack", pack), ("command", command)):
        if not isinstance(value, str) or not value:
            raise _Refused(f"{key} must be a non-empty string, not {json.dumps(value)}")
    labels = request.get("labels")
    if labels is not None and not (isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values())):
        raise _Refused(f"labels must be an object of strings, not {json.dumps(labels)}")
    try:
        aid = api.enqueue(pack, command, request.get("input"), labels or None)
    except (TypeError, ValueError) as error:
        raise _Refused(str(error)) from None
    return 201, {"id": aid}


def _actions(api, params, body):
    ids = params.get("id") or []
    unknown = [aid for aid in ids if aid not in api.actions]
    if unknown:
        raise _Refused(f"unknown action id {', '.join(unknown)}", 404)
    wait = _wait(params)
    problem = None
    if wait is not None:
        try:
            if ids:
                api.wait_for_results(ids, timeout=wait)
            else:
                api.wait_until_idle(timeout=wait)
        except AssertionError as error:
            problem = str(error)
    actions = [api.actions[aid] for aid in ids] if ids else list(api.actions.values())
    return 200, _waited({"actions": [action_view(a) for a in actions]}, wait, problem)


def _events(api, params, body):
    name = _one(params, "name") or None
    wait = _wait(params)
    count = _number(params, "count", int, 1)
    problem = None
    if wait is not None:
        try:
            api.wait_for_events(count, timeout=wait, name=name)
        except AssertionError as error:
            problem = str(error)
    events = [event_view(e) for e in api.events if name is None or e.event == name]
    return 200, _waited({"events": events}, wait, problem)


def _add_fault(api, params, body):
    request = _body(body)
    kind = request.get("kind")
    route = request.get("route")
    times = request.get("times", 1)
    try:
        if kind == "fail":
            api.fail(route, _status(request.get("status")), times, body=_text(request, "body"),
                     **({"content_type": request["contentType"]} if request.get("contentType") else {}))
        elif kind == "drop":
            api.drop_response(route, times)
        elif kind == "delay":
            seconds = request.get("seconds")
            if not _is_number(seconds) or not 0 <= seconds <= _MAX_WAIT:
                raise _Refused(f"seconds must be a number from 0 to {_MAX_WAIT:g}, not {json.dumps(seconds)}")
            api.delay(route, seconds, times, before=bool(request.get("before", True)))
        else:
            raise _Refused(f"kind must be 'fail', 'drop' or 'delay', not {json.dumps(kind)}")
    except (TypeError, ValueError) as error:
        raise _Refused(str(error)) from None
    return 201, {}


def _clear_faults(api, params, body):
    api.clear_faults()
    return 200, {}


def _reset(api, params, body):
    api.reset()
    return 200, {}


_ROUTES = {
    "": {"GET": _index},
    "/packs": {"GET": _packs},
    "/actions": {"GET": _actions, "POST": _enqueue},
    "/events": {"GET": _events},
    "/faults": {"POST": _add_fault, "DELETE": _clear_faults},
    "/reset": {"POST": _reset},
}


def pack_view(pack):
    """A registered pack as the control routes show it."""
    registered = pack.body if isinstance(pack.body, dict) else {}
    return {"id": pack.id, "name": pack.name, "labels": pack.labels,
            "commands": _names(registered.get("commands")), "events": _names(registered.get("events")),
            "registrations": pack.registrations,
            "lastSeen": pack.last_seen.isoformat(timespec="milliseconds").replace("+00:00", "Z")}


def action_view(action):
    """An action as the control routes show it."""
    return {"id": action.id, "pack": action.pack_name, "labels": action.labels, "command": action.command,
            "input": action.input, "state": action.state, "takenBy": action.taken_by, "takes": action.takes,
            "resultPosts": action.result_posts, "result": action.result}


def event_view(event):
    """A spontaneous event as the control routes show it."""
    return {"pack": event.pack_id, "event": event.event, "payload": event.payload, "createdAt": event.created_at}


def _names(entries):
    return [e.get("name") for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _waited(document, wait, problem):
    if wait is not None:
        document["done"] = problem is None
        if problem is not None:
            document["problem"] = problem
    return document


def _json(status, document, *headers):
    return status, [("Content-Type", "application/json"), *headers], json.dumps(document).encode("utf-8")


def _body(body):
    try:
        request = json.loads(body or b"null")
    except ValueError as error:
        raise _Refused(f"the body is not JSON: {error}") from None
    if not isinstance(request, dict):
        raise _Refused("the body must be a JSON object")
    return request


def _one(params, name):
    values = params.get(name)
    return values[-1] if values else ""


def _number(params, name, kind, default):
    text = _one(params, name)
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise _Refused(f"{name}={text!r} is not a number") from None
    if not (math.isfinite(value) and value >= (1 if kind is int else 0)):
        raise _Refused(f"{name}={text!r} is out of range")
    return value


def _wait(params):
    if "wait" not in params:
        return None
    wait = _number(params, "wait", float, 0.0)
    if wait > _MAX_WAIT:
        raise _Refused(f"wait={wait:g} is more than {_MAX_WAIT:g} seconds")
    return wait


def _status(value):
    if type(value) is not int or not 100 <= value <= 599:
        raise _Refused(f"status must be an HTTP status from 100 to 599, not {json.dumps(value)}")
    return value


def _text(request, key):
    value = request.get(key, "")
    if not isinstance(value, str):
        raise _Refused(f"{key} must be a string, not {json.dumps(value)}")
    return value


def _is_number(value):
    return type(value) in (int, float) and math.isfinite(value)


# --- the client ---------------------------------------------------------------------------------------------------

class ControlError(Exception):
    """A control request failed; ``exit_code`` is what the CLI exits with."""

    def __init__(self, message, exit_code=EX_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


class FakeControl:
    """Talks to the control routes of the fake at *url* (plain HTTP, no proxies, no token: the fake is local).

    Every call takes *wait*: up to that many seconds the fake may take to start listening, besides what the route
    itself waits for.
    """

    def __init__(self, url, timeout=10.0):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ControlError(f"--url {url!r}: expected http://host:port (the fake serves plain HTTP)", EX_CONFIG)
        try:
            self.port = parts.port or 80
        except ValueError:
            raise ControlError(f"--url {url!r}: the port is not a number", EX_CONFIG) from None
        self.url = url.rstrip("/")
        self.host = parts.hostname
        self.base = parts.path.rstrip("/")
        self.timeout = timeout

    def request(self, method, route, query=(), document=None, wait=None):
        """Send one control request and return the decoded answer; raises :class:`ControlError`."""
        import http.client
        from urllib.parse import urlencode

        path = self.base + PREFIX + route + ("?" + urlencode(list(query)) if query else "")
        body = None if document is None else json.dumps(document).encode("utf-8")
        headers = {"Content-Type": "application/json"} if body is not None else {}
        deadline = time.monotonic() + (wait or 0.0)
        while True:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout + (wait or 0.0))
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                status, data = response.status, response.read()
                break
            except ConnectionRefusedError:
                if time.monotonic() >= deadline:
                    raise ControlError(f"cannot reach the fake Flyte API at {self.url}: connection refused (start "
                                       f"it with: flyte-gevent fake-api)", EX_UNAVAILABLE) from None
                time.sleep(0.1)
            except (OSError, http.client.HTTPException) as error:
                raise ControlError(f"cannot reach the fake Flyte API at {self.url}: {error}", EX_UNAVAILABLE) \
                    from None
            finally:
                connection.close()
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        if 200 <= status < 300 and isinstance(answer, dict):
            return answer
        if isinstance(answer, dict) and "error" in answer:
            raise ControlError(answer["error"])
        raise ControlError(f"{self.url} answered {status} to {method} {PREFIX}{route}: it is not a fake Flyte API "
                           f"served by flyte-gevent fake-api", EX_UNAVAILABLE)


# --- the commands -------------------------------------------------------------------------------------------------

_SERVE_OPTIONS = ("host", "port", "latency", "tokens")


def add_commands(parser, formatter_class):
    """Give the ``fake-api`` argparse *parser* its serve options and its subcommands."""
    import argparse

    _serve_arguments(parser, argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="fake_command", metavar="[COMMAND]",
                                     help="what to do; without one, serve (the fake Flyte API, until SIGTERM/SIGINT)")

    serve = commands.add_parser("serve", help="serve the fake Flyte API (the default)",
                                description=parser.description, formatter_class=formatter_class)
    _serve_arguments(serve, argparse.SUPPRESS)

    enqueue = _client_command(commands, formatter_class, "enqueue", "queue an action; prints its id",
                              "Queue a NEW action for packs named PACK (whose labels include --labels), as a flow "
                              "step would, and print its id.")
    # (not dest="command": that is the name of flyte-gevent's own subcommand)
    enqueue.add_argument("action_pack", metavar="PACK", help="the pack name the action is for")
    enqueue.add_argument("action_command", metavar="COMMAND", help="the command to run")
    enqueue.add_argument("input", metavar="INPUT", nargs="?",
                         help="the input, as JSON ('{\"a\": 1}', '\"echo hi\"'), or - to read JSON from stdin; "
                              "default null")
    enqueue.add_argument("--text", metavar="TEXT", help="the input is this string, as it is (instead of INPUT)")
    enqueue.add_argument("--labels", metavar="LABELS",
                         help="labels a pack must have to take it, as key=value[,key=value...]")

    results = _client_command(commands, formatter_class, "results", "print actions with their state and result",
                              "Print actions (those named, else all), one JSON object per line: id, pack, labels, "
                              "command, input, state, takenBy, takes, resultPosts and result (event, payload, "
                              "createdAt). With --wait, first wait until they have all finished; exit 1 if they "
                              "have not, saying why.")
    results.add_argument("ids", metavar="ID", nargs="*", help="action ids (default: every action)")

    events = _client_command(commands, formatter_class, "events", "print the spontaneous events received",
                             "Print the spontaneous events received (named --name, if given), oldest first, one JSON "
                             "object per line: pack, event, payload, createdAt. With --wait, first wait for --count "
                             "of them; exit 1 if they do not come.")
    events.add_argument("--name", metavar="EVENT", help="only events of this name")
    events.add_argument("--count", type=int, default=1, metavar="N", help="how many to wait for (default 1)")

    packs = _client_command(commands, formatter_class, "packs", "print the registered packs",
                            "Print the registered packs, one JSON object per line: id, name, labels, commands, "
                            "events, registrations, lastSeen. With --wait, first wait until NAME (or any pack) "
                            "has registered; exit 1 if it does not.")
    packs.add_argument("name", metavar="NAME", nargs="?", help="only the pack with this id or name")

    fail = _client_command(commands, formatter_class, "fail", "answer requests of a route with an error",
                           "Answer the next requests of ROUTE with STATUS (and --body) instead of processing them. "
                           "ROUTE is one of the fake's routes (take, result, event, register, ...) or 'all'.")
    fail.add_argument("route", metavar="ROUTE", help="the route, or all")
    fail.add_argument("status", metavar="STATUS", type=int, help="the HTTP status to answer with")
    fail.add_argument("--times", type=int, default=1, metavar="N", help="how many requests (default 1)")
    fail.add_argument("--until-cleared", action="store_true", help="every request until clear-faults")
    fail.add_argument("--body", metavar="TEXT", default="", help="the body to answer with, e.g. an HTML page")
    fail.add_argument("--content-type", metavar="TYPE", help="its type (default text/html; charset=utf-8)")

    _client_command(commands, formatter_class, "clear-faults", "remove every fault", "Remove every fault.")
    _client_command(commands, formatter_class, "reset", "forget everything, as a restart on an empty database",
                    "Forget packs, actions, events, recorded requests and faults. Packs still running register "
                    "again on their next request, as after a dead-pack cleanup.")


def _serve_arguments(parser, default):
    parser.add_argument("--host", default=default, help="address to listen on (default 127.0.0.1; the control "
                                                        "routes let anyone who reaches it queue actions)")
    parser.add_argument("--port", type=int, default=default, help="port to listen on, 0 for any (default 8080)")
    parser.add_argument("--latency", type=float, default=default, metavar="SECONDS",
                        help="seconds added to every request")
    parser.add_argument("--token", action="append", dest="tokens", default=default, metavar="TOKEN",
                        help="require Authorization: Bearer TOKEN (repeat to accept several)")


def _client_command(commands, formatter_class, name, summary, description):
    parser = commands.add_parser(name, help=summary, description=description, formatter_class=formatter_class,
                                 epilog="exit codes: 0 done, 1 a wait ran out or the fake refused the request, "
                                        "2 bad usage, 69 the fake cannot be reached, 78 a malformed value")
    parser.add_argument("--url", default=None, metavar="URL",
                        help=f"the fake (default ${URL_VARIABLE}, else {DEFAULT_URL})")
    parser.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                        help="wait up to SECONDS for the fake to start listening and, where the command says so, "
                             "for what it reports")
    return parser


def run(args: "argparse.Namespace") -> int:
    """Run the ``fake-api`` command *args* (from :func:`add_commands`); returns the exit code."""
    command = args.fake_command or "serve"
    if command == "serve":
        code: int = _serve(args)
        return code
    given = [option for option in _SERVE_OPTIONS if hasattr(args, option)]
    if given:
        flag = "--token" if given[0] == "tokens" else f"--{given[0]}"
        print(f"Error: {flag} is an option of serve, not of {command}", file=sys.stderr)
        return EX_USAGE
    try:
        control = FakeControl(args.url or os.environ.get(URL_VARIABLE) or DEFAULT_URL)
        if args.wait is not None and not (math.isfinite(args.wait) and 0 <= args.wait <= _MAX_WAIT):
            raise ControlError(f"--wait {args.wait:g}: expected seconds from 0 to {_MAX_WAIT:g}", EX_CONFIG)
        code = _CLIENT_COMMANDS[command](control, args)
    except ControlError as error:
        print(f"Error: {error}", file=sys.stderr)
        code = error.exit_code
    return code


def _serve(args):
    from .testing import main as serve

    argv = []
    for option in ("host", "port", "latency"):
        if hasattr(args, option):
            argv += [f"--{option}", str(getattr(args, option))]
    for token in getattr(args, "tokens", None) or ():
        argv += ["--token", token]
    return serve(argv)


def _enqueue_command(control, args):
    from . import config

    if args.text is not None:
        if args.input is not None:
            raise ControlError(f"give the input either as INPUT ({_excerpt(args.input)}) or as --text, not both",
                               EX_USAGE)
        value = args.text
    else:
        text = sys.stdin.read() if args.input == "-" else args.input
        try:
            value = None if text is None else json.loads(text)
        except ValueError as error:
            raise ControlError(f"INPUT {_excerpt(text)} is not JSON ({error}); write a string as '\"echo hi\"', "
                               f"or pass it with --text", EX_CONFIG) from None
    labels = None
    if args.labels:
        try:
            labels = config.parse_labels(args.labels)
        except ValueError as error:
            raise ControlError(f"--labels {args.labels!r}: {error}", EX_CONFIG) from None
    document = {"pack": args.action_pack, "command": args.action_command, "input": value, "labels": labels}
    answer = control.request("POST", "/actions", document=document, wait=args.wait)
    print(answer["id"])
    return EX_OK


def _results_command(control, args):
    query = [("id", aid) for aid in args.ids]
    return _print_listing(control.request("GET", "/actions", _with_wait(query, args.wait), wait=args.wait),
                          "actions")


def _events_command(control, args):
    query = [("name", args.name)] if args.name else []
    if args.wait is not None:
        query.append(("count", str(args.count)))
    return _print_listing(control.request("GET", "/events", _with_wait(query, args.wait), wait=args.wait), "events")


def _packs_command(control, args):
    query = [("name", args.name)] if args.name else []
    return _print_listing(control.request("GET", "/packs", _with_wait(query, args.wait), wait=args.wait), "packs")


def _fail_command(control, args):
    if args.times < 1:
        raise ControlError(f"--times {args.times}: expected at least 1", EX_CONFIG)
    document = {"kind": "fail", "route": None if args.route == "all" else args.route, "status": args.status,
                "times": None if args.until_cleared else args.times, "body": args.body}
    if args.content_type:
        document["contentType"] = args.content_type
    control.request("POST", "/faults", document=document, wait=args.wait)
    return EX_OK


def _clear_faults_command(control, args):
    control.request("DELETE", "/faults", wait=args.wait)
    return EX_OK


def _reset_command(control, args):
    control.request("POST", "/reset", wait=args.wait)
    return EX_OK


_CLIENT_COMMANDS = {"enqueue": _enqueue_command, "results": _results_command, "events": _events_command,
                    "packs": _packs_command, "fail": _fail_command, "clear-faults": _clear_faults_command,
                    "reset": _reset_command}


def _with_wait(query, wait):
    return query + [("wait", repr(wait))] if wait is not None else query


def _print_listing(answer, key):
    for item in answer[key]:
        print(json.dumps(item, ensure_ascii=False))
    if answer.get("done", True):
        return EX_OK
    print(f"Error: {answer.get('problem')}", file=sys.stderr)
    return EX_FAILED


def _excerpt(text, limit=40):
    return repr(text if len(text) <= limit else text[:limit] + "...")
