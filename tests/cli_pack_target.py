"""A ready-made ``Pack`` as a ``flyte-gevent run`` target (tests/test_cli.py).

Built at import from ``FLYTE_*`` variables, as a pack author's module might
do; the CLI then uses it as it is.
"""

from flyte_gevent import Pack

from cli_targets import _make_pack_def

pack = Pack.from_env(_make_pack_def("CliReady"), health_port=None, polling_interval=0.5)
