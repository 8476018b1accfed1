"""Definition mistakes are refused where they are made, with the message a pack author needs.

``Command``, ``EventDef``, ``PackDef``, ``@pack_def.command(...)`` and ``with_labels`` check their
arguments when called, so the traceback points at the line with the mistake instead of at
``start()``; ``PackDef.validate()`` (run by ``start()`` and ``flyte-gevent check``) re-checks what
can change afterwards, with the same messages. No network here.
"""

import subprocess
import sys

import pytest
from marshmallow import Schema, fields

from flyte_gevent import Command, ConfigError, EventDef, PackDef, PackDefError
from flyte_gevent.schemas import registration_body

PATH_CHARACTERS = "outside the characters Flyte can put into links unescaped (ASCII letters, digits and " \
                  "._~!$&'()*+,;=:@-)"
QUERY_CHARACTERS = "outside the characters Flyte can put into a query string unescaped (ASCII letters, digits " \
                   "and -._~)"
done = EventDef("Done")


def handler(input):
    return None


def refused(make):
    """The message of the PackDefError that calling *make* raises."""
    with pytest.raises(PackDefError) as caught:
        make()
    assert isinstance(caught.value, ConfigError)  # the CLI exits 78 for it
    return str(caught.value)


class UrlSchema(Schema):
    url = fields.String(required=True)


# -- output events: one event needs no list ------------------------------------------------------------------


@pytest.mark.parametrize("events", ["Done", done, ["Done"], (done,)], ids=["name", "EventDef", "list", "tuple"])
def test_a_single_output_event_name_or_event_def_is_that_one_event(events):
    command = Command("finish", handler, output_events=events)
    assert command.output_events == (done,)
    assert registration_body(PackDef("P", commands=[command]))["commands"] == [{"name": "finish", "events": ["Done"]}]


@pytest.mark.parametrize("events", ["Tick", EventDef("Tick"), ["Tick"]], ids=["name", "EventDef", "list"])
def test_a_single_pack_event_name_or_event_def_is_that_one_event(events):
    assert PackDef("P", event_defs=events).event_defs == [EventDef("Tick")]


def test_the_decorator_takes_a_single_output_event_too():
    pack_def = PackDef("P")
    pack_def.command("finish", output_events="Done")(handler)
    assert pack_def.commands[0].output_events == (done,)


@pytest.mark.parametrize("events, kind", [([done, 42], "int"), (42, "int"), ([None], "NoneType")])
def test_output_events_of_another_type_are_refused_naming_the_command(events, kind):
    assert refused(lambda: Command("finish", handler, output_events=events)) == \
        f"command 'finish': output events must be EventDef objects or event names, not {kind}"


# -- Command, EventDef and PackDef check their arguments -----------------------------------------------------


@pytest.mark.parametrize("make, message", [
    (lambda: Command("Run", None), "command 'Run': handler is not callable"),
    (lambda: Command("Run", "handler"), "command 'Run': handler is not callable"),
    (lambda: Command("", handler), "command name '' must not be empty"),
    (lambda: Command(None, handler), "command name None must be a string, not NoneType"),
    (lambda: Command("do it", handler), f"command name 'do it' holds ' ', {QUERY_CHARACTERS}"),
    (lambda: Command("a?b&c", handler), f"command name 'a?b&c' holds '?', '&', {QUERY_CHARACTERS}"),
    (lambda: Command("prüfen", handler), f"command name 'prüfen' holds 'ü', {QUERY_CHARACTERS}"),
    (lambda: Command("Run\n", handler), f"command name 'Run\\n' holds '\\n', {QUERY_CHARACTERS}"),
    (lambda: Command("Run", handler, help_url="nope"), "command 'Run' help_url 'nope' is not an http(s) URL"),
    (lambda: Command("Run", handler, input_schema={"url": str}),
     "command 'Run': input_schema must be a marshmallow Schema (class or instance), not dict"),
    (lambda: Command("Run", handler, input_schema=dict),
     "command 'Run': input_schema must be a marshmallow Schema (class or instance), not dict"),
    (lambda: Command("Run", handler, failure_event=3),
     "command 'Run': failure_event must be an EventDef or an event name, not int"),
    (lambda: Command("Run", handler, failure_event=EventDef("RunRefused", payload_schema=UrlSchema)),
     ("command 'Run': failure_event 'RunRefused' must not have a payload_schema (its payload is the text listing "
      "the input's problems)")),
    (lambda: Command("Run", handler, timeout=0), "command 'Run': timeout must be a positive number of seconds, not 0"),
    (lambda: Command("Run", handler, timeout="5"),
     "command 'Run': timeout must be a positive number of seconds, not '5'"),
    (lambda: Command("", None), "command name '' must not be empty; command '': handler is not callable"),
])
def test_command_refuses_bad_arguments_where_it_is_made(make, message):
    assert refused(make) == message


