"""Crash-safe actions: a pack with a journal that is killed strands nothing it took (issue #11).

The tests that matter kill real processes: ``flyte-gevent run crash_pack:pack_def`` (tests/crash_pack.py) is
started against the in-process fake Flyte API, SIGKILLed with actions in flight, and started again on the same
journal directory. The in-process tests below them cover what recovery decides for each kind of record; there
"a process that took an action and died" is a :class:`Journal` that recorded it and was closed with the record
still in it (both leave an unlocked file behind), for an action taken from the fake with a plain Client.
"""

import logging
import os
import subprocess
import sys

import pytest

from crash_pack import PACK_NAME, pack_def
from flyte_gevent import Client, Event
from flyte_gevent._journal import Journal
from flyte_gevent.errors import ConfigError, PackDefError
from flyte_gevent.models import Command, EventDef
from flyte_gevent.schemas import encode_event
from helpers import BackgroundProcess, wait_until

TESTS = os.path.dirname(os.path.abspath(__file__))
FLYTE_GEVENT = os.path.join(os.path.dirname(sys.executable), "flyte-gevent")
RESTARTED = "pack restarted while this action was running"
SHUTDOWN = "pack shutting down"
TIMEOUT = 15  # seconds any one wait on a pack process may take


# -- pack processes -----------------------------------------------------------------------------------------------

class PackProcess(BackgroundProcess):
    """``flyte-gevent run crash_pack:pack_def`` as a child, its output in files so it can be read while it runs."""

    def __init__(self, env, directory):
        super().__init__([FLYTE_GEVENT, "run", "crash_pack:pack_def"], env, directory, cwd=TESTS)

    def started(self):
        """Ids of the actions whose handler this process started (so their journal record was written)."""
        return {line.split()[1] for line in self.stdout().splitlines() if line.startswith("started ")}

    def log(self):
        return self.stderr()

    def stop(self):
        """SIGTERM and wait; ``(returncode, log)``."""
        return self.terminate(TIMEOUT), self.log()


@pytest.fixture
def journal_dir(tmp_path):
    return tmp_path / "journal"


@pytest.fixture
def packs(flyte_api, subprocess_env, journal_dir, tmp_path):
    """``packs(hold=False, **env)``: a pack process on the shared journal directory; all killed at the end."""
    started = []

    def start(hold=False, **env):
        environment = dict(subprocess_env, FLYTE_API=flyte_api.url, FLYTE_HEALTH_PORT="off",
                           FLYTE_GEVENT_POLLING_INTERVAL="0.5", FLYTE_GEVENT_GRACE_PERIOD="1",
                           FLYTE_GEVENT_FLUSH_TIMEOUT="2", FLYTE_GEVENT_LOG_LEVEL="debug",
                           FLYTE_GEVENT_JOURNAL=str(journal_dir), **env)
        if hold:
            environment["CRASH_PACK_HOLD"] = "1"
        process = PackProcess(environment, tmp_path / f"pack-{len(started) + 1}")
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


def wait_for_registrations(flyte_api, count):
    wait_until(lambda: PACK_NAME in flyte_api.packs and flyte_api.packs[PACK_NAME].registrations >= count,
               TIMEOUT, f"{count} registrations of {PACK_NAME}")


def assert_posted_once(flyte_api, ids):
    posts = {aid: flyte_api.action(aid).result_posts for aid in ids}
    assert set(posts.values()) == {1}, f"results posted more or less than once: {posts}"


def journal_files(directory):
    return sorted(os.listdir(directory)) if directory.exists() else []


# -- a killed pack, started again ---------------------------------------------------------------------------------

