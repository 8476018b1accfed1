"""``python -m flyte_gevent``: the same as the ``flyte-gevent`` command."""

from .cli import main

raise SystemExit(main())
