"""Remote commands: quoting, the sudo wrapper, swarm commands, secrets kept out of logs."""

from __future__ import annotations

import logging
import shlex
import subprocess
from pathlib import Path

import pytest

from dcx.bootstrap import swarm
from dcx.bootstrap.ssh import Connection, HostKeyStore, Target
from dcx.log import RedactingFilter, redact, register_secret
from dcx.shell import cmd, q

NASTY = ["plain", "with space", "semi;colon", "$(touch /tmp/pwned)", "`id`", "quote'single", 'quote"double',
         "new\nline", "glob*?", "back\\slash", "", "--flag=val", "a|b&c>d<e"]


@pytest.mark.parametrize("value", NASTY)
def test_quoted_values_reach_the_program_unchanged(value: str) -> None:
    out = subprocess.run(["sh", "-c", "printf '%s' " + q(value)], capture_output=True, text=True, check=True)
    assert out.stdout == value


def test_cmd_quotes_every_argument() -> None:
    line = cmd("docker", "node", "update", "--label-add", "k=v w", "$(id)")
    assert shlex.split(line) == ["docker", "node", "update", "--label-add", "k=v w", "$(id)"]


def conn(user: str, password: str | None = None) -> Connection:
    return Connection(Target(name="n", host="h", user=user, become_password=password), HostKeyStore({}, lambda: None))


def test_root_runs_through_sh_without_sudo() -> None:
    wrapped, stdin = conn("root").wrap("echo 'hi there'")
    assert wrapped.startswith("sh -c ")
    assert stdin == b""
    argv = shlex.split(wrapped)
    assert argv[:2] == ["sh", "-c"] and argv[2].endswith("echo 'hi there'")


def test_non_root_uses_non_interactive_sudo() -> None:
    wrapped, stdin = conn("ubuntu").wrap("id -u")
    assert shlex.split(wrapped)[:6] == ["sudo", "-n", "-H", "--", "sh", "-c"]
    assert stdin == b""


def test_sudo_password_goes_on_stdin_never_on_the_command_line() -> None:
    wrapped, stdin = conn("ops", "s3cret-pass").wrap("id -u")
    assert "s3cret-pass" not in wrapped
    assert stdin == b"s3cret-pass\n"
    assert shlex.split(wrapped)[:5] == ["sudo", "-S", "-p", "", "-H"]


def test_wrapped_command_runs_in_a_real_shell(tmp_path: Path) -> None:
    wrapped, _ = conn("root").wrap(f"printf '%s' {q('$(x) y')} > {q(str(tmp_path / 'out'))}")
    subprocess.run(wrapped, shell=True, check=True)  # noqa: S602 - this is what the remote login shell does
    assert (tmp_path / "out").read_text() == "$(x) y"


def test_swarm_init_advertises_the_given_address() -> None:
    argv = shlex.split(swarm.init_command("10.0.0.5"))
    assert argv == ["docker", "swarm", "init", "--advertise-addr", "10.0.0.5", "--listen-addr", "10.0.0.5:2377"]
    argv = shlex.split(swarm.init_command("100.96.0.1", data_path="100.96.0.1"))
    assert argv[-2:] == ["--data-path-addr", "100.96.0.1"]


def test_registered_secrets_are_redacted_in_logs_and_text() -> None:
    token = "SWMTKN-1-0123456789abcdef-secretpart"
    register_secret(token)
    assert redact(f"join failed: docker swarm join --token {token} x") == "join failed: docker swarm join --token *** x"
    record = logging.LogRecord("dcx", logging.INFO, __file__, 1, "token is %s", (token,), None)
    RedactingFilter().filter(record)
    assert token not in record.getMessage()


def test_swarm_manager_detection() -> None:
    assert swarm.is_manager({"LocalNodeState": "active", "ControlAvailable": True})
    assert not swarm.is_manager({"LocalNodeState": "active", "ControlAvailable": False})
    assert not swarm.is_active({"LocalNodeState": "inactive"})
