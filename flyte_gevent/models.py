"""The vocabulary of a pack: event definitions, events, commands and the pack definition.

These are plain objects with no I/O. :class:`EventDef`, :class:`Command` and
:class:`PackDef` check their arguments when they are made, so a mistake raises
:class:`~flyte_gevent.errors.PackDefError` at the line that made it, naming what
is wrong. The checks are those of the Flyte server: what it would refuse, and
what it would turn into broken links. :meth:`PackDef.validate` runs them again
before anything is sent (a definition's lists and dicts are public and may have
changed since), with the same messages.
"""

import collections.abc
import dataclasses
import logging
import math
import re
import string
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeAlias, TypedDict, TypeVar, Unpack, overload

from marshmallow import Schema, ValidationError
from marshmallow import validate as validators

from .errors import PackDefError

if TYPE_CHECKING:
    from .health import Health
    from .pack import Pack

__all__ = ["FATAL", "JSON", "Action", "Command", "Event", "EventDef", "EventDefs", "Handler", "HealthCheck", "Hook",
           "PackDef", "SchemaArg", "fatal_event", "pack_id"]

JSON: TypeAlias = dict[str, "JSON"] | list["JSON"] | str | int | float | bool | None
"""A decoded JSON value: what an action's input is, and what a payload is when it is not a dataclass."""

if TYPE_CHECKING:
    # A bare ``Event`` means ``Event[Any]`` to a checker, even a strict one. A TypeVar default needs
    # typing_extensions before Python 3.13, so the default exists only where checkers look.
    from typing_extensions import TypeVar as _TypeVarWithDefault

    P = _TypeVarWithDefault("P", default=Any)
else:
    P = TypeVar("P")

Handler: TypeAlias = "Callable[[Any], Event[Any]]"
"""A command's handler: called with the action's input (decoded JSON, or what the input schema loaded)."""

Hook: TypeAlias = "Callable[[Pack], object]"
"""An :meth:`PackDef.on_start` or :meth:`PackDef.on_stop` hook, or a :meth:`PackDef.background` task."""

HealthCheck: TypeAlias = "Callable[[Pack], tuple[str, Health]]"
"""A :meth:`PackDef.health_check`: called with the pack, returns a name and a :class:`~flyte_gevent.Health`."""

EventDefs: TypeAlias = "EventDef | str | Iterable[EventDef | str]"
"""Event definitions as commands and pack definitions take them: a list of them or of names, or a single one."""

SchemaArg: TypeAlias = "Schema | type[Schema] | None"
"""A marshmallow schema as commands and event definitions take it: an instance, a class, or none."""

_H = TypeVar("_H", bound=Handler)
_K = TypeVar("_K", bound=Hook)
_C = TypeVar("_C", bound=HealthCheck)
_T = TypeVar("_T")

log = logging.getLogger(__name__)

# The server puts pack ids (name and labels) into link paths and command names
# into a query string, verbatim. These are the characters that survive that
# unescaped (RFC 3986 pchar without '%', and the unreserved set for queries).
_ALPHANUMERIC = string.ascii_letters + string.digits
_PATH_SAFE = frozenset(_ALPHANUMERIC + "._~!$&'()*+,;=:@-")
_QUERY_SAFE = frozenset(_ALPHANUMERIC + "-._~")
_IN_LINKS = "links unescaped (ASCII letters, digits and ._~!$&'()*+,;=:@-)"
_IN_QUERY = "a query string unescaped (ASCII letters, digits and -._~)"
# The server's reserved-rel check (flyte pack/handler.go): deliberately unanchored
# for "up" and "self", so rels such as "support" or "setup" are refused too.
_RESERVED_REL = re.compile(r"up|self|/actionResult$|/takeAction$|/event$")


def is_path_safe(text: object) -> bool:
    """Whether *text* is non-empty and survives unescaped in a URL path (pack names, label keys and values)."""
    return isinstance(text, str) and bool(text) and not _unsafe(text, _PATH_SAFE)


