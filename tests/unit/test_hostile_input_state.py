"""Damaged local state, file modes, and the ~/.ssh/config Include's lifecycle, through the real CLI
where a user would meet them. No namespace nodes: the clusters here are ssh pools whose one host is
never contacted (destroy resets only recorded hosts, and none is recorded)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dcx import access
from dcx.errors import DcxError
from dcx.spec import load
from dcx.state import ClusterState, DamagedState, StateStore, ensure_private_dir

TIMEOUT = 20

SPEC = """apiVersion: dcx/v1
kind: Cluster
metadata: {{name: {name}}}
spec:
  pools:
    - {{name: control, role: control, provider: ssh, ssh: {{hosts: [{{name: h1, address: 127.0.0.1, port: 1}}]}}}}
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def dcx(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "DCX_HOME": str(tmp_path / "home"), "DCX_SSH_CONFIG": str(tmp_path / "ssh_config"),
         "NO_COLOR": "1", **env}
    e.pop("DCX_NO_SSH_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "dcx", *args], capture_output=True, text=True, env=e,
                          stdin=subprocess.DEVNULL, timeout=TIMEOUT, cwd=tmp_path)


def make_cluster(tmp_path: Path, name: str) -> Path:
    """A recorded cluster (state with its spec, and a key), as `create` leaves one; returns its spec file."""
    spec_file = tmp_path / f"{name}.yaml"
    spec_file.write_text(SPEC.format(name=name))
    cdir = StateStore(tmp_path / "home").cluster(name)
    state = ClusterState(name=name, id="0123abcd", status="ready", spec_file=str(spec_file),
                         spec=load(spec_file).model_dump(mode="json"))
    cdir.save(state)
    cdir.ensure_ssh_key()
    return spec_file


DAMAGE = {
    "json-list": ("[1, 2]\n", "state is a JSON list, not an object"),
    "wrong-field-type": (json.dumps({"name": "demo", "id": "x", "nodes": []}),
                         "state field 'nodes' has the wrong type"),
    "node-not-a-mapping": (json.dumps({"name": "demo", "id": "x", "nodes": {"n1": 5}}),
                           "state field 'nodes.n1' has the wrong type"),
    "no-id": (json.dumps({"name": "demo"}), "state has no 'id'"),
    "truncated-json": ('{"name": "demo", "id": ', "state file is not valid JSON (Expecting value at line 1)"),
    "random-bytes": (bytes(range(256)) * 4, "not UTF-8 text (byte 0x80 at offset 128)"),
    "directory": (None, "is a directory, not a file"),
}


def damage(tmp_path: Path, name: str, content: str | bytes | None) -> Path:
    state_file = tmp_path / "home" / "clusters" / name / "state.json"
    state_file.unlink()
    if content is None:
        state_file.mkdir()
    else:
        state_file.write_bytes(content if isinstance(content, bytes) else content.encode())
    return state_file


@pytest.mark.parametrize("shape", sorted(DAMAGE))
def test_damaged_state_is_one_line_saying_what_to_do_and_destroy_f_still_works(tmp_path: Path, shape: str) -> None:
    content, problem = DAMAGE[shape]
    spec_file = make_cluster(tmp_path, "demo")
    make_cluster(tmp_path, "fine")
    state_file = damage(tmp_path, "demo", content)
    cluster_dir = state_file.parent

    r = dcx(tmp_path, "cluster", "status", "demo")
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"error: {state_file}: {problem}; the cluster's state is damaged: remove the cluster with "
        f"`dcx cluster destroy -f SPEC` (it works from the spec alone), or move {cluster_dir} aside"]
    assert "internal error" not in r.stderr

    # list: the broken cluster is an error row, the other as usual
    r = dcx(tmp_path, "cluster", "list", "-o", "json")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert problem in rows["demo"]["error"] and "status" not in rows["demo"]
    assert rows["fine"]["status"] == "ready" and "error" not in rows["fine"]
    r = dcx(tmp_path, "cluster", "list")
    assert r.returncode == 0 and "fine" in r.stdout and problem in r.stdout

    # destroy by name says the same; destroy -f works from the spec alone
    r = dcx(tmp_path, "cluster", "destroy", "demo", "--yes")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "destroy -f SPEC" in r.stderr
    r = dcx(tmp_path, "cluster", "destroy", "-f", str(spec_file), "--yes")
    assert r.returncode == 0, r.stderr
    assert "the state was damaged" in r.stderr
    assert not cluster_dir.exists()
    assert StateStore(tmp_path / "home").names() == ["fine"]


def test_a_lost_public_key_is_derived_again_from_the_private_key(tmp_path: Path) -> None:
    make_cluster(tmp_path, "demo")
    cdir = StateStore(tmp_path / "home").cluster("demo")
    public = cdir.public_key_file.read_text()
    cdir.public_key_file.unlink()
    assert cdir.ensure_ssh_key()[1] == public.strip()
    assert cdir.public_key_file.read_text() == public and mode(cdir.public_key_file) == 0o600


def test_a_damaged_private_key_is_one_line_naming_it(tmp_path: Path) -> None:
    make_cluster(tmp_path, "demo")
    cdir = StateStore(tmp_path / "home").cluster("demo")
    cdir.public_key_file.unlink()
    cdir.private_key.write_bytes(b"\x00garbage")
    with pytest.raises(DamagedState) as info:
        cdir.ensure_ssh_key()
    assert info.value.message.startswith(f"{cdir.private_key}: not an unencrypted OpenSSH private key")
    assert "\n" not in info.value.message


