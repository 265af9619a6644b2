"""`list-models` and `info`: what the registry holds and what a checkpoint is."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import UsageError
from .app import cli, emit_json, handle_errors, json_option


@cli.command("list-models")
@click.argument("pattern", default="*")
@click.option("--macs", "with_macs", is_flag=True,
              help="Also count params and MACs (deploy form and softmax baseline) with torch.utils.flop_counter.")
@json_option
@handle_errors
def list_models_cmd(pattern: str, with_macs: bool, as_json: bool) -> None:
    """List model variants, optionally filtered by a wildcard PATTERN (e.g. 'castling_deit*')."""
    from ..models.registry import describe, get_config, list_models

    names = list_models(pattern)
    if not names:
        raise UsageError(f"no model matches {pattern!r}; try `castling-deploy list-models`")
    rows = [{"name": n, "description": describe(n), "config": get_config(n).to_dict()} for n in names]
    if with_macs:
        from ..models.macs import count_macs, count_params
        from ..models.registry import create_model

        for row in rows:
            deploy = create_model(row["name"], form="deploy")
            soft = create_model(row["name"], attention="softmax")
            size = row["config"]["img_size"]
            row.update(params=count_params(deploy), macs_deploy=count_macs(deploy, size),
                       macs_softmax_baseline=count_macs(soft, size))
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        extra = ""
        if with_macs:
            extra = (f"  {row['params'] / 1e6:6.2f}M params  {row['macs_deploy'] / 1e9:6.3f} GMACs "
                     f"(softmax {row['macs_softmax_baseline'] / 1e9:.3f})")
        click.echo(f"{row['name']:<22}{extra}  {row['description']}")


@cli.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--arch", help="Architecture of a foreign (timm/DeiT) state dict, e.g. castling_deit_tiny.")
@click.option("--imgsz", type=int, help="Resolution to report at (position embeddings resampled).")
@json_option
@handle_errors
def info(ckpt: Path, arch: str | None, imgsz: int | None, as_json: bool) -> None:
    """Show a checkpoint's architecture, params, MACs, resolution, form and softmax-branch status."""
    from ..inspect_ckpt import checkpoint_info, format_info

    data = checkpoint_info(ckpt, arch=arch, img_size=imgsz)
    if as_json:
        emit_json(data)
    else:
        click.echo(format_info(data))
