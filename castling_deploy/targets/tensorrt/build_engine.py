"""``castling-deploy build-engine``: on the device, build the engine inside a `--target tensorrt` export folder from
the typed ONNX of the asked precision (strongly typed on TensorRT 10.12+ and 11.x), verify it against the float
ONNX, and record both in the folder's report.json."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ...data import load_image_set
from ...digest import file_sha256
from ...errors import UsageError
from ...report import ArtifactRecord, Report, load_report
from ...runtime.base import run_batched
from ...runtime.ort import OrtRunner
from ...budget import FLOAT_ATOL, check_stage
from .engine import _import_tensorrt, build_engine
from .target import DEFAULT_BATCH_RANGE, ENGINE_NAME


def _engine_input(info: dict[str, Any], precision: str) -> str:
    """The ONNX an engine of ``precision`` is built from: the typed file the export wrote for it (fp32: model.onnx,
    fp16: model.fp16.onnx, int8: model.int8.onnx). Reports written before typed exports name only one file."""
    legacy = {info.get("precision", "fp32"): info.get("onnx_for_engine", "model.onnx")}
    inputs = dict(info.get("engine_inputs") or legacy)
    inputs.setdefault("fp32", "model.onnx")
    if precision not in inputs:
        flag = {"fp16": "--fp16", "int8": "--int8"}.get(precision, "")
        raise UsageError(f"this export has no {precision} engine input: under strong typing (TensorRT 10.12+, 11.x) "
                         f"the precision is in the ONNX; re-export with {flag} or pick one of {', '.join(inputs)}")
    return str(inputs[precision])


def resolve_engine_input(folder: Path, precision: str | None) -> tuple[Report, str, Path]:
    """(the export's report, the engine precision, the ONNX to build it from), refusing a folder that is not a
    tensorrt export or an engine input that is missing or outside the folder."""
    report = load_report(folder / "report.json")
    if report.target != "tensorrt":
        raise UsageError(f"{folder}: this export is for target {report.target!r}, not tensorrt; pass a folder written "
                         "by `export --target tensorrt`")
    precision = precision or report.target_info.get("precision", "fp32")
    onnx_path = folder / _engine_input(report.target_info, precision)
    if onnx_path.parent.resolve() != folder.resolve():
        raise UsageError(f"{folder}/report.json names an engine input outside its folder; re-export it")
    if not onnx_path.is_file():
        raise UsageError(f"{onnx_path}: the {precision} engine input is missing from this export; re-export it")
    return report, precision, onnx_path


def verify_engine(report: Report, folder: Path, precision: str, runtime: str, record: ArtifactRecord,
                  run: Callable[[np.ndarray], np.ndarray], val: Path | None, limit: int | None) -> dict[str, Any]:
    """The engine's error-budget stage against the export's fp32 ONNX on ORT CPU (``run`` computes the engine's
    logits, here or on a device); records it on ``record``. No --val: a note that it was not verified."""
    if val is None:
        report.note("engine built but not verified: pass --val DIR to build-engine to measure its accuracy")
        return {"verified": False}
    data = load_image_set(val, report.preprocess, report.labels, limit=limit)
    ref = run_batched(OrtRunner(folder / "model.onnx"), data.images)
    stage = check_stage("engine", "ONNX fp32 on ORT CPU", f"TensorRT {precision} engine", runtime,
                        ref, run(data.images), data.labels, tolerance_points=report.goals["tolerance_points"],
                        atol=FLOAT_ATOL.get(precision))
    record.verified_by = report.add_stage(stage)
    return {"stage": stage.to_dict()}


def build_engine_for_export(folder: Path, *, precision: str | None = None,
                            batch_range: tuple[int, int, int] = DEFAULT_BATCH_RANGE,
                            val: Path | None = None, limit: int | None = None) -> dict[str, Any]:
    """``castling-deploy build-engine``: build the engine inside an export folder, verify it, update the report."""
    from ...runtime.tensorrt import TensorRTRunner

    report_path = Path(folder) / "report.json"
    report, precision, onnx_path = resolve_engine_input(Path(folder), precision)
    _import_tensorrt()  # exit 4 before touching the folder when TensorRT is absent
    engine = Path(folder) / ENGINE_NAME
    meta = build_engine(onnx_path, engine, precision=precision, batch_range=batch_range,
                        timing_cache=Path(folder) / "timing.cache")
    runtime = f"TensorRT {meta['tensorrt']} ({meta['typing']} typing) on {meta['gpu']}"
    record = ArtifactRecord(ENGINE_NAME, precision, runtime, sha256=file_sha256(engine), bytes=engine.stat().st_size)
    result: dict[str, Any] = {"engine": meta, **verify_engine(
        report, Path(folder), precision, "TensorRT", record, lambda x: run_batched(TensorRTRunner(engine), x),
        val, limit)}
    report.set_artifact(record)
    report.target_info["engine"] = meta
    report.save(report_path)
    result["status"] = report.status
    return result
