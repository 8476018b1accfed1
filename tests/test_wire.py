"""The wire format: what flyte_gevent sends to Flyte and how it reads Flyte's answers.

Covers the pack vocabulary (``flyte_gevent.models``: PackDef validation, pack ids)
and the marshmallow schemas (``flyte_gevent.schemas``: registration bodies,
actions, links, event encoding), checked against the examples in
docs/flyte-api.md. No network here; test_client.py sends these bodies to the
fake server.
"""

import collections
import dataclasses
import datetime
import json
import logging
import re

import pytest
from marshmallow import Schema, ValidationError, fields, post_dump, validate

from flyte_gevent import Command, Event, EventDef, PackDef, fatal_event
from flyte_gevent._fake_server import _is_go_time, decode_pack
from flyte_gevent._fake_server import pack_id as server_pack_id
from flyte_gevent.errors import PackDefError
from flyte_gevent.models import Action, pack_id
from flyte_gevent.schemas import (
    REL_EVENTS,
    REL_HEALTH,
    REL_PACKS,
    REL_RESULT,
    REL_TAKE,
    ActionSchema,
    EventBodySchema,
    Link,
    LinkSchema,
    LinksDocumentSchema,
    PackResponseSchema,
    action_id_from_url,
    encode_event,
    find_link,
    flatten_errors,
    registration_body,
)

UTC = datetime.UTC
RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z")


def handler(input):
    return None


def compact(value):
    return json.dumps(value, separators=(",", ":"))


def demo_pack_def():
    """The pack of the Go wire trace (flyte-api.md §2.10)."""
    echoed, echo_failed = EventDef("Echoed"), EventDef("EchoFailed")
    return PackDef(
        "Demo",
        help_url="https://example.com/help",
        commands=[Command("Echo", handler, [echoed, echo_failed]), Command("Boom", handler, [echoed])],
        event_defs=[EventDef("Spontaneous")],
        labels={"env": "dev", "team": "a"},
    )


# --- registration body --------------------------------------------------------------------------------------------

# flyte-api.md §2.10, step 2, byte for byte.
GO_TRACE_REGISTRATION = (
    '{"name":"Demo","labels":{"env":"dev","team":"a"},'
    '"events":[{"name":"EchoFailed"},{"name":"Spontaneous"},{"name":"Echoed"}],'
    '"commands":[{"name":"Echo","events":["Echoed","EchoFailed"]},{"name":"Boom","events":["Echoed"]}],'
    '"links":[{"href":"https://example.com/help","rel":"help"}]}'
)


def test_go_wire_trace_registration_is_reproduced_with_events_in_declaration_order():
    go = json.loads(GO_TRACE_REGISTRATION)
    body = registration_body(demo_pack_def())

    # Go's event order is random (a map); ours is the declaration order: the
    # pack's own definitions, then each command's outputs.
    assert [e["name"] for e in body["events"]] == ["Spontaneous", "Echoed", "EchoFailed"]
    assert sorted(body["events"], key=lambda e: e["name"]) == sorted(go["events"], key=lambda e: e["name"])
    go["events"] = body["events"]
    # Everything else, key order included, is what the Go client sends.
    assert compact(body) == compact(go)


def test_registration_event_order_follows_declaration_and_is_repeatable():
    a, b, c, d = (EventDef(n) for n in "ABCD")
    pack_def = PackDef("P", commands=[Command("Second", handler, [c, a]), Command("First", handler, [d, c])],
                       event_defs=[b])
    names = [e["name"] for e in registration_body(pack_def)["events"]]
    assert names == ["B", "C", "A", "D"]
    assert [compact(registration_body(pack_def)) for _ in range(3)] == [compact(registration_body(pack_def))] * 3


def test_shell_registration_body_matches_part_5():
    output = EventDef("Output")
    help_url = "https://github.com/ExpediaGroup/flyte-shell/blob/master/README.md"
    expected_links = [{"href": help_url, "rel": "help"}]

    labelled = PackDef("Shell", help_url=help_url, commands=[Command("Shell", handler, [output])],
                       labels={"ABC": "123"})
    assert registration_body(labelled) == {
        "name": "Shell",
        "labels": {"ABC": "123"},
        "events": [{"name": "Output"}],
        "commands": [{"name": "Shell", "events": ["Output"]}],
        "links": expected_links,
    }
    assert labelled.id == "Shell.ABC.123"

    unlabelled = PackDef("Shell", help_url=help_url, commands=[Command("Shell", handler, [output])])
    assert "labels" not in registration_body(unlabelled)
    assert unlabelled.id == "Shell"


