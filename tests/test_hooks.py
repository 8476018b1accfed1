"""What a pack needs besides commands, declared on its PackDef: start/stop hooks, background tasks, health checks.

Each hook is given the running Pack; every runner (a script's ``Pack.from_env``, ``flyte-gevent run``, the gunicorn
hooks, ``running_pack``) builds its Pack from the definition, so each gets them. Also ``pack.spawn`` before
``start()`` (issue #10 item 2): its task begins once the pack is registered, and a task that dies says so once.
"""

import logging

import gevent
import gevent.event
import pytest
import requests

import flyte_gevent._hooks as hooks_module
import flyte_gevent.pack as pack_module
from flyte_gevent import Client, Command, Event, EventDef, FlyteError, Health, Pack, PackDef, PackDefError
from helpers import wait_until

done = EventDef("Done")
tick = EventDef("Tick")


@pytest.fixture
def quick_registration(monkeypatch):
    """Registration retries back off from 1 s; a tenth of that keeps tests short."""
    monkeypatch.setattr(pack_module, "_REGISTER_BACKOFF", (0.1, 0.2))


@pytest.fixture
def quick_restarts(monkeypatch):
    """A background task that raised is restarted after 1 s or more; far less keeps tests short."""
    monkeypatch.setattr(hooks_module, "TASK_RESTART_BACKOFF", (0.05, 0.1))


def echo(input):
    return Event(done, input)


def echo_def(name):
    return PackDef(name, commands=[Command("Echo", echo, [done])], event_defs=[tick])


# --- on_start / on_stop ---------------------------------------------------------------------------------------


def test_on_start_runs_after_registration_and_before_the_first_take(flyte_api, running_pack):
    pack_def = echo_def("Early")
    action = flyte_api.enqueue("Early", "Echo", "hi")
    seen = {}

    @pack_def.on_start
    def warm_up(pack):
        seen["registered"] = pack.registered
        seen["ready"] = pack.ready()
        gevent.sleep(0.3)  # the poller would take the queued action meanwhile, were it running
        seen["takes"] = len(flyte_api.requests_for("take"))
        pack.send_event(Event(tick, "from on_start"))  # registered: a blocking send works

    pack = running_pack(pack_def)
    assert seen["registered"] is True and seen["takes"] == 0
    assert seen["ready"] == (False, "starting: on_start hooks running")
    assert flyte_api.wait_for_events(1, name="Tick")[0].payload == "from on_start"
    assert flyte_api.wait_for_result(action).payload == "hi"
    assert pack.ready() == (True, "ready")


def test_start_hooks_run_in_declaration_order_and_stop_hooks_in_reverse_each_given_the_pack(flyte_api, make_pack):
    pack_def = echo_def("Ordered")
    calls = []
    for name in ("a", "b"):
        pack_def.on_start(lambda pack, name=name: calls.append(("start", name, pack)))
        pack_def.on_stop(lambda pack, name=name: calls.append(("stop", name, pack)))
    pack = make_pack(pack_def, start=True)
    pack.stop()
    assert calls == [("start", "a", pack), ("start", "b", pack), ("stop", "b", pack), ("stop", "a", pack)]


def test_a_failing_on_start_hook_fails_start_stops_the_pack_and_runs_the_stop_hooks(flyte_api, make_pack, caplog):
    pack_def = echo_def("Failing")
    flyte_api.enqueue("Failing", "Echo", "never taken")
    calls = []

    @pack_def.on_start
    def first(pack):
        calls.append("first")

    @pack_def.on_start
    def connect(pack):
        raise ConnectionError("database at db:5432 refused the connection")

    @pack_def.on_start
    def never(pack):
        calls.append("never")

    @pack_def.on_stop
    def close(pack):
        calls.append("close")

    pack = make_pack(pack_def)
    with pytest.raises(ConnectionError, match="refused the connection"):
        pack.start(timeout=5)
    assert calls == ["first", "close"]
    assert pack.live() == (False, "stopped")
    assert pack.ready() == (False, ("on_start hook 'connect' failed: ConnectionError: database at db:5432 refused "
                                    "the connection"))
    assert flyte_api.requests_for("take") == []
    with pytest.raises(RuntimeError, match="cannot be started again"):
        pack.start()
    (record,) = [r for r in caplog.records if "on_start hook" in r.getMessage()]
    assert record.levelno == logging.ERROR and "'connect'" in record.getMessage()