def path_problem(*texts: str) -> str | None:
    """Why *texts* cannot go unescaped into a link path, or ``None`` when they can.

    The answer names the offending characters:
    ``"holds ' ', 'ü', outside the characters Flyte can put into links unescaped (...)"``.
    Only characters are checked; an empty text passes.
    """
    bad = _unsafe("".join(texts), _PATH_SAFE)
    return _outside(bad, _IN_LINKS) if bad else None


def _unsafe(text: str, safe: Iterable[str]) -> str:
    """The characters of *text* outside *safe*, each once in order of appearance, as ``"' ', 'ü'"``."""
    return ", ".join(repr(c) for c in dict.fromkeys(text) if c not in safe)


def _outside(bad: str, where: str) -> str:
    return f"holds {bad}, outside the characters Flyte can put into {where}"


def _text_problem(what: str, text: object, safe: Iterable[str], where: str,
                  allow_empty: bool = False) -> str | None:
    """Why *text* cannot be *what* (a name Flyte puts into a URL unescaped), or ``None``."""
    if not isinstance(text, str):
        return f"{what} must be a string, not {type(text).__name__}"
    if not text:
        return None if allow_empty else f"{what} must not be empty"
    bad = _unsafe(text, safe)
    return f"{what} {_outside(bad, where)}" if bad else None


def _url_problems(what: str, url: object) -> list[str]:
    if url is None:
        return []
    if not isinstance(url, str):  # the validator would raise TypeError
        return [f"{what} {url!r} is not an http(s) URL"]
    try:
        validators.URL(require_tld=False, schemes={"http", "https"})(url)
    except ValidationError:
        return [f"{what} {url!r} is not an http(s) URL"]
    return []


def _as_schema(schema: object) -> object:
    """A marshmallow Schema class becomes an instance; anything else is returned as it is (and refused)."""
    if isinstance(schema, type) and issubclass(schema, Schema):
        return schema()
    return schema


def _schema_problems(what: str, schema: object) -> list[str]:
    if schema is None or isinstance(schema, Schema):
        return []
    kind = schema.__name__ if isinstance(schema, type) else type(schema).__name__
    return [f"{what} must be a marshmallow Schema (class or instance), not {kind}"]


def _as_list(value: object, single: type) -> list[Any]:
    """*value* as a list: ``None`` is empty, and a lone *single* instance or str is a list of one.

    A str is iterable, so ``output_events="Done"`` would otherwise be the events D, o, n and e.
    """
    if value is None:
        return []
    if isinstance(value, (str, single)) or not isinstance(value, collections.abc.Iterable):
        return [value]
    return list(value)


@dataclasses.dataclass(frozen=True)
class EventDef:
    """An event a pack can emit, declared once and shared by commands and spontaneous sends.

    :param name: the event name flows match on.
    :param help_url: optional documentation link, registered as a ``help`` link.
    :param payload_schema: optional marshmallow schema (class or instance): payloads
        of this event are dumped through it and must then load back cleanly, so a
        missing required field or a value its validators refuse is caught before
        sending (see :func:`~flyte_gevent.schemas.encode_event`). A class is
        instantiated once, here.
    :raises PackDefError: the name is empty or not a string, the help URL is not
        http(s), or the schema is not a marshmallow Schema.
    """

    name: str
    help_url: str | None = None
    # A class given here is an instance once made.
    payload_schema: Schema | type[Schema] | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        schema = _as_schema(self.payload_schema)
        problems = _event_def_problems(self) + _schema_problems(f"event {self.name!r}: payload_schema", schema)
        if problems:
            raise PackDefError("; ".join(problems))
        object.__setattr__(self, "payload_schema", schema)


def _event_def_problems(event_def: EventDef) -> list[str]:
    if not isinstance(event_def.name, str):
        return [f"event name {event_def.name!r} must be a string, not {type(event_def.name).__name__}"]
    problems = [] if event_def.name else ["an event definition has an empty name"]
    return problems + _url_problems(f"event {event_def.name!r} help_url", event_def.help_url)


