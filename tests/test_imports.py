"""gevent discipline: importing never patches or drags in ssl/requests, and start() insists on patching.

Each check that depends on import order or on patching runs in a fresh Python
process, since this test process was patched by conftest.py before anything else.
"""

import ast
import importlib
import json
import socket
import subprocess
import textwrap

import pytest

import flyte_gevent

TIMEOUT = 30


def run(python, env, code, *args, extra_env=None):
    """Run *code* in a child Python; return (returncode, stdout, stderr)."""
    if extra_env:
        env = {**env, **extra_env}
    process = subprocess.Popen([python, "-c", textwrap.dedent(code), *args], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, stdout, stderr


IMPORT_CHECK = """
    import json, sys
    import {module}
    import flyte_gevent
    names = list(flyte_gevent.__all__)
    dir(flyte_gevent)
    version = flyte_gevent.__version__
    loaded = [m for m in ("ssl", "_ssl", "requests", "urllib3", "http.client") if m in sys.modules]
    import socket
    from gevent import monkey
    print(json.dumps({{"loaded": loaded, "patched": monkey.is_module_patched("socket"),
                      "socket_module": socket.socket.__module__, "names": len(names)}}))
"""


@pytest.mark.parametrize("module", ["flyte_gevent", "flyte_gevent.testing", "flyte_gevent.pytest_plugin"])
def test_import_neither_patches_nor_loads_ssl_or_requests(python, subprocess_env, module):
    code, stdout, stderr = run(python, subprocess_env, IMPORT_CHECK.format(module=module))
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["loaded"] == []
    assert report["patched"] is False
    assert report["socket_module"] == "socket"
    assert report["names"] == len(flyte_gevent.__all__)


CONTRACT = ["Client", "Command", "Event", "EventDef", "Health", "Pack", "PackDef", "fatal_event",
            "flyte_api_health_check", "ConfigError", "FlyteError"]


def test_every_public_name_resolves():
    assert set(CONTRACT) <= set(flyte_gevent.__all__)
    for name in flyte_gevent.__all__:
        assert getattr(flyte_gevent, name) is not None, name
    assert sorted(dir(flyte_gevent)) == sorted(flyte_gevent.__all__)
    with pytest.raises(AttributeError, match="module 'flyte_gevent' has no attribute 'Nope'"):
        flyte_gevent.Nope  # noqa: B018


def test_the_type_checkers_imports_the_lazy_exports_and_all_name_the_same_things():
    """What mypy and pyright see (the ``if TYPE_CHECKING:`` imports) is what the package exports at run time."""
    with open(flyte_gevent.__file__) as f:
        tree = ast.parse(f.read())
    (block,) = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    imported = {}
    for statement in block.body:
        assert isinstance(statement, ast.ImportFrom) and statement.level == 1, ast.unparse(statement)
        for alias in statement.names:
            assert alias.asname is None, ast.unparse(statement)
            imported[alias.name] = "." + statement.module

    assert imported == flyte_gevent._EXPORTS
    assert sorted(flyte_gevent.__all__) == sorted([*imported, "__version__"])
    for name, module in imported.items():
        assert getattr(importlib.import_module(module, "flyte_gevent"), name) is getattr(flyte_gevent, name), name


def test_error_classes_are_importable_from_the_package():
    for name in ("ConfigError", "PackDefError", "NotPatchedError", "FlyteError", "FlyteConnectionError",
                 "FlyteTimeout", "FlyteHTTPError", "FlyteAuthError", "PackNotFoundError", "FlyteProtocolError"):
        error_class = getattr(flyte_gevent, name)
        assert isinstance(error_class, type) and issubclass(error_class, Exception)


PATCHED_PROGRAM = """
    from gevent import monkey
    monkey.patch_all()

    import sys
    import flyte_gevent
    from flyte_gevent import *  # noqa
    import flyte_gevent.cli, flyte_gevent.client, flyte_gevent.health, flyte_gevent.log, flyte_gevent.metrics
    import flyte_gevent.pack, flyte_gevent.schemas, flyte_gevent.testing, flyte_gevent._http
    for name in flyte_gevent.__all__:
        getattr(flyte_gevent, name)

    from flyte_gevent import Client, Command, Event, EventDef, FlyteError, Pack, PackDef
    done = EventDef("Done")
    pack_def = PackDef("Probe", commands=[Command("Do", lambda input: Event(done), [done])])
    pack = Pack(pack_def, Client(sys.argv[1], timeout=1.0), health_port=None, polling_interval=0.5)
    try:
        pack.start(timeout=0.5)
    except FlyteError as exc:
        print("start gave up:", type(exc).__name__)
"""


def refused_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_program_that_patches_first_gets_no_monkey_patch_warning(python, subprocess_env):
    # Nothing listens on the port: registration is refused and start() gives up after its timeout.
    code, stdout, stderr = run(python, subprocess_env, PATCHED_PROGRAM, f"http://127.0.0.1:{refused_port()}")
    assert code == 0, stderr
    assert "start gave up: FlyteError" in stdout
    assert "MonkeyPatchWarning" not in stderr
    assert "NotPatched" not in stdout + stderr


UNPATCHED_PROGRAM = """
    import json, os, sys
    from flyte_gevent import Client, NotPatchedError, Pack, PackDef

    mode = sys.argv[2]
    if mode == "from_env":
        pack = Pack.from_env(PackDef(sys.argv[3]), health_port=None)
    else:
        pack = Pack(PackDef(sys.argv[3]), Client(sys.argv[1], timeout=5.0), health_port=None,
                    allow_unpatched=(mode == "allowed"))
    try:
        pack.start(timeout=5)
    except NotPatchedError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
    else:
        print(json.dumps({"registered": pack.pack_id}))
        pack.stop(grace_period=0)
"""


@pytest.mark.parametrize("mode", ["default", "from_env"])
def test_start_without_patching_fails_with_a_clear_message(python, subprocess_env, flyte_api, mode):
    code, stdout, stderr = run(python, subprocess_env, UNPATCHED_PROGRAM, flyte_api.url, mode, "Unpatched",
                               extra_env={"FLYTE_API": flyte_api.url})
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["error"] == "NotPatchedError"
    assert "monkey.patch_all()" in report["message"]
    assert "at the very top of your main module" in report["message"]
    assert "\n" not in report["message"]
    assert flyte_api.requests == []  # refused before any request


@pytest.mark.parametrize("mode, extra_env", [("allowed", {}), ("from_env", {"FLYTE_GEVENT_ALLOW_UNPATCHED": "1"})],
                         ids=["allow_unpatched=True", "FLYTE_GEVENT_ALLOW_UNPATCHED=1"])
def test_the_opt_out_skips_the_patching_check(python, subprocess_env, flyte_api, mode, extra_env):
    # The unpatched child really registers with the fake served by this (patched) process.
    name = f"Optout{mode.replace('_', '')}"
    code, stdout, stderr = run(python, subprocess_env, UNPATCHED_PROGRAM, flyte_api.url, mode, name,
                               extra_env={**extra_env, "FLYTE_API": flyte_api.url})
    assert code == 0, stderr
    assert json.loads(stdout) == {"registered": name}
    assert list(flyte_api.packs) == [name]


def test_python_m_flyte_gevent_version(python, subprocess_env):
    process = subprocess.run([python, "-m", "flyte_gevent", "--version"], env=subprocess_env,
                             capture_output=True, text=True, timeout=TIMEOUT)
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip() == f"flyte-gevent {flyte_gevent.__version__}"
