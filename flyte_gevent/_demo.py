"""``flyte-gevent demo`` (and ``make demo``): the example packs against the bundled fake Flyte API.

Everything runs in this process over loopback: the fake API, the Shell pack
(with label ``ABC=123``), the Jira pack and the Ticker pack. A few actions are
queued, each action's command and result are printed as they complete, then the
health JSON and the probes of one pack, and everything stops cleanly.
"""

import importlib.util
import json
import os
import sys
import time

import requests

from .client import Client
from .errors import ConfigError
from .pack import Pack
from .testing import FakeFlyteApi

__all__ = ["run_demo"]

_ACTIONS = [
    ("Shell", {"ABC": "123"}, "Shell", "echo -e 'world\\nhello' | sort"),
    ("Shell", None, "Shell", "echo to stderr >&2; exit 3"),
    ("Shell", None, "Shell", {"not": "a script"}),
    ("Shell", None, "Shell", None),
    ("JiraPack", None, "createIssue", {"project": "FOO", "summary": "Disk full on web-1"}),
    ("JiraPack", None, "createIssue", {"project": "NOPE", "summary": "?"}),
    ("JiraPack", None, "closeIssue", {"issueId": "FOO-1"}),
]


_PACKS = ("shell_pack", "jira_pack", "ticker_pack")


def _find_examples(directory):
    """The directory holding the example packs.

    *directory* (``--examples``) if given; otherwise the ``flyte_gevent.examples``
    package that setup.cfg installs from ``examples/``, or, when the package is
    run from a source tree that was never installed (``PYTHONPATH=checkout``),
    the ``examples/`` directory beside it.
    """
    if directory:
        missing = [name for name in _PACKS if not os.path.isfile(os.path.join(directory, f"{name}.py"))]
        if missing:
            raise ConfigError(f"--examples {directory!r}: no {', '.join(f'{name}.py' for name in missing)} there",
                              "--examples")
        return directory
    spec = importlib.util.find_spec(f"{__package__}.examples")
    candidates = list(spec.submodule_search_locations) if spec else []
    candidates.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    for candidate in candidates:
        if all(os.path.isfile(os.path.join(candidate, f"{name}.py")) for name in _PACKS):
            return candidate
    raise SystemExit(f"Error: cannot find the example packs (looked in {', '.join(candidates)}); "
                     "the flyte-gevent installation is incomplete: reinstall it, or pass --examples DIR")


def _load(directory, name):
    spec = importlib.util.spec_from_file_location(f"flyte_demo_{name}", os.path.join(directory, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _show(value, width=100):
    text = json.dumps(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def run_demo(examples_dir: str | None = None) -> int:
    directory = _find_examples(examples_dir)
    shell, jira, ticker = (_load(directory, name) for name in _PACKS)
    out = sys.stdout

    with FakeFlyteApi() as api:
        print(f"Fake Flyte API listening on {api.url}\n", file=out)
        packs = [
            Pack(shell.make_pack_def(timeout=10).with_labels({"ABC": "123"}), Client(api.url), health_port=0,
                 polling_interval=0.5),
            Pack(jira.pack_def, Client(api.url), health_port=0, polling_interval=0.5),
            Pack(ticker.make_pack_def(interval=0.5), Client(api.url), health_port=0),
        ]
        for pack in packs:
            pack.start(timeout=10)
            print(f"registered pack {pack.pack_id!r:<24} health server on port {pack.health_port}", file=out)

        print("\nqueued actions and their results:", file=out)
        started = time.monotonic()
        ids = [api.enqueue(pack_name, command, input, labels=labels)
               for pack_name, labels, command, input in _ACTIONS]
        results = api.wait_for_results(ids, timeout=20)
        for (pack_name, _, command, input), result in zip(_ACTIONS, results):
            print(f"  {pack_name}.{command}({_show(input, 40)})", file=out)
            print(f"      -> {result.event} {_show(result.payload, 120)}", file=out)
        print(f"  ({len(ids)} actions completed in {time.monotonic() - started:.2f} s)", file=out)

        ticks = api.wait_for_events(2, timeout=10, name="Tick")
        print("\nspontaneous events from the Ticker pack:", file=out)
        for event in ticks:
            print(f"  {event.event} {_show(event.payload)}", file=out)

        port = packs[1].health_port
        print(f"\nhealth of the JiraPack pack (http://127.0.0.1:{port}/):", file=out)
        for path in ("/", "/livez", "/readyz"):
            response = requests.get(f"http://127.0.0.1:{port}{path}", timeout=5)
            print(f"  GET {path:<8} {response.status_code} {response.text}", file=out)

        for pack in packs:
            pack.stop()
        print("\nall packs stopped; nothing left PENDING:", not api.pending(), file=out)
    return 0
