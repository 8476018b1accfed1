"""The crash journal: taken actions on disk, so that a killed pack strands none of them.

Flyte hands each action out once. When the process that took it dies — SIGKILL,
the OOM killer, a gunicorn worker killed after its timeout, a crash in a C
extension — the action stays PENDING for ever. A pack with a journal writes
every taken action down before its handler runs, adds the encoded result once
it is known, and removes the record once the result is accepted or definitively
refused. The next process to start on the same journal directory finds the
records of the dead one and completes them: a record with a result is delivered
as usual; a record without one had its handler cut short, and is completed as
FATAL (or run again, for commands declared safe to re-run).

**Where.** The journal is a directory. Each live process owns one SQLite file
in it (WAL mode) and holds an OS file lock on it for as long as it lives; a
starting process adopts the files of dead owners of the same pack, so nothing
is recovered twice. The files, their locks, adoption, and what makes a file
unusable (a :class:`~flyte_gevent.errors.ConfigError` at start, naming
``FLYTE_GEVENT_JOURNAL`` and the file) are :mod:`flyte_gevent._journal_files`.
This module is the interface the runtime uses (:class:`Journal`, or
:class:`NullJournal` when the journal is off); the thread that writes is
:mod:`flyte_gevent._journal_writer`.

**What is guaranteed.**

* When :meth:`Journal.taken` returns, the record is durable: with
  ``sync="normal"`` (the default: WAL, ``synchronous=NORMAL``) it is in the
  kernel and survives the death of the process (SIGKILL, OOM kill, segfault);
  with ``sync="full"`` it has also been ``fsync``-ed and survives a crash of
  the machine or a power loss.
* With ``sync="normal"`` a crash of the *machine* may lose the records of the
  last moments before it (what the kernel had not yet written back), never
  corrupt the file.
* A result (:meth:`Journal.result`) and a removal (:meth:`Journal.remove`) are
  queued and written ``linger`` seconds (0.05 s by default) after the first of
  them, in one transaction with every other result and removal queued
  meanwhile (plus the time the thread needs for the job it is writing). A
  process that dies in that window leaves the record as it was: a
  lost result makes the action count as cut short (FATAL or re-run); a lost
  removal makes the next start deliver a result the server already has, which
  the server refuses (500) without applying it twice.
* Every adoption counts in the record's ``restarts``, so a command that keeps
  crashing the process need not be re-run for ever.

**What is not.** The one window that remains: the take's answer has arrived
but the process dies before :meth:`Journal.taken` returns. That action stays
PENDING, as without a journal. The window is the rest of the hub's loop
iteration, then the job the thread is writing (if any), then the take's own:
about 0.1–0.5 ms with ``sync="normal"`` while the pack has CPU to spare, plus
an ``fsync`` with ``sync="full"``; when the hub is saturated (a backlog being
taken as fast as the CPU allows) the iteration itself is long and the window
grows to tens of milliseconds (``bench/journal_micro.py`` measures it as
*taken p50/p99*).

**Never blocking the hub.** SQLite calls are blocking C calls, and even a
small WAL append can wait tens of milliseconds behind the filesystem's journal
while an fsync runs (checkpoints do two). So none of them runs in the hub:
every one runs on the journal's own thread. And since each time that thread
needs the GIL back from a busy hub costs both threads a wake-up, the thread
does nothing but SQLite calls: the hub decides what to write and gathers it
into whole *jobs*, hands over one job at a time through one lock release,
and hears back through one loop watcher. The takes of one loop iteration
(and those that come while the thread is busy) make one job and share its
commit (and, with ``sync="full"``, its ``fsync``); the greenlet that calls
:meth:`Journal.taken` waits, cooperatively, for it. Results and removals do
not wait: they linger in a job of their own, in which a result whose record
is removed before it was written is not written at all.

Usage (what the pack runtime does)::

    journal = Journal("/var/lib/mypack/journal", pack_def.id)
    journal.open()                      # after fork; ConfigError if unusable
    for record in journal.recover():    # left by dead processes
        ...                             # deliver record.result, or FATAL / re-run
        journal.remove(record.action_id)
    journal.taken(action)               # before the handler runs
    journal.result(action.id, body)     # once the result is encoded
    journal.remove(action.id)           # once the result is accepted or refused
    journal.close()                     # at shutdown
"""

import logging
import os
import time
import weakref
from typing import TYPE_CHECKING, Any

from ._journal_files import (
    SCHEMA_VERSION,
    SETTING,
    SYNC_MODES,
    JournalError,
    Recovered,
    Store,
    adopt_dead,
    encode_input,
    release_all,
    storable,
)
from ._journal_writer import Writer
from .errors import ConfigError

if TYPE_CHECKING:
    from .models import Action

__all__ = ["SCHEMA_VERSION", "SYNC_MODES", "Journal", "JournalError", "NullJournal", "Recovered"]

log = logging.getLogger("flyte_gevent.journal")



