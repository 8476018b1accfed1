"""Logging: a silent library by default, per-action context on every record, and the CLI's formats."""

import io
import json
import logging
import subprocess
import sys

import gevent
import pytest

from flyte_gevent import Event, EventDef, PackDef, current_action
from flyte_gevent.log import ActionContextFilter, JsonFormatter, configure
from helpers import BackgroundProcess

done = EventDef("Done")
handler_log = logging.getLogger("mypack.handlers")  # the pack author's own logger


class Capture(logging.Handler):
    """Keeps every record, after ActionContextFilter has stamped it, as a root handler would."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.addFilter(ActionContextFilter())
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def captured():
    root = logging.getLogger()
    capture, old_level = Capture(), root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    yield capture.records
    root.removeHandler(capture)
    root.setLevel(old_level)


def test_the_package_logger_has_only_a_null_handler_and_prints_nothing_unconfigured(python, subprocess_env):
    # A fresh interpreter: the library's own warning must not reach stderr through logging's last resort.
    script = ("from gevent import monkey; monkey.patch_all()\n"
              "import logging, flyte_gevent\n"
              "from flyte_gevent import Client, Pack, PackDef\n"
              "Pack(PackDef('Quiet'), Client('http://127.0.0.1:9'), health_port=None, polling_interval=0.1)\n"
              "package = logging.getLogger('flyte_gevent')\n"
              "print([type(h).__name__ for h in package.handlers], package.level, logging.getLogger().handlers)\n")
    result = subprocess.run([python, "-c", script], env=subprocess_env, capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['NullHandler'] 0 []"
    assert result.stderr == ""  # the polling-interval warning was logged, and swallowed by the NullHandler


def test_records_logged_during_an_action_carry_its_id_command_and_pack(flyte_api, run_pack, captured):
    def create(input):
        handler_log.info("creating %s", input["name"])
        if input["name"] == "bad":
            raise ValueError("bad name")
        return Event(done, {"action": current_action().id})

    pack_def = PackDef("Logged")
    pack_def.command("create", output_events=[done])(create)
    run_pack(pack_def)
    good, bad = flyte_api.enqueue("Logged", "create", {"name": "good"}), flyte_api.enqueue("Logged", "create",
                                                                                        {"name": "bad"})
    assert flyte_api.wait_for_result(good).payload == {"action": good}
    flyte_api.wait_for_result(bad)
    logging.getLogger("mypack.outside").info("after the actions")

    mine = {r.getMessage(): r for r in captured if r.name == "mypack.handlers"}
    assert (mine["creating good"].action_id, mine["creating good"].command) == (good, "create")
    assert (mine["creating bad"].action_id, mine["creating bad"].pack) == (bad, "Logged")
    # The library's own record about the failure, from the action's greenlet, carries the context too.
    (failure,) = [r for r in captured if r.getMessage() == "handler for command 'create' failed"]
    assert (failure.action_id, failure.command, failure.pack) == (bad, "create", "Logged")
    (outside,) = [r for r in captured if r.name == "mypack.outside"]
    assert (outside.action_id, outside.command) == (None, None)


def test_concurrent_actions_each_see_their_own_context(flyte_api, run_pack, captured):
    seen = {}

    def work(input):
        handler_log.info("start %s", input["tag"])
        gevent.sleep(0.3)  # the three overlap here
        handler_log.info("end %s", input["tag"])
        seen[input["tag"]] = current_action().id
        return Event(done, None)

    pack_def = PackDef("Concurrent")
    pack_def.command("work", output_events=[done])(work)
    ids = {tag: flyte_api.enqueue("Concurrent", "work", {"tag": tag}) for tag in "abc"}
    run_pack(pack_def)
    flyte_api.wait_for_results(list(ids.values()))

    assert seen == ids
    records = [r for r in captured if r.name == "mypack.handlers"]
    assert len(records) == 6
    messages = [r.getMessage() for r in records]
    assert max(messages.index(f"start {tag}") for tag in "abc") < min(messages.index(f"end {tag}") for tag in "abc")
    for record in records:
        assert record.action_id == ids[record.getMessage().split()[1]]
        assert record.command == "work"


def test_json_formatter_writes_one_object_per_line_with_the_context_fields():
    record = logging.LogRecord("mypack.handlers", logging.ERROR, __file__, 1, "took %s s for %r", (1.5, "x"), None)
    record.pack, record.action_id, record.command = "Logged", "abc123", "create"
    try:
        raise KeyError("missing")
    except KeyError:
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["ts"].endswith("Z") and "T" in entry["ts"]
    assert {k: entry[k] for k in ("level", "logger", "msg", "pack", "action_id", "command")} == {
        "level": "ERROR", "logger": "mypack.handlers", "msg": "took 1.5 s for 'x'", "pack": "Logged",
        "action_id": "abc123", "command": "create"}
    assert "KeyError: 'missing'" in entry["exc_info"]

    plain = json.loads(JsonFormatter().format(logging.LogRecord("x", logging.INFO, __file__, 1, "hi", (), None)))
    assert (plain["action_id"], plain["command"], plain["pack"]) == (None, None, None)
    assert "exc_info" not in plain


@pytest.fixture
def restore_root_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_configure_sends_records_with_action_context_to_the_stream(fmt, flyte_api, run_pack, restore_root_logging):
    stream = io.StringIO()
    configure("info", fmt, stream=stream)

    def create(input):
        handler_log.info("inside")
        handler_log.debug("too detailed for info")
        return Event(done, None)

    pack_def = PackDef("Formatted")
    pack_def.command("create", output_events=[done])(create)
    run_pack(pack_def)
    action = flyte_api.enqueue("Formatted", "create")
    flyte_api.wait_for_result(action)

    lines = stream.getvalue().splitlines()
    assert not any("too detailed" in line for line in lines)
    if fmt == "json":
        entries = [json.loads(line) for line in lines]
        (inside,) = [e for e in entries if e["msg"] == "inside"]
        assert (inside["action_id"], inside["command"], inside["pack"]) == (action, "create", "Formatted")
    else:
        (inside,) = [line for line in lines if line.endswith(": inside")]
        assert f" INFO mypack.handlers [action={action} command=create]: inside" in inside


def test_configure_refuses_an_unknown_format(restore_root_logging):
    with pytest.raises(ValueError, match="log format 'xml'"):
        configure("info", "xml")


def test_lifecycle_records_carry_the_pack_name_and_leave_the_callers_context_as_it_was(flyte_api,
                                                                                     restore_root_logging):
    from flyte_gevent import Client, Pack

    stream = io.StringIO()
    configure("debug", "json", stream=stream)
    pack = Pack(PackDef("Lifecycle"), Client(flyte_api.url), health_port=0, health_host="127.0.0.1",
                polling_interval=0.1)  # below the floor: a warning from the constructor
    pack.start(timeout=5)
    pack.stop()
    logging.getLogger("mypack.outside").info("after the pack")

    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    ours = [e for e in entries if e["logger"].startswith("flyte_gevent.")
            and not e["logger"].startswith(("flyte_gevent.testing", "flyte_gevent._fake"))]
    messages = " | ".join(e["msg"] for e in ours)
    for expected in ("polling interval 0.1 s is below", "health server listening", "is registered as",
                     "stopping pack 'Lifecycle'", "pack 'Lifecycle' stopped"):
        assert expected in messages
    assert {(e["msg"], e["pack"]) for e in ours if e["pack"] != "Lifecycle"} == set()
    (after,) = [e for e in entries if e["msg"] == "after the pack"]
    assert after["pack"] is None


def _script_env(subprocess_env, **extra):
    env = dict(subprocess_env, FLYTE_API="http://127.0.0.1:9", **extra)  # nothing listens on the discard port
    env.pop("FLYTE_GEVENT_LOG_LEVEL", None)
    env.pop("FLYTE_GEVENT_LOG_FORMAT", None)
    return env


def _readme_quick_start_pack():
    """The Quick start's whole pack, as README.md shows it."""
    import os
    import re

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        readme = f.read()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", quick_start, re.DOTALL)
               if "Pack.from_env" in block]
    return code


