"""Typed commands: the decorator API, marshmallow input schemas, payload schemas and dataclass payloads.

Each test runs a pack in process against the fake Flyte API and looks at what the server received.
"""

import dataclasses
import json

import pytest
from marshmallow import Schema, ValidationError, fields, post_load, validate, validates_schema

from flyte_gevent import Command, Event, EventDef, PackDef, PackDefError
from flyte_gevent.schemas import registration_body

created = EventDef("IssueCreated")
invalid = EventDef("InvalidIssue")


@dataclasses.dataclass(frozen=True)
class NewIssue:
    project: str
    summary: str
    priority: str
    labels: tuple


class CreateIssueSchema(Schema):
    """marshmallow 4 style: explicit fields, ``load_default``, ``**kwargs`` on hooks, loads into a dataclass."""

    project = fields.String(required=True, validate=validate.Length(min=1))
    summary = fields.String(required=True)
    priority = fields.String(load_default="low", validate=validate.OneOf(["low", "high"]))
    labels = fields.List(fields.String(), data_key="issueLabels", load_default=list)

    @validates_schema
    def _no_shouting(self, data, **kwargs):
        if data.get("summary", "").isupper():
            raise ValidationError("please do not shout", "summary")

    @post_load
    def _make(self, data, **kwargs):
        return NewIssue(data["project"], data["summary"], data["priority"], tuple(data["labels"]))


@dataclasses.dataclass
class Issue:
    issue_id: str
    project: str
    internal_note: str = "never sent"


class IssueSchema(Schema):
    issueId = fields.String(attribute="issue_id")
    project = fields.String()


def _issue_pack(schema, received, **options):
    pack_def = PackDef("Jira")

    @pack_def.command("createIssue", output_events=[created], input_schema=schema, **options)
    def create_issue(issue):
        received.append(issue)
        return Event(created, {"issueId": f"{issue.project}-1", "priority": issue.priority})

    return pack_def, create_issue


# -- the decorator ---------------------------------------------------------------------------------------------


def test_decorator_registers_the_command_and_returns_the_function_unchanged():
    def handler(input):
        return Event(created, input)

    pack_def = PackDef("Jira")
    returned = pack_def.command("createIssue", output_events=[created], help_url="https://example.com/create",
                                input_schema=CreateIssueSchema, timeout=5)(handler)
    assert returned is handler
    (command,) = pack_def.commands
    assert (command.name, command.handler, command.output_events, command.timeout) == \
        ("createIssue", handler, (created,), 5)
    assert isinstance(command.input_schema, CreateIssueSchema)
    assert registration_body(pack_def)["commands"] == [
        {"name": "createIssue", "events": ["IssueCreated"],
         "links": [{"href": "https://example.com/create", "rel": "help"}]}]


def test_decorated_and_explicit_commands_run_side_by_side(flyte_api, run_pack):
    pack_def = PackDef("Mixed", commands=[Command("explicit", lambda input: Event(created, {"via": "explicit"}),
                                                  [created])])

    @pack_def.command("decorated", output_events=[created])
    def decorated(input):
        return Event(created, {"via": "decorated"})

    run_pack(pack_def)
    ids = [flyte_api.enqueue("Mixed", name) for name in ("explicit", "decorated")]
    assert [r.payload for r in flyte_api.wait_for_results(ids)] == [{"via": "explicit"}, {"via": "decorated"}]


# -- input schemas --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schema", [CreateIssueSchema, CreateIssueSchema()], ids=["class", "instance"])
def test_input_is_validated_and_loaded_before_the_handler_runs(schema, flyte_api, run_pack):
    received = []
    run_pack(_issue_pack(schema, received)[0])
    action = flyte_api.enqueue("Jira", "createIssue", {"project": "OPS", "summary": "Disk full",
                                                       "issueLabels": ["disk", "web-1"]})
    result = flyte_api.wait_for_result(action)
    assert (result.event, result.payload) == ("IssueCreated", {"issueId": "OPS-1", "priority": "low"})
    assert received == [NewIssue("OPS", "Disk full", "low", ("disk", "web-1"))]


