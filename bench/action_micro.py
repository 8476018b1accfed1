"""What one action costs besides the network, step by step, and the memory floor of a greenlet in flight.

    .venv/bin/python bench/action_micro.py [--json]

CPU: each step is timed in a loop (best of 7 rounds of ``time.process_time``, gevent-patched as a pack
is), the fast path beside what it replaced where there is one:

* loading a take answer: :func:`flyte_gevent.schemas.load_action` against ``ActionSchema().load``;
* encoding a result body: ``encode_event`` against the schema path (``EventBodySchema().dump`` + ``json.dumps``);
* resolving a result URL never seen before, its host known from the take URL, against parsing it in full;
* the metrics of one action: the pack's series against prometheus_client's own Counter/Gauge/Histogram;
* running a trivial action in the current greenlet (handler, result encoding; delivery stubbed out);
* a greenlet of the action pool running a Python function, against one running a C function: the difference
  is CPython giving every new greenlet its own 16 KB frame stack (an ``mmap``, a page fault, a ``munmap``).

Memory: RSS per greenlet of 5,000 Pool greenlets each waiting in ``Event.wait(30)``, measured as the bench's
``memory`` scenario measures a pack (after a small warm-up): what any gevent pack pays per action in flight
before it keeps anything of its own.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.pool  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TAKE_BODY = (b'{"command":"Noop","input":{"n":1},"links":[{"href":"http://127.0.0.1:8080/v1/packs/Bench/actions/'
             b'0123456789abcdef01234567/result","rel":"http://127.0.0.1:8080/swagger#/actionResult"}]}')


def best(step, loops=5000, rounds=7):
    """Microseconds of CPU per call of *step*: the best of *rounds* rounds of *loops* calls."""
    times = []
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(loops):
            step()
        times.append((time.process_time() - started) / loops * 1e6)
    return min(times)


def cpu_steps():
    import prometheus_client

    from flyte_gevent import Command, Event, EventDef
    from flyte_gevent._actions import ActionRunner
    from flyte_gevent._delivery import ACCEPTED, Delivered
    from flyte_gevent._http import HTTPPool
    from flyte_gevent.metrics import Metrics, NullMetrics
    from flyte_gevent.schemas import ActionSchema, EventBodySchema, encode_event, load_action

    schema = ActionSchema()
    done = EventDef("Done")
    event = Event(done, {"n": 1})
    body_schema = EventBodySchema()

    def schema_encode():
        dumped = body_schema.dump({"event": event.name, "payload": event.payload,
                                   "created_at": datetime.datetime.now(datetime.UTC)})
        return json.dumps(dumped, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()

    pool = HTTPPool(10)
    pool._resolve("http://127.0.0.1:8080/v1/packs/Bench/actions/take")
    urls = iter([f"http://127.0.0.1:8080/v1/packs/Bench/actions/{i:024x}/result" for i in range(10 ** 6)])

    metrics = Metrics("Bench", ["Noop"])
    registry = prometheus_client.CollectorRegistry()
    taken = prometheus_client.Counter("taken", "", ["command"], registry=registry)
    completed = prometheus_client.Counter("completed", "", ["command", "outcome"], registry=registry)
    duration = prometheus_client.Histogram("duration", "", ["command"], registry=registry)
    in_flight = prometheus_client.Gauge("in_flight", "", registry=registry)

    def prometheus_objects():
        taken.labels("Noop").inc()
        in_flight.inc()
        completed.labels("Noop", "success").inc()
        duration.labels("Noop").observe(0.0012)
        in_flight.dec()

    class Delivered202:
        def __init__(self):
            self.events = []

        def deliver_result(self, action, body, event_name, recovered=False):
            self.events.append(event_name)
            return Delivered(ACCEPTED, event_name, 1, None, None, True)

    commands = {"Noop": Command("Noop", lambda value: Event(done, value), [done])}
    delivery = Delivered202()
    runner = ActionRunner("Bench", commands, delivery, NullMetrics())
    action = load_action(json.loads(TAKE_BODY))
    runner.run(action)
    if delivery.events != ["Done"]:  # a stub out of step with the runner would time its error path instead
        raise SystemExit(f"action_micro: the trivial action did not run to its result: {delivery.events}")
    actions = gevent.pool.Pool(100)

    def python_function():
        return None

    return {
        "load a take answer: load_action": best(lambda: load_action(json.loads(TAKE_BODY))),
        "load a take answer: ActionSchema().load": best(lambda: schema.load(json.loads(TAKE_BODY))),
        "encode a result: encode_event": best(lambda: encode_event(event)),
        "encode a result: the schema path": best(schema_encode),
        "resolve a new result URL: its host met before": best(lambda: pool._resolve(next(urls))),
        "resolve a new result URL: parsed in full": best(lambda: (pool._prefixes.clear(), pool._resolve(next(urls)))),
        "metrics of one action: the pack's series": best(
            lambda: (metrics.action_taken("Noop"), metrics.action_completed("Noop", "success", 0.0012))),
        "metrics of one action: prometheus_client objects": best(prometheus_objects),
        "run a trivial action (delivery stubbed)": best(lambda: runner.run(action)),
        "pool greenlet running a Python function": best(lambda: actions.spawn(python_function).join()),
        "pool greenlet running a C function": best(lambda: actions.spawn(len, ()).join()),
    }


def memory_floor(count=5000):
    """RSS (KB) per Pool greenlet waiting in Event.wait(30), in a fresh process."""
    code = f"""
from gevent import monkey; monkey.patch_all()
import gc, gevent, gevent.event, gevent.pool
released, started = gevent.event.Event(), [0]
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
def hold():
    started[0] += 1
    released.wait(30)
pool = gevent.pool.Pool({count})
for _ in range(50):
    pool.spawn(len, ())
pool.join(); gevent.sleep(0.5); gc.collect()
before = rss()
for _ in range({count}):
    pool.spawn(hold)
while started[0] < {count}:
    gevent.sleep(0.05)
gevent.sleep(0.5)
print((rss() - before) / {count})
released.set(); pool.join()
"""
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                timeout=120).stdout)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    gc.collect()
    steps = cpu_steps()
    floor = memory_floor()
    if args.json:
        print(json.dumps({"cpu_us": steps, "greenlet_rss_kb": floor}, indent=2))
        return 0
    print(f"CPU per call, best of 7 rounds (Python {sys.version.split()[0]}, load {os.getloadavg()[0]:.2f})")
    for name, micros in steps.items():
        print(f"  {name:<50} {micros:7.1f} µs")
    print(f"RSS per Pool greenlet waiting in Event.wait(30), 5,000 of them: {floor:.2f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
