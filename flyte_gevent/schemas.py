"""The wire format: marshmallow schemas for every body that crosses the network.

Outgoing bodies (registration, results, events) are dumped through schemas and
then encoded as compact JSON; incoming bodies (link documents, the registration
response, taken actions) are loaded through schemas that ignore unknown fields,
as the Flyte server itself does. A payload whose event declares its own schema
is dumped through it and checked by loading the dump back (:func:`encode_event`).
Anything malformed becomes a ``marshmallow.ValidationError`` whose messages
:func:`flatten_errors` turns into one ``path: message`` line per problem.

The two bodies of every action — the take answer (:func:`load_action`) and the
result (:func:`encode_event`) — go through plans compiled once from
``ActionSchema`` and ``EventBodySchema``, which do what the schemas do for the
plain case and hand everything else to the schema itself (see the section on
fast paths below).
"""

import dataclasses
import datetime
import json
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

from marshmallow import EXCLUDE, Schema, ValidationError, fields, missing, post_dump, post_load

from .models import JSON, Action, Event, PackDef

__all__ = [
    "REL_EVENTS",
    "REL_HEALTH",
    "REL_PACKS",
    "REL_RESULT",
    "REL_TAKE",
    "RFC3339UTC",
    "ActionSchema",
    "EventBodySchema",
    "JSONValue",
    "Link",
    "LinkSchema",
    "LinksDocumentSchema",
    "PackRegistrationSchema",
    "PackResponseSchema",
    "action_id_from_url",
    "encode_event",
    "find_link",
    "flatten_errors",
    "load_action",
    "registration_body",
]



class Link(NamedTuple):
    """A link of a Flyte document: where it points, and what it is (``None`` when the server omitted it)."""

    href: str
    rel: str | None


# Rels are absolute swagger URLs whose host part varies with proxies, so links
# are matched by the resource name after the fragment marker.
REL_PACKS = "pack/listPacks"
REL_HEALTH = "info/health"
REL_TAKE = "action/takeAction"
REL_EVENTS = "event"
REL_RESULT = "actionResult"

# Flyte decodes JSON numbers into float64: integers beyond this lose precision.
_MAX_SAFE_INT = 2**53
_UTC = datetime.UTC


def find_link(links: Sequence[Link], name: str) -> str | None:
    """The href of the link whose rel names *name*, or ``None``.

    A rel matches when it is *name* itself or ends with ``#name``, ``#!/name``,
    ``#/name`` or ``/name`` — never a mere suffix such as ``prevent`` for
    ``event``. The Flyte server lists links a pack registered before its own,
    so the last match wins.
    """
    for link in reversed(links):
        rel = link.rel
        if not rel:
            continue
        if rel == name or rel.endswith(("/" + name, "#" + name)):
            return link.href
    return None


def flatten_errors(messages: object, prefix: str = "") -> list[str]:
    """Turn marshmallow's nested error messages into ``["dotted.path: message", ...]``."""
    lines: list[str] = []
    if isinstance(messages, dict):
        for key, value in messages.items():
            path = prefix if key == "_schema" else (f"{prefix}.{key}" if prefix else str(key))
            lines += flatten_errors(value, path)
    elif isinstance(messages, (list, tuple)):
        for item in messages:
            lines += flatten_errors(item, prefix)
    else:
        lines.append(f"{prefix}: {messages}" if prefix else str(messages))
    return lines


class JSONValue(fields.Field[Any]):
    """Any JSON value, checked on the way out.

    Dumping walks the value and refuses what JSON (or Flyte) cannot carry, naming
    where it is: ``payload.items.2: set is not JSON serializable``. Dataclasses
    become objects; tuples become lists; integers beyond 2**53 become strings.
    """

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> JSON:
        return _to_json(value, attr or "value")

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        return value


