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

**Layout.** The journal is a directory. Each live process owns one journal
file in it, ``flyte-<UTC time>-<random>.db`` (SQLite in WAL mode), and holds
an exclusive ``flock`` on its sidecar ``<same name>.lock`` for as long as it runs:
the kernel drops that lock when the process dies, however it dies, so a
lockable file belongs to a dead owner. Process ids are never used — they are
reused across container restarts. A starting process *adopts* the files of
dead owners by taking their locks, so two processes starting at once never
recover the same file, and holds each adopted file until all of its records are
finished; if the adopter dies too, the file is adoptable again with whatever
is left in it. Only files of the same pack id are adopted (a file of another
pack is left for that pack, with a warning). The sidecar lock keeps our lock
away from the database file, whose POSIX locks SQLite manages itself and
would lose if this module opened and closed the file on its own.

The directory must be on a local filesystem (an ``emptyDir``, a node disk, a
ReadWriteOnce volume), not NFS: SQLite's WAL mode and ``flock`` both need it.
Replicas on separate pods keep separate directories. It holds action inputs
and results, so keep it readable by the pack's user only (a directory this
module creates is mode 0700).

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
  queued and written within ``linger`` seconds (0.05 s by default) or with the
  next take, whichever comes first, in one transaction with whatever else is
  queued. A process that dies in that window leaves the record as it was: a
  lost result makes the action count as cut short (FATAL or re-run); a lost
  removal makes the next start deliver a result the server already has, which
  the server refuses (500) without applying it twice.
* Every adoption counts in the record's ``restarts``, so a command that keeps
  crashing the process need not be re-run for ever.

**What is not.** The one window that remains: the take's answer has arrived
but the process dies before :meth:`Journal.taken` returns. That action stays
PENDING, as without a journal. The window is one batch on the journal's
thread: about 0.1–0.5 ms with ``sync="normal"`` while the pack has CPU to
spare, plus an ``fsync`` with ``sync="full"``; when the hub is saturated
(a backlog being taken as fast as the CPU allows) the thread waits for the GIL
and the window grows to tens of milliseconds (``bench/journal_micro.py``
measures it as *taken p50/p99*).

**Never blocking the hub.** SQLite calls are blocking C calls, and even a
small WAL append can wait tens of milliseconds behind the filesystem's journal
while an fsync runs (checkpoints do two). So none of them runs in the hub:
every one runs on the journal's own thread. Greenlets append their operations
to a queue; the thread takes everything queued since its last batch and
writes it in one transaction per file, with multi-row statements, so under
load a commit (and, with ``sync="full"``, an ``fsync``) is shared by every
action in the batch. The greenlet that calls :meth:`Journal.taken` waits,
cooperatively, for its batch to commit; results and removals do not wait, and
a result whose removal lands in the same batch is not written at all.

**A journal that cannot be used is a configuration error.** A directory that
cannot be created or written, a file in it that is not an SQLite database, is
another program's database, is damaged, or has a schema from a newer
flyte_gevent: :class:`~flyte_gevent.errors.ConfigError` naming the setting
(``FLYTE_GEVENT_JOURNAL`` / ``journal``) and the file. A damaged file of a dead
owner stops the start rather than being skipped: its actions would otherwise be
stranded without anyone noticing. Move the file out of the directory to start
without it.

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

import collections
import dataclasses
import datetime
import fcntl
import functools
import json
import logging
import os
import re
import secrets
import sqlite3
import time
import urllib.parse
import weakref

import gevent
import gevent.event
from gevent import monkey
from gevent.pool import Group

from .errors import ConfigError
from .models import Action

__all__ = ["Journal", "Recovered", "JournalError", "SYNC_MODES", "SCHEMA_VERSION"]

log = logging.getLogger("flyte_gevent.journal")

SCHEMA_VERSION = 1
"""The schema this module writes; files with a higher ``user_version`` are refused."""

SYNC_MODES = {"normal": "NORMAL", "full": "FULL"}
"""``sync=`` values and the SQLite ``synchronous`` setting each one means."""

