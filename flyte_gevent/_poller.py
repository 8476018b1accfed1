"""The taking strategy: how many takes to keep in flight, and when to start the next.

A take is a commitment (Flyte hands an action out once), so the poller takes
only while a slot of the action pool is free: each take runs in a greenlet of
that pool, which goes on to run the action it took, and then to the next take
while one may start at once (see :meth:`Poller._taker`).

**What the server tells.** A take answered 200 brought an action; 204, there
was none; 500, while takes keep bringing actions, means the take *lost a race*:
the Flyte server reads every NEW action of the pack's name, picks the oldest and
claims it with an update conditional on it still being NEW, so two takes whose
reads overlap pick the same action and the later claim fails. The takes of one
pack (replicas included) are therefore served one after another, each costing
the server a read of the whole backlog (its time, *D*, grows with the backlog):
concurrent takes win only when they start at least *D* apart. A take's latency
is *D* plus the round trip, so overlapping takes pays when the round trip is a
large part of it (an API 20 ms away: several takes *D* apart in flight at once)
and costs when it is not (on loopback a take is nearly all *D*: a second take
can only lose, or slow the first down on a busy server).

**What the poller does with it** (numbers from ``bench/run.py --server real``):

* *Takers* (:attr:`Poller.target`): while takes bring actions, one more take may
  be in flight per action taken, up to ``max_takers``; a 204 drops back to one
  taker and waits the polling interval; a failure drops back to one and backs
  off with jitter. Against a server that never loses a race, that is all.
* *Spacing* (:attr:`Poller.spacing`): the first lost race sets it to half a
  take's latency. From then on, takes overlap only while the spacing is at most
  0.6 of a take's latency: then no more than ``latency / spacing`` are in
  flight, each started at least the spacing after the one before; each race
  they lose widens the spacing by 15 % and each action they take narrows it by
  1.5 %, so it follows *D* as the backlog shrinks, at about one lost race per
  ten actions. Above 0.6 of the latency takes go one at a time (a take with
  none in flight races none of ours, and starts at once), and the spacing
  narrows towards another try at overlapping: 4 % per action taken, halved
  after each try that lost its races before taking 16 actions, so a server
  where overlapping never pays is tried less and less often.
* *Only where it may pay*: overlapping gains at most a round trip per take, so
  takes overlap (and the spacing narrows towards a try) only while the round
  trip (:attr:`flyte_gevent.Client.round_trip`, the floor of recent request
  times) is at least half a take's latency. On loopback a take of the real
  server is nearly all *D* and they never do: each try there lost races and
  cost the server a read of the backlog for each.
* *The next take leaves first*: taking one at a time, the greenlet whose take
  brought an action hands the action to a greenlet of its own and makes the
  next take at once, so neither the handler, the result post nor a switch
  between greenlets delays it. On loopback the real server serves a pack's takes
  one after another, so the time from a take's answer to the next take adds to
  every one of them.
* *Replicas*: a take that lost a race while no other take of this pack was in
  flight lost it to another process. The poller then waits a random time of up
  to (1 + n) take latencies (n: races lost to replicas since its last action;
  a latency counted as at least 10 ms) before its next take, so replicas fall
  out of step and share the work.

Races are logged at DEBUG only (and counted as ``race`` take errors); only 500s
with no action taken for ``_RACE_PERIOD`` seconds count as an outage: backoff,
and readiness fails. The decisions are made in :meth:`Poller._on_action`,
:meth:`~Poller._on_idle`, :meth:`~Poller._lost_race` and
:meth:`~Poller._on_error`; takes start in one place,
:meth:`~Poller._start_takes`; the one place where an action has been taken is
where :meth:`~Poller._take_and_run` hands it to the runner.
"""

import contextvars
import logging
import math
import random
import time

import gevent
import gevent.event
from gevent import GreenletExit

