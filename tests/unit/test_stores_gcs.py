"""The gs:// store against gcp-storage-emulator (PyPI), behind tests/fakes/gcs_strict.py: the emulator
ignores generation preconditions (checked below, so the day it enforces them this says so), the strict
layer enforces them as Cloud Storage documents."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcx.errors import EXIT_LOCKED, LockHeld
from dcx.state import ClusterState, StateStore
from dcx.stores import parse_url
from tests.testbed.stores import GCS_BUCKET as BUCKET
from tests.testbed.stores import gcs_emulator, gcs_store

pytest.importorskip("google.cloud.storage", reason="google-cloud-storage is not installed (pip install "
                    "google-cloud-storage)")
pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is not installed")


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    with gcs_emulator() as address:
        yield address


@pytest.fixture
def gcs(emulator: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.delenv("DCX_STATE", raising=False)
    with gcs_store(emulator) as (url, env):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        yield url


def backend(url: str):  # -> GCSBackend
    from dcx.stores.gcs import GCSBackend

    return GCSBackend(parse_url(url))


def test_the_emulator_alone_ignores_generation_preconditions(emulator: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://{emulator}")
    b = backend(f"gs://{BUCKET}/raw-{os.urandom(3).hex()}")
    first = b.create("k", b"1")
    assert first is not None
    assert b.create("k", b"2") is not None  # GCS answers 412 here; the emulator overwrites


def test_generation_preconditions_through_the_strict_layer(gcs: str) -> None:
    b = backend(gcs)
    first = b.create("k", b"1")
    assert first and b.create("k", b"2") is None  # ifGenerationMatch=0 over a live object: 412
    assert b.replace("k", b"3", str(int(first) + 1)) is None  # another generation: 412
    assert not b.delete_if("k", str(int(first) + 1))
    assert b.get("k") == (b"1", first)
    second = b.replace("k", b"4", first)
    assert second and second != first and b.get("k") == (b"4", second)
    assert b.delete_if("k", second) and b.get("k") is None
    assert b.replace("k", b"5", second) is None  # gone: no generation matches


def test_lock_and_sealed_state_round_trip(gcs: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dcx.stores.lock import RemoteLock

    monkeypatch.setenv("DCX_HOME", str(tmp_path / "a"))
    cdir = StateStore(url=gcs).cluster("demo")
    with cdir.lock("cluster create"):
        cdir.save(ClusterState(name="demo", id="c0ffee00"))
        private = cdir.ensure_ssh_key()[0].read_bytes()
        with pytest.raises(LockHeld) as exc:
            RemoteLock(backend(gcs), "clusters/demo/lock.json", "demo", "x").acquire(timeout=0)
        assert exc.value.exit_code == EXIT_LOCKED and f"PID {os.getpid()}" in exc.value.message
    b = backend(gcs)
    stored = {k: b.get(k)[0] for k in b.list("clusters/")}  # type: ignore[index]
    assert sorted(stored) == ["clusters/demo/ssh/id_ed25519", "clusters/demo/ssh/id_ed25519.pub",
                              "clusters/demo/state.json"]
    assert not any(b"PRIVATE KEY" in v or private[40:80] in v for v in stored.values())
    monkeypatch.setenv("DCX_HOME", str(tmp_path / "b"))
    other = StateStore(url=gcs).cluster("demo")
    assert other.load().id == "c0ffee00" and other.private_key.read_bytes() == private


def test_missing_sdk_is_one_line_naming_the_install() -> None:
    code = ("import sys; sys.modules['google.cloud.storage'] = None\n"
            "from dcx.errors import InputError\nfrom dcx.stores import backend_for, parse_url\n"
            "try:\n    backend_for(parse_url('gs://b/p'))\nexcept InputError as e:\n    print(e.exit_code, e.message)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == "2 gs:// state stores need google-cloud-storage: pip install google-cloud-storage"
