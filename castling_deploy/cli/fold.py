"""`castling-deploy fold`: measure and fold a checkpoint, write the deploy-form checkpoint."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from ..errors import UsageError
from .app import cli, emit_json, handle_errors, json_option, tolerance_option

log = logging.getLogger(__name__)
RANDOM_FOLD_INPUTS = 64


@cli.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Deploy-form checkpoint to write (.pt or .safetensors).")
@click.option("--arch", help="Architecture of a foreign state dict.")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Images to measure the fold on (labels give accuracy); seeded random inputs otherwise.")
@click.option("--limit", type=int, help="Use at most N images of --calib.")
@tolerance_option("Largest allowed top-1 drop in points caused by the fold.")
@click.option("--force", is_flag=True, help="Fold even if the softmax branch still matters; the drop is recorded.")
@click.option("--accept-accuracy-only", is_flag=True,
              help="Accept a fold that keeps accuracy and agreement but changes the logits (recorded).")
@json_option
@handle_errors
def fold(ckpt: Path, out: Path, arch: str | None, calib: Path | None, limit: int | None, tolerance: float,
         force: bool, accept_accuracy_only: bool, as_json: bool) -> None:
    """Fold a training-form checkpoint to deploy form (drop the masked softmax branch), measuring its effect.

    Refuses (exit 3, with a per-block table) when the branch still changes predictions; --force overrides.
    """
    from ..api import check_tolerance
    from ..data import load_image_set, random_inputs
    from ..fold import FoldRefused, fold_model, format_fold_report
    from ..models.checkpoint import load_checkpoint, save_checkpoint
    from ..output import ensure_writable_dir, to_jsonable

    check_tolerance(tolerance)
    if force and accept_accuracy_only:
        raise UsageError("--accept-accuracy-only and --force both override the fold gate; pass one (--force also "
                         "folds when accuracy drops)")
    if limit is not None and (limit < 1 or calib is None):
        raise UsageError("--limit N (N >= 1) samples the --calib images; pass --calib DIR too")
    if out.exists() and ckpt.exists() and out.resolve() == ckpt.resolve():
        raise UsageError(f"-o {out} is the input checkpoint; write the folded model to a new file")
    if out.suffix not in (".pt", ".pth", ".safetensors"):
        raise UsageError(f"-o {out}: the folded checkpoint must end in .pt or .safetensors")
    if out.exists() and out.is_dir():
        raise UsageError(f"-o {out}: is a directory; give a file name like {out}/model_deploy.pt")
    ck = load_checkpoint(ckpt, arch=arch)
    data = (load_image_set(calib, ck.preprocess, ck.labels, limit=limit, num_classes=ck.config.num_classes)
            if calib else random_inputs(RANDOM_FOLD_INPUTS, ck.config.img_size))
    if calib is None:
        log.info("no --calib: measuring the fold on %d seeded random inputs (accuracy not measured)", len(data))
    try:
        folded, report = fold_model(ck.build_model(), data, tolerance_points=tolerance, force=force,
                                    accept_accuracy_only=accept_accuracy_only)
    except FoldRefused as exc:
        click.echo(format_fold_report(exc.report), err=True)
        if as_json:
            emit_json({"status": "refused", "written": None, "fold": exc.report.to_dict()})
        raise
    ensure_writable_dir(out.resolve().parent)
    extra: dict[str, Any] = dict(ck.extra)
    extra["fold"] = {"from": ck.path, "from_sha256": ck.sha256, "forced": report.forced,
                     "accepted_on": report.accepted_on, "stage": report.stage.to_dict() if report.stage else None}
    save_checkpoint(out, folded, ck.arch, ck.preprocess, ck.labels, extra=to_jsonable(extra))
    click.echo(format_fold_report(report), err=True)
    click.echo(f"wrote deploy-form checkpoint {out}", err=True)
    if as_json:
        emit_json({"status": "forced" if report.forced and not report.passed else "folded", "written": str(out),
                   "fold": report.to_dict()})
