"""The pack the example web app runs in each gunicorn worker: a typed ``Greet`` command.

``Greet`` takes ``{"name": "Ada", "delay_s": 0.5}`` (``delay_s`` optional, for
trying out shutdown with an action in flight), validated by a marshmallow
schema before the handler runs, and answers ``Greeted {"greeting": "Hello, Ada!",
"worker_pid": 4242}``. Bad input completes the action as FATAL with one
``field: message`` line per problem. The web app (``app.py``) lists the greetings
its worker made: the pack and the app share the process.

gunicorn finds it through ``FLYTE_PACK=greeter_pack:pack_def``.
"""

import collections
import dataclasses
import logging
import os
from typing import Any

import gevent
from marshmallow import Schema, fields, validate

from flyte_gevent import Event, EventDef, PackDef

log = logging.getLogger("greeter")

#: The latest greetings made by this worker, newest last (read by app.py).
recent_greetings: collections.deque[str] = collections.deque(maxlen=20)


@dataclasses.dataclass(frozen=True)
class Greeting:
    greeting: str
    worker_pid: int


class GreetInput(Schema):
    name = fields.String(required=True, validate=validate.Length(min=1, max=100))
    delay_s = fields.Float(load_default=0.0, validate=validate.Range(min=0, max=30))


greeted = EventDef("Greeted")

pack_def = PackDef("Greeter", labels={"app": "gunicorn-example"})


@pack_def.command("Greet", output_events=[greeted], input_schema=GreetInput)
def greet(input: dict[str, Any]) -> Event[Greeting]:
    """*input* is what ``GreetInput`` loaded: a dict with ``name`` and ``delay_s``."""
    gevent.sleep(input["delay_s"])  # cooperative: the worker keeps serving HTTP meanwhile
    greeting = Greeting(f"Hello, {input['name']}!", os.getpid())
    recent_greetings.append(greeting.greeting)
    log.info("greeted %s", input["name"])
    return Event(greeted, greeting)  # a dataclass payload travels as a JSON object
