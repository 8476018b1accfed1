"""Small helpers shared by the tests."""

import time

import gevent


def wait_until(condition, timeout=5.0, what="condition"):
    """Poll *condition* until it is true; fail the test after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        gevent.sleep(0.01)
