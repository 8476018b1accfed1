"""``flyte_gevent.testing.run_handler``: a handler's outcome as the runtime would post it, without HTTP.

Every case here is one the pack tests (tests/test_pack.py) see over loopback HTTP, with the same text: the helper
runs the runtime's own ActionRunner, so input schemas, timeouts, FATAL texts, payload schemas and the
undeclared-event warning are the ones a running pack applies.
"""

import dataclasses
import logging

import gevent
import pytest
from marshmallow import Schema, fields

from flyte_gevent import Command, Event, EventDef, PackDef, current_action, fatal_event
from flyte_gevent.testing import run_handler

done = EventDef("Done")
other = EventDef("Other")


class Checked(Schema):
    url = fields.String(required=True)
    status = fields.Integer(required=True)


checked = EventDef("UrlChecked", payload_schema=Checked)


class CheckInput(Schema):
    url = fields.Url(required=True)
    timeout_s = fields.Float(load_default=5.0)


@dataclasses.dataclass
class Result:
    url: str
    status: int


def make_pack_def():
    pack_def = PackDef("Unit")

    @pack_def.command("checkUrl", output_events=[checked], input_schema=CheckInput)
    def check_url(input):
        if input["url"].endswith("/boom"):
            raise ConnectionError(f"cannot reach {input['url']}")
        if input["url"].endswith("/missing"):
            return Event(checked, {"url": input["url"]})
        return Event(checked, Result(input["url"], 200))

    @pack_def.command("echo", output_events=[done])
    def echo(input):
        return Event(done, {"input": input, "action": current_action().command})

    @pack_def.command("wrong", output_events=[done])
    def wrong(input):
        return Event(other, input)

    @pack_def.command("garbage", output_events=[done])
    def garbage(input):
        return {"not": "an event"}

    @pack_def.command("fails", output_events=[done])
    def fails(input):
        return fatal_event({"why": "it said so"})

    @pack_def.command("slow", output_events=[done], timeout=0.2)
    def slow(input):
        gevent.sleep(5)

    return pack_def


pack_def = make_pack_def()


def test_a_result_is_the_event_and_payload_as_posted():
    assert run_handler(pack_def, "checkUrl", {"url": "https://example.com/"}) == \
        Event(checked, {"url": "https://example.com/", "status": 200})  # the dataclass, dumped by the schema


def test_input_reaches_the_handler_as_a_flow_delivers_it_with_the_action_context_set():
    assert run_handler(pack_def, "echo", {"n": 1.0, "gone": None, "big": 2 ** 53 + 1}) == \
        Event(done, {"input": {"n": 1, "big": 9007199254740992}, "action": "echo"})


@pytest.mark.parametrize("command, input, payload", [
    ("checkUrl", {"url": "https://user:secret@db.example/boom"},
     "ConnectionError: cannot reach https://***@db.example/boom"),
    ("checkUrl", {"url": "not a url"}, "invalid input for command 'checkUrl':\nurl: Not a valid URL."),
    ("checkUrl", {"url": "https://example.com/missing"},
     "result payload of event 'UrlChecked' cannot be serialized: payload.status: Missing data for required field."),
    ("garbage", None, "handler for command 'garbage' returned dict, expected an Event"),
    ("fails", None, {"why": "it said so"}),
    ("slow", None, "timed out after 0.2 s"),
    ("nope", None, "Unknown command 'nope'"),
])
def test_every_failure_is_the_fatal_the_runtime_would_post(command, input, payload):
    result = run_handler(pack_def, command, input)
    assert (result.name, result.payload) == ("FATAL", payload)


def test_the_pack_default_action_timeout_applies_when_given():
    quick = PackDef("Quick")
    quick.command("wait", output_events=[done])(lambda input: gevent.sleep(5))
    assert run_handler(quick, "wait", action_timeout=0.1) == fatal_event("timed out after 0.1 s")


def test_an_undeclared_result_event_is_returned_and_warned_about(caplog):
    assert run_handler(pack_def, "wrong", [1, 2]) == Event(other, [1, 2])
    assert "command 'wrong' returned event 'Other', which is not among its output_events" in [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_failure_event_replaces_fatal_for_bad_input():
    typed = PackDef("Typed")
    typed.command("check", output_events=[done], input_schema=CheckInput, failure_event="BadInput")(
        lambda input: Event(done, input))
    assert run_handler(typed, "check", {}) == Event("BadInput", "invalid input for command 'check':\n"
                                                                "url: Missing data for required field.")


def test_the_definition_is_validated_and_input_that_no_flow_can_carry_is_refused():
    broken = PackDef("Broken")
    broken.commands.append(Command("x", lambda input: None))
    broken.commands.append(Command("x", lambda input: None))
    with pytest.raises(ValueError, match="command 'x' is defined twice"):
        run_handler(broken, "x")
    with pytest.raises(ValueError, match=r"input\[1\] is null"):
        run_handler(pack_def, "echo", [1, None])
    with pytest.raises(TypeError, match="PackDef"):
        run_handler(object(), "echo")
