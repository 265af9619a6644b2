"""TensorRT target: the TensorRT-ready ONNX (float, or INT8 QDQ with a TensorRT recipe) verified on ORT CPU,
plus an engine when ``tensorrt`` is importable here; otherwise the exact ``trtexec`` and ``build-engine``
commands to run on the target device (engines are specific to one GPU and TensorRT version).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import MissingDependencyError, UsageError
from ..pipeline import ExportSession, TargetOutcome
from .onnx_target import export_float, quantize_int8
from .tensorrt import _import_tensorrt, build_engine, qdq_tensorrt_problems, trtexec_command

log = logging.getLogger(__name__)

DEFAULT_BATCH_RANGE = (1, 8, 32)
ENGINE_NAME = "model.engine"


def _precision(int8: bool, fp16: bool) -> str:
    """--int8 (with fp16 allowed for the layers left float), --fp16, or fp32 when neither is asked for."""
    return "int8" if int8 else "fp16" if fp16 else "fp32"


def tensorrt_available() -> bool:
    """Importable, not merely present: a placeholder wheel or missing CUDA libraries fail at import."""
    try:
        _import_tensorrt()
    except MissingDependencyError:
        return False
    return True


def build(sess: ExportSession, work: Path) -> TargetOutcome:
    outcome = TargetOutcome()
    fp32 = export_float(sess, work, outcome)
    precision = _precision(sess.opts.int8, sess.opts.fp16)
    onnx_for_engine = fp32
    if sess.opts.int8:
        qdq = work / "model.int8.onnx"
        quantize_int8(sess, fp32, qdq, "tensorrt", outcome, "TensorRT-ready INT8 QDQ on ORT CPU")
        problems = qdq_tensorrt_problems(qdq)
        outcome.info["tensorrt_compatibility_problems"] = problems
        if problems:
            outcome.stages[-1].failures.append("QDQ model is not TensorRT-compatible: " + "; ".join(problems))
        outcome.artifacts.append({"file": qdq.name, "precision": "int8", "runtime": "TensorRT (explicit QDQ)"})
        onnx_for_engine = qdq
    lo, opt, hi = DEFAULT_BATCH_RANGE
    cmd = trtexec_command(onnx_for_engine.name, ENGINE_NAME, precision, lo, opt, hi, sess.img_size,
                          timing_cache="timing.cache")
    ours = "castling-deploy build-engine ."
    (work / "build_engine.sh").write_text(
        "#!/bin/sh\n# Run on the target device (Jetson / NVIDIA GPU) inside this folder.\n"
        f"# Either TensorRT's trtexec:\n{cmd}\n# or, with castling-deploy installed there (verifies accuracy too):\n"
        f"# {ours} --val VAL_DIR\n"
    )
    (work / "build_engine.sh").chmod(0o755)
    outcome.info.update(precision=precision, onnx_for_engine=onnx_for_engine.name, trtexec=cmd,
                        build_engine=ours, batch_range=list(DEFAULT_BATCH_RANGE))
    outcome.artifacts.append({"file": "build_engine.sh", "precision": "script", "runtime": "sh on the target device"})
    if tensorrt_available():
        meta = build_engine(onnx_for_engine, work / ENGINE_NAME, precision=precision,
                            batch_range=DEFAULT_BATCH_RANGE, timing_cache=work / "timing.cache")
        from ..runtime.tensorrt import TensorRTRunner

        outcome.stages.append(sess.verify("engine", f"TensorRT {precision} engine", TensorRTRunner(work / ENGINE_NAME),
                                          precision=precision))
        outcome.info["engine"] = meta
        outcome.artifacts.append({"file": ENGINE_NAME, "precision": precision, "runtime": "TensorRT"})
    else:
        outcome.info["engine"] = None
        outcome.info.setdefault("notes", []).append(
            "tensorrt is not importable here, so no engine was built; run build_engine.sh (or the build-engine "
            "command) on the target device")
        log.info("tensorrt not importable: wrote build_engine.sh with the trtexec / build-engine commands")
    return outcome


def build_engine_for_export(folder: Path, *, precision: str | None = None,
                            batch_range: tuple[int, int, int] = DEFAULT_BATCH_RANGE,
                            val: Path | None = None, limit: int | None = None) -> dict[str, Any]:
    """``castling-deploy build-engine``: build the engine inside an export folder, verify it, update the report."""
    import numpy as np

    from ..data import load_image_set
    from ..digest import file_sha256
    from ..output import to_jsonable, write_json
    from ..runtime.base import run_batched
    from ..runtime.ort import OrtRunner
    from ..runtime.tensorrt import TensorRTRunner
    from ..verify import FLOAT_ATOL, check_stage

    report_path = Path(folder) / "report.json"
    if not report_path.is_file():
        raise UsageError(f"{folder}: no report.json; pass a folder written by `export --target tensorrt`")
    report = json.loads(report_path.read_text())
    if report.get("target") != "tensorrt":
        raise UsageError(f"{folder}: this export is for target {report.get('target')!r}, not tensorrt")
    _import_tensorrt()  # exit 4 before touching the folder when TensorRT is absent
    info = report.get("target_info", {})
    precision = precision or info.get("precision", "fp16")
    onnx_path = Path(folder) / info.get("onnx_for_engine", "model.onnx")
    engine = Path(folder) / ENGINE_NAME
    meta = build_engine(onnx_path, engine, precision=precision, batch_range=batch_range,
                        timing_cache=Path(folder) / "timing.cache")
    result: dict[str, Any] = {"engine": meta}
    report["artifacts"] = [a for a in report["artifacts"] if a["file"] != ENGINE_NAME] + [
        {"file": ENGINE_NAME, "precision": precision, "runtime": f"TensorRT {meta['tensorrt']} on {meta['gpu']}",
         "sha256": file_sha256(engine), "bytes": engine.stat().st_size}]
    if val is None:
        note = "engine built but not verified: pass --val DIR to build-engine to measure its accuracy"
        report.setdefault("target_info", {}).setdefault("notes", []).append(note)
        result["verified"] = False
    else:
        data = load_image_set(val, report["preprocess"], report.get("labels"), limit=limit)
        ref = run_batched(OrtRunner(Path(folder) / "model.onnx"), data.images)
        out = run_batched(TensorRTRunner(engine), data.images)
        stage = check_stage("engine", "ONNX fp32 on ORT CPU", f"TensorRT {precision} engine", "TensorRT",
                            ref, out, data.labels, tolerance_points=report["goals"]["tolerance_points"],
                            atol=FLOAT_ATOL.get(precision))
        result["stage"] = stage.to_dict()
        report["error_budget"].append(stage.to_dict())
        if not stage.passed:
            report["status"] = "failed"
            report["failures"] = report.get("failures", []) + [f"engine: {f}" for f in stage.failures]
        _ = np  # numpy is used through run_batched
    report.setdefault("target_info", {})["engine"] = meta
    write_json(report_path, to_jsonable(report))
    result["status"] = report["status"]
    return result
