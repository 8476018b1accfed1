"""Running one taken action: its handler, under its timeout and the shutdown's cancellation, then its one result.

Flyte hands each action out once: a taken action is PENDING until the pack posts
its result, and it is never offered again. So every action given to
:meth:`ActionRunner.run` ends in exactly one delivered result, whatever the
handler does (returns garbage, raises, hangs past its timeout, is cut short by
shutdown) and whatever happens around it while the result is being prepared (a
log handler that yields or raises, a shutdown arriving). That is structural:

* the handler call is the only code the per-action timer and the shutdown's
  cancellation can interrupt. Both are armed right before the call and disarmed
  in the ``finally`` that ends it, before anything else runs in the greenlet
  (gevent delivers either only while the greenlet is switched out);
* everything from taking the action to encoding its result runs under one
  guard: an unexpected exception there (a bug, a broken log handler) still
  produces a FATAL result, and delivering that one result is the last step.

An action's life has three recorded points, each in one place of :meth:`ActionRunner.run`:
it was taken (:meth:`~ActionRunner._taken`), its result is fixed
(:meth:`~ActionRunner._encode`), and its delivery ended accepted, refused or lost
(the :class:`~flyte_gevent._delivery.Delivered` that :meth:`~ActionRunner._deliver`
gets, then :meth:`~ActionRunner._finished`). With a journal
(:mod:`flyte_gevent._journal`) they are also where the action is written down
before its handler runs, its result added, and its record removed once the
result is settled, so the next process can complete an action this one was
killed with (:meth:`ActionRunner.run_recovered`).
"""

import json
import logging
import time

import gevent
from gevent import GreenletExit, getcurrent
from marshmallow import ValidationError

from ._journal import NullJournal
from ._retry import LogThrottle
from .errors import describe, redact_urls
from .log import bind_action
from .models import FATAL, Event, fatal_event
from .schemas import encode_event, flatten_errors

__all__ = ["RERUN", "RESTARTED", "RESTARTED_MESSAGE", "RESULT", "SHUTDOWN_MESSAGE", "ActionRunner"]

log = logging.getLogger("flyte_gevent.actions")

SHUTDOWN_MESSAGE = "pack shutting down"
RESTARTED_MESSAGE = "pack restarted while this action was running"

# How an action adopted from the journal of a dead process is completed (see run_recovered).
RESULT, RERUN, RESTARTED = "result", "rerun", "fatal"

# How a handler call ended.
_RETURNED, _RAISED, _INVALID, _TIMED_OUT, _CANCELLED = "returned", "raised", "invalid", "timed out", "cancelled"


class _Cancelled(BaseException):
    """Thrown into a handler still running when the shutdown grace period ends."""


class _TimedOut(BaseException):
    """Raised in a handler that overran its per-action timeout."""


