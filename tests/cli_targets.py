"""Targets for the ``flyte-gevent run``/``check`` subprocess tests (tests/test_cli.py).

Every kind of target the CLI accepts, on one small pack ``CliEcho`` whose
``Echo`` command logs through its own logger (so the tests can look for the
action context on the pack author's records) and can be made to sleep:

* ``pack_def`` — a PackDef; ``create_pack_def`` — a factory returning one;
* ``create_from_settings`` — a factory given the resolved settings, whose ``Settings`` command answers with
  what it was given;
* tests/cli_pack_target.py holds a ready ``pack`` (a ``Pack``), and ``create_ready_pack`` returns one: both
  refused, since a Pack built in advance would ignore the runner's settings;
* ``failing_start`` — a PackDef whose on_start hook raises;
* ``broken_factory`` — raises, the CLI's "unexpected error" case; ``not_a_pack`` — neither;
* ``bad_pack_def`` — a definition Flyte would refuse.

Nothing here patches: the CLI does that before importing this module.
"""

import logging

import gevent

from flyte_gevent import Event, EventDef, PackDef

log = logging.getLogger("cli_targets.echo")

echoed = EventDef("Echoed")


def _make_pack_def(name="CliEcho"):
    pack_def = PackDef(name, labels={"team": "cli"})

    @pack_def.command("Echo", output_events=[echoed])
    def echo(input):
        log.info("echoing %s", input.get("text"))
        gevent.sleep(float(input.get("sleep_s", 0)))
        return Event(echoed, {"text": input.get("text")})

    return pack_def


pack_def = _make_pack_def()


def create_pack_def():
    return _make_pack_def("CliFactory")


def create_from_settings(settings):
    pack_def = PackDef("CliSettings")
    seen = {"labels": settings["labels"], "health_port": settings["health_port"], "api": settings["api"],
            "grace_period": settings["grace_period"], "repr": repr(settings)}

    @pack_def.command("Settings", output_events=[echoed])
    def show(input):
        return Event(echoed, seen)

    return pack_def


def create_ready_pack():
    from flyte_gevent import Pack

    return Pack.from_env(_make_pack_def("CliFactoryPack"))


failing_start = PackDef("CliFailingStart")


@failing_start.on_start
def warm_cache(pack):
    raise RuntimeError("cache warm-up failed")


def broken_factory():
    raise RuntimeError("the database is on fire")


not_a_pack = 42

# PackDef("bad name") is refused where it is made; renamed afterwards, it is refused by the validate() that run
# and check call.
bad_pack_def = PackDef("placeholder")
bad_pack_def.name = "bad name"