SETTING = "FLYTE_GEVENT_JOURNAL"

# "FgJ1" in the header: tells our files from other SQLite databases.
_APPLICATION_ID = 0x46674A31
_FILE = re.compile(r"^(flyte-\d{8}T\d{12}-[0-9a-f]{8})\.(db|lock)$")
_STALE_TEMP = 60.0           # seconds after which a temp lock that was never renamed is garbage
_WAL_LIMIT = 16 * 1024 * 1024  # truncate the WAL back to this after a burst of large records
_LOG_AGAIN = 30.0            # seconds between repeated write-failure logs

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE actions (
    id INTEGER PRIMARY KEY,
    action_id TEXT NOT NULL,
    command TEXT NOT NULL,
    input TEXT NOT NULL,
    result_url TEXT NOT NULL,
    pack_id TEXT NOT NULL,
    taken_at REAL NOT NULL,
    result BLOB,
    restarts INTEGER NOT NULL DEFAULT 0
);
"""
_UPDATE = "UPDATE actions SET result = ? WHERE id = ?"
# One encoder for every input: json.dumps with arguments builds a new one per call. ASCII
# escapes keep lone surrogates (valid in JSON text, not in UTF-8) storable.
_encode_input = json.JSONEncoder(separators=(",", ":")).encode


@functools.lru_cache(maxsize=None)
def _insert_sql(rows):
    return ("INSERT INTO actions (id, action_id, command, input, result_url, pack_id, taken_at) VALUES "
            + ",".join(["(?,?,?,?,?,?,?)"] * rows))


@functools.lru_cache(maxsize=None)
def _delete_sql(rows):
    return "DELETE FROM actions WHERE id IN (" + ",".join("?" * rows) + ")"


# Operations queued for the writer, in the order given.
_TAKEN, _RESULT, _REMOVE, _RETIRE, _CALL, _FLUSH, _STOP = range(7)
# Rows per multi-row statement: a batch costs a few statements, not one per row
# (each statement gives the GIL up and has to get it back from a busy hub).
# 128 rows of 7 values stay below SQLite's oldest limit of 999 parameters.
_ROWS_PER_INSERT = 128
_ROWS_PER_DELETE = 512

# Real threads and locks even when the program is monkey-patched.
_start_new_thread, _allocate_lock = monkey.get_original("_thread", ["start_new_thread", "allocate_lock"])


class JournalError(Exception):
    """Writing to an open journal failed (disk full, I/O error, file removed underneath).

    The action concerned is not protected by the journal; the pack goes on
    without it for that action.
    """


@dataclasses.dataclass(frozen=True)
class Recovered:
    """A record left by a dead process, adopted by this one.

    :ivar action_id: the action id.
    :ivar command: the command name.
    :ivar input: the action's decoded JSON input.
    :ivar result_url: where the result goes.
    :ivar pack_id: the pack that took it.
    :ivar taken_at: when it was taken (seconds since the epoch).
    :ivar result: the encoded result body, or ``None`` when the handler had not
        finished (the process died while it ran).
    :ivar restarts: how many times a process holding this record has died
        (1 the first time it is recovered).
    :ivar file: the journal file it came from, for log lines.
    """

    action_id: str
    command: str
    input: object
    result_url: str
    pack_id: str
    taken_at: float
    result: bytes | None
    restarts: int
    file: str

    @property
    def action(self):
        """The record as the :class:`~flyte_gevent.models.Action` that was taken."""
        return Action(self.action_id, self.command, self.input, self.result_url)


class Journal:
    """A journal directory, as one process uses it.

    :param path: the journal directory (created if missing).
    :param pack_id: the id of the pack writing it; only files of this pack are
        adopted by :meth:`recover`.
    :param sync: ``"normal"`` (durable against process crashes) or ``"full"``
        (also against machine crashes, at the cost of an ``fsync`` per batch).
    :param linger: seconds a queued result or removal may wait to share a
        transaction with others.

    Nothing touches the disk before :meth:`open`. Open the journal in the
    process that uses it — after a fork, never before: a journal opened before
    a fork is unusable in the child (and its files stay owned by the parent).
    All methods are called from greenlets of the hub the journal was opened in.
    """

    def __init__(self, path, pack_id, *, sync="normal", linger=0.05):
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
        self._own = None
        self._stores = []         # every store held: own first, then adopted
        self._records = {}        # action id -> (store, row id)
        self._writer = None
        self._closing = False
        self._closed = False
        self._forked = False

    def __repr__(self):
        state = "closed" if self._closed else "open" if self._own else "not open"
        return f"<Journal {self.path!r} {state}, {len(self._records)} records>"

    def __len__(self):
        """Records held: actions taken or adopted and not yet removed."""
        return len(self._records)

    @property
    def write_failures(self):
        """Batches that could not be written since :meth:`open` (for metrics)."""
        return self._writer.failures if self._writer else 0

    @property
    def file(self):
        """The path of this process's own journal file (``None`` before :meth:`open`)."""
        return self._own.db_path if self._own else None

    def open(self):
        """Create the directory if needed and this process's own journal file in it.

        :raises ConfigError: the directory cannot be created or written, or
            does not support file locks.
        """
        if self._own is not None or self._closed:
            raise RuntimeError("a Journal is opened once")
        writer = _Writer(self.linger)
        try:
            self._own = writer.call(_Store.create, self.path, self.pack_id, self.sync)
        except BaseException:
            writer.stop()
            raise
        self._writer = writer
        self._stores.append(self._own)
        _open_journals.add(self)
        log.debug("journal file %s opened (sync=%s)", self._own.db_path, self.sync)

    def recover(self):
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
        adopted, foreign = self._writer.call(_adopt_dead, self.path, self.pack_id, self.sync, held)
        for path, other in foreign:
            log.warning("journal file %s belongs to pack %r, not %r: left for that pack", path, other, self.pack_id)
        recovered = []
        for store, rows, meta in adopted:
            for record, row_id in rows:
                if record.action_id in self._records:
                    # The same action in two files can only come from copying files around: keep one.
                    log.warning("action %s is in journal files %s and %s; completing it once", record.action_id,
                                self._records[record.action_id][0].db_path, store.db_path)
                    self._writer.submit(_REMOVE, store, row_id)
                    continue
                store.count += 1
                self._records[record.action_id] = (store, row_id)
                recovered.append(record)
            if meta:
                log.log(logging.INFO if rows else logging.DEBUG, "adopted journal file %s of a dead process (pid %s on %s, created %s): %d records, "
                         "%d with results", store.db_path, meta.get("pid"), meta.get("host"), meta.get("created"),
                         len(rows), sum(1 for record, _ in rows if record.result is not None))
            if store.count:
                self._stores.append(store)
            else:
                self._writer.submit(_RETIRE, store)
        return recovered

    def taken(self, action):
        """Record a just-taken *action*; returns once the record is durable.

        Call it as soon as the take's answer is decoded, before the handler
        runs. *action* has ``id``, ``command``, ``input`` (JSON-compatible) and
        ``result_url``.

        :raises JournalError: the record could not be written (the action is
            then not protected; the journal goes on working for the others).
        :raises ValueError: the action is already in the journal.
        """
        self._check_usable()
        if self._closing:
            raise JournalError(f"action {action.id} not journaled: the journal is closed")
        if action.id in self._records:
            raise ValueError(f"action {action.id} is already in the journal")
        for text in (action.id, action.command, action.result_url):
            if not text.isascii() and not _storable(text):
                # Refused here, alone: in the batch it would fail every action written with it.
                raise JournalError(f"action {action.id} not journaled: {text!r} cannot be stored as UTF-8")
        own = self._own
        own.last_row += 1
        row_id = own.last_row
        params = (row_id, action.id, action.command, _encode_input(action.input), action.result_url,
                  self.pack_id, time.time())
        self._records[action.id] = (own, row_id)
        own.count += 1
        error = self._writer.submit(_TAKEN, own, row_id, params, wait=True).get(own)
        if error is not None:
            # Not on disk; whatever else happens to this action happens without the journal.
            if self._records.pop(action.id, None) is not None:
                own.count -= 1
            raise JournalError(f"action {action.id} not journaled: {error}") from error

    def result(self, action_id, body):
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
            self._writer.submit(_RESULT, where[0], where[1], bytes(body))

    def remove(self, action_id):
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
        self._writer.submit(_REMOVE, store, row_id)
        if store is not self._own and store.count == 0:
            self._stores.remove(store)
            self._writer.submit(_RETIRE, store)

    def flush(self):
        """Return once everything queued so far is written (per the sync mode).

        :raises JournalError: the last batch could not be written.
        """
        self._check_usable()
        if self._closing:
            raise JournalError("the journal is closed")
        errors = self._writer.submit(_FLUSH, wait=True)
        if errors:
            error = next(iter(errors.values()))
            raise JournalError(str(error)) from error

    def close(self):
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
            self._writer.call(_release_all, stores, self._own)
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


