"""A bucket-store cluster reached from machines that did not make it: host keys learned by read-only
commands reach the store (and are checked by the next run instead of trusted again), the ssh settings
(`node ssh`, the ~/.ssh/config Include that `docker --context` and `ssh dcx-NAME` go through) work
from a fresh DCX_HOME, and `--timeout` ends a command with exit 124 and its lock released.

The node is a real SSH server (tests/fakes/ssh_server.py, paramiko, commands run by /bin/sh here),
reached by dcx's paramiko client and by the OpenSSH client; the store is moto's S3 server."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest

from dcx.errors import EXIT_LOCKED, EXIT_TIMEOUT, HostKeyMismatch
from dcx.spec import load
from dcx.state import ClusterState, StateStore
from dcx.stores import backend_for, parse_url
from tests.fakes.ssh_server import LimitedSSHServer
from tests.testbed.stores import free_port, moto_server, s3_store

NAME = "tofu"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def store(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict[str, str]]:
    monkeypatch.delenv("DCX_STATE", raising=False)
    url, env = s3_store(s3_endpoint)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return url, env


def record_cluster(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   serve: Callable[[Path], int]) -> None:
    """A recorded cluster of one node (no host key recorded yet), made by a runner whose DCX_HOME is then
    gone. `serve(private key file)` starts the node's SSH server taking the cluster's key: its port."""
    spec_file = tmp_path / "cluster.yaml"
    spec_file.write_text(f"apiVersion: dcx/v1\nkind: Cluster\nmetadata: {{name: {NAME}}}\nspec:\n  pools:\n"
                         "    - {name: control, role: control, provider: ssh, ssh: {hosts: [{name: n1, "
                         "address: 127.0.0.1}]}}\n")
    monkeypatch.setenv("DCX_HOME", str(tmp_path / "maker"))
    cdir = StateStore(url=url).cluster(NAME)
    with cdir.lock("cluster create"):
        key_path, _ = cdir.ensure_ssh_key()
        n1 = {"name": "n1", "pool": "control", "provider": "ssh", "role": "control", "ssh_address": "127.0.0.1",
              "ssh_port": serve(key_path), "ssh_user": "root"}
        cdir.save(ClusterState(name=NAME, id="0123abcd", status="ready", spec_file=str(spec_file),
                               spec=load(spec_file).model_dump(mode="json"), nodes={"n1": n1}))
    shutil.rmtree(tmp_path / "maker")


@pytest.fixture
def node(store: tuple[str, dict[str, str]], tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> Iterator[LimitedSSHServer]:
    """The node is an in-process SSH server (paramiko) whose host key a test can swap."""
    servers: list[LimitedSSHServer] = []

    def serve(key_path: Path) -> int:
        servers.append(LimitedSSHServer(paramiko.Ed25519Key.from_private_key_file(str(key_path)), max_sessions=None))
        return servers[0].port

    try:
        record_cluster(store[0], tmp_path, monkeypatch, serve)
        yield servers[0]
    finally:
        for server in servers:
            server.close()


@pytest.fixture
def sshd_node(store: tuple[str, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """The node is OpenSSH's sshd on 127.0.0.1 (what the OpenSSH client is checked against), in a private
    mount namespace with its own /run (its privilege separation directory), as the namespace hosts run it."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and os.access("/usr/sbin/sshd", os.X_OK)
                                 and shutil.which("ssh") and shutil.which("ssh-keygen")):
        pytest.skip("needs root, unshare, /usr/sbin/sshd and the OpenSSH client (apt-get install openssh-server)")
    procs: list[subprocess.Popen[bytes]] = []

    def serve(key_path: Path) -> int:
        d = tmp_path / "sshd"
        d.mkdir(mode=0o700)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
        (d / "authorized_keys").write_text(key_path.with_name("id_ed25519.pub").read_text())
        port = free_port()
        (d / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d / 'host_key'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
            f"PidFile none\nStrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n")
        procs.append(subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             "mount -t tmpfs tmpfs /run && mkdir -m 755 /run/sshd && "
             f"exec /usr/sbin/sshd -D -e -f {d / 'sshd_config'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for _ in range(100):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return port
            if procs[0].poll() is not None:
                pytest.fail(f"sshd exited: {procs[0].stderr.read().decode()[-500:]}")  # type: ignore[union-attr]
            time.sleep(0.1)
        pytest.fail("sshd did not listen")

    try:
        record_cluster(store[0], tmp_path, monkeypatch, serve)
        yield 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def stored(url: str) -> dict[str, bytes]:
    b = backend_for(parse_url(url))
    return {k: got[0] for k in b.list("") if (got := b.get(k)) is not None}


def dcx(home: Path, env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env, "DCX_HOME": str(home), "DCX_NO_SSH_CONFIG": "1"}
    return subprocess.run([sys.executable, "-m", "dcx", *args], env=full, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def test_host_keys_learned_by_read_only_runs_reach_the_store(store: tuple[str, dict[str, str]],
                                                             node: LimitedSSHServer, tmp_path: Path) -> None:
    url, env = store
    presented = {"type": node.host_key.get_name(), "key": node.host_key.get_base64()}
    first = dcx(tmp_path / "runner-b", env, "--state", url, "node", "run", NAME, "--", "echo", "hello")
    assert first.returncode == 0 and "hello" in first.stdout, first.stderr
    objects = stored(url)
    assert "clusters/tofu/lock.json" not in objects  # a read-only run takes no lock...
    assert json.loads(objects["clusters/tofu/state.json"])["host_keys"] == {}  # ...nor writes state
    shared = json.loads(objects["clusters/tofu/host-keys/n1.json"])  # ...but shares the key it learned
    assert {k: shared[k] for k in ("node", "type", "key")} == {"node": "n1", **presented}

    # Another fresh runner checks the node against that key instead of trusting the first one it sees.
    genuine = node.host_key
    node.host_key = paramiko.ECDSAKey.generate()
    try:
        spoofed = dcx(tmp_path / "runner-c", env, "--state", url, "node", "run", NAME, "--", "echo", "hello")
    finally:
        node.host_key = genuine
    assert spoofed.returncode != 0 and "hello" not in spoofed.stdout
    assert "host key of n1" in spoofed.stdout + spoofed.stderr and "changed" in spoofed.stdout + spoofed.stderr
    assert stored(url)["clusters/tofu/host-keys/n1.json"] == objects["clusters/tofu/host-keys/n1.json"]
    again = dcx(tmp_path / "runner-c", env, "--state", url, "node", "run", NAME, "--", "echo", "hello")
    assert again.returncode == 0 and "hello" in again.stdout, again.stderr

    # The next locked run folds it into state.json, then deletes the object.
    export = dcx(tmp_path / "runner-d", env, "--state", url, "cluster", "export", NAME, "-o", str(tmp_path / "x.tgz"))
    assert export.returncode == 0, export.stderr
    objects = stored(url)
    assert json.loads(objects["clusters/tofu/state.json"])["host_keys"]["n1"]["key"] == presented["key"]
    assert not [k for k in objects if "host-keys/" in k] and "clusters/tofu/lock.json" not in objects


def test_two_read_only_runs_shown_different_keys_first_recorded_wins(store: tuple[str, dict[str, str]],
                                                                     node: LimitedSSHServer, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs that pulled before either shared (a race): the store's create-if-absent lets one key in;
    the run that saw another key is refused, nothing overwritten."""
    url, _ = store
    views = []
    for home in ("a", "b"):
        monkeypatch.setenv("DCX_HOME", str(tmp_path / home))
        cdir = StateStore(url=url).cluster(NAME)
        views.append((cdir, cdir.load()))
    (a, state_a), (b, state_b) = views
    state_a.host_keys["n1"] = {"address": "127.0.0.1:22", "type": "ssh-ed25519", "key": "AAAAfirst"}
    a.save(state_a)  # unlocked: shares the key
    state_b.host_keys["n1"] = {"address": "127.0.0.1:22", "type": "ssh-ed25519", "key": "AAAAsecond"}
    with pytest.raises(HostKeyMismatch, match="another run recorded a ssh-ed25519 key for it"):
        b.save(state_b)
    assert json.loads(stored(url)["clusters/tofu/host-keys/n1.json"])["key"] == "AAAAfirst"


def test_a_key_the_store_refuses_is_not_trusted_in_memory_either() -> None:
    """The refusal comes from the store while the key is being recorded: the run must not go on trusting
    it for its next connection to that node (a retry would pass the check unasked otherwise)."""
    from dcx.bootstrap.ssh import HostKeyStore, Target

    def refuse() -> None:
        raise HostKeyMismatch("host key of n1: another run recorded another key")

    keys: dict[str, dict[str, str]] = {}
    store = HostKeyStore(keys, on_change=refuse)
    target, presented = Target(name="n1", host="127.0.0.1"), paramiko.ECDSAKey.generate()
    for _ in range(2):  # asked again: refused again
        with pytest.raises(HostKeyMismatch):
            store.check(target, presented)
        assert keys == {}


def test_a_fresh_runner_reaches_the_nodes_through_its_ssh_settings(store: tuple[str, dict[str, str]],
                                                                   sshd_node: int, tmp_path: Path) -> None:
    """`node ssh` and the ~/.ssh/config Include (what `docker --context dcx-NAME` uses) from a DCX_HOME
    that never ran `create`: OpenSSH itself connects, with the key and known_hosts from the store (the
    host key a read-only run shared, not yet folded into state.json)."""
    url, env = store
    assert dcx(tmp_path / "learn", env, "--state", url, "node", "run", NAME, "--", "true").returncode == 0

    home = tmp_path / "runner-e"
    out = dcx(home, env, "--state", url, "node", "ssh", NAME, "n1", "--", "echo", "over-openssh")
    assert out.returncode == 0 and out.stdout.strip() == "over-openssh", out.stderr

    user_config = tmp_path / "user-ssh-config"
    user_config.write_text("Host unrelated\n  User someone\n")
    env_out = subprocess.run([sys.executable, "-m", "dcx", "--state", url, "cluster", "env", NAME],
                             env={**os.environ, **env, "DCX_HOME": str(home), "DCX_SSH_CONFIG": str(user_config)},
                             capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert env_out.returncode == 0 and "export DOCKER_HOST=ssh://dcx-tofu" in env_out.stdout, env_out.stderr
    [cache] = list((home / "cache").iterdir())
    include = f"Include {cache}/clusters/*/ssh/config"
    assert user_config.read_text().splitlines()[0] == include  # the store's working directory, not DCX_HOME's

    # What docker's SSH transport runs (`ssh dcx-NAME ...`), with the user's config: through the Include.
    via = subprocess.run(["ssh", "-F", str(user_config), "-o", "BatchMode=yes", "dcx-tofu", "echo", "via-include"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert via.returncode == 0 and via.stdout.strip() == "via-include", via.stderr
    # dcx's own reading of ~/.ssh/config follows the Include as OpenSSH does.
    from dcx.sshconfig import load_user_config, resolve

    ep = resolve("dcx-tofu", config=load_user_config(user_config))
    assert ep.host == "127.0.0.1" and ep.port == json.loads(stored(url)["clusters/tofu/state.json"])["nodes"]["n1"][
        "ssh_port"]
    assert ep.key_files == [str(cache / "clusters" / NAME / "ssh" / "id_ed25519")]
    assert resolve("unrelated", config=load_user_config(user_config)).user == "someone"


def silent_listener() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    return srv, srv.getsockname()[1]


def test_timeout_ends_the_command_and_releases_the_lock(store: tuple[str, dict[str, str]], node: LimitedSSHServer,
                                                        tmp_path: Path) -> None:
    url, env = store
    # A read-only command stuck in a remote command: ended at the deadline, in one line.
    started = time.monotonic()
    # (node run's own --timeout is per node: the whole command's goes before the command)
    slow = dcx(tmp_path / "r", env, "--timeout", "2", "--state", url, "node", "run", NAME, "--timeout", "60", "--",
               "sleep", "30")
    took = time.monotonic() - started
    assert slow.returncode == EXIT_TIMEOUT and took < 15, (slow.returncode, took, slow.stderr)
    assert slow.stderr.splitlines()[-1] == ("error: timed out after 2 s (--timeout): stopped; the next run resumes "
                                            "from the state saved")

    # A locked command waiting for a host that never answers: the lock object goes, the state stays.
    srv, port = silent_listener()
    spec = tmp_path / "slow.yaml"
    spec.write_text("apiVersion: dcx/v1\nkind: Cluster\nmetadata: {name: slow}\nspec:\n  pools:\n"
                    "    - {name: control, role: control, provider: ssh, ssh: {hosts: [{name: h1, "
                    f"address: 127.0.0.1, port: {port}}}]}}}}\n")
    try:
        started = time.monotonic()
        create = dcx(tmp_path / "r", env, "--timeout", "3", "--state", url, "cluster", "create", "-f", str(spec),
                     "--ssh-timeout", "300")
        took = time.monotonic() - started
        assert create.returncode == EXIT_TIMEOUT and took < 20, (create.returncode, took, create.stderr)
        assert "timed out after 3 s (--timeout)" in create.stderr and "Traceback" not in create.stderr
        objects = stored(url)
        assert "clusters/slow/lock.json" not in objects  # released, not left for `cluster unlock`
        assert json.loads(objects["clusters/slow/state.json"])["name"] == "slow"  # the write-ahead state
        srv.close()  # now refused at once: the next run gets past the lock
        after = dcx(tmp_path / "other", env, "--state", url, "cluster", "create", "-f", str(spec), "--ssh-timeout", "3")
        assert after.returncode not in (0, EXIT_LOCKED) and "locked" not in after.stderr
    finally:
        srv.close()


def test_bad_timeout_values_are_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "DCX_HOME": str(tmp_path), "DCX_TIMEOUT": "soon"}
    r = subprocess.run([sys.executable, "-m", "dcx", "cluster", "list"], env=env, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=60)
    assert r.returncode == 2 and r.stderr == "error: DCX_TIMEOUT: 'soon' is not a number of seconds\n"
