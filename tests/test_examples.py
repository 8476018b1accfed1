"""The example packs (examples/*.py) and ``flyte-gevent demo`` against the fake Flyte API.

The shell pack must behave exactly as flyte-api.md Part 5.1 specifies (a port of
ExpediaGroup/flyte-shell), the ticker as Part 5.2. Example modules are loaded from
their files with importlib; they only monkey-patch when run as __main__.
"""

import datetime
import importlib.util
import itertools
import os
import signal
import subprocess
import time

import gevent
import pytest

from flyte_gevent import Client, ConfigError, Pack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SHELL_HELP = "https://github.com/ExpediaGroup/flyte-shell/blob/master/README.md"
TICKER_HELP = "https://github.com/ExpediaGroup/flyte-ticker/blob/master/README.md"


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shell = load_example("shell_pack")
ticker = load_example("ticker_pack")
jira = load_example("jira_pack")


@pytest.fixture
def start_pack(flyte_api):
    """Start a pack against the fake, configured the way the example's main() does; stopped after the test."""
    packs = []

    def start(pack_def, labels="", **options):
        environ = {"FLYTE_API_URL": flyte_api.url, "FLYTE_LABELS": labels, "FLYTE_HEALTH_PORT": "off"}
        pack = Pack.from_env(pack_def, environ=environ, polling_interval=0.5, grace_period=0.5, flush_timeout=1.0,
                             **options)
        packs.append(pack)
        pack.start()
        return pack

    yield start
    for pack in packs:
        pack.stop(grace_period=0)


def run_shell(flyte_api, start_pack, *scripts, pack_def=shell.pack_def):
    """Queue Shell actions (queued first, so the first take finds them), start the pack, return the results."""
    ids = [flyte_api.enqueue("Shell", "Shell", script, labels={"ABC": "123"}) for script in scripts]
    start_pack(pack_def, labels="ABC=123")
    results = flyte_api.wait_for_results(ids, timeout=5)
    assert [r.event for r in results] == ["Output"] * len(scripts)
    return [r.payload for r in results]


