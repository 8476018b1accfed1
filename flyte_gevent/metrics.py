"""Prometheus metrics for a pack (optional: ``pip install flyte-gevent[metrics]``).

Each pack gets its own ``CollectorRegistry`` unless given one, so several packs,
an embedding web app and tests never collide on metric names. The health server
serves it at ``/metrics``. Without prometheus_client the pack uses
:class:`NullMetrics`, whose methods do nothing, and ``/metrics`` answers 404.

Series (no action ids as labels; unknown command names are folded into
``command="unknown"`` so a misbehaving flow cannot explode cardinality):

=========================================  ===========================================
``flyte_pack_actions_taken_total``         actions taken, by command
``flyte_pack_actions_total``               actions completed, by command and outcome
``flyte_pack_action_duration_seconds``     handler run time, by command
``flyte_pack_actions_in_flight``           actions taken and not yet completed
``flyte_pack_take_errors_total``           failed takes, by reason
``flyte_pack_result_retries_total``        result posts sent again
``flyte_pack_results_lost_total``          results given up on, or whose landing cannot be confirmed
``flyte_pack_events_sent_total``           spontaneous events delivered, by event
``flyte_pack_events_failed_total``         spontaneous events given up on, by event
``flyte_pack_events_dropped_total``        events dropped because the send buffer was full
``flyte_pack_actions_recovered_total``     actions of dead processes completed from the journal, by outcome
``flyte_pack_actions_unjournaled_total``   actions run without their journal record (its write failed)
``flyte_pack_registrations_total``         successful (re-)registrations
``flyte_pack_registered``                  1 while registered and not stopping
``flyte_pack_event_loop_blocked_total``    gevent monitor reports of a blocked hub
``flyte_pack_info``                        pack name and library version
=========================================  ===========================================
"""

import bisect
import logging
import time
import weakref
from collections.abc import Iterable
from typing import Any
from wsgiref.types import StartResponse, WSGIEnvironment

from . import __version__

__all__ = ["OUTCOMES", "RECOVERED_OUTCOMES", "Metrics", "NullMetrics", "make_metrics"]

log = logging.getLogger(__name__)

OUTCOMES = ("success", "fatal", "error", "invalid_input", "unknown_command", "timeout", "shutdown")
"""How an action can end: a non-FATAL event; a FATAL event the handler chose; the
handler raised or returned garbage; input refused by its schema; a command the
pack does not have; the per-action timeout; cut short by shutdown."""

RECOVERED_OUTCOMES = ("result", "rerun", "fatal", "other_api")
"""How an action adopted from the journal of a dead process is completed: its
recorded result is delivered; its handler, cut short, is run again (a command
declared ``rerun_after_crash``); it is completed as FATAL "pack restarted while
this action was running"; or it is dropped because its result URL is not on
the Flyte API this pack talks to."""


class NullMetrics:
    """The metrics interface with every method a no-op."""

    enabled = False
    registry: Any = None  # a prometheus_client CollectorRegistry on Metrics

    def wsgi_app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "0")])
        return [b""]

    def action_taken(self, command: str) -> None:
        pass

    def action_completed(self, command: str, outcome: str, duration: float | None) -> None:
        pass

    def take_error(self, reason: str) -> None:
        pass

    def result_retried(self) -> None:
        pass

    def result_lost(self) -> None:
        pass

    def event_sent(self, event: str) -> None:
        pass

    def event_failed(self, event: str) -> None:
        pass

    def event_dropped(self) -> None:
        pass

    def registered(self, state: bool) -> None:
        pass

    def action_recovered(self, outcome: str) -> None:
        pass

    def action_unjournaled(self) -> None:
        pass


