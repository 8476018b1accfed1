"""The journal's files: their format, their locks, and adopting the files of dead processes.

:mod:`flyte_gevent._journal` is the interface the runtime uses and the thread that
writes; this module is what it writes: one SQLite file per live process, and how a
starting process tells the files of the dead from those of the living.

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

**A journal that cannot be used is a configuration error.** A directory that
cannot be created or written, a file in it that is not an SQLite database, is
another program's database, is damaged, or has a schema from a newer
flyte_gevent: :class:`~flyte_gevent.errors.ConfigError` naming the setting
(``FLYTE_GEVENT_JOURNAL`` / ``journal``) and the file. A damaged file of a dead
owner stops the start rather than being skipped: its actions would otherwise be
stranded without anyone noticing. Move the file out of the directory to start
without it.

Everything here that touches a file runs on the journal's thread, never in the hub.
"""

import dataclasses
import datetime
import fcntl
import functools
import json
import os
import re
import secrets
import sqlite3
import time
import urllib.parse

from .errors import ConfigError
from .models import Action

__all__ = [
    "SCHEMA_VERSION",
    "SETTING",
    "SYNC_MODES",
    "UPDATE_SQL",
    "JournalError",
    "Recovered",
    "Store",
    "adopt_dead",
    "delete_sql",
    "encode_input",
    "insert_sql",
    "release_all",
    "storable",
]


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
UPDATE_SQL = "UPDATE actions SET result = ? WHERE id = ?"  # (result, row id); not ?2/?1, which 3.14 refuses
# One encoder for every input: json.dumps with arguments builds a new one per call. ASCII
# escapes keep lone surrogates (valid in JSON text, not in UTF-8) storable.
encode_input = json.JSONEncoder(separators=(",", ":")).encode


@functools.cache
def insert_sql(rows):
    return ("INSERT INTO actions (id, action_id, command, input, result_url, pack_id, taken_at) VALUES "
            + ",".join(["(?,?,?,?,?,?,?)"] * rows))


@functools.cache
def delete_sql(rows):
    return "DELETE FROM actions WHERE id IN (" + ",".join("?" * rows) + ")"


# Rows per multi-row statement: a batch costs a few statements, not one per row
# (each statement gives the GIL up and has to get it back from a busy hub).
# 128 rows of 7 values stay below SQLite's oldest limit of 999 parameters.
_ROWS_PER_INSERT = 128
_ROWS_PER_DELETE = 512


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