def pack_process(python, env, script):
    return subprocess.Popen([python, os.path.join(EXAMPLES, script)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_process(process, timeout=10):
    """SIGTERM, then the exit code and output; killed if it does not exit in time."""
    try:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=timeout)
        return process.returncode, stdout, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def process_gone(pid):
    """True when *pid* has exited (a zombie counts as exited: no one may be left to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# --- shell_pack.py --------------------------------------------------------------------------------------------


def test_shell_pack_registers_exactly_like_flyte_shell(flyte_api, start_pack):
    pack = start_pack(shell.pack_def, labels="ABC=123")
    assert pack.pack_id == "Shell.ABC.123"
    assert flyte_api.packs["Shell.ABC.123"].body == {
        "name": "Shell",
        "labels": {"ABC": "123"},
        "events": [{"name": "Output"}],
        "commands": [{"name": "Shell", "events": ["Output"]}],
        "links": [{"href": SHELL_HELP, "rel": "help"}],
    }


def test_shell_pack_without_labels_has_no_labels_key(flyte_api, start_pack):
    pack = start_pack(shell.pack_def)
    assert pack.pack_id == "Shell"
    assert "labels" not in flyte_api.packs["Shell"].body


SHELL_CASES = {
    "sorted-output": ("echo -e 'world\\nhello' | sort", {"stdout": "hello\nworld\n", "stderr": "", "exit_code": 0}),
    "json-newline-in-script": ("echo -e 'world\nhello' | sort",
                               {"stdout": "hello\nworld\n", "stderr": "", "exit_code": 0}),
    "not-trimmed": ("echo hi; printf '  padded  '", {"stdout": "hi\n  padded  ", "stderr": "", "exit_code": 0}),
    "non-zero-exit": ("exit 3", {"stdout": "", "stderr": "", "exit_code": 3}),
    "stderr-separate": ("echo out; echo err >&2; exit 2", {"stdout": "out\n", "stderr": "err\n", "exit_code": 2}),
    "killed-by-signal": ("echo before; kill -9 $$", {"stdout": "before\n", "stderr": "", "exit_code": -1}),
    "object-input": ({"script": "echo hi"}, {"stdout": "", "exit_code": 1,
                                             "stderr": "json: cannot unmarshal object into Go value of type string"}),
    "number-input": (42, {"stdout": "", "exit_code": 1,
                          "stderr": "json: cannot unmarshal number into Go value of type string"}),
    "empty-script": ("", {"stdout": "", "stderr": "No script supplied to handler", "exit_code": 1}),
    "null-script": (None, {"stdout": "", "stderr": "No script supplied to handler", "exit_code": 1}),
}


@pytest.mark.parametrize("script, output", SHELL_CASES.values(), ids=SHELL_CASES.keys())
def test_shell_command_output(flyte_api, start_pack, script, output):
    assert run_shell(flyte_api, start_pack, script) == [output]


def test_shell_scripts_do_not_see_secrets(flyte_api, start_pack, monkeypatch):
    secrets = {"FLYTE_JWT": "jwt-value-1", "GITHUB_TOKEN": "token-value-2", "DB_SECRET": "secret-value-3",
               "MYSQL_PASSWORD": "password-value-4", "api_token": "token-value-5", "API_KEY": "key-value-6",
               "DB_PASS": "pass-value-7", "aws_secret_access_key": "key-value-8", "FLYTE_JWT_FILE": "/run/jwt",
               "Flyte_Jwt_Extra": "jwt-value-9", "ssh_passphrase": "pass-value-10", "GPG_KEYID": "key-value-11"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PLAIN_SETTING", "visible")

    [output] = run_shell(flyte_api, start_pack, "env")
    assert output["exit_code"] == 0
    assert "PLAIN_SETTING=visible\n" in output["stdout"]
    for name, value in secrets.items():
        assert name not in output["stdout"] and value not in output["stdout"]


def test_shell_timeout_kills_the_script_and_ends_like_coreutils_timeout(flyte_api, start_pack):
    started = time.monotonic()
    [output] = run_shell(flyte_api, start_pack, "sleep 30 & echo $!; echo started >&2; wait",
                         pack_def=shell.make_pack_def(timeout=0.3))
    assert time.monotonic() - started < 3
    background_pid = int(output["stdout"])
    assert output == {"stdout": f"{background_pid}\n", "stderr": "started\ntimeout after 0.3 s", "exit_code": 124}
    deadline = time.monotonic() + 2
    while not process_gone(background_pid) and time.monotonic() < deadline:
        gevent.sleep(0.05)
    assert process_gone(background_pid)  # the whole process group, not just bash


def test_shell_timeout_bounds_a_script_whose_child_leaves_its_session_holding_the_pipes(flyte_api, start_pack):
    started = time.monotonic()
    script = "setsid sleep 12 & echo $!; echo started >&2; sleep 30"
    action = flyte_api.enqueue("Shell", "Shell", script, labels={"ABC": "123"})
    start_pack(shell.make_pack_def(timeout=0.5), labels="ABC=123")
    result = flyte_api.wait_for_result(action, timeout=5)
    elapsed = time.monotonic() - started
    escaped_pid = int(result.payload["stdout"])
    try:
        assert elapsed < 3  # the timeout plus a small margin, not the 12 s the escaped child holds the pipes
        assert (result.event, result.payload) == (
            "Output", {"stdout": f"{escaped_pid}\n", "stderr": "started\ntimeout after 0.5 s", "exit_code": 124})
    finally:
        try:
            os.kill(escaped_pid, signal.SIGKILL)  # out of the script's session: ours to clean up
        except ProcessLookupError:
            pass


def test_a_script_cut_short_by_the_action_timeout_is_killed_with_its_process_group(flyte_api, start_pack,
                                                                                   tmp_path):
    pid_file = tmp_path / "pid"
    action = flyte_api.enqueue("Shell", "Shell", f"sleep 30 & echo $! > {pid_file}; wait", labels={"ABC": "123"})
    start_pack(shell.pack_def, labels="ABC=123", action_timeout=0.3)
    result = flyte_api.wait_for_result(action, timeout=3)
    assert (result.event, result.payload) == ("FATAL", "timed out after 0.3 s")
    background_pid = int(pid_file.read_text())
    deadline = time.monotonic() + 2
    while not process_gone(background_pid) and time.monotonic() < deadline:
        gevent.sleep(0.05)
    assert process_gone(background_pid)


def test_without_a_timeout_output_of_a_background_child_is_waited_for_like_flyte_shell(flyte_api, start_pack):
    [output] = run_shell(flyte_api, start_pack, "(sleep 0.2; echo late) & echo early")
    assert output == {"stdout": "early\nlate\n", "stderr": "", "exit_code": 0}


def test_shell_output_larger_than_a_pipe_buffer_is_kept_whole(flyte_api, start_pack):
    [output] = run_shell(flyte_api, start_pack, "head -c 300000 /dev/zero | tr '\\0' a; echo done >&2",
                         pack_def=shell.make_pack_def(timeout=5))
    assert output == {"stdout": "a" * 300_000, "stderr": "done\n", "exit_code": 0}


@pytest.mark.parametrize("text, seconds", [(None, None), ("", None), ("0", None), ("2.5", 2.5), (" 10 ", 10.0)])
def test_shell_timeout_setting_is_off_unless_positive(monkeypatch, text, seconds):
    if text is None:
        monkeypatch.delenv("SHELL_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("SHELL_TIMEOUT", text)
    assert shell._timeout_from_env() == seconds


def test_shell_timeout_setting_that_is_not_a_number_names_the_variable(monkeypatch):
    monkeypatch.setenv("SHELL_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="SHELL_TIMEOUT='soon'"):
        shell._timeout_from_env()


def test_shell_pack_main_runs_from_the_environment_and_stops_on_sigterm(flyte_api, python, subprocess_env):
    script_id = flyte_api.enqueue("Shell", "Shell", "echo started; sleep 5", labels={"ABC": "123"})
    env = dict(subprocess_env, FLYTE_API_URL=flyte_api.url, FLYTE_LABELS="ABC=123", SHELL_TIMEOUT="0.3",
               FLYTE_HEALTH_PORT="0", FLYTE_GEVENT_POLLING_INTERVAL="0.5")
    process = pack_process(python, env, "shell_pack.py")
    try:
        flyte_api.wait_for_pack("Shell.ABC.123", timeout=15)
        result = flyte_api.wait_for_result(script_id, timeout=10)
        assert (result.event, result.payload) == (
            "Output", {"stdout": "started\n", "stderr": "timeout after 0.3 s", "exit_code": 124})
    finally:
        returncode, _stdout, stderr = stop_process(process)
    assert returncode == 0, stderr


def test_shell_pack_main_without_api_url_exits_with_go_message(python, subprocess_env):
    process = pack_process(python, subprocess_env, "shell_pack.py")
    try:
        _stdout, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode != 0
    assert "FLYTE_API_URL env. variable is not set" in stderr


# --- ticker_pack.py ---------------------------------------------------------------------------------------------


def test_ticker_registers_without_commands_never_takes_and_sends_utc_ticks(flyte_api):
    # The ticking is declared on the definition, so any runner that builds a Pack from it ticks.
    pack = Pack(ticker.make_pack_def(interval=0.2), Client(flyte_api.url), health_port=None, flush_timeout=1.0)
    try:
        pack.start()
        ticks = flyte_api.wait_for_events(3, name="Tick", timeout=3)
    finally:
        pack.stop(grace_period=0)

    body = flyte_api.packs["Ticker"].body
    assert (body["name"], body["events"], body["links"]) == ("Ticker", [{"name": "Tick"}],
                                                             [{"href": TICKER_HELP, "rel": "help"}])
    assert not body.get("commands") and "labels" not in body
    assert flyte_api.requests_for("take") == []

    now = datetime.datetime.now(datetime.UTC)
    times = []
    for event in ticks:
        assert (event.pack_id, list(event.payload)) == ("Ticker", ["time"])
        text = event.payload["time"]
        assert text.endswith("Z")
        moment = datetime.datetime.fromisoformat(text)
        assert moment.utcoffset() == datetime.timedelta(0)
        assert abs((now - moment).total_seconds()) < 5
        times.append(moment)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert all(0 < gap < 1.0 for gap in gaps), gaps  # one tick per interval, in order


def test_the_ticker_ticks_under_the_cli_too(flyte_api, python, subprocess_env):
    env = dict(subprocess_env, FLYTE_API=flyte_api.url, TICKER_INTERVAL="0.2", FLYTE_HEALTH_PORT="off")
    process = subprocess.Popen([python, "-m", "flyte_gevent", "run", os.path.join(EXAMPLES, "ticker_pack.py:pack_def")],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        [tick] = flyte_api.wait_for_events(1, name="Tick", timeout=15)
        assert tick.pack_id == "Ticker"
    finally:
        returncode, _stdout, stderr = stop_process(process)
    assert returncode == 0, stderr


def test_a_bad_ticker_interval_fails_the_start_naming_it(flyte_api, python, subprocess_env):
    env = dict(subprocess_env, FLYTE_API=flyte_api.url, TICKER_INTERVAL="soon", FLYTE_HEALTH_PORT="off")
    result = subprocess.run([python, os.path.join(EXAMPLES, "ticker_pack.py")], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode != 0
    assert "TICKER_INTERVAL='soon': expected a positive number of seconds" in result.stderr.splitlines()[-1]


def test_ticker_process_applies_labels_and_exits_0_on_sigterm(flyte_api, python, subprocess_env):
    env = dict(subprocess_env, FLYTE_API=flyte_api.url, FLYTE_LABELS="env=test", TICKER_INTERVAL="0.2",
               FLYTE_HEALTH_PORT="0")
    process = pack_process(python, env, "ticker_pack.py")
    try:
        [tick] = flyte_api.wait_for_events(1, name="Tick", timeout=15)
        assert tick.pack_id == "Ticker.env.test"
    finally:
        returncode, _stdout, stderr = stop_process(process)
    assert returncode == 0, stderr
    assert flyte_api.requests_for("take") == []


# --- jira_pack.py -------------------------------------------------------------------------------------------------


def test_jira_pack_creates_issues_and_reports_a_bad_project_as_fatal(flyte_api, start_pack):
    good = flyte_api.enqueue("JiraPack", "createIssue", {"project": "FOO", "summary": "Disk full"},
                             labels={"env": "dev"})
    bad = flyte_api.enqueue("JiraPack", "createIssue", {"project": "NOPE", "summary": "?"}, labels={"env": "dev"})
    pack = start_pack(jira.pack_def)
    assert pack.pack_id == "JiraPack.env.dev"
    created, refused = flyte_api.wait_for_results([good, bad])

    assert created.event == "IssueCreated"
    assert created.payload["summary"] == "Disk full"
    project, _, number = created.payload["issueId"].partition("-")
    assert project == "FOO" and number.isdigit()
    assert (refused.event, refused.payload) == ("FATAL", "ValueError: bad project")


# --- the demo -------------------------------------------------------------------------------------------------------


def test_demo_shows_every_action_with_its_result_and_the_health_json(python, subprocess_env):
    console_script = os.path.join(os.path.dirname(python), "flyte-gevent")
    command = [console_script, "demo"] if os.path.exists(console_script) else [python, "-m", "flyte_gevent", "demo"]
    process = subprocess.Popen(command, env=subprocess_env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=40)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr

    for call in ["Shell.Shell(", "JiraPack.createIssue(", "JiraPack.closeIssue("]:
        assert call in stdout
    results = [line.strip() for line in stdout.splitlines() if line.strip().startswith("-> ")]
    assert len(results) == 7, stdout
    assert '-> Output {"stdout": "hello\\nworld\\n", "stderr": "", "exit_code": 0}' in results
    assert '-> Output {"stdout": "", "stderr": "to stderr\\n", "exit_code": 3}' in results
    assert '-> Output {"stdout": "", "stderr": "No script supplied to handler", "exit_code": 1}' in results
    assert any(line.startswith('-> IssueCreated {"issueId": "FOO-') for line in results)
    assert '-> FATAL "ValueError: bad project"' in results
    assert "-> FATAL \"Unknown command 'closeIssue'\"" in results
    assert '{"DefaultCheck": {"healthy": true, "status": "Pack is running."}}' in stdout
    assert "Tick {\"time\": " in stdout
    assert "nothing left PENDING: True" in stdout
