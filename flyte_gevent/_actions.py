"""Taking and running actions: the poller, one greenlet per action, and result delivery.

Flyte delivers each action at most once: a taken action is PENDING until the
pack posts its result, and is never offered again. So the rules here are:

* take only when a slot of the action pool is free (the greenlet that takes
  holds the slot, and runs the action it took);
* every taken action ends in exactly one posted result, whatever the handler
  does — returns garbage, raises, hangs past its timeout, or is cut short by
  shutdown — and result posts are retried until they land or their deadline.

While actions keep coming, the poller adds concurrent takers (one more per
action taken, up to ``max_takers``); an empty take (204) drops back to one
taker and waits the polling interval; an error backs off with jitter.
"""

import logging
import random
import time

import gevent
import gevent.event
from gevent import GreenletExit, getcurrent
from marshmallow import ValidationError

from ._retry import Backoff, LogThrottle, retry_log_level, worth_retrying
from .client import MalformedActionError
from .errors import FlyteAuthError, FlyteConnectionError, FlyteError, FlyteTimeout, PackNotFoundError
from .log import bind_action, bind_pack
from .models import FATAL, Event, fatal_event
from .schemas import encode_event, flatten_errors

__all__ = ["Poller", "run_action", "cancel_handlers", "SHUTDOWN_MESSAGE"]

log = logging.getLogger("flyte_gevent.actions")

SHUTDOWN_MESSAGE = "pack shutting down"

# Take answers 500 when another replica won the race for the same action; retry
# those soon and quietly. Every poller goes for the oldest action, so with R
# replicas (and several takers each) long runs of lost races are normal: only
# 500s with no successful take for _RACE_PERIOD seconds count as an outage.
_RACE_PERIOD = 3.0
_RACE_DELAY = 0.2
_ERROR_BACKOFF_CAP = 60.0
_RESULT_BACKOFF = (0.5, 30.0)
# A 500 on a result means "not PENDING any more" or a database error. After an
# attempt whose answer never came (or came from a gateway), it means that attempt
# landed: stop at once. Otherwise it is a server error: try twice more.
_RESULT_500_RETRIES = 2
_OUTCOME_UNKNOWN = frozenset({None, 502, 504})


class _Cancelled(BaseException):
    """Thrown into a handler still running when the shutdown grace period ends."""


class _TimedOut(BaseException):
    """Raised in a handler that overran its per-action timeout."""


class _Running:
    """A running action, as far as shutdown needs to know."""

    __slots__ = ("greenlet", "in_handler")

    def __init__(self, greenlet):
        self.greenlet = greenlet
        self.in_handler = True


class Poller:
    """The service greenlet that keeps takes in flight while slots are free.

    It never takes more than the free slots: each take runs in a greenlet of
    the pack's action pool, and that greenlet goes on to run the action.
    """

    def __init__(self, pack):
        self.pack = pack
        self.target = 1          # takers wanted in flight
        self.taking = 0          # takers in flight
        self.resume_at = 0.0     # no new take before this (monotonic)
        self.consecutive_errors = 0
        self.last_error = None
        self._racing_since = None  # when the take 500s since the last successful take began
        self._backoff = Backoff(pack.polling_interval, _ERROR_BACKOFF_CAP)
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

    def _slot_freed(self, greenlet):
        self._changed.set()
        self.pack._progress.set()

    def run(self):
        bind_pack(self.pack.pack_def.name)
        pool = self.pack._actions
        stopping = self.pack._stopping
        while not stopping.is_set():
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

    def _take_and_run(self):
        pack = self.pack
        registration = pack._registration
        failure = None
        try:
            action = pack._client.take(registration.take_url)
        except MalformedActionError as exc:
            self._on_error(exc, "malformed")
            action = exc.action  # taken all the same: complete it as FATAL if we can
            if action is None:
                log.error("an action was taken but cannot be completed (no result link); it stays PENDING: %s",
                          exc)
                return
            failure = f"malformed action from the Flyte API: {exc.reason}"
        except PackNotFoundError:
            self._on_not_found(registration)
            return
        except FlyteError as exc:
            self._on_error(exc)
            return
        finally:
            self.taking -= 1
            self.notify()
            pack._progress.set()
        if failure is None:
            if action is None:
                self._on_idle()
                return
            self._on_action()
        run_action(pack, action, failure=failure)

    def _on_action(self):
        self._recovered()
        self.target = min(self.target + 1, self.pack.max_takers)
        self.resume_at = 0.0

    def _on_idle(self):
        self._recovered()
        self.target = 1
        self.resume_at = max(self.resume_at, time.monotonic() + self.pack.polling_interval)

    def _recovered(self):
        if self.consecutive_errors:
            log.info("taking actions works again after %d failed attempts", self.consecutive_errors)
        self.consecutive_errors = 0
        self.last_error = None
        self._racing_since = None
        self._backoff.reset()
        self._throttle.reset()

    def _on_not_found(self, registration):
        self.pack._metrics.take_error("not_found")
        self.target = 1
        self.pack._reregister(registration, "take answered 404")

    def _on_error(self, exc, reason=None):
        now = time.monotonic()
        self.target = 1
        if exc.status == 500:
            if self._racing_since is None:
                self._racing_since = now
            if now - self._racing_since < _RACE_PERIOD:
                # Probably another replica took the action we were about to get.
                self.pack._metrics.take_error("race")
                log.debug("take answered 500 (a replica won the race?); retrying soon")
                self.resume_at = max(self.resume_at, now + random.uniform(0, _RACE_DELAY))
                return
        self.pack._metrics.take_error(reason or _error_reason(exc))
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


