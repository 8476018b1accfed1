"""The per-action fast paths agree with what they stand in for, over tables of valid and malformed inputs.

* loading a take answer (:func:`flyte_gevent.schemas.load_action`) and dumping a
  result body are plans compiled from ``ActionSchema`` and ``EventBodySchema``:
  each case is run through the fast path and through the schema itself, and the
  two must return the same value or raise the same messages;
* ``createdAt`` is formatted as the ``strftime`` it replaces would;
* a result URL is resolved, from the host part already met, as parsing it in full would;
* the per-action metric series expose what prometheus_client's own Counter, Gauge
  and Histogram would.
"""

import collections
import dataclasses
import datetime
import enum
import json
import re

import prometheus_client
import pytest
from marshmallow import EXCLUDE, RAISE, Schema, ValidationError, fields, post_load, pre_load, validate, validates

from flyte_gevent import Event, EventDef
from flyte_gevent._http import HTTPPool
from flyte_gevent.metrics import Metrics
from flyte_gevent.schemas import (
    ActionSchema,
    EventBodySchema,
    LinkSchema,
    LinksDocumentSchema,
    PackResponseSchema,
    _compile_dump,
    _compile_load,
    _dump_event_body,
    _dump_payload,
    _NotPlain,
    _with_fallback,
    encode_event,
    load_action,
)

UTC = datetime.UTC
HREF = "http://flyte:8080/v1/packs/Echo.env.dev/actions/65a1b2c3d4e5f60718293a4b/result"
REL = "http://flyte:8080/swagger#/actionResult"
LINK = {"href": HREF, "rel": REL}


def outcome(load, data):
    """What *load* makes of *data*: ``("ok", repr of the result)`` or ``("refused", messages)``."""
    try:
        return "ok", repr(load(data))  # repr: NaN inputs compare equal
    except ValidationError as exc:
        return "refused", exc.messages


def body(**fields_):
    data = {"command": "Echo", "input": {"text": "hi"}, "links": [LINK]}
    data.update(fields_)
    return {key: value for key, value in data.items() if value is not _DROP}


_DROP = object()

VALID_TAKE_BODIES = {
    "minimal": body(),
    "extra fields": body(extra="ignored", pack={"id": "x"}),
    "input null": body(input=None),
    "input a list": body(input=[1, "two", None]),
    "input a string": body(input="echo -e 'a\\nb'"),
    "input false": body(input=False),
    "input a float": body(input=1.5),
    "input NaN": body(input=float("nan")),
    "input nested": body(input={"a": {"b": [{"c": [1, 2, {"d": None}]}]}}),
    "huge ints in input": body(input={"big": 2**64, "neg": -(2**70)}),
    "non-ASCII": body(command="Écho", input={"texte": "héllo ☃"}),
    "empty command": body(command=""),
    "several links, decoys first": body(links=[
        {"href": "http://decoy/no-rel"},
        {"href": "http://decoy/null-rel", "rel": None},
        {"href": "http://decoy/suffix", "rel": "http://h/swagger#/myactionResult"},
        LINK,
        {"href": "http://decoy/later", "rel": "http://h/swagger#/actionResults"},
    ]),
    "two result links: the last wins": body(links=[LINK, {"href": HREF.replace("65a1", "ffff"), "rel": REL}]),
    "link with extra fields": body(links=[{"href": HREF, "rel": REL, "method": "POST"}]),
    "result link with a query": body(links=[{"href": HREF + "?x=1", "rel": REL}]),
    "unknown URL shape": body(links=[{"href": "http://h/elsewhere", "rel": REL}]),
}

