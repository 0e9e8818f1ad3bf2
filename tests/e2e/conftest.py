from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.testbed.local import (
    Dcx,
    clusters_destroyed_after,
    missing_for_namespace_nodes,
    skip_without_namespace_nodes,
    sweep_interrupted_runs,
)


@pytest.fixture(scope="session", autouse=True)
def _swept_before_the_run(pytestconfig: pytest.Config) -> None:
    """A run killed before its teardowns leaves hosts and bridges that would break this one: remove them,
    and say so."""
    if missing_for_namespace_nodes():
        return
    removed = sweep_interrupted_runs()
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if removed and capture is not None:
        with capture.global_and_fixture_disabled():
            print("\nremoved what an interrupted earlier run left: " + ", ".join(removed))


@pytest.fixture
def dcx_cli(tmp_path: Path) -> Iterator[tuple[Dcx, list[str]]]:
    """A dcx CLI with its own home, and a list the test appends its cluster names to: whatever the
    test leaves (it failed, dcx was killed), the teardown destroys and then sweeps by name and id."""
    skip_without_namespace_nodes()
    cli = Dcx(tmp_path / "dcx-home")
    with clusters_destroyed_after(cli) as clusters:
        yield cli, clusters