def test_ticker_registration_body_matches_part_5():
    help_url = "https://github.com/ExpediaGroup/flyte-ticker/blob/master/README.md"
    pack_def = PackDef("Ticker", help_url=help_url, event_defs=[EventDef("Tick")])
    assert compact(registration_body(pack_def)) == compact(
        {"name": "Ticker", "events": [{"name": "Tick"}], "links": [{"href": help_url, "rel": "help"}]})


def test_pack_level_event_definition_wins_a_name_clash():
    pack_help, command_help = "https://example.com/pack-echoed", "https://example.com/command-echoed"
    pack_def = PackDef("P",
                       commands=[Command("Echo", handler, [EventDef("Echoed", help_url=command_help)]),
                                 Command("Again", handler, [EventDef("Echoed")])],
                       event_defs=[EventDef("Echoed", help_url=pack_help)])
    body = registration_body(pack_def)
    assert body["events"] == [{"name": "Echoed", "links": [{"href": pack_help, "rel": "help"}]}]
    assert body["commands"] == [{"name": "Echo", "events": ["Echoed"]}, {"name": "Again", "events": ["Echoed"]}]


def test_first_command_declaration_wins_a_clash_between_commands():
    first, second = "https://example.com/first", "https://example.com/second"
    pack_def = PackDef("P", commands=[Command("A", handler, [EventDef("Done", help_url=first)]),
                                      Command("B", handler, [EventDef("Done", help_url=second)])])
    assert registration_body(pack_def)["events"] == [{"name": "Done", "links": [{"href": first, "rel": "help"}]}]


def test_help_links_appear_only_where_a_help_url_is_given():
    with_help, without_help = EventDef("Documented", help_url="https://example.com/ev"), EventDef("Plain")
    pack_def = PackDef("P", help_url="https://example.com/pack", commands=[
        Command("Helped", handler, [with_help], help_url="https://example.com/cmd"),
        Command("Bare", handler, [without_help]),
    ])
    body = registration_body(pack_def)
    assert body["links"] == [{"href": "https://example.com/pack", "rel": "help"}]
    assert body["commands"] == [
        {"name": "Helped", "events": ["Documented"], "links": [{"href": "https://example.com/cmd", "rel": "help"}]},
        {"name": "Bare", "events": ["Plain"]},
    ]
    assert body["events"] == [
        {"name": "Documented", "links": [{"href": "https://example.com/ev", "rel": "help"}]},
        {"name": "Plain"},
    ]


def test_help_url_is_optional_everywhere():
    # Go bug 2.11-2: a nil pack help URL crashes the Go client.
    pack_def = PackDef("NoHelp", commands=[Command("Run", handler, [EventDef("Ran")])])
    pack_def.validate()
    text = compact(registration_body(pack_def))
    assert text == '{"name":"NoHelp","events":[{"name":"Ran"}],"commands":[{"name":"Run","events":["Ran"]}]}'
    assert "null" not in text


def test_command_without_output_events_lists_an_empty_array_not_null():
    body = registration_body(PackDef("P", commands=[Command("Fire", handler)]))
    assert body["commands"] == [{"name": "Fire", "events": []}]
    assert "events" not in body


def test_labels_are_omitted_when_empty_and_sent_when_given():
    assert "labels" not in registration_body(PackDef("P", labels={}))
    assert registration_body(PackDef("P", labels={"env": "dev"}))["labels"] == {"env": "dev"}


def test_extra_pack_links_follow_the_help_link():
    pack_def = PackDef("P", help_url="https://example.com/help", links={"docs": "https://example.com/docs"})
    pack_def.validate()
    assert registration_body(pack_def)["links"] == [
        {"href": "https://example.com/help", "rel": "help"},
        {"href": "https://example.com/docs", "rel": "docs"},
    ]


def test_registration_body_round_trips_through_the_servers_decoder():
    """dump -> JSON -> the fake server's Go-faithful decoding gives back the definition."""
    decoded = decode_pack(json.loads(compact(registration_body(demo_pack_def()))))
    assert decoded == {
        "name": "Demo",
        "labels": {"env": "dev", "team": "a"},
        "commands": [{"name": "Echo", "events": ["Echoed", "EchoFailed"], "links": None},
                     {"name": "Boom", "events": ["Echoed"], "links": None}],
        "events": [{"name": "Spontaneous", "links": None}, {"name": "Echoed", "links": None},
                   {"name": "EchoFailed", "links": None}],
        "links": [("https://example.com/help", "help")],
    }


