"""End to end: a real k3s (air-gapped from a binary you give) on local namespace nodes: 3 servers with
embedded etcd and 2 agents, every node Ready, the merged kubeconfig usable by the kubernetes client.

k3s cannot be downloaded here, so this runs only with DCX_K3S_BINARY=/path/to/k3s (and
DCX_K3S_INSTALL_SCRIPT=/path/to/install.sh, saved from https://get.k3s.io; optionally
DCX_K3S_IMAGES=/path/to/k3s-airgap-images-ARCH.tar.zst). Namespace hosts use 10.213.240.0/24.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.testbed.local import Dcx, leftovers

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

SUBNET = "10.213.240.0/24"
WHY = ("DCX_K3S_BINARY not set: k3s cannot be downloaded here; set it to a k3s binary "
       "(and DCX_K3S_INSTALL_SCRIPT to install.sh) to run")


@pytest.fixture
def k3s_files() -> Iterator[dict[str, str]]:
    """The air-gap files from the environment (before dcx_cli, so the skip names what is missing)."""
    binary = os.environ.get("DCX_K3S_BINARY", "")
    if not binary:
        pytest.skip(WHY)
    if not Path(binary).is_file():
        pytest.skip(f"DCX_K3S_BINARY={binary} is not a file")
    files = {"binary": binary, "binarySha256": hashlib.sha256(Path(binary).read_bytes()).hexdigest()}
    script = os.environ.get("DCX_K3S_INSTALL_SCRIPT", "")
    if script:
        files["installScript"] = script
    images = os.environ.get("DCX_K3S_IMAGES", "")
    if images:
        files["images"] = images
    yield files


def spec_text(name: str, airgap: dict[str, str]) -> str:
    fields = ", ".join(f"{k}: {json.dumps(v)}" for k, v in airgap.items())
    return "\n".join([
        "apiVersion: dcx/v1", "kind: Cluster", f"metadata: {{name: {name}}}", "spec:",
        f"  engine: {{type: k3s, airgap: {{{fields}}}}}", "  pools:",
        f"    - {{name: control, role: control, count: 3, provider: local, local: {{subnet: {SUBNET}}}}}",
        f"    - {{name: workers, role: worker, count: 2, provider: local, local: {{subnet: {SUBNET}}},",
        "       labels: {tier: \"back-end\"}, taints: [\"dedicated=batch:NoSchedule\"]}", ""])


OTHER_KUBECONFIG = """apiVersion: v1
kind: Config
clusters:
- name: elsewhere
  cluster: {server: "https://192.0.2.10:6443"}
users:
- name: elsewhere
  user: {token: elsewhere-token-123456}
contexts:
- name: elsewhere
  context: {cluster: elsewhere, user: elsewhere}
current-context: elsewhere
"""


def test_ha_k3s_airgapped_on_namespace_nodes(k3s_files: dict[str, str], dcx_cli: tuple[Dcx, list[str]],
                                             tmp_path: Path) -> None:
    from kubernetes import client as kclient
    from kubernetes import config as kconfig

    cli, clusters = dcx_cli
    name = "e2e-k3s"
    clusters.append(name)
    kubeconfig = tmp_path / "kube" / "config"
    kubeconfig.parent.mkdir()
    kubeconfig.write_text(OTHER_KUBECONFIG)
    cli.env["KUBECONFIG"] = str(kubeconfig)  # never the operator's own file; the teardown uses it too
    spec = tmp_path / "cluster.yaml"
    spec.write_text(spec_text(name, k3s_files))

    r = cli.run("cluster", "create", "-f", str(spec), timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr
    status = cli.json("cluster", "status", name)
    assert status["engine"] == "k3s" and status["healthy"] is True, status
    assert sorted(n["name"] for n in status["nodes"]) == sorted(
        [f"{name}-control-{i}" for i in (1, 2, 3)] + [f"{name}-workers-{i}" for i in (1, 2)])
    assert all(n["ready"] for n in status["nodes"])

    # The kubeconfig went into $KUBECONFIG beside the other context, which stays current.
    contexts, active = kconfig.list_kube_config_contexts(config_file=str(kubeconfig))
    assert sorted(c["name"] for c in contexts) == [f"dcx-{name}", "elsewhere"] and active["name"] == "elsewhere"
    assert kubeconfig.stat().st_mode & 0o777 == 0o600
    api = kclient.CoreV1Api(kconfig.new_client_from_config(config_file=str(kubeconfig), context=f"dcx-{name}"))
    nodes = api.list_node().items
    ready = {n.metadata.name: any(c.type == "Ready" and c.status == "True" for c in n.status.conditions)
             for n in nodes}
    assert ready == {n["name"]: True for n in status["nodes"]}
    worker = next(n for n in nodes if n.metadata.name == f"{name}-workers-1")
    assert worker.metadata.labels["tier"] == "back-end" and worker.metadata.labels["dcx.pool"] == "workers"
    assert any(t.key == "dedicated" and t.value == "batch" and t.effect == "NoSchedule" for t in worker.spec.taints)
    printed = cli.run("cluster", "kubeconfig", name, check=True).stdout
    assert f"name: dcx-{name}" in printed

    # A second create changes nothing.
    again = cli.run("cluster", "create", "-f", str(spec), timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "==> Start k3s on the first control node" not in again.stdout
    assert cli.json("cluster", "plan", "-f", str(spec))["empty"] is True

    cluster_id = cli.state(name)["id"]
    r = cli.run("cluster", "destroy", name, "--yes", timeout=600)
    assert r.returncode == 0, r.stderr
    assert leftovers(cluster_id, name) == []
    contexts, _ = kconfig.list_kube_config_contexts(config_file=str(kubeconfig))
    assert [c["name"] for c in contexts] == ["elsewhere"]
