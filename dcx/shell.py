"""Building remote shell commands: every value that reaches a remote shell is quoted here."""

from __future__ import annotations

import shlex
from collections.abc import Iterable


def q(value: object) -> str:
    """Quote one value for a POSIX shell."""
    return shlex.quote(str(value))


def cmd(*argv: object) -> str:
    """A command line with every argument quoted: cmd("docker", "node", "update", "--label-add", kv, id)."""
    return " ".join(q(a) for a in argv)


def join(commands: Iterable[str]) -> str:
    """Run commands in order, stopping at the first failure."""
    return " && ".join(f"{{ {c}; }}" for c in commands)
