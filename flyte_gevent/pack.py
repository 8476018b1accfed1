"""The pack runtime: registration, taking actions, events, health, and graceful shutdown.

A :class:`Pack` wires these together and owns their greenlets:

* the :class:`~flyte_gevent._registration.Registrar`, which holds the
  registration and registers again (rate-limited) when the server answers 404;
* the **poller** (only when the pack has commands): the taking strategy,
  :class:`flyte_gevent._poller.Poller`;
* **one greenlet per action**, in a ``gevent.pool.Pool(max_in_flight)``, each
  running its action to one result with :class:`flyte_gevent._actions.ActionRunner`;
* results and events travel through one delivery mechanism,
  :class:`flyte_gevent._delivery.Delivery`;
* the **event sender**, which delivers events queued by :meth:`Pack.send_event_nowait`;
* the **health server** (unless ``health_port=None``);
* the author's **hooks and tasks** — ``on_start``/``on_stop`` hooks, background
  tasks and health checks declared on the definition, tasks given to
  :meth:`Pack.spawn` — run by :class:`flyte_gevent._hooks.Hooks`;
* the **stopper**, the greenlet :meth:`Pack.stop` runs the shutdown in, so
  that a stop asked for from any greenlet (a handler included) completes;
* with a journal (``journal=``, :mod:`flyte_gevent._journal`), the **journal**
  greenlet (:mod:`flyte_gevent._recovery`), which completes the actions that
  dead processes left in it, and every minute adopts the files of processes
  that died since.

Start-up — :meth:`Pack.start` — starts the health server, registers (retrying),
calls the ``on_start`` hooks, then starts the event sender, the poller and the
tasks, and only then counts as ready.

Shutdown — :meth:`Pack.stop`, or SIGTERM/SIGINT while :meth:`Pack.run` waits —
stops taking and kills the tasks, gives running handlers ``grace_period`` seconds,
completes the ones still running as FATAL "pack shutting down", calls the
``on_stop`` hooks, flushes results and queued events for up to ``flush_timeout``
seconds (the hooks' time included), lets requests still in flight get their
answer, closes the client's connections and returns. A second signal cuts both
waits short. The pack is never deleted on the server: replicas share its id.
"""

import functools
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, cast

import gevent
import gevent.event
import gevent.queue
from gevent import monkey
from gevent.pool import Group, Pool

from . import config
from ._actions import SHUTDOWN_MESSAGE, ActionRunner
from ._delivery import Delivery
from ._hooks import Hooks
from ._journal import SYNC_MODES, Journal, NullJournal
from ._poller import Poller
from ._recovery import Recovery
from ._registration import Registrar
from ._retry import Backoff, LogThrottle
from .client import Client, Registration
from .errors import ConfigError, DeliveryError, FlyteError, NotPatchedError, NotRegisteredError, describe
from .health import HealthApp, HealthServer
from .log import bind_pack, configure_from_environ, pack_context
from .metrics import make_metrics
from .models import Event, PackDef, hook_name
from .schemas import encode_event, flatten_errors

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from .health import Check

__all__ = ["Pack"]

log = logging.getLogger(__name__)

