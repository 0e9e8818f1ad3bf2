"""State: atomic writes, the per-cluster lock, file modes, keys, schema versions."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import paramiko
import pytest

from dcx.errors import DcxError, LockHeld
from dcx.state import ClusterState, StateStore, atomic_write


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_save_and_load_round_trip_with_private_modes(tmp_path: Path) -> None:
    cdir = StateStore(tmp_path).cluster("demo")
    st = ClusterState(name="demo", id="abcd1234")
    st.nodes["demo-control-1"] = {"name": "demo-control-1", "pool": "control", "provider": "local",
                                  "role": "control", "ssh_address": "10.0.0.2"}
    cdir.save(st)
    assert cdir.load().nodes == st.nodes
    assert mode(cdir.state_file) == 0o600
    assert mode(cdir.path) == 0o700
    assert json.loads(cdir.state_file.read_text())["schema_version"] == 1


def test_atomic_write_never_exposes_a_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, json.dumps({"n": 0}))
    big = json.dumps({"n": 1, "pad": "x" * 2_000_000})
    seen: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.append(target.read_text()[:10])
            json.loads(target.read_text())  # raises if a reader ever sees half a file

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(20):
            atomic_write(target, big)
            atomic_write(target, json.dumps({"n": 0}))
    finally:
        stop.set()
        t.join()
    assert seen
    assert not list(tmp_path.glob(".state.json.*"))  # no temp files left behind


def test_a_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, "old")

    with pytest.raises(TypeError):
        atomic_write(target, 12345)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert not list(tmp_path.glob(".state.json.*"))


def test_second_holder_fails_at_once_naming_the_pid(tmp_path: Path) -> None:
    cdir = StateStore(tmp_path).cluster("demo")
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from dcx.state import StateStore
        with StateStore(Path({str(tmp_path)!r})).cluster("demo").lock("create"):
            print("locked", flush=True)
            sys.stdin.readline()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockHeld) as info:
            with cdir.lock("destroy"):
                pass
        assert f"PID {proc.pid}" in info.value.message
        assert "(create)" in info.value.message
        assert info.value.exit_code == 3
    finally:
        proc.kill()
        proc.wait()
    # The holder died without cleaning up: its flock died with it, so the cluster is not locked forever.
    with cdir.lock("destroy"):
        pass


def test_ssh_key_is_made_once_private_and_loadable(tmp_path: Path) -> None:
    cdir = StateStore(tmp_path).cluster("demo")
    path, public = cdir.ensure_ssh_key()
    assert mode(path) == 0o600
    assert public.startswith("ssh-ed25519 ")
    key = paramiko.Ed25519Key.from_private_key_file(str(path))
    assert public.split()[1] == key.get_base64()
    again, public2 = cdir.ensure_ssh_key()
    assert (again, public2) == (path, public)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    cdir = StateStore(tmp_path).cluster("demo")
    cdir.save(ClusterState(name="demo", id="x"))
    data = json.loads(cdir.state_file.read_text())
    data["schema_version"] = 99
    cdir.state_file.write_text(json.dumps(data))
    with pytest.raises(DcxError, match="newer than this dcx understands"):
        cdir.load()


def test_unknown_cluster_is_bad_input_saying_where_to_look(tmp_path: Path) -> None:
    with pytest.raises(DcxError) as info:
        StateStore(tmp_path).cluster("nope").load()
    assert info.value.message == f"no cluster named 'nope' in {tmp_path / 'clusters'} (see `dcx cluster list`)"
    assert info.value.exit_code == 2
    assert not (tmp_path / "clusters").exists()


def test_dcx_home_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCX_HOME", str(tmp_path))
    assert StateStore().root == tmp_path
    assert os.environ["DCX_HOME"] == str(tmp_path)


def test_a_session_writes_the_state_only_when_it_changed(tmp_path: Path) -> None:
    """A re-run records every node and resource again: unchanged records cost no write (each one is two
    fsyncs, or an upload to a bucket store), a changed one (also a value changed in place) is written."""
    from dcx.lifecycle.session import Session, null_reporter

    session = Session(StateStore(tmp_path), "c1", "create", null_reporter())
    session.load_or_new(None)
    session.journal("local/node/a", {"address": "10.0.0.2"})
    path = session.cdir.state_file
    first = path.stat().st_ino  # atomic_write renames a new file into place: a new inode per write
    session.journal("local/node/a", {"address": "10.0.0.2"})
    session.save()
    assert path.stat().st_ino == first
    recorded = session.state.resources["local/node/a"]
    recorded["sshd_pid"] = 7  # changed in place, then recorded again (as providers do)
    session.journal("local/node/a", recorded)
    assert path.stat().st_ino != first
    assert json.loads(path.read_text())["resources"]["local/node/a"] == {"address": "10.0.0.2", "sshd_pid": 7}
