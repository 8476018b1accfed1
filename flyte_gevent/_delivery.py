"""Delivering results and spontaneous events: post until the Flyte API takes it, or give up and say so.

Results and events travel the same way — post, back off with jitter, register the
pack again on a 404, give up at a deadline — and differ only in what an answer
means. Both policies are here, side by side, and nowhere else:

=================  =============================================  ===============================
answer             a result: exactly once                          an event: at least once
=================  =============================================  ===============================
any 2xx            accepted                                        accepted
400                sent again once, as FATAL naming the refused    refused: the sender gets the
                   event (a refused FATAL is lost)                 error at once
404                register the pack again and send again; a       register the pack again and
                   404 after that means the action is gone: lost   send again
500                after an attempt that reached the server but    retried with backoff
                   whose answer was lost: that attempt landed
                   (accepted); so for an action recovered from
                   the journal, whose dead taker may have posted
                   it (accepted). Otherwise retried twice more, then
                   lost; after a gateway error (502, 504) it is
                   lost because its landing cannot be confirmed
401, 429, 502,     retried with backoff                            retried with backoff
503, 504, no
answer
anything else      lost                                            refused
deadline passed    lost                                            ``DeliveryError``
=================  =============================================  ===============================

A result's deadline is ``result_deadline``; an event's is the sender's. Once the
pack stops, nothing is retried after the flush deadline (the *cutoff*), but the
attempt in flight still gets its answer. Every lost result is logged at ERROR
with its action id and counted in ``flyte_pack_results_lost_total``. A lost
result whose delivery ran out of time (deadline, cutoff) is not *settled*: a
later attempt (the next start, with a journal) may still land it.
"""

import collections
import logging
import time

from gevent import GreenletExit

from ._retry import Backoff, LogThrottle, retry_log_level, worth_retrying
from .errors import DeliveryError, FlyteError
from .models import FATAL, fatal_event
from .schemas import encode_event

__all__ = ["ACCEPTED", "LOST", "REFUSED", "Delivered", "Delivery"]

log = logging.getLogger("flyte_gevent.delivery")

ACCEPTED, REFUSED, LOST = "accepted", "refused", "lost"

_RESULT_BACKOFF = (0.5, 30.0)
_EVENT_BACKOFF = (0.5, 30.0)
# A 500 that no lost answer explains is a server error: try twice more.
_RESULT_500_RETRIES = 2
_GATEWAY_ERRORS = frozenset({502, 504})  # a gateway answered: the request may or may not have reached the server

Delivered = collections.namedtuple("Delivered", "outcome event attempts reason error settled")
Delivered.__doc__ = """How a delivery ended.

``outcome`` is ACCEPTED, REFUSED or LOST; ``event`` the name of the event last
sent (FATAL after a result refused with 400); ``attempts`` the posts made;
``reason`` why it was not accepted, or how acceptance was inferred (else
``None``); ``error`` the last failed attempt's :class:`~flyte_gevent.FlyteError`;
``settled`` whether the answers settled it (accepted, or refused in a way no
later attempt changes), ``False`` when it ran out of time (its deadline, or the
pack's stop) and a later attempt may still land."""


