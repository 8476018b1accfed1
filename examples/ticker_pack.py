"""flyte-ticker, ported: an events-only pack that sends ``Tick`` every minute.

Like ExpediaGroup/flyte-ticker it registers pack ``Ticker`` with one event and
no commands (so it never polls), and every minute counted from start-up sends
``Tick`` with ``{"time": "<RFC 3339 UTC timestamp ending in Z>"}``. Unlike it,
it applies ``FLYTE_LABELS``, registers again when the pack was deleted on the
server (the library does that on a 404), reports failed ticks in its logs and
metrics, and stops cleanly on SIGTERM: the timer is cancelled and no tick is
sent half-way.

``TICKER_INTERVAL`` (seconds, default 60) changes the period, for demos and tests.

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

pack_def = PackDef(name="Ticker", help_url=HELP_URL, event_defs=[tick])


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


def main() -> None:
    try:
        interval = float(os.environ.get("TICKER_INTERVAL", "60"))
        if not interval > 0:
            raise ValueError
    except ValueError:
        sys.exit(f"Error: TICKER_INTERVAL={os.environ['TICKER_INTERVAL']!r}: expected a positive number of seconds")
    try:
        pack = Pack.from_env(pack_def)
    except ConfigError as exc:
        sys.exit(f"Error: {exc}")
    pack.start()
    pack.spawn(tick_forever, pack, interval)
    pack.run()


if __name__ == "__main__":
    main()
