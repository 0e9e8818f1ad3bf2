"""The az:// store against Azurite (npm; scripts/setup puts it in .tools/azurite), driven by
azure-storage-blob. Azurite 3.37 was seen to enforce every conditional header the lock uses: Put Blob
with If-None-Match: * over an existing blob (409), with a stale If-Match (412), If-Match on no blob
(404), Delete Blob with a stale If-Match (412); the first test checks each against Azurite itself."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcx.errors import EXIT_LOCKED, InputError, LockHeld
from dcx.state import ClusterState, StateStore
from dcx.stores import parse_url
from tests.testbed.stores import AZ_ACCOUNT as ACCOUNT
from tests.testbed.stores import az_store
from tests.testbed.stores import azurite as start_azurite

pytest.importorskip("azure.storage.blob", reason="azure-storage-blob is not installed (pip install azure-storage-blob)")


@pytest.fixture(scope="module")
def azurite() -> Iterator[str]:
    with start_azurite() as connection_string:
        yield connection_string


@pytest.fixture
def az(azurite: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("DCX_STATE", raising=False)
    url, env = az_store(azurite)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return url


def backend(url: str):  # -> AzureBlobBackend
    from dcx.stores.azure_blob import AzureBlobBackend

    return AzureBlobBackend(parse_url(url))


def test_azurite_enforces_the_conditional_headers_the_lock_relies_on(az: str) -> None:
    b = backend(az)
    first = b.create("k", b"1")
    assert first and b.create("k", b"2") is None  # If-None-Match: * over a blob
    assert b.replace("k", b"3", '"0x8DEADBEEFCAFE00"') is None  # stale If-Match
    assert b.replace("missing", b"x", first) is None  # If-Match on no blob
    assert not b.delete_if("k", '"0x8DEADBEEFCAFE00"')
    assert b.get("k") == (b"1", first)
    second = b.replace("k", b"4", first)
    assert second and second != first and b.get("k") == (b"4", second)
    assert b.delete_if("k", second) and b.get("k") is None


def test_lock_and_sealed_state_round_trip(az: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dcx.stores.lock import RemoteLock

    monkeypatch.setenv("DCX_HOME", str(tmp_path / "a"))
    cdir = StateStore(url=az).cluster("demo")
    with cdir.lock("cluster create"):
        cdir.save(ClusterState(name="demo", id="c0ffee00"))
        private = cdir.ensure_ssh_key()[0].read_bytes()
        with pytest.raises(LockHeld) as exc:
            RemoteLock(backend(az), "clusters/demo/lock.json", "demo", "x").acquire(timeout=0)
        assert exc.value.exit_code == EXIT_LOCKED and f"PID {os.getpid()}" in exc.value.message
    b = backend(az)
    stored = {k: b.get(k)[0] for k in b.list("clusters/")}  # type: ignore[index]
    assert sorted(stored) == ["clusters/demo/ssh/id_ed25519", "clusters/demo/ssh/id_ed25519.pub",
                              "clusters/demo/state.json"]
    assert not any(b"PRIVATE KEY" in v or private[40:80] in v for v in stored.values())
    monkeypatch.setenv("DCX_HOME", str(tmp_path / "b"))
    other = StateStore(url=az).cluster("demo")
    assert other.load().id == "c0ffee00" and other.private_key.read_bytes() == private


def test_a_missing_container_and_a_wrong_account_are_one_line(az: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCX_HOME", str(tmp_path))
    with pytest.raises(InputError, match="container 'nope' does not exist"):
        StateStore(url=f"az://{ACCOUNT}/nope/p").names()
    with pytest.raises(InputError, match="is for account 'devstoreaccount1', not 'other'"):
        backend("az://other/c/p")
