"""`castling-deploy export`: option checks, the pipeline, the printed budget and the exit code."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import click

from .errors import UsageError
from .pipeline import TARGETS, ExportOptions, failure_error, run_export

log = logging.getLogger(__name__)


def check_tolerance(points: float) -> None:
    if not (math.isfinite(points) and 0 <= points <= 100):
        raise UsageError(f"--tolerance {points}: must be a number of top-1 points between 0 and 100")


def check_options(targets: list[str], o: ExportOptions) -> None:
    """Reject combinations that cannot mean anything, with the fix in the message (exit 2)."""
    if o.full_integer and (not o.int8 or "tflite" not in targets):
        raise UsageError("--full-integer needs --int8 and --target tflite")
    if o.io_dtype != "float32" and not o.full_integer:
        raise UsageError("--io-dtype int8 applies only to --target tflite --int8 --full-integer")
    if o.weights_only and (not o.int8 or "coreml" not in targets):
        raise UsageError("--weights-only needs --int8 and --target coreml")
    check_tolerance(o.tolerance)
    if o.val_limit is not None and o.val_limit < 1:
        raise UsageError(f"--limit {o.val_limit}: must be >= 1")
    if not (o.opset == 17 or 18 <= o.opset <= 21):
        raise UsageError(f"--opset {o.opset} is not supported; use 17 (legacy exporter) or 18-21 (dynamo exporter)")
    if o.calib_size < 1:
        raise UsageError(f"--calib-size {o.calib_size}: must be >= 1")
    if (o.auto_fallback or o.sensitivity) and not o.int8:
        raise UsageError("--auto-fallback / --sensitivity need --int8")


def run_export_cmd(ckpt: Path | None, targets: tuple[str, ...], *, emit_json: Callable[[Any], None],
                   as_json: bool, limit: int | None, **kw: Any) -> None:
    chosen = list(TARGETS) if "all" in targets else list(dict.fromkeys(targets))
    opts = ExportOptions(targets=chosen, val_limit=limit, **kw)
    check_options(chosen, opts)
    reports = run_export(ckpt, opts)
    for r in reports:
        click.echo(f"{r['target']}: {r['status']} -> {r['folder']}", err=True)
    if as_json:
        emit_json({"status": "failed" if any(r["status"] != "passed" for r in reports) else "passed",
                   "reports": reports})
    err = failure_error(reports)
    if err is not None:
        raise err