# --- PackDef.validate (the construction-time checks and their messages: test_definitions.py) --------------------

@pytest.mark.parametrize("rel", ["support", "setup", "self", "up", "x/takeAction", "x/event", "x/actionResult",
                                 "http://superhost/x"])
def test_rels_the_servers_unanchored_regex_rejects_are_refused(rel):
    with pytest.raises(PackDefError, match=f"link rel {re.escape(repr(rel))} is refused by the Flyte server"):
        PackDef("P", links={rel: "https://example.com/x"})
    pack_def = PackDef("P")
    pack_def.links[rel] = "https://example.com/x"
    with pytest.raises(PackDefError, match=f"link rel {re.escape(repr(rel))} is refused by the Flyte server"):
        pack_def.validate()


@pytest.mark.parametrize("rel", ["help", "docs", "x-event", "prevent", "takeActions"])
def test_validate_accepts_rels_the_server_accepts(rel):
    PackDef("P", links={rel: "https://example.com/x"}).validate()


def test_validate_reports_every_problem_in_one_line():
    pack_def = PackDef("P", commands=[Command("Run", handler)])
    pack_def.name, pack_def.labels["k"], pack_def.links["setup"] = "bad name", "v v", "x"
    pack_def.commands[0].handler = None
    with pytest.raises(PackDefError) as caught:
        pack_def.validate()
    message = str(caught.value)
    assert message.startswith("invalid pack definition 'bad name': ")
    for part in ("pack name 'bad name' holds ' '", "label k='v v': the value holds ' '", "handler is not callable",
                 "link rel 'setup'", "link 'setup' 'x' is not an http(s) URL"):
        assert part in message
    assert "\n" not in message


def test_validate_accepts_a_complete_valid_definition_and_empty_label_values(caplog):
    pack_def = demo_pack_def()
    pack_def.labels["optional"] = ""
    with caplog.at_level(logging.WARNING, logger="flyte_gevent"):
        pack_def.validate()
    assert caplog.records == []


@pytest.mark.parametrize("name, labels, collides_with", [
    ("a", {"b": "c.d"}, "a.b.c.d"),
    ("a", {"b.c": "d"}, "a.b.c.d"),
    ("a.b", {}, "a.b"),
])
def test_validate_warns_that_dots_can_make_pack_ids_collide(caplog, name, labels, collides_with):
    with caplog.at_level(logging.WARNING, logger="flyte_gevent.models"):
        PackDef(name, labels=labels).validate()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "flyte_gevent.models"]
    assert len(warnings) == 1
    assert "share an id" in warnings[0].getMessage()
    assert repr(collides_with) in warnings[0].getMessage()


def test_decorator_adds_commands_that_register_like_explicit_ones():
    created = EventDef("IssueCreated")
    pack_def = PackDef("JiraPack", help_url="https://example.com/jira-pack")

    @pack_def.command("createIssue", output_events=[created], help_url="https://example.com/create")
    def create_issue(input):
        return Event(created, {"issueId": "FOO-1"})

    assert create_issue({"x": 1}) == Event(created, {"issueId": "FOO-1"})  # still the plain function
    pack_def.validate()
    assert registration_body(pack_def)["commands"] == [
        {"name": "createIssue", "events": ["IssueCreated"],
         "links": [{"href": "https://example.com/create", "rel": "help"}]}]


def test_with_labels_merges_over_a_copy():
    original = PackDef("P", labels={"env": "dev", "team": "a"})
    merged = original.with_labels({"env": "prod", "zone": "eu"})
    assert merged.labels == {"env": "prod", "team": "a", "zone": "eu"}
    assert merged.id == "P.env.prod.team.a.zone.eu"
    assert original.labels == {"env": "dev", "team": "a"}


# --- pack ids (flyte-api.md §1.4) -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, labels, expected", [
    ("Shell", None, "Shell"),
    ("Shell", {}, "Shell"),
    ("Shell", {"ABC": "123"}, "Shell.ABC.123"),
    ("Demo", {"team": "a", "env": "dev"}, "Demo.env.dev.team.a"),
    ("a", {"b": "c.d"}, "a.b.c.d"),
    ("a", {"b.c": "d"}, "a.b.c.d"),
    # byte-wise order: upper case sorts before lower case
    ("P", {"b": "1", "B": "2", "a": "3"}, "P.B.2.a.3.b.1"),
])
def test_pack_id_follows_the_servers_rule(name, labels, expected):
    assert pack_id(name, labels) == expected
    assert PackDef(name, labels=labels).id == expected
    assert server_pack_id(name, labels) == expected


