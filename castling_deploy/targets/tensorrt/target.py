"""TensorRT target: the TensorRT-ready ONNX (float, or INT8 QDQ with a TensorRT recipe) verified on ORT CPU,
plus an engine when ``tensorrt`` is importable here; otherwise the exact ``trtexec`` and ``build-engine``
commands to run on the target device (engines are specific to one GPU and TensorRT version).
"""
from __future__ import annotations

import logging
from pathlib import Path

from ...errors import MissingDependencyError
from ..base import ExportSession, TargetOutcome
from ..onnx.target import census_summary, export_float, quantize_int8
from .engine import _import_tensorrt, build_engine, qdq_tensorrt_problems, trtexec_command

__all__ = ["build", "census_summary", "tensorrt_available"]

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
        stage = quantize_int8(sess, fp32, qdq, "tensorrt", outcome, "TensorRT-ready INT8 QDQ on ORT CPU")
        problems = qdq_tensorrt_problems(qdq)
        outcome.info["tensorrt_compatibility_problems"] = problems
        if problems:
            stage.failures.append("QDQ model is not TensorRT-compatible: " + "; ".join(problems))
        outcome.add(qdq.name, "int8", "TensorRT (explicit QDQ)", stage)
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
    outcome.add("build_engine.sh", "script", "sh on the target device")
    if tensorrt_available():
        meta = build_engine(onnx_for_engine, work / ENGINE_NAME, precision=precision,
                            batch_range=DEFAULT_BATCH_RANGE, timing_cache=work / "timing.cache")
        from ...runtime.tensorrt import TensorRTRunner

        stage = sess.verify("engine", f"TensorRT {precision} engine", TensorRTRunner(work / ENGINE_NAME),
                            precision=precision)
        outcome.stages.append(stage)
        outcome.info["engine"] = meta
        outcome.add(ENGINE_NAME, precision, "TensorRT", stage)
    else:
        outcome.info["engine"] = None
        outcome.note(
            "tensorrt is not importable here, so no engine was built; run build_engine.sh (or the build-engine "
            "command) on the target device")
        log.info("tensorrt not importable: wrote build_engine.sh with the trtexec / build-engine commands")
    return outcome
