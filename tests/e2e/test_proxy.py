"""Proxies end to end (issue 18): two nodes whose only way out is an HTTP proxy on another namespace host
(Debian's tinyproxy), and a registry (Debian's docker-registry) on a network only that host reaches.

The spec's `network.proxy` -> create, `docker pull` on every node goes through the proxy (its log shows the
registry requests, and dockerd has the variables); then the proxy comes from the inventory's `proxy_env`
instead, on another port -> the files change, dockerd restarts with them, the pull goes through the new
proxy; then no proxy at all -> dcx's files are gone and the registry is out of reach."""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcx.images import busybox_rootfs
from tests.fakes.registry import opener, push_rootfs, registry_config, registry_tls, start_in, tinyproxy_config
from tests.testbed.lab import Lab
from tests.testbed.local import Dcx, force_cleanup, skip_without_namespace_nodes, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]  # the namespace-test lock may be held a while

LAN, LAN_OPERATOR = "10.214.70.0/24", "10.214.70.1"
OUT, OUT_OPERATOR = "192.168.214.0/24", "192.168.214.1"  # outside every range dcx adds to NO_PROXY
PROXY_HOST, REGISTRY_IP = "10.214.70.10", "192.168.214.10"
REGISTRY = f"{REGISTRY_IP}:5000"
IMAGE = f"{REGISTRY}/dcx/busybox:1"
NODES = {"n1": "10.214.70.11", "n2": "10.214.70.12"}
CLUSTER = "px"
PROXY_USER, PROXY_PASSWORD = "dcx", "s3cret-proxy-pw"  # proxy-b's basic auth: a secret dcx must not show
PROXY_B = f"http://{PROXY_USER}:{PROXY_PASSWORD}@10.214.70.10:8889"