# --- events --------------------------------------------------------------------------------------------------------

def test_event_accepts_an_event_def_or_a_name_and_nothing_else():
    assert Event("Done", 1) == Event(EventDef("Done"), 1)
    assert Event("Done").payload is None
    assert fatal_event("boom") == Event("FATAL", "boom")
    with pytest.raises(TypeError, match="Event needs an EventDef or an event name, not int"):
        Event(42)


def body_of(event, created_at=None):
    return json.loads(encode_event(event, created_at))


def test_encode_event_sends_exactly_event_payload_and_created_at():
    # A payload may mention "pack"; the body itself never carries pack or receivedAt (flyte-api.md §1.9).
    body = body_of(Event("Echoed", {"pack": "x", "receivedAt": "y"}))
    assert list(body) == ["event", "payload", "createdAt"]
    assert body["event"] == "Echoed"
    assert body["payload"] == {"pack": "x", "receivedAt": "y"}


def test_encode_event_is_compact_utf8_json():
    data = encode_event(Event("Said", {"text": "héllo"}), datetime.datetime(2026, 1, 2, 3, 4, 6, 500000, UTC))
    assert data == '{"event":"Said","payload":{"text":"héllo"},"createdAt":"2026-01-02T03:04:06.500000Z"}'.encode()


def test_created_at_defaults_to_now_in_utc_with_a_z():
    before = datetime.datetime.now(UTC)
    created_at = body_of(Event("Tick"))["createdAt"]
    after = datetime.datetime.now(UTC)
    assert RFC3339_UTC.fullmatch(created_at)
    assert before - datetime.timedelta(seconds=1) <= datetime.datetime.fromisoformat(created_at) <= after
    assert _is_go_time(created_at)  # what Go's time.Time decoding accepts


@pytest.mark.parametrize("zone_hours", [2, -5, 0])
def test_created_at_converts_aware_datetimes_to_utc(zone_hours):
    zone = datetime.timezone(datetime.timedelta(hours=zone_hours))
    local = datetime.datetime(2026, 1, 2, 12, 0, 0, 250000, tzinfo=zone)
    created_at = body_of(Event("E"), local)["createdAt"]
    assert RFC3339_UTC.fullmatch(created_at)
    utc = (datetime.datetime(2026, 1, 2, 12, 0, 0, 250000) - datetime.timedelta(hours=zone_hours))
    assert created_at == utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_created_at_refuses_a_naive_datetime():
    with pytest.raises(ValidationError) as caught:
        encode_event(Event("E"), datetime.datetime(2026, 1, 2, 3, 4, 5))
    assert flatten_errors(caught.value.messages) == [
        "createdAt: naive datetime 2026-01-02T03:04:05; Flyte needs a timezone"]


def test_integers_beyond_2_53_travel_as_strings():
    body = body_of(Event("E", {"big": 2**53 + 1, "edge": 2**53, "negative": -(2**60), "items": [2**64, 7],
                               "flag": True}))
    assert body["payload"] == {"big": str(2**53 + 1), "edge": 2**53, "negative": str(-(2**60)),
                               "items": [str(2**64), 7], "flag": True}


@pytest.mark.parametrize("payload, message", [
    ({"items": [1, 2, {3}]}, "payload.items.2: set is not JSON serializable"),
    ({"n": float("nan")}, "payload.n: nan is not a valid JSON number"),
    ({"n": [float("inf")]}, "payload.n.0: inf is not a valid JSON number"),
    (float("-inf"), "payload: -inf is not a valid JSON number"),
    ({"a": {"b": object()}}, "payload.a.b: object is not JSON serializable"),
    ({"when": datetime.date(2026, 1, 2)}, "payload.when: date is not JSON serializable"),
    ({(1, 2): "x"}, "payload: key (1, 2) is not a string"),
    (b"bytes", "payload: bytes is not JSON serializable"),
])
def test_unserializable_payloads_are_refused_naming_the_path(payload, message):
    with pytest.raises(ValidationError) as caught:
        encode_event(Event("E", payload))
    assert flatten_errors(caught.value.messages) == [message]


def test_tuples_become_lists_and_number_keys_strings():
    assert body_of(Event("E", {"pair": (1, "a"), 3: "three", 1.5: "x"}))["payload"] == {
        "pair": [1, "a"], "3": "three", "1.5": "x"}


@dataclasses.dataclass
class Assignee:
    login: str


