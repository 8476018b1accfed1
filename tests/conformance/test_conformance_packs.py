"""flyte_gevent packs against each server: the same pack, the same assertions, FakeFlyteApi and the real server.

Each test enqueues before it starts its pack where it can, so the pack's first take finds the work instead of
waiting out a polling interval.
"""

import datetime
import importlib.util
import os
import re

import gevent.event
from marshmallow import Schema, fields

from flyte_gevent import Command, Event, EventDef, PackDef
from flyte_gevent.testing import FakeFlyteApi

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")

done = EventDef("Done")


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"conformance_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shell = load_example("shell_pack")
jira = load_example("jira_pack")
ticker = load_example("ticker_pack")


def echo_def(name, tag="echo", labels=None):
    return PackDef(name, commands=[Command("Echo", lambda input: Event(done, {"input": input, "by": tag}), [done])],
                   labels=labels)


def recent(created_at):
    """True for an RFC 3339 time within a minute of now: what both servers report as an event's createdAt."""
    when = datetime.datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    return abs((datetime.datetime.now(datetime.UTC) - when).total_seconds()) < 60


def test_a_pack_registers_takes_and_completes_actions(server, make_pack, unique):
    name = f"Echo{unique}"
    ids = server.enqueue_many(name, "Echo", [{"n": 1, "big": 2 ** 53 + 1}, "two", None, [1.5, True]])
    make_pack(echo_def(name))
    results = server.wait_for_results(ids)
    assert [(r.event, r.payload["input"]) for r in results] == [
        ("Done", {"n": 1, "big": 9007199254740992}), ("Done", "two"), ("Done", None), ("Done", [1.5, True])]
    assert all(recent(r.created_at) for r in results)
    assert [server.action(a).state for a in ids] == ["SUCCESS"] * 4
    assert server.wait_for_pack(name).id == name


def test_spontaneous_events_reach_the_server(server, make_pack, unique):
    name = f"Notice{unique}"
    noticed = EventDef("Noticed")
    server.watch_events(name, "Noticed")
    pack = make_pack(PackDef(name, event_defs=[noticed]))
    pack.send_event(Event(noticed, {"n": 2 ** 53 + 1, "text": "<&>"}))  # integers beyond 2**53 travel as strings
    assert pack.send_event_nowait(Event(noticed, "queued"))
    events = server.wait_for_events(2, name="Noticed")
    # (in either order: a real server times events to the millisecond)
    assert sorted(((e.pack_id, e.event, e.payload) for e in events), key=repr) == [
        (name, "Noticed", "queued"), (name, "Noticed", {"n": "9007199254740993", "text": "<&>"})]
    assert all(recent(e.created_at) for e in events)


def test_labels_route_actions_to_the_packs_whose_labels_include_them(server, make_pack, unique):
    name = f"Routed{unique}"
    dev = server.enqueue_many(name, "Echo", ["d1", "d2"], labels={"env": "dev"})
    prod = server.enqueue_many(name, "Echo", ["p1", "p2"], labels={"env": "prod", "team": "a"})
    nobody = server.enqueue(name, "Echo", "n1", labels={"env": "test"})
    make_pack(echo_def(name, "dev"), labels={"env": "dev", "team": "a"})
    make_pack(echo_def(name, "prod"), labels={"env": "prod", "team": "a", "zone": "eu"})
    assert [r.payload["by"] for r in server.wait_for_results(dev + prod)] == ["dev", "dev", "prod", "prod"]
    assert server.action(nobody).state == "NEW"


class IssueSchema(Schema):
    project = fields.String(required=True)


def boom(input):
    raise ValueError("bad project")


def test_fatal_paths(server, make_pack, unique):
    name = f"Fatal{unique}"
    pack_def = PackDef(name, commands=[Command("Boom", boom, [done]),
                                       Command("Typed", lambda issue: Event(done, issue), [done],
                                               input_schema=IssueSchema),
                                       Command("Wrong", lambda input: {"not": "an event"}, [done])])
    raised, unknown, invalid, wrong = (server.enqueue(name, command, {"summary": "x"})
                                       for command in ("Boom", "Nope", "Typed", "Wrong"))
    make_pack(pack_def)
    results = server.wait_for_results([raised, unknown, invalid, wrong])
    assert [r.event for r in results] == ["FATAL"] * 4
    assert results[0].payload == "ValueError: bad project"
    assert results[1].payload == "Unknown command 'Nope'"
    assert results[2].payload.startswith("invalid input for command 'Typed':")
    assert "project" in results[2].payload
    assert results[3].payload == "handler for command 'Wrong' returned dict, expected an Event"
    assert [server.action(a).state for a in (raised, unknown, invalid, wrong)] == ["FATAL"] * 4


def test_a_pack_registers_again_after_its_pack_is_deleted(server, make_pack, unique):
    name = f"Deleted{unique}"
    make_pack(echo_def(name))
    server.wait_for_pack(name)
    server.delete_pack(name)
    aid = server.enqueue(name, "Echo", "after the delete")
    # The next take gets 404; the pack registers again and takes on.
    assert server.wait_for_result(aid, timeout=10).payload["input"] == "after the delete"
    assert server.wait_for_pack(name).id == name


