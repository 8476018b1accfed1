"""The pack author's testing kit: the running_pack fixture, the check for packs a test leaves running, waits that
say why no pack takes an action, and the garbage-body fault."""

import subprocess
import textwrap

import gevent
import pytest
import requests

from flyte_gevent import Command, Event, EventDef, PackDef

done = EventDef("Done")


def echo_def(name="Echo", labels=None):
    return PackDef(name, commands=[Command("Echo", lambda input: Event(done, input), [done])], labels=labels)


def register(api, name, labels=None):
    body = {"name": name, "commands": [{"name": "Echo", "events": ["Done"]}], "events": [{"name": "Done"}]}
    if labels:
        body["labels"] = labels
    response = requests.post(api.url + "/v1/packs", json=body, timeout=5)
    assert response.status_code == 201, response


def take(api, pack_id):
    return requests.post(f"{api.url}/v1/packs/{pack_id}/actions/take", timeout=5)


def late(api, aid, timeout=0.05):
    """The message wait_for_result fails with."""
    with pytest.raises(AssertionError) as failure:
        api.wait_for_result(aid, timeout=timeout)
    return str(failure.value)


# --- why an action stays NEW ------------------------------------------------------------------------------------

def test_a_late_action_with_no_pack_of_its_name_says_so_and_lists_the_registered_names(flyte_api):
    aid = flyte_api.enqueue("Echo", "Echo")
    assert "no pack named 'Echo' is registered (no pack is)" in late(flyte_api, aid)
    register(flyte_api, "Shell")
    register(flyte_api, "Jira", {"env": "dev"})
    assert "no pack named 'Echo' is registered; registered: 'Jira', 'Shell'" in late(flyte_api, aid)
    register(flyte_api, "echo")
    assert "names are case-sensitive: 'echo' is registered" in late(flyte_api, aid)


def test_a_late_action_whose_labels_no_pack_of_its_name_has_shows_both_label_sets(flyte_api):
    register(flyte_api, "Echo", {"env": "dev"})
    register(flyte_api, "Echo", {"env": "prod", "team": "b"})
    aid = flyte_api.enqueue("Echo", "Echo", labels={"env": "prod", "team": "a"})
    message = late(flyte_api, aid)
    assert ("packs named 'Echo' are registered, but none has labels that include the action's "
            "{'env': 'prod', 'team': 'a'}: 'Echo.env.dev' has {'env': 'dev'}; "
            "'Echo.env.prod.team.b' has {'env': 'prod', 'team': 'b'}") in message
    unlabelled = flyte_api.enqueue("Jira", "Create", labels={"env": "dev"})
    register(flyte_api, "Jira")
    assert "'Jira' has no labels" in late(flyte_api, unlabelled)


def test_a_late_action_whose_matching_pack_does_not_poll_names_the_pack_and_when_it_was_last_seen(flyte_api):
    register(flyte_api, "Echo", {"env": "dev"})
    aid = flyte_api.enqueue("Echo", "Echo")  # no labels: any pack named Echo fits
    message = late(flyte_api, aid, timeout=0.1)
    assert "pack 'Echo.env.dev' would take it, but was not seen during this wait (last seen " in message
    assert "s ago): is it running, and pointed at " + flyte_api.url + "?" in message


def test_a_late_action_behind_others_for_a_polling_pack_says_what_the_pack_holds(flyte_api):
    register(flyte_api, "Echo")
    first = flyte_api.enqueue("Echo", "Echo", 1)
    second = flyte_api.enqueue("Echo", "Echo", 2)
    third = flyte_api.enqueue("Echo", "Echo", 3)
    assert take(flyte_api, "Echo").status_code == 200  # first is PENDING now
    # The pack stays in touch during the wait (an event refreshes lastSeen as a take does).
    gevent.spawn_later(0.01, requests.post, flyte_api.url + "/v1/packs/Echo/events", json={"event": "Tick"})
    with pytest.raises(AssertionError) as failure:
        flyte_api.wait_for_results([first, third], timeout=0.05)
    message = str(failure.value)
    assert f"{first} ('Echo' for 'Echo') is PENDING, taken by 'Echo'" in message
    assert "pack 'Echo' would take it and was seen" in message
    assert "it holds 1 PENDING action and 1 older NEW action is queued before this one" in message
    assert flyte_api.action(second).state == "NEW"


def test_wait_for_action_and_wait_until_idle_explain_too(flyte_api):
    aid = flyte_api.enqueue("Echo", "Echo")
    with pytest.raises(AssertionError, match="no pack named 'Echo' is registered"):
        flyte_api.wait_for_action(aid, "PENDING", timeout=0.05)
    with pytest.raises(AssertionError, match="no pack named 'Echo' is registered"):
        flyte_api.wait_until_idle(timeout=0.05)


def test_the_explanation_is_given_once_per_kind_of_action(flyte_api):
    ids = flyte_api.enqueue_many("Echo", "Echo", [1, 2, 3])
    with pytest.raises(AssertionError) as failure:
        flyte_api.wait_for_results(ids, timeout=0.05)
    assert str(failure.value).count("no pack named 'Echo'") == 1


# --- the garbage-body fault -------------------------------------------------------------------------------------

