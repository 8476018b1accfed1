"""A handler's outcome as a pack would post it, without a Flyte API: for unit tests of handlers.

:func:`run_handler` gives one action to the runtime's own
:class:`~flyte_gevent._actions.ActionRunner` — the code every taken action goes
through — with a stand-in for result delivery that keeps the result instead of
posting it. So what it returns is what a running pack would post, by the same
rules: the input schema, the timeout, a handler's exception becoming FATAL text
(URL credentials cut out), the payload schema, the warning for an event a
command does not declare. Re-exported as ``flyte_gevent.testing.run_handler``.
"""

import json
import secrets
from typing import Any, cast

import gevent

from ._actions import ActionRunner
from ._delivery import ACCEPTED, Delivered
from ._fake_server import as_flow_input
from .metrics import NullMetrics
from .models import FATAL, JSON, Action, Event, EventDef, PackDef

__all__ = ["run_handler"]


def run_handler(pack_def: PackDef, command: str, input: JSON = None, *,
                action_timeout: float | None = None) -> Event[Any]:
    """Run *command* of *pack_def* on *input* as the pack would, and return the result it would post.

    The input reaches the handler as an action a flow created carries it
    (numbers as float64, members whose value is null left out), so a handler
    tested here sees what it sees in production. The handler runs in a
    greenlet of its own, with :func:`~flyte_gevent.current_action` set. No
    hook of the definition runs: they belong to a running pack.

    Usage::

        from flyte_gevent.testing import run_handler

        def test_check_url_refuses_a_missing_url():
            result = run_handler(pack_def, "checkUrl", {})
            assert (result.name, result.payload) == ("FATAL", "invalid input for command 'checkUrl':\\n"
                                                              "url: Missing data for required field.")

    :param action_timeout: the pack's default per-action timeout, in seconds
        (a command's own ``timeout`` wins, as in a pack).
    :returns: the :class:`~flyte_gevent.Event` the pack would post: its payload
        is the JSON that would be sent (a dataclass or a schema's dump as a dict;
        typed ``Any``, as what ``json.loads`` returns is, so a test can index it),
        and a failure is a ``FATAL`` event whose payload is the text Flyte would get
        — ``"Unknown command 'X'"`` for a command the definition lacks.
    :raises PackDefError: the definition is invalid (as ``start()`` would say).
    :raises ValueError: no flow could create an action with this input (null inside an array).
    """
    if not isinstance(pack_def, PackDef):
        raise TypeError(f"run_handler needs a PackDef, not {type(pack_def).__name__}")
    pack_def.validate()
    action_id = secrets.token_hex(12)  # shaped like the server's ids
    action = Action(action_id, command, as_flow_input(input),
                    f"http://flyte.invalid/v1/packs/{pack_def.id}/actions/{action_id}/result")
    kept = _KeptResult()
    runner = ActionRunner(pack_def.name, {c.name: c for c in pack_def.commands}, kept, NullMetrics(),
                          action_timeout=action_timeout)
    gevent.spawn(runner.run, action).get()
    body = json.loads(cast(bytes, kept.body))  # the runner delivers exactly one result
    declared = {event_def.name: event_def for event_def in pack_def.all_event_defs()}
    declared.setdefault(FATAL.name, FATAL)
    return Event(declared.get(body["event"]) or EventDef(body["event"]), body.get("payload"))


class _KeptResult:
    """Stands in for the pack's result delivery: keeps the one encoded result, as if the API had accepted it."""

    def __init__(self) -> None:
        self.body: bytes | None = None

    def deliver_result(self, action: Action, body: bytes, event_name: str, recovered: bool = False) -> Delivered:
        self.body = body
        return Delivered(ACCEPTED, event_name, 0, None, None, True)
