"""Facts parsing and the runtime commands per OS family and init system (table-driven: these cases
cannot all run here, so the exact commands are the contract)."""

from __future__ import annotations

import pytest

from dcx.bootstrap.runtime import Facts, docker_install_commands, docker_start_commands, parse_facts
from dcx.errors import OperationFailed

SAMPLE = """os_id=ubuntu
os_like=debian
os_version=24.04
arch=x86_64
kernel=6.8.0
hostname=node-1
uid=0
cpus=4
mem_kb=8000000
disk_kb=50000000
epoch=1764000000.5
init=systemd
docker_bin=
docker_running=0
docker_version=
wg_bin=/usr/bin/wg
wggo_bin=
wg_kernel=1
sudo_ok=1
"""


def test_parse_facts() -> None:
    f = parse_facts(SAMPLE)
    assert (f.os_id, f.family, f.os_version, f.arch, f.init) == ("ubuntu", "debian", "24.04", "x86_64", "systemd")
    assert (f.uid, f.cpus, f.mem_kb) == (0, 4, 8000000)
    assert f.epoch == pytest.approx(1764000000.5)
    assert f.docker_running is False and f.wg_kernel is True
    assert f.docker_bin == ""


@pytest.mark.parametrize(("os_id", "like", "family", "expected"), [
    ("debian", "", "debian", ["export DEBIAN_FRONTEND=noninteractive", "dpkg --configure -a", "apt-get update -q",
                              "apt-get install -y -q docker.io"]),
    ("ubuntu", "debian", "debian", ["export DEBIAN_FRONTEND=noninteractive", "dpkg --configure -a", "apt-get update -q",
                                    "apt-get install -y -q docker.io"]),
    ("fedora", "", "rhel", ["dnf install -y moby-engine"]),
    ("amzn", "centos rhel fedora", "rhel", ["yum install -y docker"]),
    ("rocky", "rhel centos fedora", "rhel", [
        "dnf install -y dnf-plugins-core",
        "dnf config-manager --add-repo https://download.docker.com/linux/centos/docker-ce.repo",
        "dnf install -y docker-ce docker-ce-cli containerd.io"]),
    ("alpine", "", "alpine", ["apk add --no-cache docker"]),
    ("opensuse-leap", "suse opensuse", "suse", ["zypper --non-interactive install docker"]),
    ("arch", "", "arch", ["pacman -Sy --noconfirm docker"]),
])
def test_install_commands_per_family(os_id: str, like: str, family: str, expected: list[str]) -> None:
    facts = Facts(os_id=os_id, os_like=like)
    assert facts.family == family
    assert docker_install_commands(facts) == expected


def test_unknown_os_is_a_clear_error() -> None:
    with pytest.raises(OperationFailed, match="unsupported OS 'plan9'"):
        docker_install_commands(Facts(os_id="plan9"))


@pytest.mark.parametrize(("init", "expected_first"), [
    ("systemd", "systemctl enable --now docker"),
    ("openrc", "rc-update add docker default"),
    ("none", "mkdir -p /run/dcx"),
])
def test_start_commands_per_init_system(init: str, expected_first: str) -> None:
    commands = docker_start_commands(Facts(init=init))
    assert commands[0] == expected_first
    if init == "openrc":
        assert commands[1] == "rc-service docker start"
    if init == "none":
        # Detached with a pidfile, and only when none is running: a re-run starts nothing twice.
        assert "setsid dockerd --pidfile /run/dcx/dockerd.pid" in commands[1]
        assert 'if running "$(cat /run/dcx/dockerd.pid 2>/dev/null)" dockerd; then :; else' in commands[1]


@pytest.mark.parametrize(("what", "pid", "program", "runs"), [
    ("this shell", "$$", "sh", True),
    ("another program", "$$", "dockerd", False),
    ("no such process", "999999999", "sh", False),
    ("empty pidfile", "", "sh", False),
])
def test_running_is_true_only_for_that_program_alive(what: str, pid: str, program: str, runs: bool) -> None:
    import subprocess

    from dcx.bootstrap.runtime import RUNNING_FUNCTION

    # /bin/sh here is dash, whose exe is /usr/bin/dash: name it as readlink shows it.
    script = f'{RUNNING_FUNCTION}; p={program}; [ "$p" = sh ] && p=$(basename "$(readlink /proc/$$/exe)"); ' \
             f'running "{pid}" "$p"'
    assert (subprocess.run(["sh", "-c", script]).returncode == 0) is runs, what


def test_cloud_init_user_data_is_valid_yaml_with_the_key_and_nothing_per_machine() -> None:
    from ruamel.yaml import YAML

    from dcx.templates import render

    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample dcx-demo"
    text = render("cloud-init.yaml", user="ubuntu", public_key=key, disable_root="true")
    assert text.startswith("#cloud-config\n")
    data = YAML(typ="safe").load(text)
    user = next(u for u in data["users"] if isinstance(u, dict))
    assert (user["name"], user["ssh_authorized_keys"], user["sudo"]) == ("ubuntu", [key], "ALL=(ALL) NOPASSWD:ALL")
    assert data["ssh_pwauth"] is False and data["disable_root"] is True
    assert "hostname" not in data  # one user-data serves a batch of machines


def test_a_zombie_is_not_running() -> None:
    """A daemon killed where nothing reaps it stays a zombie: `kill -0` succeeds on it, `running` must not."""
    import subprocess
    import time

    from dcx.bootstrap.runtime import RUNNING_FUNCTION

    child = subprocess.Popen(["sleep", "0"])  # not waited for until the end: a zombie meanwhile
    try:
        while not open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
            time.sleep(0.01)
        assert subprocess.run(["sh", "-c", f"kill -0 {child.pid}"]).returncode == 0
        assert subprocess.run(["sh", "-c", f"{RUNNING_FUNCTION}; running {child.pid} sleep"]).returncode == 1
    finally:
        child.wait()


@pytest.mark.parametrize(("facts", "needed"), [
    ("docker_bin=/usr/sbin/dockerd\nwg_bin=/usr/bin/wg\nwg_kernel=1\n", False),
    ("docker_bin=\nwg_bin=\nwg_kernel=1\n", True),
    # The binaries are unpacked but dpkg was interrupted: the install is not done.
    ("docker_bin=/usr/sbin/dockerd\nwg_bin=/usr/bin/wg\nwg_kernel=1\npackages_interrupted=1\n", True),
])
def test_install_is_done_only_when_the_package_manager_finished(facts: str, needed: bool) -> None:
    from types import SimpleNamespace

    from dcx.bootstrap.mesh import InstallWireGuard
    from dcx.bootstrap.runtime import InstallRuntime

    host = SimpleNamespace(facts=parse_facts(facts))
    assert InstallRuntime().needs_run(None, host) is needed  # type: ignore[arg-type]
    assert InstallWireGuard().needs_run(None, host) is needed  # type: ignore[arg-type]
