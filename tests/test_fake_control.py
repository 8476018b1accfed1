"""The standalone fake's control surface: the routes under /_fake/, the `flyte-gevent fake-api` commands that use
them, and the README's walk-through, run as written."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import gevent
import pytest
import requests

from flyte_gevent import cli
from flyte_gevent.testing import FakeFlyteApi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ECHO = {"name": "Echo", "labels": {"env": "dev"}, "commands": [{"name": "Echo", "events": ["Done"]}],
        "events": [{"name": "Done"}]}


@pytest.fixture
def api():
    with FakeFlyteApi(control=True) as fake:
        yield fake


def control(api, method, route, **kwargs):
    return requests.request(method, api.url + "/_fake" + route, timeout=10, **kwargs)


def register(api, body=ECHO):
    assert requests.post(api.url + "/v1/packs", json=body, timeout=5).status_code == 201


def take_and_complete(api, pid="Echo.env.dev", event="Done", payload=None):
    taken = requests.post(f"{api.url}/v1/packs/{pid}/actions/take", timeout=5)
    assert taken.status_code == 200, taken
    href = taken.json()["links"][0]["href"]
    assert requests.post(href, json={"event": event, "payload": payload}, timeout=5).status_code == 202


# --- the routes -------------------------------------------------------------------------------------------------

def test_control_routes_are_off_unless_asked_for_and_then_look_like_any_unknown_path(flyte_api):
    for method in ("GET", "POST"):
        response = requests.request(method, flyte_api.url + "/_fake/actions", timeout=5)
        assert (response.status_code, response.text) == (404, "Not Found")
    assert flyte_api.actions == {}


def test_enqueue_then_read_the_action_with_its_state_and_result(api):
    created = control(api, "POST", "/actions", json={"pack": "Echo", "command": "Echo", "input": {"n": 1.0},
                                                     "labels": {"env": "dev"}})
    assert created.status_code == 201
    aid = created.json()["id"]
    assert api.action(aid).input == {"n": 1}
    [listed] = control(api, "GET", "/actions").json()["actions"]
    assert listed == {"id": aid, "pack": "Echo", "labels": {"env": "dev"}, "command": "Echo", "input": {"n": 1},
                      "state": "NEW", "takenBy": None, "takes": 0, "resultPosts": 0, "result": None}
    register(api)
    take_and_complete(api, payload={"ok": True})
    [listed] = control(api, "GET", "/actions", params={"id": aid}).json()["actions"]
    assert (listed["state"], listed["takenBy"], listed["result"]) == (
        "SUCCESS", "Echo.env.dev", {"event": "Done", "payload": {"ok": True}, "createdAt": None})


def test_a_wait_for_results_returns_when_they_are_in_or_says_why_not(api):
    aid = control(api, "POST", "/actions", json={"pack": "Echo", "command": "Echo"}).json()["id"]
    other = control(api, "POST", "/actions", json={"pack": "Jira", "command": "Create"}).json()["id"]
    register(api)
    gevent.spawn_later(0.05, take_and_complete, api)
    answer = control(api, "GET", "/actions", params={"id": aid, "wait": "5"}).json()
    assert (answer["done"], answer["actions"][0]["state"]) == (True, "SUCCESS")
    answer = control(api, "GET", "/actions", params={"wait": "0.05"}).json()  # every action: Jira's is NEW
    assert answer["done"] is False
    assert f"{other} ('Create' for 'Jira') is NEW" in answer["problem"]
    assert "no pack named 'Jira' is registered; registered: 'Echo'" in answer["problem"]
    missing = control(api, "GET", "/actions", params={"id": ["nope", aid]})
    assert (missing.status_code, missing.json()) == (404, {"error": "unknown action id nope"})


def test_events_and_packs_with_and_without_waiting(api):
    assert control(api, "GET", "/packs").json() == {"packs": []}
    gevent.spawn_later(0.05, register, api)
    answer = control(api, "GET", "/packs", params={"name": "Echo", "wait": "5"}).json()
    [pack] = answer["packs"]
    assert answer["done"] is True
    assert {k: pack[k] for k in ("id", "name", "labels", "commands", "events", "registrations")} == {
        "id": "Echo.env.dev", "name": "Echo", "labels": {"env": "dev"}, "commands": ["Echo"], "events": ["Done"],
        "registrations": 1}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", pack["lastSeen"])
    assert control(api, "GET", "/packs", params={"name": "Shell"}).json() == {"packs": []}
    late = control(api, "GET", "/packs", params={"name": "Shell", "wait": "0.05"}).json()
    assert late["done"] is False and "'Shell' was not registered" in late["problem"]

    events_url = api.url + "/v1/packs/Echo.env.dev/events"
    requests.post(events_url, json={"event": "Tick", "payload": 1}, timeout=5)
    gevent.spawn_later(0.05, requests.post, events_url, json={"event": "Tick", "payload": 2}, timeout=5)
    answer = control(api, "GET", "/events", params={"name": "Tick", "count": "2", "wait": "5"}).json()
    assert answer == {"events": [{"pack": "Echo.env.dev", "event": "Tick", "payload": 1, "createdAt": None},
                                 {"pack": "Echo.env.dev", "event": "Tick", "payload": 2, "createdAt": None}],
                      "done": True}
    assert control(api, "GET", "/events", params={"name": "Other"}).json() == {"events": []}
    late = control(api, "GET", "/events", params={"count": "3", "wait": "0.05"}).json()
    assert late["done"] is False and "expected 3 events" in late["problem"]


def test_faults_through_the_control_routes(api):
    register(api)
    assert control(api, "POST", "/faults", json={"kind": "fail", "route": "take", "status": 200, "times": 2,
                                                 "body": "<html>portal</html>"}).status_code == 201
    for _ in range(2):
        response = requests.post(api.url + "/v1/packs/Echo.env.dev/actions/take", timeout=5)
        assert (response.status_code, response.text) == (200, "<html>portal</html>")
    assert requests.post(api.url + "/v1/packs/Echo.env.dev/actions/take", timeout=5).status_code == 204
    assert control(api, "POST", "/faults", json={"kind": "drop", "route": "health"}).status_code == 201
    with pytest.raises(requests.ConnectionError):
        requests.get(api.url + "/health", timeout=5)
    assert control(api, "POST", "/faults", json={"kind": "delay", "route": None, "seconds": 0.01,
                                                 "times": None}).status_code == 201
    assert control(api, "DELETE", "/faults").status_code == 200
    assert api._faults == []
    for document, message in [({"kind": "explode"}, "kind must be 'fail', 'drop' or 'delay'"),
                              ({"kind": "fail", "route": "takes", "status": 500}, "unknown route 'takes'"),
                              ({"kind": "fail", "route": "take", "status": "500"}, "status must be an HTTP status"),
                              ({"kind": "delay", "route": "take", "seconds": -1}, "seconds must be a number"),
                              ({"kind": "drop", "route": "take", "times": 0}, "times must be at least 1")]:
        refused = control(api, "POST", "/faults", json=document)
        assert refused.status_code == 400 and message in refused.json()["error"], (document, refused.text)


def test_control_requests_skip_faults_latency_tokens_and_the_request_log(api):
    api.fail(None, 503, times=None)
    api.accepted_tokens = {"secret"}
    api.latency = 2.0
    with gevent.Timeout(1.5):  # any latency applied would exceed this
        assert control(api, "POST", "/actions", json={"pack": "Echo", "command": "Echo"}).status_code == 201
        assert control(api, "GET", "/actions").status_code == 200
    assert api.requests == [] and len(api.actions) == 1
    api.outage("503")
    assert control(api, "GET", "/packs").status_code == 200


def test_reset_forgets_everything_and_a_running_pack_registers_again(api):
    register(api)
    control(api, "POST", "/actions", json={"pack": "Echo", "command": "Echo"})
    api.fail("take", 500, times=None)
    assert control(api, "POST", "/reset").status_code == 200
    assert (api.packs, api.actions, api.events, api.requests, api._faults) == ({}, {}, [], [], [])
    assert requests.post(api.url + "/v1/packs/Echo.env.dev/actions/take", timeout=5).status_code == 404
    register(api)
    assert api.packs["Echo.env.dev"].registrations == 1


def test_malformed_control_requests_get_a_json_error(api):
    cases = [
        ("GET", "/nope", {}, 404, "no control route /_fake/nope; GET /_fake lists them"),
        ("DELETE", "/actions", {}, 405, "/_fake/actions takes GET, POST, not DELETE"),
        ("POST", "/actions", {"data": b"{"}, 400, "the body is not JSON"),
        ("POST", "/actions", {"json": ["Echo"]}, 400, "the body must be a JSON object"),
        ("POST", "/actions", {"json": {"pack": "", "command": "Echo"}}, 400, "pack must be a non-empty string"),
        ("POST", "/actions", {"json": {"pack": "Echo", "command": "Echo", "labels": {"a": 1}}}, 400,
         "labels must be an object of strings"),
        ("POST", "/actions", {"json": {"pack": "Echo", "command": "Echo", "input": [None]}}, 400,
         "input[0] is null"),
        ("GET", "/actions", {"params": {"wait": "soon"}}, 400, "wait='soon' is not a number"),
        ("GET", "/events", {"params": {"wait": "1", "count": "0"}}, 400, "count='0' is out of range"),
        ("GET", "/actions", {"params": {"wait": "1e9"}}, 400, "more than 3600 seconds"),
    ]
    for method, route, kwargs, status, message in cases:
        response = control(api, method, route, **kwargs)
        assert response.status_code == status and message in response.json()["error"], (route, response.text)
    assert control(api, "DELETE", "/actions").headers["Allow"] == "GET, POST"
    assert "POST /_fake/reset" in control(api, "GET", "").json()["routes"]
    assert api.actions == {}


# --- the commands -----------------------------------------------------------------------------------------------

def run_cli(capsys, api, *args):
    code = cli.main(["fake-api", *args] + (["--url", api.url] if api is not None else []))
    out, err = capsys.readouterr()
    return code, out, err


def test_enqueue_results_packs_and_events_commands(api, capsys):
    code, out, err = run_cli(capsys, api, "enqueue", "Echo", "Echo", '{"n": 2}', "--labels", "env=dev")
    assert (code, err) == (0, "")
    aid = out.strip()
    assert api.action(aid).input == {"n": 2} and api.action(aid).labels == {"env": "dev"}
    code, out, _ = run_cli(capsys, api, "enqueue", "Shell", "Shell", "--text", "echo 'hi' {{x}}")
    text_id = out.strip()
    assert code == 0 and api.action(text_id).input == "echo 'hi' {{x}}"
    register(api)
    take_and_complete(api, payload={"n": 2})
    code, out, err = run_cli(capsys, api, "results", aid, "--wait", "5")
    assert (code, err) == (0, "")
    [line] = out.splitlines()
    assert json.loads(line)["result"] == {"event": "Done", "payload": {"n": 2}, "createdAt": None}
    code, out, _ = run_cli(capsys, api, "results")
    assert code == 0 and [json.loads(line)["id"] for line in out.splitlines()] == [aid, text_id]
    code, out, _ = run_cli(capsys, api, "packs", "Echo", "--wait", "1")
    assert code == 0 and json.loads(out)["id"] == "Echo.env.dev"
    requests.post(api.url + "/v1/packs/Echo.env.dev/events", json={"event": "Tick", "payload": "ü"}, timeout=5)
    code, out, _ = run_cli(capsys, api, "events", "--name", "Tick", "--count", "1", "--wait", "5")
    assert code == 0 and out == '{"pack": "Echo.env.dev", "event": "Tick", "payload": "ü", "createdAt": null}\n'


def test_a_wait_that_runs_out_exits_1_saying_why(api, capsys):
    aid = api.enqueue("Echo", "Echo", labels={"env": "prod"})
    register(api)
    code, out, err = run_cli(capsys, api, "results", "--wait", "0.05")
    assert code == 1
    assert json.loads(out)["state"] == "NEW"
    assert err.startswith(f"Error: 1 actions still open after 0.05 s: {aid}")
    assert "its labels do not include the action's {'env': 'prod'}: 'Echo.env.dev' has {'env': 'dev'}" in err
    code, out, err = run_cli(capsys, api, "events", "--wait", "0.05")
    assert (code, out) == (1, "") and "expected 1 events within 0.05 s; received none" in err
    code, _, err = run_cli(capsys, api, "results", "nope")
    assert (code, err) == (1, "Error: unknown action id nope\n")


def test_fail_clear_faults_and_reset_commands(api, capsys):
    register(api)
    assert run_cli(capsys, api, "fail", "take", "502", "--times", "2", "--body", "<html>Bad Gateway</html>")[0] == 0
    responses = [requests.post(api.url + "/v1/packs/Echo.env.dev/actions/take", timeout=5) for _ in range(3)]
    assert [(r.status_code, r.text) for r in responses] == [(502, "<html>Bad Gateway</html>")] * 2 + [(204, "")]
    assert run_cli(capsys, api, "fail", "all", "503", "--until-cleared")[0] == 0
    assert requests.get(api.url + "/health", timeout=5).status_code == 503
    assert run_cli(capsys, api, "clear-faults")[0] == 0
    assert requests.get(api.url + "/health", timeout=5).status_code == 200
    code, _, err = run_cli(capsys, api, "fail", "takes", "500")
    assert code == 1 and "unknown route 'takes'" in err
    assert run_cli(capsys, api, "reset") == (0, "", "")
    assert api.packs == {}


def test_command_mistakes_get_one_line_and_their_exit_code(api, capsys, monkeypatch):
    code, _, err = run_cli(capsys, api, "enqueue", "Echo", "Echo", "echo hi")
    assert code == 78 and err.startswith("Error: INPUT 'echo hi' is not JSON (") and "--text" in err
    code, _, err = run_cli(capsys, api, "enqueue", "Echo", "Echo", '"x"', "--text", "y")
    assert code == 2 and "either as INPUT" in err
    code, _, err = run_cli(capsys, api, "enqueue", "Echo", "Echo", "--labels", "a=1,")
    assert code == 78 and err.startswith("Error: --labels 'a=1,': ")
    code, _, err = run_cli(capsys, api, "results", "--wait", "-1")
    assert code == 78 and "--wait -1" in err
    code, _, err = run_cli(capsys, None, "results", "--url", "https://127.0.0.1:1")
    assert code == 78 and "plain HTTP" in err
    assert cli.main(["fake-api", "--port", "9", "results", "--url", api.url]) == 2
    assert "--port is an option of serve, not of results" in capsys.readouterr().err
    assert api.actions == {}


def test_an_unreachable_or_foreign_url_exits_69(capsys, flyte_api, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    monkeypatch.setenv("FLYTE_GEVENT_FAKE_API_URL", f"http://127.0.0.1:{free}")
    code, _, err = run_cli(capsys, None, "packs")  # the URL from the environment
    assert code == 69 and f"cannot reach the fake Flyte API at http://127.0.0.1:{free}: connection refused" in err
    code, _, err = run_cli(capsys, flyte_api, "packs")  # a fake without control routes, as a real Flyte API
    assert code == 69 and "answered 404 to GET /_fake/packs: it is not a fake Flyte API served by" in err


def test_wait_gives_the_fake_time_to_start_listening(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    api = FakeFlyteApi(port=port, control=True)
    gevent.spawn_later(0.2, api.start)
    try:
        code, out, _ = run_cli(capsys, None, "enqueue", "Echo", "Echo", "--wait", "5", "--url",
                               f"http://127.0.0.1:{port}")
        assert code == 0 and out.strip() in api.actions
    finally:
        api.stop()


# --- serving, and the README's walk-through ---------------------------------------------------------------------

def serve(python_env, *args):
    return subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "flyte-gevent"), "fake-api", *args],
                            env=python_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_serve_subcommand_and_a_warning_for_an_address_beyond_loopback(subprocess_env):
    child = serve(subprocess_env, "serve", "--host", "0.0.0.0", "--port", "0")
    try:
        with gevent.Timeout(20):
            line = child.stdout.readline()
        port = re.fullmatch(r"FakeFlyteApi listening on http://0\.0\.0\.0:(\d+)\n", line).group(1)
        response = requests.post(f"http://127.0.0.1:{port}/_fake/actions", json={"pack": "P", "command": "C"},
                                 timeout=5)
        assert response.status_code == 201
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=10) == 0
        assert "warning: listening on 0.0.0.0: anyone who can reach this port can queue actions" in child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def readme_walkthrough():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as readme:
        text = readme.read()
    start = text.index("Run one against the fake API")
    return re.search(r"```sh\n(.*?)```", text[start:], re.DOTALL).group(1)


def test_the_readme_walkthrough_runs_as_written(subprocess_env):
    """The README's lines, with its port swapped for a free one (the commands then find the fake through
    FLYTE_GEVENT_FAKE_API_URL) and .venv/bin/ for this interpreter's directory."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    script = readme_walkthrough().replace("8080", port).replace(".venv/bin/", os.path.dirname(sys.executable) + "/")
    env = {**subprocess_env, "FLYTE_GEVENT_FAKE_API_URL": f"http://127.0.0.1:{port}"}
    # set -e: a failing line fails the test; wait: the pack and the fake must exit after the kill.
    child = subprocess.Popen(["bash", "-c", "set -e\n" + script + "wait\n"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = child.communicate(timeout=45)
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # whatever the script left behind if it failed
        except ProcessLookupError:
            pass
    assert child.returncode == 0, out + err
    lines = out.splitlines()
    assert lines[0] == f"FakeFlyteApi listening on http://127.0.0.1:{port}"
    [action_id] = [line for line in lines if re.fullmatch(r"[0-9a-f]{24}", line)]
    [result] = [json.loads(line) for line in lines if line.startswith("{")]
    assert result["id"] == action_id
    assert (result["state"], result["takenBy"], result["result"]["event"], result["result"]["payload"]) == (
        "SUCCESS", "Shell.ABC.123", "Output", {"stdout": "hello\n", "stderr": "", "exit_code": 0})
