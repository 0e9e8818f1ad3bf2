"""`dcx` entry point: the global options and the one exception boundary.

DcxError -> `error: message` (+ `hint: ...`) and its exit code; anything else -> `internal error:
Type: message (details: LOG)` with the traceback only in the log file. Nothing here imports a
cloud SDK: `dcx --help` stays fast.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
import warnings

import typer

from dcx import __version__

try:  # typer >= 0.22 carries its own copy of click; older ones use click itself
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import NoArgsIsHelpError, UsageError  # type: ignore[assignment]
from dcx.cli import cluster, image, inventory_cmd, node, providers_cmd, state_cmd
from dcx.cli.output import Output
from dcx.errors import EXIT_BAD_INPUT, EXIT_FAILED, DcxError
from dcx.log import redact

app = typer.Typer(
    name="dcx",
    help="Turn machines anywhere into one cluster: Docker Swarm or k3s on AWS, GCP, Azure, bare metal "
    "over SSH, and local namespace nodes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help text: typer's rich help imports rich.markdown and markdown_it, ~40% of `dcx --help`.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(cluster.app, name="cluster")
app.add_typer(node.app, name="node")
app.add_typer(providers_cmd.app, name="providers")
app.add_typer(inventory_cmd.app, name="inventory")
app.add_typer(image.app, name="image")
app.add_typer(state_cmd.app, name="state")


@app.callback()
def main_options(
    ctx: typer.Context,
    output: str = typer.Option("table", "--output", "-o", help="table (for people) or json (for machines)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Answer yes to every question (implied without a TTY)."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More detail (per host)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors and results."),
    state: str = typer.Option("", "--state", metavar="URL", help="Where clusters' state lives: a directory "
                              "(default DCX_HOME), s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, "
                              "az://ACCOUNT/CONTAINER/PREFIX (env DCX_STATE)."),
    lock_timeout: float = typer.Option(0, "--lock-timeout", metavar="S", min=0,
                                       help="Wait up to S seconds for a cluster another dcx holds "
                                       "(default: fail at once)."),
    timeout: float = typer.Option(0, "--timeout", metavar="S", min=0,
                                  help="End the whole command after S seconds, exit 124, releasing its lock "
                                  "(env DCX_TIMEOUT; before `node run`/`inventory check`, whose own "
                                  "--timeout is per host)."),
) -> None:
    if output not in ("table", "json"):
        raise typer.BadParameter("must be 'table' or 'json'", param_hint="--output")
    # The state store and lock wait reach every StateStore() of this run through the environment.
    if state:
        from dcx.stores import parse_url

        parse_url(state)  # a malformed URL: one line, exit 2, before anything runs
        os.environ["DCX_STATE"] = state
    if lock_timeout:
        os.environ["DCX_LOCK_TIMEOUT"] = str(lock_timeout)
    else:
        env_seconds("DCX_LOCK_TIMEOUT")  # a bad value: one line now, not an internal error at the lock
    if timeout != timeout or timeout == float("inf"):  # inf passes click's min=0; the timer cannot wait it
        raise typer.BadParameter(f"'{timeout}' is not a number of seconds", param_hint="--timeout")
    seconds = timeout or command_timeout()
    if seconds:
        from dcx import deadline

        deadline.start(seconds)  # ends the process at the deadline (dcx.deadline), whatever it waits for
    ctx.obj = Output(output, verbose, quiet, yes)


def command_timeout() -> float:
    """DCX_TIMEOUT: seconds, or an InputError naming it."""
    return env_seconds("DCX_TIMEOUT")


def env_seconds(name: str) -> float:
    """A number of seconds from the environment variable `name` (0 when unset), or an InputError naming it."""
    from dcx.errors import InputError

    text = os.environ.get(name, "").strip()
    try:
        value = float(text) if text else 0.0
    except ValueError:
        value = -1.0
    if value < 0 or value != value or value == float("inf"):
        raise InputError(f"{name}: '{text[:40]}' is not a number of seconds")
    return value


@app.command()
def version(ctx: typer.Context) -> None:
    """Print dcx's version."""
    o: Output = ctx.obj
    if o.json:
        o.data({"version": __version__, "python": sys.version.split()[0]})
    else:
        o.info(f"dcx {__version__}")


