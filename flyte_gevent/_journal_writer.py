"""The journal's writer thread, and how greenlets in the hub hand it work (see :mod:`flyte_gevent._journal`).

SQLite calls block, so none runs in the hub. The hub decides what to write and
gathers it into whole :class:`Job` objects; :class:`Writer` hands the thread
one job at a time and hears back through one loop watcher, so each job costs
one wake-up each way and the thread does nothing but SQLite calls.
"""

import collections
import logging
import time

import gevent
import gevent.event
from gevent import monkey
from gevent.pool import Group

from ._journal_files import JournalError

__all__ = ["Job", "Writer"]

log = logging.getLogger("flyte_gevent.journal")

_LOG_AGAIN = 30.0  # seconds between repeated write-failure logs

_STOP = ("stop", ())  # the call that ends the journal's thread

# Real threads and locks even when the program is monkey-patched.
_start_new_thread, _allocate_lock = monkey.get_original(
    "_thread", ["start_new_thread", "allocate_lock"])  # type: ignore[arg-type]  # a list gives a list


class Writer:
    """The journal's own thread, and how greenlets hand it work.

    Everything that decides what to write happens in the hub; the thread only
    runs the SQLite calls, because every time it needs the GIL back from a busy
    hub costs both threads a wake-up. So greenlets add their operations to a
    :class:`Job` being filled in the hub, and the thread gets one whole job at a
    time, through one lock release, and answers through one ``async_`` watcher
    send:

    * takes go into the *urgent* job, handed over at the end of the loop
      iteration in which the first of them came (so takes answered together
      share it), or, while the thread is busy, as soon as it is free: a commit
      is shared by every take that came while the one before was written;
    * results and removals go into the *lazy* job, handed over by a hub timer
      *linger* seconds after the first of them: one transaction for all of
      them, in which a result whose record is removed before it was written is
      not written at all;
    * calls (opening files, adoption, closing) are jobs of their own, after
      everything submitted before them.

    Jobs run in the order they were queued, except that takes may go first
    (they only insert new rows, which nothing queued concerns), though never
    twice in a row while other jobs wait. So a removal never overtakes an
    older write of its record, and a call runs after everything before it.

    Who writes what: the hub alone builds, queues and hands over jobs (every
    attribute of the writer but ``_wake``'s state), and stops touching a job
    once it is handed over; the thread touches only the handed-over job, fills
    in its outcome and sets ``finished`` last; the hub reads the outcome only
    after seeing ``finished`` (in the watcher's callback, or a waiter that
    finds it set), and only then hands over the next job. So no field is ever
    written by both sides at once, and the lock is released exactly once per
    job the thread acquires it for. Nothing here runs SQLite in the hub.
    """

    def __init__(self, linger):
        self.linger = linger
        self.failures = 0                 # jobs whose writes failed
        self._failing_since = None
        self._last_failure_log = 0.0
        self._reporters = Group()         # greenlets that log what a job did (rare)
        self._urgent = None               # the job takes go into, not yet handed over
        self._lazy = None                 # the job results and removals go into, not yet handed over
        self._queue = collections.deque()  # jobs ready for the thread, in order
        self._handed = None               # the job the thread has (one at a time)
        self._kick_due = False            # a callback will hand the urgent job over
        self._takes_went_last = False     # the last job handed over was an urgent one
        self._wake = _allocate_lock()     # released once per job handed over
        self._wake.acquire()
        hub = gevent.get_hub()
        self._loop = hub.loop
        self._watcher = self._loop.async_()
        self._watcher.start(self._job_done)
        self._watcher.ref = False  # held only while the thread works (see _kick)
        self._timer = None                # counts the lazy job's linger
        self._stopped = False
        _start_new_thread(self._run, ())

    # -- in the hub --------------------------------------------------------------------------------

    def insert(self, store, params):
        """Write a record and wait for it: the error its file's transaction failed with, or None."""
        job = self._urgent
        if job is None:
            job = self._urgent = Job()
            if self._handed is None and not self._kick_due:
                self._kick_due = True
                self._loop.run_callback(self._kick)
        rows = job.writes.get(store)
        if rows is None:
            rows = job.writes[store] = ([], {}, [])
        rows[0].append(params)
        return job.wait().get(store)

    def update(self, store, row_id, body):
        """Queue a record's result (replacing one queued before)."""
        self._lazy_rows(store)[1][row_id] = body

    def delete(self, store, row_id):
        """Queue a record's removal; a result queued for it is dropped."""
        rows = self._lazy_rows(store)
        if rows[1]:
            rows[1].pop(row_id, None)
        rows[2].append(row_id)

    def retire(self, store):
        """Queue closing and deleting an adopted file, after the removals queued before."""
        self._lazy_rows(None)
        self._lazy.retire.append(store)

    def flush(self):
        """Wait until everything queued so far is written; the errors of those writes."""
        jobs = [self._handed] if self._handed is not None else []
        jobs += self._queue  # queued before: a lingering job whose timer ran while the thread was busy
        jobs += self._run_after_the_rest(Job())  # a job with nothing to write: done once every job before it is
        errors = {}
        for job in jobs:
            errors.update(job.errors)
        return errors

    def call(self, function, *args):
        """Run ``function(*args)`` on the thread, after everything queued before; its result or exception."""
        job = Job()
        job.call = (function, args)
        self._run_after_the_rest(job)
        if job.exception is not None:
            raise job.exception
        return job.outcome

    def stop(self):
        """Write what is queued, end the thread and wait for it to finish."""
        if not self._stopped:
            job = Job()
            job.call = _STOP
            self._run_after_the_rest(job)
            self._stopped = True
            self._watcher.close()
            self._reporters.join()

    def _run_after_the_rest(self, job):
        """Queue *job* after everything submitted so far and wait until the thread has done it; the jobs sealed."""
        sealed = self._seal()
        self._queue.append(job)
        self._kick()
        job.wait()
        return sealed

    def _lazy_rows(self, store):
        job = self._lazy
        if job is None:
            job = self._lazy = Job()
            # A new timer each time: a loop timer started again once it has fired fires at once.
            self._timer = self._loop.timer(self.linger)
            self._timer.ref = False
            self._timer.start(self._linger_over)
        if store is None:
            return None
        rows = job.writes.get(store)
        if rows is None:
            rows = job.writes[store] = ([], {}, [])
        return rows

    def _linger_over(self):
        self._stop_timer()
        if self._lazy is not None:
            self._queue.append(self._lazy)
            self._lazy = None
            self._kick()

    def _stop_timer(self):
        if self._timer is not None:
            self._timer.close()
            self._timer = None

    def _seal(self):
        """Queue the urgent and the lazy jobs as they are; the jobs queued."""
        jobs = []
        for job in (self._urgent, self._lazy):
            if job is not None:
                jobs.append(job)
                self._queue.append(job)
        self._urgent = self._lazy = None
        self._stop_timer()
        return jobs

    def _kick(self):
        """Hand the thread its next job if it is free.

        Takes may go before the jobs queued (they only insert new rows, which
        nothing queued concerns), but never twice in a row while others wait:
        a steady stream of takes must not hold back results, removals, calls
        or a flush for ever.
        """
        self._kick_due = False
        if self._handed is not None:
            return
        job = self._urgent
        if job is not None and not (self._takes_went_last and self._queue):
            self._urgent = None
            self._takes_went_last = True
        elif self._queue:
            job = self._queue.popleft()
            self._takes_went_last = False
        else:
            return
        self._handed = job
        self._watcher.ref = True  # keep the loop alive while the thread works
        self._wake.release()

    def _job_done(self):
        """In the hub (the watcher's callback): wake the job's waiters, report, hand over the next one."""
        job = self._handed
        if job is None or not job.finished:
            return  # a send that was coalesced with an earlier one
        self._handed = None
        self._watcher.ref = False
        if job.event is not None:
            job.event.set()
        if job.errors or job.retired or self._failing_since is not None:
            # Logged from a greenlet: a handler's lock may not be waited for in the hub.
            self._reporters.spawn(self._report, job.errors, job.retired)
        self._kick()

    def _report(self, errors, retired):
        for path in retired:
            log.info("journal file %s finished and removed", path)
        if not errors:
            if self._failing_since is not None:
                log.info("journal writes work again (%d jobs failed)", self.failures)
                self._failing_since = None
            return
        self.failures += 1
        now = time.monotonic()
        if self._failing_since is None or now - self._last_failure_log >= _LOG_AGAIN:
            self._failing_since = self._failing_since or now
            self._last_failure_log = now
            log.error("journal write failed (%d failed jobs so far): %s", self.failures,
                      "; ".join(str(error) for error in errors.values()))

    # -- on the thread -----------------------------------------------------------------------------

    def _run(self):
        wake, send = self._wake, self._watcher.send
        while True:
            wake.acquire()
            job = self._handed
            stop = job.call is _STOP
            if not stop:
                job.run()
            job.finished = True
            send()
            if stop:
                return


