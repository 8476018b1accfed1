"""The taking strategy: how many takes to keep in flight, and when to take again.

A take is a commitment (Flyte hands an action out once), so the poller takes
only while a slot of the action pool is free: each take runs in a greenlet of
that pool, which goes on to run the action it took.

While actions keep coming, the poller adds concurrent takers (one more per
action taken, up to ``max_takers``); an empty take (204) drops back to one
taker and waits the polling interval; a failed take drops back to one taker and
backs off with jitter. All of that is decided in :meth:`Poller._on_action`,
:meth:`~Poller._on_idle` and :meth:`~Poller._on_error`; the one place where an
action has been taken is where :meth:`~Poller._take_and_run` hands it to the runner.
"""

import logging
import random
import time

import gevent.event
from gevent import GreenletExit

from ._retry import Backoff, LogThrottle
from .client import MalformedActionError
from .errors import FlyteAuthError, FlyteConnectionError, FlyteError, FlyteTimeout, PackNotFoundError
from .log import bind_pack

__all__ = ["Poller"]

log = logging.getLogger("flyte_gevent.poller")

# Take answers 500 when another replica won the race for the same action; retry
# those soon and quietly. Every poller goes for the oldest action, so with R
# replicas (and several takers each) long runs of lost races are normal: only
# 500s with no successful take for _RACE_PERIOD seconds count as an outage.
_RACE_PERIOD = 3.0
_RACE_DELAY = 0.2
_ERROR_BACKOFF_CAP = 60.0