@dataclasses.dataclass
class Issue:
    key: str
    labels: list
    assignee: Assignee
    points: int = 2**53 + 2


def test_dataclass_payloads_become_objects():
    payload = [Issue("FOO-1", ["a", "b"], Assignee("ann"))]
    assert body_of(Event("Created", payload))["payload"] == [
        {"key": "FOO-1", "labels": ["a", "b"], "assignee": {"login": "ann"}, "points": str(2**53 + 2)}]


def test_a_dataclass_with_an_unserializable_field_is_refused_naming_the_field():
    with pytest.raises(ValidationError) as caught:
        encode_event(Event("Created", Issue("FOO-1", [{1}], Assignee("ann"))))
    assert flatten_errors(caught.value.messages) == ["payload.labels.0: set is not JSON serializable"]


class IssueSchema(Schema):
    issue_id = fields.String(data_key="issueId")
    url = fields.String()


@pytest.mark.parametrize("schema", [IssueSchema, IssueSchema()], ids=["class", "instance"])
def test_payload_schema_dumps_the_payload(schema):
    created = EventDef("IssueCreated", payload_schema=schema)

    @dataclasses.dataclass
    class Created:
        issue_id: str
        url: str
        internal: str

    body = body_of(Event(created, Created("FOO-1", "https://jira/FOO-1", "not sent")))
    assert body["payload"] == {"issueId": "FOO-1", "url": "https://jira/FOO-1"}


# Payload schemas validate: marshmallow's dump() alone checks nothing, so what it produced is loaded back.

class Step(Schema):
    name = fields.String(required=True)
    took_s = fields.Float(required=True)


class CheckSchema(Schema):
    url = fields.Url(required=True)
    status = fields.String(validate=validate.OneOf(["up", "down"]))
    count = fields.Integer()
    steps = fields.List(fields.Nested(Step))
    first = fields.Nested(Step)
    checked_by = fields.String(dump_only=True, dump_default="url-checker")


@dataclasses.dataclass
class Checked:
    url: str
    status: str = "up"
    steps: list = dataclasses.field(default_factory=list)


def payload_problems(payload, schema=CheckSchema):
    with pytest.raises(ValidationError) as caught:
        encode_event(Event(EventDef("Checked", payload_schema=schema), payload))
    return flatten_errors(caught.value.messages)


@pytest.mark.parametrize("payload, problems", [
    ("hello", ["payload: CheckSchema needs a dict, a dataclass or another object, not str"]),
    (None, ["payload: CheckSchema needs a dict, a dataclass or another object, not None"]),
    ([{"url": "https://example.com"}], ["payload: CheckSchema needs a dict, a dataclass or another object, not list"]),
    (42, ["payload: CheckSchema needs a dict, a dataclass or another object, not int"]),
    ({"status": "up"}, ["payload.url: Missing data for required field."]),
    ({}, ["payload.url: Missing data for required field."]),
    ({"url": None}, ["payload.url: Field may not be null."]),
    ({"url": "not a url"}, ["payload.url: Not a valid URL."]),
    ({"url": "https://example.com", "status": "sideways"}, ["payload.status: Must be one of: up, down."]),
    ({"url": "https://example.com", "count": "many"},
     ["payload.count: cannot be dumped as Integer: invalid literal for int() with base 10: 'many'"]),
    ({"url": "https://example.com", "steps": [{"name": "dns", "took_s": 0.1}, {"name": "tls", "took_s": "slow"}]},
     ["payload.steps.1.took_s: cannot be dumped as Float: could not convert string to float: 'slow'"]),
    ({"url": "https://example.com", "steps": [{"took_s": 0.1}]},
     ["payload.steps.0.name: Missing data for required field."]),
    ({"url": "https://example.com", "first": {"name": "dns", "took_s": "slow"}},
     ["payload.first.took_s: cannot be dumped as Float: could not convert string to float: 'slow'"]),
    (Checked("ftp:nope", steps=[{"name": "dns"}]),
     ["payload.steps.0.took_s: Missing data for required field.", "payload.url: Not a valid URL."]),
], ids=["str", "None", "list", "int", "missing", "empty", "null", "bad-url", "one-of", "not-an-int", "list-item",
        "list-item-missing", "nested", "dataclass"])
def test_a_payload_its_schema_refuses_is_refused_naming_the_fields(payload, problems):
    assert sorted(payload_problems(payload)) == problems


