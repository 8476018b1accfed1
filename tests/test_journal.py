"""The crash journal (flyte_gevent._journal) on its own: records, adoption, durability, bad files.

Liveness is a kernel lock, so the tests that matter run real processes: a
child writes records and is SIGKILLed, or holds its file while another
process tries to adopt it. In-process tests cover the record round trips;
there a journal *closed* with records in it stands for a dead owner (both
leave an unlocked file behind).
"""

import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import warnings

import gevent
import pytest
from gevent import monkey
from gevent.pool import Pool

from flyte_gevent._journal import Journal, JournalError
from flyte_gevent._journal_files import SCHEMA_VERSION
from flyte_gevent.errors import ConfigError
from flyte_gevent.models import Action
from helpers import wait_until

PACK = "JournalPack.env.test"
TIMEOUT = 10  # seconds any one exchange with a child may take


def action(n, command="Shell", payload=None):
    return Action(f"action-{n}", command, {"n": n} if payload is None else payload,
                  f"http://flyte:8080/v1/packs/{PACK}/actions/action-{n}/result")


def journal_files(directory):
    return sorted(name for name in os.listdir(directory) if not name.startswith("."))


@pytest.fixture
def journals(tmp_path):
    """``journals(path=None, **options)``: open journals, all closed after the test."""
    opened = []

    def make(path=None, pack_id=PACK, **options):
        journal = Journal(path or tmp_path / "journal", pack_id, **options)
        journal.open()
        opened.append(journal)
        return journal

    yield make
    for journal in opened:
        journal.close()


# -- records ------------------------------------------------------------------------------------------

def test_records_round_trip_to_the_next_process_with_their_results(journals, tmp_path):
    first = journals()
    first.taken(action(1, payload={"script": "echo ü", "n": [1, 2.5, None, True]}))
    first.taken(action(2))
    first.taken(action(3))
    first.result("action-2", b'{"event":"Done","payload":{}}')
    first.result("action-3", b'{"event":"Done","payload":1}')
    first.result("action-3", b'{"event":"FATAL","payload":"refused"}')  # a later result replaces it
    assert first.close() == 3  # stands for a dead owner: its file stays, unlocked

    second = journals()
    records = {r.action_id: r for r in second.recover()}
    assert list(records) == ["action-1", "action-2", "action-3"]  # in the order taken
    one = records["action-1"]
    assert one.action == action(1, payload={"script": "echo ü", "n": [1, 2.5, None, True]})
    assert (one.command, one.pack_id, one.result, one.restarts) == ("Shell", PACK, None, 1)
    assert one.result_url == f"http://flyte:8080/v1/packs/{PACK}/actions/action-1/result"
    assert abs(one.taken_at - records["action-3"].taken_at) < 5 and one.taken_at > 1.7e9
    assert records["action-2"].result == b'{"event":"Done","payload":{}}'
    assert records["action-3"].result == b'{"event":"FATAL","payload":"refused"}'
    assert len(second) == 3


