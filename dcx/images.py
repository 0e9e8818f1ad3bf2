"""Put container images on every node without a registry (air-gapped clusters, and the demo).

`load`: a `docker save` tarball, streamed to each node's `docker load`. `import_rootfs`: a root
filesystem tarball, streamed to `docker import` under a tag. Both go over the cluster's SSH
connections, in parallel.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from dcx.shell import cmd

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