MALFORMED_TAKE_BODIES = {
    "empty object": {},
    "command missing": body(command=_DROP),
    "input missing": body(input=_DROP),
    "links missing": body(links=_DROP),
    "command an int": body(command=7),
    "command a bool": body(command=True),
    "command null": body(command=None),
    "command a list": body(command=["Echo"]),
    "links null": body(links=None),
    "links a string": body(links="x"),
    "links an object": body(links=LINK),
    "links empty": body(links=[]),
    "a link that is a string": body(links=["http://h/x"]),
    "a link that is null": body(links=[LINK, None]),
    "a link that is a list": body(links=[[HREF, REL]]),
    "href missing": body(links=[{"rel": REL}]),
    "href an int": body(links=[{"href": 1, "rel": REL}]),
    "href null": body(links=[{"href": None, "rel": REL}]),
    "rel an int": body(links=[{"href": HREF, "rel": 5}]),
    "only other links": body(links=[{"href": "http://h/x", "rel": "http://h/swagger#/event"}]),
    "several problems at once": {"command": 1, "links": [{"rel": 2}]},
    "a list": [1, 2],
    "a string": "action",
    "null": None,
    "a number": 42,
}


@pytest.mark.parametrize("data", list(VALID_TAKE_BODIES.values()) + list(MALFORMED_TAKE_BODIES.values()),
                         ids=list(VALID_TAKE_BODIES) + list(MALFORMED_TAKE_BODIES))
def test_load_action_returns_and_refuses_exactly_what_the_schema_does(data):
    assert outcome(load_action, data) == outcome(ActionSchema().load, data)


@pytest.mark.parametrize("data", VALID_TAKE_BODIES.values(), ids=VALID_TAKE_BODIES)
def test_the_compiled_plan_itself_loads_every_valid_take_body(data):
    # Not the schema fallback: the plan, so the comparison above really compares two paths.
    assert repr(_compile_load(ActionSchema())(data)) == repr(ActionSchema().load(data))


@pytest.mark.parametrize("data", MALFORMED_TAKE_BODIES.values(), ids=MALFORMED_TAKE_BODIES)
def test_the_compiled_plan_leaves_every_malformed_take_body_to_the_schema(data):
    with pytest.raises(_NotPlain):
        _compile_load(ActionSchema())(data)


@pytest.mark.parametrize("data", [
    collections.OrderedDict(body()),                           # a Mapping that is not a dict
    body(command=type("Name", (str,), {})("Echo")),            # a str subclass
    body(links=(LINK,)),                                       # a tuple of links (List takes any collection)
    body(links=[collections.OrderedDict(LINK)]),
])
def test_values_json_never_produces_still_load_as_the_schema_loads_them(data):
    assert outcome(load_action, data) == outcome(ActionSchema().load, data)


@pytest.mark.parametrize("schema, data", [
    (LinkSchema(), {"href": "http://h/v1"}),
    (LinkSchema(), {"href": "http://h/v1", "rel": None, "x": 1}),
    (LinkSchema(), {"rel": "self"}),
    (LinksDocumentSchema(), {"links": [{"href": "http://h/v1", "rel": "self"}]}),
    (LinksDocumentSchema(), {"links": [{"href": 3}]}),
    (PackResponseSchema(), {"id": "Echo", "name": "Echo"}),  # links missing: the callable default, []
    (PackResponseSchema(), {"id": None, "links": [{"href": "http://h/take", "rel": "x#/takeAction"}]}),
    (PackResponseSchema(), {"id": 5}),
])
def test_the_other_response_schemas_compile_to_the_same_loads(schema, data):
    compiled = _compile_load(schema)
    assert compiled is not None
    assert outcome(_with_fallback(compiled, schema.load), data) == outcome(schema.load, data)


class Renamed(Schema):
    class Meta:
        unknown = EXCLUDE

    text = fields.String(data_key="Text", attribute="words", required=True)
    maybe = fields.String(load_default="none given")
    anything = fields.Raw(allow_none=False)


@pytest.mark.parametrize("data", [
    {"Text": "a", "maybe": "b", "anything": [1]},
    {"Text": "a"},
    {"text": "a"},
    {"Text": "a", "anything": None},
    {"Text": "a", "maybe": None},
])
def test_data_keys_attributes_defaults_and_null_rules_follow_the_fields(data):
    schema = Renamed()
    compiled = _compile_load(schema)
    assert compiled is not None
    assert outcome(_with_fallback(compiled, schema.load), data) == outcome(schema.load, data)


class WithValidator(Schema):
    class Meta:
        unknown = EXCLUDE

    name = fields.String(validate=validate.Length(min=2))


