"""The `castling-deploy` command line: a thin click group over the stage modules.

Exit codes (DESIGN.md): 0 ok; 2 usage / bad input; 3 a tolerance goal failed (report still written);
4 an optional runtime missing; 1 anything else. Logs go to stderr; --json prints one document on stdout.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .errors import CastlingError, ToleranceError, UsageError

log = logging.getLogger("castling_deploy")
TARGET_CHOICES = ["onnx", "tensorrt", "coreml", "tflite", "all"]


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("castling_deploy")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def _emit_json(data: Any) -> None:
    from .output import to_jsonable

    click.echo(json.dumps(to_jsonable(data), indent=2))


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Map our errors to exit codes with one line on stderr; no traceback unless CASTLING_DEBUG=1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CastlingError as exc:
            if os.environ.get("CASTLING_DEBUG"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing half-written was left behind", err=True)
            sys.exit(130)
        except Exception as exc:  # a bug or an unforeseen failure: still one line, exit 1
            if os.environ.get("CASTLING_DEBUG"):
                raise
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            click.echo(f"error: {type(exc).__name__}: {first} (set CASTLING_DEBUG=1 for a traceback)", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="castling-deploy")
@click.option("-v", "--verbose", is_flag=True, help="More log output on stderr, including the converters' own.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Fold, export, quantize and verify Castling-ViT checkpoints for TensorRT, Core ML and LiteRT.

    \b
    Typical use:
      castling-deploy export                     # the shipped demo, ONNX, verified on its val set
      castling-deploy export CKPT --target tensorrt --int8 --calib DIR --val DIR
      castling-deploy profile exports/<model>/onnx/model.onnx
      castling-deploy package exports/<model> -o model.zip
    \b
    Exit codes: 0 ok, 2 bad input, 3 a tolerance goal failed (report written, marked failed),
    4 an optional runtime is missing, 1 anything else.
    """
    _setup_logging(verbose)
    ctx.obj = {"verbose": verbose}


@cli.command("list-models")
@click.argument("pattern", default="*")
@click.option("--macs", "with_macs", is_flag=True,
              help="Also count params and MACs (deploy form and softmax baseline) with torch.utils.flop_counter.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@handle_errors
def list_models_cmd(pattern: str, with_macs: bool, as_json: bool) -> None:
    """List model variants, optionally filtered by a wildcard PATTERN (e.g. 'castling_deit*')."""
    from .models.registry import describe, get_config, list_models

    names = list_models(pattern)
    if not names:
        raise UsageError(f"no model matches {pattern!r}; try `castling-deploy list-models`")
    rows = [{"name": n, "description": describe(n), "config": get_config(n).to_dict()} for n in names]
    if with_macs:
        from .models.macs import count_macs, count_params
        from .models.registry import create_model

        for row in rows:
            deploy = create_model(row["name"], form="deploy")
            soft = create_model(row["name"], attention="softmax")
            size = row["config"]["img_size"]
            row.update(params=count_params(deploy), macs_deploy=count_macs(deploy, size),
                       macs_softmax_baseline=count_macs(soft, size))
    if as_json:
        _emit_json(rows)
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
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@handle_errors
def info(ckpt: Path, arch: str | None, imgsz: int | None, as_json: bool) -> None:
    """Show a checkpoint's architecture, params, MACs, resolution, form and softmax-branch status."""
    from .inspect_ckpt import checkpoint_info, format_info

    data = checkpoint_info(ckpt, arch=arch, img_size=imgsz)
    if as_json:
        _emit_json(data)
    else:
        click.echo(format_info(data))


@cli.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Deploy-form checkpoint to write (.pt or .safetensors).")
@click.option("--arch", help="Architecture of a foreign state dict.")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Images to measure the fold on (labels give accuracy); seeded random inputs otherwise.")
@click.option("--limit", type=int, help="Use at most N images of --calib.")
@click.option("--tolerance", type=float, default=0.5, show_default=True,
              help="Largest allowed top-1 drop in points caused by the fold.")
@click.option("--force", is_flag=True, help="Fold even if the softmax branch still matters; the drop is recorded.")
@click.option("--json", "as_json", is_flag=True, help="Print the fold report as JSON on stdout.")
@handle_errors
def fold(ckpt: Path, out: Path, arch: str | None, calib: Path | None, limit: int | None, tolerance: float,
         force: bool, as_json: bool) -> None:
    """Fold a training-form checkpoint to deploy form (drop the masked softmax branch), measuring its effect.

    Refuses (exit 3, with a per-block table) when the branch still changes predictions; --force overrides.
    """
    from .fold_cmd import run_fold

    run_fold(ckpt, out, arch=arch, calib=calib, limit=limit, tolerance=tolerance, force=force, as_json=as_json,
             emit_json=_emit_json)


@cli.command()
@click.argument("ckpt", required=False, type=click.Path(path_type=Path))
@click.option("--target", "targets", multiple=True, type=click.Choice(TARGET_CHOICES), default=["onnx"],
              show_default=True, help="Runtime to export for (repeatable; 'all' = every target).")
@click.option("--arch", help="Architecture of a foreign (timm/DeiT) state dict.")
@click.option("--int8", is_flag=True, help="INT8 quantization calibrated on --calib.")
@click.option("--fp16", is_flag=True, help="FP16 variant (TensorRT engine flag, LiteRT fp16 weights, Core ML fp16).")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration images (folder or .npz).")
@click.option("--calib-size", type=int, default=512, show_default=True, help="Calibration images to use.")
@click.option("--calib-method", type=click.Choice(["percentile", "minmax", "entropy", "mse"]), default="percentile",
              show_default=True, help="How activation ranges are chosen (percentile = 99.99th, measured best).")
@click.option("--val", type=click.Path(path_type=Path),
              help="Validation images (class subfolders give labels) the artifacts are verified on.")
@click.option("--limit", type=int, help="Verify on at most N images of --val (seeded sample).")
@click.option("--tolerance", type=float, default=0.5, show_default=True,
              help="Largest allowed top-1 drop in points vs the folded float model.")
@click.option("--auto-fallback", is_flag=True, help="INT8: keep the most sensitive blocks in float until the goal holds.")
@click.option("--sensitivity", is_flag=True, help="INT8: print and record a per-block sensitivity sweep.")
@click.option("--full-integer", is_flag=True, help="TFLite INT8 with every activation int8 (NPU/DSP delegates).")
@click.option("--io-dtype", type=click.Choice(["float32", "int8"]), default="float32", show_default=True,
              help="TFLite full-integer input/output type.")
@click.option("--weights-only", is_flag=True, help="Core ML --int8 with int8 weights only (W8) instead of W8A8.")
@click.option("--imgsz", type=int, help="Export resolution (position embeddings resampled).")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (17 uses the legacy exporter).")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("exports"), show_default=True,
              help="Output folder; results go to OUT/<model>/<target>/.")