def test_a_result_for_a_deleted_pack_is_delivered_after_registering_again(server, make_pack, unique):
    name = f"Slow{unique}"
    release = gevent.event.Event()

    def wait_then_finish(input):
        release.wait(5)
        return Event(done, "finished")

    aid = server.enqueue(name, "Wait")
    make_pack(PackDef(name, commands=[Command("Wait", wait_then_finish, [done])]))
    server.wait_for_action(aid, "PENDING")
    server.delete_pack(name)
    release.set()  # the result gets 404: the pack registers again and posts it again
    assert server.wait_for_result(aid, timeout=10).payload == "finished"
    assert server.action(aid).state == "SUCCESS"


def test_an_events_only_pack_registers_again_after_its_pack_is_deleted(server, make_pack, unique):
    name = f"Quiet{unique}"
    noticed = EventDef("Noticed")
    server.watch_events(name, "Noticed")
    pack = make_pack(PackDef(name, event_defs=[noticed]))
    server.delete_pack(name)
    pack.send_event(Event(noticed, "after the delete"))  # 404, registers again, sends again
    assert [e.payload for e in server.wait_for_events(1, name="Noticed")] == ["after the delete"]
    assert server.wait_for_pack(name).id == name


def test_replicas_racing_for_takes_complete_every_action_once(server, make_pack, unique):
    name = f"Replicas{unique}"
    if isinstance(server, FakeFlyteApi):
        server.take_cost = 0.0002  # what makes takes of one pack race on the real server
    ids = server.create_actions(name, "Echo", 30)
    replicas = [make_pack(echo_def(name, f"replica{n}")) for n in range(2)]
    results = server.wait_for_results(ids, timeout=20)
    assert {r.event for r in results} == {"Done"}
    assert [server.action(a).state for a in ids] == ["SUCCESS"] * 30
    if isinstance(server, FakeFlyteApi):
        assert [server.action(a).result_posts for a in ids] == [1] * 30
    assert {r.payload["by"] for r in results} <= {"replica0", "replica1"}
    assert all(pack.pack_id == name for pack in replicas)


# --- the example packs -----------------------------------------------------------------------------------------

SHELL_REGISTRATION = {"commands": [{"name": "Shell", "events": ["Output"]}], "events": [{"name": "Output"}],
                      "links": [{"href": shell.HELP_URL, "rel": "help"}]}


def test_shell_pack(server, make_pack, unique):
    labels = {"run": unique}
    scripts = ["echo -e 'world\\nhello' | sort", "echo out; echo err >&2; exit 3", {"script": "echo hi"}, None]
    ids = server.enqueue_many("Shell", "Shell", scripts, labels=labels)
    pack = make_pack(shell.pack_def, labels=labels)
    assert pack.pack_id == f"Shell.run.{unique}"
    registered = server.wait_for_pack(pack.pack_id)
    if isinstance(server, FakeFlyteApi):  # what the pack sent, as flyte-shell sends it
        assert registered.body == {"name": "Shell", "labels": labels, **SHELL_REGISTRATION}
    else:  # what the real server stored, as it stores flyte-shell's registration
        document = registered.document
        assert [{"name": c["name"], "events": c["events"]} for c in document["commands"]] == \
            SHELL_REGISTRATION["commands"]
        assert document["events"] == SHELL_REGISTRATION["events"]
        assert document["links"][0] == SHELL_REGISTRATION["links"][0]
    results = server.wait_for_results(ids)
    assert [(r.event, r.payload) for r in results] == [
        ("Output", {"stdout": "hello\nworld\n", "stderr": "", "exit_code": 0}),
        ("Output", {"stdout": "out\n", "stderr": "err\n", "exit_code": 3}),
        ("Output", {"stdout": "", "stderr": "json: cannot unmarshal object into Go value of type string",
                    "exit_code": 1}),
        ("Output", {"stdout": "", "stderr": "No script supplied to handler", "exit_code": 1})]


def test_jira_pack(server, make_pack, unique):
    labels = {"env": "dev", "run": unique}
    created, refused, garbled = (server.enqueue("JiraPack", "createIssue", value, labels=labels) for value in
                                 ({"project": "FOO", "summary": "Disk full"}, {"project": "NOPE"}, "FOO-1"))
    make_pack(jira.pack_def, labels={"run": unique})
    results = server.wait_for_results([created, refused, garbled])
    assert results[0].event == "IssueCreated"
    assert re.fullmatch(r"FOO-\d+", results[0].payload["issueId"])
    assert results[0].payload["summary"] == "Disk full"
    assert (results[1].event, results[1].payload) == ("FATAL", "ValueError: bad project")
    assert (results[2].event, results[2].payload) == (
        "FATAL", "TypeError: input must be an object with project and summary, not str")


def test_ticker_pack(server, make_pack, unique):
    labels = {"run": unique}
    server.watch_events("Ticker", "Tick", labels=labels)
    pack = make_pack(ticker.pack_def, labels=labels)
    assert pack.pack_id == f"Ticker.run.{unique}"
    pack.spawn(ticker.tick_forever, pack, 0.05)
    ticks = server.wait_for_events(2, name="Tick")
    assert [set(t.payload) for t in ticks] == [{"time"}, {"time"}]
    assert all(RFC3339_UTC.fullmatch(t.payload["time"]) for t in ticks)
    assert ticks[0].payload["time"] < ticks[1].payload["time"]
    assert {t.pack_id for t in ticks} == {pack.pack_id}
