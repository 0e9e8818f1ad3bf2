"""State stores against a real S3 API: moto's server on 127.0.0.1 (ThreadedMotoServer), driven by boto3.

What moto 5.2 was seen to enforce (S3 User Guide, "conditional requests"): PutObject If-None-Match: *
on an existing key -> 412 PreconditionFailed; PutObject If-Match with another ETag -> 412; If-Match on a
missing key -> 404 NoSuchKey; DeleteObject If-Match with another ETag -> 412. The tests below check each
of these against the server itself, so a moto that stops enforcing one fails here rather than silently
weakening the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from dcx.errors import EXIT_BAD_INPUT, EXIT_LOCKED, InputError, LockHeld
from dcx.state import ClusterState, StateStore
from dcx.stores import Location, parse_url
from dcx.stores.lock import RemoteLock
from dcx.stores.s3 import S3Backend
from tests.testbed.stores import az_store, azurite, gcs_emulator, gcs_store, moto_server, s3_store

BUCKET = "dcx-state-test"
KEY = "a-state-key-for-tests-only-0123456789"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def gcs_address() -> Iterator[str]:
    with gcs_emulator() as address:
        yield address


@pytest.fixture(scope="module")
def azurite_connection() -> Iterator[str]:
    with azurite() as connection_string:
        yield connection_string


@pytest.fixture(params=["s3", "gs", "az"])
def any_store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, dict[str, str]]]:
    """A fresh store of each kind (its URL, and the environment a dcx process needs), also set in this
    process's environment for the tests' own reads."""
    monkeypatch.delenv("DCX_STATE", raising=False)
    with contextlib.ExitStack() as stack:
        if request.param == "s3":
            url, env = s3_store(request.getfixturevalue("s3_endpoint"))
        elif request.param == "gs":
            url, env = stack.enter_context(gcs_store(request.getfixturevalue("gcs_address")))
        else:
            url, env = az_store(request.getfixturevalue("azurite_connection"))
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        yield url, env


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """A fresh bucket; returns its store URL. The environment is what boto3 reads in any dcx process."""
    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "DCX_STATE_KEY": KEY}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("DCX_STATE", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client("s3")
    bucket = f"{BUCKET}-{os.urandom(3).hex()}"
    client.create_bucket(Bucket=bucket)
    yield f"s3://{bucket}/teams/infra"


def objects(url: str) -> dict[str, bytes]:
    loc = parse_url(url)
    client = boto3.client("s3")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=loc.bucket).get("Contents", [])]
    return {k: client.get_object(Bucket=loc.bucket, Key=k)["Body"].read() for k in keys}


def store_in(home: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> StateStore:
    monkeypatch.setenv("DCX_HOME", str(home))
    return StateStore(url=url)


def test_store_urls_parse_or_fail_in_one_line() -> None:
    assert parse_url("s3://b/p/q") == Location("s3", "b", "p/q")
    assert parse_url("az://acct/cont/p") == Location("az", "acct/cont", "p")
    assert parse_url("/tmp/x").path == "/tmp/x"
    for bad in ("ftp://x/y", "s3://", "az://acct", "s3://b/../p"):
        with pytest.raises(InputError) as exc:
            parse_url(bad)
        assert exc.value.exit_code == EXIT_BAD_INPUT and "\n" not in exc.value.message


def test_moto_enforces_the_conditional_writes_the_lock_relies_on(s3: str) -> None:
    b = S3Backend(parse_url(s3))
    first = b.create("k", b"1")
    assert first and b.create("k", b"2") is None  # If-None-Match: * on an existing key: 412
    assert b.replace("k", b"3", '"0123456789abcdef0123456789abcdef"') is None  # If-Match, another ETag: 412
    assert b.replace("missing", b"x", first) is None  # If-Match on no object: 404 NoSuchKey
    assert not b.delete_if("k", '"0123456789abcdef0123456789abcdef"')  # DeleteObject If-Match: 412
    assert b.get("k") == (b"1", first)
    second = b.replace("k", b"4", first)
    assert second and second != first and b.get("k") == (b"4", second)
    assert b.delete_if("k", second) and b.get("k") is None


def test_concurrent_creates_have_exactly_one_winner(s3: str) -> None:
    b = S3Backend(parse_url(s3))
    wins: list[str | None] = []
    barrier = threading.Barrier(12)

    def race(i: int) -> None:
        barrier.wait()
        wins.append(b.create("race", f"{i}".encode()))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len([w for w in wins if w]) == 1


def test_second_holder_fails_at_once_naming_the_first(s3: str) -> None:
    b = S3Backend(parse_url(s3))
    first = RemoteLock(b, "clusters/demo/lock.json", "demo", "cluster create")
    first.acquire(timeout=0)
    try:
        with pytest.raises(LockHeld) as exc:
            RemoteLock(b, "clusters/demo/lock.json", "demo", "cluster destroy").acquire(timeout=0)
        assert exc.value.exit_code == EXIT_LOCKED
        assert f"PID {os.getpid()}" in exc.value.message and "(cluster create)" in exc.value.message
        assert socket.gethostname() in exc.value.message and "stale" not in exc.value.message
    finally:
        first.release()
    after = RemoteLock(b, "clusters/demo/lock.json", "demo", "cluster destroy")
    after.acquire(timeout=0)  # released: free again
    after.release()


def test_waiter_gets_the_lock_when_the_holder_releases(s3: str) -> None:
    b = S3Backend(parse_url(s3))
    first = RemoteLock(b, "clusters/w/lock.json", "w", "cluster create")
    first.acquire(timeout=0)
    threading.Timer(0.5, first.release).start()
    second = RemoteLock(b, "clusters/w/lock.json", "w", "cluster create")
    second.acquire(timeout=30)
    assert json.loads(b.get("clusters/w/lock.json")[0])["pid"] == os.getpid()
    second.release()
    assert b.get("clusters/w/lock.json") is None


def test_renewal_keeps_a_lock_fresh_and_a_dead_holders_goes_stale(s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCX_STATE_LEASE", "2")  # renewed every 2/3 s; stale 2 s after the last renewal
    b = S3Backend(parse_url(s3))
    live = RemoteLock(b, "clusters/live/lock.json", "live", "cluster create")
    live.acquire(timeout=0)
    dead = RemoteLock(b, "clusters/dead/lock.json", "dead", "cluster create")
    dead.acquire(timeout=0)
    dead._stop.set()  # as if killed: nobody renews its lease any more
    dead._thread.join()  # type: ignore[union-attr]
    time.sleep(2.5)
    with pytest.raises(LockHeld) as exc:
        RemoteLock(b, "clusters/dead/lock.json", "dead", "x").acquire(timeout=0)
    assert "stale: not renewed since" in exc.value.message and "dcx cluster unlock dead" in (exc.value.hint or "")
    with pytest.raises(LockHeld) as exc:
        RemoteLock(b, "clusters/live/lock.json", "live", "x").acquire(timeout=0)
    assert "stale" not in exc.value.message  # renewed by its thread every lease/3
    live.release()


def test_state_keys_and_secrets_round_trip_sealed(s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = store_in(tmp_path / "a", s3, monkeypatch)
    cdir = a.cluster("demo")
    with cdir.lock("cluster create"):
        cdir.save(ClusterState(name="demo", id="c0ffee00"))
        key_path, _ = cdir.ensure_ssh_key()
        secret = cdir.secret_file("k3s-token")
        secret.write_text("K10-super-secret-token")
        cdir.known_hosts.write_text("10.0.0.1 ssh-ed25519 AAAA\n")
        in_lock = objects(s3)
        assert any(k.endswith("/clusters/demo/lock.json") for k in in_lock)
    private = key_path.read_bytes()
    stored = objects(s3)
    assert sorted(k.split("clusters/demo/")[1] for k in stored) == [
        "secrets/k3s-token", "ssh/id_ed25519", "ssh/id_ed25519.pub", "ssh/known_hosts", "state.json"]
    body = b"\n".join(stored.values())
    assert b"PRIVATE KEY" not in body and private[40:80] not in body and b"super-secret" not in body
    assert stat_mode(tmp_path / "a" / "cache") == 0o700

    b = store_in(tmp_path / "b", s3, monkeypatch)  # a fresh machine: the URL and the key
    other = b.cluster("demo")
    assert other.load().id == "c0ffee00" and b.names() == ["demo"]
    assert other.private_key.read_bytes() == private
    assert other.secret_file("k3s-token").read_text() == "K10-super-secret-token"
    assert other.known_hosts.read_text().startswith("10.0.0.1 ")


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_without_the_key_secrets_are_refused_in_one_line(s3: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cdir = store_in(tmp_path / "a", s3, monkeypatch).cluster("demo")
    with cdir.lock("cluster create"):
        cdir.save(ClusterState(name="demo", id="c0ffee00"))
        cdir.ensure_ssh_key()
    monkeypatch.delenv("DCX_STATE_KEY")
    keyless = store_in(tmp_path / "b", s3, monkeypatch).cluster("demo")
    assert keyless.load().id == "c0ffee00"  # state itself is not secret
    with pytest.raises(InputError) as exc:
        keyless.ensure_ssh_key()  # never a new key made in place of the sealed one
    assert exc.value.exit_code == EXIT_BAD_INPUT and "DCX_STATE_KEY" in exc.value.message
    assert "is sealed" in exc.value.message and "\n" not in exc.value.message
    cli = subprocess.run([sys.executable, "-m", "dcx", "cluster", "export", "demo", "-o", str(tmp_path / "x.tgz"),
                          "--state", s3], env={**os.environ, "DCX_HOME": str(tmp_path / "d")}, capture_output=True,
                         text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert cli.returncode == EXIT_BAD_INPUT and cli.stderr == (
        f"error: the cluster's SSH key is sealed in {s3}: set DCX_STATE_KEY or DCX_STATE_KMS_KEY (the key the "
        "cluster was made with)\n")
    assert not (tmp_path / "x.tgz").exists()
    monkeypatch.setenv("DCX_STATE_KEY", "another-key-entirely-0123456789")
    wrong = store_in(tmp_path / "c", s3, monkeypatch).cluster("demo")
    with pytest.raises(InputError) as exc:
        wrong.load()
    assert "DCX_STATE_KEY does not open it" in exc.value.message


def test_a_broken_lock_stops_the_holder_writing(s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dcx.errors import DcxError
    from dcx.stores.moving import break_lock, lock_holder

    store = store_in(tmp_path / "a", s3, monkeypatch)
    cdir = store.cluster("demo")
    with pytest.raises(DcxError) as exc, cdir.lock("cluster create"):
        cdir.save(ClusterState(name="demo", id="c0ffee00"))
        info, etag, line = lock_holder(store, "demo")  # type: ignore[misc]
        assert info["pid"] == os.getpid() and "(cluster create)" in line
        assert break_lock(store, "demo", etag)
        cdir.mirror.locks["demo"].renew()  # the holder's next renewal finds it gone
        cdir.save(ClusterState(name="demo", id="c0ffee00", status="ready"))
    assert "was broken" in exc.value.message
    assert b'"status": "new"' in objects(s3)[f"{parse_url(s3).prefix}/clusters/demo/state.json"]


def test_remove_deletes_every_object_of_the_cluster(s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_in(tmp_path / "a", s3, monkeypatch)
    for name in ("gone", "kept"):
        with store.cluster(name).lock("cluster create"):
            store.cluster(name).save(ClusterState(name=name, id="0"))
    store.cluster("gone").remove()
    assert {k.split("/")[3] for k in objects(s3)} == {"kept"}
    assert store.names() == ["kept"] and not store.cluster("gone").path.exists()


def test_export_import_and_migrate(s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dcx.stores.moving import export_cluster, import_cluster, migrate

    local = StateStore(tmp_path / "home")
    cdir = local.cluster("demo")
    with cdir.lock("cluster create"):
        cdir.save(ClusterState(name="demo", id="c0ffee00"))
        cdir.ensure_ssh_key()
    archive = tmp_path / "demo.tar.gz"
    assert export_cluster(local, "demo", archive) == 3
    assert stat_mode(archive) == 0o600
    other = StateStore(tmp_path / "other")
    assert import_cluster(other, archive) == "demo"
    assert other.cluster("demo").private_key.read_bytes() == cdir.private_key.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        import_cluster(other, archive)
    monkeypatch.setenv("DCX_HOME", str(tmp_path / "home"))
    assert migrate(local, StateStore(url=s3)) == [("demo", "copied")]
    assert migrate(local, StateStore(url=s3)) == [("demo", "skipped: already in the target store")]
    fresh = store_in(tmp_path / "fresh", s3, monkeypatch).cluster("demo")
    assert fresh.private_key.read_bytes() == cdir.private_key.read_bytes()


def test_import_refuses_archives_that_are_not_exports(tmp_path: Path) -> None:
    import io
    import tarfile

    from dcx.stores.moving import read_archive

    def archive(members: dict[str, bytes], name: str) -> Path:
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            for m, data in members.items():
                info = tarfile.TarInfo(m)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    state = ClusterState(name="demo", id="1").to_json().encode()
    for members, why in (({"demo/../../etc/x": b"x", "demo/state.json": state}, "not a file of a dcx export"),
                         ({"/abs": b"x"}, "not a file of a dcx export"),
                         ({"demo/ssh/id_ed25519": b"k"}, "state.json: missing"),
                         ({"a/state.json": state, "b/state.json": state}, "one cluster"),
                         ({"other/state.json": state}, "names cluster 'demo'")):
        with pytest.raises(InputError, match=why):
            read_archive(archive(members, f"{abs(hash(why))}.tar.gz"))
    (tmp_path / "junk.tar.gz").write_bytes(b"not gzip")
    with pytest.raises(InputError, match="not a readable tar.gz"):
        read_archive(tmp_path / "junk.tar.gz")


def silent_listener() -> tuple[socket.socket, int]:
    """A TCP port that accepts and never speaks: an SSH client waits there for a banner."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    return srv, srv.getsockname()[1]


