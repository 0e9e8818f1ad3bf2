"""A provider's write-ahead journal kept in memory, for driving a provider in-process (real SDK, real
fake or moto) without the engine's state file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dcx.providers.base import ProviderContext


class MemoryJournal:
    """`resources` as the engine's state would hold them, and `writes`: every journal write, in order."""

    def __init__(self) -> None:
        self.resources: dict[str, Any] = {}
        self.writes: list[tuple[str, Any]] = []

    def __call__(self, key: str, value: Any) -> None:
        self.writes.append((key, value))
        if value is None:
            self.resources.pop(key, None)
        else:
            self.resources[key] = value

    def context(self, cluster_name: str, cluster_id: str, workdir: Path, **fields: Any) -> ProviderContext:
        """A provider context that journals here; `fields` are ProviderContext's other fields."""
        fields.setdefault("ssh_public_key", "ssh-ed25519 AAAAtest dcx")
        fields.setdefault("ssh_private_key_path", workdir / "key")
        fields.setdefault("log", logging.getLogger("test"))
        return ProviderContext(cluster_name=cluster_name, cluster_id=cluster_id, workdir=workdir, journal=self,
                               resources=self.resources, **fields)