class Metrics(NullMetrics):
    """Prometheus collectors on a private (or given) registry.

    :param pack_name: value of the ``pack`` label on ``flyte_pack_info``.
    :param commands: command names that get their own label value.
    :param registry: a ``prometheus_client.CollectorRegistry``; a new one by default.
    """

    enabled = True

    def __init__(self, pack_name: str, commands: Iterable[str], registry: Any = None) -> None:
        import prometheus_client as prom

        self.registry = registry if registry is not None else prom.CollectorRegistry(auto_describe=True)
        self._commands = frozenset(commands)
        r = self.registry
        self._actions = _ActionSeries()
        r.register(self._actions)
        self._take_errors = prom.Counter("flyte_pack_take_errors", "Failed takes.", ["reason"], registry=r)
        self._retries = prom.Counter("flyte_pack_result_retries", "Result posts sent again.", registry=r)
        self._lost = prom.Counter("flyte_pack_results_lost", "Results given up on or not confirmed.", registry=r)
        self._sent = prom.Counter("flyte_pack_events_sent", "Spontaneous events delivered.", ["event"], registry=r)
        self._failed = prom.Counter("flyte_pack_events_failed", "Spontaneous events given up on.", ["event"],
                                    registry=r)
        self._dropped = prom.Counter("flyte_pack_events_dropped", "Events dropped: send buffer full.", registry=r)
        self._registrations = prom.Counter("flyte_pack_registrations", "Successful registrations.", registry=r)
        self._registered = prom.Gauge("flyte_pack_registered", "1 while registered and not stopping.", registry=r)
        self._blocked = prom.Counter("flyte_pack_event_loop_blocked", "gevent monitor: hub blocked.", registry=r)
        self._recovered = prom.Counter("flyte_pack_actions_recovered",
                                       "Actions of dead processes completed from the journal, by outcome.",
                                       ["outcome"], registry=r)
        self._unjournaled = prom.Counter("flyte_pack_actions_unjournaled",
                                         "Actions run without their journal record (the write failed).", registry=r)
        prom.Info("flyte_pack", "Pack and library.", registry=r).info({"pack": pack_name, "version": __version__})
        self._app: Any = prom.make_wsgi_app(registry=r)
        self._children: dict[tuple[Any, ...], Any] = {}
        for outcome in RECOVERED_OUTCOMES:  # a pack that never recovered anything shows zeros, not nothing
            self._child(self._recovered, outcome)
        _subscribe_loop_monitor(self._blocked)

    def wsgi_app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        answer: Iterable[bytes] = self._app(environ, start_response)
        return answer

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric),) + labels
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _command(self, command: str) -> str:
        return command if command in self._commands else "unknown"

    def action_taken(self, command: str) -> None:
        self._actions.taken(self._command(command))

    def action_completed(self, command: str, outcome: str, duration: float | None) -> None:
        self._actions.completed(self._command(command), outcome, duration)

    def take_error(self, reason: str) -> None:
        self._child(self._take_errors, reason).inc()

    def result_retried(self) -> None:
        self._retries.inc()

    def result_lost(self) -> None:
        self._lost.inc()

    def event_sent(self, event: str) -> None:
        self._child(self._sent, event).inc()

    def event_failed(self, event: str) -> None:
        self._child(self._failed, event).inc()

    def event_dropped(self) -> None:
        self._dropped.inc()

    def registered(self, state: bool) -> None:
        if state:
            self._registrations.inc()
        self._registered.set(1 if state else 0)

    def action_recovered(self, outcome: str) -> None:
        self._child(self._recovered, outcome).inc()

    def action_unjournaled(self) -> None:
        self._unjournaled.inc()


