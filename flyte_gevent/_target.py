"""Finding the pack a ``module:attr`` string names, and turning it into a :class:`~flyte_gevent.Pack`.

Shared by ``flyte-gevent run`` and the gunicorn hooks (``FLYTE_PACK``). Unlike
:mod:`flyte_gevent.cli`, importing this module patches nothing, so the gunicorn
hooks can use it inside a worker whose patching gunicorn owns.
"""

import importlib
import importlib.util
import logging
import os
import sys

from .errors import ConfigError

__all__ = ["load_target", "build_pack", "DEFAULT_ATTRIBUTES"]

log = logging.getLogger(__name__)

DEFAULT_ATTRIBUTES = ("pack", "pack_def", "create_pack")


def load_target(spec, source="target"):
    """Import ``module:attr`` (or ``path/to/file.py:attr``) the way gunicorn does.

    The current directory is put on ``sys.path`` first. Without ``:attr`` the
    names ``pack``, ``pack_def`` and ``create_pack`` are tried in turn.

    :param source: what to call *spec* in error messages (e.g. ``FLYTE_PACK``).
    :raises ConfigError: the module cannot be imported or has no such attribute.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name:
        raise ConfigError(f"{source} {spec!r}: expected module:attribute, e.g. mypack:pack_def", source)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            module = _import_file(module_name)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{source} {spec!r}: cannot import {module_name!r}: {exc}", source) from None
    names = [attribute] if attribute else list(DEFAULT_ATTRIBUTES)
    for name in names:
        if hasattr(module, name):
            return getattr(module, name)
    raise ConfigError(f"{source} {spec!r}: module {module_name!r} has no attribute {' or '.join(names)}", source)


def _import_file(path):
    if not os.path.isfile(path):
        raise ImportError(f"no such file {path!r}")
    name = os.path.splitext(os.path.basename(path))[0]
    directory = os.path.dirname(os.path.abspath(path))
    if directory not in sys.path:
        sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_pack(target, overrides=None, environ=None):
    """Turn a loaded target (a Pack, a PackDef, or a factory returning either) into a Pack.

    A PackDef is configured from the environment with *overrides* (parsed
    settings; ``None`` values such as ``health_port=None`` win too) over it; a
    ready-made Pack is used as it is.
    """
    from .models import PackDef
    from .pack import Pack

    if callable(target) and not isinstance(target, (Pack, PackDef)):
        target = target()
    if isinstance(target, Pack):
        given = sorted(overrides or {})
        if given:
            log.warning("the target is an already built Pack; ignoring %s", ", ".join(given))
        return target
    if isinstance(target, PackDef):
        return Pack.from_env(target, environ, **(overrides or {}))
    raise ConfigError(f"the target is a {type(target).__name__}; expected a Pack, a PackDef or a function "
                      "returning one", "target")
