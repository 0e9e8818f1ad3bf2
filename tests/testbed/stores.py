"""The three bucket services dcx's state stores speak, as real local emulators the tests start (and
always stop): moto's server (S3, and KMS on the same endpoint), gcp-storage-emulator behind the strict
layer that enforces generation preconditions (tests/fakes/gcs_strict.py), and Azurite. Each `*_store`
gives a fresh bucket's store URL and the environment a dcx process needs to reach it."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STATE_KEY = "a-state-key-for-tests-only-0123456789"
# Azurite's documented development account (Azurite README, "Default storage account").
AZ_ACCOUNT = "devstoreaccount1"
AZ_ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
GCS_BUCKET = "dcx-state"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's server on 127.0.0.1 (every AWS service it emulates, one endpoint): its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextlib.contextmanager
def gcs_emulator() -> Iterator[str]:
    """gcp-storage-emulator in memory, with bucket GCS_BUCKET: its "127.0.0.1:PORT"."""
    pytest.importorskip("google.cloud.storage", reason="google-cloud-storage is not installed "
                        "(pip install google-cloud-storage)")
    pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is not installed")
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=GCS_BUCKET)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()


def azurite_binary() -> str:
    for candidate in (os.environ.get("AZURITE_BLOB", ""), str(ROOT / ".tools/azurite/node_modules/.bin/azurite-blob"),
                      shutil.which("azurite-blob") or ""):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("Azurite not found: run scripts/setup (npm install azurite into .tools/azurite) or set AZURITE_BLOB")


@contextlib.contextmanager
def azurite() -> Iterator[str]:
    """Azurite's blob service in memory: the connection string of its development account."""
    pytest.importorskip("azure.storage.blob", reason="azure-storage-blob is not installed "
                        "(pip install azure-storage-blob)")
    binary = azurite_binary()
    port = free_port()
    proc = subprocess.Popen([binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                             "--silent", "--skipApiVersionCheck"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(300):  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"azurite exited: {proc.stderr.read().decode()[:500]}")  # type: ignore[union-attr]
                time.sleep(0.1)
        yield (f"DefaultEndpointsProtocol=http;AccountName={AZ_ACCOUNT};AccountKey={AZ_ACCOUNT_KEY};"
               f"BlobEndpoint=http://127.0.0.1:{port}/{AZ_ACCOUNT};")
    finally:
        proc.kill()  # in memory, nothing to keep; SIGTERM waits for idle keep-alive connections
        proc.wait()


def s3_store(endpoint: str) -> tuple[str, dict[str, str]]:
    import boto3

    env = {**AWS_ENV, "AWS_ENDPOINT_URL": endpoint, "DCX_STATE_KEY": STATE_KEY}
    bucket = f"dcx-state-{os.urandom(3).hex()}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/teams/infra", env


@contextlib.contextmanager
def gcs_store(emulator: str) -> Iterator[tuple[str, dict[str, str]]]:
    """A fresh prefix of GCS_BUCKET, reached through a strict layer (started here, stopped after)."""
    from tests.fakes.gcs_strict import StrictGcs

    strict = StrictGcs(emulator).start()
    try:
        yield (f"gs://{GCS_BUCKET}/t-{os.urandom(3).hex()}",
               {"STORAGE_EMULATOR_HOST": strict.url, "GOOGLE_CLOUD_PROJECT": "dcx", "DCX_STATE_KEY": STATE_KEY})
    finally:
        strict.close()


def az_store(connection_string: str) -> tuple[str, dict[str, str]]:
    from azure.storage.blob import BlobServiceClient

    container = f"dcx-{os.urandom(3).hex()}"
    BlobServiceClient.from_connection_string(connection_string).create_container(container)
    return f"az://{AZ_ACCOUNT}/{container}/team", {"AZURE_STORAGE_CONNECTION_STRING": connection_string,
                                                   "DCX_STATE_KEY": STATE_KEY}
