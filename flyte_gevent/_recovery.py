"""Completing the actions that dead processes left in the journal.

A pack with a journal (:mod:`flyte_gevent._journal`) opens it at start and
adopts the files of processes that died; once registered, it completes their
records before its first take (:meth:`Recovery.start`), and a greenlet it owns
(:meth:`Recovery.run`) then adopts, every minute, the files of processes that
died beside it since (a sibling gunicorn worker nobody replaces, say).

How a record is completed is decided here (:meth:`Recovery.plan`): a record
with a result has it delivered; one without (its handler was running when its
process died) is run again if its command says so, or else completed as FATAL
"pack restarted while this action was running"; a record written against
another Flyte API is reported and dropped. The completing itself — one result
per action, through the usual delivery — is the action runner's.

:class:`Recovery` talks to the pack through what it is given: the journal, the
action runner and pool, and callbacks for the take URL, for starting to take
and for a freed slot.
"""

import collections
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
from gevent.pool import Pool

from ._actions import RERUN, RESTARTED, RESTARTED_MESSAGE, RESULT, ActionRunner
from ._journal import Journal, NullJournal, Recovered
from ._retry import LogThrottle
from .client import _origin
from .log import bind_pack

if TYPE_CHECKING:
    from .metrics import NullMetrics
    from .models import Command

__all__ = ["Recovery"]

log = logging.getLogger("flyte_gevent.pack")  # part of the pack's start and life, logged as such

_ADOPT_INTERVAL = 60.0  # seconds between looks for journal files of processes that died beside this one
_OTHER_API = "other_api"  # how a record written against another Flyte API is "completed": dropped

Plan = list[tuple[Recovered, str]]


