"""TensorRT target: one typed ONNX per engine precision, each verified on ONNX Runtime CPU; build_engine.sh, which
builds on TensorRT 10.x (JetPack 6) and 11.x unchanged; and the engine when ``tensorrt`` is importable here.

TensorRT 11 builds every network strongly typed (10.12+ can): the precision of an engine is the types in its ONNX.

  model.onnx       fp32                                            export stage (always)
  model.fp16.onnx  fp16, LayerNorm / L2 norms / softmax / logits fp32  "fp16" stage (--fp16)
  model.int8.onnx  INT8 QDQ (TensorRT recipe), float islands fp16      "int8" stage (--int8; --quantizer ort|modelopt)

The typed files come from one mixed-precision pass (``quantize/fp16.py``). The INT8 QDQ is first quantized with
fp32 float islands (ONNX Runtime + QuantRecipe, or ModelOpt), measured (``quantization.typed.fp32_islands``), then
typed in place; its budget stage measures the typed file, which is the engine input.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ...errors import MissingDependencyError, UsageError
from ...runtime.ort import OrtRunner
from ..base import ExportSession, TargetOutcome
from ..onnx.target import census_summary, export_float, quantize_int8
from .engine import _import_tensorrt, build_engine, qdq_tensorrt_problems, trtexec_command
from .script import ENGINE_NAME, build_script
from .versions import STRONG, STRONG_ONLY, WEAK

__all__ = ["QUANTIZERS", "build", "census_summary", "tensorrt_available"]

log = logging.getLogger(__name__)

DEFAULT_BATCH_RANGE = (1, 8, 32)
QUANTIZERS = ("ort", "modelopt")
FP16_ONNX, INT8_ONNX = "model.fp16.onnx", "model.int8.onnx"
_RUNTIME = {"fp32": "TensorRT (strongly typed) / any ONNX runtime", "fp16": "TensorRT (strongly typed fp16)",
            "int8": "TensorRT (explicit QDQ, strongly typed)"}


def _precision(int8: bool, fp16: bool) -> str:
    """The engine precision build_engine.sh builds by default: int8 with --int8, fp16 with --fp16, else fp32."""
    return "int8" if int8 else "fp16" if fp16 else "fp32"


def tensorrt_available() -> bool:
    """Importable, not merely present: a placeholder wheel or missing CUDA libraries fail at import."""
    try:
        _import_tensorrt()
    except MissingDependencyError:
        return False
    return True


def _metrics_summary(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("max_abs_logit", "cosine", "sqnr_db", "top1_agreement", "top1_acc", "top1_drop_points")
    return {k: m[k] for k in keys if k in m}


def _typed_fp16(sess: ExportSession, fp32: Path, work: Path, outcome: TargetOutcome) -> Path:
    from ...quantize.fp16 import precision_census, write_fp16_onnx

    path = work / FP16_ONNX
    log.info("writing the typed fp16 ONNX (%s)", path.name)
    info = write_fp16_onnx(fp32, path)
    stage = sess.verify("fp16", f"typed fp16 ONNX ({path.name}) on ORT CPU", OrtRunner(path), precision="fp16")
    outcome.stages.append(stage)
    outcome.add(path.name, "fp16", _RUNTIME["fp16"], stage)
    outcome.info["fp16"] = {**{k: v for k, v in info.items() if k != "policy"}, "census": precision_census(path)}
    return path


def _quantize_fp32_islands(sess: ExportSession, fp32: Path, qdq: Path, outcome: TargetOutcome) -> dict[str, Any]:
    """The INT8 QDQ with fp32 float islands, from the chosen quantizer; returns its metrics on the val set."""
    opts = sess.opts
    quantizer = opts.option("quantizer")
    if quantizer == "modelopt":
        from ...quantize.calibration import CalibrationSet
        from ...quantize.modelopt import quantize_modelopt

        if opts.auto_fallback or opts.sensitivity:
            raise UsageError("--auto-fallback / --sensitivity work with --quantizer ort only (they change the "
                             "QuantRecipe); drop them or use the default quantizer")
        images = sess.require_calib()
        log.info("quantizing to INT8 QDQ with NVIDIA ModelOpt (CPU)")
        outcome.quantization = quantize_modelopt(fp32, qdq, CalibrationSet(images.images, images.digest,
                                                                           images.source),
                                                 calibration=opts.calib_method, calib_size=opts.calib_size,
                                                 seed=opts.seed)
        stage = sess.verify("int8", "ModelOpt INT8 QDQ, fp32 islands", OrtRunner(qdq), precision="int8")
    else:
        stage = quantize_int8(sess, fp32, qdq, "tensorrt", outcome, "TensorRT INT8 QDQ, fp32 islands")
        outcome.stages.remove(stage)  # the budget measures the typed file below, the engine input
    return _metrics_summary(stage.metrics)


def _typed_int8(sess: ExportSession, fp32: Path, work: Path, outcome: TargetOutcome) -> Path:
    from ...quantize.census import onnx_census
    from ...quantize.fp16 import precision_census, write_fp16_onnx

    qdq = work / INT8_ONNX
    islands32 = _quantize_fp32_islands(sess, fp32, qdq, outcome)
    log.info("typing the INT8 QDQ float islands fp16 (%s)", qdq.name)
    typed = write_fp16_onnx(qdq, qdq)
    stage = sess.verify("int8", f"TensorRT INT8 QDQ, fp16 islands ({qdq.name}) on ORT CPU", OrtRunner(qdq),
                        precision="int8")
    problems = qdq_tensorrt_problems(qdq)
    outcome.info["tensorrt_compatibility_problems"] = problems
    if problems:
        stage.failures.append("QDQ model is not TensorRT-compatible: " + "; ".join(problems))
    quant = outcome.quantization if outcome.quantization is not None else {}
    quant["quantizer_option"] = sess.opts.option("quantizer")
    quant["census"] = onnx_census(qdq)
    quant["typed"] = {**{k: v for k, v in typed.items() if k != "policy"}, "census": precision_census(qdq),
                      "fp32_islands": islands32}
    outcome.quantization = quant
    outcome.stages.append(stage)
    outcome.add(qdq.name, "int8", _RUNTIME["int8"], stage)
    return qdq


def _write_script(work: Path, inputs: dict[str, str], precision: str, img_size: int) -> dict[str, str]:
    script = work / "build_engine.sh"
    script.write_text(build_script(inputs, precision, img_size, DEFAULT_BATCH_RANGE))
    script.chmod(0o755)
    lo, opt, hi = DEFAULT_BATCH_RANGE
    return {mode: trtexec_command(inputs[precision], ENGINE_NAME, precision, lo, opt, hi, img_size,
                                  timing_cache="timing.cache", tensorrt=example)
            for mode, example in ((STRONG_ONLY, "11.0"), (STRONG, "10.12"), (WEAK, "10.3"))}


def build(sess: ExportSession, work: Path) -> TargetOutcome:
    outcome = TargetOutcome()
    fp32 = export_float(sess, work, outcome)
    precision = _precision(sess.opts.int8, sess.opts.fp16)
    inputs = {"fp32": fp32.name}
    if sess.opts.fp16:
        inputs["fp16"] = _typed_fp16(sess, fp32, work, outcome).name
    if sess.opts.int8:
        inputs["int8"] = _typed_int8(sess, fp32, work, outcome).name
    commands = _write_script(work, inputs, precision, sess.img_size)
    ours = "castling-deploy build-engine ."
    outcome.info.update(precision=precision, onnx_for_engine=inputs[precision], engine_inputs=inputs,
                        trtexec=commands, build_engine=ours, batch_range=list(DEFAULT_BATCH_RANGE),
                        tensorrt_versions="10.0-10.11 weak typing (fallback), 10.12+ and 11.x strongly typed")
    outcome.add("build_engine.sh", "script", "sh on the target device (TensorRT 10.x / 11.x)")
    if tensorrt_available():
        meta = build_engine(work / inputs[precision], work / ENGINE_NAME, precision=precision,
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
