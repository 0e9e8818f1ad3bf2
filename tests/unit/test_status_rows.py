"""`dcx cluster status`: what a node says of itself overrules the engine's view, and the mesh cell says
which peers do not answer."""

from __future__ import annotations

import pytest

from dcx.bootstrap.engines import NodeHealth
from dcx.cli.cluster import mesh_cell
from dcx.lifecycle.health import merge_probe


@pytest.mark.parametrize(("probe", "ready", "state", "detail"), [
    ({"ssh": "ok", "runtime": "ok"}, True, "ready", ""),
    ({"ssh": "ok", "runtime": None}, True, "ready", ""),  # k3s: the engine brings its own runtime
    ({"ssh": "ok", "runtime": "down"}, False, "runtime down", "docker does not answer on its socket (engine: ready)"),
    ({"ssh": "cannot reach w1 over SSH at root@10.0.0.3:22: OSError: refused", "runtime": None}, False,
     "unreachable", "cannot reach w1 over SSH at root@10.0.0.3:22: OSError: refused (engine: ready)"),
])
def test_the_node_itself_overrules_the_engine(probe: dict, ready: bool, state: str, detail: str) -> None:
    health = merge_probe(NodeHealth("w1", True, state="ready"), probe)
    assert (health.ready, health.state, health.detail) == (ready, state, detail)
    assert health.extra["probe"] == probe


@pytest.mark.parametrize(("mesh", "cell"), [
    ({"address": "100.96.0.1", "link": "up", "peers_up": 2, "peers_expected": 2, "peers_down": []},
     "100.96.0.1 2/2 peers"),
    ({"address": "100.96.0.1", "link": "up", "peers_up": 1, "peers_expected": 3, "peers_down": ["b1", "b2"]},
     "100.96.0.1 1/3 peers, down: b1 b2"),
    ({"address": "100.96.0.2", "link": "down", "peers_up": 0, "peers_expected": 1, "peers_down": ["a1"]},
     "100.96.0.2 0/1 peers, dcx0 down, down: a1"),
    ({"address": "100.96.0.2", "link": "absent", "peers_up": 0, "peers_expected": 1, "peers_down": ["a1"]},
     "100.96.0.2 0/1 peers, dcx0 missing, down: a1"),
    ({"address": "100.96.0.2", "error": "not asked: unreachable over SSH"}, "unknown: not asked: unreachable over SSH"),
])
def test_the_mesh_cell_names_what_is_down(mesh: dict, cell: str) -> None:
    assert mesh_cell(mesh) == cell
