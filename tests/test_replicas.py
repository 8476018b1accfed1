"""Replicas: three pack processes with one definition share one stream of actions.

They register the same pack id and race for every take; the fake's race window
makes those races real (the loser gets a 500, as from the Flyte server). Every
action must be completed exactly once, by one of them, and each process must
stop cleanly on SIGTERM.
"""

import collections
import os
import signal
import subprocess
import time

import gevent

from packs_for_tests import PACK_NAME

PACK_SCRIPT = os.path.join(os.path.dirname(__file__), "packs_for_tests.py")
REPLICAS = 3
ACTIONS = 150


def test_three_replicas_complete_every_action_exactly_once_and_stop_cleanly(flyte_api, python, subprocess_env):
    flyte_api.race_window = 0.005
    env = dict(subprocess_env, FLYTE_API=flyte_api.url, FLYTE_HEALTH_PORT="off", FLYTE_GEVENT_POLLING_INTERVAL="0.5",
               FLYTE_GEVENT_GRACE_PERIOD="5", FLYTE_GEVENT_MAX_TAKERS="4")
    processes = []
    try:
        for _ in range(REPLICAS):
            processes.append(subprocess.Popen([python, PACK_SCRIPT], env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + 15
        while flyte_api.packs.get(PACK_NAME) is None or flyte_api.packs[PACK_NAME].registrations < REPLICAS:
            assert time.monotonic() < deadline, "the replicas did not all register"
            assert all(p.poll() is None for p in processes), "a replica exited during start-up"
            gevent.sleep(0.05)
        assert list(flyte_api.packs) == [PACK_NAME], "replicas share one pack id"
        gevent.sleep(0.3)  # all three pollers are running now

        ids = flyte_api.enqueue_many(PACK_NAME, "Sleep", [{"seconds": 0.02, "tag": n} for n in range(ACTIONS)])
        flyte_api.wait_until_idle(timeout=25)

        handled_by = collections.Counter()
        for n, aid in enumerate(ids):
            action = flyte_api.action(aid)
            assert action.state == "SUCCESS", f"action {n} is {action.state}"
            assert action.result_posts == 1, f"action {n} posted {action.result_posts} times"
            assert action.result["payload"]["tag"] == n
            handled_by[action.result["payload"]["pid"]] += 1
        assert set(handled_by) <= {p.pid for p in processes}
        assert len(handled_by) > 1, f"one replica did everything: {handled_by}"
        assert any(flyte_api.action(aid).takes > 1 for aid in ids), "no take ever raced: the test proves nothing"
        assert 500 in {r.status for r in flyte_api.requests_for("take")}

        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            _, stderr = process.communicate(timeout=10)
            assert process.returncode == 0, stderr
            assert "Traceback" not in stderr, stderr
            # A lost race is routine between replicas, not an outage worth a warning.
            assert "take failed" not in stderr, stderr
        assert not flyte_api.pending() and not flyte_api.new()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=5)
