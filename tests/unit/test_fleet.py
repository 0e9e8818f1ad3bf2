"""Fleet operations without machines: node selection, folding, redaction of every kind of secret,
the diagnose script's parts (run by a real sh), its findings, and its archive."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from dcx import diagnose, fleet
from dcx.cli.main import hoist_global_options
from dcx.errors import EXIT_BAD_INPUT, InputError
from dcx.log import redact, redact_gathered
from dcx.providers.base import Node
from dcx.state import ClusterState

SWARM_TOKEN = "SWMTKN-1-3pu6hszjas19xyp7ghgosyx9k8atbfcr8p2is99znpy26u2lkl-1awxwuwd3z9j1z3puu7rcgdbx"
UNLOCK_KEY = "SWMKEY-1-7c37Cc8654o6p38HnroywCi19pllOnGtbdZEgtKxZu8"
K3S_TOKEN = "K10d9a3b1c7e5f40123456789abcdef0123456789abcdef0123456789abcdef01::server:7f3e9c1b2a4d6e8f"
WG_PRIVATE = "6PELbuRzpQiWwPKOXHOmDKjQK62fsatahOfDCOxQ1XQ="
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAx\nabc\n-----END RSA PRIVATE KEY-----"


def state_with(*nodes: Node) -> ClusterState:
    return ClusterState(name="c", id="abcd", nodes={n.name: n.to_dict() for n in nodes})


NODES = (Node("c-control-1", "control", "local", "control", "10.0.0.2", labels={"tier": "core"}),
         Node("c-workers-1", "workers", "local", "worker", "10.0.0.3", labels={"tier": "app", "gpu": "yes"}),
         Node("c-workers-2", "workers", "local", "worker", "10.0.0.4", labels={"tier": "app"}))


@pytest.mark.parametrize(("sel", "expected"), [
    (fleet.Selection(), ["c-control-1", "c-workers-1", "c-workers-2"]),
    (fleet.Selection(role="worker"), ["c-workers-1", "c-workers-2"]),
    (fleet.Selection(pools=["control"]), ["c-control-1"]),
    (fleet.Selection(nodes=["c-workers-2", "c-control-1"]), ["c-control-1", "c-workers-2"]),
    (fleet.Selection(labels={"tier": "app"}), ["c-workers-1", "c-workers-2"]),
    (fleet.Selection(labels={"tier": "app", "gpu": "yes"}), ["c-workers-1"]),  # every label must match
    (fleet.Selection(pools=["workers"], nodes=["c-workers-2", "c-control-1"]), ["c-workers-2"]),
])
def test_selection_keeps_the_nodes_every_filter_matches(sel: fleet.Selection, expected: list[str]) -> None:
    assert [n.name for n in fleet.select_nodes(state_with(*NODES), sel)] == expected


@pytest.mark.parametrize(("sel", "message"), [
    (fleet.Selection(role="worker", pools=["control"]), "no node of cluster c matches --pool control --role worker"),
    (fleet.Selection(nodes=["nope"]), "cluster c has no node nope"),
    (fleet.Selection(pools=["gpu"]), "cluster c has no nodes in pool gpu"),
    (fleet.Selection(role="manager"), "--role manager: must be control or worker"),
    (fleet.Selection(labels={"tier": "db"}), "no node of cluster c matches --label tier=db"),
])
def test_a_selection_that_matches_nothing_is_bad_input(sel: fleet.Selection, message: str) -> None:
    with pytest.raises(InputError) as err:
        fleet.select_nodes(state_with(*NODES), sel)
    assert message in err.value.message and err.value.exit_code == EXIT_BAD_INPUT


def test_labels_are_key_value_pairs() -> None:
    assert fleet.parse_labels(["a=b", "c=d=e", "f="]) == {"a": "b", "c": "d=e", "f": ""}
    for bad in ("tier", "=x"):
        with pytest.raises(InputError):
            fleet.parse_labels([bad])


def result(node: str, code: int | None, out: str = "", err: str = "", error: str | None = None) -> fleet.NodeResult:
    return fleet.NodeResult(node, "p", "worker", code, out, err, 0.1, error)


def test_fold_groups_identical_results_in_first_seen_order() -> None:
    results = [result("a", 0, "5.10\n"), result("b", 1, "5.10\n"), result("c", 0, "5.10\n"),
               result("d", 0, "5.10\n", "warn\n"), result("e", None, error="unreachable: x"),
               result("f", None, error="unreachable: x")]
    groups = fleet.fold(results)
    assert [g.nodes for g in groups] == [["a", "c"], ["b"], ["d"], ["e", "f"]]
    assert groups[0].to_dict() == {"nodes": ["a", "c"], "exit_code": 0, "stdout": "5.10\n", "stderr": "",
                                   "error": None}


@pytest.mark.parametrize("secret", [SWARM_TOKEN, UNLOCK_KEY, K3S_TOKEN, PEM])
def test_secret_forms_are_redacted_everywhere(secret: str) -> None:
    text = redact(f"before {secret} after")
    assert text == "before *** after"


def test_a_truncated_private_key_is_redacted_to_the_end() -> None:
    assert redact("x -----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAA") == "x ***"


def test_wireguard_private_keys_but_not_public_ones() -> None:
    text = f"[Interface]\nPrivateKey = {WG_PRIVATE}\n[Peer]\nPublicKey = abc=\n"
    assert redact(text) == "[Interface]\nPrivateKey = ***\n[Peer]\nPublicKey = abc=\n"


def test_gathered_text_loses_every_assigned_password_token_or_secret() -> None:
    text = ("password: hunter2\nK3S_TOKEN=abc123\n{\"token\": \"abc\"}\nx --token abc y\n"
            "ansible_become_password=foo bar\nclient_secret = 'zz'\n--password -v\nthe token expired\n")
    assert redact_gathered(text) == (
        "password: ***\nK3S_TOKEN=***\n{\"token\": \"***\"}\nx --token *** y\nansible_become_password=*** bar\n"
        "client_secret = '***'\n--password -v\nthe token expired\n")
    assert redact("password: hunter2") == "password: hunter2"  # dcx's own log lines keep ordinary words


def test_hoisting_leaves_diagnose_its_archive_path() -> None:
    assert hoist_global_options(["cluster", "diagnose", "c", "-o", "x.tar.gz"]) == \
        ["cluster", "diagnose", "c", "-o", "x.tar.gz"]
    assert hoist_global_options(["cluster", "diagnose", "c", "-o", "json"]) == \
        ["-o", "json", "cluster", "diagnose", "c"]
    assert hoist_global_options(["node", "run", "c", "-o", "json", "--", "ls", "-o", "x"]) == \
        ["-o", "json", "node", "run", "c", "--", "ls", "-o", "x"]


# --- the diagnose script, run by a real sh ------------------------------------------------------------

# `wg show dcx0 dump` as wg(8) documents it: the interface line (private key, public key, listen port,
# fwmark), then one line per peer (public key, preshared key, endpoint, allowed ips, latest handshake,
# rx, tx, persistent keepalive), tab separated.
WG_DUMP_TEXT = (f"{WG_PRIVATE}\tPUBKEYself=\t51820\toff\n"
                "PUBKEYpeer=\tPRESHAREDsecret=\t10.0.0.3:51820\t100.96.0.2/32\t1700000000\t10\t20\toff\n")


def test_the_mesh_section_drops_private_and_preshared_keys(tmp_path: Path) -> None:
    fake = tmp_path / "wg"
    fake.write_text(f"#!/bin/sh\nprintf '{WG_DUMP_TEXT}'\n")
    fake.chmod(0o755)
    out = subprocess.run(["sh", "-c", diagnose.WG_DUMP], capture_output=True, text=True, check=True,
                         env={"PATH": f"{tmp_path}:/usr/bin:/bin"}).stdout
    assert WG_PRIVATE not in out and "PRESHAREDsecret=" not in out
    assert out.splitlines()[:2] == ["interface\tPUBKEYself=\t51820",
                                    "peer\tPUBKEYpeer=\t10.0.0.3:51820\t100.96.0.2/32\t1700000000\t10\t20\toff"]
    peers, now = diagnose.parse_wg_dump(out)
    assert peers == [{"public_key": "PUBKEYpeer=", "endpoint": "10.0.0.3:51820", "allowed_ips": "100.96.0.2/32",
                      "latest_handshake": 1700000000}] and now > 1700000000


def test_sections_come_back_apart_and_node_secrets_never_leave(tmp_path: Path) -> None:
    nonce = "n0nce"
    script = diagnose.collect_script([("a", "echo one; echo two >&2"), ("b", f"echo key {WG_PRIVATE}; exit 3"),
                                      ("c", "echo after")], nonce)
    # The node's private key file, as the scrub reads it (the real path is /etc/dcx/wireguard).
    key_file = tmp_path / "private.key"
    key_file.write_text(WG_PRIVATE + "\n")
    script = script.replace(f"{diagnose.mesh.KEY_DIR}/private.key", str(key_file))
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout
    assert diagnose.split_sections(out, nonce) == {"a": "one\ntwo\n", "b": "key ***\n", "c": "after\n"}


def report(name: str, **kw: object) -> diagnose.NodeReport:
    r = diagnose.NodeReport(name, "worker", reachable=True, facts={"docker_running": True}, clock_offset=0.2)
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_findings_name_what_looks_wrong() -> None:
    wg = ("interface\tPUB1=\t51820\npeer\tPUB2=\t10.0.0.3:51820\t100.96.0.2/32\t1000\t1\t1\toff\n"
          "peer\tPUB3=\t10.0.0.4:51820\t100.96.0.3/32\t0\t0\t0\toff\nnow=1100\n")
    df = ("Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/sda1 100 95 5 95% /\n"
          "/dev/sdb1 100 50 50 50% /var/lib/docker\n")
    reports = [
        report("a", reachable=False, error="cannot reach a over SSH"),
        report("b", facts={"docker_running": False}),
        report("c", sections={"mesh": wg, "disk": df}, clock_offset=-45.0),
        report("d"),
        report("e", error="gathering facts failed on e (exit 1)", facts={}),  # reached, then refused
    ]
    health = {"b": {"ready": False, "state": "down", "detail": "heartbeat failure"}, "c": {"ready": True},
              "d": {"ready": True}, "e": {"ready": True}}
    mesh = {"c": "100.96.0.1", "x": "100.96.0.2", "y": "100.96.0.3"}
    assert diagnose.findings(reports, health, mesh, "swarm") == [
        "a: unreachable: cannot reach a over SSH",
        "b: docker is not running",
        "b: not Ready (down: heartbeat failure)",
        "c: mesh peer y (100.96.0.3): last handshake never",
        "c: clock is 45 s behind this machine's",
        "c: disk / is 95% full",
        "e: gathering facts failed on e (exit 1)",
    ]
    # 100 s is recent: only a handshake older than HANDSHAKE_STALE_S is reported.
    assert not [f for f in diagnose.findings(reports, health, mesh, "swarm") if "mesh peer x" in f]


def test_the_archive_is_redacted_and_private() -> None:
    data = diagnose.build_archive("top", {"a.txt": f"token {SWARM_TOKEN}\npassword=x1\n", "n/b.log": PEM})
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = {m.name: (m.mode, tar.extractfile(m).read().decode()) for m in tar.getmembers()}  # type: ignore[union-attr]
    assert members == {"top/a.txt": (0o600, "token ***\npassword=***\n"), "top/n/b.log": (0o600, "***")}


@pytest.mark.parametrize(("engine", "expected"), [
    ("swarm", {"engine": ["docker info", "docker node ls", "docker service ls", "docker service ps --no-trunc"],
               "daemon-log": ["journalctl -u docker -u containerd --no-pager", "/var/log/dcx-dockerd.log"],
               "config": ["/etc/docker/daemon.json"]}),
    # k3s cannot run here: its commands are checked as text against k3s's own CLI (`k3s kubectl`,
    # `k3s check-config`) and the units and log file dcx starts it with (dcx.bootstrap.k3s).
    ("k3s", {"engine": ["/usr/local/bin/k3s kubectl get nodes -o wide", "/usr/local/bin/k3s kubectl get pods -A",
                        "/usr/local/bin/k3s check-config"],
             "daemon-log": ["journalctl -u k3s -u k3s-agent --no-pager", "/var/log/dcx-k3s.log",
                            "/var/log/k3s-agent.log"],
             "config": ["/etc/rancher/k3s/config.yaml"]}),
])
def test_each_engine_gathers_its_own_view_logs_and_config(engine: str, expected: dict[str, list[str]]) -> None:
    items = dict(diagnose.sections(engine))
    assert {"os", "resources", "disk", "network", "firewall", "mesh"} <= set(items)
    for section, parts in expected.items():
        for part in parts:
            assert part in items[section], (section, part)


@pytest.mark.skipif(Path("/run/systemd/system").is_dir(), reason="systemd runs here: the journal would be read")
def test_without_systemd_the_daemon_log_is_the_file_it_was_started_with(tmp_path: Path) -> None:
    log_file = tmp_path / "dockerd.log"
    log_file.write_text("".join(f"line {i}\n" for i in range(diagnose.LOG_LINES + 5)))
    out = subprocess.run(["sh", "-c", diagnose._daemon_logs("docker", [str(log_file), str(tmp_path / "absent")])],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == f"--- {log_file}" and out[1] == "line 5" and out[-1] == f"line {diagnose.LOG_LINES + 4}"
    assert len(out) == diagnose.LOG_LINES + 1
