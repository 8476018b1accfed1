"""url-checker: checks URLs when a flow asks, and watches a few all the time.

A pack that needs more than commands, with all of it declared on its PackDef,
so that every runner builds it the same way:

* ``checkUrl`` — a typed command: ``{"url": "https://example.com/", "timeout_s": 5}``
  (``timeout_s`` optional, at most 60) answers ``UrlChecked {"url", "status",
  "ok", "elapsed_ms"}``, or ``UrlUnreachable {"url", "error"}`` when nothing
  answers. Redirects are reported, not followed; credentials in the URL never
  appear in a payload. Bad input completes the action as FATAL naming the field.
* a **background task** (``@pack_def.background``) that checks the URLs in
  ``URL_CHECKER_WATCH`` (comma-separated) every ``URL_CHECKER_INTERVAL`` seconds
  (default 30) and sends the spontaneous events ``UrlDown {"url", "status",
  "error"}`` and ``UrlUp {"url", "status"}`` when one changes (an answer of 400
  or more counts as down);
* a **health check** (``@pack_def.health_check``) reported as ``Watcher``: the
  URLs that are down, and unhealthy when the watcher has not finished a round
  for three intervals (plus the probes' timeouts);
* **on_start / on_stop hooks** that read the watch settings — a bad one fails
  the start, naming the variable (exit 78 from ``flyte-gevent run``) — and
  close the watcher's HTTP session, logging how things stood.

Run it::

    FLYTE_API=http://flyte:8080 URL_CHECKER_WATCH=https://example.com/ python examples/url_checker_pack.py
    flyte-gevent run examples/url_checker_pack.py:pack_def --api http://flyte:8080 --health-port 8091
    FLYTE_PACK=../url_checker_pack.py:pack_def gunicorn -c gunicorn_conf.py app:application  # in gunicorn_app/

Under gunicorn every worker runs its own pack, and so its own watcher: with
two workers, each change is reported twice.
"""

from gevent import monkey

if __name__ == "__main__":
    monkey.patch_all()

import logging
import os
import sys
import time
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import gevent
import requests
from marshmallow import Schema, fields, validate

from flyte_gevent import JSON, ConfigError, Event, EventDef, Health, Pack, PackDef
from flyte_gevent.errors import redact_url, redact_urls

log = logging.getLogger("url_checker")

WATCH_VARIABLE = "URL_CHECKER_WATCH"
INTERVAL_VARIABLE = "URL_CHECKER_INTERVAL"
PROBE_TIMEOUT = 10.0  # seconds a watched URL gets to answer


class CheckUrlInput(Schema):
    url = fields.Url(required=True, schemes={"http", "https"}, require_tld=False)
    timeout_s = fields.Float(load_default=5.0, validate=validate.Range(min=0, max=60, min_inclusive=False))


url_checked = EventDef("UrlChecked")
url_unreachable = EventDef("UrlUnreachable")
url_down = EventDef("UrlDown")
url_up = EventDef("UrlUp")

pack_def = PackDef("UrlChecker", event_defs=[url_down, url_up])


def probe(http: "requests.Session | ModuleType", url: str,
          timeout: float) -> tuple[int, float, None] | tuple[None, None, str]:
    """``(status, elapsed_ms, error)`` for a GET of *url*: a status, or an error text when nothing answered."""
    started = time.monotonic()
    try:
        response = http.get(url, timeout=timeout, allow_redirects=False, stream=True)  # the body is not needed
    except requests.RequestException as exc:
        return None, None, redact_urls(str(exc)) or type(exc).__name__
    response.close()
    return response.status_code, round((time.monotonic() - started) * 1000, 1), None


@pack_def.command("checkUrl", output_events=[url_checked, url_unreachable], input_schema=CheckUrlInput)
def check_url(input: dict[str, Any]) -> Event[dict[str, JSON]]:
    """*input* is what ``CheckUrlInput`` loaded."""
    status, elapsed_ms, error = probe(requests, input["url"], input["timeout_s"])
    url = redact_url(input["url"])
    if status is None:  # nothing answered
        return Event(url_unreachable, {"url": url, "error": error})
    return Event(url_checked, {"url": url, "status": status, "ok": status < 400, "elapsed_ms": elapsed_ms})


