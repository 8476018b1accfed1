"""The pack under test: a real flyte_gevent pack, run as its own process by ``bench/run.py``.

Its process is measured from outside (CPU from ``/proc/<pid>/stat``, memory from
``/proc/<pid>/status``), so it does nothing the benchmark does not need: it
registers pack ``Bench`` with three commands and runs until SIGTERM, with the
library's defaults except for the options given on the command line.

* ``Noop`` echoes its input back as ``Done`` (the trivial handler);
* ``Sleep`` sleeps *input* seconds, then answers ``Done`` (an IO-bound handler);
* ``Hold`` waits until the process gets SIGUSR1 (or *input* seconds pass), so
  the benchmark can hold many actions in flight while it reads the RSS.

With ``--profile FILE`` the whole run is profiled with cProfile and the stats
are written to FILE at exit (``python -m pstats FILE`` reads them). With
``--journal DIR`` the pack keeps its crash journal there (``Pack(journal=)``),
which is how ``bench/run.py`` measures what the journal costs.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import cProfile  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402

from flyte_gevent import Client, Command, Event, EventDef, Pack, PackDef  # noqa: E402

PACK_NAME = "Bench"

done = EventDef("Done")
released = gevent.event.Event()


def noop(input):
    return Event(done, input)


def sleep(input):
    gevent.sleep(float(input))
    return Event(done)


def hold(input):
    released.wait(float(input))
    return Event(done)


pack_def = PackDef(PACK_NAME, commands=[
    Command("Noop", noop, [done]),
    Command("Sleep", sleep, [done]),
    Command("Hold", hold, [done]),
])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", required=True, help="Flyte API URL")
    parser.add_argument("--max-in-flight", type=int, default=None)
    parser.add_argument("--max-takers", type=int, default=None)
    parser.add_argument("--polling-interval", type=float, default=None)
    parser.add_argument("--no-metrics", action="store_true", help="run without Prometheus metrics")
    parser.add_argument("--profile", metavar="FILE", help="write cProfile stats of the whole run to FILE")
    parser.add_argument("--journal", metavar="DIR", help="keep the crash journal in DIR (default: no journal)")
    parser.add_argument("--journal-sync", choices=("normal", "full"), default=None, help="the journal's sync mode")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = {"health_port": 0}
    if args.max_in_flight is not None:
        options["max_in_flight"] = args.max_in_flight
    if args.max_takers is not None:
        options["max_takers"] = args.max_takers
    if args.polling_interval is not None:
        options["polling_interval"] = args.polling_interval
    if args.no_metrics:
        options["metrics"] = False
    if args.journal is not None:
        options["journal"] = args.journal
    if args.journal_sync is not None:
        options["journal_sync"] = args.journal_sync
    pack = Pack(pack_def, Client(args.api), **options)
    gevent.signal_handler(signal.SIGUSR1, released.set)

    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    try:
        pack.run()
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)


if __name__ == "__main__":
    main()