class WithPreLoad(Schema):
    class Meta:
        unknown = EXCLUDE

    name = fields.String()

    @pre_load
    def _strip(self, data, **kwargs):
        return data


class WithValidates(Schema):
    class Meta:
        unknown = EXCLUDE

    name = fields.String()

    @validates("name")
    def _check(self, value, **kwargs):
        pass


class Raising(Schema):
    class Meta:
        unknown = RAISE

    name = fields.String()


class WithInteger(Schema):
    class Meta:
        unknown = EXCLUDE

    count = fields.Integer()


class WithOriginal(Schema):
    class Meta:
        unknown = EXCLUDE

    name = fields.String()

    @post_load(pass_original=True)
    def _make(self, data, original, **kwargs):
        return data


class ManyNested(Schema):
    class Meta:
        unknown = EXCLUDE

    links = fields.Nested(LinkSchema, many=True)


@pytest.mark.parametrize("schema", [WithValidator(), WithPreLoad(), WithValidates(), Raising(), WithInteger(),
                                    WithOriginal(), ManyNested(), ActionSchema(many=True), ActionSchema(partial=True)],
                         ids=lambda schema: type(schema).__name__ + (" many" if schema.many else "")
                         + (" partial" if schema.partial else ""))
def test_a_schema_using_what_the_compiler_does_not_know_gets_no_plan(schema):
    # So such a schema always runs as it is (and a change to ActionSchema of this kind keeps working, slower).
    assert _compile_load(schema) is None


# --- result and event bodies ---------------------------------------------------------------------------------------

AT = datetime.datetime(2026, 1, 2, 3, 4, 5, 678901, UTC)


class Colour(enum.IntEnum):
    RED = 2**60


@dataclasses.dataclass
class Point:
    x: int
    y: object = None


PAYLOADS = {
    "none": None,
    "a string": "done",
    "non-ASCII": {"text": "héllo ☃", "ключ": "значение"},
    "nested": {"a": {"b": [{"c": [1, 2.5, True, None, "x"]}]}},
    "ints at and beyond 2**53": {"edge": 2**53, "past": 2**53 + 1, "low": -(2**53), "below": -(2**53) - 1,
                                 "list": [2**53, 2**53 + 1, -(2**53) - 1]},
    "a big int alone": 2**64,
    "bools are not ints": {"t": True, "f": False, "list": [True, 0, 1]},
    "a tuple becomes a list": {"pair": (1, ("a", 2**60))},
    "number keys become strings": {3: "three", 1.5: "x", "s": 1},
    "dataclasses": [Point(1, Point(2**60, (3,)))],
    "an int enum": {"colour": Colour.RED, "list": [Colour.RED]},
    "a str subclass": {"s": type("Text", (str,), {})("x")},
    "a float subclass": {"f": type("F", (float,), {})(1.5)},
    "an OrderedDict": collections.OrderedDict([("b", 1), ("a", 2)]),
    "empty containers": {"d": {}, "l": [], "t": ()},
    "NaN is refused": {"n": float("nan")},
    "inf in a list is refused": {"items": [1, float("inf")]},
    "a set is refused": {"items": [1, {2}]},
    "a key that is a tuple is refused": {(1, 2): "x"},
    "a date is refused": {"when": datetime.date(2026, 1, 2)},
    "a top-level float inf is refused": float("-inf"),
}


def schema_encoded(name, payload, created_at):
    """The body as the schema makes it: EventBodySchema().dump, then compact JSON (no NaN)."""
    dumped = EventBodySchema().dump({"event": name, "payload": payload, "created_at": created_at})
    return json.dumps(dumped, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS)
def test_encode_event_returns_and_refuses_exactly_what_the_schema_path_does(payload):
    assert outcome(lambda p: encode_event(Event("Done", p), AT), payload) == \
        outcome(lambda p: schema_encoded("Done", p, AT), payload)


