"""Flows end to end on the real Flyte server, with flyte_gevent packs doing the work.

Only the real server runs flows (FakeFlyteApi has no flow engine: ``enqueue`` stands in for a flow step), so these
tests take the ``[real]`` server only. Steps whose command goes to a pack nobody runs (the "Slack" and "Notify"
ones) stay NEW: their input, as the audit API shows it, is exactly what that pack would receive.
"""

import datetime
import importlib.util
import os
import re

import pytest
import requests

from flyte_gevent.testing import FlyteServer, FlyteServerError

pytestmark = pytest.mark.parametrize("server", ["real"], indirect=True)

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"flows_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shell = load_example("shell_pack")
jira = load_example("jira_pack")
ticker = load_example("ticker_pack")

# The quickstart's flow (ExpediaGroup/flyte docs/quickstart.md), with its Slack trigger and reply kept and the
# Shell command pointed at this test's Shell pack, plus the branch for a failing script. YAML, as the quickstart
# posts it.
QUICKSTART = """\
name: {flow}
description: the quickstart's flow, run by flyte_gevent's port of flyte-shell
steps:
- id: run_script
  event:
    packName: {slack}
    name: ReceivedMessage
  context:
    ChannelID: '{{{{ Event.Payload.channelId }}}}'
    Requestor: "{{{{ Event.Payload.user.id }}}}"
  criteria: "{{{{ Event.Payload.message|match:'^flyte run$' }}}}"
  command:
    packName: Shell
    name: Shell
    packLabels:
      run: '{run}'
    input: "{{{{ Event.Payload.script }}}}"
- id: send_output
  event:
    packName: Shell
    name: Output
  dependsOn:
  - run_script
  criteria: "{{{{ Event.Payload.exit_code|integer == 0 }}}}"
  command:
    packName: {slack}
    name: SendMessage
    input:
      channelId: "{{{{ Context.ChannelID }}}}"
      message: |-
        Hey <@{{{{ Context.Requestor }}}}>!
        Here is the output:

        {{{{Event.Payload.stdout}}}}
- id: send_failure
  event:
    packName: Shell
    name: Output
  dependsOn:
  - run_script
  criteria: "{{{{ Event.Payload.exit_code|integer != 0 }}}}"
  command:
    packName: {slack}
    name: SendMessage
    input:
      channelId: "{{{{ Context.ChannelID }}}}"
      message: >-
        exit {{{{ Event.Payload.exit_code|integer }}}},
        raw {{{{ Event.Payload.exit_code }}}}: {{{{ Event.Payload.stderr }}}}
"""


def test_quickstart_flow_with_the_shell_pack_both_branches(server, make_pack, unique):
    slack = server.register_trigger_pack(f"Slack{unique}", events=["ReceivedMessage"])
    flow = server.post_flow(QUICKSTART.format(flow=f"quickstart{unique}", slack=slack.name, run=unique))
    assert flow == f"quickstart{unique}"
    message = {"channelId": "C42", "user": {"id": "U7"}, "message": "flyte run"}
    slack.send("ReceivedMessage", {**message, "script": "echo -e 'world\\nhello' | sort"})
    slack.send("ReceivedMessage", {**message, "script": "echo oops >&2; exit 3"})
    slack.send("ReceivedMessage", {**message, "message": "not for flyte", "script": "echo never"})
    make_pack(shell.pack_def, labels={"run": unique})

    [ran_ok, ran_failing] = server.wait_for_step(flow, "run_script", "SUCCESS", count=2)
    outputs = {a.input: a.result["payload"] for a in (ran_ok, ran_failing)}
    assert outputs == {"echo -e 'world\\nhello' | sort": {"stdout": "hello\nworld\n", "stderr": "", "exit_code": 0},
                       "echo oops >&2; exit 3": {"stdout": "", "stderr": "oops\n", "exit_code": 3}}
    [reply] = server.wait_for_step(flow, "send_output", "NEW")
    assert (reply.command, reply.pack_name) == ("SendMessage", slack.name)
    assert reply.input == {"channelId": "C42", "message": "Hey <@U7>!\nHere is the output:\n\nhello\nworld\n"}
    [failure] = server.wait_for_step(flow, "send_failure", "NEW")
    # Templates render numbers from payloads as floats: hence the quickstart's |integer.
    assert failure.input == {"channelId": "C42", "message": "exit 3, raw 3.000000: oops\n"}
    # Each execution took one branch only: both Output steps are evaluated when the Shell result arrives.
    instances = {i.actions["run_script"].input: i for i in server.flow_instances(flow)}
    assert set(instances["echo -e 'world\\nhello' | sort"].actions) == {"run_script", "send_output"}
    assert set(instances["echo oops >&2; exit 3"].actions) == {"run_script", "send_failure"}
    assert len(instances) == 2  # the message that did not match the criteria started nothing


