"""The pack runtime: registration, the poller, events, health, and graceful shutdown.

A :class:`Pack` owns these greenlets:

* the **poller** (only when the pack has commands), which keeps takes in flight
  while slots of the action pool are free (see :mod:`flyte_gevent._actions`);
* **one greenlet per action**, in a ``gevent.pool.Pool(max_in_flight)``;
* the **event sender**, which delivers events queued by :meth:`Pack.send_event_nowait`;
* the **health server** (unless ``health_port=None``).

Shutdown — :meth:`Pack.stop`, or SIGTERM/SIGINT while :meth:`Pack.run` waits —
stops taking, gives running handlers ``grace_period`` seconds, completes the ones
still running as FATAL "pack shutting down", flushes results and queued events
for up to ``flush_timeout`` seconds, and returns. A second signal cuts both
waits short. The pack is never deleted on the server: replicas share its id.
"""

import logging
import math
import signal
import time

import gevent
import gevent.event
import gevent.lock
import gevent.queue
from gevent import monkey
from gevent.pool import Group, Pool

from . import config
from ._actions import SHUTDOWN_MESSAGE, Poller, cancel_handlers
from ._retry import Backoff, LogThrottle, retry_log_level, worth_retrying
from .client import Client
from .errors import ConfigError, DeliveryError, FlyteError, NotPatchedError, NotRegisteredError, PackNotFoundError
from .health import HealthApp, HealthServer
from .log import bind_pack
from .metrics import make_metrics
from .models import PackDef
from .schemas import encode_event, flatten_errors

__all__ = ["Pack"]

log = logging.getLogger(__name__)

_REGISTER_BACKOFF = (1.0, 30.0)
_REREGISTER_BACKOFF = (1.0, 30.0)
_EVENT_BACKOFF = (0.5, 30.0)
_FORCED_FLUSH = 3.0          # seconds left to post results after a second signal
_NOT_READY_AFTER_ERRORS = 5  # failed takes in a row before /readyz says 503


