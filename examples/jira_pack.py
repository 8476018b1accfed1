"""A Jira-like pack: the example from the flyte_gevent README, made runnable.

It talks to no real Jira: issues are kept in memory, so the example runs
anywhere. The shape is that of ExpediaGroup/flyte-jira: a command that creates
an issue and emits ``IssueCreated``, or completes the action as FATAL when the
handler raises (``"ValueError: bad project"``).

Input of ``createIssue``: ``{"project": "FOO", "summary": "Disk full"}``.

Run it::

    FLYTE_API=http://flyte:8080 python examples/jira_pack.py
"""

from gevent import monkey

if __name__ == "__main__":
    monkey.patch_all()

import itertools
import sys

from flyte_gevent import JSON, Command, ConfigError, Event, EventDef, Pack, PackDef

created = EventDef("IssueCreated")

_PROJECTS = {"FOO", "OPS", "DEV"}
_numbers = itertools.count(1)


def create_issue(input: JSON) -> Event[dict[str, JSON]]:
    """Create an issue; *input* is the action's decoded JSON."""
    if not isinstance(input, dict):
        raise TypeError(f"input must be an object with project and summary, not {type(input).__name__}")
    project = input.get("project")
    if project not in _PROJECTS:
        raise ValueError("bad project")
    return Event(created, {"issueId": f"{project}-{next(_numbers)}", "summary": input.get("summary", "")})


pack_def = PackDef(
    name="JiraPack",
    help_url="https://example.com/jira-pack",
    commands=[Command(name="createIssue", handler=create_issue, output_events=[created])],
    event_defs=[],
    labels={"env": "dev"},
)


def main() -> None:
    try:
        pack = Pack.from_env(pack_def)
    except ConfigError as exc:
        sys.exit(f"Error: {exc}")
    pack.run()


if __name__ == "__main__":
    main()