class Store:
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
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%f")
        stem = f"flyte-{stamp}-{secrets.token_hex(4)}"
        temp = os.path.join(directory, f".{stem}.lock.tmp")
        try:
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise config_error(directory, f"cannot create files in it: {exc.strerror}") from None
        store = cls(directory, stem, fd)
        try:
            if not _lock(fd, directory):
                raise config_error(directory, f"{temp}, just created, is locked by another process")
            os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}, pack {pack_id}\n".encode())
            # Locked before it gets the name others look for: no one ever sees it unlocked while we live.
            os.rename(temp, store.lock_path)
        except BaseException as exc:
            _unlink(temp)
            store.release(delete=False)
            if isinstance(exc, OSError):
                raise config_error(directory, f"cannot create {store.lock_path}: {exc.strerror}") from None
            raise
        try:
            # Created private before SQLite opens it: SQLite would use the umask (0644, typically), and gives
            # the WAL the database file's mode. The file holds inputs and results.
            os.close(os.open(store.db_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            store.conn = _connect(store.db_path, create=True)
            _configure(store.conn, sync)
            # The schema, its version and the owner in one transaction: a file is either empty or complete.
            store.conn.executescript(f"BEGIN; {_SCHEMA} PRAGMA application_id = {_APPLICATION_ID}; "
                                     f"PRAGMA user_version = {SCHEMA_VERSION};")
            store.conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("pack_id", pack_id), ("pid", str(os.getpid())), ("host", os.uname().nodename),
                ("created", datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))])
            store.conn.execute("COMMIT")
        except (OSError, sqlite3.Error) as exc:
            store.release(delete=True)
            raise config_error(directory, f"cannot create journal file {store.db_path}: {exc}") from None
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
                raise config_error(directory, f"{where} is an SQLite database of another program; "
                                               f"move it out of the journal directory")
            if version > SCHEMA_VERSION:
                raise config_error(directory, f"{where} has journal schema {version}, newer than this "
                                               f"flyte_gevent's ({SCHEMA_VERSION}); run a newer flyte_gevent, "
                                               f"or move the file out to start without its actions")
            check = self.conn.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise config_error(directory, f"{where} is damaged ({check[0][0]}); move it out of the journal "
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
            raise config_error(directory, f"{where} cannot be read: {exc}; move it out of the journal "
                                           f"directory to start without its actions") from None
        records = []
        for row_id, action_id, command, text, result_url, pack, taken_at, result, restarts in rows:
            try:
                value = json.loads(text)
            except ValueError:
                raise config_error(directory, f"{where}: action {action_id} has an input that is not JSON; "
                                               f"the file is damaged") from None
            records.append((Recovered(action_id, command, value, result_url, pack, taken_at,
                                      None if result is None else bytes(result), restarts, self.db_path),
                            row_id))
        return records, meta

    def apply(self, inserts, updates, deletes):
        """Write one batch in one transaction (runs on the journal thread).

        *inserts* are parameter tuples of new records; *updates* maps row ids to
        results; *deletes* lists row ids.
        """
        statements = []
        for start in range(0, len(inserts), _ROWS_PER_INSERT):
            rows = inserts[start:start + _ROWS_PER_INSERT]
            statements.append((insert_sql(len(rows)), [value for row in rows for value in row]))
        if updates:
            statements.append((UPDATE_SQL, [(result, row_id) for row_id, result in updates.items()]))
        for start in range(0, len(deletes), _ROWS_PER_DELETE):
            rows = deletes[start:start + _ROWS_PER_DELETE]
            # Sizes rounded up to a power of two (an id repeated in IN () changes nothing), so that
            # a handful of statements stay prepared in the connection's cache.
            size = 1 << (len(rows) - 1).bit_length()
            statements.append((delete_sql(size), rows + rows[-1:] * (size - len(rows))))
        conn = self.conn
        try:
            if len(statements) == 1 and not (updates and len(updates) > 1):
                # One statement is a transaction of its own; BEGIN and COMMIT would cost two more
                # round trips through the GIL, which a busy hub makes slow.
                sql, params = statements[0]
                (conn.executemany if sql is UPDATE_SQL else conn.execute)(sql, params)
                return
            conn.execute("BEGIN")
            for sql, params in statements:
                (conn.executemany if sql is UPDATE_SQL else conn.execute)(sql, params)
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

    def forget_after_fork(self, keep):
        """In a forked child: drop the inherited lock and connection without touching the parent's file.

        The lock descriptor is closed, never unlocked: the lock belongs to the
        open file, shared with the parent. The connection is handed to *keep*
        (a list) instead of being closed: closing would let SQLite checkpoint
        the parent's file from here.
        """
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
        if self.conn is not None:
            keep.append(self.conn)
            self.conn = None


# -- adoption (journal thread) -------------------------------------------------------------------

def adopt_dead(directory, pack_id, sync, held):
    """Lock and load every file of a dead owner (journal thread): ``(adopted, foreign)``.

    *adopted* lists ``(store, rows, meta)`` for files of *pack_id*; *foreign*
    lists ``(path, pack id)`` of files left alone because another pack owns them.
    """
    try:
        names = os.listdir(directory)
    except OSError as exc:
        raise config_error(directory, f"cannot list it: {exc.strerror}") from None
    stems = sorted({m.group(1) for m in map(_FILE.match, names) if m} - held)
    adopted, foreign = [], []
    try:
        for stem in stems:
            fd = _claim(directory, stem)
            if fd is None:
                continue  # alive, or being adopted by another process right now
            store = Store(directory, stem, fd)
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


def release_all(stores, own):
    """Let go of every store at close (journal thread); *own* is deleted when it holds no records."""
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
            raise config_error(directory, f"cannot create {path}: {exc.strerror}") from None
    except OSError as exc:
        raise config_error(directory, f"cannot open {path}: {exc.strerror}") from None
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
        raise config_error(directory, f"file locks (flock) do not work there ({exc.strerror}); "
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
        raise config_error(directory, "exists and is not a directory") from None
    except OSError as exc:
        raise config_error(directory, f"cannot create it: {exc.strerror}") from None
    if not os.path.isdir(directory):
        raise config_error(directory, "is not a directory")


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


def storable(text):
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


def config_error(directory, problem):
    return ConfigError(f"{SETTING} / journal={directory!r}: {problem}", SETTING)

