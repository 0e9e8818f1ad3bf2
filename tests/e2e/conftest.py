from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.testbed.local import Dcx, clusters_destroyed_after, skip_without_namespace_nodes


@pytest.fixture
def dcx_cli(tmp_path: Path) -> Iterator[tuple[Dcx, list[str]]]:
    """A dcx CLI with its own home, and a list the test appends its cluster names to: whatever the
    test leaves (it failed, dcx was killed), the teardown destroys and then sweeps by name and id."""
    skip_without_namespace_nodes()
    cli = Dcx(tmp_path / "dcx-home")
    with clusters_destroyed_after(cli) as clusters:
        yield cli, clusters