@pytest.mark.parametrize("make, message", [
    (lambda: EventDef(""), "an event definition has an empty name"),
    (lambda: EventDef(None), "event name None must be a string, not NoneType"),
    (lambda: EventDef("E", help_url="nope"), "event 'E' help_url 'nope' is not an http(s) URL"),
    (lambda: EventDef("E", payload_schema={"url": str}),
     "event 'E': payload_schema must be a marshmallow Schema (class or instance), not dict"),
    (lambda: EventDef("E", payload_schema=str),
     "event 'E': payload_schema must be a marshmallow Schema (class or instance), not str"),
])
def test_event_def_refuses_bad_arguments_where_it_is_made(make, message):
    assert refused(make) == message


def test_event_def_turns_a_schema_class_into_one_instance():
    assert isinstance(EventDef("E", payload_schema=UrlSchema).payload_schema, UrlSchema)
    instance = UrlSchema()
    assert EventDef("E", payload_schema=instance).payload_schema is instance


@pytest.mark.parametrize("make, problem", [
    (lambda: PackDef(""), "pack name '' must not be empty"),
    (lambda: PackDef(None), "pack name None must be a string, not NoneType"),
    (lambda: PackDef("my pack"), f"pack name 'my pack' holds ' ', {PATH_CHARACTERS}"),
    (lambda: PackDef("a/b?c"), f"pack name 'a/b?c' holds '/', '?', {PATH_CHARACTERS}"),
    (lambda: PackDef("ünï"), f"pack name 'ünï' holds 'ü', 'ï', {PATH_CHARACTERS}"),
    (lambda: PackDef("P\n"), f"pack name 'P\\n' holds '\\n', {PATH_CHARACTERS}"),
    (lambda: PackDef("P", labels={"n": 1}), "label n=1: the value must be a string, not int"),
    (lambda: PackDef("P", labels={"env": None}), "label env=None: the value must be a string, not NoneType"),
    (lambda: PackDef("P", labels={1: "a"}), "label key 1 must be a string, not int"),
    (lambda: PackDef("P", labels={"": "x"}), "label key '' must not be empty"),
    (lambda: PackDef("P", labels={"team/x": "a"}), f"label key 'team/x' holds '/', {PATH_CHARACTERS}"),
    (lambda: PackDef("P", labels={"env": "dev test"}),
     f"label env='dev test': the value holds ' ', {PATH_CHARACTERS}"),
    (lambda: PackDef("P", labels={"ünï": "cødé"}),
     (f"label key 'ünï' holds 'ü', 'ï', {PATH_CHARACTERS}; label ünï='cødé': the value holds 'ø', 'é', "
      f"{PATH_CHARACTERS}")),
    (lambda: PackDef("P", labels="env=dev"), "labels must be a dict, not str"),
    (lambda: PackDef("P", links=["https://example.com/docs"]), "links must be a dict, not list"),
    (lambda: PackDef("P", commands=[Command("Run", handler), Command("Run", handler)]),
     "command 'Run' is defined twice"),
    (lambda: PackDef("P", commands=["Run"]), "commands must be Command objects, got str"),
    (lambda: PackDef("P", commands="Run"), "commands must be Command objects, got str"),
    (lambda: PackDef("P", event_defs=[3]), "event_defs must be EventDef objects or event names, got int"),
    (lambda: PackDef("P", help_url="not a url"), "help_url 'not a url' is not an http(s) URL"),
    (lambda: PackDef("P", links={"setup": "https://example.com/x"}),
     ("link rel 'setup' is refused by the Flyte server (it matches 'up|self|/actionResult$|/takeAction$|/event$', "
      "which catches any rel containing 'up' or 'self')")),
])
def test_pack_def_refuses_bad_arguments_where_it_is_made(make, problem):
    message = refused(make)
    assert message.split(": ", 1)[1] == problem
    assert message.startswith("invalid pack definition ")
    assert "\n" not in message


def test_a_single_command_needs_no_list():
    command = Command("Run", handler)
    assert PackDef("P", commands=command).commands == [command]


