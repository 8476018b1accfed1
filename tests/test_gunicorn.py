"""flyte_gevent.gunicorn: a pack in each worker of a real ``gunicorn -k gevent``, beside the example web app.

The gunicorn tests run examples/gunicorn_app in a subprocess against the in-process FakeFlyteApi: the workers
serve HTTP while they take actions, the pack's probes answer on the app's port, and SIGTERM drains every worker
without stranding an action.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request

import gevent
import pytest

from flyte_gevent import gunicorn as hooks
from flyte_gevent.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP_DIR = os.path.join(ROOT, "examples", "gunicorn_app")
GUNICORN = os.path.join(os.path.dirname(sys.executable), "gunicorn")
PACK_ID = "Greeter.app.gunicorn-example"
URL_CHECKER = os.path.join(ROOT, "examples", "url_checker_pack.py") + ":pack_def"

needs_gunicorn = pytest.mark.skipif(not os.path.exists(GUNICORN), reason="gunicorn is not installed next to python")


def _get(url, timeout=3.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _wait_until(check, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        gevent.sleep(0.05)


class Gunicorn:
    """``gunicorn -c gunicorn_conf.py app:application`` in examples/gunicorn_app, output in a file."""

    def __init__(self, env, log_path, *extra):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [GUNICORN, "-c", "gunicorn_conf.py", "--bind", "127.0.0.1:0", "--no-control-socket", *extra,
             "app:application"],
            cwd=APP_DIR, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.url = None

    def output(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_listening(self, timeout=10.0):
        def listening():
            match = re.search(r"Listening at: (http://127\.0\.0\.1:\d+)", self.output())
            if match is None and self.process.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.process.returncode}:\n{self.output()}")
            return match
        self.url = _wait_until(listening, timeout, "gunicorn is not listening").group(1)
        return self.url

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)
        self._log.close()


@pytest.fixture
def gunicorn_env(subprocess_env, flyte_api):
    env = dict(subprocess_env)
    env.update({"FLYTE_API": flyte_api.url, "FLYTE_GEVENT_POLLING_INTERVAL": "0.5"})
    return env


@needs_gunicorn
def test_gunicorn_workers_serve_http_take_actions_and_drain_on_sigterm(flyte_api, gunicorn_env, tmp_path):
    server = Gunicorn(gunicorn_env, tmp_path / "gunicorn.log", "--workers", "2", "--graceful-timeout", "10")
    try:
        url = server.wait_listening()
        # Each worker runs its own pack: two registrations of one pack id.
        _wait_until(lambda: PACK_ID in flyte_api.packs and flyte_api.packs[PACK_ID].registrations >= 2, 10,
                    "both workers did not register")
        status, page = _get(url + "/")
        assert status == 200 and page["pack"]["id"] == PACK_ID
        _wait_until(lambda: _get(url + "/flyte/readyz")[0] == 200, 5, "/flyte/readyz never answered 200")
        assert _get(url + "/flyte/livez") == (200, {"status": "ok", "reason": "alive"})

        ids = flyte_api.enqueue_many("Greeter", "Greet", [{"name": f"n{i}"} for i in range(6)])
        results = flyte_api.wait_for_results(ids, timeout=10)
        assert {r.event for r in results} == {"Greeted"}
        assert sorted(r.payload["greeting"] for r in results) == sorted(f"Hello, n{i}!" for i in range(6))
        bad = flyte_api.wait_for_result(flyte_api.enqueue("Greeter", "Greet", {"delay_s": -1}), timeout=10)
        assert bad.event == "FATAL"
        assert bad.payload.splitlines()[0] == "invalid input for command 'Greet':"
        assert sorted(bad.payload.splitlines()[1:]) == [
            "delay_s: Must be greater than or equal to 0 and less than or equal to 30.",
            "name: Missing data for required field."]

        slow = flyte_api.enqueue("Greeter", "Greet", {"name": "Slow", "delay_s": 1.5})
        _wait_until(lambda: flyte_api.action(slow).state == "PENDING", 10, "the slow action was not taken")
        started = time.monotonic()
        assert _get(url + "/")[0] == 200  # the worker running the action still serves HTTP
        assert time.monotonic() - started < 1.0

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=15) == 0
        # The action in flight at SIGTERM finished within the grace period; nothing is left PENDING.
        assert flyte_api.action(slow).result["event"] == "Greeted"
        assert flyte_api.action(slow).result["payload"]["greeting"] == "Hello, Slow!"
        assert flyte_api.pending() == [] and flyte_api.new() == []
        output = server.output()
        assert output.count("draining pack 'Greeter'") == 2
        assert "Traceback" not in output and "MonkeyPatchWarning" not in output
        # configure() in the example's config puts the action id on the handler's own log lines.
        assert re.search(r"INFO greeter \[action=\w+ command=Greet\]: greeted Slow", output)
    finally:
        server.close()


@needs_gunicorn
def test_gunicorn_stops_with_the_error_when_flyte_pack_cannot_be_imported(flyte_api, gunicorn_env, tmp_path):
    gunicorn_env["FLYTE_PACK"] = "no_such_module:pack_def"
    server = Gunicorn(gunicorn_env, tmp_path / "gunicorn.log", "--workers", "1")
    try:
        returncode = server.process.wait(timeout=15)
        assert returncode != 0
        assert "FLYTE_PACK 'no_such_module:pack_def': cannot import 'no_such_module'" in server.output()
        assert flyte_api.packs == {}
    finally:
        server.close()


def test_mounted_health_app_answers_503_while_no_pack_runs_in_the_worker():
    def web_app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"web"]

    app = hooks.mount_health(web_app, prefix="/flyte")
    seen = {}

    def start_response(status, headers):
        seen["status"] = status

    body = b"".join(app({"PATH_INFO": "/flyte/readyz", "REQUEST_METHOD": "GET"}, start_response))
    assert seen["status"].startswith("503") and "post_worker_init" in json.loads(body)["reason"]
    assert b"".join(app({"PATH_INFO": "/other", "REQUEST_METHOD": "GET"}, start_response)) == b"web"
    assert seen["status"] == "200 OK"
    assert hooks.current_pack() is None


def test_load_pack_turns_the_health_server_off_unless_flyte_health_port_is_set():
    base = {"FLYTE_PACK": os.path.join(APP_DIR, "greeter_pack.py") + ":pack_def", "FLYTE_API": "http://flyte:8080"}
    pack = hooks.load_pack(base)
    assert pack._health_server is None and pack.pack_def.id == PACK_ID
    assert hooks.load_pack(dict(base, FLYTE_HEALTH_PORT="0"))._health_server is not None
    with pytest.raises(ConfigError, match="FLYTE_PACK is not set"):
        hooks.load_pack({"FLYTE_API": "http://flyte:8080"})


@pytest.mark.parametrize("graceful_timeout, timeout, expected", [
    # gunicorn's defaults: 27 s to share; 9 s kept for a request still in flight at the flush deadline to get
    # its answer (the client's 10 s timeout, at most a third), the rest split between flush and grace
    (30, 30, (9.0, 9.0)),
    (120, 30, (9.0, 9.0)),      # a restart on max_requests is bound by the heartbeat timeout
    (120, 0, (30.0, 10.0)),     # timeout 0 disables it: the pack's own periods and the 10 s for requests fit
    (60, 0, (30.0, 10.0)),      # 57 s: 30 + 10 + 10 fit
    (5, 30, (2 / 3, 2 / 3)),    # a short graceful_timeout is shared in thirds
])
def test_shutdown_budget_fits_the_drain_into_gunicorns_deadline(graceful_timeout, timeout, expected):
    # After the flush deadline the pack still gives each request in flight up to the client's timeout (a take
    # may have claimed an action): the budget keeps room for that, or gunicorn kills the worker mid-request.
    pack = types.SimpleNamespace(grace_period=30.0, flush_timeout=10.0, client=types.SimpleNamespace(timeout=10.0))
    cfg = types.SimpleNamespace(graceful_timeout=graceful_timeout, timeout=timeout)
    assert hooks.shutdown_budget(pack, cfg) == pytest.approx(expected)


@needs_gunicorn
def test_gunicorn_runs_the_url_checker_with_its_hooks_in_every_worker_and_binds_no_health_port(
        flyte_api, gunicorn_env, tmp_path):
    from web_targets import WebTargets

    web = WebTargets().start()
    web.status["/orders"] = 503
    gunicorn_env.update({"FLYTE_PACK": URL_CHECKER, "FLYTE_LABELS": "env=gunicorn",
                         "URL_CHECKER_WATCH": web.url("/orders"), "URL_CHECKER_INTERVAL": "0.2"})
    server = Gunicorn(gunicorn_env, tmp_path / "gunicorn.log", "--workers", "2", "--graceful-timeout", "10")
    try:
        url = server.wait_listening()
        _wait_until(lambda: "UrlChecker.env.gunicorn" in flyte_api.packs
                    and flyte_api.packs["UrlChecker.env.gunicorn"].registrations >= 2, 10,
                    "both workers did not register")
        # Each worker's own watcher reports the URL once: two workers, two events.
        downs = flyte_api.wait_for_events(2, name="UrlDown", timeout=10)
        assert {e.payload["url"] for e in downs} == {web.url("/orders")}
        status, checks = _get(url + "/flyte/healthz")
        assert status == 200 and checks["Watcher"]["status"]["down"] == [web.url("/orders")]
        _wait_until(lambda: _get(url + "/flyte/readyz")[0] == 200, 5, "/flyte/readyz never answered 200")
        action = flyte_api.enqueue("UrlChecker", "checkUrl", {"url": web.url("/ok")}, labels={"env": "gunicorn"})
        assert flyte_api.wait_for_result(action, timeout=10).payload["status"] == 200
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=15) == 0
    finally:
        server.close()
        web.stop()
    output = server.output()
    assert "Address already in use" not in output and "health server listening" not in output
    assert output.count("watcher stopped: 1 URL watched, 1 down") == 2  # on_stop ran in both workers
    assert "Traceback" not in output


def test_load_pack_refuses_a_ready_made_pack_naming_flyte_pack_and_the_hooks_to_use(tmp_path, monkeypatch):
    module = tmp_path / "ready_pack.py"
    module.write_text("from flyte_gevent import Pack, PackDef\n"
                      "pack_def = PackDef('Ready')\n"
                      "pack = Pack.from_env(pack_def)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FLYTE_API", "http://flyte:8080")  # read by the module's own Pack.from_env()
    with pytest.raises(ConfigError) as caught:
        hooks.load_pack({"FLYTE_PACK": f"{module}:pack", "FLYTE_API": "http://flyte:8080"})
    message = str(caught.value)
    assert message.startswith(f"FLYTE_PACK '{module}:pack' is a ready-made Pack")
    assert f"point FLYTE_PACK at {module}:pack_def" in message
    assert "@pack_def.background" in message and caught.value.name == "FLYTE_PACK"


def test_load_pack_gives_a_factory_the_workers_settings(tmp_path, monkeypatch):
    module = tmp_path / "factory_pack.py"
    module.write_text("from flyte_gevent import PackDef\n"
                      "seen = []\n"
                      "def create_pack(settings):\n"
                      "    seen.append(dict(settings))\n"
                      "    return PackDef('Made', labels={'port': str(settings['health_port'])})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pack = hooks.load_pack({"FLYTE_PACK": f"{module}", "FLYTE_API": "http://flyte:8080", "FLYTE_LABELS": "w=1"})
    assert pack.pack_def.id == "Made.port.None.w.1" and pack.health_port is None
    import factory_pack

    (settings,) = factory_pack.seen
    assert (settings["health_port"], settings["api"], settings["labels"]) == (None, "http://flyte:8080", {"w": "1"})