class Job:
    """What the thread does in one go: writes to journal files, or one call; and who waits for it.

    Built in the hub, run on the thread (:meth:`run`), read in the hub again
    once ``finished``.
    """

    __slots__ = ("call", "errors", "event", "exception", "finished", "outcome", "retire", "retired", "writes")

    def __init__(self):
        self.writes = {}    # store -> (rows to insert, {row id: result}, row ids to delete)
        self.retire = []    # adopted stores to close and delete after the writes
        self.call = None    # (function, args), or _STOP
        self.event = None   # set once finished, when someone waits
        self.finished = False
        self.errors = {}    # store -> JournalError of its failed transaction
        self.retired = []   # paths of the files deleted
        self.outcome = self.exception = None

    def wait(self):
        """Wait (cooperatively) until the thread has done this job; its errors."""
        if not self.finished:
            if self.event is None:
                self.event = gevent.event.Event()
            self.event.wait()
        return self.errors

    def run(self):
        """On the thread: do the job. Never raises: what fails is kept for the greenlets waiting for it."""
        if self.call is not None:
            function, args = self.call
            try:
                self.outcome = function(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the greenlet that asked
                self.exception = exc
            return
        try:
            _write(self)
        except BaseException as exc:  # noqa: BLE001 - a bug here must not leave greenlets waiting for ever
            error = JournalError(f"journal writer failed: {exc!r}")
            self.errors = dict.fromkeys(self.writes, error) or {None: error}


# -- functions that run on the journal's thread ------------------------------------------------------

def _write(job):
    """Write *job*: one transaction per file, then delete its emptied adopted files.

    Fills ``job.errors`` (the error of each file whose transaction failed) and
    ``job.retired`` (the paths of the files deleted).
    """
    for store, (inserts, updates, deletes) in job.writes.items():
        try:
            store.apply(inserts, updates, deletes)
        except Exception as exc:  # noqa: BLE001 - reported to the waiters, never lost in the thread
            job.errors[store] = exc if isinstance(exc, JournalError) else JournalError(f"{store.db_path}: {exc!r}")
    for store in job.retire:
        try:
            store.release(delete=True)
        except OSError as exc:
            job.errors[store] = JournalError(f"cannot remove finished journal file {store.db_path}: {exc}")
        else:
            job.retired.append(store.db_path)
