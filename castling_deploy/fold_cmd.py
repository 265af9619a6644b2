"""`castling-deploy fold`: measure and fold a checkpoint, write the deploy-form checkpoint."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import click

from .data import load_image_set, random_inputs
from .errors import UsageError
from .fold import FoldRefused, fold_model, format_fold_report
from .models.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)
RANDOM_FOLD_INPUTS = 64


def run_fold(ckpt_path: Path, out: Path, *, arch: str | None, calib: Path | None, limit: int | None,
             tolerance: float, force: bool, as_json: bool, emit_json: Callable[[Any], None]) -> None:
    from .export_cmd import check_tolerance

    check_tolerance(tolerance)
    if limit is not None and (limit < 1 or calib is None):
        raise UsageError("--limit N (N >= 1) samples the --calib images; pass --calib DIR too")
    if out.exists() and ckpt_path.exists() and out.resolve() == ckpt_path.resolve():
        raise UsageError(f"-o {out} is the input checkpoint; write the folded model to a new file")
    if out.suffix not in (".pt", ".pth", ".safetensors"):
        raise UsageError(f"-o {out}: the folded checkpoint must end in .pt or .safetensors")
    if out.exists() and out.is_dir():
        raise UsageError(f"-o {out}: is a directory; give a file name like {out}/model_deploy.pt")
    ckpt = load_checkpoint(ckpt_path, arch=arch)
    data = (load_image_set(calib, ckpt.preprocess, ckpt.labels, limit=limit, num_classes=ckpt.config.num_classes)
            if calib
            else random_inputs(RANDOM_FOLD_INPUTS, ckpt.config.img_size))
    if calib is None:
        log.info("no --calib: measuring the fold on %d seeded random inputs (accuracy not measured)", len(data))
    model = ckpt.build_model()
    try:
        folded, report = fold_model(model, data, tolerance_points=tolerance, force=force)
    except FoldRefused as exc:
        click.echo(format_fold_report(exc.report), err=True)
        if as_json:
            emit_json({"status": "refused", "written": None, "fold": exc.report.to_dict()})
        raise
    from .output import ensure_writable_dir

    ensure_writable_dir(out.resolve().parent)
    extra = dict(ckpt.extra)
    extra["fold"] = {"from": ckpt.path, "from_sha256": ckpt.sha256, "forced": report.forced,
                     "stage": report.stage.to_dict() if report.stage else None}
    save_checkpoint(out, folded, ckpt.arch, ckpt.preprocess, ckpt.labels, extra=_jsonable(extra))
    click.echo(format_fold_report(report), err=True)
    click.echo(f"wrote deploy-form checkpoint {out}", err=True)
    if as_json:
        emit_json({"status": "forced" if report.forced and not report.passed else "folded", "written": str(out),
                   "fold": report.to_dict()})


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    from .output import to_jsonable

    return to_jsonable(d)