def test_valid_payloads_pass_the_schema_as_dicts_and_dataclasses_with_dump_only_fields():
    event_def = EventDef("Checked", payload_schema=CheckSchema)
    for payload in ({"url": "https://example.com", "status": "up", "steps": [{"name": "dns", "took_s": 0.1}]},
                    Checked("https://example.com", steps=[{"name": "dns", "took_s": 0.1}])):
        assert body_of(Event(event_def, payload))["payload"] == {
            "url": "https://example.com", "status": "up", "steps": [{"name": "dns", "took_s": 0.1}],
            "checked_by": "url-checker"}


def test_a_many_payload_schema_takes_a_list_and_names_the_item():
    event_def = EventDef("Checked", payload_schema=CheckSchema(many=True, only=("url",)))
    assert body_of(Event(event_def, [{"url": "https://a.example"}]))["payload"] == [{"url": "https://a.example"}]
    assert payload_problems([{"url": "https://a.example"}, {}], CheckSchema(many=True)) == \
        ["payload.1.url: Missing data for required field."]
    assert payload_problems({"url": "https://a.example"}, CheckSchema(many=True)) == \
        ["payload: CheckSchema needs a list, not dict"]


def test_a_namedtuple_payload_is_read_by_attribute_and_a_failing_dump_hook_is_named():
    point = collections.namedtuple("Point", "url status")
    schema = CheckSchema(only=("url", "status"))  # not count: a tuple's count is its method
    assert body_of(Event(EventDef("Checked", payload_schema=schema), point("https://example.com", "up")))[
        "payload"] == {"url": "https://example.com", "status": "up"}

    class Exploding(Schema):
        url = fields.String()

        @post_dump
        def _boom(self, data, **kwargs):
            raise KeyError("lookup table missing")

    assert payload_problems({"url": "x"}, Exploding) == ["payload: cannot be dumped: KeyError: 'lookup table missing'"]


def test_event_body_round_trips_through_json():
    created_at = datetime.datetime(2026, 1, 2, 9, 0, 0, 1000, UTC)
    event = Event("Tick", {"time": "2026-01-02T09:00:00Z", "n": [1, 2.5, None, True]})
    loaded = EventBodySchema().load(json.loads(encode_event(event, created_at)))
    assert loaded == {"event": "Tick", "payload": event.payload, "created_at": created_at}
    assert EventBodySchema().dump(loaded) == json.loads(encode_event(event, created_at))


def test_appendix_a_result_body_loads():
    loaded = EventBodySchema().load(json.loads(
        '{"event": "Echoed", "payload": {"text": "hi"}, "createdAt": "2026-01-02T03:04:06.5Z"}'))
    assert loaded == {"event": "Echoed", "payload": {"text": "hi"},
                      "created_at": datetime.datetime(2026, 1, 2, 3, 4, 6, 500000, UTC)}


@pytest.mark.parametrize("created_at", ["2026-01-02T03:04:05.123456", "2026-01-02 03:04:05Z", 1641135845,
                                        "2026-01-02", "yesterday"])
def test_event_body_refuses_created_at_values_flyte_refuses(created_at):
    with pytest.raises(ValidationError) as caught:
        EventBodySchema().load({"event": "E", "payload": None, "createdAt": created_at})
    assert list(caught.value.messages) == ["createdAt"]


# --- actions -------------------------------------------------------------------------------------------------------

RESULT_HREF = "http://flyte.example:8080/v1/packs/Echo.env.dev/actions/65a1b2c3d4e5f60718293a4b/result"
RESULT_REL = "http://flyte.example:8080/swagger#/actionResult"


def take_body(input_json, links=None):
    links = links if links is not None else [{"href": RESULT_HREF, "rel": RESULT_REL}]
    return json.loads(f'{{"command": "Echo", "input": {input_json}, "links": {json.dumps(links)}}}')


@pytest.mark.parametrize("input_json, expected", [
    ('{"text": "hi"}', {"text": "hi"}),
    ('"echo -e \'world\\\\nhello\' | sort"', "echo -e 'world\\nhello' | sort"),
    ("42", 42),
    ("1.5", 1.5),
    ("null", None),
    ("[1, \"two\"]", [1, "two"]),
    ("true", True),
])
def test_action_input_is_any_json_value(input_json, expected):
    action = ActionSchema().load(take_body(input_json))
    assert action == Action("65a1b2c3d4e5f60718293a4b", "Echo", expected, RESULT_HREF)