def _event_defs(value: object) -> list[EventDef]:
    return [EventDef(e) if isinstance(e, str) else e for e in _as_list(value, EventDef)]


FATAL = EventDef("FATAL")
"""The event that marks an action as failed on the Flyte server."""


class Event(Generic[P]):
    """An event to send: a result of a command, or a spontaneous event.

    :param event_def: an :class:`EventDef` (or a bare event name).
    :param payload: any JSON-compatible value; dataclasses are converted, and
        integers beyond 2**53 travel as strings (Flyte decodes numbers as floats).
        When the event has a ``payload_schema``, a dict, dataclass or other
        object the schema dumps.

    Usage::

        created = EventDef("IssueCreated")
        return Event(created, {"issueId": "FOO-1"})
    """

    __slots__ = ("event_def", "payload")
    __hash__: ClassVar[None]  # type: ignore[assignment]  # equal events may hold unhashable payloads

    event_def: EventDef
    payload: P

    @overload
    def __init__(self: "Event[None]", event_def: EventDef | str) -> None: ...
    @overload
    def __init__(self, event_def: EventDef | str, payload: P) -> None: ...

    def __init__(self, event_def: EventDef | str, payload: Any = None) -> None:
        if isinstance(event_def, str):
            event_def = EventDef(event_def)
        elif not isinstance(event_def, EventDef):
            raise TypeError(f"Event needs an EventDef or an event name, not {type(event_def).__name__}")
        self.event_def = event_def
        self.payload = payload

    @property
    def name(self) -> str:
        """The event's name (its definition's)."""
        return self.event_def.name

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return self.name == other.name and self.payload == other.payload

    def __repr__(self) -> str:
        return f"Event({self.name!r}, {self.payload!r})"


def fatal_event(payload: P) -> Event[P]:
    """An event that completes an action as failed (``FATAL``) with *payload*."""
    return Event(FATAL, payload)


class Command:
    """A command the pack handles: a name, a handler and the events it may emit.

    :param name: the command name flows call.
    :param handler: ``handler(input) -> Event``; *input* is the action's decoded
        JSON (dict, list, str, number or None), or what ``input_schema`` loaded.
        An exception raised by the handler completes the action as ``FATAL``.
    :param output_events: the events the handler may return: :class:`EventDef`
        objects or event names, in a list — or a single one.
    :param help_url: optional documentation link.
    :param input_schema: optional marshmallow schema (class or instance): input
        is validated and loaded before the handler runs.
    :param failure_event: optional :class:`EventDef` (or name) used instead of
        ``FATAL`` when the input does not pass ``input_schema`` (added to
        ``output_events``); its payload is the same text as the FATAL one.
    :param timeout: seconds after which a running handler is killed and the
        action completed as ``FATAL`` ("timed out after N s"); overrides the
        pack's default.
    :param rerun_after_crash: with a journal (``Pack(journal=...)``), an action
        whose handler was cut short by the death of the process running it is
        run again by the next process to start, instead of being completed as
        ``FATAL`` "pack restarted while this action was running". Declare it
        only for handlers that may safely run twice on the same input. A re-run
        cut short the same way is completed as ``FATAL``.
    :raises PackDefError: an argument is wrong (a name Flyte cannot put into its
        links, a handler that is not callable, ...); the message says which.
    """

    def __init__(self, name: str, handler: Handler, output_events: EventDefs = (), help_url: str | None = None, *,
                 input_schema: SchemaArg = None, failure_event: EventDef | str | None = None,
                 timeout: float | None = None, rerun_after_crash: bool = False) -> None:
        self.name = name
        self.handler = handler
        self.output_events: tuple[EventDef, ...] = tuple(_event_defs(output_events))
        self.help_url = help_url
        self.input_schema: Schema | None = _as_schema(input_schema)  # type: ignore[assignment]  # checked below
        if isinstance(failure_event, str):
            failure_event = EventDef(failure_event)
        self.failure_event = failure_event
        if isinstance(failure_event, EventDef) and failure_event.name not in {
                e.name for e in self.output_events if isinstance(e, EventDef)}:
            # The command can emit it, so it is registered among the command's events.
            self.output_events += (failure_event,)
        self.timeout = timeout
        self.rerun_after_crash = rerun_after_crash
        problems = _command_problems(self)
        if problems:
            raise PackDefError("; ".join(problems))

    def __repr__(self) -> str:
        return f"Command({self.name!r})"


