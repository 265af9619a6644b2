"""`castling-deploy build-engine`: build (and verify) a TensorRT engine from a `--target tensorrt` export."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import ToleranceError, UsageError
from .app import cli, emit_json, handle_errors, json_option, val_options


@cli.command("build-engine")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]),
              help="Default: as exported. Built from the export's typed ONNX of that precision (model.onnx, "
                   "model.fp16.onnx, model.int8.onnx): strongly typed on TensorRT 10.12+ and 11.x.")
@click.option("--batch", default="1,8,32", show_default=True, help="min,opt,max batch of the optimization profile.")
@val_options
@json_option
@handle_errors
def build_engine_cmd(export_dir: Path, precision: str | None, batch: str, val: Path | None, limit: int | None,
                     as_json: bool) -> None:
    """Build a TensorRT engine on this machine (the target device) from a `--target tensorrt` export.

    \b
    TensorRT 11.x and 10.12+: strongly typed (the ONNX decides every tensor's precision).
    TensorRT 10.0-10.11 (JetPack 6: 10.3): weak typing with the FP16/INT8 builder flags, recorded in the report."""
    from ..targets.tensorrt.build_engine import build_engine_for_export

    try:
        lo, opt, hi = (int(b) for b in batch.split(","))
    except ValueError:
        raise UsageError(f"--batch {batch!r}: expected three integers min,opt,max like 1,8,32") from None
    result = build_engine_for_export(export_dir, precision=precision, batch_range=(lo, opt, hi), val=val, limit=limit)
    if as_json:
        emit_json(result)
    else:
        click.echo(json.dumps(result, indent=2))
    if result.get("status") == "failed":
        raise ToleranceError("the engine failed its accuracy goal; see report.json")
