"""flyte_gevent: write Flyte packs in Python on gevent.

A pack registers with the Flyte API, takes actions, runs one greenlet per
action and posts each result back exactly once::

    from gevent import monkey; monkey.patch_all()   # first, in your main module
    from flyte_gevent import Command, Event, EventDef, Pack, PackDef

    created = EventDef("IssueCreated")

    def create_issue(input):
        return Event(created, {"issueId": "FOO-1"})

    pack_def = PackDef("JiraPack", commands=[Command("createIssue", create_issue, [created])])
    Pack.from_env(pack_def).run()

Importing this package patches nothing and imports neither ``requests`` nor
``ssl``: the public names below are loaded on first use, so the program's main
module can still monkey-patch first.
"""

import importlib
import logging
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> module that defines it.
_EXPORTS = {
    "Client": ".client",
    "Command": ".models",
    "Event": ".models",
    "EventDef": ".models",
    "PackDef": ".models",
    "Action": ".models",
    "FATAL": ".models",
    "JSON": ".models",
    "fatal_event": ".models",
    "Pack": ".pack",
    "current_action": ".log",
    "Health": ".health",
    "flyte_api_health_check": ".health",
    "ConfigError": ".errors",
    "PackDefError": ".errors",
    "NotPatchedError": ".errors",
    "FlyteError": ".errors",
    "FlyteConnectionError": ".errors",
    "FlyteTimeout": ".errors",
    "FlyteHTTPError": ".errors",
    "FlyteAuthError": ".errors",
    "PackNotFoundError": ".errors",
    "FlyteProtocolError": ".errors",
    "NotRegisteredError": ".errors",
    "DeliveryError": ".errors",
}

if TYPE_CHECKING:
    # What type checkers see instead of the lazy loading below; tests/test_imports.py checks that these
    # imports, _EXPORTS and __all__ name the same things.
    from .client import Client
    from .errors import (
        ConfigError,
        DeliveryError,
        FlyteAuthError,
        FlyteConnectionError,
        FlyteError,
        FlyteHTTPError,
        FlyteProtocolError,
        FlyteTimeout,
        NotPatchedError,
        NotRegisteredError,
        PackDefError,
        PackNotFoundError,
    )
    from .health import Health, flyte_api_health_check
    from .log import current_action
    from .models import FATAL, JSON, Action, Command, Event, EventDef, PackDef, fatal_event
    from .pack import Pack

__all__ = [
    "FATAL",
    "JSON",
    "Action",
    "Client",
    "Command",
    "ConfigError",
    "DeliveryError",
    "Event",
    "EventDef",
    "FlyteAuthError",
    "FlyteConnectionError",
    "FlyteError",
    "FlyteHTTPError",
    "FlyteProtocolError",
    "FlyteTimeout",
    "Health",
    "NotPatchedError",
    "NotRegisteredError",
    "Pack",
    "PackDef",
    "PackDefError",
    "PackNotFoundError",
    "__version__",
    "current_action",
    "fatal_event",
    "flyte_api_health_check",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())

if not TYPE_CHECKING:
    # Hidden from type checkers, which would otherwise type any misspelt name as whatever this returns.

    def __getattr__(name):
        module = _EXPORTS.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return __all__
