"""Unannotated pack code, written as the README writes it, that mypy must accept with its default settings.

A pack author who runs mypy without annotating anything gets no errors from flyte_gevent's types (and, where a
value's type is known, checks all the same). pyproject.toml checks this module with mypy's defaults, not strict.
"""

import gevent

from flyte_gevent import Client, Command, Event, EventDef, Health, Pack, PackDef

created = EventDef("IssueCreated")
queue_depth = EventDef("QueueDepth")


def create_issue(input):                           # input: the action's decoded JSON
    if input.get("project") not in {"FOO", "OPS"}:
        raise ValueError("bad project")            # -> FATAL "ValueError: bad project"
    return Event(created, {"issueId": "FOO-1"})


pack_def = PackDef(name="JiraPack", help_url="https://example.com/jira-pack",
                   commands=[Command(name="createIssue", handler=create_issue, output_events=[created])],
                   labels={"env": "dev"})

pools: dict[object, list[int]] = {}


@pack_def.command("closeIssue", output_events="IssueClosed")
def close_issue(input):
    return Event("IssueClosed", input)


@pack_def.on_start
def open_pool(pack):                 # registered; nothing taken yet
    pools[pack] = []


@pack_def.background
def watch_queue(pack):               # runs until the stop begins; restarted with backoff if it raises
    while True:
        pack.send_event_nowait(Event(queue_depth, {"depth": len(pools[pack])}))
        gevent.sleep(60)


@pack_def.health_check
def database(pack):
    return "Database", Health(True, "reachable")


@pack_def.on_stop
def close_pool(pack):                # running handlers are done
    pools.pop(pack, None)


def send_report(pack):
    pack.send_event(Event(created, {"issueId": "FOO-2"}))


def main():
    pack = Pack(pack_def, Client("http://flyte:8080", timeout=10.0), max_in_flight=50, health_port=8090)
    pack.start()
    pack.send_event(Event(created, {"issueId": "FOO-2"}))
    pack.send_event_nowait(Event(created, {"issueId": "FOO-3"}))
    pack.spawn(send_report, pack)
    pack.run()
    pack.stop()
    Pack.from_env(pack_def).run()
