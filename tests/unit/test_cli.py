"""The CLI as a user meets it: fast help without cloud SDKs, one-line errors with exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dcx.cli.main import hoist_global_options

CLOUD_SDKS = ("boto3", "botocore", "google.cloud", "googleapiclient", "azure", "kubernetes")


def dcx(*args: str, env: dict[str, str] | None = None, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, **(env or {})}
    if home is not None:
        e["DCX_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "dcx", *args], capture_output=True, text=True, env=e,
                          stdin=subprocess.DEVNULL, timeout=60)


def test_help_imports_no_cloud_sdk() -> None:
    code = ("import sys; sys.argv=['dcx','--help']\n"
            "from dcx.cli.main import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('MODULES', ' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    modules = out.split("MODULES", 1)[1].split()
    leaked = [m for m in modules if m.startswith(CLOUD_SDKS)]
    assert "cluster" in out and leaked == []
    assert "paramiko" not in modules  # SSH is only loaded by commands that connect


def test_bad_spec_is_one_line_and_exit_2(tmp_path: Path) -> None:
    spec = tmp_path / "cluster.yaml"
    spec.write_text("apiVersion: dcx/v1\nkind: Cluster\nmetadata: {name: demo}\nspec:\n  pools:\n"
                    "    - {name: c, role: control, count: 0, provider: local}\n")
    r = dcx("cluster", "create", "-f", str(spec), home=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {spec}:6: spec.pools[0].count: must be >= 1"
    assert "Traceback" not in r.stderr + r.stdout


def test_unknown_cluster_is_bad_input_exit_2_in_one_line(tmp_path: Path) -> None:
    r = dcx("cluster", "status", "ghost", "-o", "json", home=tmp_path)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"error: no cluster named 'ghost' in {tmp_path / 'clusters'} "
                                     "(see `dcx cluster list`)"]
    assert r.stdout == ""


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert dcx("cluster", "create", home=tmp_path).returncode == 2
    assert dcx("--output", "yaml", "version", home=tmp_path).returncode == 2


def test_json_output_and_global_options_anywhere(tmp_path: Path) -> None:
    r = dcx("version", "-o", "json", home=tmp_path)
    assert r.returncode == 0
    assert json.loads(r.stdout)["version"]
    r = dcx("cluster", "list", "--output=json", home=tmp_path)
    assert json.loads(r.stdout) == []


def test_providers_list_shows_entry_points(tmp_path: Path) -> None:
    r = dcx("providers", "list", "-o", "json", home=tmp_path)
    names = {p["name"] for p in json.loads(r.stdout)}
    assert "local" in names


def test_schema_is_json(tmp_path: Path) -> None:
    r = dcx("schema", home=tmp_path)
    assert json.loads(r.stdout)["title"] == "dcx Cluster"


def test_hoisting_keeps_remote_command_arguments() -> None:
    assert hoist_global_options(["cluster", "status", "demo", "-o", "json"]) == \
        ["-o", "json", "cluster", "status", "demo"]
    assert hoist_global_options(["node", "ssh", "c", "n", "--", "ls", "-q", "-o", "x"]) == \
        ["node", "ssh", "c", "n", "--", "ls", "-q", "-o", "x"]
    argv = ["-ojson", "-y", "cluster", "destroy", "x"]
    assert hoist_global_options(argv) == argv
