"""The benchmark suite keeps working: ``bench/run.py --quick`` runs every scenario end to end.

No speed is asserted (benchmarks are not timed tests); only that both client
configurations complete every queued action in every scenario, that the table is
printed, and that the JSON report is complete.
"""

import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIOS = ["fast", "rtt20", "io1s", "io1s_rtt20", "memory", "idle"]
VARIANTS = ["this", "serial"]


def test_quick_bench_completes_every_scenario_prints_the_table_and_writes_json(tmp_path, subprocess_env, python):
    output = tmp_path / "latest.json"
    process = subprocess.Popen([python, os.path.join(ROOT, "bench", "run.py"), "--quick", "--output", str(output)],
                               cwd=ROOT, env=subprocess_env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = process.communicate(timeout=50)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    stdout, stderr = stdout.decode(), stderr.decode()
    assert process.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"

    table = stdout.splitlines()
    assert table[0].split()[:4] == ["scenario", "client", "actions", "actions/s"]
    for name in SCENARIOS:
        assert any(line.startswith(name + " ") for line in table), f"no row for {name}:\n{stdout}"
    assert "Fake API" in stdout

    report = json.loads(output.read_text())
    assert report["quick"] is True
    assert [entry["scenario"] for entry in report["scenarios"]] == SCENARIOS
    for entry in report["scenarios"]:
        for variant in VARIANTS:
            result = entry[variant]
            assert "error" not in result, (entry["scenario"], variant, result)
            if entry["scenario"] == "idle":
                assert 0 <= result["cpu_percent"] < 100
                continue
            # Every queued action was taken, run and completed without a FATAL result.
            assert result["actions"] > 0 and result["fatal"] == 0, (entry["scenario"], variant, result)
            assert result["actions_per_s"] > 0 and result["cpu_ms_per_action"] >= 0
            assert result["api"]["requests"] >= 2 * result["actions"]
        if entry["scenario"] != "idle":  # an idle pack's CPU may well read 0 ticks
            assert entry["ratio"] > 0
    memory = next(entry for entry in report["scenarios"] if entry["scenario"] == "memory")
    assert memory["this"]["held_rss_kb"] > 0 and "kb_per_action" in memory["this"]
