"""`dcx image ...`: put images on every node without a registry (air-gapped clusters)."""

from __future__ import annotations

from pathlib import Path

import typer

from dcx.cli.common import out

app = typer.Typer(help="Load container images onto every node (no registry needed).", no_args_is_help=True)


def _report(ctx: typer.Context, results: list[tuple[str, int, str]], what: str) -> None:
    from dcx.errors import OperationFailed

    o = out(ctx)
    failed = [(n, code, tail) for n, code, tail in results if code != 0]
    if o.json:
        o.data([{"node": n, "ok": code == 0, "output": tail} for n, code, tail in results])
    else:
        o.table(None, ["node", "result"], [[n, "ok" if code == 0 else f"failed: {tail}"] for n, code, tail in results])
    if failed:
        raise OperationFailed(f"{what} failed on {len(failed)}/{len(results)} nodes")


@app.command("load")
def load(ctx: typer.Context, name: str = typer.Argument(..., help="Cluster name."),
         file: Path = typer.Argument(..., exists=True, dir_okay=False, help="A `docker save` tarball.")) -> None:
    """Load a `docker save` tarball on every node (recorded: nodes that join later get it too)."""
    from dcx import images
    from dcx.errors import InputError
    from dcx.lifecycle.run import run_on_nodes

    data = images.read_tarball(file)
    refs = images.save_refs(data)
    if not refs:
        raise InputError(f"{file}: not a `docker save` tarball (no manifest.json naming an image)")
    results = run_on_nodes(name, images.load_command(), stdin=data)
    _record(name, "load", data, refs, results)
    _report(ctx, results, "docker load")


@app.command("import")
def import_(ctx: typer.Context, name: str = typer.Argument(..., help="Cluster name."),
            file: Path = typer.Argument(None, dir_okay=False, help="A root filesystem tarball."),
            tag: str = typer.Option(..., "--tag", "-t", help="Image name:tag to create."),
            busybox: bool = typer.Option(False, "--busybox", help="Build a ~1 MB busybox rootfs from this machine.")
            ) -> None:
    """Create an image from a root filesystem tarball on every node (`docker import`; recorded: nodes that
    join later get it too)."""
    from dcx import images
    from dcx.errors import InputError
    from dcx.lifecycle.run import run_on_nodes

    if busybox:
        data = images.busybox_rootfs()
    elif file is not None:
        data = images.read_tarball(file)
    else:
        raise InputError("give a rootfs tarball FILE or --busybox")
    results = run_on_nodes(name, images.import_command(tag), stdin=data)
    _record(name, "import", data, [tag], results)
    _report(ctx, results, "docker import")


def _record(name: str, kind: str, data: bytes, refs: list[str], results: list[tuple[str, int, str]]) -> None:
    """Once a node has the image it belongs to the cluster: nodes that join later get it too."""
    from dcx import images

    if any(code == 0 for _, code, _ in results):
        images.record(name, kind, data, refs)