def test_results_are_written_with_placeholders_every_python_accepts(journals):
    """Python 3.12 warns, and 3.14 refuses, numbered placeholders (``?1``) bound from a sequence."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        journal = journals()
        journal.taken(action(1))
        journal.taken(action(2))
        journal.result("action-1", b'{"event":"Done","payload":1}')
        journal.result("action-2", b'{"event":"Done","payload":2}')
        journal.flush()
        assert journal.close() == 2
    assert [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)] == []
    results = {r.action_id: r.result for r in journals().recover()}
    assert results == {"action-1": b'{"event":"Done","payload":1}', "action-2": b'{"event":"Done","payload":2}'}


def test_removed_records_are_gone_and_an_empty_journal_leaves_no_file(journals, tmp_path):
    journal = journals()
    for n in range(5):
        journal.taken(action(n))
        journal.result(f"action-{n}", b"{}")
    for n in range(4):
        journal.remove(f"action-{n}")
    journal.remove("action-unknown")          # ignored
    journal.result("action-unknown", b"{}")   # ignored
    assert len(journal) == 1
    assert journal.close() == 1
    successor = journals()
    assert [r.action_id for r in successor.recover()] == ["action-4"]
    successor.remove("action-4")
    assert successor.close() == 0
    wait_until(lambda: journal_files(tmp_path / "journal") == [], what="the journal files to be deleted")


def test_an_adopted_file_is_deleted_once_its_last_record_is_removed(journals, tmp_path):
    dead = journals()
    dead.taken(action(1))
    dead.taken(action(2))
    dead_file = dead.file
    dead.close()
    adopter = journals()
    assert len(adopter.recover()) == 2
    adopter.remove("action-1")
    adopter.flush()
    assert os.path.exists(dead_file)
    adopter.remove("action-2")
    own = os.path.basename(adopter.file)[:-len(".db")]
    # The database goes first, then its lock: wait for both.
    wait_until(lambda: all(name.startswith(own) for name in journal_files(tmp_path / "journal")),
               what="the adopted file and its lock to be deleted")
    assert adopter.recover() == []  # nothing new; its own file is never adopted


def test_recover_returns_each_file_once_and_counts_restarts(journals):
    owner = journals()
    owner.taken(action(1))
    owner.close()
    adopter = journals()
    assert [(r.action_id, r.restarts) for r in adopter.recover()] == [("action-1", 1)]
    assert adopter.recover() == []  # already held by this process
    adopter.close()                 # the adopter "dies" without finishing
    third = journals()
    assert [(r.action_id, r.restarts) for r in third.recover()] == [("action-1", 2)]


def test_a_record_finished_after_adoption_keeps_its_new_result(journals):
    owner = journals()
    owner.taken(action(1, command="Rerunnable"))
    owner.close()
    adopter = journals()
    (record,) = adopter.recover()
    assert record.result is None
    adopter.result(record.action_id, b'{"event":"Done"}')  # e.g. the handler ran again
    adopter.close()
    (again,) = journals().recover()
    assert (again.result, again.restarts) == (b'{"event":"Done"}', 2)


def test_text_sqlite_cannot_store_fails_only_its_own_action(journals):
    journal = journals()
    odd = {"lone surrogate": "\ud800", "emoji": "\U0001f600"}  # both can come out of a JSON decoder
    journal.taken(action(1, payload=odd))
    with pytest.raises(JournalError, match="action-\ud800x not journaled"):
        journal.taken(Action("action-\ud800x", "Shell", {}, "http://flyte/actions/x/result"))
    others = [gevent.spawn(journal.taken, action(n)) for n in range(2, 6)]
    gevent.joinall(others, timeout=5, raise_error=True)
    journal.close()
    records = journals().recover()
    assert [r.action_id for r in records] == [f"action-{n}" for n in range(1, 6)]
    assert records[0].input == odd


def test_journal_files_are_private_to_the_pack_user_even_in_a_shared_directory(journals, tmp_path):
    directory = tmp_path / "shared"
    directory.mkdir(mode=0o777)
    os.chmod(directory, 0o777)  # an emptyDir is world-writable
    journal = journals(directory)
    journal.taken(action(1, payload={"secret": "input"}))
    journal.flush()
    for name in journal_files(directory):
        mode = os.stat(directory / name).st_mode & 0o777
        assert mode & 0o077 == 0, f"{name} is mode {mode:o}"


def test_a_malformed_action_without_a_command_is_recorded_with_an_empty_one(journals):
    journal = journals()
    journal.taken(Action("action-1", None, {"odd": True}, "http://flyte:8080/actions/action-1/result"))
    journal.close()
    (record,) = journals().recover()
    assert (record.action_id, record.command, record.input) == ("action-1", "", {"odd": True})


def test_a_closed_journal_opens_again_and_adopts_what_it_left(journals):
    journal = journals()
    journal.taken(action(1))
    assert journal.close() == 1
    journal.open()  # a pack whose start failed, started again
    assert [r.action_id for r in journal.recover()] == ["action-1"]
    journal.remove("action-1")
    journal.taken(action(2))
    assert journal.close() == 1
    assert [r.action_id for r in journals().recover()] == ["action-2"]
    with pytest.raises(RuntimeError, match="already open"):
        journals().open()


def test_taking_an_action_already_in_the_journal_is_refused(journals):
    journal = journals()
    journal.taken(action(1))
    with pytest.raises(ValueError, match="action-1 is already in the journal"):
        journal.taken(action(1))


def test_files_of_another_pack_are_left_for_that_pack_with_a_warning(journals, caplog):
    other = journals(pack_id="OtherPack")
    other.taken(action(1))
    other.close()
    mine = journals()
    with caplog.at_level(logging.WARNING, logger="flyte_gevent.journal"):
        assert mine.recover() == []
    assert "belongs to pack 'OtherPack'" in caplog.text
    assert [r.action_id for r in journals(pack_id="OtherPack").recover()] == ["action-1"]


def test_many_greenlets_write_at_once_and_exactly_the_unfinished_records_survive(journals):
    journal = journals(linger=0.01)
    rng = random.Random(3)
    expected = {}

    def one(n):
        journal.taken(action(n))
        gevent.sleep(rng.uniform(0, 0.02))
        if n % 3:
            journal.result(f"action-{n}", f"result-{n}".encode())
            expected[f"action-{n}"] = f"result-{n}".encode()
        gevent.sleep(rng.uniform(0, 0.02))
        if n % 2:
            journal.remove(f"action-{n}")
            expected.pop(f"action-{n}", None)
        elif n % 3 == 0:
            expected[f"action-{n}"] = None

    pool = Pool(500)
    for n in range(1000):
        pool.spawn(one, n)
    assert pool.join(timeout=20)
    assert journal.close() == len(expected) == 500
    recovered = {r.action_id: r.result for r in journals().recover()}
    assert recovered == expected


def test_a_steady_stream_of_takes_holds_back_neither_flush_nor_results(journals):
    journal = journals(linger=0.005)
    journal.taken(action("kept"))
    journal.result("action-kept", b"its result")
    taking = True

    def taker(first):
        # Out of step with each other: whenever the journal's thread finishes a write, more takes wait.
        n = first
        while taking:
            journal.taken(action(n, payload="x" * 20_000))  # a write that takes a while
            journal.remove(f"action-{n}")
            n += 1

    takers = [gevent.spawn_later(0.0003 * i, taker, i * 1_000_000) for i in range(8)]
    try:
        gevent.sleep(0.05)
        flushing = gevent.spawn(journal.flush)
        flushing.join(timeout=5)
        assert flushing.successful(), "flush() waited for ever behind the takes"
    finally:
        taking = False
        gevent.joinall(takers, timeout=5, raise_error=True)
    assert journal.close() == 1
    assert [(r.action_id, r.result) for r in journals().recover()] == [("action-kept", b"its result")]


def test_a_stalled_disk_stalls_the_writers_not_the_hub(journals):
    journal = journals()
    stall = monkey.get_original("time", "sleep")  # a real sleep, on the journal's thread: a disk that hangs
    stalled = gevent.spawn(journal._writer.call, stall, 0.3)  # white box: occupy the journal's thread
    gevent.sleep(0.01)
    writer = gevent.spawn(journal.taken, action(1))
    ticks = 0
    while not writer.ready():
        gevent.sleep(0.01)
        ticks += 1
        assert ticks < 1000, "taken() never returned"
    assert stalled.ready() and writer.successful()
    assert ticks >= 5, f"the hub ran only {ticks} times while the disk stalled for 0.3 s"
    assert len(journal) == 1


def test_a_failed_write_raises_journal_error_and_the_journal_goes_on(journals, caplog):
    journal = journals()
    journal.taken(action(1))
    # White box: the only way to make SQLite refuse writes without a full disk. Run on the journal's
    # thread, as everything touching its connection is.
    own = journal._own
    pages = journal._writer.call(lambda: own.conn.execute("PRAGMA page_count").fetchone()[0])
    journal._writer.call(lambda: own.conn.execute(f"PRAGMA max_page_count = {pages}"))
    with caplog.at_level(logging.ERROR, logger="flyte_gevent.journal"):
        with pytest.raises(JournalError, match=r"action-big not journaled: .*full"):
            journal.taken(action("big", payload="x" * 100_000))
        wait_until(lambda: "journal write failed" in caplog.text, what="the failure to be logged")
    assert len(journal) == 1
    journal._writer.call(lambda: own.conn.execute("PRAGMA max_page_count = 1073741823"))
    journal.taken(action(2))
    assert journal.close() == 2
    assert [r.action_id for r in journals().recover()] == ["action-1", "action-2"]



def test_flush_raises_for_a_write_that_failed_while_the_thread_was_busy_with_another_job(journals):
    journal = journals(linger=0.01)
    journal.taken(action(1))
    own = journal._own  # white box, as above: SQLite refuses writes once the file may not grow
    pages = journal._writer.call(lambda: own.conn.execute("PRAGMA page_count").fetchone()[0])
    journal._writer.call(lambda: own.conn.execute(f"PRAGMA max_page_count = {pages}"))
    busy = gevent.spawn(journal._writer.call, monkey.get_original("time", "sleep"), 0.3)  # the thread is busy...
    gevent.sleep(0.05)
    journal.result("action-1", json.dumps({"big": "x" * 100_000}).encode())
    gevent.sleep(0.05)  # ... when the result's linger ends: its job waits in the queue
    with pytest.raises(JournalError, match="full"):
        journal.flush()
    busy.join(timeout=5)
    journal._writer.call(lambda: own.conn.execute("PRAGMA max_page_count = 1073741823"))

def test_calls_after_close_do_not_touch_the_disk(journals):
    journal = journals()
    journal.taken(action(1))
    journal.close()
    journal.result("action-1", b"late")  # the record stays as it was on disk
    journal.remove("action-1")
    with pytest.raises(JournalError, match="closed"):
        journal.taken(action(2))
    (record,) = journals().recover()
    assert (record.action_id, record.result) == ("action-1", None)


def test_bad_arguments_are_refused_before_touching_the_disk(tmp_path):
    with pytest.raises(ConfigError, match="FLYTE_GEVENT_JOURNAL_SYNC / journal_sync='sometimes'") as info:
        Journal(tmp_path, PACK, sync="sometimes")
    assert info.value.name == "FLYTE_GEVENT_JOURNAL_SYNC"
    with pytest.raises(ConfigError, match="FLYTE_GEVENT_JOURNAL / journal=''"):
        Journal("", PACK)
    with pytest.raises(ValueError, match="pack_id"):
        Journal(tmp_path, "")
    with pytest.raises(RuntimeError, match="not open"):
        Journal(tmp_path, PACK).taken(action(1))
    assert os.listdir(tmp_path) == []


# -- unusable journals ---------------------------------------------------------------------------------

def dead_file(directory, name="flyte-20260101T000000000000-0badf11e.db"):
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, name)


def assert_refused(journals, directory, *fragments):
    """recover() must raise a ConfigError naming the setting, the file and what is wrong."""
    journal = journals(directory)
    with pytest.raises(ConfigError) as info:
        journal.recover()
    message = str(info.value)
    assert info.value.name == "FLYTE_GEVENT_JOURNAL"
    assert message.startswith(f"FLYTE_GEVENT_JOURNAL / journal={str(directory)!r}: ")
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message
    return journal


def test_a_file_that_is_not_a_database_stops_the_start(journals, tmp_path):
    directory = tmp_path / "journal"
    good = journals(directory)
    good.taken(action(1))
    good.close()
    bad = dead_file(directory)
    with open(bad, "wb") as f:
        f.write(b"this is not an SQLite file at all" * 200)
    journal = assert_refused(journals, directory, bad, "cannot be read", "not a database", "move it out")
    # Nothing was adopted: the good file is still there for whoever starts once the bad one is moved.
    os.rename(bad, tmp_path / "moved-aside.db")
    assert [r.action_id for r in journal.recover()] == ["action-1"]


def test_another_programs_database_stops_the_start(journals, tmp_path):
    directory = tmp_path / "journal"
    bad = dead_file(directory)
    conn = sqlite3.connect(bad)
    conn.execute("CREATE TABLE customers (name TEXT)")
    conn.commit()
    conn.close()
    assert_refused(journals, directory, bad, "SQLite database of another program")
    conn = sqlite3.connect(bad)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete", "the foreign file was modified"
    conn.close()


def test_a_journal_from_a_newer_version_stops_the_start(journals, tmp_path):
    directory = tmp_path / "journal"
    owner = journals(directory)
    owner.taken(action(1))
    path = owner.file
    owner.close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    assert_refused(journals, directory, path, f"journal schema {SCHEMA_VERSION + 1}, newer than this flyte_gevent's")


def test_a_damaged_journal_stops_the_start(journals, tmp_path):
    directory = tmp_path / "journal"
    owner = journals(directory)
    for n in range(50):
        owner.taken(action(n, payload="x" * 500))
    path = owner.file
    owner.close()
    with open(path, "r+b") as f:  # scribble over the table's pages, keep the header
        f.seek(4096 * 2)
        f.write(os.urandom(4096 * 3))
    assert_refused(journals, directory, path, "move it out")


def test_an_unreadable_journal_file_stops_the_start(journals, tmp_path):
    directory = tmp_path / "journal"
    bad = dead_file(directory)
    os.mkdir(bad)  # cannot be opened as a file, even by root
    assert_refused(journals, directory, bad, "cannot be read")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_a_read_only_directory_is_a_config_error(tmp_path):
    directory = tmp_path / "journal"
    directory.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="cannot create files in it"):
        Journal(directory, PACK).open()


def test_a_journal_path_that_cannot_be_a_directory_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("x")
    for path, problem in ((tmp_path / "file", "exists and is not a directory"),
                          (tmp_path / "file" / "journal", "cannot create it")):
        with pytest.raises(ConfigError, match=f"FLYTE_GEVENT_JOURNAL / journal=.*: {problem}") as info:
            Journal(path, PACK).open()
        assert info.value.name == "FLYTE_GEVENT_JOURNAL"


# -- several processes ---------------------------------------------------------------------------------

CHILD = r"""
import json, os, sys
from gevent import monkey
monkey.patch_all()
import gevent
from flyte_gevent._journal import Journal, JournalError
from flyte_gevent.models import Action

