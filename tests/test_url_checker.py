"""examples/url_checker_pack.py through every runner but the CLI's and gunicorn's (tests/test_cli.py and
tests/test_gunicorn.py run it there): the testing kit's ``running_pack``, ``run_handler`` and a plain script.

The URLs it checks and watches are served by tests/web_targets.py on loopback.
"""

import json
import os
import re
import urllib.error
import urllib.request

import gevent
import pytest

from flyte_gevent import ConfigError
from flyte_gevent.testing import run_handler
from helpers import BackgroundProcess
from web_targets import WebTargets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "url_checker_pack.py")


def _load():
    import importlib.util

    spec = importlib.util.spec_from_file_location("examples_url_checker_pack", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


url_checker = _load()
DEAD = "http://127.0.0.1:9/"  # nothing listens on the discard port


@pytest.fixture
def web():
    targets = WebTargets().start()
    yield targets
    targets.stop()


@pytest.fixture
def watching(monkeypatch, web):
    """The watcher looks at /orders every 0.1 s."""
    monkeypatch.setenv("URL_CHECKER_WATCH", web.url("/orders"))
    monkeypatch.setenv("URL_CHECKER_INTERVAL", "0.1")
    web.status["/orders"] = 503
    return web.url("/orders")


# --- the command, as a unit and in a running pack -------------------------------------------------------------


def test_check_url_reports_the_status_of_a_url_that_answers(web):
    result = run_handler(url_checker.pack_def, "checkUrl", {"url": web.url("/down")})
    assert result.name == "UrlChecked"
    assert {k: result.payload[k] for k in ("url", "status", "ok")} == {"url": web.url("/down"), "status": 503,
                                                                       "ok": False}
    assert isinstance(result.payload["elapsed_ms"], (int, float))


def test_check_url_reports_a_url_that_does_not_answer_without_its_credentials():
    result = run_handler(url_checker.pack_def, "checkUrl", {"url": "http://probe:s3cret@127.0.0.1:9/", "timeout_s": 2})
    assert result.name == "UrlUnreachable"
    assert result.payload["url"] == "http://***@127.0.0.1:9/"
    assert "s3cret" not in json.dumps(result.payload) and result.payload["error"]


@pytest.mark.parametrize("input, problem", [
    ({"url": "ftp://example.com/"}, "url: Not a valid URL."),
    ({}, "url: Missing data for required field."),
    ({"url": "http://example.com/", "timeout_s": 0}, ("timeout_s: Must be greater than 0 and less than or equal "
                                                      "to 60.")),
])
def test_check_url_refuses_bad_input_naming_the_field(input, problem):
    result = run_handler(url_checker.pack_def, "checkUrl", input)
    assert (result.name, result.payload) == ("FATAL", f"invalid input for command 'checkUrl':\n{problem}")


def test_a_running_url_checker_answers_check_url_actions(flyte_api, running_pack, web):
    ok = flyte_api.enqueue("UrlChecker", "checkUrl", {"url": web.url("/ok")})
    dead = flyte_api.enqueue("UrlChecker", "checkUrl", {"url": DEAD, "timeout_s": 2})
    running_pack(url_checker.pack_def)
    ok_result, dead_result = flyte_api.wait_for_results([ok, dead])
    assert (ok_result.event, ok_result.payload["status"], ok_result.payload["ok"]) == ("UrlChecked", 200, True)
    assert (dead_result.event, dead_result.payload["url"]) == ("UrlUnreachable", DEAD)


# --- the watcher: a background task, its events and its health check ----------------------------------------------


def test_the_watcher_sends_url_down_and_url_up_and_reports_its_health(flyte_api, running_pack, watching, web):
    pack = running_pack(url_checker.pack_def, health_port=0)
    (down,) = flyte_api.wait_for_events(1, name="UrlDown")
    assert down.payload == {"url": watching, "status": 503, "error": None}
    health = _health(pack.health_port)
    assert health["Watcher"]["healthy"] is True
    assert health["Watcher"]["status"]["down"] == [watching]

    web.status["/orders"] = 200
    (up,) = flyte_api.wait_for_events(1, name="UrlUp")
    assert up.payload == {"url": watching, "status": 200}
    gevent.sleep(0.3)
    assert len(flyte_api.events) == 2  # one event per change, not one per round
    assert _health(pack.health_port)["Watcher"]["status"]["down"] == []


def test_without_urls_to_watch_the_watcher_idles_and_says_so(flyte_api, running_pack, monkeypatch):
    monkeypatch.delenv("URL_CHECKER_WATCH", raising=False)
    pack = running_pack(url_checker.pack_def, health_port=0)
    assert _health(pack.health_port)["Watcher"] == {
        "healthy": True, "status": "nothing to watch (URL_CHECKER_WATCH is empty)"}


@pytest.mark.parametrize("variable, value, message", [
    ("URL_CHECKER_INTERVAL", "soon", "URL_CHECKER_INTERVAL='soon': expected a positive number of seconds"),
    ("URL_CHECKER_WATCH", "http://ok.example/,orders", "URL_CHECKER_WATCH: 'orders' is not an http(s) URL"),
])
def test_a_bad_watch_setting_fails_the_start_naming_the_variable(flyte_api, running_pack, monkeypatch, variable,
                                                                 value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=re.escape(message)):
        running_pack(url_checker.pack_def)


def _health(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


# --- as a script --------------------------------------------------------------------------------------------------


def test_the_url_checker_runs_as_a_script_with_its_hooks(flyte_api, web, python, subprocess_env, tmp_path):
    web.status["/orders"] = 503
    env = dict(subprocess_env, FLYTE_API=flyte_api.url, FLYTE_LABELS="env=script", FLYTE_HEALTH_PORT="0",
               FLYTE_GEVENT_HEALTH_HOST="127.0.0.1", FLYTE_GEVENT_POLLING_INTERVAL="0.5",
               URL_CHECKER_WATCH=web.url("/orders"), URL_CHECKER_INTERVAL="0.2")
    action = flyte_api.enqueue("UrlChecker", "checkUrl", {"url": web.url("/ok")}, labels={"env": "script"})
    child = BackgroundProcess([python, SCRIPT], env, tmp_path / "child")
    try:
        assert flyte_api.wait_for_result(action, timeout=10).payload["status"] == 200
        (down,) = flyte_api.wait_for_events(1, name="UrlDown", timeout=10)
        assert down.pack_id == "UrlChecker.env.script"
        port = re.search(r"health server listening on 127\.0\.0\.1:(\d+)", child.stderr()).group(1)
        assert _health(port)["Watcher"]["status"]["down"] == [web.url("/orders")]
        assert child.terminate(timeout=10) == 0
    finally:
        child.close()
    text = child.stderr()
    assert "Traceback" not in text and "pack 'UrlChecker' stopped" in text
    assert "watcher stopped: 1 URL watched, 1 down" in text, text
