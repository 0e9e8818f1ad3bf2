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
from rich.text import Text

from dcx.log import redact


class Output:
    def __init__(self, fmt: str = "table", verbose: int = 0, quiet: bool = False, yes: bool = False) -> None:
        self.format = fmt
        self.verbose = verbose
        self.quiet = quiet
        self.yes = yes or not sys.stdin.isatty()
        no_color = bool(os.environ.get("NO_COLOR"))
        # Machine output owns stdout; everything for people goes to stderr then.
        # emoji and markup off: user data (`:x:`, `[bold]`) is printed as written.
        self.out = Console(no_color=no_color, highlight=False, soft_wrap=True, emoji=False, markup=False)
        self.err = Console(stderr=True, no_color=no_color, highlight=False, soft_wrap=True, emoji=False,
                           markup=False)
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
            self.err.print("error: " + one_line(redact(message)), style="bold red", markup=False)
            if hint:
                self.err.print("hint: " + one_line(redact(hint)), markup=False)

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
            t.add_row(*[Text(redact(str(v))) for v in r])  # Text: cells are data, never markup
        with self._lock:
            self.people.print(t)

    def confirm(self, question: str) -> bool:
        if self.yes:
            return True
        import typer

        return typer.confirm(question, default=False, err=True)


def one_line(text: str) -> str:
    """Control characters (a newline in a name from a file) shown escaped: an error stays one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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
                                      MofNCompleteColumn(), TextColumn("{task.fields[last]}", markup=False),
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


def write_raw(output: Output, text: str, err: bool = False) -> None:
    """Text exactly as a remote command printed it (no markup, no emoji codes), secrets redacted."""
    stream = output.err.file if err else output.people.file
    with output._lock:
        stream.write(redact(text))
        stream.flush()


class FleetProgress:
    """Live per-node status of `dcx node run` on a terminal (running, ok, exit N, unreachable), gone
    when the run ends; nothing otherwise, since the results are printed whole at the end."""

    def __init__(self, output: Output, nodes: list[str]) -> None:
        import time

        self.o = output
        self._clock = time.monotonic
        self.state: dict[str, tuple[str, float, float | None]] = {n: ("waiting", 0.0, None) for n in nodes}
        self._live: Any = None

    def __enter__(self) -> FleetProgress:
        if self.o.interactive and not self.o.quiet:
            from rich.live import Live

            self._live = Live(get_renderable=self._render, console=self.o.people, transient=True,
                              refresh_per_second=8)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def started(self, node: str) -> None:
        self.state[node] = ("running", self._clock(), None)

    def done(self, node: str, outcome: str) -> None:
        _, began, _ = self.state[node]
        self.state[node] = (outcome, began, self._clock())

    def _render(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        rows = list(self.state.items())
        finished = sum(1 for _, (_, _, end) in rows if end is not None)
        failed = sum(1 for _, (what, _, end) in rows if end is not None and what != "ok")
        # A tall fleet shows its running and failed nodes first, as many as the terminal holds.
        room = max(3, self.o.people.size.height - 3)
        if len(rows) > room:
            rows.sort(key=lambda r: (r[1][0] not in ("running",) and r[1][0] in ("ok", "waiting"), r[0]))
            rows = rows[:room]
        grid = Table.grid(padding=(0, 2))
        now = self._clock()
        for name, (what, began, end) in rows:
            style = "green" if what == "ok" else "yellow" if what in ("running", "waiting") else "red"
            seconds = "" if what == "waiting" else f"{(end or now) - began:.1f}s"
            grid.add_row(Text(name), Text(what, style=style), seconds)
        grid.add_row(Text(f"{finished}/{len(self.state)} done", style="bold"), f"{failed} failed" if failed else "", "")
        return grid
