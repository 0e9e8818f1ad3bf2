"""Providers are found through the `dcx.providers` entry-point group and imported only when a pool
uses them (importing a cloud provider must not slow down commands that do not need it)."""

from __future__ import annotations

import functools
from importlib.metadata import EntryPoint, entry_points

from dcx.errors import InputError
from dcx.providers.base import Provider

GROUP = "dcx.providers"


@functools.cache  # reading every installed distribution's metadata takes ~8 ms; a command asks often
def available() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def provider_class(name: str) -> type[Provider]:
    eps = available()
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none"
        raise InputError(f"unknown provider '{name}' (installed: {known})",
                         hint="`dcx providers list` shows the installed providers")
    cls = eps[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Provider)):
        raise InputError(f"entry point {eps[name].value} for provider '{name}' is not a dcx Provider")
    return cls