def test_a_failing_on_stop_hook_is_logged_with_its_traceback_and_the_others_still_run(flyte_api, make_pack, caplog):
    pack_def = echo_def("StopFails")
    calls = []

    @pack_def.on_stop
    def last(pack):
        calls.append("last")

    @pack_def.on_stop
    def broken(pack):
        raise RuntimeError("flush failed")

    pack = make_pack(pack_def, start=True)
    pack.stop()
    assert calls == ["last"]
    (record,) = [r for r in caplog.records if "on_stop hook" in r.getMessage()]
    assert record.levelno == logging.ERROR and "'broken'" in record.getMessage() and record.exc_info


def test_on_stop_runs_once_handlers_are_done_and_can_queue_a_last_event(flyte_api, make_pack):
    pack_def = PackDef("Drains", event_defs=[tick])
    finished = []

    @pack_def.command("Slow", output_events=[done])
    def slow(input):
        gevent.sleep(0.4)
        finished.append(input)
        return Event(done, input)

    @pack_def.on_stop
    def goodbye(pack):
        pack.send_event_nowait(Event(tick, {"handlers_finished": list(finished)}))

    action = flyte_api.enqueue("Drains", "Slow", "x")
    pack = make_pack(pack_def, start=True, grace_period=5)
    flyte_api.wait_for_action(action, "PENDING")
    pack.stop()
    assert flyte_api.wait_for_result(action, timeout=1).payload == "x"
    assert flyte_api.wait_for_events(1, name="Tick", timeout=1)[0].payload == {"handlers_finished": ["x"]}


def test_a_stop_during_on_start_interrupts_the_hook_and_start_returns_without_taking(flyte_api, make_pack):
    pack_def = echo_def("Interrupted")
    flyte_api.enqueue("Interrupted", "Echo", "never taken")
    calls = []

    @pack_def.on_start
    def slow_setup(pack):
        calls.append("entered")
        try:
            gevent.sleep(30)
        except gevent.GreenletExit:
            calls.append("interrupted")
            raise

    @pack_def.on_stop
    def cleanup(pack):
        calls.append("cleanup")

    pack = make_pack(pack_def)
    starter = gevent.spawn(pack.start, timeout=5)
    wait_until(lambda: calls, what="the on_start hook")
    pack.stop()
    starter.join(timeout=2)
    assert starter.successful() and starter.value is None
    assert calls == ["entered", "interrupted", "cleanup"]
    assert flyte_api.requests_for("take") == []


# --- background tasks -------------------------------------------------------------------------------------------


def test_background_tasks_start_after_the_start_hooks_and_are_killed_when_stop_begins(flyte_api, make_pack):
    pack_def = PackDef("Background", event_defs=[tick])
    log = []
    task_killed = gevent.event.Event()

    @pack_def.command("Slow", output_events=[done])
    def slow(input):
        task_killed.wait(5)  # past the 2 s grace period unless the stop kills the task before draining handlers
        log.append("handler finished")
        return Event(done, input)

    @pack_def.on_start
    def setup(pack):
        log.append("on_start")

    @pack_def.background
    def ticker(pack):
        log.append("task started")
        try:
            while True:
                pack.send_event_nowait(Event(tick, "tick"))
                gevent.sleep(0.05)
        except gevent.GreenletExit:
            log.append("task killed")
            task_killed.set()
            raise

    action = flyte_api.enqueue("Background", "Slow", "x")
    pack = make_pack(pack_def, start=True, grace_period=2)
    flyte_api.wait_for_events(2, name="Tick")
    flyte_api.wait_for_action(action, "PENDING")
    pack.stop()
    assert log == ["on_start", "task started", "task killed", "handler finished"]
    assert flyte_api.action(action).result["event"] == "Done"