mode, directory, pack = sys.argv[1:4]
args = sys.argv[4:]

def say(*words):
    print(*words, flush=True)

def act(n):
    return Action(f"action-{n}", "Shell", {"n": n}, f"http://flyte/actions/action-{n}/result")

if mode == "own":        # own COUNT [WITH_RESULTS [FIRST]]: write, say so, then live until stdin closes
    count, with_results = int(args[0]), int(args[1]) if len(args) > 1 else 0
    first = int(args[2]) if len(args) > 2 else 0
    journal = Journal(directory, pack)
    journal.open()
    for n in range(first, first + count):
        journal.taken(act(n))
        say("taken", n)
    for n in range(first, first + with_results):
        journal.result(f"action-{n}", f"result-{n}".encode())
    journal.flush()
    say("ready", journal.file)
elif mode == "linger":   # linger SECONDS: a result written after lingering, then one just queued
    linger = float(args[0])
    journal = Journal(directory, pack, linger=linger)
    journal.open()
    journal.taken(act(0))
    journal.result("action-0", b"written")
    gevent.sleep(linger * 1.2)
    journal.taken(act(1))
    journal.result("action-1", b"lingering")
    gevent.sleep(linger * 0.2)  # the hub runs its timers (sys.stdin.readline() below would block it)
    say("ready")
