"""gunicorn settings for the example: gevent workers that each run the Flyte pack named by FLYTE_PACK.

    cd examples/gunicorn_app
    FLYTE_API=http://localhost:8080 gunicorn -c gunicorn_conf.py app:application

Settings given on the command line (``--bind``, ``--workers``...) win over these.
"""

import os

from flyte_gevent.gunicorn import post_worker_init, worker_exit  # noqa: F401 - gunicorn calls hooks by name
from flyte_gevent.log import configure

# The pack each worker runs, unless the environment names another one.
os.environ.setdefault("FLYTE_PACK", "greeter_pack:pack_def")

worker_class = "gevent"        # required: the hooks need gevent's patched worker
workers = 2                    # two workers = two replicas of pack "Greeter.app.gunicorn-example"
bind = "127.0.0.1:8000"
graceful_timeout = 30          # the pack's drain is fitted into this (and into timeout)
timeout = 30                   # a worker whose hub is blocked this long is killed: keep handlers cooperative

# The library only adds a NullHandler: send its records (and the pack's own
# logger's) to stderr, each with the id and command of the action it belongs to.
configure(os.environ.get("FLYTE_GEVENT_LOG_LEVEL", "info"), os.environ.get("FLYTE_GEVENT_LOG_FORMAT", "text"))