# --- the watcher: hooks, a background task and a health check, each given the running pack -----------------------


class Watcher:
    """What one pack's watcher knows: the URLs, which of them are down, when it last finished a round."""

    def __init__(self, urls: list[str], interval: float) -> None:
        self.urls = urls
        self.interval = interval
        self.down: set[str] = set()
        self.session = requests.Session()
        self.since = time.monotonic()  # the end of the last round, or the start

    def check_all(self, pack: Pack) -> None:
        for url in self.urls:
            status, _, error = probe(self.session, url, PROBE_TIMEOUT)
            is_down = status is None or status >= 400  # nothing answered, or an error status
            if is_down and url not in self.down:
                self.down.add(url)
                log.warning("%s is down: %s", redact_url(url), error or status)
                pack.send_event_nowait(Event(url_down, {"url": redact_url(url), "status": status, "error": error}))
            elif not is_down and url in self.down:
                self.down.discard(url)
                log.info("%s is up again", redact_url(url))
                pack.send_event_nowait(Event(url_up, {"url": redact_url(url), "status": status}))
        self.since = time.monotonic()

    def stale_after(self) -> float:
        """Seconds without a finished round after which the watcher counts as stuck."""
        return 3 * self.interval + PROBE_TIMEOUT * len(self.urls)


watchers: dict[Pack, Watcher] = {}  # the watcher of each running pack (several may run in one process: tests, say)


@pack_def.on_start
def open_watcher(pack: Pack) -> None:
    watchers[pack] = Watcher(_watch_list(), _interval())


@pack_def.background
def watch(pack: Pack) -> None:
    watcher = watchers[pack]
    if not watcher.urls:
        return  # nothing to watch: the task is done
    while True:
        watcher.check_all(pack)
        gevent.sleep(watcher.interval)


@pack_def.health_check
def watcher_health(pack: Pack) -> tuple[str, Health]:
    watcher = watchers.get(pack)
    if watcher is None:  # the health server answers while the pack registers, before open_watcher ran
        return "Watcher", Health(True, "starting")
    if not watcher.urls:
        return "Watcher", Health(True, f"nothing to watch ({WATCH_VARIABLE} is empty)")
    quiet = time.monotonic() - watcher.since
    return "Watcher", Health(quiet < watcher.stale_after(), {
        "watching": len(watcher.urls), "down": sorted(redact_url(url) for url in watcher.down),
        "last_round_s_ago": round(quiet, 1)})


@pack_def.on_stop
def close_watcher(pack: Pack) -> None:
    watcher = watchers.pop(pack, None)
    if watcher is not None:
        watcher.session.close()
        count = len(watcher.urls)
        log.info("watcher stopped: %d URL%s watched, %d down", count, "" if count == 1 else "s", len(watcher.down))


def _watch_list() -> list[str]:
    urls = [item.strip() for item in os.environ.get(WATCH_VARIABLE, "").split(",") if item.strip()]
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{WATCH_VARIABLE}: {redact_url(url)!r} is not an http(s) URL", WATCH_VARIABLE)
    return urls


def _interval() -> float:
    text = os.environ.get(INTERVAL_VARIABLE, "30")
    try:
        interval = float(text)
    except ValueError:
        interval = 0.0
    if not 0 < interval < float("inf"):
        raise ConfigError(f"{INTERVAL_VARIABLE}={text!r}: expected a positive number of seconds", INTERVAL_VARIABLE)
    return interval


def main() -> None:
    try:
        Pack.from_env(pack_def).run()
    except ConfigError as exc:  # a FLYTE_* variable, or a watch setting the on_start hook refused
        sys.exit(f"Error: {exc}")


if __name__ == "__main__":
    main()
