"""A strict Cloud Storage layer in front of gcp-storage-emulator: the emulator stays the store; this
HTTP proxy on 127.0.0.1 enforces the generation preconditions the emulator ignores (seen with
gcp-storage-emulator 2026.7.19: an upload with ifGenerationMatch=0 over an existing object, with a
stale ifGenerationMatch, and a delete with a stale one were all accepted). It is never stricter than
the documentation: requests without preconditions pass as they are.

Rules (Cloud Storage docs, "Request preconditions", and the JSON API reference for objects.insert and
objects.delete, query parameter ifGenerationMatch):
- ifGenerationMatch=0 on an upload: succeeds only when no live object has the name; otherwise
  412 Precondition Failed (reason conditionNotMet).
- ifGenerationMatch=G (G > 0) on an upload or a delete: succeeds only while the live object's
  generation is G; otherwise 412 (conditionNotMet); a delete of no object answers 404 as always.
- Each precondition is checked and the write done as one step (the service is atomic per object):
  writes through this proxy are serialised.
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler

from tests.fakes.server import LoopbackServer

NOT_MET = "At least one of the pre-conditions you specified did not hold."
PRECONDITION_FAILED = {"error": {"code": 412, "message": NOT_MET, "errors": [
    {"domain": "global", "reason": "conditionNotMet", "message": NOT_MET, "locationType": "header",
     "location": "If-Match"}]}}


class StrictGcs:
    def __init__(self, target: str) -> None:  # target: "127.0.0.1:PORT" of the emulator
        self.target = target
        self.writes = threading.Lock()
        self.refused = 0
        self.server = LoopbackServer(self._handler(), "gcs-strict")

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> StrictGcs:
        self.server.start()
        return self

    def close(self) -> None:
        self.server.close()

    def generation(self, bucket: str, name: str) -> int:
        """The live object's generation, 0 when there is none (asked of the emulator)."""
        conn = http.client.HTTPConnection(self.target, timeout=60)
        conn.request("GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}")
        r = conn.getresponse()
        body = r.read()
        conn.close()
        return int(json.loads(body).get("generation", 0)) if r.status == 200 else 0

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        layer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                self._forward(b"")

            def do_POST(self) -> None:  # noqa: N802
                self._write()

            def do_PUT(self) -> None:  # noqa: N802
                self._write()

            def do_PATCH(self) -> None:  # noqa: N802
                self._write()

            def do_DELETE(self) -> None:  # noqa: N802
                self._write()

            def _write(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                with layer.writes:
                    want = query.get("ifGenerationMatch", [None])[0]
                    target = self._object(url.path, query, body)
                    if want is not None and target is not None:
                        live = layer.generation(*target)
                        missing_delete = self.command == "DELETE" and live == 0
                        if live != int(want) and not missing_delete:
                            layer.refused += 1
                            return self._answer(412, json.dumps(PRECONDITION_FAILED).encode())
                    self._forward(body)

            def _object(self, path: str, query: dict[str, list[str]], body: bytes) -> tuple[str, str] | None:
                """(bucket, object name) a write names: in the path (delete), or the upload's `name`
                parameter or its multipart metadata part."""
                parts = path.split("/")
                if "b" not in parts or "o" not in parts:
                    return None
                bucket = parts[parts.index("b") + 1]
                after = parts[parts.index("o") + 1:]
                if after:
                    return bucket, urllib.parse.unquote("/".join(after))
                if "name" in query:
                    return bucket, query["name"][0]
                for line in body.split(b"\r\n"):
                    if line.startswith(b"{"):
                        try:
                            return bucket, json.loads(line)["name"]
                        except (ValueError, KeyError):
                            return None
                return None

            def _forward(self, body: bytes) -> None:
                conn = http.client.HTTPConnection(layer.target, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                r = conn.getresponse()
                data = r.read()
                conn.close()
                self._answer(r.status, data, [(k, v) for k, v in r.getheaders()
                                              if k.lower() not in ("content-length", "connection",
                                                                   "transfer-encoding")])

            def _answer(self, status: int, data: bytes, headers: list[tuple[str, str]] | None = None) -> None:
                self.send_response(status)
                for k, v in headers or [("Content-Type", "application/json")]:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