def test_appendix_a_take_body_loads_into_an_action():
    text = ('{"command": "Echo", "input": {"text": "hi"}, "links": [{"href": '
            '"http://flyte.example:8080/v1/packs/Echo.env.dev/actions/65a1b2c3d4e5f60718293a4b/result", '
            '"rel": "http://flyte.example:8080/swagger#/actionResult"}], "extra": "ignored"}')
    assert ActionSchema().load(json.loads(text)) == Action(
        "65a1b2c3d4e5f60718293a4b", "Echo", {"text": "hi"}, RESULT_HREF)


def test_result_link_is_chosen_by_fragment_among_decoys_and_links_without_rel():
    links = [
        {"href": "http://decoy/no-rel"},
        {"href": "http://decoy/suffix", "rel": "http://h/swagger#/myactionResult"},
        {"href": RESULT_HREF, "rel": RESULT_REL},
        {"href": "http://decoy/longer", "rel": "http://h/swagger#/actionResults"},
    ]
    assert ActionSchema().load(take_body("1", links)).result_url == RESULT_HREF


@pytest.mark.parametrize("href, expected", [
    ("http://h/v1/packs/P/actions/abc123/result", "abc123"),
    ("http://h/v1/packs/P.env.dev/actions/65a1b2c3d4e5f60718293a4b/result?x=1", "65a1b2c3d4e5f60718293a4b"),
    ("http://h/v1/packs/P/actions/abc123/result/", "abc123"),
    ("http://h/elsewhere", "http://h/elsewhere"),  # an unknown shape: the whole URL still identifies it
])
def test_action_id_is_parsed_from_the_result_href(href, expected):
    assert action_id_from_url(href) == expected


@pytest.mark.parametrize("body, lines", [
    ({}, ["command: Missing data for required field.", "input: Missing data for required field.",
          "links: Missing data for required field."]),
    ({"command": "Echo", "input": 1}, ["links: Missing data for required field."]),
    ({"command": 7, "input": 1, "links": [{"href": RESULT_HREF, "rel": RESULT_REL}]}, ["command: Not a valid string."]),
    ({"command": "Echo", "input": 1, "links": "x"}, ["links: Not a valid list."]),
    ({"command": "Echo", "input": 1, "links": [{"rel": RESULT_REL}]},
     ["links.0.href: Missing data for required field."]),
    ({"command": "Echo", "input": 1, "links": [{"href": "http://h/x", "rel": "http://h/swagger#/event"}]},
     ["links: no link with rel .../actionResult"]),
    ({"command": "Echo", "input": 1, "links": []}, ["links: no link with rel .../actionResult"]),
    ([1, 2], ["Invalid input type."]),
])
def test_malformed_action_bodies_raise_validation_errors(body, lines):
    with pytest.raises(ValidationError) as caught:
        ActionSchema().load(body)
    assert flatten_errors(caught.value.messages) == lines


# --- links -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("link", [Link("http://h/v1", "self"), Link("http://h/help", None),
                                  Link("http://h/v1/packs", "http://h/swagger#!/pack/listPacks")])
def test_link_round_trips_and_omits_an_empty_rel(link):
    dumped = LinkSchema().dump(link)
    assert ("rel" in dumped) == (link.rel is not None)
    assert LinkSchema().load(json.loads(json.dumps(dumped))) == link


V1_DOCUMENT = """{"links": [
  {"href": "http://flyte.example:8080/v1", "rel": "self"},
  {"href": "http://flyte.example:8080/health", "rel": "http://flyte.example:8080/swagger#!/info/health"},
  {"href": "http://flyte.example:8080/v1/packs", "rel": "http://flyte.example:8080/swagger#!/pack/listPacks"}]}"""


def test_links_document_round_trips_and_yields_the_discovery_links():
    document = LinksDocumentSchema().load(json.loads(V1_DOCUMENT))
    assert find_link(document["links"], REL_PACKS) == "http://flyte.example:8080/v1/packs"
    assert find_link(document["links"], REL_HEALTH) == "http://flyte.example:8080/health"
    assert LinksDocumentSchema().load(json.loads(json.dumps(LinksDocumentSchema().dump(document)))) == document


def test_links_document_without_links_is_invalid():
    with pytest.raises(ValidationError) as caught:
        LinksDocumentSchema().load({"self": "http://h/v1"})
    assert flatten_errors(caught.value.messages) == ["links: Missing data for required field."]


