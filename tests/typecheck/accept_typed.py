"""Typed use of the public API that mypy --strict must accept, with the types a checker must infer.

Checked by ``make lint`` (mypy, configured in pyproject.toml), never run: pytest collects only ``test_*.py``.
Each ``assert_type`` fails the lint when the library's annotations stop giving a pack author that type;
reject_misuse.py holds the mistakes they must catch.
"""

import dataclasses
from typing import Any, assert_type

import gevent
from marshmallow import Schema, fields

from flyte_gevent import (
    FATAL,
    JSON,
    Action,
    Client,
    Command,
    ConfigError,
    Event,
    EventDef,
    FlyteError,
    Health,
    Pack,
    PackDef,
    current_action,
    fatal_event,
    flyte_api_health_check,
)
from flyte_gevent.pytest_plugin import RunningPack
from flyte_gevent.testing import ActionResult, FakeFlyteApi, run_handler

created = EventDef("IssueCreated", help_url="https://example.com/created")
queue_depth = EventDef("QueueDepth")


@dataclasses.dataclass
class Issue:
    key: str
    project: str


# -- the Quick start pack, annotated ----------------------------------------------------------------------------

def create_issue(input: JSON) -> Event[dict[str, str]]:
    if not isinstance(input, dict) or input.get("project") not in {"FOO", "OPS"}:
        raise ValueError("bad project")
    return Event(created, {"issueId": "FOO-1"})


pack_def = PackDef(name="JiraPack", help_url="https://example.com/jira-pack",
                   commands=[Command(name="createIssue", handler=create_issue, output_events=[created])],
                   labels={"env": "dev"})


def main() -> None:
    Pack.from_env(pack_def).run()


# -- what the types say ------------------------------------------------------------------------------------------

assert_type(Event(created, {"issueId": "FOO-1"}), Event[dict[str, str]])
assert_type(Event(created, {"issueId": "FOO-1"}).payload, dict[str, str])
assert_type(Event(created, Issue("OPS-1", "OPS")).payload, Issue)  # a dataclass payload keeps its type
assert_type(Event("Done"), Event[None])
assert_type(Event(created).name, str)
assert_type(fatal_event("bad project"), Event[str])
assert_type(FATAL, EventDef)
assert_type(Client("http://flyte:8080").timeout, float)
assert_type(Client("http://flyte:8080", jwt=lambda: "token").url, str)
assert_type(pack_def.id, str)
assert_type(pack_def.with_labels({"team": "ops"}), PackDef)
assert_type(current_action(), Action | None)
assert_type(flyte_api_health_check(Client("http://flyte:8080"))(), tuple[str, Health])


# -- decorators return the function as it was ----------------------------------------------------------------------

class CreateIssue(Schema):
    project = fields.String(required=True)
    summary = fields.String(required=True)


invalid = EventDef("CreateIssueFailure")


@pack_def.command("createIssueTyped", output_events=[created], input_schema=CreateIssue, failure_event=invalid,
                  timeout=30)
def create_typed_issue(issue: dict[str, Any]) -> Event[Issue]:
    return Event(created, Issue(key="OPS-1", project=issue["project"]))


assert_type(create_typed_issue({"project": "OPS"}), Event[Issue])
assert_type(create_typed_issue({"project": "OPS"}).payload.key, str)

pools: dict[Pack, list[int]] = {}


@pack_def.on_start
def open_pool(pack: Pack) -> None:
    pools[pack] = []


@pack_def.background()  # with parentheses too
def watch_queue(pack: Pack) -> None:
    while True:
        pack.send_event_nowait(Event(queue_depth, {"depth": len(pools[pack])}))
        gevent.sleep(60)


@pack_def.health_check
def database(pack: Pack) -> tuple[str, Health]:
    return "Database", Health(True, "reachable")


@pack_def.on_stop
def close_pool(pack: Pack) -> None:
    pools.pop(pack, None)



# -- a pack's life -------------------------------------------------------------------------------------------------

def lifecycle() -> None:
    pack = Pack(pack_def, Client("http://flyte:8080", timeout=10.0), max_in_flight=50, health_port=8090)
    try:
        pack.start(timeout=5)
    except FlyteError as exc:
        assert_type(exc.status, int | None)
    pack.send_event(Event(created, {"issueId": "FOO-2"}))
    assert_type(pack.send_event_nowait(Event(created, {"issueId": "FOO-3"})), bool)
    task = pack.spawn(print, "a report")
    task.join()
    assert_type(pack.live(), tuple[bool, str])
    assert_type(database(pack), tuple[str, Health])  # the decorated functions are still themselves
    assert_type(open_pool(pack), None)
    assert_type(pack.health_port, int | None)
    pack.stop(grace_period=0)
    try:
        Pack.from_env(pack_def, {"FLYTE_API": "http://flyte:8080"}, health_port=None)
    except ConfigError as exc:
        assert_type(exc.name, str | None)


# -- the testing kit -----------------------------------------------------------------------------------------------

def test_create_issue(flyte_api: FakeFlyteApi, running_pack: RunningPack) -> None:
    action = flyte_api.enqueue("JiraPack", "createIssue", {"project": "FOO"}, labels={"env": "dev"})
    assert_type(running_pack(pack_def, max_in_flight=3), Pack)
    result = flyte_api.wait_for_result(action)
    assert_type(result, ActionResult)
    assert result.event == "IssueCreated"


def test_check_url_needs_a_project() -> None:
    result = run_handler(pack_def, "createIssue", {})
    assert (result.name, result.payload["issueId"]) != ("FATAL", "")  # the payload is JSON a test may index
    assert run_handler(pack_def, "createIssue", {}) == Event("FATAL", "ValueError: bad project")