def stored(url: str) -> dict[str, bytes]:
    """Every object of a store (any kind), by key relative to its prefix, read through dcx's backend."""
    from dcx.stores import backend_for

    b = backend_for(parse_url(url))
    return {k: got[0] for k in b.list("") if (got := b.get(k)) is not None}


def test_two_runners_one_store_lock_kill_and_unlock(any_store: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    """Two dcx processes with their own DCX_HOME ("two CI runners") against one store, of each kind: the
    lock is the service's own conditional write (S3 If-None-Match, GCS ifGenerationMatch=0 through the
    strict layer, Azure If-None-Match), taken by the first; the second exits 3 naming it; after the
    first is killed (SIGKILL: nothing released) `cluster unlock --yes` lets the second run."""
    url, store_env = any_store
    srv, port = silent_listener()
    spec = tmp_path / "cluster.yaml"
    spec.write_text("apiVersion: dcx/v1\nkind: Cluster\nmetadata: {name: shared}\nspec:\n  pools:\n"
                    f"    - {{name: control, role: control, provider: ssh, ssh: {{hosts: [{{name: h1, "
                    f"address: 127.0.0.1, port: {port}}}]}}}}\n")
    env = {**os.environ, **store_env, "DCX_NO_SSH_CONFIG": "1", "DCX_MACHINE_DIR": str(tmp_path / "machines")}
    run_a = {**env, "DCX_HOME": str(tmp_path / "runner-a")}
    run_b = {**env, "DCX_HOME": str(tmp_path / "runner-b")}
    base = [sys.executable, "-m", "dcx", "--state", url]
    holder = subprocess.Popen([*base, "cluster", "create", "-f", str(spec), "--ssh-timeout", "300"], env=run_a,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock_key = "clusters/shared/lock.json"
        for _ in range(300):  # until the holder has taken the lock (no timing asserted)
            if lock_key in stored(url) or holder.poll() is not None:
                break
            time.sleep(0.1)
        assert holder.poll() is None, "the first runner ended before taking the lock"
        second = subprocess.run([*base, "cluster", "create", "-f", str(spec)], env=run_b, capture_output=True,
                                text=True, stdin=subprocess.DEVNULL, timeout=60)
        assert second.returncode == EXIT_LOCKED
        assert f"PID {holder.pid}" in second.stderr and "(create)" in second.stderr
        assert len(second.stderr.strip().splitlines()) <= 2  # error + hint, no traceback

        holder.kill()  # SIGKILL: no chance to release
        holder.wait()
        again = subprocess.run([*base, "cluster", "create", "-f", str(spec)], env=run_b, capture_output=True,
                               text=True, stdin=subprocess.DEVNULL, timeout=60)
        assert again.returncode == EXIT_LOCKED  # the lease has not run out: still held, not stale yet
        unlock = subprocess.run([*base, "cluster", "unlock", "shared", "--yes"], env=run_b, capture_output=True,
                                text=True, stdin=subprocess.DEVNULL, timeout=60)
        assert unlock.returncode == 0, unlock.stderr
        assert f"PID {holder.pid}" in unlock.stdout + unlock.stderr
        srv.close()  # now the host refuses at once: the second runner gets past the lock to the SSH step
        third = subprocess.run([*base, "cluster", "create", "-f", str(spec), "--ssh-timeout", "5"], env=run_b,
                               capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
        assert third.returncode not in (EXIT_LOCKED, 0) and "locked" not in third.stderr
        assert lock_key not in stored(url)  # released at its end
        state = json.loads(stored(url)["clusters/shared/state.json"])
        assert state["name"] == "shared"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        srv.close()


def test_state_option_is_global_and_bad_urls_exit_2(tmp_path: Path) -> None:
    env = {**os.environ, "DCX_HOME": str(tmp_path)}
    bad = subprocess.run([sys.executable, "-m", "dcx", "cluster", "list", "--state", "ftp://x/y"], env=env,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert bad.returncode == EXIT_BAD_INPUT and "is not a store" in bad.stderr and "Traceback" not in bad.stderr
    listing = subprocess.run([sys.executable, "-m", "dcx", "cluster", "list", "--state", str(tmp_path / "dir"),
                              "-o", "json"], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             timeout=60)
    assert listing.returncode == 0 and json.loads(listing.stdout) == []


def test_destroy_removes_the_state_and_releases_the_lock_in_one_locked_sequence(
        s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The removal under the lock destroy holds: the cluster's objects are deleted, then the lock object
    (If-Match: its own), with no release and re-take of the lock in between for another run to slip into."""
    from dcx.lifecycle.destroy import destroy_cluster
    from dcx.lifecycle.session import Options
    from dcx.spec import load

    spec = tmp_path / "gone.yaml"  # an ssh pool whose machine was never taken in: nothing to reset
    spec.write_text("apiVersion: dcx/v1\nkind: Cluster\nmetadata: {name: gone}\nspec:\n  pools:\n"
                    "    - {name: control, role: control, provider: ssh, ssh: {hosts: [{name: h1, "
                    "address: 127.0.0.1}]}}\n")
    monkeypatch.setenv("DCX_NO_SSH_CONFIG", "1")
    store = store_in(tmp_path / "a", s3, monkeypatch)
    cdir = store.cluster("gone")
    with cdir.lock("cluster create"):
        cdir.save(ClusterState(name="gone", id="0", spec=load(spec).model_dump(mode="json")))
        cdir.ensure_ssh_key()
    calls: list[tuple[str, str]] = []
    backend = store.mirror.backend
    for op in ("create", "replace", "delete", "delete_if", "put"):
        def record(*args: object, _op: str = op, _real: object = getattr(backend, op)) -> object:
            calls.append((_op, str(args[0]).split("clusters/gone/")[-1]))
            return _real(*args)  # type: ignore[operator]
        monkeypatch.setattr(backend, op, record)
    destroy_cluster("gone", None, Options(), store)
    writes = [c for c in calls if c[0] != "replace"]  # (lease renewals of the held lock may come in between)
    assert writes[0] == ("create", "lock.json") and writes[-1] == ("delete_if", "lock.json")
    assert [c for c in writes if c[1] == "lock.json"] == [writes[0], writes[-1]]  # taken once, released once
    assert writes[-2][0] == "delete" and "state.json" in [c[1] for c in writes if c[0] == "delete"]
    assert objects(s3) == {} and not cdir.path.exists()


def kms_key(alias: str) -> str:
    """A symmetric key in moto's KMS (same endpoint as its S3), named by an alias."""
    kms = boto3.client("kms")
    key_id = kms.create_key(Description="dcx state store test")["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName=alias, TargetKeyId=key_id)
    return alias


def test_kms_envelope_encryption_of_secrets(s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DCX_STATE_KMS_KEY: each secret sealed under a fresh KMS data key (GenerateDataKey), opened by KMS
    Decrypt pinned to that key (moto's KMS server); no DCX_STATE_KEY needed or used."""
    monkeypatch.delenv("DCX_STATE_KEY")
    monkeypatch.setenv("DCX_STATE_KMS_KEY", kms_key(f"alias/dcx-{os.urandom(3).hex()}"))
    cdir = store_in(tmp_path / "a", s3, monkeypatch).cluster("demo")
    with cdir.lock("cluster create"):
        cdir.save(ClusterState(name="demo", id="c0ffee00"))
        private = cdir.ensure_ssh_key()[0].read_bytes()
        cdir.secret_file("k3s-token").write_text("K10-super-secret-token")
    stored = {k.split("clusters/demo/")[1]: v for k, v in objects(s3).items()}
    for rel in ("ssh/id_ed25519", "secrets/k3s-token"):
        assert stored[rel].startswith(b"dcx-sealed-kms-v1\n")
    body = b"\n".join(stored.values())
    assert b"PRIVATE KEY" not in body and private[40:80] not in body and b"super-secret" not in body

    fresh = store_in(tmp_path / "b", s3, monkeypatch).cluster("demo")  # another runner: the URL and the key id
    assert fresh.private_key.read_bytes() == private
    assert fresh.secret_file("k3s-token").read_text() == "K10-super-secret-token"

    monkeypatch.setenv("DCX_STATE_KMS_KEY", kms_key(f"alias/other-{os.urandom(3).hex()}"))
    with pytest.raises(InputError) as exc:
        store_in(tmp_path / "c", s3, monkeypatch).cluster("demo").load()
    assert "does not open it" in exc.value.message and "\n" not in exc.value.message
    monkeypatch.delenv("DCX_STATE_KMS_KEY")
    monkeypatch.setenv("DCX_STATE_KEY", KEY)  # a passphrase does not open a KMS-sealed object: it says so
    with pytest.raises(InputError, match="sealed with AWS KMS: set DCX_STATE_KMS_KEY"):
        store_in(tmp_path / "d", s3, monkeypatch).cluster("demo").load()
    monkeypatch.setenv("DCX_STATE_KMS_KEY", "alias/no-such-key")
    new = store_in(tmp_path / "e", s3, monkeypatch).cluster("new")
    with pytest.raises(InputError, match="DCX_STATE_KMS_KEY: no KMS key 'alias/no-such-key'"), new.lock("create"):
        new.save(ClusterState(name="new", id="0"))
        new.ensure_ssh_key()  # sealed on its way to the store: refused, never stored in clear
    assert not [k for k in objects(s3) if "/clusters/new/ssh/" in k]


def test_kms_is_aws_only_for_now(tmp_path: Path) -> None:
    env = {**os.environ, "DCX_HOME": str(tmp_path), "DCX_STATE_KMS_KEY": "alias/x"}
    for url in ("gs://b/p", "az://acct/cont/p"):
        r = subprocess.run([sys.executable, "-m", "dcx", "cluster", "list", "--state", url], env=env,
                           capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
        assert r.returncode == EXIT_BAD_INPUT and len(r.stderr.splitlines()) == 1, r.stderr
        assert "KMS envelope encryption is AWS KMS only, for s3:// stores" in r.stderr


def test_a_pull_that_fails_half_way_pushes_nothing(s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A working copy half refreshed holds files older than the store's: the failed run must not write
    them back over the newer ones (here: the wrong DCX_STATE_KEY stops the pull at the sealed key, before
    state.json is refreshed)."""
    a = store_in(tmp_path / "a", s3, monkeypatch).cluster("demo")
    with a.lock("cluster create"):
        a.save(ClusterState(name="demo", id="c0ffee00", status="new"))
        a.ensure_ssh_key()
    b = store_in(tmp_path / "b", s3, monkeypatch).cluster("demo")
    with b.lock("cluster create"):
        b.save(ClusterState(name="demo", id="c0ffee00", status="ready"))
    monkeypatch.setenv("DCX_STATE_KEY", "another-key-entirely-0123456789")
    a.mirror._sealer, a.mirror.digests = None, {}  # as a new process on runner a: its old working copy only
    with pytest.raises(InputError, match="does not open it"), a.lock("cluster create"):
        pass
    state = objects(s3)[f"{parse_url(s3).prefix}/clusters/demo/state.json"]
    assert json.loads(state)["status"] == "ready"
    assert f"{parse_url(s3).prefix}/clusters/demo/lock.json" not in objects(s3)