def test_appendix_a_registration_response_yields_take_and_events_links():
    text = """{"id": "Echo.env.dev", "name": "Echo", "labels": {"env": "dev"},
      "commands": [{"name": "Echo", "events": ["Echoed"],
                    "links": [{"href": "http://flyte.example:8080/v1/packs/Echo.env.dev/actions/take?commandName=Echo",
                               "rel": "http://flyte.example:8080/swagger#!/action/takeAction"}]}],
      "events": [{"name": "Echoed"}], "lastSeen": "2026-01-02T03:04:05.123456789Z", "status": "live",
      "links": [
       {"href": "http://flyte.example:8080/v1/packs/Echo.env.dev", "rel": "self"},
       {"href": "http://flyte.example:8080/v1/packs", "rel": "up"},
       {"href": "http://flyte.example:8080/v1/packs/Echo.env.dev/actions/take",
        "rel": "http://flyte.example:8080/swagger#!/action/takeAction"},
       {"href": "http://flyte.example:8080/v1/packs/Echo.env.dev/events",
        "rel": "http://flyte.example:8080/swagger#/event"}]}"""
    pack = PackResponseSchema().load(json.loads(text))
    assert pack["id"] == "Echo.env.dev"
    assert find_link(pack["links"], REL_TAKE) == "http://flyte.example:8080/v1/packs/Echo.env.dev/actions/take"
    assert find_link(pack["links"], REL_EVENTS) == "http://flyte.example:8080/v1/packs/Echo.env.dev/events"
    assert find_link(pack["links"], "self") == "http://flyte.example:8080/v1/packs/Echo.env.dev"


def test_registration_response_without_links_loads_with_an_empty_list():
    assert PackResponseSchema().load({"id": "X"}) == {"id": "X", "name": None, "links": []}


@pytest.mark.parametrize("rel", ["event", "http://h/swagger#/event", "http://h/swagger#!/event", "x#event",
                                 "http://proxy.example:9999/swagger#/event"])
def test_find_link_matches_a_rel_on_a_slash_or_hash_boundary(rel):
    assert find_link([Link("http://right", rel)], REL_EVENTS) == "http://right"


@pytest.mark.parametrize("rel", ["prevent", "x-event", "events", "http://h/swagger#/eventx", "http://h/swagger#/Event",
                                 "", None])
def test_find_link_never_matches_a_mere_suffix_or_another_name(rel):
    assert find_link([Link("http://wrong", rel)], REL_EVENTS) is None


def test_find_link_ignores_prevent_and_takes_the_servers_event_link():
    links = [Link("http://user/prevent", "prevent"),
             Link("http://h/v1/packs/P/events", "http://h/swagger#/event")]
    assert find_link(links, REL_EVENTS) == "http://h/v1/packs/P/events"


def test_find_link_prefers_the_server_links_listed_last():
    # The server lists a pack's registered links first and its own last (flyte-api.md §1.4).
    links = [Link("http://user/take", "my#/action/takeAction"), Link("http://user/events", "custom#event"),
             Link("http://h/v1/packs/P", "self"),
             Link("http://h/v1/packs/P/actions/take", "http://h/swagger#!/action/takeAction"),
             Link("http://h/v1/packs/P/events", "http://h/swagger#/event")]
    assert find_link(links, REL_TAKE) == "http://h/v1/packs/P/actions/take"
    assert find_link(links, REL_EVENTS) == "http://h/v1/packs/P/events"
    assert find_link(links, REL_RESULT) is None


# --- error messages --------------------------------------------------------------------------------------------

def test_flatten_errors_gives_one_dotted_line_per_message():
    messages = {
        "links": {0: {"href": ["Missing data for required field."]}, 2: {"rel": ["Not a valid string."]}},
        "command": ["Not a valid string.", "Too short."],
        "_schema": ["Invalid body."],
        "pack": {"_schema": ["Unknown field."]},
    }
    assert flatten_errors(messages) == [
        "links.0.href: Missing data for required field.",
        "links.2.rel: Not a valid string.",
        "command: Not a valid string.",
        "command: Too short.",
        "Invalid body.",
        "pack: Unknown field.",
    ]


def test_flatten_errors_accepts_bare_lists_strings_and_a_prefix():
    assert flatten_errors(["one", "two"]) == ["one", "two"]
    assert flatten_errors("alone") == ["alone"]
    assert flatten_errors({"a": ["x"]}, prefix="body") == ["body.a: x"]
    assert flatten_errors({}) == []


def test_validate_accepts_labels_the_go_format_allows():
    # FLYTE_LABELS='a=b=c' gives the value 'b=c' (Go splits on the first '='); '=' is legal in a path.
    PackDef("P", labels={"a": "b=c", "team": "a&b", "empty": ""}).validate()
