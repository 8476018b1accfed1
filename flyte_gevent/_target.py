"""Finding the pack definition a ``module:attr`` string names, and building the runner's :class:`~flyte_gevent.Pack`.

Shared by ``flyte-gevent run``/``check`` and the gunicorn hooks (``FLYTE_PACK``).
A target is a :class:`~flyte_gevent.PackDef`, or a factory returning one: the
runner resolves the settings (flags, ``FLYTE_*`` variables, defaults), gives
them to a factory that takes an argument, and builds the Pack from the
definition with them, hooks included. A ready-made ``Pack`` is refused: it was
configured before the runner's settings existed, so they could not apply, and
the message says how to declare the same things on the definition.

Unlike :mod:`flyte_gevent.cli`, importing this module patches nothing, so the
gunicorn hooks can use it inside a worker whose patching gunicorn owns.
"""

import collections.abc
import importlib
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import config
from .errors import ConfigError, PackDefError, redact_url

if TYPE_CHECKING:
    from .pack import Pack

__all__ = ["DEFAULT_ATTRIBUTES", "Settings", "build_pack", "load_target", "pack_definition", "resolve_settings",
           "shown"]

log = logging.getLogger(__name__)

#: The names tried, in this order, for a target given without ``:attr``.
DEFAULT_ATTRIBUTES = ("pack_def", "pack", "create_pack")

PACK_SETTINGS = config.PACK_SETTINGS  # the settings a runner resolves for the pack it builds

_HOOKS_HINT = ("declare the pack's health checks, background tasks and start/stop hooks on it with "
               "@pack_def.health_check, @pack_def.background, @pack_def.on_start and @pack_def.on_stop")


class Settings(collections.abc.Mapping[str, Any]):
    """The settings a runner resolved, by name (``settings["labels"]``), as a factory target receives them.

    The names are the keyword names of the README's Configuration table
    (``api``, ``labels``, ``health_port``, ...). Read-only; its ``repr`` hides
    the token and any credentials in the API URL.
    """

    def __init__(self, values):
        self._values = dict(values)

    def __getitem__(self, name):
        return self._values[name]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def __repr__(self):
        return f"Settings({ {name: shown(name, value) for name, value in self._values.items()}!r})"


def shown(name, value):
    """*value* of setting *name* as it may be shown (--print-config, ``repr``): secrets hidden, URL credentials cut."""
    if config.setting(name).secret and value:
        return "<redacted>"
    return redact_url(value) if isinstance(value, str) else value


def resolve_settings(overrides=None, environ=None, need_api=True):
    """``{name: value}`` for the pack settings: *overrides* (parsed flags), then the environment, then defaults.

    :param need_api: ``False`` for offline work (``flyte-gevent check``): a
        missing or malformed ``FLYTE_API`` is then ``None`` instead of an error.
    :raises ConfigError: a setting is missing or malformed.
    """
    overrides = overrides or {}
    if need_api:
        return config.from_environ(environ, names=PACK_SETTINGS, overrides=overrides)
    values = config.from_environ(environ, names=PACK_SETTINGS - {"api"}, overrides=overrides)
    try:
        values.update(config.from_environ(environ, names={"api"}, overrides=overrides))
    except ConfigError:
        values["api"] = None
    return values