class CommandOptions(TypedDict, total=False):
    """The keyword-only options of :class:`Command`, as :meth:`PackDef.command` passes them on."""

    input_schema: SchemaArg
    failure_event: EventDef | str | None
    timeout: float | None
    rerun_after_crash: bool


def _command_problems(command: Command) -> list[str]:
    name = command.name
    problems = [p for p in [_text_problem(f"command name {name!r}", name, _QUERY_SAFE, _IN_QUERY)] if p]
    if not callable(command.handler):
        problems.append(f"command {name!r}: handler is not callable")
    wrong = dict.fromkeys(type(e).__name__ for e in command.output_events if not isinstance(e, EventDef))
    if wrong:
        problems.append(f"command {name!r}: output events must be EventDef objects or event names, "
                        f"not {', '.join(wrong)}")
    problems += _schema_problems(f"command {name!r}: input_schema", command.input_schema)
    if command.failure_event is not None and not isinstance(command.failure_event, EventDef):
        problems.append(f"command {name!r}: failure_event must be an EventDef or an event name, "
                        f"not {type(command.failure_event).__name__}")
    elif command.failure_event is not None and command.failure_event.payload_schema is not None:
        problems.append(f"command {name!r}: failure_event {command.failure_event.name!r} must not have a "
                        "payload_schema (its payload is the text listing the input's problems)")
    timeout = command.timeout
    if timeout is not None and not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
                                    and 0 < timeout < math.inf):
        problems.append(f"command {name!r}: timeout must be a positive number of seconds, not {timeout!r}")
    if not isinstance(command.rerun_after_crash, bool):
        problems.append(f"command {name!r}: rerun_after_crash must be True or False, "
                        f"not {command.rerun_after_crash!r}")
    return problems + _url_problems(f"command {name!r} help_url", command.help_url)


def pack_id(name: str, labels: Mapping[str, str] | None = None) -> str:
    """The id the Flyte server gives a pack (``pack/pack.go`` ``generateId``).

    The name, then ``.key.value`` for each label in byte-wise sorted key order.
    Nothing is escaped, so dots in keys or values can make two packs collide:
    ``pack_id("a", {"b": "c.d"}) == pack_id("a", {"b.c": "d"})``.
    """
    parts = [name]
    labels = labels or {}
    for key in sorted(labels, key=lambda k: k.encode()):
        parts.append(f".{key}.{labels[key]}")
    return "".join(parts)


