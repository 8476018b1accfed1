"""Run a pack inside each gunicorn worker, beside the WSGI app the worker serves.

A web app served by ``gunicorn -k gevent`` already runs on a patched gevent
hub, so it can take Flyte actions in the same process: two hooks in the
gunicorn config start a pack in each worker and drain it when the worker
stops. The pack is named by ``FLYTE_PACK=module:attr`` and resolved exactly
like ``flyte-gevent run module:attr`` (a ``PackDef``, or a factory returning
one; ``FLYTE_*`` variables configure it), and each worker builds its own Pack
from it, with the hooks, background tasks and health checks it declares::

    # gunicorn_conf.py
    from flyte_gevent.gunicorn import post_worker_init, worker_exit  # noqa: F401 - hooks gunicorn calls

    worker_class = "gevent"

    # app.py: the pack's probes and metrics under /flyte, on the app's own port
    from flyte_gevent.gunicorn import mount_health
    application = mount_health(application, prefix="/flyte")

    $ FLYTE_API=http://flyte:8080 FLYTE_PACK=mypack:pack_def gunicorn -c gunicorn_conf.py app:application

**Start.** gunicorn's gevent worker patches, loads the app, then calls
``post_worker_init``: the hook checks that sockets are patched, resolves and
validates the pack, and starts it in a greenlet, so the worker serves HTTP at
once while registration is retried in the background (``/readyz`` answers 503
until it succeeds). A configuration error — ``FLYTE_PACK`` or ``FLYTE_API``
missing, a target that cannot be imported, an invalid pack definition, a worker
that is not a gevent worker — fails the worker's boot, and gunicorn stops with
the message in its log.

**Hooks.** The definition's on_start hooks run in each worker once its pack
has registered, its background tasks from then on, and its on_stop hooks while
the worker drains (see :class:`~flyte_gevent.PackDef`). A hook that fails the
start is logged with its traceback; that worker then serves HTTP without a
pack, and its ``/livez`` answers 503.

**Health.** The pack gets no health server of its own unless
``FLYTE_HEALTH_PORT`` is set: with several workers a fixed port would be bound
by the first worker only. Mount the pack's health app in the web app instead
(:func:`mount_health`); it answers ``/livez``, ``/readyz``, ``/metrics`` and the
Go-compatible JSON, the definition's health checks included, for the worker
that happens to serve the request. A ready-made ``Pack`` is refused (each worker
must build its own, with these settings): the message says how to declare its
health checks and tasks on the ``PackDef``.

**Stop.** As soon as the worker stops being alive — SIGTERM, SIGINT/SIGQUIT,
``max_requests``, ``--reload`` — the pack stops taking actions and drains while
gunicorn finishes the open HTTP requests; ``worker_exit`` waits for it. Running
actions get a grace period and results a flush period that together fit the
time gunicorn allows: ``min(graceful_timeout, timeout) - 3`` seconds, less the
client's timeout (at most a third) kept for requests still in flight when the
flush ends, the rest split so that the flush gets at most half (with the
defaults, 30 s: 9 s of grace, 9 s of flush, 9 s for requests in flight).
Actions still running then are completed as FATAL "pack shutting down", never
left PENDING.

**Know before you deploy:**

* Each worker process runs its own pack: ``-w 4`` means four registrations of
  one pack id, four pollers and four times ``max_in_flight`` — four replicas as
  far as Flyte is concerned (it hands each action to one of them).
* ``max_requests`` (and its jitter), ``--reload`` and ``HUP`` restart workers,
  and with them their packs: each restart drains and registers again.
* A handler that hogs the CPU blocks the worker's hub: no HTTP, no polling, and
  no heartbeat to the gunicorn master, which kills the worker after ``timeout``
  seconds (default 30), leaving its running actions PENDING. Keep such work
  cooperative, or move it to ``gevent.get_hub().threadpool``.
* ``/metrics`` shows the pack of the worker that answered; for all workers,
  use prometheus_client's multiprocess mode or scrape a single-worker pod.
* With ``--preload``, patch at the top of the gunicorn config file
  (``from gevent import monkey; monkey.patch_all()``) so the master does not
  import ``ssl`` unpatched.
"""

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from ._target import build_pack, load_target
from .errors import ConfigError
from .log import pack_context

