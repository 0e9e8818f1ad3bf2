"""Logging: one log file per run, and a redactor so secrets never reach a log line or an error.

Code that handles a secret (a join token, a password) calls `register_secret(value)` before the
value can appear anywhere; every log record and every user-facing error text passes through
`redact()`.
"""

from __future__ import annotations

import logging
import re
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


# Secrets recognisable by their form, redacted even when dcx never saw the value (a token a user pasted,
# a daemon's log line): swarm join tokens and unlock keys, k3s's secure tokens (K10<ca hash>::user:pass),
# PEM/OpenSSH private key blocks (a truncated one to the end of the text), WireGuard `PrivateKey = `, URL
# passwords.
# A group named `keep` (the name before a value) stays; the rest of the match becomes REDACTED.
SECRET_FORMS = [
    re.compile(r"SWM(?:TKN|KEY)-\d+-[0-9A-Za-z+/=_-]+"),
    re.compile(r"K10[0-9a-fA-F]{8,}::[^\s:]+:[^\s\"']+"),
    re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----(?:[\s\S]*?-----END \1PRIVATE KEY-----|[\s\S]*)"),
    re.compile(r"(?i)(?P<keep>PrivateKey[ \t]*=[ \t]*)(?!\*\*\*)\S+"),
    # The password of a URL (a proxy's `http://user:password@host`), wherever a daemon or a tool prints one.
    re.compile(r"(?P<keep>://[^\s:/@'\"]+:)(?!\*\*\*@)[^\s/@'\"]+(?=@)"),
]
# Only for what dcx gathers from machines (diagnose archives): any value assigned to a name that says
# password, passphrase, secret or token (`password: x`, `K3S_TOKEN=x`, `"token": "x"`, `--token x`).
# Too broad for dcx's own log lines, where it would hide ordinary words.
ASSIGNED_SECRETS = [
    re.compile(r"(?i)(?P<keep>[\w.-]*(?:password|passwd|passphrase|secret|token)[\w.-]*[\"']?[ \t]*[:=][ \t]*"
               r"[\"']?)(?!\*\*\*)[^\s\"',;}]+"),
    re.compile(r"(?i)(?P<keep>--[\w-]*(?:password|passwd|passphrase|secret|token)[\w-]*[ \t]+)(?!\*\*\*|-)\S+"),
]


def redact(text: str) -> str:
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for s in secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    for form in SECRET_FORMS:
        text = form.sub(_redacted, text)
    return text


def redact_gathered(text: str) -> str:
    """`redact`, and also every value assigned to a password/secret/token name: for text gathered from
    machines (logs, configs), where any such value may be a credential dcx never saw."""
    text = redact(text)
    for form in ASSIGNED_SECRETS:
        text = form.sub(_redacted, text)
    return text


def _redacted(match: re.Match[str]) -> str:
    return (match.groupdict().get("keep") or "") + REDACTED


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