def test_a_background_task_that_raises_is_logged_with_its_traceback_and_restarted(
        flyte_api, make_pack, quick_restarts, caplog, capfd):
    pack_def = PackDef("Restarts", event_defs=[tick])
    runs = []

    @pack_def.background
    def flaky(pack):
        runs.append(len(runs) + 1)
        if len(runs) < 3:
            raise ValueError(f"run {len(runs)} failed")
        pack.send_event_nowait(Event(tick, {"run": len(runs)}))
        gevent.sleep(30)

    make_pack(pack_def, start=True)
    assert flyte_api.wait_for_events(1, name="Tick")[0].payload == {"run": 3}
    failures = [r for r in caplog.records if "background task 'flaky'" in r.getMessage()]
    assert len(failures) == 2
    for number, record in enumerate(failures, 1):
        assert record.levelno == logging.ERROR and record.exc_info and f"run {number} failed" in record.getMessage()
        assert "restarting it in" in record.getMessage()
    assert "Traceback" not in capfd.readouterr().err  # logged by the pack, not printed again by gevent's hub


def test_a_background_task_that_returns_is_finished_and_not_run_again(flyte_api, make_pack, quick_restarts):
    pack_def = PackDef("OneShot")
    runs = []
    pack_def.background(lambda pack: runs.append(pack))  # noqa: PLW0108 - a hook of its own, not list.append
    pack = make_pack(pack_def, start=True)
    gevent.sleep(0.3)
    assert runs == [pack]


# --- health checks ----------------------------------------------------------------------------------------------


def test_health_checks_declared_on_the_definition_get_the_pack_and_join_the_pack_arguments_checks(flyte_api,
                                                                                                make_pack):
    pack_def = echo_def("Checked")

    @pack_def.health_check
    def upstream(pack):
        return "Upstream", Health(pack.registered, f"seen by {pack.pack_id}")

    @pack_def.health_check
    def broken(pack):
        raise OSError("no route to host")

    def legacy():
        return "Legacy", Health(True, "given to Pack()")

    pack = make_pack(pack_def, start=True, health_port=0, health_checks=[legacy])
    response = requests.get(f"http://127.0.0.1:{pack.health_port}/", timeout=3)
    assert response.status_code == 500
    assert response.json() == {
        "Legacy": {"healthy": True, "status": "given to Pack()"},
        "Upstream": {"healthy": True, "status": "seen by Checked"},
        "broken": {"healthy": False, "status": "OSError: no route to host"},
    }


# --- declaring them ---------------------------------------------------------------------------------------------


def test_the_decorators_return_the_function_and_the_lists_keep_declaration_order():
    pack_def = PackDef("Declared")

    def a(pack):
        pass

    def b(pack):
        pass

    assert pack_def.on_start(a) is a and pack_def.on_start(b) is b
    assert pack_def.on_stop(a) is a and pack_def.background(a) is a and pack_def.health_check(a) is a
    assert pack_def.start_hooks == [a, b]
    assert (pack_def.stop_hooks, pack_def.background_tasks, pack_def.health_checks) == ([a], [a], [a])


@pytest.mark.parametrize("decorator", ["on_start", "on_stop", "background", "health_check"])
def test_a_hook_that_is_not_callable_or_declared_twice_is_refused_where_it_is_declared(decorator):
    pack_def = PackDef("Refused")

    def hook(pack):
        pass

    getattr(pack_def, decorator)(hook)
    with pytest.raises(PackDefError, match=rf"invalid pack definition 'Refused': {decorator} hook 'hook' is "
                                           r"declared twice"):
        getattr(pack_def, decorator)(hook)
    with pytest.raises(PackDefError, match=rf"invalid pack definition 'Refused': {decorator}: 42 is not callable"):
        getattr(pack_def, decorator)(42)
    getattr(pack_def, {"on_start": "start_hooks", "on_stop": "stop_hooks", "background": "background_tasks",
                       "health_check": "health_checks"}[decorator]).append("not callable")
    with pytest.raises(PackDefError, match=rf"{decorator}: 'not callable' is not callable"):
        pack_def.validate()


