"""The ``flyte-gevent`` command, run as a subprocess against the in-process FakeFlyteApi.

Targets live in tests/cli_targets.py and tests/cli_pack_target.py; the subprocesses run with tests/ as their
working directory, so ``cli_targets:pack_def`` imports the way a pack author's ``mypack:pack_def`` would.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import gevent
import pytest

from flyte_gevent import config
from helpers import BackgroundProcess

TESTS = os.path.dirname(os.path.abspath(__file__))
FLYTE_GEVENT = os.path.join(os.path.dirname(sys.executable), "flyte-gevent")
DEAD_API = "http://127.0.0.1:9"  # nothing listens on the discard port
URL_CHECKER = os.path.join(os.path.dirname(TESTS), "examples", "url_checker_pack.py") + ":pack_def"


@pytest.fixture
def cli_env(subprocess_env):
    env = dict(subprocess_env)
    env.pop("COLUMNS", None)
    return env


def flyte_gevent(*args, env, timeout=10):
    """Run ``flyte-gevent ARGS`` to completion; the CompletedProcess (text output)."""
    return subprocess.run([FLYTE_GEVENT, *args], cwd=TESTS, env=env, capture_output=True, text=True, timeout=timeout)


class Running(BackgroundProcess):
    """``flyte-gevent ARGS`` left running, its output in files, so the test can act while it runs."""

    def __init__(self, args, env, tmp_path, command=(FLYTE_GEVENT,)):
        super().__init__([*command, *args], env, tmp_path, cwd=TESTS)

    def stop(self, timeout=10):
        """SIGTERM, wait, and return ``(returncode, stdout, stderr)``."""
        returncode = self.terminate(timeout)
        return returncode, self.stdout(), self.stderr()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


# -- run -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target, pack_id", [
    ("cli_targets:pack_def", "CliEcho.team.cli"),          # a PackDef
    ("cli_targets:create_pack_def", "CliFactory.team.cli"),  # a factory
])
def test_run_takes_actions_for_each_kind_of_target_and_exits_0_after_sigterm(target, pack_id, flyte_api, cli_env,
                                                                           tmp_path):
    cli_env.update({"FLYTE_API": flyte_api.url, "FLYTE_HEALTH_PORT": "off",
                    "FLYTE_GEVENT_POLLING_INTERVAL": "0.5"})
    action = flyte_api.enqueue(pack_id.split(".")[0], "Echo", {"text": "hi"})
    running = Running(["run", target], cli_env, tmp_path)
    try:
        assert flyte_api.wait_for_pack(pack_id, timeout=10).id == pack_id
        assert flyte_api.wait_for_result(action, timeout=10).payload == {"text": "hi"}
        returncode, _, stderr = running.stop()
        assert returncode == 0, stderr
        assert "stopped" in stderr and "Traceback" not in stderr
    finally:
        running.close()


def test_run_flags_win_over_the_environment(flyte_api, cli_env, tmp_path):
    health_port = _free_port()
    cli_env.update({"FLYTE_API": DEAD_API, "FLYTE_LABELS": "team=env", "FLYTE_HEALTH_PORT": "off",
                    "FLYTE_GEVENT_MAX_IN_FLIGHT": "1", "FLYTE_GEVENT_LOG_LEVEL": "error",
                    "FLYTE_GEVENT_LOG_FORMAT": "text"})
    ids = flyte_api.enqueue_many("CliEcho", "Echo", [{"text": f"t{i}", "sleep_s": 0.6} for i in range(4)])
    running = Running(["run", "cli_targets:pack_def", "--api", flyte_api.url, "--labels", "team=flag",
                       "--health-port", str(health_port), "--max-in-flight", "3", "--log-level", "info",
                       "--log-format", "json", "--polling-interval", "0.5"], cli_env, tmp_path)
    try:
        flyte_api.wait_for_pack("CliEcho.team.flag", timeout=10)        # --api and --labels won
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/livez", timeout=3) as response:
            assert response.status == 200                               # --health-port won over "off"
        most_pending = 0
        deadline = time.monotonic() + 10
        while any(flyte_api.action(i).result is None for i in ids) and time.monotonic() < deadline:
            most_pending = max(most_pending, len(flyte_api.pending()))
            gevent.sleep(0.02)
        assert most_pending == 3                                        # --max-in-flight won over 1
        flyte_api.wait_for_results(ids, timeout=1)
        returncode, _, stderr = running.stop()
    finally:
        running.close()
    assert returncode == 0, stderr

    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]  # --log-format json won
    assert {"INFO", "WARNING"} <= {r["level"] for r in records}                    # --log-level info won
    for i, action_id in enumerate(ids):
        (mine,) = [r for r in records if r["msg"] == f"echoing t{i}"]
        assert mine["logger"] == "cli_targets.echo"
        assert (mine["action_id"], mine["command"], mine["pack"]) == (action_id, "Echo", "CliEcho")
    stopping = next(r for r in records if r["msg"].startswith("stopping pack"))
    assert stopping["action_id"] is None and stopping["command"] is None
    assert set(records[0]) >= {"ts", "level", "logger", "msg", "pack", "action_id", "command"}


def test_a_factory_is_given_the_resolved_settings_and_its_definition_runs_with_them(flyte_api, cli_env, tmp_path):
    cli_env.update({"FLYTE_API": DEAD_API, "FLYTE_JWT": "s3cret-token", "FLYTE_HEALTH_PORT": "9999",
                    "FLYTE_GEVENT_POLLING_INTERVAL": "0.5"})
    flyte_api.accepted_tokens = {"s3cret-token"}
    action = flyte_api.enqueue("CliSettings", "Settings", labels={"team": "flag"})
    running = Running(["run", "cli_targets:create_from_settings", "--api", flyte_api.url, "--labels", "team=flag",
                       "--health-port", "off", "--grace-period", "2"], cli_env, tmp_path)
    try:
        flyte_api.wait_for_pack("CliSettings.team.flag", timeout=10)
        payload = flyte_api.wait_for_result(action, timeout=10).payload
        returncode, _, stderr = running.stop()
    finally:
        running.close()
    assert returncode == 0, stderr
    shown = payload.pop("repr")
    assert payload == {"labels": {"team": "flag"}, "health_port": None, "api": flyte_api.url, "grace_period": 2}
    assert "s3cret-token" not in shown and "'jwt': '<redacted>'" in shown and "'labels': {'team': 'flag'}" in shown


@pytest.mark.parametrize("target, args", [
    ("cli_pack_target:pack", []),
    ("cli_pack_target:pack", ["--health-port", "0", "--grace-period", "1"]),
    ("cli_targets:create_ready_pack", ["--api", DEAD_API]),
    ("cli_pack_target:pack", ["--print-config"]),
])
def test_a_ready_made_pack_is_refused_with_how_to_declare_it_on_the_definition(target, args, cli_env):
    cli_env.update({"FLYTE_API": DEAD_API, "FLYTE_HEALTH_PORT": "off"})
    result = flyte_gevent("run", target, *args, env=cli_env)
    assert result.returncode == 78, result.stderr
    line = _one_error_line(result)
    assert f"target {target!r} is a ready-made Pack" in line or f"target {target!r} returned a ready-made Pack" in line
    for hint in ("builds the Pack itself", "a PackDef", "@pack_def.health_check", "@pack_def.background",
                 "@pack_def.on_start", "@pack_def.on_stop"):
        assert hint in line, line
    assert result.stdout == ""


def test_a_module_that_builds_its_pack_on_import_is_named_when_that_fails(cli_env):
    result = flyte_gevent("run", "cli_pack_target:pack", "--api", DEAD_API, env=cli_env)
    assert result.returncode == 78, result.stderr
    line = _one_error_line(result)
    assert "target 'cli_pack_target:pack': importing 'cli_pack_target' raised: FLYTE_API or FLYTE_API_URL is not " \
           "set" in line
    assert "export its PackDef" in line


def test_the_url_checker_runs_with_its_hooks_and_every_flag_applies(flyte_api, cli_env, tmp_path):
    from web_targets import WebTargets

    web = WebTargets().start()
    web.status["/orders"] = 503
    health_port = _free_port()
    cli_env.update({"FLYTE_API": DEAD_API, "FLYTE_HEALTH_PORT": "off", "URL_CHECKER_WATCH": web.url("/orders"),
                    "URL_CHECKER_INTERVAL": "0.2"})
    action = flyte_api.enqueue("UrlChecker", "checkUrl", {"url": web.url("/ok")}, labels={"env": "cli"})
    running = Running(["run", URL_CHECKER, "--api", flyte_api.url, "--labels", "env=cli", "--health-port",
                       str(health_port), "--health-host", "127.0.0.1", "--polling-interval", "0.5",
                       "--log-format", "json"], cli_env, tmp_path)
    try:
        assert flyte_api.wait_for_pack("UrlChecker.env.cli", timeout=10)              # --api, --labels
        assert flyte_api.wait_for_result(action, timeout=10).payload["status"] == 200  # the command
        (down,) = flyte_api.wait_for_events(1, name="UrlDown", timeout=10)            # the background task
        assert (down.pack_id, down.payload["url"]) == ("UrlChecker.env.cli", web.url("/orders"))
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/", timeout=3) as response:  # --health-port
            checks = json.loads(response.read())
        assert checks["Watcher"]["healthy"] and checks["Watcher"]["status"]["down"] == [web.url("/orders")]
        returncode, _, stderr = running.stop()
    finally:
        running.close()
        web.stop()
    assert returncode == 0, stderr
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]     # --log-format
    assert any(r["msg"] == "watcher stopped: 1 URL watched, 1 down" for r in records)
    assert not any(r["level"] == "ERROR" for r in records), stderr


def test_an_on_start_hook_that_raises_exits_1_with_its_traceback_once(flyte_api, cli_env):
    cli_env.update({"FLYTE_API": flyte_api.url, "FLYTE_HEALTH_PORT": "off"})
    result = flyte_gevent("run", "cli_targets:failing_start", env=cli_env)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("Traceback") == 1 and 'raise RuntimeError("cache warm-up failed")' in result.stderr
    assert "on_start hook 'warm_cache' failed: RuntimeError: cache warm-up failed; stopping the pack" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "Error: unexpected RuntimeError: cache warm-up failed"
    assert flyte_api.packs["CliFailingStart"].registrations == 1 and flyte_api.requests_for("take") == []


def test_a_setting_an_on_start_hook_refuses_exits_78_with_its_one_line(flyte_api, cli_env):
    cli_env.update({"FLYTE_API": flyte_api.url, "FLYTE_HEALTH_PORT": "off", "URL_CHECKER_INTERVAL": "soon"})
    result = flyte_gevent("run", URL_CHECKER, env=cli_env)
    assert result.returncode == 78, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("Error: URL_CHECKER_INTERVAL='soon': expected a positive "
                                                      "number of seconds")


def test_print_config_also_names_the_hooks_the_definition_declares(cli_env):
    result = flyte_gevent("run", URL_CHECKER, "--print-config", "--api", "http://flyte:8080", env=cli_env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "api = 'http://flyte:8080'" in lines
    assert {"pack = 'UrlChecker'", "on_start = ['open_watcher']", "on_stop = ['close_watcher']",
            "background = ['watch']", "health_checks = ['watcher_health']"} <= set(lines)


def test_print_config_shows_flags_over_environment_and_redacts_the_token(cli_env):
    cli_env.update({"FLYTE_API": DEAD_API, "FLYTE_HEALTH_PORT": "9999", "FLYTE_JWT": "s3cret-token",
                    "FLYTE_GEVENT_MAX_IN_FLIGHT": "7"})
    result = flyte_gevent("run", "cli_targets:pack_def", "--print-config", "--api", "http://flyte:8080",
                          "--health-port", "off", env=cli_env)
    assert result.returncode == 0, result.stderr
    lines = set(result.stdout.splitlines())
    assert {"api = 'http://flyte:8080'", "health_port = None", "max_in_flight = 7", "jwt = '<redacted>'"} <= lines
    assert "s3cret-token" not in result.stdout + result.stderr


@pytest.mark.parametrize("where", ["flag", "environment"])
def test_print_config_redacts_credentials_in_the_api_url(where, cli_env):
    url = "https://flyte-user:pa55w0rd@flyte.example:8443/base"
    args = ["run", "cli_targets:pack_def", "--print-config"]
    if where == "flag":
        args += ["--api", url]
    else:
        cli_env["FLYTE_API_URL"] = url
    cli_env["FLYTE_JWT"] = "s3cret-token"
    result = flyte_gevent(*args, env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "api = 'https://***@flyte.example:8443/base'" in result.stdout.splitlines()
    for secret in ("pa55w0rd", "flyte-user", "s3cret-token"):
        assert secret not in result.stdout + result.stderr


# -- configuration errors and crashes ---------------------------------------------------------------------------


@pytest.mark.parametrize("args, environ, names", [
    (["run", "cli_targets:pack_def"], {}, "FLYTE_API or FLYTE_API_URL is not set"),
    (["run", "cli_targets:pack_def"], {"FLYTE_API": DEAD_API, "FLYTE_LABELS": "team"},
     "FLYTE_LABELS='team': item 1 ('team') is not key=value"),
    (["run", "cli_targets:pack_def", "--max-in-flight", "0"], {"FLYTE_API": DEAD_API},
     "--max-in-flight='0': expected a whole number of at least 1"),
    (["run", "no_such_module:pack_def"], {"FLYTE_API": DEAD_API},
     "target 'no_such_module:pack_def': cannot import 'no_such_module'"),
    (["run", "cli_targets:nothing_here"], {"FLYTE_API": DEAD_API}, "has no attribute nothing_here"),
    (["run", "cli_targets:not_a_pack"], {"FLYTE_API": DEAD_API}, "the target is a int"),
    (["run", "cli_targets:bad_pack_def"], {"FLYTE_API": DEAD_API}, "invalid pack definition 'bad name'"),
    (["check", "cli_targets:bad_pack_def"], {}, "invalid pack definition 'bad name'"),
])
def test_configuration_errors_exit_78_with_one_line_naming_the_problem(args, environ, names, cli_env):
    cli_env.update(environ)
    result = flyte_gevent(*args, env=cli_env)
    assert result.returncode == 78, result.stderr
    assert names in _one_error_line(result)
    assert result.stdout == ""


def test_a_health_port_in_use_exits_78_with_one_line_naming_the_setting_and_the_port(cli_env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cli_env.update({"FLYTE_API": DEAD_API, "FLYTE_GEVENT_HEALTH_HOST": "127.0.0.1"})
        result = flyte_gevent("run", "cli_targets:pack_def", "--health-port", str(port), env=cli_env)
    assert result.returncode == 78, result.stderr
    line = _one_error_line(result)
    for name in (str(port), "FLYTE_HEALTH_PORT", "--health-port", "health_port", "already in use"):
        assert name in line, line
    assert result.stdout == ""


def test_an_unexpected_error_exits_1_with_one_line(cli_env):
    cli_env["FLYTE_API"] = DEAD_API
    result = flyte_gevent("run", "cli_targets:broken_factory", env=cli_env)
    assert result.returncode == 1
    assert _one_error_line(result) == "Error: unexpected RuntimeError: the database is on fire"


def test_sigterm_while_the_api_is_unreachable_still_exits_0(cli_env, tmp_path):
    cli_env.update({"FLYTE_API": DEAD_API, "FLYTE_HEALTH_PORT": "off"})
    running = Running(["run", "cli_targets:pack_def"], cli_env, tmp_path)
    try:
        deadline = time.monotonic() + 10
        while "cannot register" not in running.stderr() and time.monotonic() < deadline:
            gevent.sleep(0.05)
        returncode, _, stderr = running.stop()
    finally:
        running.close()
    assert returncode == 0, stderr
    assert "cannot register" in stderr and "stopped" in stderr


# -- check, python -m, help -------------------------------------------------------------------------------------


def test_check_prints_the_registration_json_with_labels_merged(cli_env):
    cli_env["FLYTE_LABELS"] = "env=ignored"
    result = flyte_gevent("check", "cli_targets:pack_def", "--labels", "env=dev", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "name": "CliEcho",
        "labels": {"team": "cli", "env": "dev"},
        "events": [{"name": "Echoed"}],
        "commands": [{"name": "Echo", "events": ["Echoed"]}],
    }
    assert result.stderr.strip() == "pack id: CliEcho.env.dev.team.cli"


def test_check_gives_a_factory_the_settings_without_needing_the_api_and_refuses_a_ready_made_pack(cli_env):
    result = flyte_gevent("check", "cli_targets:create_from_settings", "--labels", "team=x", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["labels"] == {"team": "x"}
    assert result.stderr.strip() == "pack id: CliSettings.team.x"

    cli_env["FLYTE_API"] = DEAD_API  # read by the module's own Pack.from_env()
    refused = flyte_gevent("check", "cli_pack_target:pack", env=cli_env)
    assert refused.returncode == 78 and "is a ready-made Pack" in _one_error_line(refused)


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["check", "cli_targets:pack_def"]])
def test_python_dash_m_is_the_same_command(args, cli_env):
    script = flyte_gevent(*args, env=cli_env)
    module = subprocess.run([sys.executable, "-m", "flyte_gevent", *args], cwd=TESTS, env=cli_env,
                            capture_output=True, text=True, timeout=10)
    assert script.returncode == module.returncode == 0
    assert (script.stdout, script.stderr) == (module.stdout, module.stderr)
    assert script.stdout


def _subparsers():
    from flyte_gevent import cli

    parser = cli._parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    return parser, commands.choices


@pytest.mark.parametrize("command", ["run", "check", "demo", "fake-api"])
def test_help_of_each_command_explains_every_option_and_fits_80_columns(command, monkeypatch, capsys):
    from flyte_gevent import cli

    monkeypatch.setenv("COLUMNS", "80")
    _, commands = _subparsers()
    for action in commands[command]._actions:
        assert action.help, f"{command}: {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: flyte-gevent {command}")
    assert max(map(len, text.splitlines())) <= 80
    if command == "run":
        for setting in config.SETTINGS:
            if setting.flag is not None:
                assert setting.flag in text and setting.env[0] in text, setting.name
        assert "exit codes:" in text and "78" in text


def test_top_level_help_lists_the_commands_examples_and_exit_codes(monkeypatch, capsys):
    from flyte_gevent import cli

    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for command in ("run", "check", "demo", "fake-api"):
        assert f"    {command} " in text
    assert "flyte-gevent run mypack:pack_def" in text
    for code in ("0", "1", "2", "69", "78"):
        assert f"\n  {code} " in text
    assert max(map(len, text.splitlines())) <= 80
