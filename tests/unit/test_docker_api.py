"""Swarm joins go through the node's Engine API over `docker system dial-stdio` on an SSH session: the
token travels in the request body on stdin, never on a command line. Here the node is the in-process SSH
server and `docker` a stand-in that records its argv and the request, and answers as dockerd does."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from dcx.bootstrap import docker_api, swarm
from dcx.bootstrap.docker_api import EngineAPIError
from dcx.bootstrap.ssh import Connection, HostKeyStore, Target
from dcx.errors import OperationFailed
from dcx.log import register_secret
from tests.fakes.ssh_server import LimitedSSHServer

TOKEN = "SWMTKN-1-3pu6hszjas19xyp7ghgosyx9k8atbfcr8p2is99znpy26u2lkl-1awxwuwd3z9j1z3puu7rcgdbx"

# A stand-in for the docker CLI's `system dial-stdio`: reads one HTTP/1.1 request from stdin (headers,
# then Content-Length bytes), records argv and request, and prints the answer given in $FAKE_ANSWER.
STAND_IN = r'''#!{python}
import os, sys, json
head = b""
while not head.endswith(b"\r\n\r\n"):
    c = sys.stdin.buffer.read(1)
    if not c:
        break
    head += c
length = 0
for line in head.decode().split("\r\n"):
    if line.lower().startswith("content-length:"):
        length = int(line.split(":", 1)[1])
body = sys.stdin.buffer.read(length)
with open(os.environ["FAKE_RECORD"], "w") as f:
    json.dump({{"argv": sys.argv[1:], "head": head.decode(), "body": body.decode()}}, f)
sys.stdout.buffer.write(open(os.environ["FAKE_ANSWER"], "rb").read())
'''


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Connection, Path, Path]]:
    key = paramiko.RSAKey.generate(2048)
    key.write_private_key_file(str(tmp_path / "id"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(STAND_IN.format(python=sys.executable))
    (bin_dir / "docker").chmod(0o755)
    record, answer = tmp_path / "record.json", tmp_path / "answer"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_RECORD": str(record), "FAKE_ANSWER": str(answer)}
    server = LimitedSSHServer(key, 10, env=env)
    conn = Connection(Target(name="worker-3", host="127.0.0.1", port=server.port, key_files=[str(tmp_path / "id")],
                             agent=False, booting=False), HostKeyStore({}, lambda: None))
    yield conn, record, answer
    conn.close()
    server.close()


def answer(status: str, body: bytes = b"", chunked: bool = False) -> bytes:
    # What dockerd sends (Go net/http): a JSON error body, chunked when it streams it.
    if chunked:
        payload = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                "Connection: close\r\n\r\n").encode() + payload
    return (f"HTTP/1.1 {status}\r\nApi-Version: 1.41\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


def test_join_posts_the_request_body_and_no_token_reaches_argv(node) -> None:
    conn, record, answer_file = node
    answer_file.write_bytes(answer("200 OK"))
    host = swarm.Host(node=None, target=conn.target, conn=conn)  # type: ignore[arg-type]
    swarm.join_swarm(host, TOKEN, "10.0.0.6", "10.0.0.5", data_path="100.96.0.6")
    seen = json.loads(record.read_text())
    assert seen["argv"] == ["system", "dial-stdio"]  # the token is nowhere on the command line
    head = seen["head"].split("\r\n")
    assert head[0] == "POST /swarm/join HTTP/1.1"
    assert "Host: docker" in head and "Content-Type: application/json" in head
    # Engine API, SwarmJoin: JoinRequest {ListenAddr, AdvertiseAddr, DataPathAddr, RemoteAddrs, JoinToken}
    assert json.loads(seen["body"]) == {"ListenAddr": "10.0.0.6:2377", "AdvertiseAddr": "10.0.0.6",
                                        "DataPathAddr": "100.96.0.6", "RemoteAddrs": ["10.0.0.5:2377"],
                                        "JoinToken": TOKEN}


@pytest.mark.parametrize("chunked", [False, True])
def test_the_daemons_error_message_is_shown_with_the_token_redacted(node, chunked: bool) -> None:
    conn, _, answer_file = node
    register_secret(TOKEN)
    message = f"rpc error: code = InvalidArgument desc = invalid join token {TOKEN}"
    answer_file.write_bytes(answer("400 Bad Request", json.dumps({"message": message}).encode(), chunked))
    with pytest.raises(EngineAPIError) as info:
        docker_api.call(conn, "POST", "/swarm/join", {"JoinToken": TOKEN}, what="docker swarm join", timeout=30)
    assert info.value.status == 400
    assert info.value.message == ("docker swarm join failed on worker-3 (HTTP 400): rpc error: code = "
                                  "InvalidArgument desc = invalid join token ***")


def test_a_node_whose_daemon_is_down_says_so(node) -> None:
    conn, _, _ = node
    # What the real CLI prints when no daemon listens (seen on this machine's docker 20.10).
    (Path(conn.target.key_files[0]).parent / "bin" / "docker").write_text(
        "#!/bin/sh\necho 'failed to open the raw stream connection: dial unix /var/run/docker.sock: connect: no such "
        "file or directory' >&2\nexit 1\n")
    with pytest.raises(OperationFailed, match=r"docker swarm join failed on worker-3: `docker system dial-stdio` "
                       r"exited 1 without an answer: failed to open the raw stream connection"):
        docker_api.call(conn, "POST", "/swarm/join", {}, what="docker swarm join", timeout=30)


def test_request_framing() -> None:
    raw = docker_api.http_request("GET", "/info")
    assert raw == (b"GET /info HTTP/1.1\r\nHost: docker\r\nUser-Agent: dcx\r\nConnection: close\r\n"
                   b"Content-Length: 0\r\n\r\n")
    assert docker_api.parse_response(answer("503 Service Unavailable", b'{"message":"x"}')) == (503, b'{"message":"x"}')