@app.command()
def schema() -> None:
    """Print the JSON Schema of cluster.yaml (for yaml-language-server and editors)."""
    import json

    from dcx.spec import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


GLOBAL_FLAGS = {"--yes", "-y", "--quiet", "-q", "--verbose", "-v", "-vv", "-vvv"}
GLOBAL_WITH_VALUE = {"--output", "-o", "--state", "--lock-timeout"}
FILE_O_COMMANDS = ("diagnose", "export", "backup")  # their -o is a file to write, not an output format
OWN_TIMEOUT = (("node", "run"), ("inventory", "check"))  # their --timeout is per host, not the global one
OUTPUT_FORMATS = ("table", "json")


def hoist_global_options(argv: list[str]) -> list[str]:
    """Let global options stand anywhere (`dcx cluster status demo -o json`), as kubectl users expect:
    they are moved in front of the command, up to a `--` (after which arguments belong to a remote
    command)."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        if arg in GLOBAL_FLAGS:
            front.append(arg)
        elif (arg == "-o" and any(c in rest for c in FILE_O_COMMANDS) and i + 1 < len(argv)
              and argv[i + 1] not in OUTPUT_FORMATS):
            rest += [arg, argv[i + 1]]  # `dcx cluster diagnose NAME -o FILE`: the archive's path, not a format
            i += 1
        elif ((arg == "--timeout" or arg.startswith("--timeout=")) and not any(
                all(word in rest for word in cmd) for cmd in OWN_TIMEOUT)):
            front += [arg] if "=" in arg else argv[i:i + 2]  # the whole command's (see main_options)
            i += 0 if "=" in arg else 1
        elif arg in GLOBAL_WITH_VALUE and i + 1 < len(argv):
            front += [arg, argv[i + 1]]
            i += 1
        elif any(arg.startswith(f"{opt}=") for opt in GLOBAL_WITH_VALUE if opt.startswith("--")):
            front.append(arg)
        elif arg.startswith("-o") and len(arg) > 2 and not arg.startswith("--"):
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    return front + rest


def main() -> None:
    # google-api-core (older releases) warns at import about the Python versions it will support next:
    # news for whoever picks the Python dcx runs on, not for dcx's users, whose stderr has one error line.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"google\.")
    try:
        # standalone_mode=False: click's errors come here, to the one boundary, instead of typer's panels.
        code = app(args=hoist_global_options(sys.argv[1:]), prog_name="dcx", standalone_mode=False)
    except NoArgsIsHelpError as exc:
        sys.stdout.write(exc.ctx.get_help() + "\n")  # `dcx cluster`: what there is to run, not an error
        sys.exit(0)
    except UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "dcx"
        Output().error(f"{where}: {usage_message(exc)} (see `{where} --help`)")
        sys.exit(EXIT_BAD_INPUT)
    except DcxError as exc:
        Output().error(exc.message, exc.hint)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt) as exc:
        if isinstance(exc.__cause__, EOFError) and exc.__cause__.args:
            # typer turns any EOFError of a command (a truncated gzip, a closed stream) into Abort: that is a
            # failure to report as one, not the user's interrupt (a bare EOFError is an answer cut short).
            crash(exc.__cause__)
        Output().error("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:
        crash(exc)
    sys.exit(code if isinstance(code, int) else 0)


def crash(exc: BaseException) -> None:
    """An unexpected exception: one line naming it, its traceback only in a file (redacted)."""
    with tempfile.NamedTemporaryFile("w", prefix="dcx-crash-", suffix=".log", delete=False) as fh:
        fh.write(redact("".join(traceback.format_exception(exc))))
    Output().error(f"internal error: {type(exc).__name__}: {redact(str(exc))} (details: {fh.name})")
    sys.exit(EXIT_FAILED)


def usage_message(exc: Exception) -> str:
    """click's message on one line, starting lowercase, without its closing period."""
    text = " ".join(part.strip() for part in exc.format_message().splitlines() if part.strip())  # type: ignore[attr-defined]
    text = text.rstrip(".")
    return text[:1].lower() + text[1:]