elif mode == "owners":   # owners K: K journals (files) in one process, one record each
    journals = []
    for n in range(int(args[0])):
        journal = Journal(directory, pack)
        journal.open()
        journal.taken(act(n))
        journals.append(journal)
    say("ready")
elif mode == "adopt":    # adopt: wait for "go", recover, report, then live until stdin closes
    journal = Journal(directory, pack)
    journal.open()
    say("open")
    sys.stdin.readline()
    records = journal.recover()
    say("recovered", json.dumps([[r.action_id, r.restarts, r.result and r.result.decode()] for r in records]))
elif mode == "fork":     # fork: the parent owns a journal; its forked child must not use it
    journal = Journal(directory, pack)
    journal.open()
    journal.taken(act(1))
    pid = os.fork()
    if pid == 0:
        try:
            with gevent.Timeout(5):  # bounded: a regression must fail the test, not leave a hung process
                journal.taken(act(2))
            print("child wrote", flush=True)
        except JournalError as exc:
            print("child refused:", exc, flush=True)
        except gevent.Timeout:
            print("child hung in taken()", flush=True)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    say("ready")
sys.stdin.readline()
"""


class Child:
    """A child process running CHILD, talked to over lines on stdin and stdout."""

    def __init__(self, python, env, mode, directory, *args, pack=PACK):
        self.process = subprocess.Popen([python, "-c", CHILD, mode, str(directory), pack, *map(str, args)],
                                        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)

    def read(self, prefix):
        """The next stdout line that starts with *prefix* (the rest of it)."""
        with gevent.Timeout(TIMEOUT, AssertionError(f"child said no {prefix!r} line")):
            while True:
                line = self.process.stdout.readline()
                if not line:
                    raise AssertionError(f"child exited before {prefix!r}: {self.process.stderr.read()}")
                if line.startswith(prefix):
                    return line[len(prefix):].strip()

    def send(self, line):
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=TIMEOUT)

    def finish(self):
        """Close stdin: the child exits normally (closing its journal)."""
        self.process.stdin.close()
        assert self.process.wait(timeout=TIMEOUT) == 0, self.process.stderr.read()

    def close(self):
        if self.process.poll() is None:
            self.kill()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            stream.close()


@pytest.fixture
def children(python, subprocess_env):
    started = []

    def start(mode, directory, *args, **kwargs):
        child = Child(python, subprocess_env, mode, directory, *args, **kwargs)
        started.append(child)
        return child

    yield start
    for child in started:
        child.close()


def test_a_live_owners_file_is_not_adoptable_and_a_killed_owners_is(children, journals, tmp_path):
    directory = tmp_path / "journal"
    owner = children("own", directory, 3, 1)
    owner.read("ready")
    survivor = journals(directory)
    assert survivor.recover() == []  # alive: its lock is held
    owner.kill()
    records = survivor.recover()     # the survivor picks it up
    assert [(r.action_id, r.result) for r in records] == [("action-0", b"result-0"), ("action-1", None),
                                                          ("action-2", None)]
    assert survivor.recover() == []  # once


def test_every_result_lingers_before_it_is_written_not_only_the_first(children, journals, tmp_path):
    directory = tmp_path / "journal"
    owner = children("linger", directory, 0.5)
    owner.read("ready")
    owner.kill()  # well within the second result's linger: it is not written yet
    assert [(r.action_id, r.result) for r in journals(directory).recover()] == [("action-0", b"written"),
                                                                                ("action-1", None)]


def test_empty_leftovers_of_dead_processes_are_cleaned_up(children, journals, tmp_path):
    directory = tmp_path / "journal"
    owner = children("own", directory, 0)
    owner.read("ready")
    owner.kill()  # its file holds no records
    stray = directory / "flyte-20260101T000000000000-0000abcd.lock"  # died between lock and database
    stray.write_text("")
    adopter = journals(directory)
    assert adopter.recover() == []
    own = os.path.basename(adopter.file)[:-len(".db")]
    wait_until(lambda: all(name.startswith(own) for name in journal_files(directory)),
               what="the empty leftovers to be deleted")


def test_records_survive_sigkill_right_after_each_write_returned(children, journals, tmp_path):
    directory = tmp_path / "journal"
    owner = children("own", directory, 200)
    owner.read("taken 0")
    owner.kill()  # at once: whatever "taken" lines it printed, those records are on disk
    printed = {int(line.split()[1]) for line in owner.process.stdout.read().splitlines() if line.startswith("taken")}
    printed.add(0)
    recovered = {int(r.action_id.split("-")[1]) for r in journals(directory).recover()}
    assert printed <= recovered, f"written but lost: {sorted(printed - recovered)}"


def test_two_processes_racing_to_adopt_get_each_dead_file_exactly_once(children, tmp_path):
    directory = tmp_path / "journal"
    dead = children("owners", directory, 8)
    dead.read("ready")
    dead.kill()
    adopters = [children("adopt", directory) for _ in range(2)]
    for adopter in adopters:
        adopter.read("open")
    for adopter in adopters:
        adopter.send("go")
    got = [[record[0] for record in json.loads(adopter.read("recovered"))] for adopter in adopters]
    assert sorted(got[0] + got[1]) == sorted(f"action-{n}" for n in range(8)), got


def test_a_file_adopted_by_a_process_that_then_died_is_adoptable_again(children, journals, tmp_path):
    directory = tmp_path / "journal"
    owner = children("own", directory, 2, 1)
    owner.read("ready")
    owner.kill()
    adopter = children("adopt", directory)
    adopter.read("open")
    adopter.send("go")
    assert json.loads(adopter.read("recovered")) == [["action-0", 1, "result-0"], ["action-1", 1, None]]
    assert journals(directory).recover() == []  # held by the live adopter
    adopter.kill()  # died while delivering
    records = journals(directory).recover()
    assert [(r.action_id, r.restarts, r.result) for r in records] == [("action-0", 2, b"result-0"),
                                                                      ("action-1", 2, None)]


def test_a_process_that_exits_normally_hands_over_what_it_could_not_finish(children, journals, tmp_path):
    directory = tmp_path / "journal"
    owner = children("own", directory, 1)
    owner.read("ready")
    owner.finish()  # a clean shutdown with a record left (say, a result not delivered in time)
    assert [r.action_id for r in journals(directory).recover()] == ["action-0"]


def test_a_forked_child_cannot_use_its_parents_journal_nor_release_its_lock(children, journals, tmp_path):
    directory = tmp_path / "journal"
    parent = children("fork", directory)
    assert "refused: " in (said := parent.read("child ")), said
    assert "opened in the parent process before a fork" in said
    parent.read("ready")
    assert journals(directory).recover() == []  # the child's exit did not drop the parent's lock
    parent.kill()
    assert [r.action_id for r in journals(directory).recover()] == ["action-1"]
