"""`package`, `inspect`, `verify` and `keygen`: one archive per model, its manifest, its signature, and checking it
before shipping."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import ToleranceError
from .app import cli, device_options, emit_json, handle_errors, json_option


@cli.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_file", type=click.Path(path_type=Path), required=True,
              help="Archive to write (.zip, or .tar.gz).")
@click.option("--allow-failed", is_flag=True, help="Package even reports marked failed.")
@click.option("--sign", "sign_key", type=click.Path(path_type=Path),
              help="PEM private key (castling-deploy keygen): signature.json then covers every file of the package.")
@handle_errors
def package(export_dir: Path, out_file: Path, allow_failed: bool, sign_key: Path | None) -> None:
    """Pack an export folder into one archive with manifest.json and a README for the app developer."""
    from .. import api

    click.echo(str(api.package(export_dir, out_file, allow_failed=allow_failed, sign=sign_key)))


@cli.command("inspect")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@handle_errors
def inspect_cmd(file: Path, as_json: bool) -> None:
    """Print a package's manifest (its claims: `verify --trust` checks who made them)."""
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
@click.option("--trust", type=click.Path(path_type=Path),
              help="PEM public key of the signer you trust: the signature must be valid (exit 3 otherwise), and "
                   "only then are the accuracies recorded at export used as goals.")
@click.option("--tolerance", type=float, default=0.5, show_default=True,
              help="Your largest allowed top-1 drop (points); the package's own tolerance is never used.")
@click.option("--min-top1", type=float, help="Your lowest acceptable top-1 (%) for every model file.")
@device_options
@json_option
@handle_errors
def verify_cmd(file: Path, val: Path | None, limit: int | None, trust: Path | None, tolerance: float,
               min_top1: float | None, devices: tuple[str, ...], device_python: str | None,
               ssh_config: Path | None, benchmark_model: Path | None, as_json: bool) -> None:
    """Check a package's signature (--trust), every hash (exit 3 on tampering) and, with --val, each model file's
    accuracy against your goals — here, or with --device URI on the device itself (each device's fingerprint
    goes into the result; a device that misses a goal exits 3)."""
    from .. import api

    try:
        result = api.verify(file, val=val, limit=limit, tolerance=tolerance, trust=trust, min_top1=min_top1,
                            devices=devices, python=device_python, ssh_config=ssh_config)
    except ToleranceError as exc:
        result = getattr(exc, "result", None)
        if result is not None:
            emit_json(result) if as_json else click.echo(_format(result), err=True)
        raise
    emit_json(result) if as_json else click.echo(_format(result))


def _format(result: dict) -> str:
    from ..packaging import format_verify_result

    if "devices" not in result:
        return format_verify_result(result)
    out = []
    for d in result["devices"]:
        fp = d.get("fingerprint") or {}
        out.append(f"[{d['device']}] {fp.get('hostname', '?')} {fp.get('arch', '')} {fp.get('os_release', '')}")
        out.append(format_verify_result(d) if "integrity" in d else f"  error: {d.get('error')}")
    return "\n".join(out)


@cli.command("keygen")
@click.option("-o", "--out", "out_file", type=click.Path(path_type=Path), required=True,
              help="Private key file to create; the public key goes to OUT.pub.")
@handle_errors
def keygen(out_file: Path) -> None:
    """Create an Ed25519 key pair for `package --sign OUT` / `verify --trust OUT.pub` (set CASTLING_SIGN_PASSWORD
    to encrypt the private key). Never overwrites a file."""
    from ..packaging.signing import generate_keypair

    priv, pub, fp = generate_keypair(out_file)
    click.echo(f"private key {priv} (keep it secret)\npublic key  {pub} (give it to whoever verifies)\n"
               f"fingerprint {fp}")