class NullJournal:
    """The journal's interface when the journal is off: every method does nothing.

    A pack without a journal runs exactly as it would without this module:
    nothing is written, :meth:`recover` finds nothing, and :meth:`taken` never
    fails.
    """

    enabled = False
    path: str | None = None
    file: str | None = None
    write_failures = 0

    def __repr__(self) -> str:
        return "<NullJournal>"

    def __len__(self) -> int:
        return 0

    def open(self) -> None:
        pass

    def recover(self) -> list[Recovered]:
        return []

    def taken(self, action: "Action") -> None:
        pass

    def result(self, action_id: str, body: bytes) -> None:
        pass

    def remove(self, action_id: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> int:
        return 0


class Journal:
    """A journal directory, as one process uses it.

    :param path: the journal directory (created if missing).
    :param pack_id: the id of the pack writing it; only files of this pack are
        adopted by :meth:`recover`.
    :param sync: ``"normal"`` (durable against process crashes) or ``"full"``
        (also against machine crashes, at the cost of an ``fsync`` per batch).
    :param linger: seconds a queued result or removal waits to share a
        transaction with others.

    Nothing touches the disk before :meth:`open`. Open the journal in the
    process that uses it — after a fork, never before: a journal opened before
    a fork is unusable in the child (and its files stay owned by the parent).
    All methods are called from greenlets of the hub the journal was opened in.
    """

    enabled = True

    def __init__(self, path: str, pack_id: str, *, sync: str = "normal", linger: float = 0.05) -> None:
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ConfigError(f"{SETTING} / journal={path!r}: expected a directory path", SETTING)
        if not isinstance(pack_id, str) or not pack_id:
            raise ValueError(f"pack_id={pack_id!r}: expected the pack's id")
        if sync not in SYNC_MODES:
            raise ConfigError(f"FLYTE_GEVENT_JOURNAL_SYNC / journal_sync={sync!r}: expected one of "
                              f"{', '.join(SYNC_MODES)}", "FLYTE_GEVENT_JOURNAL_SYNC")
        if not (isinstance(linger, (int, float)) and 0 <= linger < 10):
            raise ValueError(f"linger={linger!r}: expected seconds between 0 and 10")
        self.path = os.path.abspath(os.fspath(path))
        self.pack_id = pack_id
        self.sync = sync
        self.linger = float(linger)
        # Set by open(); every method that uses them checks first that the journal is usable.
        self._own: Any = None               # this process's Store
        self._stores: list[Any] = []        # every Store held: own first, then adopted
        self._records: dict[str, tuple[Any, int]] = {}  # action id -> (store, row id)
        self._writer: Any = None            # the _journal_writer.Writer
        self._closing = False
        self._closed = False
        self._forked = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._own else "not open"
        return f"<Journal {self.path!r} {state}, {len(self._records)} records>"

    def __len__(self) -> int:
        """Records held: actions taken or adopted and not yet removed."""
        return len(self._records)

    @property
    def write_failures(self) -> int:
        """Jobs (writes handed to the journal's thread together) that failed since :meth:`open` (for metrics)."""
        return self._writer.failures if self._writer else 0

    @property
    def file(self) -> str | None:
        """The path of this process's own journal file (``None`` before :meth:`open`)."""
        return self._own.db_path if self._own else None

    def open(self) -> None:
        """Create the directory if needed and this process's own journal file in it.

        A closed journal may be opened again (a pack whose start failed, started
        again): it starts afresh with a new file of its own, and adopts what it
        left in the old one like the file of any dead owner.

        :raises ConfigError: the directory cannot be created or written, or
            does not support file locks.
        """
        if self._forked:
            self._check_usable()
        if self._own is not None and not self._closed:
            raise RuntimeError("the journal is already open")
        self._own, self._stores, self._records = None, [], {}
        self._closing = self._closed = False
        writer = Writer(self.linger)
        try:
            self._own = writer.call(Store.create, self.path, self.pack_id, self.sync)
        except BaseException:
            writer.stop()
            raise
        self._writer = writer
        self._stores.append(self._own)
        _open_journals.add(self)
        log.debug("journal file %s opened (sync=%s)", self._own.db_path, self.sync)

    def recover(self) -> list[Recovered]:
        """Adopt the files of dead processes of this pack; their records, oldest first.

        Call it at start, before the first take; it may be called again later
        to pick up the files of processes that died since (files already held
        are not returned again). Adopted records stay on disk until
        :meth:`remove` is called for each, so a crash during recovery loses
        none of them. Each adoption adds one to every adopted record's
        ``restarts``, durably, before this returns.

        :raises ConfigError: a file of a dead owner is unreadable, damaged, not
            a journal, or from a newer flyte_gevent (nothing is adopted then).
        """
        self._check_usable()
        if self._closing:
            raise RuntimeError("the journal is closed")
        held = {store.stem for store in self._stores}
        adopted, foreign = self._writer.call(adopt_dead, self.path, self.pack_id, self.sync, held)
        for path, other in foreign:
            log.warning("journal file %s belongs to pack %r, not %r: left for that pack", path, other, self.pack_id)
        recovered = []
        for store, rows, meta in adopted:
            for record, row_id in rows:
                if record.action_id in self._records:
                    # The same action in two files can only come from copying files around: keep one.
                    log.warning("action %s is in journal files %s and %s; completing it once", record.action_id,
                                self._records[record.action_id][0].db_path, store.db_path)
                    self._writer.delete(store, row_id)
                    continue
                store.count += 1
                self._records[record.action_id] = (store, row_id)
                recovered.append(record)
            if meta:
                log.log(logging.INFO if rows else logging.DEBUG,
                        "adopted journal file %s of a dead process (pid %s on %s, created %s): %d records, "
                        "%d with results", store.db_path, meta.get("pid"), meta.get("host"), meta.get("created"),
                         len(rows), sum(1 for record, _ in rows if record.result is not None))
            if store.count:
                self._stores.append(store)
            else:
                self._writer.retire(store)
        return recovered

    def taken(self, action: "Action") -> None:
        """Record a just-taken *action*; returns once the record is durable.

        Call it as soon as the take's answer is decoded, before the handler
        runs. *action* has ``id``, ``command``, ``input`` (JSON-compatible) and
        ``result_url``; a malformed action's ``command`` may be ``None``
        (recorded as ``""``).

        :raises JournalError: the record could not be written (the action is
            then not protected; the journal goes on working for the others).
        :raises ValueError: the action is already in the journal.
        """
        self._check_usable()
        if self._closing:
            raise JournalError(f"action {action.id} not journaled: the journal is closed")
        if action.id in self._records:
            raise ValueError(f"action {action.id} is already in the journal")
        command = action.command or ""
        for text in (action.id, command, action.result_url):
            if not text.isascii() and not storable(text):
                # Refused here, alone: in the batch it would fail every action written with it.
                raise JournalError(f"action {action.id} not journaled: {text!r} cannot be stored as UTF-8")
        own = self._own
        own.last_row += 1
        row_id = own.last_row
        params = (row_id, action.id, command, encode_input(action.input), action.result_url,
                  self.pack_id, time.time())
        self._records[action.id] = (own, row_id)
        own.count += 1
        error = self._writer.insert(own, params)
        if error is not None:
            # Not on disk; whatever else happens to this action happens without the journal.
            if self._records.pop(action.id, None) is not None:
                own.count -= 1
            raise JournalError(f"action {action.id} not journaled: {error}") from error

    def result(self, action_id: str, body: bytes) -> None:
        """Queue the encoded result *body* (bytes) of *action_id*; returns at once.

        Written within ``linger`` seconds unless :meth:`remove` comes first (the
        result was delivered at once, so there is nothing to keep). A later call
        replaces the result. Unknown ids are ignored, and so is a call after
        :meth:`close` began (the record stays as it is on disk).
        """
        self._check_usable()
        if self._closing:
            return
        where = self._records.get(action_id)
        if where is not None:
            self._writer.update(where[0], where[1], bytes(body))

    def remove(self, action_id: str) -> None:
        """Queue the removal of *action_id*'s record: its result was accepted or definitively refused.

        Returns at once; unknown ids, and calls after :meth:`close` began, are
        ignored. An adopted file whose last record is removed is deleted and its
        lock released.
        """
        self._check_usable()
        if self._closing:
            return
        where = self._records.pop(action_id, None)
        if where is None:
            return
        store, row_id = where
        store.count -= 1
        self._writer.delete(store, row_id)
        if store is not self._own and store.count == 0:
            self._stores.remove(store)
            self._writer.retire(store)

    def flush(self) -> None:
        """Return once everything queued so far is written (per the sync mode).

        :raises JournalError: some of it could not be written.
        """
        self._check_usable()
        if self._closing:
            raise JournalError("the journal is closed")
        errors = self._writer.flush()
        if errors:
            error = next(iter(errors.values()))
            raise JournalError(str(error)) from error

    def close(self) -> int:
        """Write what is queued, then let go of every file; returns the records kept on disk.

        This process's own file is deleted when it holds no records; otherwise
        it stays, with any adopted files still holding records, for the next
        process to adopt (results not delivered by shutdown are delivered by
        the next start). Closing twice does nothing.
        """
        if self._closed or self._own is None:
            self._closed = True
            return 0
        self._closed = True
        _open_journals.discard(self)
        if self._forked:
            return 0
        self._closing = True
        kept = len(self._records)
        stores, self._stores = self._stores, []
        try:
            self._writer.call(release_all, stores, self._own)
        finally:
            self._writer.stop()
        log.debug("journal closed; %d records kept in %s", kept, self.path)
        return kept

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- the writer --------------------------------------------------------------------------------

    def _check_usable(self):
        if self._forked:
            raise JournalError(f"journal {self.path} was opened in the parent process before a fork; "
                               f"open the journal in the process that uses it")
        if self._own is None:
            raise RuntimeError("the journal is not open")


# -- fork safety -----------------------------------------------------------------------------------

_open_journals: weakref.WeakSet[Journal] = weakref.WeakSet()
_kept_from_child: list[Any] = []


def _after_fork_in_child():
    """A forked child must not touch its parent's journal files, nor let go of their locks."""
    for journal in list(_open_journals):
        journal._forked = True
        for store in journal._stores:
            store.forget_after_fork(_kept_from_child)
    _open_journals.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
