"""The Docker Engine API of a node, reached as `DOCKER_HOST=ssh://` reaches it: an SSH session runs
`docker system dial-stdio`, which joins its stdin and stdout to the daemon's socket, and one HTTP/1.1
request goes over it. For requests that carry a secret (a swarm join token): the secret travels in the
request body on the session's stdin, never on any process's command line or in its environment.
"""

from __future__ import annotations

import http.client
import io
import json
from typing import Any

from dcx.bootstrap.ssh import Connection
from dcx.errors import OperationFailed
from dcx.log import redact

DIAL_STDIO = "docker system dial-stdio"


class EngineAPIError(OperationFailed):
    """The daemon answered with an error status; `message` is its own (redacted) explanation."""

    def __init__(self, host: str, what: str, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"{what} failed on {host} (HTTP {status}): {redact(message)}")


def http_request(method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
    """One HTTP/1.1 request; `Connection: close` makes the daemon end the exchange (and dial-stdio exit)."""
    payload = json.dumps(body).encode() if body is not None else b""
    head = (f"{method} {path} HTTP/1.1\r\n"
            "Host: docker\r\n"  # HTTP/1.1 requires one; the daemon ignores its value
            "User-Agent: dcx\r\n"
            "Connection: close\r\n"
            + ("Content-Type: application/json\r\n" if body is not None else "")
            + f"Content-Length: {len(payload)}\r\n\r\n")
    return head.encode() + payload


class _Replay:
    """What http.client.HTTPResponse reads from: the bytes dial-stdio printed."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> io.BytesIO:
        return io.BytesIO(self._data)


def parse_response(data: bytes, method: str = "POST") -> tuple[int, bytes]:
    """(status, body) of a complete HTTP/1.1 response (Content-Length or chunked, as the daemon sends)."""
    response = http.client.HTTPResponse(_Replay(data), method=method)  # type: ignore[arg-type]
    response.begin()
    return response.status, response.read()


def error_message(body: bytes) -> str:
    """The Engine API's error body is {"message": "..."}; anything else is shown as text."""
    try:
        doc = json.loads(body or b"{}")
    except ValueError:
        return body.decode(errors="replace").strip()
    return str(doc.get("message", "")) if isinstance(doc, dict) else str(doc)


def call(conn: Connection, method: str, path: str, body: dict[str, Any] | None, *, what: str,
         timeout: float) -> bytes:
    """Send one request to the node's daemon; return the body of a 2xx answer, else raise naming the host."""
    name = conn.target.name
    code, out, err = conn.exchange(DIAL_STDIO, http_request(method, path, body), timeout=timeout)
    if not out:
        tail = "\n".join(err.decode(errors="replace").strip().splitlines()[-3:])
        raise OperationFailed(f"{what} failed on {name}: `{DIAL_STDIO}` exited {code} without an answer"
                              + (f": {redact(tail)}" if tail else ""))
    try:
        status, payload = parse_response(out, method)
    except (http.client.HTTPException, ValueError) as exc:
        raise OperationFailed(f"{what} failed on {name}: the Docker daemon's answer is not HTTP "
                              f"({type(exc).__name__})") from None
    if not 200 <= status < 300:
        raise EngineAPIError(name, what, status, error_message(payload))
    return payload