def test_a_newer_schema_is_not_called_damage(tmp_path: Path) -> None:
    make_cluster(tmp_path, "demo")
    cdir = StateStore(tmp_path / "home").cluster("demo")
    data = json.loads(cdir.state_file.read_text())
    cdir.state_file.write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(DcxError) as info:
        cdir.load()
    assert "newer than this dcx understands" in info.value.message and info.value.hint == "upgrade dcx"
    assert cdir.damage() == ""
    assert cdir.set_aside_if_damaged() is None and cdir.state_file.exists()  # destroy -f does not discard it


# --- file modes -------------------------------------------------------------------------------------


def test_every_directory_dcx_makes_is_0700_and_every_file_0600(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    home = tmp_path / "a" / "home"  # made by dcx, with a missing parent
    spec_file = tmp_path / "demo.yaml"
    spec_file.write_text(SPEC.format(name="demo"))
    cdir = StateStore(home).cluster("demo")
    with cdir.lock("create"):
        cdir.save(ClusterState(name="demo", id="0123abcd"))
        cdir.ensure_ssh_key()
        cdir.provider_dir("local")
        assert mode(cdir.path / "lock") == 0o600
    for d in (tmp_path / "a", home, home / "clusters", cdir.path, cdir.ssh_dir, cdir.logs_dir,
              cdir.path / "providers", cdir.path / "providers" / "local"):
        assert mode(d) == 0o700, d
    for f in (cdir.state_file, cdir.private_key, cdir.public_key_file):
        assert mode(f) == 0o600, f
    assert mode(tmp_path) == 0o755  # a directory dcx did not make keeps its mode


def test_a_private_tree_is_made_private_from_its_root_down(tmp_path: Path) -> None:
    """As the local provider's registry uses it: /run/dcx/local with /run/dcx dcx's own, even when an
    earlier version made /run/dcx 0755; the directory above stays as it is."""
    run = tmp_path / "run"
    (run / "dcx").mkdir(parents=True)
    os.chmod(run, 0o755)
    os.chmod(run / "dcx", 0o755)
    ensure_private_dir(run / "dcx" / "local", run / "dcx")
    assert (mode(run), mode(run / "dcx"), mode(run / "dcx" / "local")) == (0o755, 0o700, 0o700)


def test_plan_of_a_new_cluster_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "demo.yaml").write_text(SPEC.format(name="demo"))
    r = dcx(tmp_path, "cluster", "plan", "-f", "demo.yaml")
    assert r.returncode == 0, r.stderr
    assert "h1" in r.stdout
    assert not (tmp_path / "home").exists()


def test_a_cluster_name_is_never_a_path(tmp_path: Path) -> None:
    outside = tmp_path / "x"
    for name in ("../../x", "../x", "..", "a/b", "a" * 300, "Demo", "-rf"):
        with pytest.raises(DcxError) as info:
            StateStore(tmp_path / "home").cluster(name)
        assert info.value.exit_code == 2 and "is not a cluster name" in info.value.message
    assert not outside.exists() and not (tmp_path / "home").exists()


# --- ~/.ssh/config's Include -----------------------------------------------------------------------------


def test_the_include_is_one_line_and_goes_with_the_last_cluster(tmp_path: Path) -> None:
    ssh_config = tmp_path / "ssh_config"
    original = "Host bastion\n  User ops\n"
    ssh_config.write_text(original)
    a = make_cluster(tmp_path, "a")
    make_cluster(tmp_path, "b")
    include = f"Include {tmp_path / 'home'}/clusters/*/ssh/config"
    env = {"DCX_HOME": str(tmp_path / "home"), "DCX_SSH_CONFIG": str(ssh_config)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert access.ensure_include() and access.ensure_include()  # twice: still one line
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert ssh_config.read_text() == f"{include}\n{original}"
    assert (tmp_path / "ssh_config.dcx-backup").read_text() == original

    r = dcx(tmp_path, "cluster", "destroy", "-f", str(a), "--yes")
    assert r.returncode == 0, r.stderr
    assert ssh_config.read_text() == f"{include}\n{original}"  # b still needs it
    r = dcx(tmp_path, "cluster", "destroy", "b", "--yes")
    assert r.returncode == 0, r.stderr
    assert ssh_config.read_text() == original  # the last one: the Include goes, nothing else changes
    assert mode(ssh_config) == 0o600


def test_the_two_line_include_of_earlier_versions_is_removed_too(tmp_path: Path) -> None:
    ssh_config = tmp_path / "ssh_config"
    home = tmp_path / "home"
    other = "Include /elsewhere/clusters/*/ssh/config\n"
    ssh_config.write_text(f"{access.INCLUDE_MARK}\n{access.include_line(home)}\n\n{other}Host x\n")
    b = make_cluster(tmp_path, "b")
    r = dcx(tmp_path, "cluster", "destroy", "-f", str(b), "--yes")
    assert r.returncode == 0, r.stderr
    assert ssh_config.read_text() == f"{other}Host x\n"  # another DCX_HOME's line stays


def test_no_include_for_a_dcx_home_others_can_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text("Host x\n")
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    os.chmod(home, 0o777)
    monkeypatch.setenv("DCX_HOME", str(home))
    monkeypatch.setenv("DCX_SSH_CONFIG", str(ssh_config))
    monkeypatch.delenv("DCX_NO_SSH_CONFIG", raising=False)
    warnings: list[str] = []
    assert access.ensure_include(warnings.append) is False
    assert ssh_config.read_text() == "Host x\n"
    assert len(warnings) == 1 and f"{home} is writable by other users" in warnings[0]
    assert "\n" not in warnings[0]
