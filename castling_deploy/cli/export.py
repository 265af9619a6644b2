"""`castling-deploy export`: options -> the Python API -> the printed budget and the exit code.

Target-specific flags are generated from the target registry, so a new target's options appear here without
editing this file.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import click

from ..targets.registry import TARGETS
from .app import (DEMO_CALIB, DEMO_CHECKPOINT, DEMO_VAL, cli, emit_json, handle_errors, json_option,
                  tolerance_option, verbose_flag)

log = logging.getLogger(__name__)

TARGET_HELP = {
    "full_integer": "TFLite INT8 with no float tensor (NPU/DSP delegates): int8, and the class-token path 16x8 "
                    "(int16 activations, int8 weights; +3 dB logit SQNR on DeiT-T for +6 % CPU latency).",
    "io_dtype": "TFLite full-integer input/output type.",
    "strict_int8": "TFLite --full-integer with every activation int8, the class-token path too (delegates without "
                   "16-bit kernels: Edge TPU, Ethos-U).",
    "weights_only": "Core ML --int8 with int8 weights only (W8) instead of W8A8.",
    "quantizer": "TensorRT --int8 QDQ placement: ort (QuantRecipe on ONNX Runtime, measured better) or modelopt "
                 "(NVIDIA ModelOpt; pip install 'castling-deploy[modelopt]').",
    "weight_bits": "ONNX --int8 weight range: 8 (default; x86 with AVX-512 VNNI / AVX-VNNI, ARM with dot product) or "
                   "7 (x86 AVX2 without VNNI, whose ONNX Runtime int8 kernels can saturate with 8-bit weights).",
}
OPTION_CHOICES = {"io_dtype": ["float32", "int8"], "quantizer": ["ort", "modelopt"], "weight_bits": ["7", "8"]}


def target_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """One click option per option a registered target declares."""
    seen: set[str] = set()
    for spec in reversed(list(TARGETS.values())):
        for opt in reversed(spec.options):
            if opt.name in seen:
                continue
            seen.add(opt.name)
            owners = [s.name for s in TARGETS.values() if opt in s.options]
            help_text = TARGET_HELP.get(opt.name, "") + f" [{' / '.join(owners)}]"
            if isinstance(opt.default, bool):
                func = click.option(opt.flag, opt.name, is_flag=True, help=help_text)(func)
            else:
                choice = OPTION_CHOICES.get(opt.name)
                func = click.option(opt.flag, opt.name, type=click.Choice(choice) if choice else str,
                                    default=opt.default, show_default=True, help=help_text)(func)
    return func


@cli.command()
@click.argument("ckpt", required=False, type=click.Path(path_type=Path))
@click.option("--target", "targets", multiple=True, type=click.Choice([*TARGETS, "all"]), default=["onnx"],
              show_default=True, help="Runtime to export for (repeatable; 'all' = every target).")
@click.option("--arch", help="Architecture of a foreign (timm/DeiT) state dict.")
@click.option("--int8", is_flag=True, help="INT8 quantization calibrated on --calib.")
@click.option("--fp16", is_flag=True, help="FP16 variant (TensorRT typed fp16 ONNX, LiteRT fp16 weights, Core ML).")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration images (folder or .npz).")
@click.option("--calib-size", type=int, default=512, show_default=True, help="Calibration images to use.")
@click.option("--calib-method", type=click.Choice(["percentile", "minmax", "entropy", "mse"]), default="percentile",
              show_default=True, help="How activation ranges are chosen (percentile = 99.99th, measured best).")
@click.option("--val", type=click.Path(path_type=Path),
              help="Validation images (class subfolders give labels) the artifacts are verified on.")
@click.option("--limit", type=int, help="Verify on at most N images of --val (seeded sample).")
@tolerance_option("Largest allowed top-1 drop in points vs the folded float model.")
@click.option("--auto-fallback", is_flag=True, help="INT8: keep the most sensitive blocks in float until the goal holds.")
@click.option("--sensitivity", is_flag=True, help="INT8: print and record a per-block sensitivity sweep.")
@target_options
@click.option("--imgsz", type=int, help="Export resolution (position embeddings resampled).")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (17 uses the legacy exporter).")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("exports"), show_default=True,
              help="Output folder; results go to OUT/<model>/<target>/.")
@click.option("--force", is_flag=True, help="Export even if folding the softmax branch changes predictions.")
@click.option("--accept-accuracy-only", is_flag=True,
              help="Accept a fold that keeps accuracy and agreement but changes the logits (recorded in the report).")
@click.option("--no-migrate", is_flag=True,
              help="INT8: do not fold the channel-scale migration for LayerNorm outlier channels into the model.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling images.")
@json_option
@handle_errors
def export(ckpt: Path | None, targets: tuple[str, ...], as_json: bool, **kw: Any) -> None:
    """Export CKPT (default: the shipped demo) for one or more runtimes and verify every artifact.

    \b
    Each target folder OUT/<model>/<target>/ holds the artifact(s) and report.json with the error budget
    (fold -> export -> fp16 -> int8), written atomically. A failed goal exits 3 with the report marked failed.
    """
    from .. import api
    from ..errors import UsageError

    if ckpt is None:
        if not DEMO_CHECKPOINT.exists():
            raise UsageError(f"the demo checkpoint {DEMO_CHECKPOINT} is missing; pass a CKPT")
        log.info("no CKPT given: using the shipped demo %s", DEMO_CHECKPOINT.name)
        ckpt = DEMO_CHECKPOINT
        kw["calib"] = kw["calib"] or DEMO_CALIB
        kw["val"] = kw["val"] or DEMO_VAL
    kw["migrate"] = not kw.pop("no_migrate")
    result = api.export(ckpt, targets=targets, verbose=verbose_flag(), **kw)
    for t in result.targets:
        click.echo(f"{t.target}: {t.report.status} -> {t.folder}", err=True)
    if as_json:
        emit_json(result.to_dict())
    err = result.error()
    if err is not None:
        raise err