_REGISTER_BACKOFF = (1.0, 30.0)
_FORCED_FLUSH = 3.0          # seconds left to post results after a second signal
_NOT_READY_AFTER_ERRORS = 5  # failed takes in a row before /readyz says 503
_RUN_WAKEUP = 60.0           # run() wakes this often: its timer keeps gevent's loop alive


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _as_the_pack(method: "Callable[Concatenate[Pack, _P], _R]") -> "Callable[Concatenate[Pack, _P], _R]":
    """Records logged while *method* runs (in its caller's greenlet) carry the pack's name."""
    @functools.wraps(method)
    def lifecycle(self: "Pack", *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with pack_context(self.pack_def.name):
            return method(self, *args, **kwargs)
    return lifecycle  # type: ignore[return-value]  # functools.wraps' _Wrapped calls as the method does


class Pack:
    """A running Flyte pack.

    :param pack_def: the :class:`~flyte_gevent.PackDef` to register, with the
        hooks, background tasks and health checks it declares.
    :param client: the :class:`~flyte_gevent.Client` to talk to the Flyte API with.
    :param health_checks: callables returning ``(name, Health)``, besides the
        definition's ``@pack_def.health_check`` ones; a default check when there are none.
    :param polling_interval: seconds between takes while idle or after an error (floor 0.5).
    :param max_in_flight: most actions taken and not yet completed at any time.
    :param health_port: health server port; 0 picks a free one (see :attr:`health_port`),
        ``None`` runs no server (mount :attr:`health_app` elsewhere).
    :param health_host: address the health server binds.
    :param max_takers: most takes in flight at once while there is a backlog.
    :param action_timeout: default seconds a handler may run (``Command(timeout=)`` overrides).
    :param grace_period: seconds running handlers get to finish at shutdown.
    :param flush_timeout: seconds, after the grace period, to deliver results and queued events.
    :param result_deadline: seconds a result post is retried before it is logged as lost.
    :param event_deadline: default seconds :meth:`send_event` keeps retrying.
    :param event_buffer: events :meth:`send_event_nowait` can queue before dropping.
    :param check_timeout: seconds a health check may take.
    :param metrics: ``None`` (Prometheus metrics when prometheus_client is
        installed), ``True``, ``False``, or a ``CollectorRegistry`` to use.
    :param allow_unpatched: start even though sockets are not monkey-patched.
    :param journal: a directory for the crash journal, or ``None`` (off): every
        taken action is written down there before its handler runs, and the
        next start completes what a killed process left (README "Reliability").
        Nothing touches the disk before :meth:`start`.
    :param journal_sync: ``"normal"`` (the journal survives a killed process)
        or ``"full"`` (also a crash of the machine, at an fsync per batch).

    Usage::

        pack = Pack(pack_def, Client("http://flyte:8080"), max_in_flight=50)
        pack.run()   # until SIGTERM

    The definition's hooks run at fixed points of the pack's life, each given
    the pack: ``on_start`` hooks after registration and before the first take
    (one that raises fails :meth:`start`); background tasks and :meth:`spawn`
    tasks from then until a stop begins (a background task that raises is
    logged and restarted with backoff); ``on_stop`` hooks during the stop,
    once handlers are done. See :class:`~flyte_gevent.PackDef`.
    """

    def __init__(self, pack_def: PackDef, client: Client, health_checks: "Iterable[Check] | None" = None,
                 polling_interval: float = 5.0, max_in_flight: int = 100, health_port: int | None = 8090, *,
                 health_host: str = "0.0.0.0", max_takers: int = 64, action_timeout: float | None = None,
                 grace_period: float = 30.0, flush_timeout: float = 10.0, result_deadline: float = 600.0,
                 event_deadline: float = 60.0, event_buffer: int = 1000, check_timeout: float = 5.0,
                 metrics: "bool | CollectorRegistry | None" = None, allow_unpatched: bool = False,
                 journal: str | None = None, journal_sync: str = "normal") -> None:
        if not isinstance(pack_def, PackDef):
            raise TypeError(f"Pack needs a PackDef, not {type(pack_def).__name__}")
        if not isinstance(client, Client):
            raise TypeError(f"Pack needs a Client, not {type(client).__name__}")
        self.pack_def = pack_def
        self.client = client
        self.polling_interval = max(config.check_seconds("polling_interval", polling_interval),
                                    config.MIN_POLLING_INTERVAL)
        if polling_interval < config.MIN_POLLING_INTERVAL:
            with pack_context(pack_def.name):
                log.warning("polling interval %g s is below the %g s floor; using %g s",
                            polling_interval, config.MIN_POLLING_INTERVAL, config.MIN_POLLING_INTERVAL)
        self.max_in_flight = config.check_count("max_in_flight", max_in_flight)
        self.max_takers = min(config.check_count("max_takers", max_takers), self.max_in_flight)
        self.action_timeout = (None if action_timeout is None
                               else config.check_seconds("action_timeout", action_timeout))
        self.grace_period = config.check_seconds("grace_period", grace_period, allow_zero=True)
        self.flush_timeout = config.check_seconds("flush_timeout", flush_timeout, allow_zero=True)
        self.result_deadline = config.check_seconds("result_deadline", result_deadline)
        self.event_deadline = config.check_seconds("event_deadline", event_deadline)
        self.allow_unpatched = allow_unpatched
        if health_port is not None and not (isinstance(health_port, int) and 0 <= health_port <= 65535):
            raise ConfigError(f"health_port={health_port!r}: expected a port number, 0, or None", "health_port")
        if journal_sync not in SYNC_MODES:
            raise ConfigError(f"FLYTE_GEVENT_JOURNAL_SYNC / journal_sync={journal_sync!r}: expected one of "
                              f"{', '.join(SYNC_MODES)}", "FLYTE_GEVENT_JOURNAL_SYNC")
        # Built here, opened by start(): after a fork (a gunicorn worker), never before.
        self._journal = NullJournal() if journal is None else Journal(journal, pack_def.id, sync=journal_sync)

        self._commands = {command.name: command for command in pack_def.commands}
        self._metrics = make_metrics(metrics, pack_def.name, self._commands)
        self._hooks = Hooks(self, pack_def)
        self.health_app = HealthApp(self, self._hooks.health_checks + list(health_checks or ()), check_timeout,
                                    self._metrics)
        self._health_server: HealthServer | None = (HealthServer(self.health_app, health_host, health_port)
                                                    if health_port is not None else None)

        self._progress = gevent.event.Event()  # set whenever a handler, a take or an action ends
        self._stage = gevent.event.Event()     # set (and replaced) whenever shutdown moves on
        self._stopping = gevent.event.Event()
        self._stopped = gevent.event.Event()
        self._registered = gevent.event.Event()
        self._registrar = Registrar(client, pack_def, self._metrics, self._stopping)
        self._delivery = Delivery(client, self._registrar, self._metrics, result_deadline=self.result_deadline,
                                  sleep=self._sleep, cutoff=self._cutoff, on_recovered=self._api_answered)
        self._runner = ActionRunner(pack_def.name, self._commands, self._delivery, self._metrics,
                                    journal=self._journal, action_timeout=self.action_timeout,
                                    on_change=self._progress.set)

        self._actions = Pool(self.max_in_flight)
        self._recovery = Recovery(self._journal, self._commands, self._runner, self._actions, self._metrics,
                                  pack_name=pack_def.name, stopping=self._stopping, sleep=self._sleep,
                                  take_url=lambda: cast(Registration, self._registrar.current).take_url,
                                  start_taking=self._start_taking, on_slot_freed=self._recovered_slot_freed)
        self._services = Group()
        self._poller: Poller | None = None
        self._stopper: gevent.Greenlet[[], None] | None = None
        self._started = False
        self._running = False  # start() has finished: hooks called, services and tasks started
        self._stop_begun = False
        self._forced = False
        self._grace_end = math.inf
        self._flush_for = math.inf
        self._flush_deadline = math.inf
        self._service_failure: str | None = None
        self._start_failure: str | None = None

        self._events: gevent.queue.JoinableQueue[tuple[str, bytes]] = gevent.queue.JoinableQueue(maxsize=event_buffer)
        self._events_closed = False
        self._event_throttle = LogThrottle(log)
        self._declared_events = {event_def.name for event_def in pack_def.all_event_defs()}
        self._undeclared_events: set[str] = set()

    def __repr__(self) -> str:
        return f"<Pack {self.pack_def.name!r} {self._state()}>"

    @classmethod
    def from_env(cls, pack_def: PackDef, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Pack":
        """A pack configured from ``FLYTE_*`` environment variables (the Go client's ``NewDefaultPack``).

        Reads the API URL, timeout, token, TLS options and health port (see
        :mod:`flyte_gevent.config`), merges ``FLYTE_LABELS`` over the definition's
        labels, and passes *overrides* (keyword arguments of :class:`Pack`, or of
        the settings) over everything.

        :raises ConfigError: a variable is missing or malformed; the message names it.
        """
        with pack_context(getattr(pack_def, "name", None)):  # what reading the settings logs is about this pack
            wanted = config.PACK_SETTINGS
            settings = {k: v for k, v in overrides.items() if k in wanted}
            values = config.from_environ(environ, names=wanted, overrides=settings)
            client = Client(values["api"], timeout=values["timeout"], insecure=values["insecure"],
                            jwt=values["jwt"], jwt_file=values["jwt_file"], ca_file=values["ca_file"])
            if values["labels"]:
                pack_def = pack_def.with_labels(values["labels"])
            options = {s.name: values[s.name] for s in config.SETTINGS if s.target == "pack"}
            options.update({k: v for k, v in overrides.items() if k not in wanted})
            return cls(pack_def, client, **options)

    # -- public state -------------------------------------------------------

    @property
    def health_port(self) -> int | None:
        """The port the health server listens on (``None`` when it is off or not started)."""
        return self._health_server.port if self._health_server is not None else None

    @property
    def registered(self) -> bool:
        """Whether the pack has registered with the Flyte API."""
        return self._registered.is_set()

    @property
    def pack_id(self) -> str:
        """The pack id the server gave (or will give) this pack."""
        registration = self._registrar.current
        return str(registration.pack_id) if registration else self.pack_def.id

    @property
    def in_flight(self) -> int:
        """Actions taken and not yet completed (including takes in progress)."""
        return len(self._actions)

    def live(self) -> tuple[bool, str]:
        """``(ok, reason)`` for liveness: the process works, whatever the Flyte API does."""
        if self._stopped.is_set():
            return False, "stopped"
        if self._service_failure is not None:
            return False, self._service_failure
        return True, "alive"

    def ready(self) -> tuple[bool, str]:
        """``(ok, reason)`` for readiness: started (registered, on_start hooks done), taking actions, not stopping."""
        if self._start_failure is not None and not self._running:
            return False, self._start_failure
        if self._stopping.is_set():
            return False, "shutting down"
        if not self._registered.is_set():
            return False, "not registered with the Flyte API yet"
        if not self._running:
            return False, "starting: on_start hooks running"
        poller = self._poller
        if poller is not None and poller.consecutive_errors >= _NOT_READY_AFTER_ERRORS:
            return False, f"taking actions failed {poller.consecutive_errors} times in a row: {poller.last_error}"
        return True, "ready"

    # -- lifecycle ----------------------------------------------------------

    @_as_the_pack
    def start(self, timeout: float | None = None) -> None:
        """Start the health server, register (retrying until it works), call the on_start hooks, start taking actions.

        Returns once registered and started: the on_start hooks have returned,
        the poller and the tasks run. With *timeout*, registering gives up
        after that many seconds and raises the last
        :class:`~flyte_gevent.FlyteError`; a 400 (the server refuses the
        definition) is raised at once. A stop that begins meanwhile makes it
        return early, without starting anything more.

        With a journal, it is opened first, and the files of dead processes in
        it are adopted (a journal that cannot be used raises before any request
        is made); once registered, their actions are completed before the first
        take.

        :raises PackDefError: the pack definition is invalid.
        :raises NotPatchedError: sockets are not monkey-patched (see ``allow_unpatched``).
        :raises Exception: what an on_start hook raised; the pack is then stopped
            (its on_stop hooks ran) and cannot be started again.
        :raises ConfigError: the journal cannot be used, or the health port is taken.
        """
        if self._stop_begun:
            raise RuntimeError("a stopped pack cannot be started again; create a new Pack")
        if self._started:
            return
        self.pack_def.validate()
        if not self.allow_unpatched and not monkey.is_module_patched("socket"):
            raise NotPatchedError(
                "gevent has not monkey-patched sockets, so every request would block all greenlets: put "
                "'from gevent import monkey; monkey.patch_all()' at the very top of your main module "
                "(or pass allow_unpatched=True / set FLYTE_GEVENT_ALLOW_UNPATCHED=1 if you know why not)")
        self.client.size_pools(self.max_in_flight + 2)
        records = self._recovery.open()  # before any request: a journal that cannot be used stops the start here
        if self._stopping.is_set():
            self._recovery.close()  # stop() was called while the journal opened
            return
        try:
            if self._health_server is not None:
                self._health_server.start()  # before registering, so liveness answers during an API outage
        except BaseException:
            self._recovery.close()
            raise
        self._started = True
        self._start_failure = None
        try:
            registered = self._register_until(None if timeout is None else time.monotonic() + timeout, timeout)
        except BaseException as exc:
            self._started = False
            self._start_failure = f"registration failed: {str(exc) or type(exc).__name__}"
            if self._health_server is not None:
                self._health_server.stop()
            self._recovery.close()  # its records stay on disk, for the next start (or this one, tried again)
            raise
        if not registered or self._stopping.is_set():
            return  # stop() was called while registering
        self._call_start_hooks()
        if self._stopping.is_set():
            return  # stop() was called while the on_start hooks ran
        sender = self._services.spawn(self._send_queued_events)
        sender.name = "event-sender"
        sender.link_exception(self._service_died)
        waiting = self._recovery.start(records)  # and takes start once every record has a slot
        if self._recovery.is_open:
            journal = self._services.spawn(self._recovery.run, waiting)
            journal.name = "journal"
            journal.link_exception(self._service_died)
        self._hooks.start_tasks()
        self._running = True
        log.info("pack %r is registered as %r and %s", self.pack_def.name, self.pack_id,
                 f"taking actions for {sorted(self._commands)}" if self._commands else "has no commands to take")

    def _call_start_hooks(self) -> None:
        """Call the on_start hooks; when one raises, stop the pack and raise what it raised."""
        failed = self._hooks.run_start_hooks()
        if failed is None:
            return
        hook, exc = failed
        self._start_failure = f"on_start hook {hook_name(hook)!r} failed: {describe(exc)}"
        log.error("%s; stopping the pack", self._start_failure)  # the caller of start() gets the traceback
        self.stop(grace_period=0)
        raise exc

    def run(self, start_timeout: float | None = None, *, configure_logging: bool = True) -> None:
        """:meth:`start` if needed, then block until :meth:`stop` or SIGTERM/SIGINT has finished.

        Signals are handled from the moment it is called, so a SIGTERM during a
        long registration also ends in a clean stop. The first signal stops
        gracefully; a second one cuts the grace period and the flush short.
        Returns normally, so the program exits 0.

        A program that runs a pack this way is often nothing else, so when it
        has configured no logging (the root logger has no handler), ``run()``
        sets up what ``flyte-gevent run`` does: records with their action
        context on stderr, at ``FLYTE_GEVENT_LOG_LEVEL`` (info) in
        ``FLYTE_GEVENT_LOG_FORMAT`` (text). Configure logging first, or pass
        ``configure_logging=False``, to keep it off; :meth:`start` never does it.

        :param start_timeout: passed to :meth:`start` as its ``timeout``.
        :param configure_logging: ``False`` leaves logging alone.
        :raises RuntimeError: the pack stopped because its poller or event
            sender died (a bug, logged with its traceback).
        :raises ConfigError: ``FLYTE_GEVENT_LOG_LEVEL`` or ``FLYTE_GEVENT_LOG_FORMAT`` is malformed.
        """
        if configure_logging and not logging.getLogger().handlers:
            level, fmt = configure_from_environ()
            with pack_context(self.pack_def.name):
                log.info("logging to stderr at level %s in %s format: FLYTE_GEVENT_LOG_LEVEL and "
                         "FLYTE_GEVENT_LOG_FORMAT change that; configure logging before run(), or pass "
                         "run(configure_logging=False), to keep it off", level, fmt)
        watchers = []
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                watchers.append(gevent.signal_handler(signum, self._on_signal, signum))
        except ValueError:  # not the main thread: the embedding program owns signals
            pass
        try:
            self.start(timeout=start_timeout)
            # Waiting with a timeout keeps a timer in gevent's loop: with nothing else
            # in it (no commands, no health server) a bare wait would end in LoopExit.
            while not self._stopped.wait(_RUN_WAKEUP):
                pass
        finally:
            for watcher in watchers:
                watcher.cancel()
        if self._service_failure is not None:
            raise RuntimeError(self._service_failure)

    @_as_the_pack
    def stop(self, grace_period: float | None = None, flush_timeout: float | None = None) -> None:
        """Stop gracefully; returns when everything is delivered or given up on.

        Works from any greenlet, any number of times. Called from inside the
        pack (a handler, a hook, a task) it starts the stop and returns at
        once, so a handler that stops the pack returns its own result, which is
        delivered while the pack drains. A later call waits for the same stop;
        a shorter *grace_period* or *flush_timeout* it gives applies.

        :param grace_period: overrides the pack's ``grace_period`` for this stop.
        :param flush_timeout: overrides the pack's ``flush_timeout`` for this stop
            (e.g. to fit an embedding server's own shutdown deadline).
        """
        self._begin_stop(grace_period, flush_timeout)
        current = gevent.getcurrent()
        # (The type ignores: getcurrent() is a greenlet, which a Pool or Group can still be asked about.)
        if (current is self._stopper or current in self._actions  # type: ignore[operator]
                or self._hooks.owns(current)
                or current in self._services or current in self.health_app.check_greenlets):  # type: ignore[operator]
            return  # the stop waits for (or ends) this greenlet: it must not wait for the stop
        self._stopped.wait()

    def spawn(self, function: Callable[_P, object], *args: _P.args,
              **kwargs: _P.kwargs) -> "gevent.Greenlet[..., Any]":
        """Run ``function(*args, **kwargs)`` once, in a greenlet the pack owns; returns the greenlet.

        It starts once the pack has started (registered, on_start hooks done):
        at once when it has, else then — so it may send events right away. It
        is killed (``GreenletExit``) as soon as :meth:`stop` begins, before
        running actions are drained, so it sends nothing during shutdown; events
        it queued with :meth:`send_event_nowait` are still flushed. Spawned
        before a start that fails, or once the stop has begun, it never runs.
        An exception it raises is logged once, with its traceback, and ends it.
        For a loop the pack should keep running, declare ``@pack_def.background``.
        """
        greenlet: gevent.Greenlet[..., Any] = self._hooks.spawn(function, args, kwargs)
        return greenlet

    # -- events ---------------------------------------------------------------

    @_as_the_pack
    def send_event(self, event: Event[Any], timeout: float | None = None) -> None:
        """Send a spontaneous event, retrying until it is accepted.

        Waits for registration when the pack is still registering. Connection
        errors, timeouts, 401, 429, 500 and gateway errors are retried with
        backoff; a 404 registers the pack again first.

        :param timeout: seconds to keep trying (default ``event_deadline``).
        :raises ValueError: the payload cannot be serialized (the message says where).
        :raises NotRegisteredError: the pack was never started, or has stopped.
        :raises DeliveryError: not accepted before the deadline (``last_error`` says why).
        :raises FlyteHTTPError: the API refused the event (400).
        """
        self._check_can_send()
        body = self._encode(event)
        self._deliver_event(event.name, body, self.event_deadline if timeout is None else timeout)

    @_as_the_pack
    def send_event_nowait(self, event: Event[Any]) -> bool:
        """Queue a spontaneous event for the event sender; ``False`` when the buffer is full and it was dropped.

        :raises ValueError: the payload cannot be serialized.
        :raises NotRegisteredError: the pack was never started.
        """
        if not self._started:
            raise NotRegisteredError(f"pack {self.pack_def.name!r} is not started: call start() or run() before "
                                     "sending events")
        body = self._encode(event)
        if self._events_closed:
            log.warning("event %r dropped: the pack is stopping", event.name)
            self._metrics.event_dropped()
            return False
        try:
            self._events.put_nowait((event.name, body))
        except gevent.queue.Full:
            self._metrics.event_dropped()
            self._event_throttle.log(logging.WARNING, "full", "event buffer full (%d events): dropping event %r",
                                     self._events.maxsize, event.name)
            return False
        return True

    # -- what the runtime modules are given ---------------------------------------

    def _api_answered(self) -> None:
        """A retried result or event got through: the API is back, so takes need not wait out their backoff."""
        if self._poller is not None:
            self._poller.api_answered()

    def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up early when shutdown moves to its next stage."""
        self._stage.wait(seconds)

    def _cutoff(self) -> float:
        """When deliveries stop retrying: the flush deadline once the pack stops, infinity before."""
        return self._flush_deadline

    # -- private ------------------------------------------------------------------

    def _state(self) -> str:
        if self._stopped.is_set():
            return "stopped"
        if self._stopping.is_set():
            return "stopping"
        return "registered" if self.registered else ("starting" if self._started else "new")

    def _taking(self) -> int:
        """Takes in flight, and actions taken but not yet run (each is about to be: a stop waits for them)."""
        return self._poller.taking + self._poller.handing_over if self._poller is not None else 0

    def _next_stage(self) -> None:
        stage, self._stage = self._stage, gevent.event.Event()
        stage.set()

    def _wait_for(self, done: Callable[[], object], deadline: Callable[[], float]) -> bool:
        while not done():
            remaining = deadline() - time.monotonic()
            if remaining <= 0:
                return False
            self._progress.clear()
            self._progress.wait(min(remaining, 0.1))
        return True

    def _begin_stop(self, grace_period: float | None = None, flush_timeout: float | None = None) -> None:
        """Stop taking at once and start the stopper (once); a later call may only shorten the waits."""
        now = time.monotonic()
        self._grace_end = min(self._grace_end, now + (self.grace_period if grace_period is None else grace_period))
        self._flush_for = min(self._flush_for, self.flush_timeout if flush_timeout is None else flush_timeout)
        if self._stop_begun:
            self._progress.set()
            if now + self._flush_for < self._flush_deadline < math.inf:  # a shorter flush, once it has begun
                self._flush_deadline = now + self._flush_for
                self._next_stage()
            return
        self._stop_begun = True
        running = self._runner.handlers_running
        log.info("stopping pack %r: taking no more actions%s", self.pack_def.name,
                 f"; {running} running get up to {self._grace_end - now:g} s to finish" if running else "")
        self._stopping.set()
        self._metrics.registered(False)
        if self._poller is not None:
            self._poller.notify()
        self._stopper = gevent.spawn(self._shut_down)
        self._stopper.name = "stopper"

    def _shut_down(self) -> None:
        """The stop itself, in the stopper greenlet; whatever happens, the pack ends up stopped."""
        try:
            bind_pack(self.pack_def.name)
            self._hooks.close()
            self._next_stage()

            # A take still in flight also delays the cut-off, but only handlers are worth a warning.
            if not self._wait_for(lambda: not self._runner.handlers_running and not self._taking(),
                                  lambda: self._grace_end) and self._runner.handlers_running:
                log.warning("%d actions still running after the grace period; completing them as FATAL %r",
                            self._runner.handlers_running, SHUTDOWN_MESSAGE)
            self._runner.cancel_handlers()

            self._flush_deadline = min(self._flush_deadline, time.monotonic() + self._flush_for)
            # Handlers just cut short end at their next switch; the on_stop hooks come after them.
            self._wait_for(lambda: not self._runner.handlers_running, lambda: self._flush_deadline)
            self._hooks.run_stop_hooks(self._flush_deadline)  # may still queue events: they are flushed below
            self._events_closed = True
            self._next_stage()
            self._wait_for(lambda: not self._actions and not self._events.unfinished_tasks,
                           lambda: self._flush_deadline)
            self._services.kill(block=True, timeout=1)
            unsent = self._events.qsize()
            if unsent:
                log.error("%d queued events not sent: the pack stopped before the Flyte API took them", unsent)
            self._finish_requests_in_flight()
            self._recovery.close()  # every action greenlet has ended: what is left stays for the next start
            if self._health_server is not None:
                self._health_server.stop()
            self.client.close()
            log.info("pack %r stopped", self.pack_def.name)
        except Exception:  # a bug; the pack is stopped all the same, so nobody waits for it forever
            log.exception("stopping pack %r failed", self.pack_def.name)
        finally:
            self._stopped.set()

    def _finish_requests_in_flight(self) -> None:
        """After the flush deadline, let each request still in flight have its answer, then end what is left.

        Nothing is retried any more, but killing a request mid-way would lose
        what the server did with it: a take may have claimed an action (it is
        completed as FATAL "pack shutting down", in one post), a result post may
        have landed. Each waits at most the client's timeout.
        """
        if not self._actions:
            return
        self._runner.cancel_handlers()  # again, for a handler that swallowed the first cancellation
        limit = time.monotonic() + 2 * self.client.timeout  # a take's answer, then one post of its result
        if not self._wait_for(lambda: not self._actions, lambda: limit):
            log.error("%d actions still busy %g s after the flush deadline; abandoning them", len(self._actions),
                      2 * self.client.timeout)
            self._actions.kill(block=True, timeout=1)

    def _start_taking(self) -> None:
        """Start the poller (a pack with commands): from now on actions are taken while slots are free."""
        if not self._commands or self._poller is not None or self._stopping.is_set():
            return
        self._poller = Poller(self.client, self._registrar, self._runner.run, self._actions, self._metrics,
                              pack_name=self.pack_def.name, stopping=self._stopping,
                              polling_interval=self.polling_interval, max_takers=self.max_takers,
                              on_change=self._progress.set)
        poller = self._services.spawn(self._poller.run)
        poller.name = "poller"
        poller.link_exception(self._service_died)

    def _recovered_slot_freed(self) -> None:
        """A recovered action's slot is free: the poller only hears of the slots its own takes free."""
        self._progress.set()
        if self._poller is not None:
            self._poller.notify()

    @_as_the_pack
    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if not self._stop_begun:
            log.warning("%s received: stopping gracefully (send it again to force)", name)
            self._begin_stop()
        elif not self._forced:
            log.warning("%s received again: forcing the stop", name)
            self._force()

    def _force(self) -> None:
        self._forced = True
        now = time.monotonic()
        self._grace_end = now
        self._flush_for = min(self._flush_for, _FORCED_FLUSH)
        self._flush_deadline = min(self._flush_deadline, now + _FORCED_FLUSH)
        self._progress.set()
        self._next_stage()

    def _service_died(self, greenlet: "gevent.Greenlet[..., Any]") -> None:
        # A dead poller or event sender is a bug, and a pack without one only looks
        # alive: fail liveness, stop cleanly, and make run() raise (CLI exit 1).
        exc = cast(BaseException, greenlet.exception)  # linked with link_exception
        self._service_failure = f"the {greenlet.name} greenlet died: {type(exc).__name__}: {exc}"
        log.error("%s; stopping the pack", self._service_failure, exc_info=(type(exc), exc, exc.__traceback__))
        self._begin_stop()

    def _register_until(self, deadline: float | None, timeout: float | None) -> bool:
        backoff = Backoff(*_REGISTER_BACKOFF)
        throttle = LogThrottle(log)
        while not self._stopping.is_set():
            try:
                self._registrar.register()
            except FlyteError as exc:
                if exc.status == 400:
                    raise
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise FlyteError(f"could not register pack {self.pack_def.name!r} within {timeout:g} s: "
                                     f"{exc.reason}", method=exc.method, url=exc.url, status=exc.status) from exc
                delay = backoff.next()
                if deadline is not None:
                    delay = min(delay, deadline - now)
                throttle.log(logging.WARNING, str(exc), "cannot register pack %r yet, retrying: %s",
                             self.pack_def.name, exc)
                self._sleep(delay)
                continue
            self._registered.set()
            return True
        return False

    def _check_can_send(self) -> None:
        if not self._started:
            raise NotRegisteredError(f"pack {self.pack_def.name!r} is not started: call start() or run() before "
                                     "sending events")
        if self._stopped.is_set():
            raise NotRegisteredError(f"pack {self.pack_def.name!r} has stopped")

    def _encode(self, event: Event[Any]) -> bytes:
        """The body of a spontaneous event (warning, once per name, about one the pack does not declare)."""
        from marshmallow import ValidationError

        try:
            body = encode_event(event)
        except ValidationError as exc:
            raise ValueError(f"event {event.name!r}: payload cannot be serialized: "
                             + "; ".join(flatten_errors(exc.messages))) from None
        if event.name not in self._declared_events and event.name not in self._undeclared_events:
            self._undeclared_events.add(event.name)
            log.warning("pack %r sent event %r, which it does not declare (event_defs or a command's "
                        "output_events); Flyte accepts it, but its registration does not list it",
                        self.pack_def.name, event.name)
        return body

    def _deliver_event(self, name: str, body: bytes, limit: float) -> None:
        deadline = time.monotonic() + limit
        if not self._registered.wait(max(0.0, deadline - time.monotonic())):
            self._metrics.event_failed(name)
            raise DeliveryError(f"event {name!r} not sent: pack {self.pack_def.name!r} did not register within "
                                f"{limit:g} s")
        self._delivery.deliver_event(name, body, deadline, limit)

    def _send_queued_events(self) -> None:
        bind_pack(self.pack_def.name)
        while True:
            name, body = self._events.get()
            try:
                self._deliver_event(name, body, self.event_deadline)
            except FlyteError as exc:
                log.error("event %r not sent: %s", name, exc)
            except gevent.GreenletExit:
                log.error("event %r not sent: the pack stopped before the Flyte API took it", name)
                raise
            finally:
                self._events.task_done()
                self._progress.set()