def cancel_handlers(pack):
    """Complete every handler still running as FATAL "pack shutting down" (and any taken later)."""
    pack._handlers_cancelled = True
    loop = gevent.get_hub().loop
    for running in list(pack._running):
        # Deciding inside the hub callback leaves no gap in which the action
        # could move on to posting its result and be interrupted there.
        loop.run_callback(_throw_if_in_handler, running)


def _throw_if_in_handler(running):
    if running.in_handler and not running.greenlet.dead:
        running.greenlet.throw(_Cancelled())


def run_action(pack, action, failure=None):
    """Run *action* in the current greenlet and post its one result.

    :param failure: complete the action as FATAL with this message without
        running a handler (used for malformed actions).
    """
    getcurrent().name = f"action:{action.id}"
    bind_action(action, pack.pack_def.name)
    pack._metrics.action_taken(action.command)
    running = _Running(getcurrent())
    pack._running.add(running)
    started = time.monotonic()
    try:
        if failure is not None:
            event, outcome = fatal_event(failure), "error"
        else:
            event, outcome = _execute(pack, action)
    finally:
        running.in_handler = False
        pack._running.discard(running)
        pack._progress.set()
    duration = time.monotonic() - started
    try:
        body = encode_event(event)
    except Exception as exc:
        problem = "; ".join(flatten_errors(exc.messages)) if isinstance(exc, ValidationError) else \
            f"{type(exc).__name__}: {exc}"
        log.error("result event %r of command %r cannot be serialized: %s", event.name, action.command, problem)
        event, outcome = fatal_event(f"result payload of event '{event.name}' cannot be serialized: {problem}"), \
            "error"
        body = encode_event(event)
    try:
        _deliver_result(pack, action, body, event.name)
    finally:
        pack._metrics.action_completed(action.command, outcome, duration)


def _execute(pack, action):
    """Run the handler; ``(event, outcome)`` whatever happens (see :data:`~flyte_gevent.metrics.OUTCOMES`)."""
    command = pack._commands.get(action.command)
    if command is None:
        log.error("no handler for command %r; completing the action as FATAL", action.command)
        return fatal_event(f"Unknown command '{action.command}'"), "unknown_command"
    if pack._handlers_cancelled:
        return fatal_event(SHUTDOWN_MESSAGE), "shutdown"
    seconds = command.timeout or pack.action_timeout
    timed_out = _TimedOut()
    timer = gevent.Timeout(seconds, timed_out) if seconds else None
    try:
        if timer is not None:
            timer.start()
        value = action.input
        if command.input_schema is not None:
            try:
                value = command.input_schema.load(value)
            except ValidationError as exc:
                # Problems with the input as a whole (not an object, say) have no field path of their own.
                lines = [line if ": " in line else f"input: {line}" for line in flatten_errors(exc.messages)]
                message = f"invalid input for command '{command.name}':\n" + "\n".join(lines)
                log.warning("%s", message.replace("\n", "; "))
                return Event(command.failure_event or FATAL, message), "invalid_input"
        result = command.handler(value)
    except _TimedOut as exc:
        if exc is not timed_out:
            raise
        log.error("handler for command %r timed out after %g s", command.name, seconds)
        return fatal_event(f"timed out after {seconds:g} s"), "timeout"
    except (_Cancelled, GreenletExit):
        log.warning("handler for command %r cut short: %s", command.name, SHUTDOWN_MESSAGE)
        return fatal_event(SHUTDOWN_MESSAGE), "shutdown"
    except BaseException as exc:  # noqa: BLE001 - any handler failure, SystemExit included, is a FATAL result
        log.error("handler for command %r failed", command.name, exc_info=True)
        text = str(exc)
        return fatal_event(f"{type(exc).__name__}: {text}" if text else type(exc).__name__), "error"
    finally:
        if timer is not None:
            timer.close()
    if not isinstance(result, Event):
        log.error("handler for command %r returned %s instead of an Event", command.name, type(result).__name__)
        return fatal_event(f"handler for command '{command.name}' returned {type(result).__name__}, "
                           f"expected an Event"), "error"
    if result.name == FATAL.name:
        return result, "fatal"
    if command.output_events and result.event_def.name not in {e.name for e in command.output_events}:
        pack._warn_undeclared(command.name, result.name)
    return result, "success"