def test_ticker_events_trigger_a_flow(server, make_pack, unique):
    flow = server.post_flow({
        "name": f"ticks{unique}", "description": "every tick of this test's ticker",
        "steps": [{"id": "on_tick", "event": {"packName": "Ticker", "name": "Tick", "packLabels": {"run": unique}},
                   "context": {"When": "{{ Event.Payload.time }}"},
                   "criteria": "{{ Event.Payload.time|match:'^\\\\d{4}-\\\\d\\\\d-\\\\d\\\\dT.*Z$' }}",
                   "command": {"packName": f"Notify{unique}", "name": "Record",
                               "input": {"at": "{{ Context.When }}", "from": "{{ Event.Pack.Name }}"}}}]})
    pack = make_pack(ticker.pack_def, labels={"run": unique})
    pack.spawn(ticker.tick_forever, pack, 0.05)
    recorded = server.wait_for_step(flow, "on_tick", "NEW", count=3)
    assert [a.input["from"] for a in recorded] == ["Ticker"] * 3
    times = [a.input["at"] for a in recorded]
    assert times == sorted(times) and len(set(times)) == 3
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", t) for t in times)
    assert [a.trigger["pack"]["id"] for a in recorded] == [pack.pack_id] * 3


def test_a_two_step_flow_reads_fields_of_a_flyte_gevent_result(server, make_pack, unique):
    reports = server.register_trigger_pack(f"Reports{unique}", events=["Report"])
    labels = {"run": unique}
    flow = server.post_flow({
        "name": f"issues{unique}", "description": "create an issue, then announce it from its result",
        "steps": [
            {"id": "create", "event": {"packName": reports.name, "name": "Report"},
             "context": {"Reporter": "{{ Event.Payload.reporter }}"},
             "command": {"packName": "JiraPack", "name": "createIssue", "packLabels": {"env": "dev", "run": unique},
                         "input": {"project": "{{ Event.Payload.project }}",
                                   "summary": "{{ Event.Payload.summary }}"}}},
            {"id": "announce", "dependsOn": ["create"], "event": {"packName": "JiraPack", "name": "IssueCreated"},
             "command": {"packName": "Shell", "name": "Shell", "packLabels": labels,
                         "input": "printf '%s' '{{ Event.Payload.issueId }}: {{ Event.Payload.summary }} "
                                  "(for {{ Context.Reporter }})'"}},
            # FATAL counts as finished: a handler's exception can drive a failure branch.
            {"id": "refused", "dependsOn": ["create"], "event": {"packName": "JiraPack", "name": "FATAL"},
             "command": {"packName": f"Notify{unique}", "name": "Record",
                         "input": "{{ Context.Reporter }}: {{ Event.Payload }}"}}]})
    reports.send("Report", {"project": "FOO", "summary": "Disk full", "reporter": "ann"})
    reports.send("Report", {"project": "NOPE", "summary": "Typo", "reporter": "bob"})
    make_pack(jira.pack_def, labels=labels)
    make_pack(shell.pack_def, labels=labels)

    [announced] = server.wait_for_step(flow, "announce", "SUCCESS", timeout=10)
    issue = announced.trigger["payload"]
    assert re.fullmatch(r"FOO-\d+", issue["issueId"])
    assert announced.input == f"printf '%s' '{issue['issueId']}: Disk full (for ann)'"
    assert announced.result["payload"] == {"stdout": f"{issue['issueId']}: Disk full (for ann)", "stderr": "",
                                           "exit_code": 0}
    [refused] = server.wait_for_step(flow, "refused", "NEW")
    assert refused.input == "bob: ValueError: bad project"


# --- the helper itself ----------------------------------------------------------------------------------------

def test_create_actions_gives_a_pack_a_backlog_quickly(server, unique):
    ids = server.create_actions(f"Backlog{unique}", "Work", 200, {"n": 1}, labels={"run": unique})
    assert len(set(ids)) == 200
    new = server.new()
    assert {a.id for a in new} == set(ids)
    assert {(a.command, a.pack_name, a.labels["run"]) for a in new} == {("Work", f"Backlog{unique}", unique)}
    assert all(a.input == {"n": 1} for a in new)
    # Oldest first, as the server hands them out.
    assert ids == [a.id for a in sorted(new, key=lambda a: (datetime.datetime.fromisoformat(
        a.states[0][1].replace("Z", "+00:00")), a.id))]


def test_yaml_needs_exactly_the_yaml_content_type(server, unique):
    body = f"name: yaml{unique}\nsteps: []\n"
    exact = requests.post(server.url + "/v1/flows", data=body, headers={"Content-Type": "application/x-yaml"},
                          timeout=5)
    assert exact.status_code == 201
    with_charset = requests.post(server.url + "/v1/flows", data=body, timeout=5,
                                 headers={"Content-Type": "application/x-yaml; charset=utf-8"})
    assert with_charset.status_code == 500  # read as JSON, which fails the flow schema check: 500, not 400
    assert requests.delete(f"{server.url}/v1/flows/yaml{unique}", timeout=5).status_code == 204


def test_the_helper_removes_its_flows_and_trigger_pack(server, unique):
    with FlyteServer(server.url) as helper:
        helper.enqueue(f"Gone{unique}", "Work")
        flows, trigger = helper.flows, helper.trigger.id
        assert requests.get(f"{server.url}/v1/flows/{flows[0]}", timeout=5).status_code == 200
    assert requests.get(f"{server.url}/v1/flows/{flows[0]}", timeout=5).status_code == 404
    assert requests.get(f"{server.url}/v1/packs/{trigger}", timeout=5).status_code == 404


def test_a_flow_the_server_refuses_names_the_status(server, unique):
    with pytest.raises(FlyteServerError, match=r"POST .*/v1/flows answered 500"):
        server.post_flow({"name": f"bad{unique}", "steps": [{"event": {"name": "E"}}]})
