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

from dcx.errors import SpecError

PathItem = str | int


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


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k) if not isinstance(k, str) else k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
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
    except Exception as exc:  # ruamel raises a few non-marked errors (e.g. duplicate keys)
        raise SpecError(file, None, "", f"invalid YAML: {exc}".splitlines()[0]) from None
    return _plain(doc), Locator(file, doc)


def load_yaml(path: str | Path) -> tuple[Any, Locator]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(str(path), None, "", "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(str(path), None, "", f"cannot read: {exc.__class__.__name__}") from None
    return load_yaml_text(text, str(path))
