"""A tiny web server on loopback for the url-checker tests: each path answers the status it was given.

``WebTargets().status["/orders"] = 503`` makes ``/orders`` answer 503 from then on; unknown paths answer 404.
It runs in the test's gevent hub, like the fake Flyte API.
"""

import json

from gevent.pywsgi import WSGIServer


class WebTargets:
    """Loopback HTTP server whose paths answer the statuses in :attr:`status`."""

    def __init__(self):
        self.status = {"/ok": 200, "/down": 503}
        self.requests = []
        self._server = WSGIServer(("127.0.0.1", 0), self._app, log=None, error_log=None)

    def start(self):
        self._server.start()
        return self

    def stop(self):
        self._server.stop(timeout=1)

    def url(self, path):
        return f"http://127.0.0.1:{self._server.server_port}{path}"

    def _app(self, environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        self.requests.append(path)
        status = self.status.get(path, 404)
        body = json.dumps({"path": path}).encode()
        start_response(f"{status} Status", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
