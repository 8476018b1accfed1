"""The ``flyte-gevent`` command: run a pack, check a pack definition, run the demo.

This is an entry point, so it monkey-patches first — before anything imports
socket or ssl — and only then imports the rest. (``flyte_gevent/__init__`` is
lazy, so the console-script wrapper importing the package first is harmless.)

Exit codes: 0 after a normal shutdown, 78 (``EX_CONFIG``) for a configuration
error such as a missing ``FLYTE_API``, a target that cannot be imported or a
health port already in use, 69 (``EX_UNAVAILABLE``) when ``--start-timeout``
expires before registration, 2 for bad usage (argparse), 1 for anything
unexpected.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Collection  # noqa: E402
from typing import Any  # noqa: E402

from . import __version__, _fake_control, config  # noqa: E402
from ._target import (  # noqa: E402
    PACK_SETTINGS,
    Settings,
    build_pack,
    load_target,
    pack_definition,
    resolve_settings,
    shown,
)
from .errors import ConfigError, FlyteError  # noqa: E402
from .models import hook_name  # noqa: E402

__all__ = ["build_pack", "load_target", "main"]

log = logging.getLogger("flyte_gevent.cli")

EX_OK = 0
EX_SOFTWARE = 1
EX_UNAVAILABLE = 69
EX_CONFIG = 78

def _settings_arguments(parser: argparse.ArgumentParser, targets: Collection[str]) -> None:
    group = parser.add_argument_group("settings (flags win over the environment)")
    for setting in config.SETTINGS:
        if setting.flag is None or setting.target not in targets:
            continue
        default = "" if setting.default in (None, False, config.REQUIRED) else f"; default {setting.default}"
        help_text = f"{setting.help} [env {' or '.join(setting.env)}{default}]"
        if setting.parse is config._bool:
            group.add_argument(setting.flag, dest=setting.name, action="store_const", const="true",
                               help=help_text)
        else:
            group.add_argument(setting.flag, dest=setting.name, metavar=setting.metavar, help=help_text)


def _parsed_flags(args: argparse.Namespace, targets: Collection[str]) -> dict[str, Any]:
    values = {}
    for setting in config.SETTINGS:
        if setting.flag is None or setting.target not in targets:
            continue
        text = getattr(args, setting.name, None)
        if text is not None:
            values[setting.name] = config.read(setting, text, setting.flag)
    return values


_EXIT_CODES = ("exit codes:\n"
               "  0   normal shutdown (SIGTERM or SIGINT included)\n"
               "  1   unexpected error\n"
               "  2   bad usage\n"
               "  69  the Flyte API was unreachable for --start-timeout seconds\n"
               "  78  configuration error: a missing or malformed setting, a target that\n"
               "      cannot be imported, an invalid pack definition, a health port in use\n"
               "      (one 'Error: ...' line)")


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps one-paragraph descriptions as usual; keeps multi-line text (examples, exit codes) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


_TARGET_HELP = ("the pack: a PackDef, or a function returning one (given the resolved settings if it takes an "
                "argument), as module:attr or path/to/file.py:attr; without :attr, pack_def, pack and create_pack "
                "are tried")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flyte-gevent",
        formatter_class=_HelpFormatter,
        description="Run and check Flyte packs written with flyte_gevent.",
        epilog="examples:\n"
               "  flyte-gevent run mypack:pack_def --api http://flyte:8080 --labels env=prod\n"
               "  flyte-gevent check mypack:pack_def\n"
               "  flyte-gevent run --help   (every option, and the FLYTE_* variable behind it)\n\n"
               + _EXIT_CODES)
    parser.add_argument("--version", action="version", version=f"flyte-gevent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run", help="run a pack until SIGTERM/SIGINT",
        description="Import MODULE:ATTR (a PackDef, or a function returning one), build its Pack from flags and "
                    "FLYTE_* variables, register it and run it, with the hooks, background tasks and health checks "
                    "the definition declares, until SIGTERM or SIGINT. The first signal drains running actions; a "
                    "second one forces the stop.",
        epilog=_EXIT_CODES, formatter_class=_HelpFormatter)
    run.add_argument("target", metavar="MODULE:ATTR", help=_TARGET_HELP)
    _settings_arguments(run, ("client", "pack", "labels", "cli"))
    run.add_argument("--start-timeout", type=float, metavar="SECONDS",
                     help="give up (exit 69) when the pack cannot register within this time; default: keep trying")
    run.add_argument("--print-config", action="store_true",
                     help="print the resolved settings (token and URL credentials redacted) and the hooks the "
                          "definition declares, and exit")

    check = commands.add_parser(
        "check", help="validate a pack definition offline and print its registration JSON",
        description="Import MODULE:ATTR, validate the pack definition without contacting Flyte, and print the "
                    "JSON body it registers with.")
    check.add_argument("target", metavar="MODULE:ATTR", help=_TARGET_HELP)
    check.add_argument("--labels", metavar="LABELS", help="labels to merge in, as key=value[,key=value...] "
                                                          "[env FLYTE_LABELS]")

    demo = commands.add_parser(
        "demo", help="run the example packs against a bundled fake Flyte API",
        description="Start the fake Flyte API in this process, run the shell, jira and ticker example packs "
                    "against it, queue a few actions and print what happens.")
    demo.add_argument("--examples", metavar="DIR", help="directory holding the example packs (default: "
                                                        "the ones installed with flyte-gevent)")

    fake = commands.add_parser(
        "fake-api", help="serve the fake Flyte API for local development, and drive it",
        description="Serve flyte_gevent.testing.FakeFlyteApi until SIGTERM/SIGINT, with control routes under "
                    "/_fake/ for the other commands: queue actions, read results, events and packs, inject "
                    "faults, reset. For local use: it binds 127.0.0.1 unless --host says otherwise.",
        epilog="example:\n"
               "  flyte-gevent fake-api --port 8080 &\n"
               "  flyte-gevent fake-api enqueue Shell Shell --text 'echo hi' --wait 5\n"
               "  flyte-gevent fake-api results --wait 10",
        formatter_class=_HelpFormatter)
    _fake_control.add_commands(fake, _HelpFormatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``flyte-gevent`` and ``python -m flyte_gevent``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return EX_OK
    except Exception as exc:  # the last line of defence prints one line, not a traceback
        log.debug("unexpected error", exc_info=True)
        print(f"Error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return EX_SOFTWARE


def _run(args: argparse.Namespace) -> int:
    from . import log as flyte_log

    flags = _parsed_flags(args, ("client", "pack", "labels", "cli"))
    cli_settings: dict[str, Any] = {name: flags.pop(name) for name in ("log_level", "log_format") if name in flags}
    flyte_log.configure_from_environ(cli_settings)
    target = load_target(args.target)
    if args.print_config:
        return _print_config(target, flags, args.target)
    pack = build_pack(target, flags, spec=args.target)
    try:
        pack.run(start_timeout=args.start_timeout, configure_logging=False)
    except FlyteError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        pack.stop(grace_period=0)
        return EX_UNAVAILABLE if exc.status != 400 else EX_CONFIG
    except ConfigError:
        raise
    except Exception as exc:
        if _raised_in_authors_code(exc):  # an on_start hook's failure: its traceback is the author's to read
            log.error("pack %r failed", pack.pack_def.name, exc_info=(type(exc), exc, exc.__traceback__))
        raise
    return EX_OK


def _print_config(target: object, flags: dict[str, Any], spec: str) -> int:
    """What --print-config prints: every setting as run resolves it, then what the definition declares."""
    values = config.from_environ(names={s.name for s in config.SETTINGS}, overrides=flags)
    pack_def = pack_definition(target, Settings({name: values[name] for name in PACK_SETTINGS}), spec)
    for setting in config.SETTINGS:
        print(f"{setting.name} = {shown(setting.name, values[setting.name])!r}")
    print(f"pack = {pack_def.name!r}")
    for name, hooks in (("on_start", pack_def.start_hooks), ("on_stop", pack_def.stop_hooks),
                        ("background", pack_def.background_tasks), ("health_checks", pack_def.health_checks)):
        print(f"{name} = {[hook_name(hook) for hook in hooks]!r}")
    return EX_OK


def _raised_in_authors_code(exc: BaseException) -> bool:
    """Whether *exc* went through code outside flyte_gevent (a hook), rather than being raised by the library."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    examples = package + "examples" + os.sep  # installed with the package, but written as a pack author would
    frame = exc.__traceback__
    while frame is not None:
        filename = os.path.abspath(frame.tb_frame.f_code.co_filename)
        if not filename.startswith(package) or filename.startswith(examples):
            return True
        frame = frame.tb_next
    return False



def _check(args: argparse.Namespace) -> int:
    from .schemas import registration_body

    flags = _parsed_flags(args, ("labels",))
    settings = resolve_settings(flags, need_api=False)
    pack_def = pack_definition(load_target(args.target), Settings(settings), args.target)
    if settings["labels"]:
        pack_def = pack_def.with_labels(settings["labels"])
    pack_def.validate()
    print(json.dumps(registration_body(pack_def), indent=2))
    print(f"pack id: {pack_def.id}", file=sys.stderr)
    return EX_OK


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(args.examples)


def _fake_api(args: argparse.Namespace) -> int:
    return _fake_control.run(args)


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"run": _run, "check": _check, "demo": _demo,
                                                             "fake-api": _fake_api}
