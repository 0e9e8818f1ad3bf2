"""Put container images on every node without a registry (air-gapped clusters, and the demo).

`load`: a `docker save` tarball, streamed to each node's `docker load`. `import_rootfs`: a root
filesystem tarball, streamed to `docker import` under a tag. Both go over the cluster's SSH
connections, in parallel.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcx.bootstrap.phases import Host, Phase, RunContext
from dcx.errors import OperationFailed
from dcx.shell import cmd, q

BUSYBOX = "/bin/busybox"
# Enough applets for a shell, networking checks and a tiny web server.
BUSYBOX_APPLETS = ["sh", "ls", "cat", "echo", "sleep", "hostname", "wget", "nc", "ping", "ip", "ifconfig", "httpd",
                   "mkdir", "env", "ps", "grep", "head", "tail", "true", "false", "nslookup", "uname", "date", "id"]


def busybox_rootfs(busybox: str = BUSYBOX) -> bytes:
    """A working root filesystem of about 1 MB: busybox-static plus symlinks for its applets."""
    if not Path(busybox).exists():
        raise FileNotFoundError(f"{busybox} not found (apt-get install busybox-static)")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "etc", "tmp", "var/www", "proc", "sys", "dev"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        data = Path(busybox).read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size = len(data)
        info.mode = 0o755
        tar.addfile(info, io.BytesIO(data))
        for applet in BUSYBOX_APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
        for name, text in (("etc/passwd", "root:x:0:0:root:/:/bin/sh\n"), ("etc/group", "root:x:0:\n")):
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def import_command(tag: str) -> str:
    return cmd("docker", "import", "--change", 'CMD ["/bin/sh"]', "-", tag)


def load_command() -> str:
    return "docker load -q"


def read_tarball(path: str | os.PathLike[str]) -> bytes:
    return Path(path).read_bytes()


# --- images that follow the cluster ----------------------------------------------------------------
# What `dcx image import|load` put on the nodes is recorded in the cluster's state (by the tarball's
# SHA-256: kind, refs, file) with the tarball kept in the cluster directory (images/, 0600). A node that
# joins later (scale-up, replacement, restore) gets them in a phase after its runtime starts and before
# the engine's join, so it has them before it takes work.

IMAGES_DIR = "images"


def save_refs(data: bytes) -> list[str]:
    """The images a `docker save` tarball holds: its manifest.json's RepoTags (Docker's layout, also written
    into OCI layouts by `docker save`), else the image IDs of untagged ones (the config blob's digest)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            member = tar.extractfile("manifest.json")
            manifest = json.loads(member.read()) if member is not None else []
    except (tarfile.TarError, KeyError, ValueError):
        return []
    refs: list[str] = []
    for entry in manifest if isinstance(manifest, list) else []:
        tags = entry.get("RepoTags") or []
        if tags:
            refs += [str(t) for t in tags]
        elif entry.get("Config"):
            refs.append("sha256:" + str(entry["Config"]).rsplit("/", 1)[-1].removesuffix(".json"))
    return refs


def add_image(cdir: Any, state: Any, kind: str, data: bytes, refs: list[str]) -> str:
    """Keep the tarball in the cluster directory and record it; an older record of the same refs goes (and
    its tarball, when no record uses it any more). Returns the tarball's SHA-256."""
    from dcx.state import atomic_write, ensure_private_dir, now_iso

    digest = hashlib.sha256(data).hexdigest()
    rel = f"{IMAGES_DIR}/{digest}.tar"
    ensure_private_dir(cdir.path / IMAGES_DIR, cdir.path)
    atomic_write(cdir.path / rel, data, 0o600)
    for other, rec in list(state.images.items()):
        if other != digest and set(rec.get("refs", [])) <= set(refs):
            del state.images[other]
            if not any(r.get("file") == rec.get("file") for r in state.images.values()):
                (cdir.path / str(rec.get("file"))).unlink(missing_ok=True)
    state.images[digest] = {"kind": kind, "refs": refs, "file": rel, "added": now_iso()}
    return digest


def record(name: str, kind: str, data: bytes, refs: list[str], store: Any = None) -> None:
    """Record images just put on a cluster's nodes (under the cluster's lock: it writes its state)."""
    from dcx.lifecycle.session import null_reporter, open_session
    from dcx.state import StateStore

    with open_session(store or StateStore(), name, f"image {kind}", null_reporter()) as session:
        session.state = session.cdir.load()
        add_image(session.cdir, session.state, kind, data, refs)
        session.save()


@dataclass
class RecordedImage:
    digest: str
    kind: str  # import (a rootfs tarball, `docker import` under refs[0]) | load (a `docker save` tarball)
    refs: list[str]
    path: Path

    def command(self) -> str:
        return import_command(self.refs[0]) if self.kind == "import" else load_command()


def recorded(cdir: Any, state: Any) -> list[RecordedImage]:
    out = []
    for digest, rec in sorted(state.images.items()):
        refs = [str(r) for r in rec.get("refs") or []]
        if refs and rec.get("kind") in ("import", "load"):
            out.append(RecordedImage(digest, rec["kind"], refs, cdir.path / str(rec.get("file"))))
    return out


def missing_command(refs: list[str]) -> str:
    """Print each ref the node's Docker does not have (`docker image inspect` fails for it)."""
    return "; ".join(f"docker image inspect {q(r)} >/dev/null 2>&1 || echo {q(r)}" for r in refs)


class LoadRecordedImages(Phase):
    title = "Load the cluster's images"
    pipelined = True  # a host needs only its own runtime started

    def __init__(self, images: list[RecordedImage]) -> None:
        self.images = images
        self._lock = threading.Lock()
        self._data: dict[str, bytes] = {}

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        refs = sorted({r for img in self.images for r in img.refs})
        out = host.run(missing_command(refs), timeout=120, check=True, what="docker image inspect").stdout.split()
        host.data["images_missing"] = [img for img in self.images if set(img.refs) & set(out)]
        return bool(host.data["images_missing"])

    def _tarball(self, img: RecordedImage) -> bytes:
        with self._lock:
            if img.digest not in self._data:
                try:
                    self._data[img.digest] = img.path.read_bytes()
                except OSError as exc:
                    raise OperationFailed(f"the cluster's image {', '.join(img.refs)} is recorded but its tarball "
                                          f"{img.path} cannot be read ({exc.strerror})",
                                          hint="put it back with `dcx image load|import` again") from None
            return self._data[img.digest]

    def run(self, ctx: RunContext, host: Host) -> None:
        for img in host.data.get("images_missing", []):
            host.run(img.command(), stdin=self._tarball(img), timeout=600, check=True,
                     what=f"loading {', '.join(img.refs)}")


def image_phases(cdir: Any, state: Any, uses_docker: bool) -> list[Phase]:
    """The phase that gives every node the cluster's recorded images (Docker engines only: k3s nodes have no
    `docker load`)."""
    images = recorded(cdir, state)
    return [LoadRecordedImages(images)] if images and uses_docker else []
