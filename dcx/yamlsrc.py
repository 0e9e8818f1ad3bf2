"""YAML loading that remembers where each value came from, so errors can name file and line.

Every user-written YAML file (cluster specs, inventories) goes through `load_yaml`, which returns
plain Python data plus a `Locator` that maps a field path such as ("spec", "pools", 1, "count") to
the 1-based line it was written on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from dcx.errors import SpecError, read_problem

PathItem = str | int
# Specs and inventories are hand-written: a megabyte is far beyond any real one, and the limits keep
# a hostile file (an alias bomb, /dev/zero, 50 MB) from taking minutes or all memory.
MAX_BYTES = 1024 * 1024
MAX_VALUES = 200_000  # values after aliases are expanded


class Locator:
    """Finds the line of a field path inside a ruamel round-trip document."""

    def __init__(self, file: str, root: Any) -> None:
        self.file = file
        self._root = root

    def line(self, path: Sequence[PathItem]) -> int | None:
        node = self._root
        best: int | None = 1
        for item in path:
            if isinstance(node, CommentedMap) and item in node:
                best = node.lc.key(item)[0] + 1
                node = node[item]
            elif isinstance(node, CommentedSeq) and isinstance(item, int) and 0 <= item < len(node):
                best = node.lc.item(item)[0] + 1
                node = node[item]
            else:
                break
        return best

    def error(self, path: Sequence[PathItem], problem: str, hint: str | None = None) -> SpecError:
        return SpecError(self.file, self.line(path), format_path(path), problem, hint)


def format_path(path: Sequence[PathItem]) -> str:
    out = ""
    for item in path:
        if isinstance(item, int):
            out += f"[{item}]"
        else:
            out += f".{item}" if out else str(item)
    return out


class _TooBig(Exception):
    pass


def _plain(node: Any, budget: list[int]) -> Any:
    """Plain dicts and lists. Aliases are expanded here, so the number of values made is counted."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooBig
    if isinstance(node, dict):
        return {str(k) if not isinstance(k, str) else k: _plain(v, budget) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v, budget) for v in node]
    return node


def load_yaml_text(text: str, file: str) -> tuple[Any, Locator]:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        doc = yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = (exc.problem or exc.context or "invalid YAML").strip()
        raise SpecError(file, line, "", f"invalid YAML: {problem}") from None
    except RecursionError:
        raise SpecError(file, None, "", "invalid YAML: nested too deeply") from None
    except Exception as exc:  # ruamel raises a few non-marked errors (e.g. duplicate keys)
        raise SpecError(file, None, "", f"invalid YAML: {exc}".splitlines()[0]) from None
    try:
        return _plain(doc, [MAX_VALUES]), Locator(file, doc)
    except _TooBig:
        raise SpecError(file, None, "", f"more than {MAX_VALUES} values once aliases are expanded "
                                        "(an alias bomb?)") from None
    except RecursionError:
        raise SpecError(file, None, "", "nested too deeply (an alias that contains itself?)") from None


def read_text_file(path: str | Path, what: str = "file") -> str:
    """A small UTF-8 text file, or a one-line SpecError saying why not (never a Python class name):
    devices, FIFOs and directories are refused without reading, and at most MAX_BYTES are read."""
    import os
    import stat

    name = str(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SpecError(name, None, "", f"{what} not found") from None
    except OSError as exc:
        raise SpecError(name, None, "", read_problem(exc)) from None
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise SpecError(name, None, "", "is a directory, not a file")
        if not stat.S_ISREG(mode):
            raise SpecError(name, None, "", "is not a regular file (a device, pipe or socket)")
        try:
            data = fh.read(MAX_BYTES + 1)
        except OSError as exc:
            raise SpecError(name, None, "", read_problem(exc)) from None
    if len(data) > MAX_BYTES:
        raise SpecError(name, None, "", f"is larger than {MAX_BYTES // 1024 // 1024} MiB "
                                        "(specs and inventories are far smaller)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(name, None, "", read_problem(exc)) from None


def load_yaml(path: str | Path) -> tuple[Any, Locator]:
    return load_yaml_text(read_text_file(path), str(path))
