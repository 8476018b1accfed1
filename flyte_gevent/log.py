"""Per-action logging context, and the log formats the CLI offers.

While an action runs, :func:`current_action` returns it, and
:class:`ActionContextFilter` copies its id and command (and the pack name) onto
every log record — including records logged by the pack author's handler code
through its own loggers. gevent gives each greenlet its own ``contextvars``
context, so concurrent actions never see each other's values.

The library itself only adds a ``NullHandler``; :func:`configure` is for entry
points (the CLI) that own logging.
"""

import contextlib
import contextvars
import datetime
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .models import Action

__all__ = ["ActionContextFilter", "JsonFormatter", "configure", "configure_from_environ", "current_action"]

_action: contextvars.ContextVar["Action | None"] = contextvars.ContextVar("flyte_gevent_action", default=None)
_pack: contextvars.ContextVar[str | None] = contextvars.ContextVar("flyte_gevent_pack", default=None)


def current_action() -> "Action | None":
    """The :class:`~flyte_gevent.models.Action` being handled by this greenlet, or ``None``."""
    return _action.get()


def bind_action(action: "Action", pack_name: str | None) -> None:
    """Mark this greenlet as running *action*; called by the pack runtime at the start of an action."""
    _action.set(action)
    _pack.set(pack_name)


def bind_pack(pack_name: str | None) -> None:
    """Mark this greenlet as working for *pack_name* (poller, event sender)."""
    _pack.set(pack_name)


@contextlib.contextmanager
def pack_context(pack_name: str | None) -> Iterator[None]:
    """Within the block, records carry *pack_name*; afterwards the greenlet's own value is back.

    For a pack's lifecycle (start, stop, signals), which runs in its caller's
    greenlet: that greenlet may log for something else afterwards, or for
    another pack.
    """
    token = _pack.set(pack_name)
    try:
        yield
    finally:
        _pack.reset(token)


class ActionContextFilter(logging.Filter):
    """Adds ``action_id``, ``command`` and ``pack`` attributes to every record (``None`` outside an action).

    Attach it to a handler::

        handler.addFilter(ActionContextFilter())
        handler.setFormatter(logging.Formatter("%(levelname)s %(action_id)s %(message)s"))
    """

    def filter(self, record: logging.LogRecord) -> bool:
        action = _action.get()
        record.action_id = action.id if action is not None else None
        record.command = action.command if action is not None else None
        record.pack = _pack.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, pack, action_id, command, exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pack": getattr(record, "pack", None),
            "action_id": getattr(record, "action_id", None),
            "command": getattr(record, "command", None),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s"


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if getattr(record, "action_id", None):
            parts.append(f"action={record.action_id}")  # type: ignore[attr-defined]  # set by the filter
            parts.append(f"command={record.command}")  # type: ignore[attr-defined]
        record.context = " [" + " ".join(parts) + "]" if parts else ""
        return super().format(record)


def configure(level: str | int = "INFO", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Send all logging to *stream* (stderr) in ``text`` or ``json`` format with action context.

    Meant for entry points; a library embedding a pack configures its own logging
    and can reuse :class:`ActionContextFilter` and :class:`JsonFormatter`.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format {fmt!r}: expected 'text' or 'json'")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ActionContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else _TextFormatter(_TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)


def configure_from_environ(overrides: Mapping[str, Any] | None = None,
                           environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """:func:`configure` at ``FLYTE_GEVENT_LOG_LEVEL`` in ``FLYTE_GEVENT_LOG_FORMAT`` (info, text); ``(level, format)``.

    The default of ``flyte-gevent run`` (whose flags are *overrides*) and of
    :meth:`Pack.run <flyte_gevent.Pack.run>` in a program that configured no logging.

    :raises ConfigError: a variable is malformed.
    """
    from . import config

    values = config.from_environ(environ, names={"log_level", "log_format"}, overrides=overrides)
    configure(values["log_level"], values["log_format"])
    return values["log_level"], values["log_format"]
