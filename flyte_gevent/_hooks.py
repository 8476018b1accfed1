"""The pack author's code that a pack runs besides handlers, at the moments the pack's life defines.

A :class:`~flyte_gevent.PackDef` declares it (``@pack_def.on_start``,
``@pack_def.on_stop``, ``@pack_def.background``, ``@pack_def.health_check``);
:meth:`Pack.spawn <flyte_gevent.Pack.spawn>` adds tasks at run time. The
:class:`Hooks` of a pack runs all of it, each call given the pack:

* **on_start** hooks, once registered and before the first take, one after the
  other in declaration order, in a greenlet of their own so that a stop arriving
  meanwhile can interrupt them. The first that raises ends the start.
* **tasks** — background tasks and spawned ones — start once the on_start hooks
  are done (a task spawned earlier waits for that), each in a greenlet of the
  pack's, and are killed as soon as a stop begins. A task's exception is logged
  once, with its traceback, by the pack (not printed again by gevent's hub); a
  background task is then restarted after a backoff, a spawned one is over.
* **on_stop** hooks, during the stop, once handlers are done, in reverse
  declaration order, within the flush period; an exception is logged and the
  next hook runs. They run whenever the on_start hooks were called.
* **health checks** are bound to the pack, so the health server calls them
  without arguments as it calls the others.
"""

import logging
import time

import gevent
from gevent.pool import Group

from ._retry import Backoff
from .errors import describe
from .log import bind_pack
from .models import hook_name

__all__ = ["Hooks"]

log = logging.getLogger("flyte_gevent.hooks")

#: A background task that raised runs again after a backoff growing from the first value to the second (seconds).
TASK_RESTART_BACKOFF = (1.0, 60.0)
#: A background task that ran this long before it raised starts its backoff over.
TASK_STEADY_RUN = 60.0
#: Each on_stop hook gets at least this long, even when the flush period is over.
STOP_HOOK_MINIMUM = 1.0


