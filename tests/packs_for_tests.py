"""A small pack for the reliability tests, importable in process and runnable as a pack process.

Its commands do what their input says, so one definition serves every scenario:

* ``Sleep`` ``{"seconds": 1.5, "tag": "x"}`` sleeps (cooperatively), then returns ``Done``;
* ``Echo`` returns ``Done`` with its input.

Every payload carries ``pid`` (the process that handled the action), so tests
with several pack processes can tell who completed what.

Run as a script it is a pack process configured from ``FLYTE_*`` variables, as
a real pack would be: it patches first, then ``Pack.from_env(...).run()``, and
exits with ``run()``'s return (0 after a graceful stop)::

    FLYTE_API=http://127.0.0.1:8080 FLYTE_HEALTH_PORT=off python tests/packs_for_tests.py
"""

from gevent import monkey

if __name__ == "__main__":
    monkey.patch_all()

import logging
import os
import sys

import gevent

from flyte_gevent import Command, Event, EventDef, PackDef

PACK_NAME = "Reliability"

done = EventDef("Done")
noticed = EventDef("Noticed")


def sleep(input):
    """Sleep ``input["seconds"]`` seconds, then report what was asked and who did it."""
    input = input or {}
    gevent.sleep(float(input.get("seconds", 0)))
    return Event(done, {"tag": input.get("tag"), "seconds": input.get("seconds", 0), "pid": os.getpid()})


def echo(input):
    """Return the input unchanged, with the handling process."""
    return Event(done, {"input": input, "pid": os.getpid()})


def make_pack_def(name=PACK_NAME, labels=None):
    """The test pack's definition: ``Sleep`` and ``Echo`` emitting ``Done``, and a spontaneous ``Noticed``."""
    return PackDef(name, commands=[Command("Sleep", sleep, [done]), Command("Echo", echo, [done])],
                   event_defs=[noticed], labels=labels)


def main():
    """Run the pack from the environment until SIGTERM/SIGINT; logs go to stderr for the test to show."""
    from flyte_gevent import Pack

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"[pid {os.getpid()}] %(levelname)s %(name)s %(message)s")
    pack = Pack.from_env(make_pack_def(os.environ.get("TEST_PACK_NAME", PACK_NAME)))
    pack.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
