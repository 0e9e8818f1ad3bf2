"""~/.ssh/config resolution as OpenSSH does it: first obtained value wins, Host patterns, HostName
replacing the looked-up name, explicit (inventory) values over the file, ProxyJump chains."""

from __future__ import annotations

import os

import paramiko
import pytest

from dcx.sshconfig import parse_jump, resolve

CONFIG = """\
Host gw
  HostName 192.0.2.1
  User jumper
  Port 2222
Host inner-gw
  HostName 10.1.0.1
  ProxyJump gw
Host db-*
  User dba
  ProxyJump inner-gw
  IdentityFile ~/.ssh/db_key
Host db-1
  HostName 10.2.0.11
  User ignored-first-value-wins
Host loop-a
  ProxyJump loop-b
Host loop-b
  ProxyJump loop-a
Host direct
  HostName 203.0.113.5
  ProxyJump none
Host *
  User fallback
"""


@pytest.fixture
def config() -> paramiko.SSHConfig:
    return paramiko.SSHConfig.from_text(CONFIG)


def test_alias_takes_hostname_user_key_and_a_chained_jump(config: paramiko.SSHConfig) -> None:
    ep = resolve("db-1", config=config)
    assert (ep.host, ep.port, ep.user) == ("10.2.0.11", 22, "dba")
    assert ep.key_files == [os.path.expanduser("~/.ssh/db_key")]
    # Outermost hop first: gw is reached directly, inner-gw through gw, db-1 through inner-gw.
    assert [(j.host, j.port, j.user) for j in ep.jumps] == [("192.0.2.1", 2222, "jumper"), ("10.1.0.1", 22, "fallback")]
    assert all(not j.jumps for j in ep.jumps)


def test_explicit_values_win_over_the_file(config: paramiko.SSHConfig) -> None:
    ep = resolve("db-1", port=2200, user="ops", key_file="/keys/k", proxy_jump="admin@gw:22", config=config)
    assert (ep.host, ep.port, ep.user, ep.key_files) == ("10.2.0.11", 2200, "ops", ["/keys/k"])
    assert [(j.user, j.host, j.port) for j in ep.jumps] == [("admin", "192.0.2.1", 22)]


def test_an_inventory_address_is_looked_up_like_ssh_does(config: paramiko.SSHConfig) -> None:
    # ansible_host=gw: ssh would connect to gw's HostName with gw's settings.
    ep = resolve("some-name", host="gw", config=config)
    assert (ep.alias, ep.host, ep.port, ep.user) == ("some-name", "192.0.2.1", 2222, "jumper")
    plain = resolve("web", host="198.51.100.9", config=config)
    assert (plain.host, plain.user, plain.jumps) == ("198.51.100.9", "fallback", [])


def test_proxyjump_none_and_defaults(config: paramiko.SSHConfig) -> None:
    assert resolve("direct", config=config).jumps == []
    empty = resolve("anything", config=paramiko.SSHConfig(), default_user="ubuntu")
    assert (empty.host, empty.port, empty.user, empty.key_files) == ("anything", 22, "ubuntu", [])


def test_a_jump_loop_is_refused(config: paramiko.SSHConfig) -> None:
    with pytest.raises(ValueError, match="too deep"):
        resolve("loop-a", config=config)


@pytest.mark.parametrize(("spec", "expected"), [
    ("host", ("", "host", None)),
    ("me@host:2022", ("me", "host", 2022)),
    ("[2001:db8::1]:2200", ("", "2001:db8::1", 2200)),
    ("me@[2001:db8::1]", ("me", "2001:db8::1", None)),
])
def test_parse_jump(spec: str, expected: tuple[str, str, int | None]) -> None:
    assert parse_jump(spec) == expected