if TYPE_CHECKING:
    import gevent
    from gunicorn.arbiter import Arbiter
    from gunicorn.config import Config
    from gunicorn.workers.base import Worker

    from .pack import Pack

__all__ = [
    "PACK_VARIABLE",
    "current_pack",
    "load_pack",
    "mount_health",
    "post_worker_init",
    "shutdown_budget",
    "worker_exit",
]

log = logging.getLogger(__name__)

PACK_VARIABLE = "FLYTE_PACK"
_HEALTH_PORT_VARIABLE = "FLYTE_HEALTH_PORT"
# Kept back from gunicorn's deadline for what follows the drain: killing
# leftover greenlets, stopping the health server, the worker's own exit.
_EXIT_MARGIN = 3.0
# How often the watcher looks at worker.alive (gunicorn offers no hook for SIGTERM).
_WATCH_INTERVAL = 0.2

_worker: "_WorkerPack | None" = None  # this process's _WorkerPack, set by post_worker_init


class _WorkerPack:
    """The pack of this worker process and the greenlets that start and stop it."""

    def __init__(self, pack: "Pack", pid: int) -> None:
        from gevent.pool import Group

        self.pack = pack
        self.pid = pid
        self.greenlets = Group()
        self.stopper: gevent.Greenlet[..., Any] | None = None

    def spawn(self, function: Callable[..., object], *args: Any, **kwargs: Any) -> "gevent.Greenlet[..., Any]":
        greenlet = self.greenlets.spawn(function, *args, **kwargs)
        greenlet.name = f"flyte-gunicorn:{function.__name__.strip('_')}"
        return greenlet


def current_pack() -> "Pack | None":
    """The pack running in this gunicorn worker, or ``None`` (not started, or not a worker).

    For the web app to reach the pack it lives with, e.g. to send events::

        from flyte_gevent.gunicorn import current_pack
        current_pack().send_event_nowait(Event(order_placed, {"id": order.id}))
    """
    state = _worker
    return state.pack if state is not None and state.pid == os.getpid() else None


def mount_health(app: WSGIApplication, prefix: str = "/flyte") -> WSGIApplication:
    """Serve this worker's pack's health app (probes, metrics) under *prefix* inside *app*.

    The app is loaded before the hook starts the pack, so the pack is looked up
    per request; until there is one, every path under *prefix* answers 503.

    Usage::

        application = mount_health(application)   # GET /flyte/readyz, /flyte/livez, /flyte/metrics
    """
    from .health import mount

    return mount(app, _current_health_app, prefix)


def _current_health_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    pack = current_pack()
    if pack is not None:
        return pack.health_app(environ, start_response)
    body = json.dumps({"status": "unavailable",
                       "reason": "no pack runs in this worker (is flyte_gevent.gunicorn.post_worker_init "
                                 "one of the gunicorn hooks?)"}).encode()
    start_response("503 Service Unavailable", [("Content-Type", "application/json; charset=utf-8"),
                                               ("Content-Length", str(len(body)))])
    return [body]


def post_worker_init(worker: "Worker") -> None:
    """gunicorn hook: start the pack named by ``FLYTE_PACK`` in this worker.

    Returns at once; registration goes on in the background.

    :raises ConfigError: not a gevent worker, or the pack cannot be resolved or is invalid.
    """
    global _worker  # noqa: PLW0603 - one pack per worker process, which gunicorn's hooks share
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        raise ConfigError("flyte_gevent.gunicorn needs gunicorn's gevent worker: set worker_class = \"gevent\" "
                          "in the gunicorn config (or pass -k gevent)", "worker_class")
    pack = load_pack()
    pack.pack_def.validate()  # refused here, a bad definition fails the boot instead of a greenlet
    state = _WorkerPack(pack, os.getpid())
    _worker = state
    state.spawn(_start, state, worker.pid)
    state.spawn(_watch, worker, state)
    with pack_context(pack.pack_def.name):
        log.info("worker %s runs pack %r (pack id %r)", worker.pid, pack.pack_def.name, pack.pack_def.id)