def test_invalid_input_completes_the_action_as_fatal_with_one_line_per_problem(flyte_api, run_pack):
    received = []
    run_pack(_issue_pack(CreateIssueSchema, received)[0])
    action = flyte_api.enqueue("Jira", "createIssue", {"project": "", "priority": "urgent",
                                                       "issueLabels": ["ok", 7], "bogus": True})
    result = flyte_api.wait_for_result(action)
    assert result.event == "FATAL"
    first, *problems = result.payload.splitlines()
    assert first == "invalid input for command 'createIssue':"
    assert sorted(problems) == [
        "bogus: Unknown field.",
        "issueLabels.1: Not a valid string.",
        "priority: Must be one of: low, high.",
        "project: Shorter than minimum length 1.",
        "summary: Missing data for required field.",
    ]
    assert received == []  # the handler never saw the bad input


def test_schema_level_validation_errors_are_reported_too(flyte_api, run_pack):
    run_pack(_issue_pack(CreateIssueSchema, [])[0])
    result = flyte_api.wait_for_result(flyte_api.enqueue("Jira", "createIssue",
                                                         {"project": "OPS", "summary": "DISK FULL"}))
    assert result.payload.splitlines()[1:] == ["summary: please do not shout"]


@pytest.mark.parametrize("payload", ["just text", [1, 2], 42, None])
def test_input_that_is_not_a_json_object_is_fatal_not_a_crash(payload, flyte_api, run_pack):
    received = []
    run_pack(_issue_pack(CreateIssueSchema, received)[0])
    result = flyte_api.wait_for_result(flyte_api.enqueue("Jira", "createIssue", payload))
    assert result.event == "FATAL"
    assert result.payload == "invalid input for command 'createIssue':\ninput: Invalid input type."
    assert received == []


def test_the_commands_failure_event_replaces_fatal_and_is_registered(flyte_api, run_pack):
    pack_def, _ = _issue_pack(CreateIssueSchema, [], failure_event=invalid)
    assert registration_body(pack_def)["commands"] == [{"name": "createIssue",
                                                         "events": ["IssueCreated", "InvalidIssue"]}]
    run_pack(pack_def)
    result = flyte_api.wait_for_result(flyte_api.enqueue("Jira", "createIssue", {"project": "OPS"}))
    assert result.event == "InvalidIssue"
    assert result.payload == "invalid input for command 'createIssue':\nsummary: Missing data for required field."


def test_an_exception_while_loading_input_is_fatal_like_a_handler_exception(flyte_api, run_pack):
    class Exploding(Schema):
        name = fields.String()

        @post_load
        def _make(self, data, **kwargs):
            raise KeyError("lookup table missing")

    pack_def = PackDef("Jira")
    pack_def.command("createIssue", output_events=[created], input_schema=Exploding)(lambda issue: None)
    run_pack(pack_def)
    result = flyte_api.wait_for_result(flyte_api.enqueue("Jira", "createIssue", {"name": "x"}))
    assert (result.event, result.payload) == ("FATAL", "KeyError: 'lookup table missing'")


def test_an_input_schema_that_is_not_a_schema_is_refused_where_the_command_is_declared():
    pack_def = PackDef("Jira")
    with pytest.raises(PackDefError) as caught:
        pack_def.command("createIssue", output_events=[created], input_schema={"project": str})(lambda issue: None)
    assert str(caught.value) == \
        "command 'createIssue': input_schema must be a marshmallow Schema (class or instance), not dict"
    assert pack_def.commands == []


# -- payloads -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schema", [IssueSchema, IssueSchema()], ids=["class", "instance"])
def test_payload_schema_dumps_results_and_spontaneous_events(schema, flyte_api, run_pack):
    issue_created = EventDef("IssueCreated", payload_schema=schema)
    pack_def = PackDef("Jira", event_defs=[issue_created])
    pack_def.command("createIssue", output_events=[issue_created])(
        lambda input: Event(issue_created, Issue("OPS-7", "OPS")))
    pack = run_pack(pack_def)
    result = flyte_api.wait_for_result(flyte_api.enqueue("Jira", "createIssue", {}))
    assert result.payload == {"issueId": "OPS-7", "project": "OPS"}  # renamed, internal_note left out
    pack.send_event(Event(issue_created, Issue("OPS-8", "OPS")), timeout=5)
    (event,) = flyte_api.wait_for_events(1)
    assert (event.event, event.payload) == ("IssueCreated", {"issueId": "OPS-8", "project": "OPS"})


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    took_s: float


@dataclasses.dataclass(frozen=True)
class Report:
    steps: tuple
    ticket: int
    meta: dict = dataclasses.field(default_factory=dict)