@pytest.fixture
def site() -> Iterator[tuple[Lab, dict[str, Path]]]:
    skip_without_namespace_nodes()
    missing = [tool for tool in ("tinyproxy", "docker-registry") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing (apt-get install tinyproxy docker-registry; scripts/setup does it)")
    started = time.monotonic()
    lab = Lab("px")
    try:
        lab.network("lan", LAN, operator_ip=LAN_OPERATOR)
        lab.network("out", OUT, operator_ip=OUT_OPERATOR)  # the operator pushes the image; nodes have no route
        lab.host("proxy", "lan", PROXY_HOST, extra=[("out", REGISTRY_IP)])
        for name, ip in NODES.items():
            lab.host(name, "lan", ip)  # no gateway: nothing beyond the LAN but through the proxy
        work = lab.dir / "servers"
        work.mkdir()
        cert, key = registry_tls(work, REGISTRY_IP)
        for name in NODES:  # dockerd trusts the registry's certificate (Docker's certs.d/HOST:PORT/ca.crt)
            r = lab.inside(name, f"mkdir -p /etc/docker/certs.d/{REGISTRY} && "
                                 f"cp {cert} /etc/docker/certs.d/{REGISTRY}/ca.crt")
            assert r.returncode == 0, r.stderr
        ns = lab.hosts["proxy"]
        start_in(ns, ["docker-registry", "serve", str(registry_config(work, REGISTRY, cert, key))],
                 work / "registry.out")
        logs = {}
        for name, port, auth in (("proxy-a", 8888, None), ("proxy-b", 8889, (PROXY_USER, PROXY_PASSWORD))):
            conf, logs[name] = tinyproxy_config(work, name, PROXY_HOST, port, LAN, auth)
            start_in(ns, ["tinyproxy", "-d", "-c", str(conf)], work / f"{name}.out")
        wait_for(lambda: _answers(f"https://{REGISTRY}/v2/", cert), 20, "the registry")
        wait_for(lambda: connect_status(8889) == 407, 10, "proxy-b refusing a CONNECT without its password")
        push_rootfs(REGISTRY, cert, "dcx/busybox", "1", busybox_rootfs())
        print(f"\nproxy e2e: lab, proxies and registry ready in {time.monotonic() - started:.1f}s")
        yield lab, logs
    finally:
        lab.close()  # every process of the lab's namespaces (registry, proxies, sshd, dockerd) ends here


def _answers(url: str, ca: Path) -> bool:
    try:
        with opener(ca).open(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def connect_status(port: int) -> int:
    """The status a proxy on PROXY_HOST answers to a CONNECT to the registry without credentials (0: none)."""
    try:
        with socket.create_connection((PROXY_HOST, port), timeout=2) as conn:
            conn.sendall(f"CONNECT {REGISTRY} HTTP/1.1\r\nHost: {REGISTRY}\r\n\r\n".encode())
            head = conn.recv(64).decode(errors="replace").split()
            return int(head[1]) if len(head) > 1 and head[1].isdigit() else 0
    except OSError:
        return 0


def write_files(lab: Lab, tmp: Path, spec_proxy: str, inventory_proxy: str) -> Path:
    hosts = "\n".join(f"{name} ansible_host={ip}" for name, ip in NODES.items())
    (tmp / "hosts.ini").write_text(f"[managers]\n{hosts.splitlines()[0]}\n[workers]\n{hosts.splitlines()[1]}\n"
                                   f"[all:vars]\nansible_user=root\nansible_ssh_private_key_file={lab.key}\n"
                                   + (f"proxy_env={inventory_proxy}\n" if inventory_proxy else ""))
    spec = tmp / "cluster.yaml"
    spec.write_text(f"apiVersion: dcx/v1\nkind: Cluster\nmetadata: {{name: {CLUSTER}}}\nspec:\n"
                    + (f"  network:\n    proxy: {spec_proxy}\n" if spec_proxy else "")
                    + "  pools:\n"
                    "    - {name: control, role: control, provider: ssh, ssh: {inventory: hosts.ini, group: managers,"
                    " network: lan}}\n"
                    "    - {name: workers, role: worker, provider: ssh, ssh: {inventory: hosts.ini, group: workers,"
                    " network: lan}}\n")
    return spec


def on_nodes(cli: Dcx, command: str) -> dict[str, dict[str, object]]:
    r = cli.run("node", "run", CLUSTER, "-o", "json", "--", command, timeout=120)  # -o json before --
    try:
        return {n["node"]: n for n in json.loads(r.stdout)["nodes"]}
    except (ValueError, KeyError):
        raise AssertionError(f"dcx node run: no JSON (exit {r.returncode})\n{r.stdout}\n{r.stderr}") from None


def all_ok(results: dict[str, dict[str, object]]) -> bool:
    return sorted(results) == sorted(NODES) and all(r["exit_code"] == 0 for r in results.values())


def shown(results: dict[str, dict[str, object]]) -> dict[str, tuple[object, ...]]:
    return {n: (r["exit_code"], r["stdout"], r["stderr"], r["error"]) for n, r in results.items()}


def registry_requests(log: Path) -> int:
    return sum(1 for line in log.read_text().splitlines() if REGISTRY in line)


def test_pulls_through_the_proxy_then_another_then_none(site: tuple[Lab, dict[str, Path]], tmp_path: Path) -> None:
    lab, logs = site
    cli = Dcx(tmp_path / "home")
    cli.env["DCX_NO_SSH_CONFIG"] = "1"
    started = time.monotonic()
    try:
        # 1. spec.network.proxy: the cluster's proxy.
        spec = write_files(lab, tmp_path, "{http: 'http://10.214.70.10:8888', noProxy: [.corp.example]}", "")
        r = cli.run("cluster", "create", "-f", str(spec), timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        created = time.monotonic() - started
        env = on_nodes(cli, "cat /etc/dcx/proxy.env; cat /etc/apt/apt.conf.d/90dcx-proxy; "
                            "tr '\\0' '\\n' < /proc/$(cat /run/dcx/dockerd.pid)/environ | grep -i _proxy=")
        assert all_ok(env), shown(env)
        for node, result in env.items():
            text = str(result["stdout"])
            assert "HTTPS_PROXY=http://10.214.70.10:8888" in text  # one URL for both schemes
            assert 'Acquire::http::Proxy "http://10.214.70.10:8888";' in text
            no_proxy = next(line for line in text.splitlines() if line.startswith("NO_PROXY="))
            assert no_proxy.startswith("NO_PROXY=.corp.example,localhost,127.0.0.1,::1,100.96.0.0/16,")
            assert NODES[node] in no_proxy and REGISTRY_IP not in no_proxy
            assert text.count("HTTP_PROXY=http://10.214.70.10:8888") == 2  # the file, and dockerd's environment
        before = registry_requests(logs["proxy-a"])
        pulled = on_nodes(cli, f"docker pull -q {IMAGE} && docker run --rm {IMAGE} echo pulled-through-proxy")
        assert all_ok(pulled) and all("pulled-through-proxy" in str(p["stdout"]) for p in pulled.values()), \
            shown(pulled)
        assert registry_requests(logs["proxy-a"]) > before, logs["proxy-a"].read_text()[-2000:]
        assert f"CONNECT {REGISTRY} HTTP/1.1" in logs["proxy-a"].read_text()  # HTTPS: a tunnel through the proxy
        pids = {n: r["stdout"] for n, r in on_nodes(cli, "cat /run/dcx/dockerd.pid").items()}
        r = cli.run("cluster", "create", "-f", str(spec), timeout=240)  # unchanged: nothing rewritten or restarted
        assert r.returncode == 0, r.stdout + r.stderr
        assert {n: r["stdout"] for n, r in on_nodes(cli, "cat /run/dcx/dockerd.pid").items()} == pids

        # 2. The inventory's proxy_env (Ansible's spelling) instead, another proxy that wants a password:
        #    files and dockerd change.
        spec = write_files(lab, tmp_path, "", f"{{'http_proxy': '{PROXY_B}'}}")
        t2 = time.monotonic()
        r = cli.run("cluster", "create", "-f", str(spec), timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        changed = time.monotonic() - t2
        env = on_nodes(cli, "cat /etc/dcx/proxy.env; tr '\\0' '\\n' < /proc/$(cat /run/dcx/dockerd.pid)/environ")
        assert PROXY_PASSWORD not in r.stdout + r.stderr
        # dcx's own output shows the password as *** even when a command prints it; the node has it.
        shown_b = PROXY_B.replace(PROXY_PASSWORD, "***")
        assert all_ok(env) and all(str(e["stdout"]).count(f"HTTP_PROXY={shown_b}") == 2
                                   and "8888" not in str(e["stdout"]) for e in env.values()), shown(env)
        for node in NODES:
            assert f"HTTP_PROXY={PROXY_B}\n" in lab.inside(node, "cat /etc/dcx/proxy.env").stdout
        restarted = on_nodes(cli, "cat /run/dcx/dockerd.pid")
        assert all(restarted[n]["stdout"] != pids[n] for n in NODES), shown(restarted)  # with the new variables
        a_before, b_before = registry_requests(logs["proxy-a"]), registry_requests(logs["proxy-b"])
        pulled = on_nodes(cli, f"docker rmi -f {IMAGE} >/dev/null && docker pull -q {IMAGE}")
        assert all_ok(pulled), shown(pulled)
        assert registry_requests(logs["proxy-b"]) > b_before and registry_requests(logs["proxy-a"]) == a_before

        # The password reached the nodes (0600) and nowhere else of dcx's: no state, no run log.
        mode = on_nodes(cli, "stat -c %a /etc/dcx/proxy.env /etc/apt/apt.conf.d/90dcx-proxy")
        assert all(str(m["stdout"]).split() == ["600", "600"] for m in mode.values()), shown(mode)
        kept = [p for p in (cli.home / "clusters" / CLUSTER).rglob("*") if p.is_file()
                and PROXY_PASSWORD.encode() in p.read_bytes()]
        assert kept == []

        # 3. No proxy: what dcx wrote is gone, and so is the only way to the registry.
        spec = write_files(lab, tmp_path, "", "")
        t3 = time.monotonic()
        r = cli.run("cluster", "create", "-f", str(spec), timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        removed = time.monotonic() - t3
        gone = on_nodes(cli, "test ! -e /etc/dcx/proxy.env && test ! -e /etc/apt/apt.conf.d/90dcx-proxy && "
                             "! tr '\\0' '\\n' < /proc/$(cat /run/dcx/dockerd.pid)/environ | grep -qi _proxy=")
        assert all_ok(gone), shown(gone)
        direct = on_nodes(cli, f"docker rmi -f {IMAGE} >/dev/null; timeout 20 docker pull -q {IMAGE}")
        assert all(r["exit_code"] != 0 for r in direct.values()), shown(direct)
        print(f"\nproxy e2e: create {created:.1f}s, changed {changed:.1f}s, removed {removed:.1f}s, "
              f"all {time.monotonic() - started:.1f}s")
    finally:
        force_cleanup(cli.home, [CLUSTER])
