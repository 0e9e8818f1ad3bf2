"""Logging: one log file per run, and a redactor so secrets never reach a log line or an error.

Code that handles a secret (a join token, a password) calls `register_secret(value)` before the
value can appear anywhere; every log record and every user-facing error text passes through
`redact()`.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

_secrets: set[str] = set()
_lock = threading.Lock()
REDACTED = "***"

log = logging.getLogger("dcx")


def register_secret(value: str) -> None:
    value = value.strip()
    if len(value) >= 6:  # short strings would redact ordinary words
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for s in secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


def start_run_log(log_file: Path) -> logging.Handler:
    """Send every dcx log record (DEBUG and up) to `log_file` (0600), secrets redacted."""
    log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_file.touch(mode=0o600, exist_ok=True)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(message)s"))
    handler.addFilter(RedactingFilter())
    handler.setLevel(logging.DEBUG)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    # paramiko's transport threads log (with tracebacks) when a host hangs up or never answers: those
    # belong in the run log, never on the user's terminal.
    paramiko_log.setLevel(logging.WARNING)
    paramiko_log.addHandler(handler)
    return handler


def stop_run_log(handler: logging.Handler) -> None:
    log.removeHandler(handler)
    paramiko_log.removeHandler(handler)
    handler.close()


paramiko_log = logging.getLogger("paramiko")
paramiko_log.propagate = False
paramiko_log.addHandler(logging.NullHandler())