def test_garbage_answers_with_the_body_and_status_given_then_the_route_works_again(flyte_api):
    register(flyte_api, "Echo")
    aid = flyte_api.enqueue("Echo", "Echo")
    flyte_api.garbage("take", b"<html><body>Proxy login</body></html>")
    response = take(flyte_api, "Echo")
    assert (response.status_code, response.content) == (200, b"<html><body>Proxy login</body></html>")
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert flyte_api.action(aid).state == "NEW"  # answered before the server did anything
    assert take(flyte_api, "Echo").status_code == 200
    flyte_api.garbage(None, "not json", status=502, times=None, content_type="text/plain")
    response = requests.get(flyte_api.url + "/v1", timeout=5)
    assert (response.status_code, response.text, response.headers["Content-Type"]) == (502, "not json",
                                                                                       "text/plain")
    flyte_api.clear_faults()
    assert requests.get(flyte_api.url + "/v1", timeout=5).status_code == 200
    flyte_api.garbage("take")  # a default page
    assert b"<html>" in take(flyte_api, "Echo").content


def test_fail_can_carry_a_body_like_a_proxy_error_page(flyte_api):
    flyte_api.fail("health", 502, body="<html>Bad Gateway</html>")
    response = requests.get(flyte_api.url + "/health", timeout=5)
    assert (response.status_code, response.text) == (502, "<html>Bad Gateway</html>")
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    flyte_api.fail("health", 503)
    response = requests.get(flyte_api.url + "/health", timeout=5)
    assert (response.status_code, response.content, "Content-Type" in response.headers) == (503, b"", False)


def test_a_pack_given_an_html_page_for_a_take_recovers_and_completes_the_action(flyte_api, running_pack):
    aid = flyte_api.enqueue("Echo", "Echo", "hi")
    flyte_api.garbage("take")
    running_pack(echo_def())
    assert flyte_api.wait_for_result(aid).payload == "hi"
    assert [r.status for r in flyte_api.requests_for("take")][:2] == [200, 200]


# --- running_pack -----------------------------------------------------------------------------------------------

def test_running_pack_returns_a_registered_pack_with_quick_test_settings(flyte_api, running_pack):
    aid = flyte_api.enqueue("Echo", "Echo", {"n": 1}, labels={"env": "dev"})
    pack = running_pack(echo_def(), labels={"env": "dev"}, max_in_flight=3)
    assert pack.registered and pack.pack_id == "Echo.env.dev"
    assert (pack.health_port, pack.polling_interval, pack.max_in_flight) == (None, 0.5, 3)
    assert flyte_api.wait_for_result(aid).payload == {"n": 1}


def test_running_pack_fails_quickly_when_the_pack_cannot_register(flyte_api, running_pack):
    flyte_api.fail("register", 400)
    with pytest.raises(Exception, match="400"):
        running_pack(echo_def(), start_timeout=1)


PYTEST_OUTPUT_TIMEOUT = 45  # below pytest-timeout's 60 s, so the child's output is shown


def run_pytest(tmp_path, python, subprocess_env, source):
    (tmp_path / "conftest.py").write_text("from gevent import monkey\nmonkey.patch_all()\n")
    (tmp_path / "test_kit.py").write_text(textwrap.dedent(source))
    out = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
                         cwd=tmp_path, env=subprocess_env, capture_output=True, text=True,
                         timeout=PYTEST_OUTPUT_TIMEOUT)
    return out.stdout + out.stderr


def test_running_pack_stops_a_failing_tests_pack_and_a_leaked_pack_errors_the_test_that_left_it(
        tmp_path, python, subprocess_env):
    output = run_pytest(tmp_path, python, subprocess_env, """
        import logging, time
        from flyte_gevent import Client, Command, Event, EventDef, Pack, PackDef

        done = EventDef("Done")
        pack_def = PackDef("Echo", commands=[Command("Echo", lambda i: Event(done, i), [done])])
        kept = []

        def test_failing_with_running_pack(flyte_api, running_pack):
            kept.append(running_pack(pack_def))
            assert False, "the test fails"

        def test_the_failed_tests_pack_was_stopped():
            assert kept[0].live() == (False, "stopped")

        def test_leaks(flyte_api):
            pack = Pack(pack_def, Client(flyte_api.url), health_port=None, polling_interval=0.5)
            pack.start(timeout=5)
            kept.append(pack)

        def test_stops_by_hand(flyte_api):
            pack = Pack(pack_def, Client(flyte_api.url), health_port=None, polling_interval=0.5)
            pack.start(timeout=5)
            pack.stop()

        def test_after_the_leak(caplog):
            assert kept[1].live() == (False, "stopped")
            caplog.set_level(logging.DEBUG)
            time.sleep(0.7)  # more than the leaked pack's polling interval: it would have taken by now
            assert not [r for r in caplog.records if r.name.startswith("flyte_gevent")]
    """)
    assert "FAILED test_kit.py::test_failing_with_running_pack" in output and "the test fails" in output
    assert "PASSED test_kit.py::test_the_failed_tests_pack_was_stopped" in output
    assert "ERROR test_kit.py::test_leaks" in output
    assert ("the test left 1 started pack running: 'Echo' (pack id 'Echo') against http://127.0.0.1:" in output)
    assert "stop it in the test (pack.stop(), in a finally) or start it with the running_pack fixture" in output
    assert "PASSED test_kit.py::test_stops_by_hand" in output
    assert "PASSED test_kit.py::test_after_the_leak" in output
    assert "1 failed, 4 passed, 1 error" in output


def test_the_plugin_still_imports_nothing_but_pytest(python, subprocess_env):
    code = ("import sys, flyte_gevent.pytest_plugin; "
            "print([m for m in ('gevent', 'flyte_gevent.testing', 'flyte_gevent.pack') if m in sys.modules])")
    out = subprocess.run([python, "-c", code], env=subprocess_env, capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "[]", out.stderr
