"""`castling-deploy build-engine`: build (and verify) a TensorRT engine from a `--target tensorrt` export."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..errors import ToleranceError, UsageError
from .app import cli, emit_json, handle_errors, json_option, val_options


@cli.command("build-engine")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]),
              help="Default: as exported. Built from the export's typed ONNX of that precision (model.onnx, "
                   "model.fp16.onnx, model.int8.onnx): strongly typed on TensorRT 10.12+ and 11.x.")
@click.option("--batch", default="1,8,32", show_default=True, help="min,opt,max batch of the optimization profile.")
@click.option("--device", metavar="URI",
              help="Build on this device instead (ssh://[user@]host[:port] or local): the ONNX is pushed to its "
                   "artifact cache ($CASTLING_DEPLOY_DEVICE_CACHE, default ~/.cache/castling-deploy/artifacts there), "
                   "its trtexec builds in a temp folder that is removed afterwards, and the engine, timing.cache and "
                   "build.log come back here; with --val the engine is verified on the device first.")
@click.option("--device-python", help="Interpreter on the SSH device, used for its fingerprint and for --val "
                                      "(default: python3; --val needs tensorrt and numpy there).")
@click.option("--ssh-config", type=click.Path(path_type=Path),
              help="OpenSSH client config passed as `ssh -F` (default: your ~/.ssh/config).")
@click.option("--trtexec", metavar="PATH", help="trtexec on the device (default: PATH, then "
                                                "/usr/src/tensorrt/bin/trtexec as JetPack installs it).")
@val_options
@json_option
@handle_errors
def build_engine_cmd(export_dir: Path, precision: str | None, batch: str, device: str | None,
                     device_python: str | None, ssh_config: Path | None, trtexec: str | None, val: Path | None,
                     limit: int | None, as_json: bool) -> None:
    """Build a TensorRT engine from a `--target tensorrt` export, here or on a device (--device).

    \b
    TensorRT 11.x and 10.12+: strongly typed (the ONNX decides every tensor's precision).
    TensorRT 10.0-10.11 (JetPack 6: 10.3): weak typing with the FP16/INT8 builder flags, recorded in the report.
    The engine's metadata (model.engine.json) records the GPU, compute capability and TensorRT version it was
    built for; profile/verify --device refuse it on a device where it cannot run."""
    from ..targets.tensorrt.build_engine import build_engine_for_export

    try:
        lo, opt, hi = (int(b) for b in batch.split(","))
    except ValueError:
        raise UsageError(f"--batch {batch!r}: expected three integers min,opt,max like 1,8,32") from None
    if not device and (device_python or ssh_config or trtexec):
        raise UsageError("--device-python, --ssh-config and --trtexec apply to a build on a device; add --device URI")
    if device:
        result = _on_device(export_dir, device, device_python, ssh_config, trtexec, precision=precision,
                            batch_range=(lo, opt, hi), val=val, limit=limit)
    else:
        result = build_engine_for_export(export_dir, precision=precision, batch_range=(lo, opt, hi), val=val,
                                         limit=limit)
    if as_json:
        emit_json(result)
    else:
        click.echo(json.dumps(result, indent=2))
    if result.get("status") == "failed":
        raise ToleranceError("the engine failed its accuracy goal; see report.json")


def _on_device(export_dir: Path, uri: str, python: str | None, ssh_config: Path | None, trtexec: str | None,
               **kw: Any) -> dict[str, Any]:
    from ..devices import parse_device
    from ..targets.tensorrt.remote_build import build_engine_on_device

    device = parse_device(uri, python=python, ssh_config=ssh_config)
    if device.kind == "adb":
        raise UsageError(f"{uri}: TensorRT engines are built on Jetson / NVIDIA GPU machines; use ssh://HOST")
    try:
        return build_engine_on_device(export_dir, device, trtexec=trtexec, **kw)
    finally:
        device.close()
