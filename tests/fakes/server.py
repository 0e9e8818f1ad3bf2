"""The HTTP plumbing the fakes share: a threaded server on a free loopback port, answering from a
daemon thread, plain HTTP or TLS."""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


class LoopbackServer:
    """Serves `handler` on 127.0.0.1; `start()`/`close()`, or a with-block. With `tls`, the socket speaks
    TLS, and the handshake is left to each request's thread (the handler's setup), not to accept()."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], thread_name: str,
                 tls: ssl.SSLContext | None = None) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True, do_handshake_on_connect=False)
        self._scheme = "https" if tls is not None else "http"
        self._thread_name = thread_name
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{self._scheme}://{host}:{port}"

    def start(self) -> Self:
        self._thread = threading.Thread(target=self.server.serve_forever, name=self._thread_name, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread:
            self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
