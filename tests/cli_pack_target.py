"""A ready-made ``Pack`` as a ``flyte-gevent run`` target (tests/test_cli.py).

Built at import from ``FLYTE_*`` variables, as a pack author's module might
do. The CLI refuses it (its flags could not apply to a Pack built in advance),
and when ``FLYTE_API`` is not set the import itself fails, which the CLI names.
"""

from cli_targets import _make_pack_def
from flyte_gevent import Pack

pack = Pack.from_env(_make_pack_def("CliReady"), health_port=None, polling_interval=0.5)
