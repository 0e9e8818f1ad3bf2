"""One error family. Each error carries the one line the user sees, an optional hint and an exit code.

The CLI's single exception boundary (dcx.cli.main) prints `error: <message>` (and `hint: ...`) and
exits with `exit_code`; anything that is not a DcxError is an internal error, logged with its
traceback and reported in one line.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_LOCKED = 3
EXIT_TIMEOUT = 124  # --timeout ran out (as timeout(1) exits)


class DcxError(Exception):
    exit_code = EXIT_FAILED

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class InputError(DcxError):
    """Bad input from the user: a spec, an inventory, a flag. Exit 2."""

    exit_code = EXIT_BAD_INPUT


class SpecError(InputError):
    """A located error in a file the user wrote: `file:line: field: what is wrong`."""

    def __init__(self, file: str, line: int | None, field: str, problem: str, hint: str | None = None):
        self.file = file
        self.line = line
        self.field = field
        self.problem = problem
        where = f"{file}:{line}" if line else file
        text = f"{where}: {field}: {problem}" if field else f"{where}: {problem}"
        super().__init__(text, hint)


class LockHeld(DcxError):
    exit_code = EXIT_LOCKED


class OperationFailed(DcxError):
    """The operation ran and failed (a phase, a provider call). Exit 1."""


class ProviderError(OperationFailed):
    """A provider could not do what was asked (credentials, quota, API errors)."""


class HostKeyMismatch(OperationFailed):
    pass


class PrerequisiteMissing(DcxError):
    """Something this machine lacks (a package, root). Exit 2: the user must change their setup."""

    exit_code = EXIT_BAD_INPUT


def read_problem(exc: BaseException) -> str:
    """What went wrong reading a file, in words (never a Python class name)."""
    import errno

    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
    if isinstance(exc, OSError):
        words = {errno.EISDIR: "is a directory, not a file", errno.ELOOP: "is a symlink loop",
                 errno.EACCES: "permission denied", errno.ENAMETOOLONG: "file name too long",
                 errno.ENOTDIR: "a part of the path is not a directory", errno.ENOENT: "file not found"}
        return words.get(exc.errno or 0) or (exc.strerror or "cannot be read").lower()
    if isinstance(exc, ValueError):
        return str(exc).splitlines()[0] if str(exc) else "invalid"
    return "cannot be read"