def test_the_quick_start_pack_run_as_a_script_logs_to_stderr_and_names_its_health_port(tmp_path, python,
                                                                                      subprocess_env):
    import re
    import time
    import urllib.request

    script = tmp_path / "jira.py"
    script.write_text(_readme_quick_start_pack())
    env = _script_env(subprocess_env, FLYTE_HEALTH_PORT="0", FLYTE_GEVENT_HEALTH_HOST="127.0.0.1")
    child = BackgroundProcess([python, str(script)], env, tmp_path / "child")
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = child.stderr()
            if "cannot register" in text and "health server listening" in text:
                break
            gevent.sleep(0.05)
        port = re.search(r"health server listening on 127\.0\.0\.1:(\d+)", text)
        assert port, text
        with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/livez", timeout=3) as response:
            assert response.status == 200
        assert child.terminate(timeout=10) == 0
    finally:
        child.close()
    text = child.stderr()
    assert re.search(r"WARNING flyte_gevent\.pack: cannot register pack 'JiraPack' yet, retrying", text), text
    assert "pack 'JiraPack' stopped" in text
    assert "FLYTE_GEVENT_LOG_LEVEL" in text  # the first line says how to change or turn off this default


@pytest.mark.parametrize("setup, expected_stderr", [
    ("logging.basicConfig(stream=sys.stdout, level=logging.INFO, format='MINE %(name)s: %(message)s')", ""),
    ("os.environ['FLYTE_GEVENT_LOG_FORMAT'] = 'json'", '"level": "WARNING"'),
])
def test_run_configures_logging_only_when_the_program_has_not(setup, expected_stderr, python, subprocess_env):
    script = ("from gevent import monkey; monkey.patch_all()\n"
              "import logging, os, sys\n"
              f"{setup}\n"
              "from flyte_gevent import FlyteError, Pack, PackDef\n"
              "try:\n"
              "    Pack.from_env(PackDef('Configured'), health_port=None).run(start_timeout=0.3)\n"
              "except FlyteError as exc:\n"
              "    print('gave up:', exc.reason)\n")
    result = subprocess.run([python, "-c", script], env=_script_env(subprocess_env), capture_output=True, text=True,
                            timeout=10)
    assert result.returncode == 0, result.stderr
    assert "gave up: could not register pack 'Configured' within 0.3 s" in result.stdout
    if "basicConfig" in setup:
        assert "MINE flyte_gevent.pack: cannot register pack 'Configured' yet" in result.stdout
        assert result.stderr == ""
    else:
        assert expected_stderr in result.stderr


def test_start_and_run_told_not_to_leave_an_unconfigured_program_silent(python, subprocess_env):
    script = ("from gevent import monkey; monkey.patch_all()\n"
              "from flyte_gevent import FlyteError, Pack, PackDef\n"
              "for run in (lambda pack: pack.start(timeout=0.3),\n"
              "            lambda pack: pack.run(start_timeout=0.3, configure_logging=False)):\n"
              "    try:\n"
              "        run(Pack.from_env(PackDef('Silent'), health_port=None))\n"
              "    except FlyteError:\n"
              "        print('gave up')\n")
    result = subprocess.run([python, "-c", script], env=_script_env(subprocess_env), capture_output=True, text=True,
                            timeout=10)
    assert (result.returncode, result.stdout, result.stderr) == (0, "gave up\ngave up\n", "")