def test_a_pack_killed_with_50_actions_in_flight_completes_each_once_when_it_starts_again(flyte_api, packs,
                                                                                          journal_dir):
    first = packs(hold=True)
    wait_for_registrations(flyte_api, 1)
    held = flyte_api.enqueue_many(PACK_NAME, "Hold", [{"n": n} for n in range(25)])
    rerun = flyte_api.enqueue_many(PACK_NAME, "Redo", [{"n": n} for n in range(25)])
    wait_until(lambda: first.started() == set(held + rerun), TIMEOUT, "all 50 handlers running")
    first.kill()
    assert {flyte_api.action(aid).state for aid in held + rerun} == {"PENDING"}

    second = packs()
    flyte_api.wait_for_results(held + rerun, timeout=TIMEOUT)
    for aid in held:  # cut short, and not declared safe to run again
        assert flyte_api.action(aid).result["event"] == "FATAL"
        assert flyte_api.action(aid).result["payload"] == RESTARTED
    for n, aid in enumerate(rerun):  # run again by the new process, with the input it was taken with
        assert flyte_api.action(aid).result["payload"] == {"input": {"n": n}, "pid": second.pid}
    assert_posted_once(flyte_api, held + rerun)
    assert not flyte_api.pending() and not flyte_api.new()
    assert second.started() == set(rerun)  # only the declared commands ran again

    code, log = second.stop()
    assert code == 0, log
    assert "recovered 50 actions from the journal: 0 with a result to deliver, 25 to run again, 25 cut short" in log
    assert log.count("recovering action ") == 50  # one DEBUG line per action
    assert "Traceback" not in log
    assert journal_files(journal_dir) == []  # every record finished, every file removed


def test_results_finished_during_an_outage_are_delivered_by_the_next_start_after_a_sigkill(flyte_api, packs,
                                                                                       journal_dir):
    first = packs()
    wait_for_registrations(flyte_api, 1)
    flyte_api.fail("result", 503, times=None)  # the API is down for results
    ids = flyte_api.enqueue_many(PACK_NAME, "Echo", [{"n": n} for n in range(10)])

    def retried():
        # A second attempt comes at least 0.5 s after the first: by then the result is long in the journal.
        attempts = [r.path for r in flyte_api.requests_for("result")]
        return all(sum(aid in path for path in attempts) >= 2 for aid in ids)
    wait_until(retried, TIMEOUT, "every result posted and refused twice")
    first.kill()
    flyte_api.clear_faults()  # the API is back
    assert {flyte_api.action(aid).state for aid in ids} == {"PENDING"}

    second = packs()
    results = flyte_api.wait_for_results(ids, timeout=TIMEOUT)
    # The results the killed process computed, not new ones.
    assert [r.payload for r in results] == [{"input": {"n": n}, "pid": first.pid} for n in range(10)]
    assert_posted_once(flyte_api, ids)
    code, log = second.stop()
    assert code == 0, log
    assert "recovered 10 actions from the journal: 10 with a result to deliver" in log
    assert journal_files(journal_dir) == []


def test_of_two_processes_sharing_a_journal_the_killed_ones_actions_are_recovered_once_by_the_next(
        flyte_api, packs, journal_dir):
    # Ten slots each, so twenty actions are split between them, ten each.
    first = packs(hold=True, FLYTE_GEVENT_MAX_IN_FLIGHT="10")
    survivor = packs(hold=True, FLYTE_GEVENT_MAX_IN_FLIGHT="10")
    wait_for_registrations(flyte_api, 2)
    ids = flyte_api.enqueue_many(PACK_NAME, "Hold", [{"n": n} for n in range(20)])
    wait_until(lambda: len(first.started()) == 10 and len(survivor.started()) == 10, TIMEOUT,
               "ten handlers running in each process")
    killed, alive = first.started(), survivor.started()
    first.kill()

    third = packs()
    flyte_api.wait_for_results(sorted(killed), timeout=TIMEOUT)
    for aid in killed:
        assert flyte_api.action(aid).result["payload"] == RESTARTED
    # The survivor's file is locked by a live process: its actions are still its own.
    assert {flyte_api.action(aid).state for aid in alive} == {"PENDING"}
    assert third.started() == set()

    code, log = survivor.stop()  # its handlers are cut short by the shutdown
    assert code == 0, log
    for aid in alive:
        assert flyte_api.action(aid).result["payload"] == SHUTDOWN
    code, log = third.stop()
    assert code == 0, log
    assert "recovered 10 actions from the journal: 0 with a result to deliver, 0 to run again, 10 cut short" in log
    assert_posted_once(flyte_api, ids)
    assert journal_files(journal_dir) == []


# -- a journal that cannot be used --------------------------------------------------------------------------------

