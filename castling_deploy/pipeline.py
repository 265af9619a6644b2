"""The export pipeline: load -> fold (gated) -> per target: build, verify, report, rename into place.

Targets share one ``ExportSession`` (checkpoint, folded model, reference logits on the val set, calibration
set) so the reference is computed once; each target builds into a staging folder and writes ``report.json``.
"""
from __future__ import annotations

import importlib
import json
import logging
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from .data import ImageSet, load_image_set, random_inputs
from .errors import ToleranceError, UsageError
from .fold import FoldRefused, FoldReport, fold_model, format_fold_report, predict
from .models.checkpoint import Checkpoint, load_checkpoint
from .models.vit import CastlingViT
from .quiet import quiet_native_output
from .output import interrupts_clean_up, unregister_cleanup, staged_dir, to_jsonable, write_json
from .runtime.base import Runner, run_batched
from .verify import DEFAULT_TOLERANCE_POINTS, FLOAT_ATOL, StageResult, check_stage, format_budget

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CHECKPOINT = REPO_ROOT / "models" / "castling_nano_digits.pt"
DEMO_CALIB = REPO_ROOT / "calib" / "digits" / "train"
DEMO_VAL = REPO_ROOT / "calib" / "digits" / "val"
TARGETS = ("onnx", "tensorrt", "coreml", "tflite")
# Target name -> "module:function" building it (imported lazily: heavy runtimes load only when used).
BUILDERS = {
    "onnx": "castling_deploy.targets.onnx_target:build",
    "tensorrt": "castling_deploy.targets.tensorrt_target:build",
    "coreml": "castling_deploy.targets.coreml_target:build",
    "tflite": "castling_deploy.targets.tflite_target:build",
}
RANDOM_VAL_COUNT = 64
HOLDOUT_MIN, HOLDOUT_MAX = 8, 256


@dataclass
class ExportOptions:
    targets: list[str]
    int8: bool = False
    fp16: bool = False
    calib: Path | None = None
    val: Path | None = None
    tolerance: float = DEFAULT_TOLERANCE_POINTS
    imgsz: int | None = None
    opset: int = 18
    out: Path = Path("exports")
    force: bool = False
    arch: str | None = None
    calib_size: int = 512
    calib_method: str = "percentile"
    auto_fallback: bool = False
    sensitivity: bool = False
    full_integer: bool = False
    io_dtype: str = "float32"
    weights_only: bool = False
    val_limit: int | None = None
    seed: int = 0
    verbose: bool = False

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(asdict(self))


@dataclass
class ExportSession:
    ckpt: Checkpoint
    opts: ExportOptions
    folded: CastlingViT
    fold_report: FoldReport
    val: ImageSet
    ref_logits: np.ndarray
    calib: ImageSet | None
    metadata: dict[str, str]
    # Artifacts several targets share (the float ONNX of onnx and tensorrt), built once per run.
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.ckpt.name

    @property
    def img_size(self) -> int:
        return self.folded.cfg.img_size

    def verify(self, stage: str, candidate: str, runner: Runner, *, precision: str,
               reference: str = "folded torch fp32", tolerance: float | None = None) -> StageResult:
        """Run ``runner`` on the val set and check it against the folded float model."""
        t0 = time.perf_counter()
        logits = run_batched(runner, self.val.images)
        atol = FLOAT_ATOL.get(precision)
        result = check_stage(stage, reference, candidate, runner.name, self.ref_logits, logits, self.val.labels,
                             tolerance_points=self.opts.tolerance if tolerance is None else tolerance, atol=atol)
        result.metrics["seconds"] = round(time.perf_counter() - t0, 3)
        return result

    def require_calib(self) -> ImageSet:
        if self.calib is None:
            raise UsageError("INT8 needs calibration images: pass --calib DIR (a folder of images or an .npz)")
        return self.calib


@dataclass
class TargetOutcome:
    """What a target builder hands back: files (relative to its folder), budget stages, target-specific info."""

    artifacts: list[dict[str, Any]] = field(default_factory=list)
    stages: list[StageResult] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None


def runtime_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "numpy", "onnx", "onnxruntime", "onnxsim", "litert-torch", "ai-edge-litert",
                "ai-edge-quantizer", "coremltools", "tensorrt"):
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


def _resolve_sets(opts: ExportOptions, demo: bool) -> tuple[Path | None, Path | None]:
    calib, val = opts.calib, opts.val
    if demo:
        calib = calib or DEMO_CALIB
        val = val or DEMO_VAL
    if calib is not None and val is not None and Path(calib).resolve() == Path(val).resolve():
        raise UsageError(
            f"--calib and --val are the same set ({calib}); calibration must not see the images used to measure "
            "accuracy — pass a separate validation folder"
        )
    return calib, val


