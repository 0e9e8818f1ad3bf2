"""Test servers for the proxy test: Debian's `docker-registry` (the real distribution registry, v2.8) and
`tinyproxy` (a real HTTP/CONNECT proxy), each started inside a namespace host with a config written here,
and an image pushed to the registry through its documented HTTP API (no docker client needed here).

Push, per the Distribution API (https://distribution.github.io/distribution/spec/api/): each blob by a
monolithic upload (`POST /v2/NAME/blobs/uploads/`, then `PUT <Location>&digest=sha256:...` with the bytes),
then `PUT /v2/NAME/manifests/TAG` with an image manifest v2 schema 2
(https://distribution.github.io/distribution/spec/manifest-v2-2/): the config blob (rootfs diff_ids) and
one gzip layer.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import ssl
import subprocess
import urllib.request
from pathlib import Path

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_V1 = "application/vnd.docker.container.image.v1+json"
LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def registry_tls(workdir: Path, ip: str) -> tuple[Path, Path]:
    """(certificate, key): self-signed for the registry's IP address, valid a day. Registries are HTTPS in
    life, and through a proxy HTTPS is a CONNECT tunnel the proxy cannot rewrite (tinyproxy keeps only one
    of the several Accept headers Docker sends on a plain-HTTP request, and the registry then answers a
    schema1 manifest)."""
    cert, key = workdir / "registry.crt", workdir / "registry.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=dcx-test-registry", "-addext", f"subjectAltName=IP:{ip}",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def registry_config(workdir: Path, addr: str, cert: Path, key: Path) -> Path:
    """A registry on ADDR (host:port) over TLS, storing under workdir, no auth (Debian's default config has
    htpasswd)."""
    (workdir / "registry-data").mkdir(parents=True, exist_ok=True)
    path = workdir / "registry.yml"
    path.write_text("version: 0.1\nlog: {level: info}\n"
                    f"storage: {{filesystem: {{rootdirectory: {workdir / 'registry-data'}}}}}\n"
                    f"http: {{addr: '{addr}', tls: {{certificate: '{cert}', key: '{key}'}}}}\n")
    return path


def tinyproxy_config(workdir: Path, name: str, listen: str, port: int, allow: str,
                     basic_auth: tuple[str, str] | None = None) -> tuple[Path, Path]:
    """(config, log file): a proxy on listen:port for clients in `allow` (with basic_auth: only those that
    send that user and password), logging every request (Info: `Request (file descriptor N): CONNECT
    host:port HTTP/1.1`, `... GET http://...`)."""
    log = workdir / f"{name}.log"
    log.touch()
    path = workdir / f"{name}.conf"
    auth = f"BasicAuth {basic_auth[0]} {basic_auth[1]}\n" if basic_auth else ""
    path.write_text(f"Port {port}\nListen {listen}\nTimeout 60\nAllow {allow}\nLogFile \"{log}\"\nLogLevel Info\n"
                    f"PidFile \"{workdir / name}.pid\"\nMaxClients 50\n{auth}")
    return path, log


def start_in(netns: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A server in a namespace host's network (Lab.close() kills every process of the namespace)."""
    with open(log, "ab") as out:
        return subprocess.Popen(["ip", "netns", "exec", netns, *argv], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def opener(ca: Path) -> urllib.request.OpenerDirector:
    """Straight to the registry (the operator's own path, no proxy), trusting the test's certificate."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                       urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca)))


def _request(ca: Path, method: str, url: str, data: bytes = b"", content_type: str = "application/octet-stream",
             ) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": content_type})
    with opener(ca).open(req, timeout=30) as resp:
        return resp.status, dict(resp.headers)


def push_rootfs(registry: str, ca: Path, name: str, tag: str, rootfs_tar: bytes) -> str:
    """Push a one-layer image made of a root filesystem tarball; returns the manifest's digest."""
    layer = gzip.compress(rootfs_tar, mtime=0)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": [_digest(rootfs_tar)]}}).encode()
    base = f"https://{registry}/v2/{name}"
    for blob in (layer, config):
        status, headers = _request(ca, "POST", f"{base}/blobs/uploads/")
        assert status == 202, status
        location = headers["Location"]
        location = location if location.startswith("http") else f"https://{registry}{location}"
        sep = "&" if "?" in location else "?"
        status, _ = _request(ca, "PUT", f"{location}{sep}digest={_digest(blob)}", blob)
        assert status == 201, status
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_V2,
        "config": {"mediaType": CONFIG_V1, "size": len(config), "digest": _digest(config)},
        "layers": [{"mediaType": LAYER_GZIP, "size": len(layer), "digest": _digest(layer)}]}).encode()
    status, _ = _request(ca, "PUT", f"{base}/manifests/{tag}", manifest, MANIFEST_V2)
    assert status == 201, status
    return _digest(manifest)
