"""Mistakes that mypy --strict must reject: each line below carries the error code mypy reports for it.

``make lint`` runs mypy with warn_unused_ignores (pyproject.toml), so a ``# type: ignore[code]`` whose line mypy
no longer rejects fails the lint: the mistake has become invisible to type checkers. One mistake per line, and
the code names the kind of error expected. Never run (pytest collects only ``test_*.py``).
"""

from typing import Any

from flyte_gevent import Client, Command, Event, EventDef, Health, Pack, PackDef, fatal_event
from flyte_gevent.testing import FakeFlyteApi, run_handler

created = EventDef("IssueCreated")
pack_def = PackDef("JiraPack")
client = Client("http://flyte:8080")


def handler(input: Any) -> Event[dict[str, str]]:
    return Event(created, {"issueId": "FOO-1"})


def no_argument() -> Event[None]:
    return Event(created)


def two_arguments(input: Any, extra: Any) -> Event[None]:
    return Event(created)


def returns_a_dict(input: Any) -> dict[str, str]:
    return {"issueId": "FOO-1"}


def hook(pack: Pack) -> None: ...


def unhealthy(pack: Pack) -> str:
    return "ok"


# The pieces of a pack, given the wrong things.
Pack(pack_def, "not a client")  # type: ignore[arg-type]
Pack("JiraPack", client)  # type: ignore[arg-type]
Pack(pack_def, client, max_in_flight="50")  # type: ignore[arg-type]
Pack(pack_def, client, polling_intervall=5.0)  # type: ignore[call-arg]
Client("http://x", timeout="5")  # type: ignore[arg-type]
Client(8080)  # type: ignore[arg-type]
Client("http://x", jwt=42)  # type: ignore[arg-type]
PackDef("JiraPack", labels={"env": 1})  # type: ignore[dict-item]
PackDef("JiraPack", commands=["createIssue"])  # type: ignore[list-item]
EventDef(42)  # type: ignore[arg-type]
Event(42, {})  # type: ignore[call-overload]

# Handlers of the wrong shape.
Command("createIssue", no_argument)  # type: ignore[arg-type]
Command("createIssue", two_arguments)  # type: ignore[arg-type]
Command("createIssue", returns_a_dict)  # type: ignore[arg-type]
Command("createIssue", handler, timeout="30")  # type: ignore[arg-type]
pack_def.command("createIssue")(no_argument)  # type: ignore[type-var]
pack_def.command("createIssue")(returns_a_dict)  # type: ignore[type-var]
pack_def.command("createIssue", timeout="30")  # type: ignore[arg-type]
pack_def.command("createIssue", input_schem=None)  # type: ignore[call-arg]

# Hooks of the wrong shape.
pack_def.on_start(no_argument)  # type: ignore[type-var]
pack_def.background(two_arguments)  # type: ignore[type-var]
pack_def.health_check(hook)  # type: ignore[type-var]
pack_def.health_check(unhealthy)  # type: ignore[type-var]

# Payloads and results keep their types.
Event(created, {"issueId": "FOO-1"}).payload.nonexistent_method()  # type: ignore[attr-defined]
Event(created, {"issueId": "FOO-1"}).payload["issueId"].nonexistent_method()  # type: ignore[attr-defined]
fatal_event("bad project").payload.nonexistent_method()  # type: ignore[attr-defined]
handler(None).payload["issueId"] + 1  # type: ignore[operator]
client.timeout.nonexistent_method()  # type: ignore[attr-defined]
Health("yes", "fine")  # type: ignore[arg-type]
pack_def.commands[0].output_events[0].nonexistent_method()  # type: ignore[attr-defined]
Pack.from_env(pack_def).send_event("IssueCreated")  # type: ignore[arg-type]

# The testing kit.
FakeFlyteApi(port="8080")  # type: ignore[arg-type]
FakeFlyteApi().enqueue("JiraPack", "createIssue", labels={"env": 1})  # type: ignore[dict-item]
FakeFlyteApi().wait_for_result(42)  # type: ignore[arg-type]
run_handler("JiraPack", "createIssue")  # type: ignore[arg-type]