class Poller:
    """Keeps takes in flight while slots of the action pool are free; :meth:`run` is its service greenlet.

    :param client: makes the takes (``take(take_url)``).
    :param registrar: the pack's registration: ``current.take_url``,
        ``reregister(failed, why)`` after a 404, ``confirmed()`` after a take
        was answered (see :class:`flyte_gevent.pack.Registrar`).
    :param run_action: ``run_action(action, failure=None)`` runs a taken action
        to its one result, in the calling greenlet (:meth:`~flyte_gevent._actions.ActionRunner.run`).
    :param pool: the ``gevent.pool.Pool`` of action greenlets (``max_in_flight`` slots).
    :param metrics: the pack's metrics (:mod:`flyte_gevent.metrics`).
    :param pack_name: the pack's name, for the log context.
    :param stopping: a ``gevent.event.Event``; once set, no take is started.
    :param polling_interval: seconds between takes while idle; the first step of the error backoff.
    :param max_takers: most takes in flight at once.
    :param on_change: called when a take ended or a slot was freed (shutdown waits for those).

    :ivar taking: takes in flight.
    :ivar consecutive_errors: failed takes since the last answered one (readiness looks at it).
    :ivar last_error: the last failed take's error, or ``None``.
    """

    def __init__(self, client, registrar, run_action, pool, metrics, *, pack_name, stopping, polling_interval,
                 max_takers, on_change=lambda: None):
        self._client = client
        self._registrar = registrar
        self._run_action = run_action
        self._pool = pool
        self._metrics = metrics
        self._pack_name = pack_name
        self._stopping = stopping
        self._polling_interval = polling_interval
        self._max_takers = max_takers
        self._on_change = on_change
        self.target = 1          # takers wanted in flight
        self.taking = 0
        self.resume_at = 0.0     # no new take before this (monotonic)
        self.consecutive_errors = 0
        self.last_error = None
        self._racing_since = None  # when the take 500s since the last answered take began
        self._backoff = Backoff(polling_interval, _ERROR_BACKOFF_CAP)
        self._throttle = LogThrottle(log)
        self._changed = gevent.event.Event()

    def notify(self):
        """Wake the poller: a slot was freed, a take finished, or the pack is stopping."""
        self._changed.set()

    def api_answered(self):
        """Another request just succeeded: if takes are backing off after errors, try again now."""
        if self.consecutive_errors and self.resume_at > time.monotonic():
            self.resume_at = 0.0
            self.notify()

    def run(self):
        bind_pack(self._pack_name)
        pool = self._pool
        while not self._stopping.is_set():
            now = time.monotonic()
            if self.taking < self.target and now >= self.resume_at and pool.free_count() > 0:
                self.taking += 1
                # Linked after the pool's own link, so it runs once the slot is free.
                pool.spawn(self._take_and_run).rawlink(self._slot_freed)
                continue
            # No greenlet switch since the checks above, so nothing can set the
            # event between them and clear(): no wake-up is lost.
            self._changed.clear()
            wait = self.resume_at - now if self.resume_at > now else None
            self._changed.wait(wait)

    def _slot_freed(self, greenlet):
        self._changed.set()
        self._on_change()

    def _take_and_run(self):
        registration = self._registrar.current
        failure = None
        try:
            action = self._client.take(registration.take_url)
        except MalformedActionError as exc:
            self._on_error(exc, "malformed")
            action = exc.action  # taken all the same: complete it as FATAL if it can be
            if action is None:
                if exc.taken:
                    self._throttle.log(logging.ERROR, f"stranded {exc}", "an action was taken but cannot be "
                                       "completed (no usable result link); it stays PENDING on the server: %s", exc)
                return
            failure = f"malformed action from the Flyte API: {exc.reason}"
        except PackNotFoundError as exc:
            self._on_error(exc, "not_found")
            self._registrar.reregister(registration, "take answered 404")
            return
        except FlyteError as exc:
            self._on_error(exc)
            return
        except GreenletExit:
            if self._stopping.is_set():
                log.error("a take still unanswered when the pack stopped was cut short: an action it may have "
                          "claimed stays PENDING on the server")
            raise
        finally:
            self.taking -= 1
            self.notify()
            self._on_change()
        if failure is None:
            if action is None:
                self._on_idle()
                return
            self._on_action()
        # The one place where an action has been taken: from here it is the runner's, to one result.
        self._run_action(action, failure=failure)

    # -- the strategy ---------------------------------------------------------------

    def _on_action(self):
        self._answered()
        self.target = min(self.target + 1, self._max_takers)
        self.resume_at = 0.0

    def _on_idle(self):
        self._answered()
        self.target = 1
        self.resume_at = max(self.resume_at, time.monotonic() + self._polling_interval)

    def _answered(self):
        self._registrar.confirmed()
        if self.consecutive_errors:
            log.info("taking actions works again after %d failed attempts", self.consecutive_errors)
        self.consecutive_errors = 0
        self.last_error = None
        self._racing_since = None
        self._backoff.reset()
        self._throttle.reset()

    def _on_error(self, exc, reason=None):
        """A failed take, 404 included: one taker, back off, and count it (readiness fails after a few)."""
        now = time.monotonic()
        self.target = 1
        if exc.status == 500:
            if self._racing_since is None:
                self._racing_since = now
            if now - self._racing_since < _RACE_PERIOD:
                # Probably another replica took the action we were about to get.
                self._metrics.take_error("race")
                log.debug("take answered 500 (a replica won the race?); retrying soon")
                self.resume_at = max(self.resume_at, now + random.uniform(0, _RACE_DELAY))
                return
        self._metrics.take_error(reason or _error_reason(exc))
        self.consecutive_errors += 1
        self.last_error = exc
        if self.resume_at > now:
            return  # a concurrent taker already started the backoff
        delay = self._backoff.next()
        self.resume_at = now + delay
        if isinstance(exc, FlyteAuthError):
            self._throttle.log(logging.ERROR, str(exc), "the Flyte API refuses the token even after reloading it; "
                               "check FLYTE_JWT / FLYTE_JWT_FILE. Retrying in %.1f s: %s", delay, exc)
        else:
            self._throttle.log(logging.WARNING, str(exc), "take failed, retrying in %.1f s: %s", delay, exc)


def _error_reason(exc):
    if isinstance(exc, FlyteTimeout):
        return "timeout"
    if isinstance(exc, FlyteConnectionError):
        return "connection"
    if isinstance(exc, FlyteAuthError):
        return "unauthorized"
    status = getattr(exc, "status", None)
    if status is not None and status >= 500:
        return "server_error"
    return "http"