class _Writer:
    """The journal's own thread, and how greenlets hand it work.

    A greenlet appends an operation to a deque; a take, a flush or a call
    wakes the thread at once, while results and removals wait up to *linger*
    seconds (a hub timer) for company. The thread takes everything queued and
    writes it in one transaction per file, then tells the hub, through a loop
    ``async_`` watcher, up to which operation the work is done. Nothing here
    runs SQLite in the hub.
    """

    def __init__(self, linger):
        self.linger = linger
        self.failures = 0                 # batches that failed
        self._failing_since = None
        self._last_failure_log = 0.0
        self._reporters = Group()         # greenlets that log what a batch did (rare)
        self._ops = collections.deque()   # hub -> thread: [seq, kind, store, row id, value]
        self._done = collections.deque()  # thread -> hub: (last seq, errors, retired paths)
        self._waiting = collections.deque()  # (seq, _Wait), in seq order (hub only)
        self._seq = 0
        self._first_at = 0.0
        self._urgent_seq = 0   # the last operation someone waits for (written by the hub only)
        self._woken = False
        self._wake = _allocate_lock()
        self._wake.acquire()
        loop = gevent.get_hub().loop
        self._watcher = loop.async_()
        self._watcher.start(self._deliver)
        self._watcher.ref = False  # held only while a greenlet waits (see _wait_for)
        self._timer = loop.timer(linger)
        self._timer.ref = False
        self._stopped = False
        _start_new_thread(self._run, ())

    def submit(self, kind, store=None, row_id=None, value=None, wait=False):
        """Queue one operation; with *wait*, return the errors of its batch once it is written."""
        self._seq += 1
        ops = self._ops
        if not ops:
            self._first_at = time.monotonic()
            first = True
        else:
            first = False
        ops.append((self._seq, kind, store, row_id, value))
        if wait:
            self._urgent_seq = self._seq
            self._signal()
            return self._wait_for(self._seq)
        if first and not self._timer.active:
            # A hub timer, not the thread, counts the linger: a take that comes
            # first takes these along without a second wake-up of the thread.
            self._timer.start(self._signal)
        return None

    def call(self, function, *args):
        """Run ``function(*args)`` on the thread, after everything queued before; its result or exception."""
        outcome = [None, None]
        self.submit(_CALL, value=(function, args, outcome), wait=True)
        if outcome[1] is not None:
            raise outcome[1]
        return outcome[0]

    def stop(self):
        """Write what is queued, end the thread and wait for it to finish."""
        if not self._stopped:
            self.submit(_STOP, wait=True)
            self._stopped = True
            self._timer.close()
            self._watcher.close()
            self._reporters.join()

    def _report(self, errors, retired):
        for path in retired:
            log.info("journal file %s finished and removed", path)
        if not errors:
            if self._failing_since is not None:
                log.info("journal writes work again (%d batches failed)", self.failures)
                self._failing_since = None
            return
        self.failures += 1
        now = time.monotonic()
        if self._failing_since is None or now - self._last_failure_log >= _LOG_AGAIN:
            self._failing_since = self._failing_since or now
            self._last_failure_log = now
            log.error("journal write failed (%d failed batches so far): %s", self.failures,
                      "; ".join(str(error) for error in errors.values()))

    def _signal(self):
        if not self._woken:
            self._woken = True
            self._wake.release()

    def _wait_for(self, seq):
        wait = _Wait()
        self._waiting.append((seq, wait))
        self._watcher.ref = True  # keep the loop alive while the thread works for us
        wait.event.wait()
        return wait.errors

    def _deliver(self):
        """In the hub: wake the greenlets whose operations are written."""
        done, waiting = self._done, self._waiting
        while done:
            last_seq, errors, retired = done.popleft()
            while waiting and waiting[0][0] <= last_seq:
                wait = waiting.popleft()[1]
                wait.errors = errors
                wait.event.set()
            if errors or retired or self._failing_since is not None:
                # Logged from a greenlet: a handler's lock may not be waited for in the hub.
                self._reporters.spawn(self._report, errors, retired)
        if not waiting:
            self._watcher.ref = False

    # -- on the thread -----------------------------------------------------------------------------

    def _run(self):
        ops, linger, wake = self._ops, self.linger, self._wake
        drained = 0  # the last operation taken off the queue
        while True:
            if not ops:
                woken = wake.acquire()
            elif self._urgent_seq > drained or time.monotonic() >= self._first_at + linger:
                batch = []
                while ops:
                    batch.append(ops.popleft())
                drained = batch[-1][0]
                if self._work(batch):
                    return
                continue
            else:
                # Only results and removals queued: the hub's timer, or a take, says when.
                woken = wake.acquire(timeout=max(self._first_at + linger - time.monotonic(), 0.001))
            if woken:
                # Only now: the hub releases the lock again only after seeing this.
                self._woken = False

    def _work(self, batch):
        """Write *batch*, running calls in their place; True once the stop operation is reached."""
        try:
            return self._write_batch(batch)
        except BaseException as exc:  # noqa: BLE001 - a bug here must not leave greenlets waiting for ever
            error = JournalError(f"journal writer failed: {exc!r}")
            for op in batch:
                if op[1] == _CALL and op[4][2][1] is None:
                    op[4][2][1] = error  # the outcome a caller reads
            self._finish(batch[-1][0], {op[2]: error for op in batch}, [])
            return any(op[1] == _STOP for op in batch)

    def _write_batch(self, batch):
        start = 0
        for index, op in enumerate(batch):
            kind = op[1]
            if kind in (_CALL, _STOP):
                if index > start:
                    self._finish(batch[index - 1][0], *_write(batch[start:index]))
                if kind == _STOP:
                    self._finish(op[0], {}, [])
                    return True
                function, args, outcome = op[4]
                try:
                    outcome[0] = function(*args)
                except BaseException as exc:  # noqa: BLE001 - handed to the greenlet that asked
                    outcome[1] = exc
                self._finish(op[0], {}, [])
                start = index + 1
        if start < len(batch):
            self._finish(batch[-1][0], *_write(batch[start:]))
        return False

    def _finish(self, last_seq, errors, retired):
        self._done.append((last_seq, errors, retired))
        self._watcher.send()


