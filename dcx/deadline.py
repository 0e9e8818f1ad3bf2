"""`--timeout S` (DCX_TIMEOUT): the whole command ends after S seconds, whatever it is waiting for.

A watchdog thread, at the deadline: pushes what the run saved to a bucket store and releases the
run's store locks (Mirror.give_up), then ends the process with EXIT_TIMEOUT and one line. Ending the
process is what stops everything at once (SSH commands, provider calls, waits in worker threads);
the state stays consistent because every change was saved before it was acted on (the write-ahead
journal), each save is one atomic write, and the local cluster lock (an flock) is released by the
kernel when the process ends. The next run resumes from the saved state, as after any failure.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from dcx.errors import EXIT_TIMEOUT

GIVE_UP_PATIENCE = 30.0  # seconds the cleanup may take (a store that hangs) before the process ends anyway


def start(seconds: float) -> threading.Timer:
    # Beyond TIMEOUT_MAX (~292 years) the timer's wait raises OverflowError in its thread.
    timer = threading.Timer(min(seconds, threading.TIMEOUT_MAX), _expired, args=(seconds,))
    timer.name, timer.daemon = "dcx-timeout", True
    timer.start()
    return timer


def _expired(seconds: float) -> None:
    released = threading.Event()
    left: list[str] = []

    def give_up() -> None:
        from dcx.stores import give_up_locks

        try:
            left.extend(give_up_locks())
        except Exception as exc:  # noqa: BLE001 - ending anyway; said in the one line below
            left.append(f"{type(exc).__name__}")
        released.set()

    threading.Thread(target=give_up, name="dcx-timeout-cleanup", daemon=True).start()
    if not released.wait(GIVE_UP_PATIENCE):
        left.append("the state store did not answer in time")
    text = f"error: timed out after {seconds:g} s (--timeout): stopped; the next run resumes from the state saved"
    if left:
        text += f"; the cluster lock could not be released ({', '.join(left)}): see `dcx cluster unlock`"
    for handler in logging.getLogger("dcx").handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001, S110 - a log that cannot be flushed must not keep the process
            pass
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001, S110
        pass
    os.write(2, (text + "\n").encode())
    os._exit(EXIT_TIMEOUT)
