"""A cluster whose state lives in S3 (moto's server on 127.0.0.1): made by one CI runner, whose
DCX_HOME is then deleted, and run by another (status, scale, destroy) from the bucket alone. No object
of the bucket holds the cluster's private key or its swarm join tokens in clear."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from dcx import netns
from tests.testbed.local import Dcx, cluster_yaml, force_cleanup, registry_entries, skip_without_namespace_nodes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

NAME = "e2e-store"
SUBNET = "10.213.241.0/24"


@pytest.fixture
def bucket_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    from moto.server import ThreadedMotoServer

    skip_without_namespace_nodes()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "DCX_STATE": "s3://dcx-e2e-state/ci", "DCX_STATE_KEY": "e2e-only-state-key-0123456789",
           "DCX_NO_SSH_CONFIG": "1", "DCX_NO_KUBECONFIG": "1",
           # the local nodes' disks: on this machine, outside both runners' DCX_HOME
           "DCX_MACHINE_DIR": str(tmp_path / "machines")}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="dcx-e2e-state")
    try:
        yield env
    finally:
        server.stop()


def runner(home: Path, env: dict[str, str]) -> Dcx:
    cli = Dcx(home)
    cli.env.update(env)
    return cli


def bucket_objects(env: dict[str, str]) -> dict[str, bytes]:
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="dcx-e2e-state").get("Contents", [])]
    return {k: s3.get_object(Bucket="dcx-e2e-state", Key=k)["Body"].read() for k in keys}


def manager_shell(command: str) -> str:
    """A command in the control node's own world (its sshd's namespaces), not through dcx."""
    [info] = [e for e in registry_entries(NAME) if e["node"] == f"{NAME}-control-1"]
    pid = netns.sshd_pid(info["netns"])
    assert pid, f"{info['netns']} has no sshd"
    return subprocess.run(["nsenter", "-t", str(pid), "-m", "-u", "-n", "sh", "-c", command], capture_output=True,
                          text=True, timeout=60, check=True).stdout.strip()


def test_second_runner_runs_a_cluster_from_the_bucket_alone(bucket_env: dict[str, str], tmp_path: Path) -> None:
    first, second = runner(tmp_path / "runner-a", bucket_env), runner(tmp_path / "runner-b", bucket_env)
    spec = tmp_path / "cluster.yaml"
    try:
        spec.write_text(cluster_yaml(NAME, SUBNET, control=1, workers=1))
        first.run("cluster", "create", "-f", str(spec), check=True)
        shutil.rmtree(first.home)  # the first CI runner is gone, and its disk with it

        status = second.json("cluster", "status", NAME)
        assert status["healthy"] is True and len(status["nodes"]) == 2, status

        spec.write_text(cluster_yaml(NAME, SUBNET, control=1, workers=2))
        # This runner's ssh settings go to a stand-in for ~/.ssh/config, its docker context to its own
        # DOCKER_CONFIG (nothing of this machine's user is touched).
        user_config, docker_config = tmp_path / "user-ssh-config", tmp_path / "docker-config"
        user_config.write_text("")
        second.env.pop("DCX_NO_SSH_CONFIG")
        second.env.update(DCX_SSH_CONFIG=str(user_config), DOCKER_CONFIG=str(docker_config))
        second.run("cluster", "create", "-f", str(spec), check=True)  # scale: one more worker
        # `docker --context dcx-NAME` from the runner that did not make the cluster: docker runs `ssh
        # dcx-NAME`, which reaches the store's working directory through the Include (`ssh` here reads
        # the stand-in config, as it would read ~/.ssh/config).
        shim = tmp_path / "bin" / "ssh"
        shim.parent.mkdir()
        shim.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {user_config} "$@"\n')
        shim.chmod(0o755)
        assert user_config.read_text().startswith(f"Include {second.home}/cache/s3-")
        ls = subprocess.run(["docker", "--context", f"dcx-{NAME}", "node", "ls", "--format", "{{.Hostname}}"],
                            env={**os.environ, "DOCKER_CONFIG": str(docker_config),
                                 "PATH": f"{shim.parent}:{os.environ['PATH']}"},
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert ls.returncode == 0, ls.stderr
        assert sorted(ls.stdout.split()) == [f"{NAME}-control-1", f"{NAME}-workers-1", f"{NAME}-workers-2"]
        status = second.json("cluster", "status", NAME)
        assert status["healthy"] is True and sorted(n["name"] for n in status["nodes"]) == [
            f"{NAME}-control-1", f"{NAME}-workers-1", f"{NAME}-workers-2"]

        secrets = [p.read_bytes().strip() for p in second.home.glob(f"cache/*/clusters/{NAME}/ssh/id_ed25519")]
        assert len(secrets) == 1 and b"PRIVATE KEY" in secrets[0]
        secrets += secrets[0].splitlines()[1:-1]  # each line of the key's body, too
        for role in ("worker", "manager"):
            token = manager_shell(f"docker swarm join-token -q {role}")  # dcx itself prints it redacted
            assert token.startswith("SWMTKN-"), token
            secrets.append(token.encode())
        stored = bucket_objects(bucket_env)
        assert f"ci/clusters/{NAME}/state.json" in stored and f"ci/clusters/{NAME}/ssh/id_ed25519" in stored
        leaks = [(k, s[:12]) for k, body in stored.items() for s in secrets if s in body]
        assert not leaks, f"secrets in clear in the bucket: {leaks}"

        second.run("cluster", "destroy", NAME, "--yes", check=True)
        assert bucket_objects(bucket_env) == {}
        assert user_config.read_text() == ""  # the Include went with the store's last cluster here
        assert not list((tmp_path / "machines").glob(f"*/{NAME}"))  # the nodes' disks went with them
        assert json.loads(second.run("cluster", "list", "-o", "json", check=True).stdout) == []
    finally:
        if bucket_objects(bucket_env):
            second.run("cluster", "destroy", NAME, "--yes", timeout=300)
        force_cleanup(second.home, [NAME])
        os.environ.pop("DCX_STATE", None)
