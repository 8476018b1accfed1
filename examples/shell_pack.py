"""flyte-shell, ported: run a one-line bash script and emit its output.

Behaves like ExpediaGroup/flyte-shell: pack ``Shell``, command ``Shell`` whose
input is a JSON string holding the script, event ``Output`` with the raw (not
trimmed) ``stdout``, ``stderr`` and ``exit_code`` (``-1`` when the script was
killed by a signal). Input that is not a string gets Go's decode error text as
``stderr`` with ``exit_code`` 1; an empty or null script gets "No script
supplied to handler". Without a timeout, the action waits, as Go's does, until
bash has exited and every process holding its output pipes has closed them.

What the port does better:

* ``SHELL_TIMEOUT`` (seconds, off by default) bounds the whole action. The
  script runs in a session of its own; when the time is up the whole process
  group is killed (SIGKILL), what it already wrote is read for at most
  0.25 s more, and the action ends like coreutils' ``timeout``: ``Output`` with
  ``exit_code`` 124 and ``timeout after N s`` appended to ``stderr``, so flows
  that test ``exit_code`` keep working. Every wait is bounded, so this holds
  whatever the children do; a child that left the group (``setsid``, a daemon)
  is not killed, and what it writes later is lost.
* Secrets are removed from the script's environment: every variable whose name
  contains ``TOKEN``, ``SECRET``, ``PASS``, ``KEY``, ``JWT`` or ``CREDENTIAL``
  in any case (``FLYTE_JWT``, ``FLYTE_JWT_FILE``, ``API_KEY``, ``DB_PASS``...).
  This keeps them out of ``env`` dumps and of tools that read the environment;
  it is not a sandbox. The script runs as the pack's user, so it can still read
  the pack's initial environment from ``/proc/$PPID/environ``: give the pack its
  token in a file (``FLYTE_JWT_FILE``), never in ``FLYTE_JWT``. That file is
  readable by the same user too, so to keep scripts from the token altogether,
  run them as another user or in a sandbox.
* If bash cannot be started, the action is completed as ``FATAL`` with a clear
  message instead of Go's nil-pointer panic text.

Scripts run through ``gevent.subprocess`` with their pipes read by greenlets,
so a running script never blocks the pack's other actions.

Run it::

    FLYTE_API_URL=http://flyte:8080 FLYTE_LABELS=ABC=123 python examples/shell_pack.py
    # or, with the CLI (SHELL_TIMEOUT applies either way):
    FLYTE_API=http://flyte:8080 flyte-gevent run examples/shell_pack.py:create_pack_def
"""

from gevent import monkey

if __name__ == "__main__":
    monkey.patch_all()

import os
import re
import signal
import sys
import time
from typing import Any

from gevent import subprocess
from gevent.pool import Group

from flyte_gevent import JSON, Command, ConfigError, Event, EventDef, Pack, PackDef, fatal_event

HELP_URL = "https://github.com/ExpediaGroup/flyte-shell/blob/master/README.md"
TIMEOUT_EXIT_CODE = 124
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASS|KEY|JWT|CREDENTIAL", re.IGNORECASE)
# After the kill: how long output the script already wrote is still read, and how long bash gets to be reaped.
_DRAIN_AFTER_KILL = 0.25
_REAP_AFTER_KILL = 1.0

output = EventDef("Output")

# Go's encoding/json wording for each JSON type that is not a string.
_GO_TYPE_NAMES = {dict: "object", list: "array", bool: "bool", int: "number", float: "number"}