class Delivery:
    """Posts results and events until the Flyte API accepts them, by the policy in the module docstring.

    :param client: the :class:`~flyte_gevent.Client` that posts.
    :param registrar: the pack's registration: ``current`` (where events go),
        ``reregister(failed, why) -> bool`` after a 404, ``confirmed()`` after a
        post was accepted (see :class:`flyte_gevent.pack.Registrar`).
    :param metrics: the pack's metrics (:mod:`flyte_gevent.metrics`).
    :param result_deadline: seconds a result is retried before it is lost.
    :param sleep: ``sleep(seconds)``: wait between attempts, returning early when
        shutdown moves on (the cutoff is then looked at again).
    :param cutoff: ``cutoff()``: the ``time.monotonic()`` after which nothing is
        retried (the flush deadline once the pack stops; infinity before).
    :param on_recovered: called when a post got through after failed attempts:
        the API is back.
    """

    def __init__(self, client, registrar, metrics, *, result_deadline, sleep, cutoff, on_recovered):
        self._registrar = registrar
        self._result_deadline = result_deadline
        self._sleep = sleep
        self._cutoff = cutoff
        self._on_recovered = on_recovered
        self._results = _ResultPolicy(client, metrics)
        self._events = _EventPolicy(client, metrics)

    def deliver_result(self, action, body, event_name, recovered=False):
        """Post the encoded result of *action* until it lands or is given up on; returns a :class:`Delivered`.

        :param recovered: the action was taken by a process that died (it comes
            from the journal): that process may have posted a result already,
            so a 500 means the action is complete, as after a lost answer.

        Raises nothing but ``GreenletExit`` (the pack killed this greenlet at the
        end of its stop), after logging the result as lost.
        """
        job = _Job(self._results, event_name, body, time.monotonic() + self._result_deadline,
                   self._result_deadline, url=action.result_url, action_id=action.id)
        job.posted_before = recovered
        return self._deliver(job)

    def deliver_event(self, name, body, deadline, limit):
        """Post an encoded spontaneous event until it is accepted, by *deadline* (a ``time.monotonic()``).

        :param limit: the seconds *deadline* stands for, for messages.
        :raises DeliveryError: not accepted in time (``last_error`` says why).
        :raises FlyteError: refused (400, or another status no retry can fix).
        """
        delivered = self._deliver(_Job(self._events, name, body, deadline, limit))
        if delivered.outcome is REFUSED:
            raise delivered.error
        if delivered.outcome is LOST:
            raise DeliveryError(f"event {name!r} not delivered: {delivered.reason}", last_error=delivered.error)

    def _deliver(self, job):
        """The one loop: post; on failure ask the policy what the answer means; back off; end."""
        while True:
            job.attempts += 1
            registration = self._registrar.current
            try:
                job.policy.post(job.url or registration.events_url, job.body)
            except GreenletExit:
                self._end(job, LOST, "the pack stopped before it was delivered")
                raise
            except FlyteError as exc:
                error = job.error = exc
                verdict = job.policy.judge(job, error)
                job.remember(error)
            else:
                return self._end(job, ACCEPTED)
            if verdict is _REREGISTER:
                if self._registrar.reregister(registration, f"{job.policy.kind} answered 404"):
                    job.reregistered = True
                    continue
                verdict = _RETRY  # not registered again (yet): try later
            if isinstance(verdict, _Resend):
                job.body, job.name = verdict.body, verdict.name
                continue
            if isinstance(verdict, _End):
                return self._end(job, verdict.outcome, verdict.reason)
            cutoff = self._cutoff()
            remaining = min(job.deadline, cutoff) - time.monotonic()
            if remaining <= 0:
                why = "the pack stopped first" if cutoff < job.deadline else f"not accepted within {job.limit:g} s"
                return self._end(job, LOST, f"{why} ({job.attempts} attempts): {error.reason}", settled=False)
            delay = min(job.backoff.next(), remaining)
            job.policy.retrying(job, error, delay)
            self._sleep(delay)

    def _end(self, job, outcome, reason=None, settled=True):
        """The one place a delivery ends, accepted, refused or lost: logged and counted by its policy."""
        delivered = Delivered(outcome, job.name, job.attempts, reason, job.error, settled)
        if outcome is ACCEPTED:
            self._registrar.confirmed()
            if job.attempts > 1:
                self._on_recovered()
        job.policy.ended(job, delivered)
        return delivered


class _Job:
    """One body on its way: what it is, where it goes, until when, and what its attempts showed."""

    def __init__(self, policy, name, body, deadline, limit, url=None, action_id=None):
        self.policy = policy
        self.name = name
        self.body = body
        self.deadline = deadline
        self.limit = limit
        self.url = url  # a result's own URL; events go to the current registration's
        self.action_id = action_id
        self.backoff = policy.backoff()
        self.attempts = 0
        self.error = None
        self.reregistered = False
        self.server_errors = 0
        self.answer_lost = False    # an attempt reached the server, but its answer never came back
        self.posted_before = False  # a process that died may have posted this result (recovered from the journal)
        self.gateway_error = None   # a gateway answered for the server: that attempt may not have reached it

    def remember(self, error):
        """Note what a failed attempt says about whether the server may have applied it."""
        if error.status is None and getattr(error, "request_sent", None) is not False:
            self.answer_lost = True
        elif error.status in _GATEWAY_ERRORS:
            self.gateway_error = error.status