def worker_exit(server: "Arbiter", worker: "Worker") -> None:
    """gunicorn hook: drain this worker's pack (stop taking, finish or FATAL running actions, flush)."""
    global _worker  # noqa: PLW0603 - see post_worker_init
    state = _worker
    if state is None or state.pid != os.getpid():
        return  # no pack here: the master calls this hook too, for workers that vanished
    stopper = _begin_stop(worker, state)
    stopper.join()
    state.greenlets.kill(block=True, timeout=1)
    _worker = None


def load_pack(environ: Mapping[str, str] | None = None) -> "Pack":
    """The :class:`~flyte_gevent.Pack` that ``FLYTE_PACK`` names, configured for a gunicorn worker.

    A ``PackDef`` (or a factory returning one, given the settings) is configured
    from ``FLYTE_*`` variables like ``flyte-gevent run`` does, except that the
    health server is off unless ``FLYTE_HEALTH_PORT`` is set.

    :raises ConfigError: ``FLYTE_PACK`` is missing or names nothing usable
        (a ready-made ``Pack`` included).
    """
    environ = os.environ if environ is None else environ
    spec = environ.get(PACK_VARIABLE, "").strip()
    if not spec:
        raise ConfigError(f"{PACK_VARIABLE} is not set: name the pack each worker runs as module:attr, "
                          "e.g. mypack:pack_def", PACK_VARIABLE)
    target = load_target(spec, PACK_VARIABLE)
    overrides = {} if environ.get(_HEALTH_PORT_VARIABLE, "").strip() else {"health_port": None}
    return build_pack(target, overrides, environ, spec=spec, source=PACK_VARIABLE)


def shutdown_budget(pack: "Pack", cfg: "Config") -> tuple[float, float]:
    """``(grace_period, flush_timeout)`` for stopping *pack* within gunicorn's deadline (*cfg* is its config).

    The worker has ``graceful_timeout`` seconds after the master's signal before
    it is killed, and must not go ``timeout`` seconds without a heartbeat when it
    restarts on its own (``max_requests``). Of that, ``_EXIT_MARGIN`` is kept for
    the end of the stop, and the client's timeout (at most a third of what is
    left) for the requests still in flight when the flush ends: the pack lets
    each have its answer — a take may have claimed an action, which must then be
    completed — and a worker killed mid-request would strand it. The flush gets
    at most half of the rest, the grace period the others.
    """
    limit = float(cfg.graceful_timeout)
    if cfg.timeout:
        limit = min(limit, float(cfg.timeout))
    budget = max(0.0, limit - _EXIT_MARGIN)
    budget -= min(pack.client.timeout, budget / 3)
    flush = min(pack.flush_timeout, budget / 2)
    grace = min(pack.grace_period, budget - flush)
    return grace, flush


def _start(state: _WorkerPack, pid: int) -> None:
    from .errors import FlyteError

    pack = state.pack
    if state.stopper is not None:
        return  # the worker was told to stop before this greenlet ran
    with pack_context(pack.pack_def.name):
        try:
            pack.start()
        except FlyteError as exc:
            log.error("pack %r will not take actions in worker %s: %s", pack.pack_def.name, pid, exc)
        except Exception:  # an on_start hook's failure (the pack has stopped), or a bug: its traceback, once
            log.exception("pack %r failed to start in worker %s", pack.pack_def.name, pid)


def _watch(worker: "Worker", state: _WorkerPack) -> None:
    import gevent

    while worker.alive:
        gevent.sleep(_WATCH_INTERVAL)
    _begin_stop(worker, state)


def _begin_stop(worker: "Worker", state: _WorkerPack) -> "gevent.Greenlet[..., Any]":
    """Start draining the pack in its own greenlet, once; that greenlet."""
    if state.stopper is not None:
        return state.stopper
    grace, flush = shutdown_budget(state.pack, worker.cfg)
    with pack_context(state.pack.pack_def.name):
        log.info("worker %s is stopping: draining pack %r (grace %g s, flush %g s)", worker.pid,
                 state.pack.pack_def.name, grace, flush)
    state.stopper = state.spawn(state.pack.stop, grace_period=grace, flush_timeout=flush)
    return state.stopper