def shell(script: JSON, timeout: float | None = None) -> Event[dict[str, JSON]] | Event[str]:
    """The ``Shell`` command handler: *script* is the action's decoded JSON input."""
    if script is not None and not isinstance(script, str):
        kind = _GO_TYPE_NAMES.get(type(script), type(script).__name__)
        return _output("", f"json: cannot unmarshal {kind} into Go value of type string", 1)
    if not script:
        return _output("", "No script supplied to handler", 1)
    try:
        process = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL, env=_scrubbed_environ(), start_new_session=True)
    except OSError as exc:
        return fatal_event(f"cannot start bash: {exc.strerror or exc}")
    stdout: list[bytes] = []
    stderr: list[bytes] = []
    readers = Group()
    readers.spawn(_read_all, process.stdout, stdout)
    readers.spawn(_read_all, process.stderr, stderr)
    try:
        finished = _wait(process, readers, timeout)
    except BaseException:
        # Cut short (pack shutdown, per-action timeout): don't leave the script running.
        _kill(process, readers, drain=0)
        raise
    if not finished:
        _kill(process, readers, drain=_DRAIN_AFTER_KILL)
        return _output(_text(stdout), _text(stderr) + f"timeout after {timeout or 0:g} s", TIMEOUT_EXIT_CODE)
    _close_pipes(process)
    exit_code = process.returncode if process.returncode >= 0 else -1
    return _output(_text(stdout), _text(stderr), exit_code)


def _read_all(pipe: Any, chunks: list[bytes]) -> None:  # pipe: the BufferedReader Popen made for PIPE
    while data := pipe.read1(65536):
        chunks.append(data)


def _wait(process: "subprocess.Popen[bytes]", readers: Group, timeout: float | None) -> bool:
    """Wait until both pipes are at their end and bash has exited; False when *timeout* passes first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if not readers.join(timeout=timeout, raise_error=True):
        return False
    try:
        process.wait(timeout=None if deadline is None else max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
        return False
    return True


def _kill(process: "subprocess.Popen[bytes]", readers: Group, drain: float) -> None:
    """Kill the script's process group, read for up to *drain* s what it wrote, close the pipes and reap bash.

    Every step is bounded: a child that left the group may hold the pipes open forever.
    """
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # bash and everything in its group have exited already
    if drain:
        readers.join(timeout=drain)
    readers.kill(block=True, timeout=1)
    _close_pipes(process)
    try:
        process.wait(timeout=_REAP_AFTER_KILL)
    except subprocess.TimeoutExpired:
        pass  # gevent's child watcher still reaps it when it exits


def _close_pipes(process: "subprocess.Popen[bytes]") -> None:
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:  # both are pipes: Popen was given PIPE for them
            pipe.close()


def _output(stdout: str, stderr: str, exit_code: int) -> Event[dict[str, JSON]]:
    return Event(output, {"stdout": stdout, "stderr": stderr, "exit_code": exit_code})


def _text(chunks: list[bytes]) -> str:
    return b"".join(chunks).decode("utf-8", "replace")


def _scrubbed_environ() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not _SECRET_NAME.search(key)}


def _timeout_from_env() -> float | None:
    text = os.environ.get("SHELL_TIMEOUT", "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"SHELL_TIMEOUT={text!r}: expected a number of seconds", "SHELL_TIMEOUT") from None
    return value if value > 0 else None


def make_pack_def(timeout: float | None = None) -> PackDef:
    """The Shell pack definition (labels come from ``FLYTE_LABELS`` via :meth:`Pack.from_env`)."""
    return PackDef(
        name="Shell",
        help_url=HELP_URL,
        commands=[Command("Shell", lambda script: shell(script, timeout), output_events=[output])],
    )


pack_def = make_pack_def()


def create_pack_def() -> PackDef:
    """The definition with ``SHELL_TIMEOUT`` applied: ``flyte-gevent run shell_pack:create_pack_def``."""
    return make_pack_def(_timeout_from_env())


def main() -> None:
    # Like the Go pack, FLYTE_API_URL is required; FLYTE_API is accepted too and wins.
    if not (os.environ.get("FLYTE_API") or os.environ.get("FLYTE_API_URL")):
        sys.exit("FLYTE_API_URL env. variable is not set")
    try:
        pack = Pack.from_env(create_pack_def())
    except ConfigError as exc:
        sys.exit(f"Error: {exc}")
    pack.run()


if __name__ == "__main__":
    main()