def _to_json(value: object, path: str) -> JSON:
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return str(value) if abs(value) > _MAX_SAFE_INT else value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(f"{path}: {value} is not a valid JSON number")
        return value
    if isinstance(value, dict):
        out: dict[str, JSON] = {}
        for key, item in value.items():
            if isinstance(key, (int, float)) and not isinstance(key, bool):
                key = str(key)
            elif not isinstance(key, str):
                raise ValidationError(f"{path}: key {key!r} is not a string")
            # Plain values as they are, without building the path only an error would need.
            out[key] = item if _is_plain_json(item) else _to_json(item, f"{path}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [item if _is_plain_json(item) else _to_json(item, f"{path}.{i}") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _to_json(dataclasses.asdict(value), path)
    raise ValidationError(f"{path}: {type(value).__name__} is not JSON serializable")


def _is_plain_json(value: Any) -> bool:
    """Whether *value* is a JSON scalar that :func:`_to_json` returns as it is (exact types only)."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        safe: bool = -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT
        return safe
    return kind is float and math.isfinite(value)


class RFC3339UTC(fields.Field[datetime.datetime]):
    """An aware datetime, sent in UTC as RFC 3339 ending in ``Z`` (Flyte refuses naive times)."""

    def _serialize(self, value: datetime.datetime | None, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        if value is None:
            return None
        if value.tzinfo is not _UTC:
            if value.tzinfo is None or value.utcoffset() is None:
                raise ValidationError(f"{attr}: naive datetime {value.isoformat()}; Flyte needs a timezone")
            value = value.astimezone(_UTC)
        if type(value) is datetime.datetime and value.year >= 1000:
            # The same text as the strftime below, in half the time (every result carries one).
            return value.isoformat(timespec="microseconds")[:-6] + "Z"
        return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime.datetime:
        if not isinstance(value, str):
            raise ValidationError("Not a valid RFC 3339 datetime.")
        try:
            parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValidationError("Not a valid RFC 3339 datetime.") from None
        if parsed.tzinfo is None or "T" not in value:
            raise ValidationError("Not a valid RFC 3339 datetime (it needs a 'T' and a timezone).")
        return parsed


class LinkSchema(Schema):
    """``{"href": ..., "rel": ...}``; the server omits an empty rel."""

    class Meta:
        unknown = EXCLUDE

    href = fields.String(required=True)
    rel = fields.String(load_default=None)

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> Link:
        return Link(data["href"], data["rel"])

    @post_dump
    def _drop_empty_rel(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        if not data.get("rel"):
            data.pop("rel", None)
        return data


class LinksDocumentSchema(Schema):
    """The discovery documents ``GET /`` and ``GET /v1``."""

    class Meta:
        unknown = EXCLUDE

    links = fields.List(fields.Nested(LinkSchema), required=True)


def _help_links(url: str | None) -> list[dict[str, str]] | None:
    return [{"href": url, "rel": "help"}] if url else None


class _RegistrationPart(Schema):
    @post_dump
    def _drop_missing(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {key: value for key, value in data.items() if value is not None}


class EventDefRegistrationSchema(_RegistrationPart):
    name = fields.String()
    links = fields.Function(lambda event_def: _help_links(event_def.help_url))


class CommandRegistrationSchema(_RegistrationPart):
    name = fields.String()
    events = fields.Function(lambda command: [e.name for e in command.output_events])
    links = fields.Function(lambda command: _help_links(command.help_url))


class PackRegistrationSchema(_RegistrationPart):
    """The registration body built from a :class:`~flyte_gevent.models.PackDef`.

    Labels, events, commands and links are left out when there are none (as in
    the bodies of docs/flyte-api.md Part 5); help links appear only where a help
    URL is given; event definitions are de-duplicated in declaration order.
    """

    name = fields.String()
    labels = fields.Function(lambda pack_def: dict(pack_def.labels) or None)
    events = fields.Function(
        lambda pack_def: EventDefRegistrationSchema(many=True).dump(pack_def.all_event_defs()) or None)
    commands = fields.Function(lambda pack_def: CommandRegistrationSchema(many=True).dump(pack_def.commands) or None)
    links = fields.Function(lambda pack_def: _pack_links(pack_def))  # noqa: PLW0108 - defined below the class


def _pack_links(pack_def: PackDef) -> list[dict[str, str]] | None:
    links: list[dict[str, str]] = _help_links(pack_def.help_url) or []
    links += [{"href": href, "rel": rel} for rel, href in pack_def.links.items()]
    return links or None


class PackResponseSchema(Schema):
    """The 201 body of a registration; only the id and links matter to a pack."""

    class Meta:
        unknown = EXCLUDE

    id = fields.String(load_default=None)
    name = fields.String(load_default=None)
    links = fields.List(fields.Nested(LinkSchema), load_default=list)


class ActionSchema(Schema):
    """A taken action: ``{"command", "input", "links": [result link]}``, loaded into an Action."""

    class Meta:
        unknown = EXCLUDE

    command = fields.String(required=True)
    input = JSONValue(required=True, allow_none=True)
    links = fields.List(fields.Nested(LinkSchema), required=True)

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> Action:
        result_url = find_link(data["links"], REL_RESULT)
        if result_url is None:
            raise ValidationError("no link with rel .../actionResult", "links")
        return Action(action_id_from_url(result_url), data["command"], data["input"], result_url)


def action_id_from_url(result_url: str) -> str:
    """The action id in a result URL (``.../actions/<id>/result``), the only place Flyte puts it."""
    path = result_url.split("?", 1)[0].rstrip("/")
    head, _, last = path.rpartition("/")
    if last == "result" and head:
        return head.rpartition("/")[2]
    return result_url


class EventBodySchema(Schema):
    """The body of a result or event: ``{"event", "payload", "createdAt"}``; never ``pack``."""

    event = fields.String(required=True)
    payload = JSONValue(allow_none=True)
    createdAt = RFC3339UTC(attribute="created_at")


# -- the per-action fast paths, compiled from the schemas above ------------------------------------------------------
#
# marshmallow spends about 60 µs loading a take answer and 20 µs dumping a result body, more than the rest of the
# client's work for an action. What it does for these two schemas is simple, so it is compiled once into a plan of
# the schemas' own fields: which keys, which are required or nullable, their defaults, which of the fields' own
# conversions to call, and the schemas' own post_load hooks. A plan covers only the plain case (every value of the
# type the field accepts); anything else — a missing or null required field, a value of another type — goes to the
# schema itself, so every refusal and its message is the schema's. A schema using a feature the compiler does not
# know gets no plan and is always run as it is. tests/test_fast_path.py runs both over a table of bodies.


class _NotPlain(Exception):
    """The data is outside what a compiled plan covers: the schema must decide."""


def _plain_text(value: object) -> str:
    if type(value) is not str:
        raise _NotPlain
    return value


def _as_is(value: Any) -> Any:
    return value


def _field_loader(field: Any) -> Callable[[Any], Any] | None:
    """A function loading one non-null value as *field*'s ``deserialize`` would, raising _NotPlain when unsure."""
    if field.validators or getattr(field, "pre_load", None) or getattr(field, "post_load", None):
        return None
    kind = type(field)
    if kind is fields.String:
        return _plain_text  # String._deserialize returns a str as it is and refuses anything else
    if kind is fields.Raw or kind is JSONValue:
        return _as_is
    if kind is fields.List:
        inner = _field_loader(field.inner)
        if inner is None:
            return None
        inner_allows_none = field.inner.allow_none

        def load_list(value: Any) -> list[Any]:
            if type(value) is not list:
                raise _NotPlain
            items: list[Any] = []
            for item in value:
                if item is None:
                    if not inner_allows_none:
                        raise _NotPlain
                    items.append(None)
                else:
                    items.append(inner(item))
            return items
        return load_list
    if kind is fields.Nested:
        if field.many or field.unknown not in (None, EXCLUDE):
            return None
        return _compile_load(field.schema)
    return None


def _compile_load(schema: Schema) -> Callable[[Any], Any] | None:
    """A function loading a dict as ``schema.load`` does when it accepts it, or ``None`` if *schema* cannot be compiled.

    The function raises _NotPlain for data it does not cover.
    """
    hooks = type(schema).resolve_hooks()
    if (schema.many or schema.partial or schema.unknown != EXCLUDE or schema.dict_class is not dict
            or hooks.get("pre_load") or hooks.get("validates") or hooks.get("validates_schema")):
        return None
    post_load: list[Callable[..., Any]] = []
    for name, pass_collection, options in hooks.get("post_load", ()):
        if pass_collection or options.get("pass_original"):
            return None
        post_load.append(getattr(schema, name))
    plan: list[tuple[str, str, Callable[[Any], Any], bool, bool, Any]] = []
    for name, field in schema.load_fields.items():
        attribute = field.attribute or name
        load_field = _field_loader(field)
        if load_field is None or "." in attribute:
            return None
        key = field.data_key if field.data_key is not None else name
        plan.append((key, attribute, load_field, field.required, field.allow_none, field.load_default))
    unknown = schema.unknown

    def load(data: Any) -> Any:
        if type(data) is not dict:
            raise _NotPlain
        result: Any = {}
        for key, attribute, load_value, required, allow_none, default in plan:
            value = data.get(key, missing)
            if value is missing:
                if required:
                    raise _NotPlain
                if default is not missing:
                    result[attribute] = default() if callable(default) else default
            elif value is None:
                if not allow_none:
                    raise _NotPlain
                result[attribute] = None
            else:
                result[attribute] = load_value(value)
        try:
            for hook in post_load:
                result = hook(result, many=False, partial=schema.partial, unknown=unknown)
        except ValidationError:
            raise _NotPlain from None
        return result
    return load


def _compile_dump(schema: Schema) -> Callable[[Any], dict[str, Any]] | None:
    """A function dumping a dict as ``schema.dump`` does, or ``None`` if *schema* cannot be compiled.

    The function raises _NotPlain for a dict lacking one of the keys the schema reads.
    """
    hooks = type(schema).resolve_hooks()
    if (schema.many or schema.dict_class is not dict or hooks.get("pre_dump") or hooks.get("post_dump")
            or type(schema).get_attribute is not Schema.get_attribute):
        return None
    plan: list[tuple[str, str, str, Callable[..., Any]]] = []
    for name, field in schema.dump_fields.items():
        source = field.attribute or name
        if not field._CHECK_ATTRIBUTE or type(field).get_value is not fields.Field.get_value or "." in source:
            return None
        key = field.data_key if field.data_key is not None else name
        plan.append((key, source, name, field._serialize))

    def dump(obj: Any) -> dict[str, Any]:
        if type(obj) is not dict:
            raise _NotPlain
        result = {}
        for key, source, name, serialize in plan:
            value = obj.get(source, missing)
            if value is missing:
                raise _NotPlain  # the schema's accessor and defaults decide
            result[key] = serialize(value, name, obj)
        return result
    return dump


def _with_fallback(compiled: Callable[[Any], Any] | None, schema_method: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """*compiled* where it covers the data, else *schema_method* (which then also words any refusal)."""
    if compiled is None:
        return schema_method

    def run(data: Any) -> Any:
        try:
            return compiled(data)
        except _NotPlain:
            return schema_method(data)
    return run


_EVENT_BODY = EventBodySchema()
_REGISTRATION = PackRegistrationSchema()
_JSON_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode

_ACTION = ActionSchema()
load_action: Callable[[Any], Action] = _with_fallback(_compile_load(_ACTION), _ACTION.load)
load_action.__doc__ = """The :class:`~flyte_gevent.models.Action` in a decoded take answer.

Returns and raises exactly what ``ActionSchema().load(data)`` does (a
``marshmallow.ValidationError`` for a malformed one), through the plan compiled
from the schema for the plain case."""
_dump_event_body = _with_fallback(_compile_dump(_EVENT_BODY), _EVENT_BODY.dump)


def registration_body(pack_def: PackDef) -> dict[str, Any]:
    """The registration JSON for *pack_def*, as a dict."""
    body: dict[str, Any] = _REGISTRATION.dump(pack_def)
    return body


def encode_event(event: Event[Any], created_at: datetime.datetime | None = None) -> bytes:
    """Encode *event* as the JSON bytes of a result or event POST.

    When the event has a ``payload_schema``, the payload is dumped through it
    and must load back cleanly (see :func:`_dump_payload`).

    :raises marshmallow.ValidationError: the payload is not JSON-serializable,
        or the event's payload schema refuses it; the messages name the fields
        (``payload.url: Missing data for required field.``).
    """
    payload = event.payload
    schema = event.event_def.payload_schema
    if schema is not None:
        payload = _dump_payload(cast(Schema, schema), payload)  # an instance once the EventDef is made
    body = _dump_event_body({
        "event": event.name,
        "payload": payload,
        "created_at": created_at or datetime.datetime.now(_UTC),
    })
    return _JSON_ENCODE(body).encode()


def _dump_payload(schema: Schema, payload: object) -> Any:
    """*payload* dumped through *schema*, refused unless the dump loads back through it.

    marshmallow's ``dump()`` checks nothing: a str dumps to ``{}``, a missing
    required field is left out, a validator never runs, and a value of the wrong
    type raises whatever the field's conversion raises. So the payload must be an
    object (a dict, dataclass or other object; a list of them for ``many``
    schemas), a field that cannot dump it is named, and the dump is then
    validated by loading it back (dump-only fields aside). Dicts, like objects,
    are read by attribute name, as ``dump()`` reads them.

    :raises marshmallow.ValidationError: messages under ``payload``, by field.
    """
    shape = _shape_errors(schema, payload)
    if shape:
        raise ValidationError({"payload": shape})
    try:
        dumped = schema.dump(payload)
    except Exception as exc:  # noqa: BLE001 - any field's conversion may fail; it is located below
        located = _dump_errors(schema, payload)
        raise ValidationError({"payload": located or _dump_failure(exc)}) from None
    errors = schema.validate(_loadable(schema, dumped))
    if errors:
        raise ValidationError({"payload": errors})
    return dumped


def _shape_errors(schema: Schema, payload: object) -> list[str] | dict[int, list[str]] | None:
    name = type(schema).__name__
    if not schema.many:
        return [_not_an_object(name, payload)] if _is_plain_value(payload) else None
    if not isinstance(payload, (list, tuple)) or hasattr(payload, "_fields"):
        return [f"{name} needs a list, not {_kind(payload)}"]
    items = {i: [_not_an_object(name, item)] for i, item in enumerate(payload) if _is_plain_value(item)}
    return items or None


def _is_plain_value(value: object) -> bool:
    """Whether *value* is a JSON scalar or a plain sequence, which a schema cannot read fields from."""
    if isinstance(value, tuple):
        return not hasattr(value, "_fields")  # a namedtuple is read by attribute
    return value is None or isinstance(value, (str, bytes, bytearray, int, float, list, set, frozenset))


def _not_an_object(schema_name: str, value: object) -> str:
    return f"{schema_name} needs a dict, a dataclass or another object, not {_kind(value)}"


def _kind(value: object) -> str:
    return "None" if value is None else type(value).__name__


def _dump_errors(schema: Schema, obj: object) -> dict[Any, Any]:
    """Where dumping *obj* through *schema* fails, as marshmallow-style messages by field ({} if nowhere)."""
    if schema.many:
        if not isinstance(obj, (list, tuple)):
            return {}
        items = {i: _field_errors(schema, item) for i, item in enumerate(obj)}
        return {i: errors for i, errors in items.items() if errors}
    return _field_errors(schema, obj)


def _field_errors(schema: Schema, obj: object) -> dict[str, Any]:
    errors: dict[str, Any] = {}
    for attr_name, field in schema.dump_fields.items():
        value = None
        try:
            value = field.get_value(obj, attr_name, accessor=schema.get_attribute)
            field.serialize(attr_name, obj, accessor=schema.get_attribute)
        except Exception as exc:  # noqa: BLE001 - reported by field
            key = field.data_key if field.data_key is not None else attr_name
            errors[key] = _why_not_dumped(field, value, exc)
    return errors


def _why_not_dumped(field: fields.Field[Any], value: object, exc: Exception) -> Any:
    """Why *field* cannot dump *value*: by path inside nested objects and lists, else one message."""
    if isinstance(field, fields.Nested) and value is not None:
        nested = _dump_errors(field.schema, value)
        if nested:
            return nested
    elif isinstance(field, fields.List) and isinstance(value, (list, tuple)):
        items: dict[int, Any] = {}
        for index, item in enumerate(value):
            try:
                field.inner.serialize("item", item, accessor=_itself)
            except Exception as item_exc:  # noqa: BLE001 - reported by index
                items[index] = _why_not_dumped(field.inner, item, item_exc)
        if items:
            return items
    if isinstance(exc, ValidationError):
        return exc.messages
    return [f"cannot be dumped as {type(field).__name__}: {exc}"]


def _itself(obj: object, attr: str, default: object) -> object:
    return obj


def _dump_failure(exc: Exception) -> Any:
    if isinstance(exc, ValidationError):
        return exc.messages
    return [f"cannot be dumped: {type(exc).__name__}: {exc}"]


def _loadable(schema: Schema, dumped: Any) -> Any:
    """The dump without dump-only fields, which loading it back would call unknown."""
    dump_only = {field.data_key if field.data_key is not None else name
                 for name, field in schema.dump_fields.items() if name not in schema.load_fields}
    if not dump_only:
        return dumped
    if schema.many:
        return [{k: v for k, v in item.items() if k not in dump_only} for item in dumped]
    return {k: v for k, v in dumped.items() if k not in dump_only}
