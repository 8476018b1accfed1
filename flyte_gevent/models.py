"""The vocabulary of a pack: event definitions, events, commands and the pack definition.

These are plain objects with no I/O. A :class:`PackDef` describes what a pack
registers with Flyte; :meth:`PackDef.validate` refuses, before anything is sent,
the definitions the Flyte server would reject or turn into broken links.
"""

import dataclasses
import logging
import re

from .errors import PackDefError

__all__ = ["EventDef", "Event", "Command", "PackDef", "Action", "FATAL", "fatal_event", "pack_id"]

log = logging.getLogger(__name__)

# The server puts pack ids (name and labels) into link paths and command names
# into a query string, verbatim. These are the characters that survive that
# unescaped (RFC 3986 pchar without '%', and the unreserved set for queries).
_PATH_SAFE = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@-]+$")
_QUERY_SAFE = re.compile(r"^[A-Za-z0-9._~-]+$")
# The server's reserved-rel check (flyte pack/handler.go): deliberately unanchored
# for "up" and "self", so rels such as "support" or "setup" are refused too.
_RESERVED_REL = re.compile(r"up|self|/actionResult$|/takeAction$|/event$")


def is_path_safe(text):
    """Whether *text* is non-empty and survives unescaped in a URL path (pack names, label keys and values)."""
    return isinstance(text, str) and bool(_PATH_SAFE.match(text))


@dataclasses.dataclass(frozen=True)
class EventDef:
    """An event a pack can emit, declared once and shared by commands and spontaneous sends.

    :param name: the event name flows match on.
    :param help_url: optional documentation link, registered as a ``help`` link.
    :param payload_schema: optional marshmallow schema (class or instance) that
        payloads of this event are dumped through before sending.
    """

    name: str
    help_url: str | None = None
    payload_schema: object = dataclasses.field(default=None, compare=False, repr=False)


FATAL = EventDef("FATAL")
"""The event that marks an action as failed on the Flyte server."""


class Event:
    """An event to send: a result of a command, or a spontaneous event.

    :param event_def: an :class:`EventDef` (or a bare event name).
    :param payload: any JSON-compatible value; dataclasses are converted, and
        integers beyond 2**53 travel as strings (Flyte decodes numbers as floats).

    Usage::

        created = EventDef("IssueCreated")
        return Event(created, {"issueId": "FOO-1"})
    """

    __slots__ = ("event_def", "payload")

    def __init__(self, event_def, payload=None):
        if isinstance(event_def, str):
            event_def = EventDef(event_def)
        elif not isinstance(event_def, EventDef):
            raise TypeError(f"Event needs an EventDef or an event name, not {type(event_def).__name__}")
        self.event_def = event_def
        self.payload = payload

    @property
    def name(self):
        return self.event_def.name

    def __eq__(self, other):
        if not isinstance(other, Event):
            return NotImplemented
        return self.name == other.name and self.payload == other.payload

    def __repr__(self):
        return f"Event({self.name!r}, {self.payload!r})"


def fatal_event(payload):
    """An event that completes an action as failed (``FATAL``) with *payload*."""
    return Event(FATAL, payload)


class Command:
    """A command the pack handles: a name, a handler and the events it may emit.

    :param name: the command name flows call.
    :param handler: ``handler(input) -> Event``; *input* is the action's decoded
        JSON (dict, list, str, number or None), or what ``input_schema`` loaded.
        An exception raised by the handler completes the action as ``FATAL``.
    :param output_events: the :class:`EventDef` objects the handler may return.
    :param help_url: optional documentation link.
    :param input_schema: optional marshmallow schema (class or instance): input
        is validated and loaded before the handler runs.
    :param failure_event: optional :class:`EventDef` used instead of ``FATAL``
        when the input does not pass ``input_schema`` (added to ``output_events``);
        its payload is the same text as the FATAL one.
    :param timeout: seconds after which a running handler is killed and the
        action completed as ``FATAL`` ("timed out after N s"); overrides the
        pack's default.
    """

    def __init__(self, name, handler, output_events=(), help_url=None, *,
                 input_schema=None, failure_event=None, timeout=None):
        self.name = name
        self.handler = handler
        self.output_events = tuple(EventDef(e) if isinstance(e, str) else e for e in output_events)
        self.help_url = help_url
        self.input_schema = _schema_instance(input_schema)
        if isinstance(failure_event, str):
            failure_event = EventDef(failure_event)
        self.failure_event = failure_event
        if failure_event is not None and failure_event.name not in {e.name for e in self.output_events}:
            # The command can emit it, so it is registered among the command's events.
            self.output_events += (failure_event,)
        self.timeout = timeout

    def __repr__(self):
        return f"Command({self.name!r})"


def _schema_instance(schema):
    if isinstance(schema, type):
        return schema()
    return schema


def pack_id(name, labels=None):
    """The id the Flyte server gives a pack (``pack/pack.go`` ``generateId``).

    The name, then ``.key.value`` for each label in byte-wise sorted key order.
    Nothing is escaped, so dots in keys or values can make two packs collide:
    ``pack_id("a", {"b": "c.d"}) == pack_id("a", {"b.c": "d"})``.
    """
    parts = [name]
    for key in sorted(labels or {}, key=lambda k: k.encode()):
        parts.append(f".{key}.{labels[key]}")
    return "".join(parts)