def _not_a_database(directory):
    directory.mkdir()
    path = directory / "flyte-20260101T000000000000-0badf00d.db"
    path.write_bytes(b"this is not an SQLite database\n" * 200)
    return {"FLYTE_GEVENT_JOURNAL": str(directory)}, str(path)


def _a_regular_file(directory):
    directory.parent.mkdir(parents=True, exist_ok=True)
    directory.write_text("a file where the journal directory should be\n")
    return {"FLYTE_GEVENT_JOURNAL": str(directory)}, str(directory)


def _an_unknown_sync_mode(directory):
    return {"FLYTE_GEVENT_JOURNAL": str(directory), "FLYTE_GEVENT_JOURNAL_SYNC": "sometimes"}, "sometimes"


@pytest.mark.parametrize("make, setting", [
    (_not_a_database, "FLYTE_GEVENT_JOURNAL"),
    (_a_regular_file, "FLYTE_GEVENT_JOURNAL"),
    (_an_unknown_sync_mode, "FLYTE_GEVENT_JOURNAL_SYNC"),
], ids=["corrupt-file", "not-a-directory", "bad-sync-mode"])
def test_a_journal_that_cannot_be_used_stops_the_start_with_exit_78_before_any_request(
        make, setting, flyte_api, subprocess_env, journal_dir):
    env, named = make(journal_dir)
    env = dict(subprocess_env, FLYTE_API=flyte_api.url, FLYTE_HEALTH_PORT="off", **env)
    result = subprocess.run([FLYTE_GEVENT, "run", "crash_pack:pack_def"], cwd=TESTS, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 78, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert setting in lines[0] and named in lines[0]
    assert flyte_api.requests == []  # never a silent skip, and nothing registered first


# -- what recovery does with each record (in process) -------------------------------------------------------------

@pytest.fixture
def registry():
    prometheus_client = pytest.importorskip("prometheus_client")
    return prometheus_client.CollectorRegistry()


@pytest.fixture
def take(flyte_api):
    """``take(command, input)``: an action of Crashy taken from the fake, as a pack process would before dying."""
    client = Client(flyte_api.url, timeout=5.0)
    registration = client.register(pack_def)

    def take_one(command, input=None):
        flyte_api.enqueue(PACK_NAME, command, input)
        return client.take(registration.take_url)

    yield take_one
    client.close()


def left_by_a_dead_process(directory, *records, pack_id=PACK_NAME):
    """Write ``(action, result body or None)`` records and let go of the file, as a killed owner would."""
    journal = Journal(directory, pack_id)
    journal.open()
    for action, result in records:
        journal.taken(action)
        if result is not None:
            journal.result(action.id, result)
    assert journal.close() == len(records)


def body(payload, event="Done"):
    return encode_event(Event(EventDef(event), payload))


def recovered(registry, outcome):
    return registry.get_sample_value("flyte_pack_actions_recovered_total", {"outcome": outcome}) or 0


def test_a_recorded_result_is_delivered_and_one_that_had_landed_is_not_applied_twice(
        flyte_api, take, make_pack, journal_dir, registry, caplog):
    unsent, landed = take("Echo", {"n": 1}), take("Echo", {"n": 2})
    Client(flyte_api.url).post_result(landed.result_url, body({"first": True}))  # its removal never got written
    left_by_a_dead_process(journal_dir, (unsent, body({"from": "the dead"})), (landed, body({"first": False})))

    with caplog.at_level(logging.INFO, logger="flyte_gevent"):
        pack = make_pack(pack_def, start=True, journal=str(journal_dir), metrics=registry)
        flyte_api.wait_for_result(unsent.id)
        wait_until(lambda: flyte_api.action(landed.id).result_posts == 2, what="the landed result posted again")
        pack.stop()
    assert flyte_api.action(unsent.id).result["payload"] == {"from": "the dead"}
    assert flyte_api.action(landed.id).result["payload"] == {"first": True}  # the server kept the first
    assert "already" in caplog.text and "lost" not in caplog.text
    assert recovered(registry, "result") == 2
    assert registry.get_sample_value("flyte_pack_results_lost_total") == 0
    assert journal_files(journal_dir) == []


def test_a_declared_command_runs_again_once_and_a_rerun_that_died_too_is_fatal(
        flyte_api, take, make_pack, journal_dir, registry):
    first_time, died_twice, not_declared = take("Redo", {"n": 1}), take("Redo", {"n": 2}), take("Hold", {"n": 3})
    left_by_a_dead_process(journal_dir, (died_twice, None))
    adopter = Journal(journal_dir, PACK_NAME)  # adopted it, ran it again, and died too
    adopter.open()
    assert [r.restarts for r in adopter.recover()] == [1]
    adopter.close()
    left_by_a_dead_process(journal_dir, (first_time, None), (not_declared, None))

    pack = make_pack(pack_def, start=True, journal=str(journal_dir), metrics=registry)
    flyte_api.wait_for_results([first_time.id, died_twice.id, not_declared.id])
    pack.stop()
    assert flyte_api.action(first_time.id).result["payload"] == {"input": {"n": 1}, "pid": os.getpid()}
    assert flyte_api.action(died_twice.id).result == {"event": "FATAL", "payload": RESTARTED,
                                                      "createdAt": flyte_api.action(died_twice.id).result["createdAt"]}
    assert flyte_api.action(not_declared.id).result["payload"] == RESTARTED
    assert (recovered(registry, "rerun"), recovered(registry, "fatal")) == (1, 2)
    # Recovered actions are not counted as taken by this process.
    assert registry.get_sample_value("flyte_pack_actions_taken_total", {"command": "Redo"}) is None
    assert journal_files(journal_dir) == []


def test_a_record_for_another_api_is_reported_and_dropped_never_posted(flyte_api, take, make_pack, journal_dir,
                                                                        registry, caplog):
    elsewhere = take("Echo")
    elsewhere = type(elsewhere)(elsewhere.id, elsewhere.command, elsewhere.input,
                                f"http://other-flyte.example:8080/v1/packs/{PACK_NAME}/actions/{elsewhere.id}/result")
    left_by_a_dead_process(journal_dir, (elsewhere, body({"secret": "result"})))

    with caplog.at_level(logging.ERROR, logger="flyte_gevent"):
        pack = make_pack(pack_def, start=True, journal=str(journal_dir), metrics=registry)
        wait_until(lambda: recovered(registry, "other_api") == 1, what="the record reported")
        pack.stop()
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert elsewhere.id in error.getMessage() and "http://other-flyte.example:8080" in error.getMessage()
    assert flyte_api.requests_for("result") == []
    assert registry.get_sample_value("flyte_pack_results_lost_total") == 1
    assert journal_files(journal_dir) == []  # not kept to be reported again at every start


def test_results_not_delivered_by_a_clean_stop_stay_in_the_journal_for_the_next_start(
        flyte_api, make_pack, journal_dir, caplog):
    flyte_api.fail("result", 503, times=None)
    pack = make_pack(pack_def, start=True, journal=str(journal_dir))
    aid = flyte_api.enqueue(PACK_NAME, "Echo", {"n": 1})
    wait_until(lambda: flyte_api.requests_for("result"), what="the result posted and refused")
    with caplog.at_level(logging.INFO, logger="flyte_gevent"):
        pack.stop(grace_period=0, flush_timeout=0)
    assert "1 records kept" in caplog.text
    assert flyte_api.action(aid).state == "PENDING"

    flyte_api.clear_faults()
    make_pack(pack_def, start=True, journal=str(journal_dir)).stop()  # stop() waits for the delivery
    assert flyte_api.action(aid).result["payload"] == {"input": {"n": 1}, "pid": os.getpid()}
    assert flyte_api.action(aid).result_posts == 1
    assert journal_files(journal_dir) == []


def test_recovered_actions_that_do_not_fit_in_the_pool_go_first_and_takes_wait_for_them(
        flyte_api, take, make_pack, journal_dir):
    left = [take("Hold", {"n": n}) for n in range(5)]
    left_by_a_dead_process(journal_dir, *[(action, None) for action in left])
    new = flyte_api.enqueue(PACK_NAME, "Echo", {"n": "new"})

    # One slot: the recovered actions take it in turn, and the pool is full when takes may begin.
    pack = make_pack(pack_def, start=True, journal=str(journal_dir), max_in_flight=1)
    flyte_api.wait_for_results([action.id for action in left] + [new])
    pack.stop()
    assert all(flyte_api.action(action.id).result["payload"] == RESTARTED for action in left)
    finished = sorted(flyte_api.action(action.id).completed_at for action in left)
    assert flyte_api.action(new).taken_at > finished[3]  # the fifth had the slot before the first take
    assert journal_files(journal_dir) == []


def test_a_running_pack_adopts_the_journal_of_a_process_that_died_beside_it(
        flyte_api, take, make_pack, journal_dir, monkeypatch):
    monkeypatch.setattr("flyte_gevent._recovery._ADOPT_INTERVAL", 0.2)
    action = take("Hold")  # before the pack runs: it would race the test's take for the action
    pack = make_pack(pack_def, start=True, journal=str(journal_dir))
    left_by_a_dead_process(journal_dir, (action, None))  # a sibling worker, killed, that nobody restarts
    assert flyte_api.wait_for_result(action.id).payload == RESTARTED
    pack.stop()
    assert journal_files(journal_dir) == []


def test_an_action_whose_record_cannot_be_written_still_runs_to_its_result(flyte_api, make_pack, journal_dir,
                                                                           registry, caplog):
    pack = make_pack(pack_def, start=True, journal=str(journal_dir), metrics=registry)
    journal = pack._journal  # white box: the only way to make SQLite refuse a write without a full disk
    own = journal._own
    pages = journal._writer.call(lambda: own.conn.execute("PRAGMA page_count").fetchone()[0])
    journal._writer.call(lambda: own.conn.execute(f"PRAGMA max_page_count = {pages}"))
    with caplog.at_level(logging.ERROR, logger="flyte_gevent"):
        aid = flyte_api.enqueue(PACK_NAME, "Echo", {"big": "x" * 100_000})
        assert flyte_api.wait_for_result(aid).payload["input"] == {"big": "x" * 100_000}
    assert f"action {aid} runs without its journal record" in caplog.text
    assert registry.get_sample_value("flyte_pack_actions_unjournaled_total") == 1
    pack.stop()


def test_a_start_that_fails_lets_go_of_the_journal_and_can_be_tried_again(flyte_api, make_pack, journal_dir, take):
    action = take("Hold")
    left_by_a_dead_process(journal_dir, (action, None))
    flyte_api.outage()
    pack = make_pack(pack_def, journal=str(journal_dir))
    with pytest.raises(Exception, match="could not register"):
        pack.start(timeout=0.3)
    # Let go: another process could adopt the dead file, and this pack's own empty file is gone.
    other = Journal(journal_dir, PACK_NAME)
    other.open()
    assert [r.action_id for r in other.recover()] == [action.id]
    other.close()
    flyte_api.restore()
    pack.start(timeout=5)
    assert flyte_api.wait_for_result(action.id).payload == RESTARTED
    pack.stop()
    assert journal_files(journal_dir) == []


def test_journal_settings_are_checked_when_the_pack_is_made(flyte_api, journal_dir):
    with pytest.raises(ConfigError, match="FLYTE_GEVENT_JOURNAL_SYNC / journal_sync='sometimes'"):
        from flyte_gevent import Pack
        Pack(pack_def, Client(flyte_api.url), journal_sync="sometimes")
    with pytest.raises(PackDefError, match="rerun_after_crash must be True or False"):
        Command("Again", lambda input: None, rerun_after_crash="yes")
    assert not journal_dir.exists()  # nothing touches the disk before start()


def test_the_kubernetes_example_keeps_its_journal_on_an_emptydir_of_its_own():
    yaml = pytest.importorskip("yaml")
    with open(os.path.join(os.path.dirname(TESTS), "examples", "deploy", "deployment.yaml")) as f:
        documents = {doc["kind"]: doc for doc in yaml.safe_load_all(f)}
    pod = documents["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    journal = next(item["value"] for item in container["env"] if item["name"] == "FLYTE_GEVENT_JOURNAL")
    mount = next(m for m in container["volumeMounts"] if journal.startswith(m["mountPath"].rstrip("/") + "/"))
    assert not mount.get("readOnly") and "subPath" not in mount
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume == {"name": mount["name"], "emptyDir": {}}  # the pod's own: it survives container restarts