_RETRY = "retry"
_REREGISTER = "reregister"
_End = collections.namedtuple("_End", "outcome reason")
_Resend = collections.namedtuple("_Resend", "body name")


# -- the two policies ----------------------------------------------------------------


class _ResultPolicy:
    """Results: exactly once. Never send again what the server may have applied, and never drop one silently."""

    kind = "result"

    def __init__(self, client, metrics):
        self.post = client.post_result
        self._metrics = metrics
        self._throttle = LogThrottle(log)

    @staticmethod
    def backoff():
        return Backoff(*_RESULT_BACKOFF)

    def judge(self, job, error):
        status = error.status
        if status == 404:
            if job.reregistered:
                return _End(LOST, "the Flyte API does not know the action (404 after registering the pack again)")
            return _REREGISTER
        if status == 400:
            if job.name == FATAL.name:
                return _End(LOST, f"the Flyte API refused it: {error}")
            log.error("the Flyte API refused result %r for action %s (400); completing it as FATAL",
                      job.name, job.action_id)
            return _Resend(encode_event(fatal_event(f"result event '{job.name}' was refused by the Flyte API "
                                                    f"(400 Bad Request)")), FATAL.name)
        if status == 500:
            if job.answer_lost:
                return _End(ACCEPTED, "an earlier attempt whose answer was lost completed the action "
                                      "(the Flyte API answers 500 to a repeated result)")
            if job.posted_before:
                return _End(ACCEPTED, "the process that took it before a restart had completed it already "
                                      "(the Flyte API answers 500 to a repeated result)")
            job.server_errors += 1
            if job.server_errors <= _RESULT_500_RETRIES:
                return _RETRY
            if job.gateway_error is not None:
                return _End(LOST, f"whether it landed cannot be confirmed: a gateway answered {job.gateway_error}, "
                                  f"then the Flyte API answered 500 {job.server_errors} times (the action may be "
                                  f"complete, or still PENDING)")
            return _End(LOST, f"the Flyte API answered 500 {job.server_errors} times")
        if worth_retrying(error):
            return _RETRY
        return _End(LOST, str(error))

    def retrying(self, job, error, delay):
        self._throttle.log(retry_log_level(error), error.reason,
                           "posting a result failed (action %s, attempt %d), retrying in %.1f s: %s",
                           job.action_id, job.attempts, delay, error)
        self._metrics.result_retried()

    def ended(self, job, delivered):
        if delivered.outcome is ACCEPTED:
            if delivered.reason is not None:
                log.warning("result for action %s not sent again: %s", job.action_id, delivered.reason)
            elif job.attempts > 1:
                log.info("result for action %s delivered after %d attempts", job.action_id, job.attempts)
            return
        log.error("result %r for action %s lost: %s", job.name, job.action_id, delivered.reason)
        self._metrics.result_lost()


class _EventPolicy:
    """Spontaneous events: at least once. A retry after a lost answer may deliver one twice; that is allowed."""

    kind = "event"

    def __init__(self, client, metrics):
        self.post = client.post_event
        self._metrics = metrics
        self._throttle = LogThrottle(log)

    @staticmethod
    def backoff():
        return Backoff(*_EVENT_BACKOFF)

    def judge(self, job, error):
        if error.status == 404:
            return _REREGISTER
        if error.status == 500 or worth_retrying(error):
            return _RETRY
        return _End(REFUSED, str(error))

    def retrying(self, job, error, delay):
        self._throttle.log(retry_log_level(error), str(error), "sending event %r failed (attempt %d), retrying in "
                           "%.1f s: %s", job.name, job.attempts, delay, error)

    def ended(self, job, delivered):
        # Not logged here: the sender gets an exception (send_event) or logs it (the event sender).
        if delivered.outcome is ACCEPTED:
            self._metrics.event_sent(job.name)
        else:
            self._metrics.event_failed(job.name)