def prepare_session(ckpt_path: Path | None, opts: ExportOptions) -> ExportSession:
    """Load, resolve data sets, fold with its gate, and compute the reference logits."""
    demo = ckpt_path is None
    if demo:
        if not DEMO_CHECKPOINT.exists():
            raise UsageError(f"the demo checkpoint {DEMO_CHECKPOINT} is missing; pass a CKPT")
        ckpt_path = DEMO_CHECKPOINT
        log.info("no CKPT given: using the shipped demo %s", DEMO_CHECKPOINT.name)
    ckpt = load_checkpoint(ckpt_path, arch=opts.arch, img_size=opts.imgsz)
    calib_path, val_path = _resolve_sets(opts, demo)
    if opts.int8 and calib_path is None:
        raise UsageError("--int8 needs calibration images: pass --calib DIR (a folder of images or an .npz)")
    if opts.val_limit is not None and val_path is None:
        raise UsageError("--limit samples the --val set; pass --val DIR too")
    if ckpt.config.attention != "castling":
        log.warning("%s has softmax attention (no Castling dconv weights): exported as a plain DeiT, nothing to fold",
                    ckpt.path)
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
    if val is None and calib is not None and len(calib) >= 2 * HOLDOUT_MIN:
        # Never verify on the images that calibrated: hold a seeded part of --calib out of calibration.
        calib, val = calib.split(min(len(calib) // 5, HOLDOUT_MAX), seed=opts.seed)
        log.warning("no --val set: verifying on %d images held out of --calib (they are not used to calibrate)",
                    len(val))
    elif val is None:
        val = random_inputs(RANDOM_VAL_COUNT, ckpt.config.img_size, opts.seed)
        log.warning("no --val set: verifying on %s (no labels, so top-1 agreement stands in for accuracy)",
                    val.source)
    log.info("folding %s (%s) on %d images of %s", ckpt.arch, ckpt.config.form, len(val), val.source)
    model = ckpt.build_model()
    try:
        folded, fold_report = fold_model(model, val, tolerance_points=opts.tolerance, force=opts.force)
    except FoldRefused as exc:
        exc.context = (ckpt, val, calib)
        raise
    fold_report.earlier = ckpt.extra.get("fold")
    if fold_report.earlier and fold_report.earlier.get("forced"):
        fold_report.forced = True
        fold_report.notes.append("this checkpoint was folded earlier with --force; that fold's measured effect is "
                                 "the first row of the error budget")
    ref = predict(folded, val.images)
    meta = artifact_metadata(ckpt, folded.cfg.to_dict())
    return ExportSession(ckpt, opts, folded, fold_report, val, ref, calib, meta)


def _budget(sess: ExportSession, outcome: TargetOutcome) -> list[StageResult]:
    stages = []
    earlier = sess.fold_report.earlier
    if earlier and earlier.get("stage"):
        e = earlier["stage"]
        stages.append(StageResult(e["stage"], e["reference"] + " (earlier `fold`)", e["candidate"], e["executor"],
                                  e["metrics"], e.get("goals", {}), e.get("failures", [])))
    if sess.fold_report.stage is not None:
        stages.append(sess.fold_report.stage)
    return stages + outcome.stages


def build_target(sess: ExportSession, target: str) -> tuple[Path, dict[str, Any]]:
    """Build, verify and report one target; returns (folder, report). The folder appears only when complete."""
    module_name, func_name = BUILDERS[target].split(":")
    builder: Callable[[ExportSession, Path], TargetOutcome] = getattr(importlib.import_module(module_name), func_name)
    final = Path(sess.opts.out) / sess.model_name / target
    t0 = time.perf_counter()
    with interrupts_clean_up(), staged_dir(final) as work:
        with quiet_native_output(not sess.opts.verbose):
            outcome = builder(sess, work)
        budget = _budget(sess, outcome)
        failures = [f"{s.stage}: {f}" for s in budget for f in s.failures
                    if not (s.stage == "fold" and sess.fold_report.forced)]  # a forced fold is recorded, not failed
        report = _report(sess.ckpt, sess.opts, target, sess.fold_report, sess.val, sess.calib, budget, failures)
        report.update(artifacts=outcome.artifacts, quantization=outcome.quantization, target_info=outcome.info,
                      seconds=round(time.perf_counter() - t0, 2))
        _add_hashes(work, report)
        write_json(work / "report.json", to_jsonable(report))
    report["folder"] = str(final)
    return final, report


def _report(ckpt: Checkpoint, opts: ExportOptions, target: str, fold: FoldReport, val: ImageSet,
            calib: ImageSet | None, budget: list[StageResult], failures: list[str]) -> dict[str, Any]:
    cfg = ckpt.config.with_(form="deploy") if ckpt.config.attention == "castling" else ckpt.config
    return {
        "schema": "castling-deploy/report/1",
        "status": "failed" if failures else "passed",
        "failures": failures,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tool": {"name": "castling-deploy", "version": __version__},
        "runtime_versions": runtime_versions(),
        "checkpoint": {"path": ckpt.path, "sha256": ckpt.sha256, "arch": ckpt.arch, "config": cfg.to_dict(),
                       "form": ckpt.config.form, "attention": ckpt.config.attention,
                       "source_format": ckpt.source_format},
        "model_name": ckpt.name,
        "target": target,
        "options": opts.to_dict(),
        "preprocess": ckpt.preprocess,
        "labels": ckpt.labels,
        "input": {"name": "images", "shape": ["batch", cfg.in_chans, cfg.img_size, cfg.img_size],
                  "dtype": "float32", "layout": "NCHW"},
        "fold": fold.to_dict(),
        "artifacts": [],
        "data": {"val": val.describe(), "calib": calib.describe() if calib else None},
        "quantization": None,
        "error_budget": [s.to_dict() for s in budget],
        "goals": {"tolerance_points": opts.tolerance, "float_atol": FLOAT_ATOL},
        "target_info": {},
        "latency": None,
    }


def _refused_reports(exc: FoldRefused, opts: ExportOptions) -> list[dict[str, Any]]:
    """The fold gate failed: write a failed report (no artifacts) for every requested target."""
    ckpt, val, calib = exc.context
    log.info("%s", format_fold_report(exc.report))
    reports = []
    for target in opts.targets:
        final = Path(opts.out) / ckpt.name / target
        failures = [f"fold: {f}" for f in exc.report.stage.failures] + [
            "nothing was exported: the softmax branch still matters (see fold); --force exports anyway"]
        report = _report(ckpt, opts, target, exc.report, val, calib, [exc.report.stage], failures)
        with staged_dir(final) as work:
            write_json(work / "report.json", to_jsonable(report))
        report["folder"] = str(final)
        reports.append(report)
    return reports


def _add_hashes(folder: Path, report: dict[str, Any]) -> None:
    from .digest import file_sha256

    for a in report["artifacts"]:
        p = folder / a["file"]
        if p.is_file():
            a.setdefault("sha256", file_sha256(p))
            a.setdefault("bytes", p.stat().st_size)
        elif p.is_dir():
            a.setdefault("bytes", sum(f.stat().st_size for f in p.rglob("*") if f.is_file()))


def run_export(ckpt_path: Path | None, opts: ExportOptions) -> list[dict[str, Any]]:
    """Export every requested target; reports that failed a goal are written and returned marked failed."""
    for t in opts.targets:
        if t not in TARGETS:
            raise UsageError(f"unknown --target {t!r}; choose from {', '.join(TARGETS)} or all")
    from .output import ensure_writable_dir

    ensure_writable_dir(Path(opts.out))  # fail before the slow work, not after
    try:
        sess = prepare_session(ckpt_path, opts)
    except FoldRefused as exc:
        return _refused_reports(exc, opts)
    reports = []
    try:
        for target in opts.targets:
            log.info("building %s", target)
            folder, report = build_target(sess, target)
            log.info("%s\n%s", folder, format_budget(report["error_budget"]))
            if report["quantization"]:
                log.info("int8 census: %s", census_summary(report["quantization"].get("census") or {}))
            reports.append(report)
    finally:
        for item in sess.shared.values():
            shutil.rmtree(Path(item[0]).parent, ignore_errors=True)
            unregister_cleanup(Path(item[0]).parent)
    return reports


def census_summary(c: dict[str, Any]) -> str:
    """One line on how much of an INT8 artifact really runs in int8, read from the artifact itself."""
    if "int8_mac_fraction" in c:  # ONNX QDQ
        return (f"{c['int8_compute_nodes']}/{c['compute_nodes']} Conv/MatMul/Gemm in int8 "
                f"({c['int8_mac_fraction'] * 100:.1f}% of MACs); zero points all 0: {c['zero_points_all_zero']}")
    if "int8_weight_fraction" in c:  # Core ML
        return (f"{c['int8_weight_fraction'] * 100:.1f}% of weights int8; {c['quantize_ops']} activation quantize "
                f"ops; activations quantized: {c['activation_quantized']}")
    if "activation_dtypes" in c:  # LiteRT
        return (f"tensors {c['tensor_dtypes']}; float activations besides I/O: "
                f"{c['float_activation_tensors_excluding_io']}; I/O {c['io_dtypes']}")
    return "n/a"


def failure_error(reports: list[dict[str, Any]]) -> ToleranceError | None:
    """The exit-3 error for reports that failed a goal (they are on disk, marked failed), or None."""
    failed = [r for r in reports if r["status"] != "passed"]
    if not failed:
        return None
    return ToleranceError(
        "; ".join(f"{r['target']}: {', '.join(r['failures'])}" for r in failed)
        + f" (report: {failed[0]['folder']}/report.json)",
        report_path=f"{failed[0]['folder']}/report.json",
    )
