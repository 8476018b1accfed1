"""examples/deploy: the Dockerfile and Kubernetes manifests say what the README promises.

Docker and a cluster are not available here, so these read the files: the Dockerfile's instructions, and the
manifests parsed with PyYAML when it happens to be installed (it is not a dependency).
"""

import os
import re

import pytest

from flyte_gevent import config

DEPLOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "deploy")


def _instructions():
    """``[(INSTRUCTION, arguments)]`` of the Dockerfile, continuation lines joined, comments dropped."""
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        text = re.sub(r"\\\n", " ", "".join(line for line in f if not line.lstrip().startswith("#")))
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip()]


def test_dockerfile_runs_flyte_gevent_as_a_non_root_user_with_the_shell_packs_tools():
    instructions = _instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    installs = " ".join(args for name, args in instructions if name == "RUN")
    for tool in ("bash", "curl", "jq"):
        assert re.search(rf"apt-get install .*\b{tool}\b", installs)
    assert "pip install" in installs
    users = [args for name, args in instructions if name == "USER"]
    assert users and users[-1] not in ("root", "0")
    entrypoint = [args for name, args in instructions if name == "ENTRYPOINT"]
    assert entrypoint == ['["flyte-gevent", "run"]']
    assert dict(instructions)["EXPOSE"] == "8090"


def test_deployment_has_replicas_probes_a_long_enough_grace_and_the_token_from_a_secret():
    yaml = pytest.importorskip("yaml")
    with open(os.path.join(DEPLOY, "deployment.yaml")) as f:
        documents = {doc["kind"]: doc for doc in yaml.safe_load_all(f)}
    deployment = documents["Deployment"]
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        http = container[probe]["httpGet"]
        assert http["path"] == path and ports.get(http["port"], http["port"]) == 8090

    env = {item["name"]: item.get("value") for item in container["env"]}
    known = {variable for setting in config.SETTINGS for variable in setting.env}
    assert set(env) <= known, f"unknown FLYTE_* variables: {set(env) - known}"
    assert env["FLYTE_HEALTH_PORT"] == "8090"
    grace = float(env.get("FLYTE_GEVENT_GRACE_PERIOD", config.setting("grace_period").default))
    flush = 10.0  # Pack's default flush_timeout
    assert pod["terminationGracePeriodSeconds"] > grace + flush

    token_dir = os.path.dirname(env["FLYTE_JWT_FILE"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == token_dir)
    assert "subPath" not in mount  # a subPath mount never sees a rotated Secret
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"]
    assert "FLYTE_JWT" not in env  # the token never sits in the pod spec