class ActionRunner:
    """Runs taken actions, each in the greenlet that took it, to exactly one delivered result.

    :param pack_name: the pack's name, for the log context.
    :param commands: ``{name: Command}``.
    :param delivery: posts results: ``deliver_result(action, body, event_name, recovered=False)``
        returns a :class:`~flyte_gevent._delivery.Delivered` (see :class:`~flyte_gevent._delivery.Delivery`).
    :param metrics: the pack's metrics (:mod:`flyte_gevent.metrics`).
    :param journal: where taken actions are written down (a
        :class:`~flyte_gevent._journal.Journal`, open while actions run), or
        ``None`` / a :class:`~flyte_gevent._journal.NullJournal` for none.
    :param action_timeout: default seconds a handler may run (``Command(timeout=)``
        overrides it); ``None`` for no limit.
    :param on_change: called whenever a handler call ends (shutdown waits for those).
    """

    def __init__(self, pack_name, commands, delivery, metrics, *, journal=None, action_timeout=None,
                 on_change=lambda: None):
        self._pack_name = pack_name
        self._commands = commands
        self._delivery = delivery
        self._metrics = metrics
        self._journal = NullJournal() if journal is None else journal
        self._action_timeout = action_timeout
        self._on_change = on_change
        self._in_handler = set()  # greenlets inside a handler call, the only ones cancel_handlers() interrupts
        self._cancelled = False
        self._undeclared = set()
        self._declared_names = {}  # command name -> (its output_events, their names)
        self._journal_throttle = LogThrottle(log)

    @property
    def handlers_running(self):
        """Handlers running now (actions being delivered or not yet started are not counted)."""
        return len(self._in_handler)

    def run(self, action, failure=None, *, recovered=False):
        """Run *action* in the current greenlet and deliver its one result; returns once delivery ended.

        :param failure: complete the action as FATAL with this message without
            running a handler (a malformed action).
        :param recovered: the action was adopted from a dead process's journal
            (see :meth:`run_recovered`).
        """
        getcurrent().name = f"action:{action.id}"
        bind_action(action, self._pack_name)
        started = time.monotonic()
        outcome = "error"
        try:
            self._taken(action, recovered)
            if failure is not None:
                event, outcome = fatal_event(failure), "error"
            else:
                event, outcome = self._execute(action)
            event_name, body, outcome = self._encode(action, event, outcome)
        except BaseException as exc:  # noqa: BLE001 - the guard: whatever went wrong, the action gets a result
            event_name, body = self._internal_failure(action, exc)
            outcome = "error"
        duration = time.monotonic() - started
        try:
            self._deliver(action, body, event_name, recovered)  # delivery ended: accepted, refused or lost
        except Exception as exc:  # noqa: BLE001 - a bug (or a broken log handler) inside delivery
            self._metrics.result_lost()
            _log_quietly(logging.ERROR, "result %r for action %s may be lost: delivering it failed: %s", event_name,
                         action.id, describe(exc), exc_info=(type(exc), exc, exc.__traceback__))
        finally:
            self._finished(action, outcome, duration, recovered)

    def cancel_handlers(self):
        """Complete every handler still running as FATAL "pack shutting down", and any action run later."""
        self._cancelled = True
        loop = gevent.get_hub().loop
        for greenlet in list(self._in_handler):
            # Decided in the hub callback, when the greenlet is switched out: a handler that has
            # ended by then is past the point where anything may interrupt its action.
            loop.run_callback(self._cancel, greenlet)

    def run_recovered(self, record, how):
        """Complete an action adopted from the journal of a dead process, in the current greenlet.

        :param record: the :class:`~flyte_gevent._journal.Recovered` record
            (its journal record stays until the result is settled, as any other's).
        :param how: :data:`RESULT`, deliver the result it has; :data:`RERUN`,
            run its handler again; :data:`RESTARTED`, complete it as FATAL
            :data:`RESTARTED_MESSAGE`.

        A recovered action is not counted as taken by this process, and its
        delivery takes a 500 as proof that the dead process had completed it.
        """
        action = record.action
        if how != RESULT:
            self.run(action, failure=None if how == RERUN else RESTARTED_MESSAGE, recovered=True)
            return
        getcurrent().name = f"action:{action.id}"
        bind_action(action, self._pack_name)
        try:
            self._deliver(action, record.result, _event_name(record.result), recovered=True)
        except Exception as exc:  # noqa: BLE001 - a bug inside delivery: the record stays for the next start
            _log_quietly(logging.ERROR, "recovered result for action %s may be lost: delivering it failed: "
                         "%s", action.id, describe(exc), exc_info=(type(exc), exc, exc.__traceback__))

    def _cancel(self, greenlet):
        if greenlet in self._in_handler and not greenlet.dead:
            greenlet.throw(_Cancelled())

    # -- the three recorded points ---------------------------------------------------

    def _taken(self, action, recovered):
        """The one place an action becomes the pack's to complete (it is PENDING on the server).

        With a journal, the action is written down before its handler runs;
        when that fails, it runs all the same, unprotected (logged and counted).
        An action adopted from a dead process's journal is on disk already.
        """
        if recovered:
            return
        self._metrics.action_taken(action.command)
        try:
            self._journal.taken(action)
        except Exception as exc:  # noqa: BLE001 - the journal protects actions; it never fails one
            self._metrics.action_unjournaled()
            self._journal_throttle.log(logging.ERROR, str(exc), "action %s runs without its journal record: if "
                                       "this process dies before its result is posted, it stays PENDING: %s",
                                       action.id, describe(exc))

    def _encode(self, action, event, outcome):
        """The one place an action's result is fixed: ``(event name, body to post, outcome)``; the journal keeps it."""
        try:
            name, body = event.name, encode_event(event)
        except Exception as exc:  # noqa: BLE001 - any payload that cannot be encoded completes the action as FATAL
            problem = ("; ".join(flatten_errors(exc.messages)) if isinstance(exc, ValidationError)
                       else f"{type(exc).__name__}: {exc}")
            fatal = fatal_event(f"result payload of event '{event.name}' cannot be serialized: {problem}")
            log.error("result event %r of command %r cannot be serialized: %s", event.name, action.command, problem)
            name, body, outcome = fatal.name, encode_event(fatal), "error"
        self._journal.result(action.id, body)
        return name, body, outcome

    def _deliver(self, action, body, event_name, recovered):
        """Deliver the result; once the answers settle it, its journal record goes (else the next start retries)."""
        delivered = self._delivery.deliver_result(action, body, event_name, recovered=recovered)
        if delivered.settled:  # accepted, or refused for good
            try:
                self._journal.remove(action.id)
            except Exception as exc:  # noqa: BLE001 - the record stays; the next start posts it, and gets a 500
                _log_quietly(logging.ERROR, "the journal record of action %s cannot be removed: %s", action.id,
                             describe(exc))

    def _finished(self, action, outcome, duration, recovered):
        """The action is done with: its one result was delivered or given up on (and said so)."""
        if recovered:
            return  # counted by outcome of its recovery, not as this process's action
        self._metrics.action_completed(action.command, outcome, duration)

    # -- running the handler ------------------------------------------------------------

    def _execute(self, action):
        """Run the handler; ``(event, outcome)`` whatever happens (see :data:`~flyte_gevent.metrics.OUTCOMES`)."""
        command = self._commands.get(action.command)
        if command is None:
            log.error("no handler for command %r; completing the action as FATAL", action.command)
            return fatal_event(f"Unknown command '{action.command}'"), "unknown_command"
        if self._cancelled:
            return fatal_event(SHUTDOWN_MESSAGE), "shutdown"
        ended, value, seconds = self._call(command, action.input)
        # From here on the action cannot be interrupted: logging may yield or fail without losing it.
        if ended is _RETURNED:
            return self._check_returned(command, value)
        if ended is _INVALID:
            # Problems with the input as a whole (not an object, say) have no field path of their own.
            lines = [line if ": " in line else f"input: {line}" for line in flatten_errors(value.messages)]
            message = f"invalid input for command '{command.name}':\n" + "\n".join(lines)
            log.warning("invalid input for command %r: %s", command.name, "; ".join(lines))
            return Event(command.failure_event or FATAL, message), "invalid_input"
        if ended is _TIMED_OUT:
            log.error("handler for command %r timed out after %g s", command.name, seconds)
            return fatal_event(f"timed out after {seconds:g} s"), "timeout"
        if ended is _CANCELLED:
            log.warning("handler for command %r cut short: %s", command.name, SHUTDOWN_MESSAGE)
            return fatal_event(SHUTDOWN_MESSAGE), "shutdown"
        log.error("handler for command %r failed", command.name, exc_info=(type(value), value, value.__traceback__))
        text = redact_urls(str(value))  # the payload is kept by Flyte and shown to whoever reads the flow
        return fatal_event(f"{type(value).__name__}: {text}" if text else type(value).__name__), "error"

    def _call(self, command, value):
        """Load the input and call the handler, interruptible (by its timeout, by shutdown) only meanwhile.

        Returns ``(how it ended, what it returned or raised, the timeout in seconds)``.
        """
        seconds = command.timeout or self._action_timeout
        timed_out = _TimedOut() if seconds else None
        timer = gevent.Timeout(seconds, timed_out) if seconds else None
        current = getcurrent()
        self._in_handler.add(current)
        if timer is not None:
            timer.start()
        try:
            if command.input_schema is not None:
                try:
                    value = command.input_schema.load(value)
                except ValidationError as exc:
                    return _INVALID, exc, seconds
            return _RETURNED, command.handler(value), seconds
        except _TimedOut as exc:
            return (_TIMED_OUT, None, seconds) if exc is timed_out else (_RAISED, exc, seconds)
        except (_Cancelled, GreenletExit):
            return _CANCELLED, None, seconds
        except BaseException as exc:  # noqa: BLE001 - any handler failure, SystemExit included, is a FATAL result
            return _RAISED, exc, seconds
        finally:
            # The call has ended: disarm both before this greenlet can switch out again.
            self._in_handler.discard(current)
            if timer is not None:
                timer.close()
            self._on_change()

    def _check_returned(self, command, result):
        if not isinstance(result, Event):
            log.error("handler for command %r returned %s instead of an Event", command.name, type(result).__name__)
            return fatal_event(f"handler for command '{command.name}' returned {type(result).__name__}, "
                               f"expected an Event"), "error"
        if result.name == FATAL.name:
            return result, "fatal"
        if (command.output_events and result.event_def.name not in self._declared(command)
                and (command.name, result.name) not in self._undeclared):
            self._undeclared.add((command.name, result.name))
            log.warning("command %r returned event %r, which is not among its output_events",
                        command.name, result.name)
        return result, "success"

    def _declared(self, command):
        """The names of *command*'s output events (worked out once per command)."""
        names = self._declared_names.get(command.name)
        if names is None or names[0] is not command.output_events:
            names = self._declared_names[command.name] = (command.output_events,
                                                          frozenset(e.name for e in command.output_events))
        return names[1]

    def _internal_failure(self, action, exc):
        """The FATAL result for an action whose run went wrong outside its handler: ``(event name, body)``."""
        if isinstance(exc, GreenletExit):  # the pack killed this greenlet at the end of its stop
            event = fatal_event(SHUTDOWN_MESSAGE)
        else:
            event = fatal_event(f"flyte_gevent could not complete the action: {redact_urls(describe(exc))}")
        _log_quietly(logging.ERROR, "completing action %s as FATAL after an unexpected error: %s", action.id,
                     describe(exc), exc_info=(type(exc), exc, exc.__traceback__))
        return event.name, encode_event(event)


def _event_name(body):
    """The event a recorded result body posts (for log lines): it is the runtime's own encoding."""
    try:
        name = json.loads(body).get("event")
    except (ValueError, AttributeError):
        name = None
    return name if isinstance(name, str) else "?"


def _log_quietly(level, message, *args, exc_info=None):
    """Log, even through a log handler that raises (the failure being reported may be that handler's)."""
    try:
        log.log(level, message, *args, exc_info=exc_info)
    except Exception:  # noqa: BLE001 - nothing is left to report it to
        pass