class _ActionSeries:
    """The series every action changes: counted in plain numbers, turned into metric families when collected.

    prometheus_client guards each change of a metric with a lock, and once gevent
    has patched ``threading`` that lock is written in Python: the five changes an
    action makes (taken, in flight up and down, completed, duration) cost about
    10 µs that way, and about 1 µs here. The families collected are the ones
    prometheus_client's Counter, Gauge and Histogram would expose (the same names,
    labels, default buckets and ``_created`` samples).

    Changes happen in greenlets, and a collection copies what it reads first, so
    a scrape never sees a change half made.
    """

    def __init__(self) -> None:
        import prometheus_client
        from prometheus_client import metrics_core, utils

        self._core = metrics_core
        self._bounds = tuple(prometheus_client.Histogram.DEFAULT_BUCKETS)
        self._le = tuple(utils.floatToGoString(bound) for bound in self._bounds)  # type: ignore[no-untyped-call]
        self._with_created = _exposes_created(prometheus_client)
        self._taken: dict[str, list[float]] = {}                  # command -> [count, created]
        self._completed: dict[tuple[str, str], list[float]] = {}  # (command, outcome) -> [count, created]
        self._durations: dict[str, list[float]] = {}              # command -> [count in each bucket..., sum, created]
        self._in_flight = 0

    def taken(self, command: str) -> None:
        counter = self._taken.get(command)
        if counter is None:
            counter = self._taken[command] = [0, time.time()]
        counter[0] += 1
        self._in_flight += 1

    def completed(self, command: str, outcome: str, duration: float | None) -> None:
        counter = self._completed.get((command, outcome))
        if counter is None:
            counter = self._completed[(command, outcome)] = [0, time.time()]
        counter[0] += 1
        if duration is not None:
            histogram = self._durations.get(command)
            if histogram is None:
                histogram = self._durations[command] = [0] * len(self._bounds) + [0.0, time.time()]
            histogram[bisect.bisect_left(self._bounds, duration)] += 1  # the first bucket whose bound >= duration
            histogram[-2] += duration
        self._in_flight -= 1

    def describe(self) -> list[Any]:
        return self._families(empty=True)

    def collect(self) -> list[Any]:
        return self._families()

    def _families(self, empty: bool = False) -> list[Any]:
        core = self._core
        taken = core.CounterMetricFamily("flyte_pack_actions_taken", "Actions taken.", labels=["command"])
        completed = core.CounterMetricFamily("flyte_pack_actions", "Actions completed, by outcome.",
                                             labels=["command", "outcome"])
        duration = core.HistogramMetricFamily("flyte_pack_action_duration_seconds", "Handler run time.",
                                              labels=["command"])
        in_flight = core.GaugeMetricFamily("flyte_pack_actions_in_flight", "Actions taken and not yet completed.")
        families = [taken, completed, duration, in_flight]
        if empty:
            return families
        for command, (count, created) in list(self._taken.items()):
            taken.add_metric([command], count, self._created(created))
        for labels, (count, created) in list(self._completed.items()):
            completed.add_metric(list(labels), count, self._created(created))
        for command, histogram in list(self._durations.items()):
            histogram = histogram[:]
            buckets: list[tuple[str, float]] = []
            cumulative = 0.0
            for le, count in zip(self._le, histogram):
                cumulative += count
                buckets.append((le, cumulative))
            duration.add_metric([command], buckets, histogram[-2])
            if self._with_created:
                duration.add_sample("flyte_pack_action_duration_seconds_created", {"command": command},
                                    histogram[-1])
        in_flight.add_metric([], self._in_flight)
        return families

    def _created(self, created: float) -> float | None:
        return created if self._with_created else None


def _exposes_created(prom: Any) -> bool:
    """Whether prometheus_client adds ``_created`` samples (``PROMETHEUS_DISABLE_CREATED_SERIES`` unset)."""
    probe = prom.Counter("probe", "Probe.", registry=None)
    return any(sample.name.endswith("_created") for family in probe.collect() for sample in family.samples)


def make_metrics(setting: Any, pack_name: str, commands: Iterable[str]) -> NullMetrics:
    """Metrics for a pack: *setting* is ``True``/``False``, ``None`` (on when
    prometheus_client is installed) or a ``CollectorRegistry`` to use."""
    if setting is False:
        return NullMetrics()
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        if setting is True:
            raise ImportError("metrics=True needs prometheus_client: pip install 'flyte-gevent[metrics]'") from None
        return NullMetrics()
    registry = None if setting in (None, True) else setting
    return Metrics(pack_name, commands, registry)


_blocked_counters: weakref.WeakSet[Any] = weakref.WeakSet()


def _count_blocked(event: object) -> None:
    from gevent import events

    if isinstance(event, events.EventLoopBlocked):
        for counter in list(_blocked_counters):
            counter.inc()


def _subscribe_loop_monitor(counter: Any) -> None:
    """Count gevent's EventLoopBlocked reports (published when ``GEVENT_MONITOR_THREAD_ENABLE=1``).

    One subscriber per process feeds every live pack's counter; a pack that is
    gone drops out of the weak set instead of being kept alive by gevent.
    """
    from gevent import events

    if _count_blocked not in events.subscribers:
        events.subscribers.append(_count_blocked)
    _blocked_counters.add(counter)
