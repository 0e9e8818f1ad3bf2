"""The CLI as a user meets it: fast help without cloud SDKs, one-line errors with exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_timeouts_that_are_not_seconds_are_one_line_exit_2(tmp_path: Path) -> None:
    """inf passed click's min=0 and crashed the timer thread (OverflowError, a traceback, the command ran on);
    a bad DCX_LOCK_TIMEOUT was an internal error at the first lock."""
    for args, env, expect in [
        (["--timeout", "inf"], {}, "dcx: invalid value for --timeout: 'inf' is not a number of seconds"),
        (["--timeout=nan"], {}, "invalid value for"),  # click >= 8.2.1 refuses nan itself; 8.2.0 leaves it to dcx
        ([], {"DCX_TIMEOUT": "inf"}, "DCX_TIMEOUT: 'inf' is not a number of seconds"),
        ([], {"DCX_LOCK_TIMEOUT": "soon"}, "DCX_LOCK_TIMEOUT: 'soon' is not a number of seconds"),
    ]:
        r = dcx(*args, "cluster", "list", env=env, home=tmp_path)
        assert r.returncode == 2, (args, env, r.stderr)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
        assert r.stdout == ""
    # Beyond what a timer can wait (~292 years) is no deadline at all, not a crash.
    r = dcx("--timeout", "1e12", "version", "-o", "json", home=tmp_path)
    assert r.returncode == 0 and r.stderr == "" and json.loads(r.stdout)["version"]


def test_an_eof_error_inside_a_command_is_an_internal_error_not_an_interrupt(tmp_path: Path) -> None:
    """typer turns any EOFError a command raises (a truncated gzip, a closed stream) into Abort, which was
    reported as `interrupted` with exit 130, as if the user had pressed Ctrl-C."""
    code = ("import gzip, sys\n"
            "from dcx.cli import cluster, main\n"
            "@cluster.app.command('truncated')\n"
            "def truncated() -> None:\n"
            "    gzip.decompress(gzip.compress(b'x' * 1000)[:20])\n"
            "sys.argv = ['dcx', 'cluster', 'truncated']\n"
            "main.main()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "TMPDIR": str(tmp_path)}, stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r.stderr
    assert "error: internal error: EOFError: Compressed file ended" in r.stderr and "interrupted" not in r.stderr
    crash_log = r.stderr.rsplit("(details: ", 1)[1].rstrip(")\n")
    assert crash_log.startswith(str(tmp_path)) and "gzip" in Path(crash_log).read_text()


def test_an_azure_blob_store_without_credentials_is_one_line_at_once(tmp_path: Path) -> None:
    """DefaultAzureCredential with nothing to use printed the SDK's ~12-line warning per retry for ~90 s
    before an error. Its managed-identity probe is pointed at a closed local port (no IMDS, no network);
    PATH holds no az or pwsh, HOME no token cache."""
    pytest.importorskip("azure.identity", reason="azure-identity is not installed")
    pytest.importorskip("azure.storage.blob", reason="azure-storage-blob is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "MSI_", "IDENTITY_"))}
    env.update({"HOME": str(tmp_path), "PATH": str(Path(sys.executable).parent), "DCX_HOME": str(tmp_path / "h"),
                "IDENTITY_ENDPOINT": "http://127.0.0.1:1/token", "IDENTITY_HEADER": "x"})
    r = subprocess.run([sys.executable, "-m", "dcx", "--state", "az://acct/cont/p", "cluster", "list"],
                       capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=40)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0].startswith("error: state store az://acct/cont/p: no usable Azure credentials"), r.stderr
    assert len(lines) == 2 and lines[1].startswith("hint: run `az login`") and r.stdout == ""


def test_day2_commands_ask_for_sudo_password_as_create_does(tmp_path: Path) -> None:
    """roll, node remove and node replace drive control nodes (ssh pools whose sudo needs a password, too):
    they take -K as create, destroy and backup do, and a missing password is one line before any work."""
    for args in (["cluster", "roll", "ghost"], ["node", "remove", "ghost", "n1"], ["node", "replace", "ghost", "n1"]):
        assert "--ask-become-pass" in dcx(*args[:2], "--help", home=tmp_path).stdout
        r = dcx(*args, "-K", home=tmp_path)  # stdin is /dev/null: no password to read
        assert r.returncode == 2, r.stderr
        assert r.stderr.splitlines() == ["error: --ask-become-pass: no password on standard input",
                                         "hint: pipe it in, or set DCX_BECOME_PASSWORD"]
