"""The export pipeline: load -> fold (gated) -> per target: build, verify, report, rename into place.

Targets share one ``ExportSession`` (targets/base.py) so the reference logits are computed once; each target
builds into a staging folder, and its ``report.json`` (report.py) is written before the folder is renamed into
place. Which targets exist, and what each accepts, is the registry's business (targets/registry.py).
"""
from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

from . import __version__
from .data import ImageSet, check_overlap, load_image_set, random_inputs
from .errors import ToleranceError, UsageError
from .fold import FoldRefused, FoldReport, accuracy_kept, fold_model, format_fold_report, predict
from .models.checkpoint import Checkpoint, load_checkpoint
from .output import (ensure_writable_dir, interrupts_clean_up, remove_stale_temp_dirs, remove_temp_dir,
                     staged_dir)
from .quiet import quiet_native_output
from .report import Report
from .reference import REFERENCE_FILE, Reference, reference_inputs
from .targets.base import ExportOptions, ExportSession, TargetOutcome, reference_key
from .targets.registry import BASE_PACKAGES, TARGETS, get_target
from .budget import FLOAT_ATOL, StageResult, check_stage, format_budget

log = logging.getLogger(__name__)

RANDOM_VAL_COUNT = 64
HOLDOUT_MIN, HOLDOUT_MAX = 8, 256


def runtime_versions(packages: tuple[str, ...] | None = None) -> dict[str, str]:
    """Versions of the packages that made an artifact (default: every target's), for the report."""
    import importlib.metadata as md

    if packages is None:
        packages = tuple(dict.fromkeys(p for spec in TARGETS.values() for p in spec.packages))
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in dict.fromkeys(BASE_PACKAGES + packages):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def artifact_metadata(ckpt: Checkpoint, cfg_dict: dict[str, Any]) -> dict[str, str]:
    """Strings embedded in every artifact so an app can use it without our code."""
    return {
        "castling_deploy.version": __version__,
        "architecture": ckpt.arch,
        "config": json.dumps(cfg_dict),
        "preprocess": json.dumps(ckpt.preprocess),
        "labels": json.dumps(ckpt.labels),
        "checkpoint_sha256": ckpt.sha256,
        "input": "images: float32 NCHW, RGB, normalized with preprocess.mean/std",
        "output": "logits: float32 (N, classes)",
    }


def _check_sets(calib: Path | None, val: Path | None) -> None:
    if calib is not None and val is not None and Path(calib).resolve() == Path(val).resolve():
        raise UsageError(
            f"--calib and --val are the same set ({calib}); calibration must not see the images used to measure "
            "accuracy — pass a separate validation folder"
        )