@click.option("--force", is_flag=True, help="Export even if folding the softmax branch changes predictions.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling images.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (the reports) on stdout.")
@handle_errors
def export(ckpt: Path | None, targets: tuple[str, ...], **kw: Any) -> None:
    """Export CKPT (default: the shipped demo) for one or more runtimes and verify every artifact.

    \b
    Each target folder OUT/<model>/<target>/ holds the artifact(s) and report.json with the error budget
    (fold -> export -> fp16 -> int8), written atomically. A failed goal exits 3 with the report marked failed.
    """
    from .export_cmd import run_export_cmd

    verbose = bool((click.get_current_context().find_root().obj or {}).get("verbose"))
    run_export_cmd(ckpt, targets, emit_json=_emit_json, verbose=verbose, **kw)


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--runs", type=int, default=100, show_default=True, help="Timed runs.")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed warm-up runs.")
@click.option("--threads", type=int, help="Intra-op threads (default: the runtime's).")
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size.")
@click.option("--chart", type=click.Path(path_type=Path), help="PNG latency chart (default: beside the artifact).")
@click.option("--no-per-op", is_flag=True, help="Skip the per-op breakdown (ORT).")
@click.option("--sweep", help="Comma-separated resolutions: ARTIFACT is then a checkpoint re-exported at each.")
@click.option("--baseline", type=click.Choice(["softmax"]), help="With --sweep: also the softmax-attention baseline.")
@click.option("--arch", help="With --sweep: architecture of a foreign checkpoint, or a registry name with no file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@handle_errors
def profile(artifact: Path, **kw: Any) -> None:
    """Latency of an exported ARTIFACT on its runtime: load time, p50/p90/p99, throughput, memory, per-op."""
    from .profile_cmd import run_profile_cmd

    run_profile_cmd(artifact, emit_json=_emit_json, **kw)


@cli.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_file", type=click.Path(path_type=Path), required=True,
              help="Archive to write (.zip, or .tar.gz).")
@click.option("--allow-failed", is_flag=True, help="Package even reports marked failed.")
@handle_errors
def package(export_dir: Path, out_file: Path, allow_failed: bool) -> None:
    """Pack an export folder into one archive with manifest.json and a README for the app developer."""
    from .package import create_package

    path = create_package(export_dir, out_file, allow_failed=allow_failed)
    click.echo(str(path))


@cli.command("inspect")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@handle_errors
def inspect_cmd(file: Path, as_json: bool) -> None:
    """Print a package's manifest."""
    from .package import format_manifest, inspect_package

    manifest = inspect_package(file)
    if as_json:
        _emit_json(manifest)
    else:
        click.echo(format_manifest(manifest))


@cli.command("verify")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--val", type=click.Path(path_type=Path), help="Re-run the accuracy check on these images.")
@click.option("--limit", type=int, help="At most N val images.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def verify_cmd(file: Path, val: Path | None, limit: int | None, as_json: bool) -> None:
    """Check every hash in a package (exit 3 on tampering) and optionally re-run accuracy on --val."""
    from .package_cmd import run_verify_package

    run_verify_package(file, val, limit, as_json, emit_json=_emit_json)


@cli.command("build-engine")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "best"]), help="Default: as exported.")
@click.option("--batch", default="1,8,32", show_default=True, help="min,opt,max batch of the optimization profile.")
@click.option("--val", type=click.Path(path_type=Path), help="Verify the engine on these images.")
@click.option("--limit", type=int, help="At most N val images.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def build_engine_cmd(export_dir: Path, precision: str | None, batch: str, val: Path | None, limit: int | None,
                     as_json: bool) -> None:
    """Build a TensorRT engine on this machine (the target device) from a `--target tensorrt` export."""
    from .targets.tensorrt_target import build_engine_for_export

    try:
        lo, opt, hi = (int(b) for b in batch.split(","))
    except ValueError:
        raise UsageError(f"--batch {batch!r}: expected three integers min,opt,max like 1,8,32") from None
    result = build_engine_for_export(export_dir, precision=precision, batch_range=(lo, opt, hi), val=val, limit=limit)
    if as_json:
        _emit_json(result)
    else:
        click.echo(json.dumps(result, indent=2))
    if result.get("status") == "failed":
        raise ToleranceError("the engine failed its accuracy goal; see report.json")


def main() -> None:
    cli(prog_name="castling-deploy")


if __name__ == "__main__":
    main()
