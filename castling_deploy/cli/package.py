"""`package`, `inspect` and `verify`: one archive per model, its manifest, and checking it before shipping."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import ToleranceError
from .app import cli, emit_json, handle_errors, json_option


@cli.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_file", type=click.Path(path_type=Path), required=True,
              help="Archive to write (.zip, or .tar.gz).")
@click.option("--allow-failed", is_flag=True, help="Package even reports marked failed.")
@handle_errors
def package(export_dir: Path, out_file: Path, allow_failed: bool) -> None:
    """Pack an export folder into one archive with manifest.json and a README for the app developer."""
    from .. import api

    click.echo(str(api.package(export_dir, out_file, allow_failed=allow_failed)))


@cli.command("inspect")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@handle_errors
def inspect_cmd(file: Path, as_json: bool) -> None:
    """Print a package's manifest."""
    from ..packaging import format_manifest, inspect_package

    manifest = inspect_package(file)
    if as_json:
        emit_json(manifest)
    else:
        click.echo(format_manifest(manifest))


@cli.command("verify")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--val", type=click.Path(path_type=Path), help="Re-run the accuracy check on these images.")
@click.option("--limit", type=int, help="At most N val images.")
@json_option
@handle_errors
def verify_cmd(file: Path, val: Path | None, limit: int | None, as_json: bool) -> None:
    """Check every hash in a package (exit 3 on tampering) and optionally re-run accuracy on --val."""
    from .. import api
    from ..packaging import format_verify_result

    try:
        result = api.verify(file, val=val, limit=limit)
    except ToleranceError as exc:
        result = getattr(exc, "result", None)
        if result is not None:
            emit_json(result) if as_json else click.echo(format_verify_result(result), err=True)
        raise
    emit_json(result) if as_json else click.echo(format_verify_result(result))
