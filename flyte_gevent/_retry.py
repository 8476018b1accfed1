"""Backoff with jitter, which failures to retry, and log lines that do not repeat themselves."""

import logging
import random
import time

__all__ = ["RETRYABLE_STATUSES", "Backoff", "LogThrottle", "retry_log_level", "worth_retrying"]

# Statuses worth sending a request again for: overload and gateway trouble.
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})

# More doublings than any base/cap ratio needs (2**64 is 1.8e19).
_MAX_DOUBLINGS = 64


def worth_retrying(error):
    """Whether a :class:`~flyte_gevent.FlyteError` may go away by itself.

    No answer at all, overload or gateway trouble, and 401 (the client already
    reloaded the token once; a rotated token file may still fix it).
    """
    return error.status is None or error.status == 401 or error.status in RETRYABLE_STATUSES


def retry_log_level(error):
    """ERROR for a token refused even after reloading it (an operator must act), else WARNING."""
    return logging.ERROR if error.status == 401 else logging.WARNING


class Backoff:
    """Exponentially growing, jittered delays.

    The n-th delay is drawn uniformly from ``[base, min(cap, base * 2**n)]``, so the
    first is exactly *base* (the polling interval, for the poller) and later ones
    spread replicas apart instead of letting them retry in lockstep. However many
    attempts have failed (days of an outage), a delay is a number within the cap.
    """

    def __init__(self, base, cap):
        self.base = base
        self.cap = max(cap, base)
        self.attempt = 0

    def next(self):
        # base * 2**1024 overflows a float; any real cap is reached long before _MAX_DOUBLINGS.
        high = min(self.cap, self.base * 2 ** min(self.attempt, _MAX_DOUBLINGS))
        self.attempt += 1
        return random.uniform(self.base, high)

    def reset(self):
        self.attempt = 0


class LogThrottle:
    """Log a repeated message once per *interval*, then with a count of what was held back.

    Keyed by the message text, so distinct errors are still logged at once.
    """

    def __init__(self, logger, interval=30.0):
        self.logger = logger
        self.interval = interval
        self._seen = {}  # key -> [first logged at, times held back]

    def log(self, level, key, message, *args):
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return
        if entry is not None and entry[1]:
            message += " (%d more times in the last %.0f s)"
            args += (entry[1], now - entry[0])
        if len(self._seen) > 100:
            self._seen.clear()
        self._seen[key] = [now, 0]
        self.logger.log(level, message, *args)

    def reset(self):
        """Forget what was seen (after a success), so the next failure is logged at once."""
        self._seen.clear()
