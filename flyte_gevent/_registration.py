"""The pack's registration with the Flyte API, and registering again when the server has forgotten the pack.

One :class:`Registrar` per :class:`~flyte_gevent.Pack` holds the registration in
use; the poller, result delivery and event sender share it, so a 404 seen by
several greenlets at once leads to one new registration, rate-limited.
"""

import logging
import time

import gevent.lock

from ._retry import Backoff, LogThrottle
from .errors import FlyteError

__all__ = ["Registrar"]

log = logging.getLogger("flyte_gevent.pack")  # its records have always been the pack's

_REREGISTER_BACKOFF = (1.0, 30.0)


class Registrar:
    """The pack's registration with the Flyte API, and registering again when the server has forgotten it.

    A 404 on a take, a result or an event means the pack was deleted on the
    server (dead-pack cleanup, a ``DELETE``). Every greenlet that sees one calls
    :meth:`reregister`; they share one attempt. Attempts are rate-limited: while
    no request on the new registration is answered (a proxy that keeps answering
    404, say), each re-registration waits longer than the last, from 1 s up to
    30 s, and the log line about them is throttled.

    :param client: the :class:`~flyte_gevent.Client` that registers.
    :param pack_def: the :class:`~flyte_gevent.PackDef` to register.
    :param metrics: the pack's metrics (:mod:`flyte_gevent.metrics`).
    :param stopping: a ``gevent.event.Event`` set once the pack stops (it is then
        not reported as registered).

    :ivar current: the :class:`~flyte_gevent.client.Registration` in use, ``None``
        before the first registration.
    """

    def __init__(self, client, pack_def, metrics, stopping):
        self.current = None
        self._client = client
        self._pack_def = pack_def
        self._metrics = metrics
        self._stopping = stopping
        self._lock = gevent.lock.Semaphore()
        self._backoff = Backoff(*_REREGISTER_BACKOFF)
        self._next_at = 0.0
        self._throttle = LogThrottle(log)

    def register(self):
        """Register once; the new :class:`~flyte_gevent.client.Registration`.

        :raises FlyteError: the attempt failed.
        """
        self.current = self._client.register(self._pack_def)
        self._metrics.registered(not self._stopping.is_set())
        return self.current

    def reregister(self, failed, why):
        """Register again because a request made with the registration *failed* answered 404.

        ``True`` when there is a newer registration to use (made now, or by
        another greenlet meanwhile); ``False`` when registering failed or it is
        too soon to try again, and the caller should retry later.
        """
        with self._lock:
            if self.current is not failed:
                return True
            if time.monotonic() < self._next_at:
                return False
            name = self._pack_def.name
            try:
                self.register()
            except FlyteError as exc:
                self._next_at = time.monotonic() + self._backoff.next()
                self._throttle.log(logging.WARNING, "failed", "pack %r is not registered on the server (%s) and "
                                   "registering again failed: %s", name, why, exc)
                return False
            self._next_at = time.monotonic() + self._backoff.next()
            self._throttle.log(logging.WARNING, "registered", "pack %r was not registered on the server (%s; "
                               "deleted?): registered it again", name, why)
            return True

    def confirmed(self):
        """A request made with the current registration was answered: the next 404 may register again at once."""
        if self._backoff.attempt:
            self._backoff.reset()
            self._next_at = 0.0
