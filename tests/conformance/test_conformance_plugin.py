"""A pack author's own tests, unchanged, against the fake and then against a real Flyte (``--flyte-api-url``).

The tests below are what the README's "Testing your pack" shows; they run in a child pytest, as a pack's test suite
would, with only flyte_gevent installed.
"""

import subprocess

import pytest

CONFTEST = """\
from gevent import monkey; monkey.patch_all()
"""

PACK_TESTS = """\
import pytest

from flyte_gevent import Client, Command, Event, EventDef, Pack, PackDef

created = EventDef("IssueCreated")


def create_issue(input):
    if input.get("project") not in {"FOO", "OPS"}:
        raise ValueError("bad project")
    return Event(created, {"issueId": input["project"] + "-1"})


pack_def = PackDef(name="JiraPackTOKEN", commands=[Command("createIssue", create_issue, [created])],
                   labels={"env": "dev"})


@pytest.fixture
def pack(flyte_api):
    pack = Pack(pack_def, Client(flyte_api.url), health_port=None, polling_interval=0.5)
    yield pack
    pack.stop(grace_period=0)


def test_create_issue(flyte_api, pack):
    action = flyte_api.enqueue("JiraPackTOKEN", "createIssue", {"project": "FOO"}, labels={"env": "dev"})
    pack.start()
    result = flyte_api.wait_for_result(action)
    assert (result.event, result.payload) == ("IssueCreated", {"issueId": "FOO-1"})
    print("SERVER", type(flyte_api).__name__)


def test_bad_project_is_fatal(flyte_api, pack):
    action = flyte_api.enqueue("JiraPackTOKEN", "createIssue", {"project": "NOPE"}, labels={"env": "dev"})
    pack.start()
    assert flyte_api.wait_for_result(action).payload == "ValueError: bad project"
    assert flyte_api.action(action).state == "FATAL"


def test_faults_need_the_fake(fake_flyte_api):
    fake_flyte_api.fail("take", 500)
    print("FAULTS", type(fake_flyte_api).__name__)


def test_a_fake_only_helper_on_a_real_server_says_what_to_use(flyte_api):
    if type(flyte_api).__name__ == "FakeFlyteApi":
        pytest.skip("on the fake every helper exists")
    with pytest.raises(AttributeError, match="use the fake_flyte_api fixture"):
        flyte_api.fail("take", 500)
"""


@pytest.fixture
def pack_tests(tmp_path, unique):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_jira.py").write_text(PACK_TESTS.replace("TOKEN", unique))
    return tmp_path


def run_pytest(python, env, directory, *args):
    process = subprocess.run([python, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *args, str(directory)],
                             cwd=directory, env=env, capture_output=True, text=True, timeout=60)
    return process.returncode, process.stdout + process.stderr


def test_a_pack_authors_tests_run_on_the_fake_by_default(python, subprocess_env, pack_tests):
    code, output = run_pytest(python, subprocess_env, pack_tests)
    assert code == 0, output
    assert "SERVER FakeFlyteApi" in output and "FAULTS FakeFlyteApi" in output
    assert "3 passed, 1 skipped" in output


def test_the_same_tests_run_on_a_real_flyte(python, subprocess_env, pack_tests, real_flyte_server):
    code, output = run_pytest(python, subprocess_env, pack_tests, "--flyte-api-url", real_flyte_server.url)
    assert code == 0, output
    assert "SERVER FlyteServer" in output and "FAULTS FakeFlyteApi" in output
    assert "4 passed" in output


def test_the_option_is_documented_in_pytest_help(python, subprocess_env, tmp_path):
    code, output = run_pytest(python, subprocess_env, tmp_path, "--help")
    assert code == 0, output
    assert "--flyte-api-url=URL" in output
    assert "FLYTE_GEVENT_TEST_API_URL" in output