class Hooks:
    """Runs one pack's hooks and tasks, and owns their greenlets.

    :param pack: the :class:`~flyte_gevent.Pack`, given to every hook.
    :param pack_def: where the hooks are declared; its lists are copied here,
        as the pack copies its commands.
    """

    def __init__(self, pack, pack_def):
        self._pack = pack
        self._pack_name = pack_def.name
        self._start_hooks = list(pack_def.start_hooks)
        self._stop_hooks = list(pack_def.stop_hooks)
        self._background = list(pack_def.background_tasks)
        #: The definition's health checks, each called as ``check(pack)``, as no-argument callables.
        self.health_checks = [_bound_check(check, pack) for check in pack_def.health_checks]
        self._tasks = Group()
        self._waiting = []      # tasks spawned before the tasks could start
        self._starter = None    # the greenlet running the on_start hooks
        self._began = False     # the on_start hooks were called: the on_stop hooks will run
        self._tasks_started = False
        self._closed = False

    def owns(self, greenlet):
        """Whether *greenlet* runs a hook or a task (a stop asked for from it must not wait for itself)."""
        return greenlet is self._starter or greenlet in self._tasks

    # -- start -------------------------------------------------------------------------------------

    def run_start_hooks(self):
        """Call the on_start hooks; ``None`` when all returned, else ``(hook, exception)`` of the one that raised.

        Also ``None`` when :meth:`close` interrupted them; the caller tells the two apart by its own state.
        """
        self._began = True
        if not self._start_hooks or self._closed:
            return None
        self._starter = gevent.spawn(self._call_start_hooks)
        self._starter.name = "on_start"
        self._starter.join()
        value = self._starter.value
        return value if isinstance(value, tuple) else None

    def _call_start_hooks(self):
        bind_pack(self._pack_name)
        for hook in self._start_hooks:
            try:
                hook(self._pack)
            except Exception as exc:  # noqa: BLE001 - returned to start(), which raises it
                return hook, exc
        return None

    def start_tasks(self):
        """Start the background tasks and the tasks spawned so far; later ones start as they are spawned."""
        if self._closed:
            return
        self._tasks_started = True
        for task in self._background:
            greenlet = gevent.Greenlet(self._keep_running, task)
            greenlet.name = f"background:{hook_name(task)}"
            self._tasks.start(greenlet)
        waiting, self._waiting = self._waiting, []
        for greenlet in waiting:
            self._tasks.start(greenlet)

    def spawn(self, function, args, kwargs):
        """A greenlet running ``function(*args, **kwargs)`` once; started now, or once the tasks start."""
        name = getattr(function, "__name__", "task")
        greenlet = gevent.Greenlet(self._run_once, function, name, args, kwargs)
        greenlet.name = f"task:{name}"
        if self._closed:
            log.warning("pack %r is stopping: task %r not started", self._pack_name, name)
            greenlet.kill()  # never switched to, so it never runs; join() returns at once
        elif self._tasks_started:
            self._tasks.start(greenlet)
        else:
            self._waiting.append(greenlet)
        return greenlet

    # -- the tasks' greenlets -------------------------------------------------------------------------

    def _run_once(self, function, name, args, kwargs):
        bind_pack(self._pack_name)
        try:
            return function(*args, **kwargs)
        except Exception as exc:  # logged here, once, instead of by the hub
            log.error("pack task %r failed: %s", name, describe(exc), exc_info=(type(exc), exc, exc.__traceback__))
            return None

    def _keep_running(self, task):
        bind_pack(self._pack_name)
        name = hook_name(task)
        backoff = Backoff(*TASK_RESTART_BACKOFF)  # read at use, so tests can shorten it
        while True:
            began = time.monotonic()
            try:
                task(self._pack)
            except Exception as exc:  # a task's failure is logged and the task run again
                if time.monotonic() - began >= TASK_STEADY_RUN:
                    backoff.reset()
                delay = backoff.next()
                log.error("background task %r failed; restarting it in %.1f s: %s", name, delay, describe(exc),
                          exc_info=(type(exc), exc, exc.__traceback__))
                gevent.sleep(delay)
                continue
            log.info("background task %r returned; it is not run again", name)
            return

    # -- stop ----------------------------------------------------------------------------------------

    def close(self):
        """When a stop begins: interrupt the on_start hooks, kill every task (waiting ones never run)."""
        self._closed = True
        greenlets = [*self._tasks, *self._waiting]
        self._waiting = []
        if self._starter is not None and not self._starter.dead:
            greenlets.append(self._starter)
        gevent.killall(greenlets, block=True, timeout=1)

    def run_stop_hooks(self, deadline):
        """Call the on_stop hooks, last declared first, if the on_start hooks were called; each until *deadline*.

        *deadline* is a ``time.monotonic()`` value; a hook still running then
        (or after :data:`STOP_HOOK_MINIMUM` seconds, if that is later) is
        interrupted. Failures are logged; the next hook runs all the same.
        """
        if not self._began:
            return
        self._began = False  # once
        for hook in reversed(self._stop_hooks):
            name = hook_name(hook)
            seconds = max(deadline - time.monotonic(), STOP_HOOK_MINIMUM)
            timer = gevent.Timeout(seconds)
            try:
                with timer:
                    hook(self._pack)
            except gevent.Timeout as exc:
                if exc is not timer:  # the hook's own timeout, which it let escape: a failure like any other
                    log.error("on_stop hook %r failed: %s", name, describe(exc))
                else:
                    log.error("on_stop hook %r was still running after %.1f s; interrupted it", name, seconds)
            except Exception as exc:  # one hook's failure must not keep the others from running
                log.error("on_stop hook %r failed: %s", name, describe(exc),
                          exc_info=(type(exc), exc, exc.__traceback__))


def _bound_check(check, pack):
    def bound():
        return check(pack)

    bound.__name__ = bound.__qualname__ = hook_name(check)  # what the health JSON names it by when it fails
    return bound