class PackDef:
    """What a pack registers with Flyte: name, labels, commands, events and help link.

    :param name: the pack name; actions are addressed to it.
    :param help_url: optional link to the pack's documentation.
    :param commands: :class:`Command` objects.
    :param event_defs: event definitions for spontaneous events (command output
        events are added automatically).
    :param labels: routing labels; an action reaches this pack when its labels
        are a subset of these.
    :param links: optional extra pack-level links as ``{rel: href}``.

    Commands can also be added with the :meth:`command` decorator::

        pack_def = PackDef("JiraPack", help_url="https://example.com/jira-pack")

        @pack_def.command("createIssue", output_events=[created])
        def create_issue(input):
            return Event(created, {"issueId": "FOO-1"})
    """

    def __init__(self, name, help_url=None, commands=(), event_defs=(), labels=None, links=None):
        self.name = name
        self.help_url = help_url
        self.commands = list(commands)
        self.event_defs = [EventDef(e) if isinstance(e, str) else e for e in event_defs]
        self.labels = dict(labels or {})
        self.links = dict(links or {})

    def __repr__(self):
        return f"PackDef({self.name!r}, labels={self.labels!r}, commands={[c.name for c in self.commands]!r})"

    @property
    def id(self):
        """The pack id the Flyte server will assign (see :func:`pack_id`)."""
        return pack_id(self.name, self.labels)

    def command(self, name, output_events=(), help_url=None, **options):
        """Decorator form of :class:`Command`; registers the function as the handler of *name*."""
        def decorate(handler):
            self.commands.append(Command(name, handler, output_events, help_url, **options))
            return handler
        return decorate

    def with_labels(self, labels):
        """A copy of this definition with *labels* merged over its own."""
        copy = PackDef(self.name, self.help_url, self.commands, self.event_defs, self.labels, self.links)
        copy.labels.update(labels)
        return copy

    def all_event_defs(self):
        """Event definitions to register: the pack's own, then each command's, once per name.

        The order is the declaration order, so the registration body is the same
        on every run. When two definitions share a name, the pack-level one wins.
        """
        seen = {}
        for event_def in self.event_defs:
            seen.setdefault(event_def.name, event_def)
        for command in self.commands:
            for event_def in command.output_events:
                seen.setdefault(event_def.name, event_def)
        return list(seen.values())

    def validate(self):
        """Raise :class:`PackDefError` listing every problem; log a warning for id collisions.

        Checks what the Flyte server would refuse or mangle: an empty name,
        characters that break the unescaped links, reserved link rels, duplicate
        or handler-less commands, and malformed help URLs.
        """
        problems = []
        if not is_path_safe(self.name):
            problems.append(f"pack name {self.name!r} must be non-empty, without spaces or any of / ? # % \" < >")
        for key, value in self.labels.items():
            if not is_path_safe(key):
                problems.append(f"label key {key!r} must be non-empty, without spaces or any of / ? # % \" < >")
            if not isinstance(value, str) or (value and not is_path_safe(value)):
                problems.append(f"label {key}={value!r}: the value must not hold spaces or any of / ? # % \" < >")
        seen = set()
        for command in self.commands:
            if not isinstance(command, Command):
                problems.append(f"commands must be Command objects, got {type(command).__name__}")
                continue
            if not isinstance(command.name, str) or not _QUERY_SAFE.match(command.name):
                problems.append(f"command name {command.name!r} must be non-empty and use only letters, digits "
                                "and -._~")
            if command.name in seen:
                problems.append(f"command {command.name!r} is defined twice")
            seen.add(command.name)
            if not callable(command.handler):
                problems.append(f"command {command.name!r}: handler is not callable")
            for event_def in command.output_events:
                if not isinstance(event_def, EventDef):
                    problems.append(f"command {command.name!r}: output events must be EventDef objects")
            if command.input_schema is not None and not callable(getattr(command.input_schema, "load", None)):
                problems.append(f"command {command.name!r}: input_schema must be a marshmallow Schema (class or "
                                f"instance), not {type(command.input_schema).__name__}")
            if command.timeout is not None and not command.timeout > 0:
                problems.append(f"command {command.name!r}: timeout must be a positive number of seconds")
            problems += _url_problems(f"command {command.name!r} help_url", command.help_url)
        for event_def in self.event_defs:
            if not isinstance(event_def, EventDef):
                problems.append(f"event_defs must be EventDef objects, got {type(event_def).__name__}")
        for event_def in self.all_event_defs():
            if isinstance(event_def, EventDef):
                if not event_def.name:
                    problems.append("an event definition has an empty name")
                problems += _url_problems(f"event {event_def.name!r} help_url", event_def.help_url)
        problems += _url_problems("help_url", self.help_url)
        for rel, href in self.links.items():
            if not rel or _RESERVED_REL.search(rel):
                problems.append(
                    f"link rel {rel!r} is refused by the Flyte server (it matches "
                    f"'{_RESERVED_REL.pattern}', which catches any rel containing 'up' or 'self')")
            problems += _url_problems(f"link {rel!r}", href)
        if problems:
            raise PackDefError(f"invalid pack definition {self.name!r}: " + "; ".join(problems))
        dotted = [k for k, v in self.labels.items() if "." in k or "." in v]
        if dotted or "." in self.name:
            log.warning("pack %r: dots in the name or labels %s can make two packs share an id (%r)",
                        self.name, dotted, self.id)


def _url_problems(what, url):
    if url is None:
        return []
    from marshmallow import ValidationError, validate

    try:
        validate.URL(require_tld=False, schemes={"http", "https"})(url)
    except (ValidationError, TypeError):
        return [f"{what} {url!r} is not an http(s) URL"]
    return []


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
    input: object
    result_url: str