class _Wait:
    __slots__ = ("event", "errors")

    def __init__(self):
        self.event = gevent.event.Event()
        self.errors = None


class _Store:
    """One journal file with its lock.

    The connection and the lock descriptor are only touched on the journal's
    thread; ``count`` and ``last_row`` only in the hub.
    """

    def __init__(self, directory, stem, lock_fd):
        self.stem = stem
        self.db_path = os.path.join(directory, stem + ".db")
        self.lock_path = os.path.join(directory, stem + ".lock")
        self.lock_fd = lock_fd
        self.conn = None
        self.count = 0       # records held in memory
        self.last_row = 0    # row ids of records this process inserts

    @classmethod
    def create(cls, directory, pack_id, sync):
        """This process's own new file, locked (runs on the journal thread)."""
        _prepare_directory(directory)
        _remove_stale_temps(directory)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        stem = f"flyte-{stamp}-{secrets.token_hex(4)}"
        temp = os.path.join(directory, f".{stem}.lock.tmp")
        try:
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _config_error(directory, f"cannot create files in it: {exc.strerror}") from None
        store = cls(directory, stem, fd)
        try:
            if not _lock(fd, directory):
                raise _config_error(directory, f"{temp}, just created, is locked by another process")
            os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}, pack {pack_id}\n".encode())
            # Locked before it gets the name others look for: no one ever sees it unlocked while we live.
            os.rename(temp, store.lock_path)
        except BaseException as exc:
            _unlink(temp)
            store.release(delete=False)
            if isinstance(exc, OSError):
                raise _config_error(directory, f"cannot create {store.lock_path}: {exc.strerror}") from None
            raise
        try:
            store.conn = _connect(store.db_path, create=True)
            _configure(store.conn, sync)
            # The schema, its version and the owner in one transaction: a file is either empty or complete.
            store.conn.executescript(f"BEGIN; {_SCHEMA} PRAGMA application_id = {_APPLICATION_ID}; "
                                     f"PRAGMA user_version = {SCHEMA_VERSION};")
            store.conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("pack_id", pack_id), ("pid", str(os.getpid())), ("host", os.uname().nodename),
                ("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))])
            store.conn.execute("COMMIT")
        except (OSError, sqlite3.Error) as exc:
            store.release(delete=True)
            raise _config_error(directory, f"cannot create journal file {store.db_path}: {exc}") from None
        except BaseException:
            store.release(delete=True)
            raise
        return store

    def load(self, directory, pack_id, sync):
        """Open an adopted file (journal thread): ``(records, meta)``.

        *records* is a list of ``(Recovered, row id)``, or ``None`` when the file
        belongs to another pack; *meta* is the owner's description (empty for a
        file whose owner died before writing anything).
        """
        if not os.path.exists(self.db_path):
            return [], {}  # its owner died while creating it, or its last adopter while deleting it
        where = f"journal file {self.db_path}"
        try:
            self.conn = _connect(self.db_path, create=False)
            # What the file is, before anything is written to it.
            app_id = self.conn.execute("PRAGMA application_id").fetchone()[0]
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            tables = self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if app_id == 0 and version == 0 and not tables:
                return [], {}  # created, but its owner died before writing the schema
            if app_id != _APPLICATION_ID:
                raise _config_error(directory, f"{where} is an SQLite database of another program; "
                                               f"move it out of the journal directory")
            if version > SCHEMA_VERSION:
                raise _config_error(directory, f"{where} has journal schema {version}, newer than this "
                                               f"flyte_gevent's ({SCHEMA_VERSION}); run a newer flyte_gevent, "
                                               f"or move the file out to start without its actions")
            check = self.conn.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise _config_error(directory, f"{where} is damaged ({check[0][0]}); move it out of the journal "
                                               f"directory to start without its actions")
            meta = dict(self.conn.execute("SELECT key, value FROM meta"))
            if meta.get("pack_id") != pack_id:
                return None, meta
            _configure(self.conn, sync)
            self.conn.execute("BEGIN")
            self.conn.execute("UPDATE actions SET restarts = restarts + 1")
            self.conn.execute("COMMIT")
            rows = self.conn.execute("SELECT id, action_id, command, input, result_url, pack_id, taken_at, "
                                     "result, restarts FROM actions ORDER BY id").fetchall()
        except sqlite3.DatabaseError as exc:
            raise _config_error(directory, f"{where} cannot be read: {exc}; move it out of the journal "
                                           f"directory to start without its actions") from None
        records = []
        for row_id, action_id, command, text, result_url, pack, taken_at, result, restarts in rows:
            try:
                value = json.loads(text)
            except ValueError:
                raise _config_error(directory, f"{where}: action {action_id} has an input that is not JSON; "
                                               f"the file is damaged") from None
            records.append((Recovered(action_id, command, value, result_url, pack, taken_at,
                                      None if result is None else bytes(result), restarts, self.db_path),
                            row_id))
        return records, meta

    def apply(self, inserts, updates, deletes):
        """Write one batch in one transaction (runs on the journal thread)."""
        statements = []
        for start in range(0, len(inserts), _ROWS_PER_INSERT):
            rows = inserts[start:start + _ROWS_PER_INSERT]
            statements.append((_insert_sql(len(rows)), [value for row in rows for value in row]))
        if updates:
            statements.append((_UPDATE, updates))
        for start in range(0, len(deletes), _ROWS_PER_DELETE):
            rows = deletes[start:start + _ROWS_PER_DELETE]
            # Sizes rounded up to a power of two (an id repeated in IN () changes nothing), so that
            # a handful of statements stay prepared in the connection's cache.
            size = 1 << (len(rows) - 1).bit_length()
            statements.append((_delete_sql(size), rows + rows[-1:] * (size - len(rows))))
        conn = self.conn
        try:
            if len(statements) == 1 and not (updates and len(updates) > 1):
                # One statement is a transaction of its own; BEGIN and COMMIT would cost two more
                # round trips through the GIL, which a busy hub makes slow.
                sql, params = statements[0]
                (conn.executemany if sql is _UPDATE else conn.execute)(sql, params)
                return
            conn.execute("BEGIN")
            for sql, params in statements:
                (conn.executemany if sql is _UPDATE else conn.execute)(sql, params)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise JournalError(f"{self.db_path}: {exc}") from exc

    def release(self, delete):
        """Close the file and drop the lock; with *delete*, remove the file first (journal thread)."""
        if self.conn is not None:
            try:
                self.conn.close()
            except sqlite3.Error:
                pass  # nothing left to write: every batch was committed or reported
            self.conn = None
        if delete:
            # The database before the lock: a lock file alone means "nothing left here".
            for suffix in ("", "-wal", "-shm", "-journal"):
                _unlink(self.db_path + suffix)
            _unlink(self.lock_path)
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


# -- functions that run on the journal's thread ------------------------------------------------------

def _write(ops):
    """Write queued operations: one transaction per file, then delete emptied adopted files.

    Returns ``(errors, retired)``: the error of each file whose transaction
    failed, and the paths of the files deleted. Runs on the journal thread and
    never raises: whatever fails is reported to the greenlets waiting for it.
    """
    work = {}
    retire = []
    for _, kind, store, row_id, value in ops:
        if kind == _FLUSH:
            continue
        if kind == _RETIRE:
            retire.append(store)
            continue
        inserts, updates, deletes = work.setdefault(store, ([], [], []))
        if kind == _TAKEN:
            inserts.append(value)
        elif kind == _RESULT:
            updates.append((value, row_id))
        else:
            deletes.append(row_id)
    errors = {}
    for store, (inserts, updates, deletes) in work.items():
        if deletes and updates:
            # A result whose record goes in the same batch was delivered at once: don't write it.
            gone = set(deletes)
            updates = [update for update in updates if update[1] not in gone]
        try:
            store.apply(inserts, updates, deletes)
        except Exception as exc:  # noqa: BLE001 - reported to the waiters, never lost in the thread
            errors[store] = exc if isinstance(exc, JournalError) else JournalError(f"{store.db_path}: {exc!r}")
    retired = []
    for store in retire:
        try:
            store.release(delete=True)
        except OSError as exc:
            errors[store] = JournalError(f"cannot remove finished journal file {store.db_path}: {exc}")
        else:
            retired.append(store.db_path)
    return errors, retired


def _adopt_dead(directory, pack_id, sync, held):
    """Lock and load every file of a dead owner (journal thread): ``(adopted, foreign)``.

    *adopted* lists ``(store, rows, meta)`` for files of *pack_id*; *foreign*
    lists ``(path, pack id)`` of files left alone because another pack owns them.
    """
    try:
        names = os.listdir(directory)
    except OSError as exc:
        raise _config_error(directory, f"cannot list it: {exc.strerror}") from None
    stems = sorted({m.group(1) for m in map(_FILE.match, names) if m} - held)
    adopted, foreign = [], []
    try:
        for stem in stems:
            fd = _claim(directory, stem)
            if fd is None:
                continue  # alive, or being adopted by another process right now
            store = _Store(directory, stem, fd)
            try:
                rows, meta = store.load(directory, pack_id, sync)
            except BaseException:
                store.release(delete=False)
                raise
            if rows is None:
                store.release(delete=False)
                foreign.append((store.db_path, meta.get("pack_id")))
                continue
            adopted.append((store, rows, meta))
    except BaseException:
        # Nothing is adopted when one file is unusable: the operator looks first.
        for store, _, _ in adopted:
            store.release(delete=False)
        raise
    return adopted, foreign


def _release_all(stores, own):
    for store in stores:
        store.release(delete=store is own and store.count == 0)


def _claim(directory, stem):
    """The locked descriptor of *stem*'s lock file if its owner is dead and no one else has it, else None."""
    path = os.path.join(directory, stem + ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        # A database without its lock: never left by this module, but adoptable.
        if not os.path.exists(os.path.join(directory, stem + ".db")):
            return None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return None  # another process is adopting it
        except OSError as exc:
            raise _config_error(directory, f"cannot create {path}: {exc.strerror}") from None
    except OSError as exc:
        raise _config_error(directory, f"cannot open {path}: {exc.strerror}") from None
    try:
        if not _lock(fd, directory):
            os.close(fd)
            return None
        # The file may have been finished and removed between our open and our lock.
        if not os.path.samestat(os.fstat(fd), os.stat(path)):
            os.close(fd)
            return None
    except FileNotFoundError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock(fd, directory):
    """``flock`` *fd* exclusively without blocking; False when another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        raise _config_error(directory, f"file locks (flock) do not work there ({exc.strerror}); "
                                       f"use a local filesystem") from None
    return True


def _connect(path, create):
    uri = "file:" + urllib.parse.quote(path) + ("?mode=rwc" if create else "?mode=rw")
    # Prepared statements kept: every multi-row INSERT size up to _ROWS_PER_INSERT, and more.
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=0,
                           cached_statements=_ROWS_PER_INSERT + 64)
    try:
        # One connection per file, ever: exclusive locking keeps the WAL index in
        # memory (no -shm file) and keeps other programs out while we hold it.
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
    except BaseException:
        conn.close()
        raise
    return conn


def _configure(conn, sync):
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise sqlite3.OperationalError(f"cannot use write-ahead logging (journal mode {mode!r})")
    conn.execute(f"PRAGMA synchronous = {SYNC_MODES[sync]}")
    conn.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT}")


def _prepare_directory(directory):
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except FileExistsError:
        raise _config_error(directory, "exists and is not a directory") from None
    except OSError as exc:
        raise _config_error(directory, f"cannot create it: {exc.strerror}") from None
    if not os.path.isdir(directory):
        raise _config_error(directory, "is not a directory")


def _remove_stale_temps(directory):
    # A temp lock is renamed within microseconds of its creation; one still here
    # long after is left by a process that died in between.
    now = time.time()
    try:
        names = [name for name in os.listdir(directory) if name.startswith(".flyte-") and name.endswith(".lock.tmp")]
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        try:
            if now - os.stat(path).st_mtime > _STALE_TEMP:
                os.unlink(path)
        except OSError:
            pass


def _storable(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _config_error(directory, problem):
    return ConfigError(f"{SETTING} / journal={directory!r}: {problem}", SETTING)


# -- fork safety -----------------------------------------------------------------------------------

_open_journals = weakref.WeakSet()
_kept_from_child = []


def _after_fork_in_child():
    """A forked child must not touch its parent's journal files, nor let go of their locks."""
    for journal in list(_open_journals):
        journal._forked = True
        for store in journal._stores:
            if store.lock_fd is not None:
                # close(), never LOCK_UN: the lock belongs to the open file, shared with the parent.
                os.close(store.lock_fd)
                store.lock_fd = None
            if store.conn is not None:
                # Closing would let SQLite checkpoint the parent's file from here: keep it unclosed.
                _kept_from_child.append(store.conn)
                store.conn = None
    _open_journals.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