def test_the_json_rules_hold_for_the_values_passed_through_as_they_are():
    # The dump skips the walk for exact str/bool/None/int/float values: those at the edges, spelled out.
    payload = {"edge": 2**53, "past": 2**53 + 1, "low": -(2**53), "below": -(2**53) - 1, "t": True, "f": 0.1,
               "none": None, "list": [2**53 + 1, False, "s"]}
    assert json.loads(encode_event(Event("Done", payload), AT))["payload"] == {
        "edge": 2**53, "past": str(2**53 + 1), "low": -(2**53), "below": str(-(2**53) - 1), "t": True, "f": 0.1,
        "none": None, "list": [str(2**53 + 1), False, "s"]}


class IssueSchema(Schema):
    issue_id = fields.String(data_key="issueId", required=True)
    url = fields.Url()


@pytest.mark.parametrize("payload", [{"issue_id": "FOO-1", "url": "https://jira/FOO-1"}, {"url": "not a url"}, "x"])
def test_an_event_with_a_payload_schema_encodes_as_the_schema_path(payload):
    event_def = EventDef("IssueCreated", payload_schema=IssueSchema)

    def schema_path(value):
        return schema_encoded("IssueCreated", _dump_payload(event_def.payload_schema, value), AT)
    assert outcome(lambda value: encode_event(Event(event_def, value), AT), payload) == outcome(schema_path, payload)


@pytest.mark.parametrize("data", [
    {"event": "Done", "payload": {"a": 1}, "created_at": AT},
    {"event": "Done", "payload": None, "created_at": None},
    {"event": "Done", "payload": [1, (2, 3)], "created_at": AT},
    {"event": "Done", "payload": {"n": float("nan")}, "created_at": AT},
    {"event": "Done", "payload": 1, "created_at": datetime.datetime(2026, 1, 2)},  # naive: refused
    {"event": "Done", "created_at": AT},              # a key missing: the schema's accessor decides
    {"payload": 1},
    {"event": 5, "payload": 1, "created_at": AT},     # String dumps str(5)
])
def test_the_result_body_dump_is_the_schemas(data):
    assert _compile_dump(EventBodySchema()) is not None
    assert outcome(_dump_event_body, data) == outcome(EventBodySchema().dump, data)


# --- createdAt -----------------------------------------------------------------------------------------------------

class MyDateTime(datetime.datetime):
    pass


@pytest.mark.parametrize("value", [
    AT,
    datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),                # no microseconds: still six digits
    datetime.datetime(2026, 12, 31, 23, 59, 59, 999999, UTC),
    datetime.datetime(2026, 6, 1, 0, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=14))),
    datetime.datetime(2026, 6, 1, 23, 30, 1, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=-12))),
    datetime.datetime(2026, 6, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=45))),
    datetime.datetime(1000, 1, 1, tzinfo=UTC),
    datetime.datetime(999, 12, 31, 23, 59, tzinfo=UTC),                # below 1000: strftime's own text
    datetime.datetime(9999, 12, 31, 23, 59, 59, 999999, UTC),
    MyDateTime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
], ids=str)
def test_created_at_is_the_text_strftime_gives(value):
    expected = value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert json.loads(encode_event(Event("E"), value))["createdAt"] == expected


# --- result URLs ---------------------------------------------------------------------------------------------------

RESULT_URLS = [
    "http://127.0.0.1:8080/v1/packs/Bench/actions/0123456789abcdef01234567/result",
    "http://127.0.0.1:8080/v1/packs/Bench/actions/abc/result?tenant=a&x=%20y",
    "http://127.0.0.1:8080/v1/packs/Bench/actions/abc/result?",
    "http://127.0.0.1:8080/v1/packs/Bench/actions/abc/result?#",
    "http://127.0.0.1:8080/v1/packs/Bench/actions/abc/result#fragment",
    "http://127.0.0.1:8080/v1/packs/Bench/actions/a b/result",
    "http://127.0.0.1:8080/v1/packs/Bench/actions/a\tb/result",
    "http://127.0.0.1:8080/v1/packs/Bénch/actions/abc/result",
    "http://127.0.0.1:8080/v1/packs/B%C3%A9nch/actions/@x/result",
    "http://127.0.0.1:8080//double//slashes/",
    "http://127.0.0.1:8080/",
    "HTTP://127.0.0.1:8080/v1/upper/scheme",
    "http://user:secret@127.0.0.1:8080/v1/with/credentials",
    "http://[::1]:8080/v1/packs/Bench/actions/abc/result",
    "http://flyte/v1/packs/Bench/actions/abc/result",
    "http://flyte:80/v1/packs/Bench/actions/abc/result",
    "http://127.0.0.1:99999/v1/bad/port",
    "ftp://127.0.0.1:8080/v1/other/scheme",
]