class PackDef:
    """What a pack registers with Flyte, and what it runs besides its commands.

    It registers a name, labels, commands, events and a help link. It also
    declares, with decorators, what every :class:`~flyte_gevent.Pack` built from
    it runs — whichever runner builds the pack (a script's
    :meth:`~flyte_gevent.Pack.from_env`, ``flyte-gevent run``, the gunicorn
    hooks, the testing kit): :meth:`on_start` and :meth:`on_stop` hooks,
    :meth:`background` tasks and health checks (:meth:`health_check`). Each is
    called with the running :class:`~flyte_gevent.Pack`; the decorators say when
    each runs and what a failure does.

    :param name: the pack name; actions are addressed to it.
    :param help_url: optional link to the pack's documentation.
    :param commands: :class:`Command` objects (or a single one).
    :param event_defs: event definitions (or names; or a single one) for
        spontaneous events; command output events are added automatically.
    :param labels: routing labels as a dict of strings; an action reaches this
        pack when its labels are a subset of these.
    :param links: optional extra pack-level links as ``{rel: href}``.
    :raises PackDefError: the definition would be refused by the Flyte server or
        break its links; the one-line message lists every problem.

    :ivar start_hooks: the :meth:`on_start` hooks, in declaration order (a plain
        list, like :attr:`commands`); likewise :attr:`stop_hooks`,
        :attr:`background_tasks` and :attr:`health_checks`.

    Commands can also be added with the :meth:`command` decorator::

        pack_def = PackDef("JiraPack", help_url="https://example.com/jira-pack")

        @pack_def.command("createIssue", output_events=[created])
        def create_issue(input):
            return Event(created, {"issueId": "FOO-1"})

        @pack_def.background
        def sync_projects(pack):          # runs while the pack does
            while True:
                pack.send_event_nowait(Event(synced, projects.refresh()))
                gevent.sleep(300)
    """

    def __init__(self, name: str, help_url: str | None = None, commands: Command | Iterable[Command] = (),
                 event_defs: EventDefs = (), labels: Mapping[str, str] | None = None,
                 links: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.help_url = help_url
        self.commands: list[Command] = _as_list(commands, Command)
        self.event_defs: list[EventDef] = _event_defs(event_defs)
        # Anything but a mapping is kept as it is, for _problems() to refuse.
        self.labels: dict[str, str] = _as_dict(labels)
        self.links: dict[str, str] = _as_dict(links)
        self.start_hooks: list[Hook] = []
        self.stop_hooks: list[Hook] = []
        self.background_tasks: list[Hook] = []
        self.health_checks: list[HealthCheck] = []
        self._raise_problems()

    def __repr__(self) -> str:
        return f"PackDef({self.name!r}, labels={self.labels!r}, commands={[c.name for c in self.commands]!r})"

    @property
    def id(self) -> str:
        """The pack id the Flyte server will assign (see :func:`pack_id`)."""
        return pack_id(self.name, self.labels)

    def command(self, name: str, output_events: EventDefs = (), help_url: str | None = None,
                **options: Unpack[CommandOptions]) -> Callable[[_H], _H]:
        """Decorator form of :class:`Command`; registers the function as the handler of *name*.

        :raises PackDefError: when applied, if an argument is wrong or the pack
            already has a command of that name.
        """
        if callable(name) and not isinstance(name, str):
            # Used bare (@pack_def.command), it would replace the function with the decorator.
            raise PackDefError(f"pack_def.command needs the command's name: write "
                               f"@pack_def.command(\"{getattr(name, '__name__', 'name')}\", output_events=[...]), "
                               "not @pack_def.command")

        def decorate(handler: _H) -> _H:
            command = Command(name, handler, output_events, help_url, **options)
            if any(isinstance(c, Command) and c.name == command.name for c in self.commands):
                raise PackDefError(_invalid(self.name, [_defined_twice(command.name)]))
            self.commands.append(command)
            return handler
        return decorate

    @overload
    def on_start(self, function: _K) -> _K: ...
    @overload
    def on_start(self, function: None = None) -> Callable[[_K], _K]: ...

    def on_start(self, function: _K | None = None) -> _K | Callable[[_K], _K]:
        """Decorator: call ``function(pack)`` when the pack has registered, before it takes its first action.

        Hooks run one after the other in declaration order, before the
        background tasks start. One that raises fails the start: the later ones
        do not run, the pack stops (running the :meth:`on_stop` hooks) and
        ``start()`` raises the hook's exception.

        :raises PackDefError: *function* is not callable or is already an on_start hook.
        """
        return self._declare("on_start", self.start_hooks, function)

    @overload
    def on_stop(self, function: _K) -> _K: ...
    @overload
    def on_stop(self, function: None = None) -> Callable[[_K], _K]: ...

    def on_stop(self, function: _K | None = None) -> _K | Callable[[_K], _K]:
        """Decorator: call ``function(pack)`` when the pack stops, once its running handlers have finished.

        Runs whenever the :meth:`on_start` hooks were called (a failed start
        included), in reverse declaration order, within the shutdown's flush
        period; an exception is logged and the next hook still runs.

        :raises PackDefError: *function* is not callable or is already an on_stop hook.
        """
        return self._declare("on_stop", self.stop_hooks, function)

    @overload
    def background(self, function: _K) -> _K: ...
    @overload
    def background(self, function: None = None) -> Callable[[_K], _K]: ...

    def background(self, function: _K | None = None) -> _K | Callable[[_K], _K]:
        """Decorator: run ``function(pack)`` in a greenlet the pack owns, from its start until its stop begins.

        For loops that send spontaneous events or keep something fresh. It
        starts after the :meth:`on_start` hooks and is killed (``GreenletExit``)
        as soon as a stop begins. If it raises, the exception is logged with its
        traceback and the task runs again after a backoff (1 s doubling to 60 s);
        if it returns, it is done.

        :raises PackDefError: *function* is not callable or is already a background task.
        """
        return self._declare("background", self.background_tasks, function)

    @overload
    def health_check(self, function: _C) -> _C: ...
    @overload
    def health_check(self, function: None = None) -> Callable[[_C], _C]: ...

    def health_check(self, function: _C | None = None) -> _C | Callable[[_C], _C]:
        """Decorator: add ``function(pack) -> (name, Health)`` to the pack's health checks.

        It joins the checks given as ``Pack(health_checks=...)`` in the health
        server's JSON, under the name it returns (under its ``__name__`` when it
        raises, hangs or returns something else).

        :raises PackDefError: *function* is not callable or is already a health check.
        """
        return self._declare("health_check", self.health_checks, function)

    def _declare(self, kind: str, hooks: list[Any], function: _T | None) -> _T | Callable[[_T], _T]:
        if function is None:  # used with parentheses: @pack_def.on_start()
            def decorate(function: _T) -> _T:
                return self._declare(kind, hooks, function)  # type: ignore[return-value]  # not None: _T
            return decorate
        problems = _hook_problems(kind, [*hooks, function])
        if problems:
            raise PackDefError(_invalid(self.name, problems))
        hooks.append(function)
        return function

    def with_labels(self, labels: Mapping[str, str]) -> "PackDef":
        """A copy of this definition with *labels* merged over its own, hooks included.

        :raises PackDefError: *labels* is not a dict of strings Flyte can put into links.
        """
        if not isinstance(labels, collections.abc.Mapping):
            raise PackDefError(_invalid(self.name, [_not_a_dict("labels", labels)]))
        copy = PackDef(self.name, self.help_url, self.commands, self.event_defs, {**self.labels, **labels},
                       self.links)
        for attribute in _HOOK_LISTS.values():
            setattr(copy, attribute, list(getattr(self, attribute)))
        return copy

    def all_event_defs(self) -> list[EventDef]:
        """Event definitions to register: the pack's own, then each command's, once per name.

        The order is the declaration order, so the registration body is the same
        on every run. When two definitions share a name, the pack-level one wins.
        """
        seen: dict[str, EventDef] = {}
        for event_def in self.event_defs:
            seen.setdefault(event_def.name, event_def)
        for command in self.commands:
            for event_def in command.output_events:
                seen.setdefault(event_def.name, event_def)
        return list(seen.values())

    def validate(self) -> None:
        """Raise :class:`PackDefError` listing every problem; log a warning for id collisions.

        The definition was checked when it was made; this checks it again as it
        is now (after, say, ``pack_def.commands.append(...)``), with the same
        messages: an empty name, characters that break the unescaped links,
        reserved link rels, duplicate or handler-less commands, and malformed
        help URLs. ``start()`` and ``flyte-gevent check`` call it.
        """
        self._raise_problems()
        dotted = [k for k, v in self.labels.items() if "." in k or "." in v]
        if dotted or "." in self.name:
            log.warning("pack %r: dots in the name or labels %s can make two packs share an id (%r)",
                        self.name, dotted, self.id)

    def _raise_problems(self) -> None:
        problems = self._problems()
        if problems:
            raise PackDefError(_invalid(self.name, problems))

    def _problems(self) -> list[str]:
        problems: list[str | None] = [_text_problem(f"pack name {self.name!r}", self.name, _PATH_SAFE, _IN_LINKS)]
        if not isinstance(self.labels, collections.abc.Mapping):
            problems.append(_not_a_dict("labels", self.labels))
        else:
            for key, value in self.labels.items():
                problems.append(_text_problem(f"label key {key!r}", key, _PATH_SAFE, _IN_LINKS))
                problems.append(_text_problem(f"label {key}={value!r}: the value", value, _PATH_SAFE, _IN_LINKS,
                                              allow_empty=True))
        seen: set[str] = set()
        twice: set[str] = set()
        for command in self.commands:
            if not isinstance(command, Command):
                problems.append(f"commands must be Command objects, got {type(command).__name__}")
                continue
            problems.extend(_command_problems(command))
            if isinstance(command.name, str):
                if command.name in seen and command.name not in twice:
                    problems.append(_defined_twice(command.name))
                    twice.add(command.name)
                seen.add(command.name)
        for event_def in self.event_defs:
            if not isinstance(event_def, EventDef):
                problems.append(f"event_defs must be EventDef objects or event names, got {type(event_def).__name__}")
        for kind, attribute in _HOOK_LISTS.items():
            problems.extend(_hook_problems(kind, getattr(self, attribute)))
        problems.extend(_url_problems("help_url", self.help_url))
        if not isinstance(self.links, collections.abc.Mapping):
            problems.append(_not_a_dict("links", self.links))
        else:
            for rel, href in self.links.items():
                if not isinstance(rel, str) or not rel:
                    problems.append(_text_problem(f"link rel {rel!r}", rel, (), ""))
                elif _RESERVED_REL.search(rel):
                    problems.append(
                        f"link rel {rel!r} is refused by the Flyte server (it matches "
                        f"'{_RESERVED_REL.pattern}', which catches any rel containing 'up' or 'self')")
                problems.extend(_url_problems(f"link {rel!r}", href))
        return [p for p in problems if p]


# Each decorator of PackDef, and the list it adds to.
_HOOK_LISTS = {"on_start": "start_hooks", "on_stop": "stop_hooks", "background": "background_tasks",
               "health_check": "health_checks"}


def _hook_problems(kind: str, hooks: object) -> list[str]:
    """What is wrong with the *kind* hooks *hooks*: any that is not callable, any listed twice."""
    if not isinstance(hooks, list):
        return [f"{_HOOK_LISTS[kind]} must be a list, not {type(hooks).__name__}"]
    problems: list[str] = []
    seen: set[int] = set()
    for hook in hooks:
        if not callable(hook):
            problems.append(f"{kind}: {hook!r} is not callable")
        elif id(hook) in seen:
            problems.append(f"{kind} hook {hook_name(hook)!r} is declared twice")
        seen.add(id(hook))
    return problems


def hook_name(hook: object) -> str:
    """The name a hook is logged and reported under: its ``__name__``, else its type's."""
    return getattr(hook, "__name__", None) or type(hook).__name__


def _as_dict(value: Any) -> Any:
    """A mapping as a new dict, ``None`` as an empty one; anything else as it is, for the checks to refuse."""
    if isinstance(value, collections.abc.Mapping):
        return dict(value)
    return {} if value is None else value


def _invalid(name: object, problems: Iterable[str]) -> str:
    return f"invalid pack definition {name!r}: " + "; ".join(problems)


def _defined_twice(name: str) -> str:
    return f"command {name!r} is defined twice"


def _not_a_dict(what: str, value: object) -> str:
    return f"{what} must be a dict, not {type(value).__name__}"


@dataclasses.dataclass(frozen=True, slots=True)
class Action:
    """An action taken from Flyte: which command to run, its input, and where its result goes.

    :ivar id: the action id (from the result URL; Flyte sends it nowhere else).
    :ivar command: the command name.
    :ivar input: the decoded JSON input.
    :ivar result_url: the URL the result is posted to.
    """

    id: str
    command: str
    input: JSON
    result_url: str