from ._retry import Backoff, LogThrottle
from .client import MalformedActionError
from .errors import FlyteAuthError, FlyteConnectionError, FlyteError, FlyteTimeout, PackNotFoundError
from .log import bind_pack

__all__ = ["Poller"]

log = logging.getLogger("flyte_gevent.poller")

# Every take goes for the oldest action, so with several takes in flight, or
# replicas, runs of lost races are normal: only 500s with no action taken for
# _RACE_PERIOD seconds count as an outage.
_RACE_PERIOD = 3.0
_ERROR_BACKOFF_CAP = 60.0
# The spacing (see the module docstring). A lost race multiplies it by _WIDEN (the first sets it to
# _FIRST_SPACING of a take's latency); takes overlap only while it is at most _OVERLAP_BELOW of the latency,
# and each action they take then multiplies it by 1 - _NARROW: lost races per action settle near
# log(1 / (1 - _NARROW)) / log(_WIDEN), about 0.1. Taking one at a time, each action narrows it by
# _PROBE_NARROW / 2**(failed tries at overlapping); a try succeeds once it took _PROBE_CONFIRM actions.
_WIDEN = 1.15
_FIRST_SPACING = 0.5
_OVERLAP_BELOW = 0.6
_NARROW = 0.015
_PROBE_NARROW = 0.04
_PROBE_CONFIRM = 16
_MAX_FAILED_PROBES = 6
_MAX_SPACING = 1.0
# Overlapping takes gains at most a round trip per take (the server serves a pack's takes one after another,
# each in its time D), and each try at it loses races, which cost the server a read of the backlog each: takes
# overlap only while the round trip is at least this share of a take's latency. On loopback the real server's
# round trip (its quickest answers, which include some work of its own) is a tenth to a third of a take's
# latency, the most towards the end of a backlog; 20 ms away, two thirds to three quarters.
_MIN_ROUND_TRIP_SHARE = 0.5
# After a race lost to a replica, the next take waits up to (1 + n) steps of a take's latency, a step at least
# this long: a server answering 500 to every take (an outage not yet recognized as one) is not hammered.
_MIN_HOLD_STEP = 0.01
# Below a timer's resolution the spacing only costs (each wait is a timer): it is dropped once races stop.
_MIN_SPACING = 50e-6
# How much of each new take's latency the smoothed latency takes in.
_LATENCY_WEIGHT = 0.2