def test_pack_def_reports_every_problem_at_once():
    assert refused(lambda: PackDef("bad name", labels={"k": 1}, commands=[Command("Run", handler)] * 2)) == (
        f"invalid pack definition 'bad name': pack name 'bad name' holds ' ', {PATH_CHARACTERS}; "
        "label k=1: the value must be a string, not int; command 'Run' is defined twice")


# -- the decorator and with_labels ---------------------------------------------------------------------------


def test_the_decorator_refuses_a_second_command_of_the_same_name_at_once():
    pack_def = PackDef("P")

    @pack_def.command("Run")
    def first(input):
        return None

    with pytest.raises(PackDefError) as caught:
        @pack_def.command("Run")
        def second(input):
            return None

    assert str(caught.value) == "invalid pack definition 'P': command 'Run' is defined twice"
    assert [c.handler for c in pack_def.commands] == [first]


def test_the_decorator_refuses_bad_arguments_when_it_is_applied():
    pack_def = PackDef("P")
    assert refused(lambda: pack_def.command("Run", output_events=[1])(handler)) == \
        "command 'Run': output events must be EventDef objects or event names, not int"
    assert refused(lambda: pack_def.command("do it")(handler)).startswith("command name 'do it' holds ' '")
    assert pack_def.commands == []


def test_the_decorator_without_a_name_is_refused_instead_of_replacing_the_function():
    pack_def = PackDef("P")
    with pytest.raises(PackDefError) as caught:
        @pack_def.command
        def check_url(input):
            return None

    assert str(caught.value) == ("pack_def.command needs the command's name: write @pack_def.command(\"check_url\", "
                                 "output_events=[...]), not @pack_def.command")
    assert pack_def.commands == []


def test_with_labels_refuses_labels_that_would_break_the_links():
    pack_def = PackDef("P", labels={"team": "a"})
    assert refused(lambda: pack_def.with_labels({"env": "dev test"})) == \
        f"invalid pack definition 'P': label env='dev test': the value holds ' ', {PATH_CHARACTERS}"
    assert refused(lambda: pack_def.with_labels({"n": 1})) == \
        "invalid pack definition 'P': label n=1: the value must be a string, not int"
    assert refused(lambda: pack_def.with_labels("env=dev")) == "invalid pack definition 'P': labels must be a dict, " \
        "not str"
    assert pack_def.labels == {"team": "a"}


# -- validate() re-checks what can change, with the same messages ----------------------------------------------


def _appended_duplicate(pack_def):
    pack_def.commands.append(Command("Run", handler))


def _label_set_to_a_number(pack_def):
    pack_def.labels["n"] = 1


def _handler_removed(pack_def):
    pack_def.commands[0].handler = None


def _output_event_replaced(pack_def):
    pack_def.commands[0].output_events = (42,)


def _name_changed(pack_def):
    pack_def.name = "my pack"


@pytest.mark.parametrize("change, same_as", [
    (_appended_duplicate, lambda: PackDef("P", commands=[Command("Run", handler)] * 2)),
    (_label_set_to_a_number, lambda: PackDef("P", commands=[Command("Run", handler)], labels={"n": 1})),
    (_name_changed, lambda: PackDef("my pack", commands=[Command("Run", handler)])),
], ids=["duplicate", "label", "name"])
def test_validate_refuses_later_changes_with_the_construction_message(change, same_as):
    pack_def = PackDef("P", commands=[Command("Run", handler)])
    pack_def.validate()
    change(pack_def)
    assert refused(pack_def.validate) == refused(same_as)


@pytest.mark.parametrize("change, problem", [
    (_handler_removed, "command 'Run': handler is not callable"),
    (_output_event_replaced, "command 'Run': output events must be EventDef objects or event names, not int"),
])
def test_validate_refuses_later_changes_to_a_command_with_the_commands_message(change, problem):
    pack_def = PackDef("P", commands=[Command("Run", handler, [done])])
    change(pack_def)
    assert refused(pack_def.validate) == f"invalid pack definition 'P': {problem}"


def test_a_module_level_mistake_is_a_one_line_error_and_exit_78_in_the_cli(tmp_path, subprocess_env):
    (tmp_path / "bad_pack.py").write_text('from flyte_gevent import PackDef\n\npack_def = PackDef("bad name")\n')
    result = subprocess.run([sys.executable, "-m", "flyte_gevent", "check", "bad_pack:pack_def"], cwd=tmp_path,
                            env=subprocess_env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 78, result.stderr
    assert result.stderr.strip() == f"Error: invalid pack definition 'bad name': pack name 'bad name' holds ' ', " \
                                    f"{PATH_CHARACTERS}"
    assert result.stdout == ""
