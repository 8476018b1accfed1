"""flyte-ticker, ported: an events-only pack that sends ``Tick`` every minute.

Like ExpediaGroup/flyte-ticker it registers pack ``Ticker`` with one event and
no commands (so it never polls), and every minute counted from start-up sends
``Tick`` with ``{"time": "<RFC 3339 UTC timestamp ending in Z>"}``. Unlike it,
it applies ``FLYTE_LABELS``, registers again when the pack was deleted on the
server (the library does that on a 404), reports failed ticks in its logs and
metrics, and stops cleanly on SIGTERM: the timer is cancelled and no tick is
sent half-way.

``TICKER_INTERVAL`` (seconds, default 60) changes the period, for demos and tests. The
ticking is declared on the definition (``@pack_def.background``), so
``flyte-gevent run examples/ticker_pack.py:pack_def`` ticks as well.

Run it::

    FLYTE_API=http://flyte:8080 python examples/ticker_pack.py
"""

from gevent import monkey

if __name__ == "__main__":
    monkey.patch_all()

import datetime
import os
import sys
import time

import gevent

from flyte_gevent import ConfigError, Event, EventDef, Pack, PackDef

HELP_URL = "https://github.com/ExpediaGroup/flyte-ticker/blob/master/README.md"

tick = EventDef("Tick")


def now_text() -> str:
    """The current time in UTC, RFC 3339 with microseconds and ``Z`` (flows match on the hour text)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def tick_forever(pack: Pack, interval: float = 60.0) -> None:
    """Send a Tick every *interval* seconds, counted from start-up, without drifting."""
    next_at = time.monotonic() + interval
    while True:
        gevent.sleep(max(0.0, next_at - time.monotonic()))
        next_at += interval
        pack.send_event_nowait(Event(tick, {"time": now_text()}))


def interval_from_environment() -> float:
    """``TICKER_INTERVAL`` in seconds (default 60); a ``ConfigError`` naming it when it is not a positive number."""
    text = os.environ.get("TICKER_INTERVAL", "60")
    try:
        interval = float(text)
    except ValueError:
        interval = 0.0
    if not 0 < interval < float("inf"):
        raise ConfigError(f"TICKER_INTERVAL={text!r}: expected a positive number of seconds", "TICKER_INTERVAL")
    return interval


def make_pack_def(interval: float | None = None) -> PackDef:
    """The Ticker pack, ticking every *interval* seconds (``None``: ``TICKER_INTERVAL``, else 60).

    The ticking is a background task declared on the definition, so it runs
    however the pack is run (this script, ``flyte-gevent run``, gunicorn, the
    testing kit), starts once the pack is registered and stops when it stops.
    """
    pack_def = PackDef(name="Ticker", help_url=HELP_URL, event_defs=[tick])

    @pack_def.on_start
    def check_interval(pack: Pack) -> None:
        if interval is None:
            interval_from_environment()  # a bad TICKER_INTERVAL fails the start (exit 78 under the CLI)

    @pack_def.background
    def send_ticks(pack: Pack) -> None:
        tick_forever(pack, interval if interval is not None else interval_from_environment())

    return pack_def


pack_def = make_pack_def()


def main() -> None:
    try:
        Pack.from_env(pack_def).run()
    except ConfigError as exc:
        sys.exit(f"Error: {exc}")


if __name__ == "__main__":
    main()
