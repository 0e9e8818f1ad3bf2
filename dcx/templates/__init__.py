"""Templates (cloud-init user-data, unit files, configs) rendered with string.Template: `$name`
placeholders only, no logic, so what reaches a machine is visible in the file."""

from __future__ import annotations

from importlib.resources import files
from string import Template


def render(name: str, **values: object) -> str:
    text = files("dcx.templates").joinpath(name).read_text(encoding="utf-8")
    return Template(text).substitute({k: str(v) for k, v in values.items()})