class Recovery:
    """The journal's life in a pack: opening it, adopting dead processes' files, completing their actions.

    Guarantees: a journal that cannot be used raises :class:`ConfigError` from
    :meth:`open` before the pack makes any request; every adopted record is
    either handed to the action runner once (in a slot of the action pool) or
    left in the journal for the next start (the pack stopped first); taking
    starts only once every record adopted at start has a slot.
    """

    def __init__(self, journal: "Journal | NullJournal", commands: "Mapping[str, Command]", runner: ActionRunner,
                 actions: Pool, metrics: "NullMetrics", *, pack_name: str, stopping: gevent.event.Event,
                 sleep: Callable[[float], None], take_url: Callable[[], str], start_taking: Callable[[], None],
                 on_slot_freed: Callable[[], None]) -> None:
        self._journal = journal
        self._commands = commands
        self._runner = runner
        self._actions = actions
        self._metrics = metrics
        self._pack_name = pack_name
        self._stopping = stopping
        self._sleep = sleep
        self._take_url = take_url
        self._start_taking = start_taking
        self._on_slot_freed = on_slot_freed
        self._open = False

    @property
    def is_open(self) -> bool:
        """Whether the journal is open (and records its actions)."""
        return self._open

    def open(self) -> list[Recovered]:
        """Open the journal (when there is one) and adopt the files of dead processes: their records.

        :raises ConfigError: the journal cannot be used (it is closed again).
        """
        if not self._journal.enabled:
            return []
        self._journal.open()
        try:
            records = self._journal.recover()
        except BaseException:
            self._journal.close()
            raise
        # Only now: a stop() while the journal opened must not close it under recover(); start() closes it then.
        self._open = True
        return records

    def close(self) -> None:
        """Close the journal if it is open; the records still in it stay on disk for the next start."""
        if not self._open:
            return
        self._open = False
        try:
            kept = self._journal.close()
        except Exception:  # the records are on disk whatever closing failed at
            log.exception("closing the journal in %s failed", self._journal.path)
            return
        if kept:
            log.info("journal closed: %d records kept in %s for the next start", kept, self._journal.path)
        else:
            log.info("journal closed: every action it recorded is completed")

    def start(self, records: list[Recovered]) -> Plan:
        """Once registered: put the records adopted at :meth:`open` into free slots; those that did not fit.

        Taking starts here when every record fitted; otherwise :meth:`run`
        starts it once the last one has a slot.
        """
        waiting = self._spawn(self.plan(records))
        if not waiting:
            self._start_taking()
        return waiting

    def plan(self, records: list[Recovered]) -> Plan:
        """How to complete each record adopted from the journal: ``[(record, how)]``; logged and counted.

        A record whose result URL is not on the origin of this pack's
        registration links was written against another Flyte API: it is never
        posted there (it holds the action's result), but reported and dropped.
        """
        if not records:
            return []
        take_url = self._take_url()
        take_origin = _origin(take_url)
        plan: Plan = []
        counts: collections.Counter[str] = collections.Counter()
        for record in records:
            command = self._commands.get(record.command)
            result_origin = _origin(record.result_url)
            if result_origin is None or result_origin != take_origin:
                how = _OTHER_API
                log.error("journal record of action %s (command %r, from %s) is not for this pack's Flyte API: its "
                          "result goes to %s, this pack talks to %s. It is not posted, and is dropped; complete the "
                          "action there by hand if it still matters", record.action_id, record.command, record.file,
                          _origin_text(record.result_url), _origin_text(take_url))
                self._metrics.result_lost()
                self._journal.remove(record.action_id)
            elif record.result is not None:
                how = RESULT
            elif command is not None and command.rerun_after_crash and record.restarts == 1:
                how = RERUN
            else:
                how = RESTARTED
            counts[how] += 1
            self._metrics.action_recovered(how)
            log.debug("recovering action %s (command %r, taken %s, restarts %d) from %s: %s", record.action_id,
                      record.command, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.taken_at)),
                      record.restarts, record.file,
                      {RESULT: "delivering its result", RERUN: "running it again",
                       RESTARTED: f"completing it as FATAL {RESTARTED_MESSAGE!r}",
                       _OTHER_API: "dropped (another Flyte API)"}[how])
            if how != _OTHER_API:
                plan.append((record, how))
        log.info("recovered %d actions from the journal: %d with a result to deliver, %d to run again, %d cut short "
                 "(completed as FATAL %r)%s", len(records), counts[RESULT], counts[RERUN], counts[RESTARTED],
                 RESTARTED_MESSAGE, f", {counts[_OTHER_API]} for another Flyte API (dropped)"
                 if counts[_OTHER_API] else "")
        return plan

    def run(self, waiting: Plan) -> None:
        """The journal greenlet: recovered actions that did not fit in the pool, then periodic adoption.

        Takes start once every recovered action has a slot. Every
        ``_ADOPT_INTERVAL`` seconds the files of processes that died since are
        adopted and their actions completed the same way. Records not started
        when the pack stops stay in the journal.
        """
        bind_pack(self._pack_name)
        throttle = LogThrottle(log)
        while not self._stopping.is_set():
            while waiting and not self._stopping.is_set():
                self._actions.wait_available()
                waiting = self._spawn(waiting)
            self._start_taking()
            self._sleep(_ADOPT_INTERVAL)
            if self._stopping.is_set():
                return
            try:
                waiting = self._spawn(self.plan(self._journal.recover()))
            except Exception as exc:  # noqa: BLE001 - a file that cannot be adopted now must not stop the pack
                throttle.log(logging.ERROR, str(exc), "adopting journal files of dead processes failed (the pack "
                             "goes on; they are tried again in %g s): %s", _ADOPT_INTERVAL, exc)

    def _spawn(self, plan: Plan) -> Plan:
        """Spawn recovered actions into the action pool while it has free slots; the rest of *plan*."""
        for index, (record, how) in enumerate(plan):
            if not self._actions.free_count() or self._stopping.is_set():
                return plan[index:]
            greenlet = self._actions.spawn(self._runner.run_recovered, record, how)
            greenlet.name = f"action:{record.action_id}"
            # Linked after the pool's own link, so it runs once the slot is free: the poller only hears
            # of the slots its own takes free.
            greenlet.rawlink(self._slot_freed)
        return []

    def _slot_freed(self, greenlet: Any) -> None:
        self._on_slot_freed()


def _origin_text(url: str) -> str:
    origin = _origin(url)
    return f"{origin[0]}://{origin[1]}:{origin[2]}" if origin else repr(url)