def load_target(spec: str, source: str = "target") -> object:
    """Import ``module:attr`` (or ``path/to/file.py:attr``) the way gunicorn does; the attribute.

    The current directory is put on ``sys.path`` first. Without ``:attr`` the
    names in :data:`DEFAULT_ATTRIBUTES` are tried in turn.

    :param source: what to call *spec* in error messages (e.g. ``FLYTE_PACK``).
    :raises ConfigError: the module cannot be imported, raised a ``ConfigError``
        while being imported (a ``PackDefError`` as it is, others naming the
        import), or has no such attribute.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name:
        raise ConfigError(f"{source} {spec!r}: expected module:attribute, e.g. mypack:pack_def", source)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = _import(module_name)
    except ImportError as exc:
        raise ConfigError(f"{source} {spec!r}: cannot import {module_name!r}: {exc}", source) from None
    except PackDefError:
        raise  # a definition refused where it is made already names the definition and the mistake
    except ConfigError as exc:  # a setting read while importing: not the runner's, whatever the flags say
        raise ConfigError(f"{source} {spec!r}: importing {module_name!r} raised: {exc} (a module that builds its "
                          "Pack when it is imported configures it before the runner's flags and settings exist: "
                          "export its PackDef and let the runner build the Pack)", exc.name) from None
    names = [attribute] if attribute else list(DEFAULT_ATTRIBUTES)
    for name in names:
        if hasattr(module, name):
            return getattr(module, name)
    raise ConfigError(f"{source} {spec!r}: module {module_name!r} has no attribute {' or '.join(names)}", source)


def _is_file(module_name):
    return module_name.endswith(".py") or os.sep in module_name


def _import(module_name):
    if not _is_file(module_name):
        return importlib.import_module(module_name)
    if not os.path.isfile(module_name):
        raise ImportError(f"no such file {module_name!r}")
    name = os.path.splitext(os.path.basename(module_name))[0]
    directory = os.path.dirname(os.path.abspath(module_name))
    if directory not in sys.path:
        sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location(name, module_name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def pack_definition(target, settings, spec="target", source="target"):
    """The :class:`~flyte_gevent.PackDef` a loaded *target* stands for: itself, or what a factory returns.

    A factory is called with *settings* (a :class:`Settings`) when it takes an
    argument, else with none.

    :raises ConfigError: the target is a ready-made Pack, or neither a PackDef
        nor a function returning one; or a factory raised a ``ConfigError``.
    """
    from .models import PackDef
    from .pack import Pack

    if isinstance(target, PackDef):
        return target
    if isinstance(target, Pack):
        raise _ready_made(target, spec, source, "is")
    if not callable(target):
        raise ConfigError(f"{source} {spec!r}: the target is a {type(target).__name__}; expected a PackDef or a "
                          "function returning one", source)
    name = getattr(target, "__name__", "the factory")
    try:
        made = target(settings) if _takes_an_argument(target) else target()
    except ConfigError as exc:
        raise ConfigError(f"{source} {spec!r}: {name}() raised: {exc}", exc.name) from None
    if isinstance(made, Pack):
        raise _ready_made(made, spec, source, "returned")
    if not isinstance(made, PackDef):
        raise ConfigError(f"{source} {spec!r}: {name}() returned a {type(made).__name__}; expected a PackDef",
                          source)
    return made


def build_pack(target: object, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
               spec: str = "target", source: str = "target") -> "Pack":
    """The :class:`~flyte_gevent.Pack` a runner runs for a loaded *target*, with the settings it resolved.

    *overrides* are parsed settings (flags) that win over the environment;
    ``None`` values (``health_port=None``) win too.

    :raises ConfigError: a setting is missing or malformed, or the target is
        not a definition (see :func:`pack_definition`).
    """
    from .pack import Pack

    values = resolve_settings(overrides, environ)
    pack_def = pack_definition(target, Settings(values), spec, source)
    return Pack.from_env(pack_def, environ, **values)


def _takes_an_argument(function):
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable without a signature: give it the settings
        return True
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in parameters)


def _ready_made(pack, spec, source, verb):
    where = _definition_attribute(pack.pack_def, spec)
    at = f"at {where} (the PackDef it was built from)" if where else "at a PackDef"
    subject = "the CLI" if source == "target" else source
    return ConfigError(
        f"{source} {spec!r} {verb} a ready-made Pack, but the runner builds the Pack itself, from its flags and "
        f"FLYTE_* variables, which a Pack built in advance would ignore: point {subject} {at} instead, and "
        f"{_HOOKS_HINT}", source)


def _definition_attribute(pack_def, spec):
    """``module:attr`` naming *pack_def* in the target's module, or ``None``."""
    module_name = spec.partition(":")[0]
    key = os.path.splitext(os.path.basename(module_name))[0] if _is_file(module_name) else module_name
    module = sys.modules.get(key)
    for name, value in vars(module).items() if module is not None else ():
        if value is pack_def:
            return f"{module_name}:{name}"
    return None