class Poller:
    """Keeps takes in flight while slots of the action pool are free; :meth:`run` is its service greenlet.

    :param client: makes the takes (``take(take_url)``), and tells the network's round trip
        (``round_trip``, seconds; see :attr:`flyte_gevent.Client.round_trip`).
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
    :ivar handing_over: actions taken and handed to a greenlet of their own that has not run them yet.
    :ivar target: takes that may be in flight (before the spacing's limit).
    :ivar spacing: least seconds between the starts of two takes in flight at once; 0 until a race is lost.
    :ivar latency: a take's latency in seconds, smoothed over the last few answered takes.
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
        self.target = 1
        self.taking = 0
        self.handing_over = 0
        self.spacing = 0.0
        self.latency = 0.0
        self.resume_at = 0.0       # no take before this (monotonic): backoff, or the polling interval
        self._hold_until = 0.0     # no take before this either: the pause after losing to a replica
        self._next_start = 0.0     # no take that would overlap another before this
        self._started = 0          # takes started so far
        self._overlap_wins = 0
        self._failed_probes = 0
        self._replica_losses = 0   # races lost to another process since the last action taken
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
        while not self._stopping.is_set():
            wait = self._start_takes()
            # No greenlet switch since _start_takes looked, so nothing can set the
            # event between its checks and clear(): no wake-up is lost.
            self._changed.clear()
            self._changed.wait(wait)

    def _start_takes(self):
        """Start every take that may start now; the seconds until the next may, or None (when something changes)."""
        while self._pool.free_count() > 0:
            take, wait = self._claim_take()
            if take is None:
                return wait
            # Linked after the pool's own link, so it runs once the slot is free.
            self._pool.spawn(self._taker, take).rawlink(self._slot_freed)
        return None

    def _claim_take(self):
        """Count a take as started if one may start now: ``(take, None)``, where *take* is the arguments of
        :meth:`_take_and_run`; else ``(None, seconds until one may)``, or ``(None, None)`` until something changes.
        """
        if self._stopping.is_set() or self.taking >= self._most_in_flight():
            return None, None
        now = time.monotonic()
        # The spacing keeps takes in flight at once apart; a take with none in flight races none of ours.
        start_at = max(self.resume_at, self._hold_until, self._next_start if self.taking else 0.0)
        if now < start_at:
            return None, start_at - now
        overlaps = self.taking > 0
        self._started += 1
        self._next_start = now + self.spacing
        self.taking += 1
        return (now, self._started, overlaps), None

    def _most_in_flight(self):
        if not self.spacing:
            return self.target
        if not self._overlapping():
            return 1
        return min(self.target, math.ceil(self.latency / self.spacing))

    def _overlapping(self):
        """Whether takes may overlap: races were lost, the spacing leaves room for two takes in a latency, and
        overlapping may pay."""
        return 0.0 < self.spacing <= _OVERLAP_BELOW * self.latency and self._overlap_may_pay()

    def _overlap_may_pay(self):
        """Whether the round trip is a large enough share of a take's latency for overlapping takes to gain."""
        return self._client.round_trip >= _MIN_ROUND_TRIP_SHARE * self.latency

    def _slot_freed(self, greenlet):
        self._changed.set()
        self._on_change()

    def _taker(self, take, handed_over=None):
        """A slot's greenlet: a take and its action (or an action *handed_over* by another), then the next take
        while one may start at once.

        Going on in the same greenlet spares a greenlet (and its frame stack) per action while a backlog
        lasts; the slot is freed when no take may start at once. Taking one at a time, the action instead
        goes to a greenlet of its own and this one goes on taking (see :meth:`_take_and_run`). Each take
        and its action run in a fresh ``contextvars`` context, as in a greenlet of their own: what a
        handler binds there (the log context included) is gone for the next one.
        """
        current = gevent.getcurrent()
        if handed_over is not None:
            self.handing_over -= 1
            self._run_action(handed_over)
            take, _ = self._claim_take()
        while take is not None:
            current.name = "taking"  # the runner names it after the action it runs
            # Not Context.run(), nor a call with *args: a call through C adds to the C stack that greenlet
            # copies aside while the action waits (about 0.8 KB more per action in flight).
            current.gr_context = contextvars.Context()
            started, number, overlaps = take
            take = self._take_and_run(started, number, overlaps)
            if take is None:
                take, _ = self._claim_take()

    def _take_and_run(self, started, number, overlaps):
        """One take, then the action it brought (if any), in this greenlet; or the next take, claimed.

        *started* is when the take was started, *number* its place among the takes started so far, *overlaps*
        whether another take was in flight then: together they tell whether a lost race was lost to our own.
        Returns ``None``, or, when the action was handed to a greenlet of its own, the next take (already
        counted as started, see :meth:`_claim_take`), for this greenlet to make at once.
        """
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
            self._on_error(exc, started=started, overlapped=overlaps or self._started > number)
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
            self._took(time.monotonic() - started)
            if action is None:
                self._on_idle()
                return
            self._on_action()
        # The one place where an action has been taken: from here it is the runner's, to one result, run in
        # this greenlet or in the one it is handed over to.
        if failure is None and self._most_in_flight() == 1 and self._pool.free_count() > 0:
            # Taking one at a time: if the next take may start now, the action gets a greenlet of its own
            # (it runs once this one waits) and this one goes straight on to that take. Neither the handler,
            # its result post nor a greenlet switch then stands between a take's answer and the next take.
            take, _ = self._claim_take()
            if take is not None:
                self.handing_over += 1  # until it runs, a stop waits for it as for a take in flight
                self._pool.spawn(self._taker, None, action).rawlink(self._slot_freed)
                return take
        if failure is None and not self.taking:
            # Several takes may be in flight but none is: start them before this action runs.
            started_before = self._started
            self._start_takes()
            if self._started != started_before:
                try:
                    gevent.sleep(0)  # let them leave first
                except GreenletExit:
                    pass  # killed in between: the action still gets its one result from the runner below
        self._run_action(action, failure=failure)
        return None

    # -- the strategy ---------------------------------------------------------------

    def _took(self, seconds):
        """A take was answered after *seconds*: fold it into the smoothed latency."""
        if self.latency:
            self.latency += _LATENCY_WEIGHT * (seconds - self.latency)
        else:
            self.latency = seconds

    def _on_action(self):
        self._answered()
        self._replica_losses = 0
        self.target = min(self.target + 1, self._max_takers)
        self.resume_at = 0.0
        if self.spacing:
            # Narrower while overlapping takes wins; towards another try while taking one at a time.
            if self._overlapping():
                self.spacing *= 1.0 - _NARROW
                self._overlap_wins += 1
                if self._overlap_wins >= _PROBE_CONFIRM:
                    self._failed_probes = 0
            elif self._overlap_may_pay():
                self.spacing *= 1.0 - _PROBE_NARROW / 2 ** self._failed_probes
            self.spacing = min(self.spacing, self.latency)
        if self.spacing < _MIN_SPACING:
            self.spacing = 0.0  # races have stopped: below a timer's resolution, spacing only costs

    def _on_idle(self):
        self._answered()
        self.target = 1
        self.resume_at = max(self.resume_at, time.monotonic() + self._polling_interval)

    def _answered(self):
        self._registrar.confirmed()
        if self.consecutive_errors:
            log.info("taking actions works again after %d failed attempts", self.consecutive_errors)
            self.spacing = 0.0  # the server may not be the one whose races it measured
        self.consecutive_errors = 0
        self.last_error = None
        self._racing_since = None
        self._backoff.reset()
        self._throttle.reset()

    def _lost_race(self, latency, overlapped, now):
        """A take started *latency* seconds ago lost a race: to one of ours if *overlapped*, else to a replica."""
        self._took(latency)
        if overlapped:
            # Too close to one of ours: wider. A try at overlapping that ends before it took
            # _PROBE_CONFIRM actions failed: the next comes later.
            was_overlapping = self._overlapping()
            self.spacing = self.spacing * _WIDEN if self.spacing else self.latency * _FIRST_SPACING
            self.spacing = min(self.spacing, self.latency, _MAX_SPACING)
            if was_overlapping and not self._overlapping():
                if self._overlap_wins < _PROBE_CONFIRM:
                    self._failed_probes = min(self._failed_probes + 1, _MAX_FAILED_PROBES)
                self._overlap_wins = 0
        else:
            # Another process took the action: fall out of step with it, longer after each such race in a row.
            self._replica_losses += 1
            hold = max(self.latency, _MIN_HOLD_STEP) * (1 + self._replica_losses)
            self._hold_until = now + random.uniform(0, min(hold, _MAX_SPACING))

    def _on_error(self, exc, reason=None, started=None, overlapped=False):
        """A failed take, 404 included: one taker, back off, and count it (readiness fails after a few).

        A 500 while actions were taken within the last ``_RACE_PERIOD`` seconds is a lost race instead.
        """
        now = time.monotonic()
        if exc.status == 500:
            if self._racing_since is None:
                self._racing_since = now
            if now - self._racing_since < _RACE_PERIOD:
                self._metrics.take_error("race")
                log.debug("take answered 500: another take claimed the action first")
                self._lost_race(now - (now if started is None else started), overlapped, now)
                return
        self.target = 1
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
