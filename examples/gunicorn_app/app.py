"""A small WSGI app that also runs a Flyte pack, one per gunicorn worker.

Routes:

* ``/`` — which worker answered, and the state of its pack;
* ``/greetings`` — the greetings this worker's pack made (the app and the pack
  share the process, so the app can read the pack's state, or send events with
  ``current_pack().send_event_nowait(...)``);
* ``/flyte/livez``, ``/flyte/readyz``, ``/flyte/healthz``, ``/flyte/metrics`` — the
  pack's probes and metrics, mounted on the app's own port.

Run it with ``gunicorn -c gunicorn_conf.py app:application`` (see README.md).
"""

import json
import os
from collections.abc import Iterable
from wsgiref.types import StartResponse, WSGIEnvironment

import greeter_pack

from flyte_gevent.gunicorn import current_pack, mount_health


def _json(start_response: StartResponse, document: object, status: str = "200 OK") -> list[bytes]:
    body = json.dumps(document).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def web_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO") or "/"
    if path == "/":
        pack = current_pack()
        return _json(start_response, {
            "worker_pid": os.getpid(),
            "pack": None if pack is None else {"id": pack.pack_id, "registered": pack.registered,
                                               "in_flight": pack.in_flight},
        })
    if path == "/greetings":
        return _json(start_response, {"worker_pid": os.getpid(), "greetings": list(greeter_pack.recent_greetings)})
    return _json(start_response, {"error": "not found"}, "404 Not Found")


application = mount_health(web_app, prefix="/flyte")