def _load_sets(ckpt: Checkpoint, opts: ExportOptions) -> tuple[ImageSet, ImageSet | None]:
    """The val set (or a held-out part of --calib, or seeded random inputs) and the calibration set."""
    calib_path, val_path = opts.calib, opts.val
    _check_sets(calib_path, val_path)
    if opts.int8 and calib_path is None:
        raise UsageError("--int8 needs calibration images: pass --calib DIR (a folder of images or an .npz)")
    if opts.val_limit is not None and val_path is None:
        raise UsageError("--limit samples the --val set; pass --val DIR too")
    labels, classes = ckpt.labels, ckpt.config.num_classes
    val = (load_image_set(val_path, ckpt.preprocess, labels, limit=opts.val_limit, seed=opts.seed,
                          num_classes=classes) if val_path else None)
    calib = None
    if calib_path is not None:
        calib = load_image_set(calib_path, ckpt.preprocess, labels, limit=opts.calib_size, seed=opts.seed,
                               num_classes=classes)
        if val is not None and calib.digest == val.digest:
            raise UsageError(f"--calib {calib_path} holds exactly the images of --val {val_path}; "
                             "calibrate on a different set")
        if val is not None:
            check_overlap(calib, val)  # warns above 10% shared images, DataError (exit 2) above 50%
    if val is None and calib is not None and len(calib) >= 2 * HOLDOUT_MIN:
        # Never verify on the images that calibrated: hold a seeded part of --calib out of calibration.
        calib, val = calib.split(min(len(calib) // 5, HOLDOUT_MAX), seed=opts.seed)
        log.warning("no --val set: verifying on %d images held out of --calib (they are not used to calibrate)",
                    len(val))
    elif val is None:
        val = random_inputs(RANDOM_VAL_COUNT, ckpt.config.img_size, opts.seed)
        log.warning("no --val set: verifying on %s (no labels, so top-1 agreement stands in for accuracy)",
                    val.source)
    return val, calib


def prepare_session(ckpt_path: Path, opts: ExportOptions) -> ExportSession:
    """Load, resolve data sets, fold with its gate, and compute the reference logits."""
    ckpt = load_checkpoint(ckpt_path, arch=opts.arch, img_size=opts.imgsz)
    if ckpt.config.attention != "castling":
        log.warning("%s has softmax attention (no Castling dconv weights): exported as a plain DeiT, nothing to fold",
                    ckpt.path)
    val, calib = _load_sets(ckpt, opts)
    log.info("folding %s (%s) on %d images of %s", ckpt.arch, ckpt.config.form, len(val), val.source)
    model = ckpt.build_model()
    try:
        folded, fold_report = fold_model(model, val, tolerance_points=opts.tolerance, force=opts.force,
                                         accept_accuracy_only=opts.accept_accuracy_only)
    except FoldRefused as exc:
        exc.context = (ckpt, val, calib)
        raise
    _note_earlier_fold(fold_report, ckpt.extra.get("fold"))
    ref = predict(folded, val.images)
    folded = _migrate(folded, fold_report, opts, val, calib, ref)
    meta = artifact_metadata(ckpt, folded.cfg.to_dict())
    sess = ExportSession(ckpt, opts, folded, fold_report, val, ref, calib, meta)
    sess.reference_inputs = reference_inputs(folded.cfg.img_size)
    sess.reference_logits = predict(folded, sess.reference_inputs)
    return sess


def _note_earlier_fold(fold_report: FoldReport, earlier: dict[str, Any] | None) -> None:
    fold_report.earlier = earlier
    if earlier and earlier.get("forced"):
        fold_report.forced = True
        fold_report.notes.append("this checkpoint was folded earlier with --force; that fold's measured effect is "
                                 "the first row of the error budget")
    if earlier and earlier.get("accepted_on") == "accuracy only":
        fold_report.accepted_on = "accuracy only (earlier `fold`)"
        fold_report.notes.append("this checkpoint was folded earlier with --accept-accuracy-only: its logits differ "
                                 "from the trained model's (first row of the error budget)")


def _migrate(folded: Any, fold_report: FoldReport, opts: ExportOptions, val: ImageSet, calib: ImageSet | None,
             ref: Any) -> Any:
    """With --int8: measure the per-channel range spread of every int8 input on the calibration set and fold the
    channel-scale migration (quantize/migrate.py) into the float model; its exactness is its own budget stage.
    Every target then exports the migrated model; the reference logits stay those of the folded model."""
    if not opts.int8 or calib is None:
        return folded
    import torch

    from .quantize.migrate import EXACT_ATOL, migrate_model
    from .quantize.outliers import format_spread_table

    # Core ML W8 (--weights-only) keeps activations float: nothing to gain from flattening them.
    weights_only = opts.targets == ["coreml"] and bool(opts.target_options.get("weights_only"))
    mode = "auto" if opts.migrate and not weights_only else "off"
    migrated, mig = migrate_model(folded, calib.images, mode=mode, seed=opts.seed,
                                  why_off="not used: int8 weights only (--weights-only), activations stay float"
                                  if weights_only else None)
    fold_report.migration = mig
    log.info("channel-scale migration: %s", mig.reason)
    if opts.sensitivity:
        log.info("%s", format_spread_table(mig.channel_spread))
    for line in [] if weights_only else mig.warnings():
        log.warning("%s", line)
    if mig.applied:
        fold_report.migration_stage = check_stage(
            "migrate", "folded torch fp32", "channel-scale migrated torch fp32", f"torch {torch.__version__} CPU",
            ref, predict(migrated, val.images), val.labels, tolerance_points=opts.tolerance, atol=EXACT_ATOL)
    return migrated


def new_report(ckpt: Checkpoint, opts: ExportOptions, target: str, fold: FoldReport, val: ImageSet,
               calib: ImageSet | None) -> Report:
    """A report with everything known before the target is built (no stages, no artifacts yet)."""
    cfg = ckpt.config.with_(form="deploy") if ckpt.config.attention == "castling" else ckpt.config
    return Report(
        model_name=ckpt.name, target=target,
        checkpoint={"path": ckpt.path, "sha256": ckpt.sha256, "arch": ckpt.arch, "config": cfg.to_dict(),
                    "form": ckpt.config.form, "attention": ckpt.config.attention,
                    "source_format": ckpt.source_format},
        options=opts.to_dict(), preprocess=ckpt.preprocess, labels=ckpt.labels,
        input={"name": "images", "shape": ["batch", cfg.in_chans, cfg.img_size, cfg.img_size],
               "dtype": "float32", "layout": "NCHW"},
        fold=fold.to_dict(), data={"val": val.describe(), "calib": calib.describe() if calib else None},
        goals={"tolerance_points": opts.tolerance, "float_atol": FLOAT_ATOL},
        runtime_versions=runtime_versions(get_target(target).packages),
        tool={"name": "castling-deploy", "version": __version__},
    )


def _add_fold_stages(report: Report, fold: FoldReport) -> None:
    earlier = fold.earlier
    if earlier and earlier.get("stage"):
        e = earlier["stage"]
        report.add_stage(StageResult(e["stage"], e["reference"] + " (earlier `fold`)", e["candidate"], e["executor"],
                                     e["metrics"], e.get("goals", {}), e.get("failures", [])),
                         counts=not fold.forced)
    if fold.stage is not None:
        report.add_stage(fold.stage, counts=not fold.forced)  # a forced fold is recorded, not failed
    if fold.migration_stage is not None:
        report.add_stage(fold.migration_stage)


def _add_outcome(report: Report, work: Path, outcome: TargetOutcome) -> None:
    from .digest import file_sha256
    from .report import ArtifactRecord

    ids = {id(s): report.add_stage(s) for s in outcome.stages}
    by_name = {s.stage: ids[id(s)] for s in outcome.stages}
    for a in outcome.artifacts:
        rec = ArtifactRecord(a.file, a.precision, a.runtime, by_name.get(a.verified_by) if a.verified_by else None)
        p = work / a.file
        if p.is_file():
            rec.sha256, rec.bytes = file_sha256(p), p.stat().st_size
        elif p.is_dir():
            rec.bytes = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        report.artifacts.append(rec)
    report.quantization, report.target_info = outcome.quantization, outcome.info


def _write_reference(sess: ExportSession, report: Report, work: Path, outcome: TargetOutcome) -> None:
    """reference.npz: the session's seeded inputs, the folded logits and each verified model file's own logits."""
    if sess.reference_inputs is None or sess.reference_logits is None:
        return
    stages = {s.stage: s for s in outcome.stages}
    runs = {}
    for a in outcome.artifacts:
        stage = stages.get(a.verified_by or "")
        if stage is not None and reference_key(stage) in sess.reference_runs:
            runs[a.file] = sess.reference_runs[reference_key(stage)]
    info = Reference(sess.reference_inputs, sess.reference_logits, runs).save(work / REFERENCE_FILE)
    report.target_info["reference"] = info


def build_target(sess: ExportSession, target: str) -> tuple[Path, Report]:
    """Build, verify and report one target; returns (folder, report). The folder appears only when complete."""
    build = get_target(target).load().build
    final = Path(sess.opts.out) / sess.model_name / target
    t0 = time.perf_counter()
    with interrupts_clean_up(), staged_dir(final) as work:
        with quiet_native_output(not sess.opts.verbose):
            outcome = build(sess, work)
        report = new_report(sess.ckpt, sess.opts, target, sess.fold_report, sess.val, sess.calib)
        _add_fold_stages(report, sess.fold_report)
        _add_outcome(report, work, outcome)
        _write_reference(sess, report, work, outcome)
        if report.quantization is not None and sess.fold_report.migration is not None:
            report.quantization["channel_spread"] = sess.fold_report.migration.channel_spread
        report.seconds = round(time.perf_counter() - t0, 2)
        report.save(work / "report.json")
    return final, report


def _refused_reports(exc: FoldRefused, opts: ExportOptions) -> list[tuple[Path, Report]]:
    """The fold gate failed: write a failed report (no artifacts) for every requested target."""
    ckpt, val, calib = exc.context
    log.info("%s", format_fold_report(exc.report))
    out = []
    for target in opts.targets:
        final = Path(opts.out) / ckpt.name / target
        report = new_report(ckpt, opts, target, exc.report, val, calib)
        report.add_stage(exc.report.stage)
        report.failures.append("nothing was exported: the softmax branch still matters (see fold); --force exports "
                               "anyway" + (", --accept-accuracy-only accepts a fold that keeps accuracy"
                                           if accuracy_kept(exc.report) else ""))
        with staged_dir(final) as work:
            report.save(work / "report.json")
        out.append((final, report))
    return out


def census_summary(target: str, census: dict[str, Any]) -> str:
    """One line on how much of an INT8 artifact really runs in int8 (each target reads its own artifact kind)."""
    summarize = getattr(get_target(target).load(), "census_summary", None)
    try:
        return summarize(census) if summarize and census else "n/a"
    except KeyError:
        return "n/a"


def run_export(ckpt_path: Path, opts: ExportOptions) -> list[tuple[Path, Report]]:
    """Export every requested target; reports that failed a goal are written and returned marked failed."""
    for t in opts.targets:
        get_target(t)
    ensure_writable_dir(Path(opts.out))  # fail before the slow work, not after
    remove_stale_temp_dirs()  # what a killed (SIGKILL) run left in the temp folder
    try:
        sess = prepare_session(ckpt_path, opts)
    except FoldRefused as exc:
        return _refused_reports(exc, opts)
    model_dir = Path(opts.out) / sess.model_name
    made_model_dir = not model_dir.exists()
    try:
        return _build_targets(sess)
    except Exception:
        if made_model_dir:
            _remove_if_empty(model_dir)  # a failed run leaves no empty OUT/<model>
        raise
    finally:
        for item in sess.shared.values():
            remove_temp_dir(Path(item[0]).parent)


def _build_targets(sess: ExportSession) -> list[tuple[Path, Report]]:
    results = []
    for target in sess.opts.targets:
        log.info("building %s", target)
        folder, report = build_target(sess, target)
        log.info("%s\n%s", folder, format_budget(report.error_budget))
        if report.quantization:
            log.info("int8 census: %s", census_summary(target, report.quantization.get("census") or {}))
        results.append((folder, report))
    return results


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only ever removes an empty folder
    except OSError:
        pass


def failure_error(results: list[tuple[Path, Report]]) -> ToleranceError | None:
    """The exit-3 error for reports that failed a goal (they are on disk, marked failed), or None."""
    failed = [(f, r) for f, r in results if r.status != "passed"]
    if not failed:
        return None
    return ToleranceError(
        "; ".join(f"{r.target}: {', '.join(r.failures)}" for _, r in failed)
        + f" (report: {failed[0][0]}/report.json)",
        report_path=f"{failed[0][0]}/report.json",
    )