def test_dataclass_payloads_travel_as_json_objects(flyte_api, run_pack):
    done = EventDef("Done")
    report = Report((Step("build", 1.5), Step("test", 0.25)), 2**60, {"ok": True})
    pack_def = PackDef("Reporter")
    pack_def.command("report", output_events=[done])(lambda input: Event(done, report))
    run_pack(pack_def)
    result = flyte_api.wait_for_result(flyte_api.enqueue("Reporter", "report"))
    assert result.payload == {"steps": [{"name": "build", "took_s": 1.5}, {"name": "test", "took_s": 0.25}],
                              "ticket": str(2**60), "meta": {"ok": True}}  # big integers travel as strings


def test_a_payload_the_schema_cannot_dump_is_fatal_naming_the_event(flyte_api, run_pack):
    class Strict(Schema):
        count = fields.Integer()

    counted = EventDef("Counted", payload_schema=Strict)
    pack_def = PackDef("Counter")
    pack_def.command("count", output_events=[counted])(lambda input: Event(counted, {"count": "many"}))
    run_pack(pack_def)
    result = flyte_api.wait_for_result(flyte_api.enqueue("Counter", "count"))
    assert result.event == "FATAL"
    assert result.payload == ("result payload of event 'Counted' cannot be serialized: payload.count: cannot be "
                              "dumped as Integer: invalid literal for int() with base 10: 'many'")
    assert flyte_api.pending() == []


class UrlCheckedSchema(Schema):
    url = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(["up", "down"]))


url_checked = EventDef("UrlChecked", payload_schema=UrlCheckedSchema)


@dataclasses.dataclass
class UrlChecked:
    url: str
    status: str


@pytest.mark.parametrize("payload, problems", [
    ("hello", "payload: UrlCheckedSchema needs a dict, a dataclass or another object, not str"),
    ({"status": "up"}, "payload.url: Missing data for required field."),
    ({"url": "https://example.com", "status": "sideways"}, "payload.status: Must be one of: up, down."),
    (UrlChecked("https://example.com", None), "payload.status: Field may not be null."),
], ids=["str", "missing", "one-of", "dataclass"])
def test_a_result_payload_its_schema_refuses_is_fatal_naming_the_fields(payload, problems, flyte_api, run_pack):
    pack_def = PackDef("UrlChecker")
    pack_def.command("checkUrl", output_events=[url_checked])(lambda input: Event(url_checked, payload))
    run_pack(pack_def)
    result = flyte_api.wait_for_result(flyte_api.enqueue("UrlChecker", "checkUrl"))
    assert (result.event, result.payload) == (
        "FATAL", f"result payload of event 'UrlChecked' cannot be serialized: {problems}")


def test_a_valid_dataclass_result_passes_its_schema(flyte_api, run_pack):
    pack_def = PackDef("UrlChecker")
    pack_def.command("checkUrl", output_events=[url_checked])(
        lambda input: Event(url_checked, UrlChecked("https://example.com", "up")))
    run_pack(pack_def)
    result = flyte_api.wait_for_result(flyte_api.enqueue("UrlChecker", "checkUrl"))
    assert (result.event, result.payload) == ("UrlChecked", {"url": "https://example.com", "status": "up"})


@pytest.mark.parametrize("send", ["send_event", "send_event_nowait"])
def test_a_spontaneous_event_its_schema_refuses_raises_naming_the_fields(send, flyte_api, run_pack):
    pack = run_pack(PackDef("UrlChecker", event_defs=[url_checked]))
    with pytest.raises(ValueError) as caught:
        getattr(pack, send)(Event(url_checked, {"status": "up"}))
    assert str(caught.value) == \
        "event 'UrlChecked': payload cannot be serialized: payload.url: Missing data for required field."
    pack.send_event(Event(url_checked, {"url": "https://example.com", "status": "down"}), timeout=5)
    (event,) = flyte_api.wait_for_events(1)
    assert (event.event, event.payload) == ("UrlChecked", {"url": "https://example.com", "status": "down"})


def test_raw_json_input_still_reaches_untyped_handlers_unchanged(flyte_api, run_pack):
    seen = []
    pack_def = PackDef("Raw")
    pack_def.command("take", output_events=[created])(lambda input: seen.append(input) or Event(created, None))
    run_pack(pack_def)
    value = {"nested": [1, "two", {"three": False}]}  # (a flow cannot deliver a null member: the fake drops it)
    flyte_api.wait_for_result(flyte_api.enqueue("Raw", "take", value))
    assert seen == [json.loads(json.dumps(value))]