def test_with_labels_and_from_env_keep_the_hooks():
    pack_def = echo_def("Copied")
    hooks = [pack_def.on_start(lambda pack: None), pack_def.on_stop(lambda pack: None),
             pack_def.background(lambda pack: None), pack_def.health_check(lambda pack: ("x", Health(True)))]
    labelled = pack_def.with_labels({"env": "dev"})
    assert [labelled.start_hooks, labelled.stop_hooks, labelled.background_tasks, labelled.health_checks] == \
        [[hook] for hook in hooks]
    labelled.on_start(lambda pack: None)
    assert len(pack_def.start_hooks) == 1  # a copy, not a view
    pack = Pack.from_env(pack_def, {"FLYTE_API": "http://flyte:8080", "FLYTE_LABELS": "env=prod"}, health_port=None)
    assert pack.pack_def.id == "Copied.env.prod" and pack.pack_def.start_hooks == [hooks[0]]


# --- pack.spawn (issue #10 item 2) -----------------------------------------------------------------------------


def test_a_task_spawned_before_start_begins_once_the_pack_is_registered(flyte_api, make_pack, quick_registration):
    flyte_api.fail("register", 503, times=2)
    pack_def = PackDef("SpawnedEarly", event_defs=[tick])
    pack = make_pack(pack_def)
    seen = []

    def announce(pack):
        seen.append(pack.registered)
        pack.send_event(Event(tick, "first"))

    task = pack.spawn(announce, pack)
    gevent.sleep(0.05)
    assert seen == []  # not before start()
    pack.start(timeout=5)
    assert flyte_api.wait_for_events(1, name="Tick")[0].payload == "first"
    task.join(timeout=2)
    assert seen == [True] and task.successful()


def test_a_spawned_task_that_dies_is_logged_once_and_not_printed_again_by_the_hub(flyte_api, make_pack, caplog,
                                                                                  capfd):
    pack = make_pack(PackDef("SpawnDies"), start=True)

    def broken(pack):
        raise KeyError("missing")

    task = pack.spawn(broken, pack)
    task.join(timeout=2)
    gevent.sleep(0.05)
    failures = [r for r in caplog.records if "task:broken" in r.getMessage() or "'broken'" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info and failures[0].levelno == logging.ERROR
    assert "Traceback" not in capfd.readouterr().err
    assert pack.live() == (True, "alive")


def test_a_task_spawned_before_a_start_that_fails_never_runs(flyte_api, make_pack):
    flyte_api.fail("register", 400)
    pack = make_pack(PackDef("NeverRuns"))
    ran = []
    task = pack.spawn(ran.append, "ran")
    with pytest.raises(FlyteError):
        pack.start(timeout=2)
    pack.stop()
    assert task.dead and ran == []


def test_a_pack_built_from_a_definition_with_hooks_by_the_testing_kit_runs_them(flyte_api, running_pack):
    pack_def = PackDef("KitHooks", event_defs=[tick])
    pack_def.background(lambda pack: pack.send_event_nowait(Event(tick, pack.pack_id)))
    running_pack(pack_def, labels={"team": "kit"})
    assert flyte_api.wait_for_events(1, name="Tick")[0].payload == "KitHooks.team.kit"


def test_a_pack_given_to_pack_directly_gets_the_hooks_too(flyte_api):
    pack_def = PackDef("Direct", event_defs=[tick])
    pack_def.on_start(lambda pack: pack.send_event(Event(tick, "direct")))
    pack = Pack(pack_def, Client(flyte_api.url), health_port=None, flush_timeout=1)
    try:
        pack.start(timeout=5)
        assert flyte_api.wait_for_events(1, name="Tick")[0].payload == "direct"
    finally:
        pack.stop(grace_period=0)