def _deliver_result(pack, action, body, event_name):
    """Post the result until it lands, the action is gone, or the deadline passes.

    202 ends it; 400 turns it into a FATAL result naming the refused event; a 404
    registers the pack again and tries once more (a second 404 means the action
    is gone); a 500 after an attempt whose answer was lost means that attempt
    landed, otherwise a 500 is tried at most twice more; connection errors,
    timeouts, 401, 429 and gateway errors are retried with backoff. A result
    given up on is logged with the action id and counted as lost.
    """
    deadline = time.monotonic() + pack.result_deadline
    backoff = Backoff(*_RESULT_BACKOFF)
    attempts = server_errors = 0
    reregistered = rejected = maybe_landed = False
    while True:
        attempts += 1
        registration = pack._registration
        try:
            pack._client.post_result(action.result_url, body)
        except GreenletExit:
            log.error("result %r for action %s lost: the pack stopped before it was delivered", event_name, action.id)
            pack._metrics.result_lost()
            raise
        except PackNotFoundError as exc:
            error = exc
            if reregistered:
                log.warning("result for action %s not accepted: the Flyte API does not know the action "
                            "(404 after registering again); giving up", action.id)
                return
            if pack._reregister(registration, "result answered 404"):
                reregistered = True
                continue
        except FlyteError as exc:
            error = exc
            if exc.status == 400 and not rejected:
                rejected = True
                log.error("the Flyte API refused result %r for action %s (400); completing it as FATAL",
                          event_name, action.id)
                body = encode_event(fatal_event(f"result event '{event_name}' was refused by the Flyte API "
                                                f"(400 Bad Request)"))
                event_name = FATAL.name
                continue
            if exc.status == 500:
                server_errors += 1
                if maybe_landed:
                    log.warning("result for action %s answered 500 after an attempt whose answer was lost: that "
                                "attempt completed the action, not retrying", action.id)
                    return
                if server_errors > _RESULT_500_RETRIES:
                    log.error("result %r for action %s lost: the Flyte API answered 500 %d times", event_name,
                              action.id, server_errors)
                    pack._metrics.result_lost()
                    return
            elif not worth_retrying(exc):
                log.error("result %r for action %s lost: %s", event_name, action.id, exc)
                pack._metrics.result_lost()
                return
        else:
            if attempts > 1:
                log.info("result for action %s delivered after %d attempts", action.id, attempts)
                pack._api_answered()
            return
        # Did the server perhaps apply an attempt whose answer we never got? Not
        # when no connection could even be made.
        if error.status in _OUTCOME_UNKNOWN and getattr(error, "request_sent", None) is not False:
            maybe_landed = True
        remaining = min(deadline, pack._flush_deadline) - time.monotonic()
        if remaining <= 0:
            log.error("result %r for action %s lost after %d attempts: %s", event_name, action.id, attempts, error)
            pack._metrics.result_lost()
            return
        delay = min(backoff.next(), remaining)
        # Keyed without the URL: during an outage, one line per interval rather than one per pending action.
        pack._result_throttle.log(retry_log_level(error), error.reason,
                                  "posting a result failed (action %s, attempt %d), retrying in %.1f s: %s",
                                  action.id, attempts, delay, error)
        pack._metrics.result_retried()
        pack._sleep(delay)
