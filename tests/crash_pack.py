"""A pack for the crash-recovery tests (tests/test_crash_recovery.py): ``flyte-gevent run crash_pack:pack_def``.

Configured like any pack, from ``FLYTE_*`` variables (``FLYTE_GEVENT_JOURNAL`` turns the journal on). Its
handlers behave by the environment of the process running them, so that a test can start one process whose
handlers never finish, SIGKILL it, and start the next one, whose handlers return at once:

* ``Hold`` writes ``started <action id>`` on stdout (flushed), then, while ``CRASH_PACK_HOLD`` is set, waits
  (cooperatively, up to a minute); then returns ``Done``. Not declared safe to run again.
* ``Redo`` does the same, and is declared ``rerun_after_crash=True``.
* ``Echo`` returns ``Done`` at once.

Every payload says which process handled the action (``pid``) and what the input was.
"""

import os
import sys

import gevent

from flyte_gevent import Command, Event, EventDef, PackDef, current_action

PACK_NAME = "Crashy"

done = EventDef("Done")


def _hold(input):
    print(f"started {current_action().id}", flush=True)
    if os.environ.get("CRASH_PACK_HOLD"):
        gevent.sleep(60)
    return Event(done, {"input": input, "pid": os.getpid()})


def echo(input):
    return Event(done, {"input": input, "pid": os.getpid()})


pack_def = PackDef(PACK_NAME, commands=[
    Command("Hold", _hold, [done]),
    Command("Redo", _hold, [done], rerun_after_crash=True),
    Command("Echo", echo, [done]),
])

if __name__ == "__main__":
    sys.exit("run it with: flyte-gevent run crash_pack:pack_def")