class Pack:
    """A running Flyte pack.

    :param pack_def: the :class:`~flyte_gevent.PackDef` to register.
    :param client: the :class:`~flyte_gevent.Client` to talk to the Flyte API with.
    :param health_checks: callables returning ``(name, Health)``; a default check when empty.
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

    Usage::

        pack = Pack(pack_def, Client("http://flyte:8080"), max_in_flight=50)
        pack.run()   # until SIGTERM
    """

    def __init__(self, pack_def, client, health_checks=None, polling_interval=5.0, max_in_flight=100,
                 health_port=8090, *, health_host="0.0.0.0", max_takers=64, action_timeout=None,
                 grace_period=30.0, flush_timeout=10.0, result_deadline=600.0, event_deadline=60.0,
                 event_buffer=1000, check_timeout=5.0, metrics=None, allow_unpatched=False):
        if not isinstance(pack_def, PackDef):
            raise TypeError(f"Pack needs a PackDef, not {type(pack_def).__name__}")
        if not isinstance(client, Client):
            raise TypeError(f"Pack needs a Client, not {type(client).__name__}")
        self.pack_def = pack_def
        self.client = client
        self.polling_interval = max(config.check_seconds("polling_interval", polling_interval),
                                    config.MIN_POLLING_INTERVAL)
        if polling_interval < config.MIN_POLLING_INTERVAL:
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

        self._client = client
        self._commands = {command.name: command for command in pack_def.commands}
        self._metrics = make_metrics(metrics, pack_def.name, self._commands)
        self.health_app = HealthApp(self, health_checks, check_timeout, self._metrics)
        self._health_server = HealthServer(self.health_app, health_host, health_port) \
            if health_port is not None else None

        self._registration = None
        self._registered = gevent.event.Event()
        self._register_lock = gevent.lock.Semaphore()
        self._reregister_backoff = Backoff(*_REREGISTER_BACKOFF)
        self._next_reregister_at = 0.0

        self._actions = Pool(self.max_in_flight)
        self._services = Group()
        self._tasks = Group()
        self._poller = None
        self._running = set()
        self._handlers_cancelled = False
        self._progress = gevent.event.Event()
        self._stage = gevent.event.Event()
        self._stopping = gevent.event.Event()
        self._stopped = gevent.event.Event()
        self._started = False
        self._stop_begun = False
        self._forced = False
        self._grace_end = math.inf
        self._flush_deadline = math.inf
        self._service_failure = None
        self._start_failure = None

        self._events = gevent.queue.JoinableQueue(maxsize=event_buffer)
        self._events_closed = False
        self._undeclared = set()
        self._result_throttle = LogThrottle(logging.getLogger("flyte_gevent.actions"))
        self._event_throttle = LogThrottle(log)

    def __repr__(self):
        return f"<Pack {self.pack_def.name!r} {self._state()}>"

    @classmethod
    def from_env(cls, pack_def, environ=None, **overrides):
        """A pack configured from ``FLYTE_*`` environment variables (the Go client's ``NewDefaultPack``).

        Reads the API URL, timeout, token, TLS options and health port (see
        :mod:`flyte_gevent.config`), merges ``FLYTE_LABELS`` over the definition's
        labels, and passes *overrides* (keyword arguments of :class:`Pack`, or of
        the settings) over everything.

        :raises ConfigError: a variable is missing or malformed; the message names it.
        """
        wanted = {s.name for s in config.SETTINGS if s.target in ("client", "pack", "labels")}
        settings = {k: v for k, v in overrides.items() if k in wanted}
        values = config.from_environ(environ, names=wanted, overrides=settings)
        client = Client(values["api"], timeout=values["timeout"], insecure=values["insecure"], jwt=values["jwt"],
                        jwt_file=values["jwt_file"], ca_file=values["ca_file"])
        if values["labels"]:
            pack_def = pack_def.with_labels(values["labels"])
        options = {s.name: values[s.name] for s in config.SETTINGS if s.target == "pack"}
        options.update({k: v for k, v in overrides.items() if k not in wanted})
        return cls(pack_def, client, **options)

    # -- public state -------------------------------------------------------

    @property
    def health_port(self):
        """The port the health server listens on (``None`` when it is off or not started)."""
        return self._health_server.port if self._health_server is not None else None

    @property
    def registered(self):
        """Whether the pack has registered with the Flyte API."""
        return self._registered.is_set()

    @property
    def pack_id(self):
        """The pack id the server gave (or will give) this pack."""
        return self._registration.pack_id if self._registration else self.pack_def.id

    @property
    def in_flight(self):
        """Actions taken and not yet completed (including takes in progress)."""
        return len(self._actions)

    def live(self):
        """``(ok, reason)`` for liveness: the process works, whatever the Flyte API does."""
        if self._stopped.is_set():
            return False, "stopped"
        if self._service_failure is not None:
            return False, self._service_failure
        return True, "alive"

    def ready(self):
        """``(ok, reason)`` for readiness: registered, taking actions, not shutting down."""
        if self._stopping.is_set():
            return False, "shutting down"
        if not self._registered.is_set():
            if self._start_failure is not None:
                return False, f"registration failed: {self._start_failure}"
            return False, "not registered with the Flyte API yet"
        poller = self._poller
        if poller is not None and poller.consecutive_errors >= _NOT_READY_AFTER_ERRORS:
            return False, f"taking actions failed {poller.consecutive_errors} times in a row: {poller.last_error}"
        return True, "ready"

    # -- lifecycle ----------------------------------------------------------

    def start(self, timeout=None):
        """Start the health server, register (retrying until it works), then start taking actions.

        Returns once registered. With *timeout*, gives up after that many seconds
        and raises the last :class:`~flyte_gevent.FlyteError`; a 400 (the server
        refuses the definition) is raised at once.

        :raises PackDefError: the pack definition is invalid.
        :raises NotPatchedError: sockets are not monkey-patched (see ``allow_unpatched``).
        """
        if self._started:
            return
        if self._stop_begun:
            raise RuntimeError("a stopped pack cannot be started again; create a new Pack")
        self.pack_def.validate()
        if not self.allow_unpatched and not monkey.is_module_patched("socket"):
            raise NotPatchedError(
                "gevent has not monkey-patched sockets, so every request would block all greenlets: put "
                "'from gevent import monkey; monkey.patch_all()' at the very top of your main module "
                "(or pass allow_unpatched=True / set FLYTE_GEVENT_ALLOW_UNPATCHED=1 if you know why not)")
        self.client.size_pools(self.max_in_flight + 2)
        if self._health_server is not None:
            self._health_server.start()  # before registering, so liveness answers during an API outage
        self._started = True
        bind_pack(self.pack_def.name)
        try:
            registered = self._register_until(None if timeout is None else time.monotonic() + timeout, timeout)
        except BaseException as exc:
            self._started = False
            self._start_failure = str(exc) or type(exc).__name__
            if self._health_server is not None:
                self._health_server.stop()
            raise
        if not registered or self._stopping.is_set():
            return  # stop() was called while registering
        sender = self._services.spawn(self._send_queued_events)
        sender.name = "event-sender"
        sender.link_exception(self._service_died)
        if self._commands:
            self._poller = Poller(self)
            poller = self._services.spawn(self._poller.run)
            poller.name = "poller"
            poller.link_exception(self._service_died)
        log.info("pack %r is registered as %r and %s", self.pack_def.name, self.pack_id,
                 f"taking actions for {sorted(self._commands)}" if self._commands else "has no commands to take")

    def run(self, start_timeout=None):
        """:meth:`start` if needed, then block until :meth:`stop` or SIGTERM/SIGINT has finished.

        Signals are handled from the moment it is called, so a SIGTERM during a
        long registration also ends in a clean stop. The first signal stops
        gracefully; a second one cuts the grace period and the flush short.
        Returns normally, so the program exits 0.

        :param start_timeout: passed to :meth:`start` as its ``timeout``.
        :raises RuntimeError: the pack stopped because its poller or event
            sender died (a bug, logged with its traceback).
        """
        watchers = []
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                watchers.append(gevent.signal_handler(signum, self._on_signal, signum))
        except ValueError:  # not the main thread: the embedding program owns signals
            pass
        try:
            self.start(timeout=start_timeout)
            self._stopped.wait()
        finally:
            for watcher in watchers:
                watcher.cancel()
        if self._service_failure is not None:
            raise RuntimeError(self._service_failure)

    def stop(self, grace_period=None, flush_timeout=None):
        """Stop gracefully; returns when everything is delivered or given up on.

        :param grace_period: overrides the pack's ``grace_period`` for this stop.
        :param flush_timeout: overrides the pack's ``flush_timeout`` for this stop
            (e.g. to fit an embedding server's own shutdown deadline).
        """
        if self._stop_begun:
            self._stopped.wait()
            return
        self._stop_begun = True
        grace = self.grace_period if grace_period is None else grace_period
        self._grace_end = min(self._grace_end, time.monotonic() + grace)
        running = len(self._running)
        log.info("stopping pack %r: taking no more actions%s", self.pack_def.name,
                 f"; {running} running get up to {grace:g} s to finish" if running else "")
        self._stopping.set()
        self._metrics.registered(False)
        gevent.killall([g for g in self._tasks if g is not gevent.getcurrent()], block=True, timeout=1)
        self._next_stage()
        if self._poller is not None:
            self._poller.notify()

        # A take still in flight also delays the cut-off, but only handlers are worth a warning.
        if not self._wait_for(lambda: not self._running and not self._taking(), lambda: self._grace_end) \
                and self._running:
            log.warning("%d actions still running after the grace period; completing them as FATAL %r",
                        len(self._running), SHUTDOWN_MESSAGE)
        cancel_handlers(self)

        flush = self.flush_timeout if flush_timeout is None else flush_timeout
        self._flush_deadline = min(self._flush_deadline, time.monotonic() + flush)
        self._events_closed = True
        self._next_stage()
        self._wait_for(lambda: not self._actions and not self._events.unfinished_tasks, lambda: self._flush_deadline)
        self._actions.kill(block=True, timeout=1)
        self._services.kill(block=True, timeout=1)
        unsent = self._events.qsize()
        if unsent:
            log.error("%d queued events not sent: the pack stopped before the Flyte API took them", unsent)
        if self._health_server is not None:
            self._health_server.stop()
        self._stopped.set()
        log.info("pack %r stopped", self.pack_def.name)

    def spawn(self, function, *args, **kwargs):
        """Run ``function(*args, **kwargs)`` in a greenlet the pack owns, e.g. a loop sending events.

        The greenlet is killed (``GreenletExit``) as soon as :meth:`stop` begins,
        before running actions are drained, so it sends nothing during shutdown;
        events it queued with :meth:`send_event_nowait` are still flushed. An
        exception it raises is logged.
        """
        greenlet = self._tasks.spawn(function, *args, **kwargs)
        greenlet.name = f"task:{getattr(function, '__name__', 'task')}"
        greenlet.link_exception(self._task_died)
        return greenlet

    # -- events ---------------------------------------------------------------

    def send_event(self, event, timeout=None):
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
        limit = self.event_deadline if timeout is None else timeout
        self._deliver_event(event.name, body, time.monotonic() + limit, limit)

    def send_event_nowait(self, event):
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

    # -- internals used by the action runtime ----------------------------------

    def _reregister(self, failed_registration, why):
        """Register again after a 404 (the pack was deleted on the server).

        Concurrent callers share one attempt; attempts are rate-limited with
        backoff. ``True`` when the pack is registered again.
        """
        with self._register_lock:
            if self._registration is not failed_registration:
                return True  # another greenlet already did it
            wait = self._next_reregister_at - time.monotonic()
            if wait > 0:
                self._sleep(wait)
            try:
                registration = self.client.register(self.pack_def)
            except FlyteError as exc:
                self._next_reregister_at = time.monotonic() + self._reregister_backoff.next()
                log.warning("pack %r is not registered on the server (%s) and registering again failed: %s",
                            self.pack_def.name, why, exc)
                return False
            self._next_reregister_at = time.monotonic() + self._reregister_backoff.base
            self._reregister_backoff.reset()
            self._registration = registration
            self._metrics.registered(not self._stopping.is_set())
            log.warning("pack %r was not registered on the server (%s; deleted?): registered it again",
                        self.pack_def.name, why)
            return True

    def _api_answered(self):
        """A retried result or event got through: the API is back, so takes need not wait out their backoff."""
        if self._poller is not None:
            self._poller.api_answered()

    def _sleep(self, seconds):
        """Sleep, but wake up early when shutdown moves to its next stage."""
        self._stage.wait(seconds)

    def _warn_undeclared(self, command, event):
        if (command, event) not in self._undeclared:
            self._undeclared.add((command, event))
            log.warning("command %r returned event %r, which is not among its output_events", command, event)

    # -- private ------------------------------------------------------------------

    def _state(self):
        if self._stopped.is_set():
            return "stopped"
        if self._stopping.is_set():
            return "stopping"
        return "registered" if self.registered else ("starting" if self._started else "new")

    def _taking(self):
        return self._poller.taking if self._poller is not None else 0

    def _next_stage(self):
        stage, self._stage = self._stage, gevent.event.Event()
        stage.set()

    def _wait_for(self, done, deadline):
        while not done():
            remaining = deadline() - time.monotonic()
            if remaining <= 0:
                return False
            self._progress.clear()
            self._progress.wait(min(remaining, 0.1))
        return True

    def _on_signal(self, signum):
        name = signal.Signals(signum).name
        if not self._stop_begun:
            log.warning("%s received: stopping gracefully (send it again to force)", name)
            self.stop()
        elif not self._forced:
            log.warning("%s received again: forcing the stop", name)
            self._force()

    def _force(self):
        self._forced = True
        now = time.monotonic()
        self._grace_end = now
        self._flush_deadline = min(self._flush_deadline, now + _FORCED_FLUSH)
        self._progress.set()
        self._next_stage()

    def _service_died(self, greenlet):
        # A dead poller or event sender is a bug, and a pack without one only looks
        # alive: fail liveness, stop cleanly, and make run() raise (CLI exit 1).
        exc = greenlet.exception
        self._service_failure = f"the {greenlet.name} greenlet died: {type(exc).__name__}: {exc}"
        log.error("%s; stopping the pack", self._service_failure, exc_info=(type(exc), exc, exc.__traceback__))
        if not self._stop_begun:
            gevent.spawn(self.stop)

    @staticmethod
    def _task_died(greenlet):
        exc = greenlet.exception
        log.error("pack task %s failed: %r", greenlet.name, exc, exc_info=(type(exc), exc, exc.__traceback__))

    def _register_until(self, deadline, timeout):
        backoff = Backoff(*_REGISTER_BACKOFF)
        throttle = LogThrottle(log)
        while not self._stopping.is_set():
            try:
                self._registration = self.client.register(self.pack_def)
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
            self._metrics.registered(True)
            return True
        return False

    def _check_can_send(self):
        if not self._started:
            raise NotRegisteredError(f"pack {self.pack_def.name!r} is not started: call start() or run() before "
                                     "sending events")
        if self._stopped.is_set():
            raise NotRegisteredError(f"pack {self.pack_def.name!r} has stopped")

    @staticmethod
    def _encode(event):
        from marshmallow import ValidationError

        try:
            return encode_event(event)
        except ValidationError as exc:
            raise ValueError(f"event {event.name!r}: payload cannot be serialized: "
                             + "; ".join(flatten_errors(exc.messages))) from None

    def _deliver_event(self, name, body, deadline, limit):
        if not self._registered.wait(max(0.0, deadline - time.monotonic())):
            self._metrics.event_failed(name)
            raise DeliveryError(f"event {name!r} not sent: pack {self.pack_def.name!r} did not register within "
                                f"{limit:g} s")
        backoff = Backoff(*_EVENT_BACKOFF)
        attempts = 0
        while True:
            attempts += 1
            registration = self._registration
            try:
                self.client.post_event(registration.events_url, body)
            except PackNotFoundError as exc:
                error = exc
                if self._reregister(registration, "event answered 404") and attempts < 3:
                    continue
            except FlyteError as exc:
                error = exc
                if not (exc.status == 500 or worth_retrying(exc)):
                    self._metrics.event_failed(name)
                    raise
            else:
                self._metrics.event_sent(name)
                if attempts > 1:
                    self._api_answered()
                return
            remaining = min(deadline, self._flush_deadline) - time.monotonic()
            if remaining <= 0:
                self._metrics.event_failed(name)
                raise DeliveryError(f"event {name!r} not delivered within {limit:g} s ({attempts} attempts): "
                                    f"{error.reason}", last_error=error)
            delay = min(backoff.next(), remaining)
            self._event_throttle.log(retry_log_level(error), str(error),
                                     "sending event %r failed (attempt %d), retrying in %.1f s: %s",
                                     name, attempts, delay, error)
            self._sleep(delay)

    def _send_queued_events(self):
        bind_pack(self.pack_def.name)
        while True:
            name, body = self._events.get()
            try:
                self._deliver_event(name, body, time.monotonic() + self.event_deadline, self.event_deadline)
            except FlyteError as exc:
                log.error("event %r not sent: %s", name, exc)
            except gevent.GreenletExit:
                log.error("event %r not sent: the pack stopped before the Flyte API took it", name)
                self._metrics.event_failed(name)
                raise
            finally:
                self._events.task_done()
                self._progress.set()