def resolved(pool, url):
    try:
        origin, target, host = pool._resolve(url)
    except ValueError as exc:
        return "refused", str(exc)
    return (origin.scheme, origin.host, origin.port), target, host


@pytest.mark.parametrize("url", RESULT_URLS)
def test_a_url_resolved_from_a_host_met_before_is_what_parsing_it_in_full_gives(url):
    primed = HTTPPool(10)
    prefix = url[:url.find("/", url.find("://") + 3)]
    resolved(primed, prefix + "/v1/packs/Bench/actions/take")  # the take URL, seen first
    resolved(primed, prefix + "/v1/packs/Bench/actions/take2")
    assert resolved(primed, url) == resolved(HTTPPool(10), url)


def test_result_urls_of_the_take_urls_host_take_the_short_way():
    pool = HTTPPool(10)
    pool._resolve("http://127.0.0.1:8080/v1/packs/Bench/actions/take")
    assert "http://127.0.0.1:8080" in pool._prefixes


# --- metrics -------------------------------------------------------------------------------------------------------

def reference_registry(commands, calls):
    """The per-action series made with prometheus_client's own metric objects, as flyte_gevent 0.1.0 did."""
    registry = prometheus_client.CollectorRegistry(auto_describe=True)
    taken = prometheus_client.Counter("flyte_pack_actions_taken", "Actions taken.", ["command"], registry=registry)
    completed = prometheus_client.Counter("flyte_pack_actions", "Actions completed, by outcome.",
                                          ["command", "outcome"], registry=registry)
    duration = prometheus_client.Histogram("flyte_pack_action_duration_seconds", "Handler run time.", ["command"],
                                           registry=registry)
    in_flight = prometheus_client.Gauge("flyte_pack_actions_in_flight", "Actions taken and not yet completed.",
                                        registry=registry)
    for call in calls:
        command = call[1] if call[1] in commands else "unknown"
        if call[0] == "taken":
            taken.labels(command).inc()
            in_flight.inc()
        else:
            completed.labels(command, call[2]).inc()
            if call[3] is not None:
                duration.labels(command).observe(call[3])
            in_flight.dec()
    return registry


def exposition(registry, names):
    text = prometheus_client.generate_latest(registry).decode()
    lines = [re.sub(r"(_created(\{[^}]*\})?) \S+$", r"\1 <time>", line) for line in text.splitlines()
             if any(name in line for name in names)]
    return sorted(lines)


def test_the_per_action_series_expose_what_prometheus_clients_own_metrics_would():
    commands = ["Noop", "Sleep"]
    calls = [("taken", "Noop"), ("completed", "Noop", "success", 0.0012), ("taken", "Sleep"),
             ("completed", "Sleep", "timeout", 5.0), ("taken", "Mystery"),
             ("completed", "Mystery", "unknown_command", None), ("taken", "Noop"),
             ("completed", "Noop", "success", 0.005), ("taken", "Noop"), ("completed", "Noop", "error", 0.25),
             ("taken", "Sleep"), ("completed", "Sleep", "success", 12.0), ("taken", "Noop")]
    metrics = Metrics("Bench", commands)
    for call in calls:
        if call[0] == "taken":
            metrics.action_taken(call[1])
        else:
            metrics.action_completed(*call[1:])
    names = ["flyte_pack_actions_taken", "flyte_pack_actions_total", "flyte_pack_actions_created",
             "flyte_pack_action_duration", "flyte_pack_actions_in_flight"]
    ours = exposition(metrics.registry, names)
    assert ours == exposition(reference_registry(commands, calls), names)
    assert 'flyte_pack_action_duration_seconds_bucket{command="Noop",le="0.005"} 2.0' in ours
    assert "flyte_pack_actions_in_flight 1.0" in ours
