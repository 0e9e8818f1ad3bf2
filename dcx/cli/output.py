"""All printing goes through `Output`: rich for people on a terminal, plain lines when not a TTY,
JSON on stdout for machines (`-o json`; progress then goes to stderr). NO_COLOR is honoured."""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

from rich.console import Console
from rich.table import Table

from dcx.log import redact


class Output:
    def __init__(self, fmt: str = "table", verbose: int = 0, quiet: bool = False, yes: bool = False) -> None:
        self.format = fmt
        self.verbose = verbose
        self.quiet = quiet
        self.yes = yes or not sys.stdin.isatty()
        no_color = bool(os.environ.get("NO_COLOR"))
        # Machine output owns stdout; everything for people goes to stderr then.
        self.out = Console(no_color=no_color, highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, no_color=no_color, highlight=False, soft_wrap=True)
        self._lock = threading.Lock()

    @property
    def json(self) -> bool:
        return self.format == "json"

    @property
    def people(self) -> Console:
        return self.err if self.json else self.out

    @property
    def interactive(self) -> bool:
        return self.people.is_terminal and not self.json

    def info(self, message: str) -> None:
        if not self.quiet:
            with self._lock:
                self.people.print(redact(message), markup=False)

    def warn(self, message: str) -> None:
        with self._lock:
            self.err.print(redact(message), style="yellow", markup=False)

    def error(self, message: str, hint: str | None = None) -> None:
        with self._lock:
            self.err.print("error: " + redact(message), style="bold red", markup=False)
            if hint:
                self.err.print("hint: " + redact(hint), markup=False)

    def data(self, payload: Any) -> None:
        """The command's result for machines."""
        sys.stdout.write(redact(json.dumps(payload, indent=2, sort_keys=False, default=str)) + "\n")
        sys.stdout.flush()

    def table(self, title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
        if not self.interactive:
            # Plain, aligned text: easy to grep and to read in CI logs.
            widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(c)
                      for i, c in enumerate(columns)]
            lines = ["  ".join(str(c).upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
            for r in rows:
                lines.append("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
            with self._lock:
                if title:
                    self.people.print(title, markup=False)
                for line in lines:
                    self.people.print(redact(line), markup=False)
            return
        t = Table(title=title, title_justify="left", header_style="bold")
        for c in columns:
            t.add_column(c)
        for r in rows:
            t.add_row(*[redact(str(v)) for v in r])
        with self._lock:
            self.people.print(t)

    def confirm(self, question: str) -> bool:
        if self.yes:
            return True
        import typer

        return typer.confirm(question, default=False, err=True)


class PhaseReporter:
    """Progress of phases and hosts: a live rich display on a terminal, one line per event otherwise."""

    def __init__(self, output: Output) -> None:
        self.o = output
        self._progress: Any = None
        self._task: Any = None

    def phase_started(self, title: str, hosts: list[str]) -> None:
        if self.o.quiet:
            return
        if self.o.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TextColumn("{task.fields[last]}"),
                                      console=self.o.people, transient=True)
            self._progress.start()
            self._task = self._progress.add_task(title, total=len(hosts), last="")
        else:
            self.o.info(f"==> {title} ({len(hosts)} host{'s' if len(hosts) != 1 else ''})")

    def host_done(self, title: str, host: str, outcome: str, detail: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, last=f"{host}: {outcome}")
        if outcome == "failed":
            self.o.warn(f"    {host}: failed: {detail}")
        elif self.o.verbose and not self.o.quiet:
            self.o.info(f"    {host}: {outcome}")

    def phase_done(self, title: str, changed: int, skipped: int, failed: int) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.o.quiet:
            return
        mark = "✗" if failed else "✓"
        parts = [f"{changed} changed", f"{skipped} unchanged"] + ([f"{failed} failed"] if failed else [])
        if self.o.interactive:
            self.o.info(f"{mark} {title}: " + ", ".join(parts))
        else:
            self.o.info(f"    {', '.join(parts)}")

    def note(self, message: str) -> None:
        if message.startswith("warning:"):
            self.o.warn(message)
        else:
            self.o.info(message)
