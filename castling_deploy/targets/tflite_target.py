"""LiteRT / TFLite target: FP32 (always, the export stage), FP16 weights (--fp16), hybrid INT8 through
litert-torch's PT2E quantizer (--int8), or full-integer through ai-edge-quantizer (--int8 --full-integer),
each verified with the ai-edge-litert interpreter."""
from __future__ import annotations

import logging
from pathlib import Path

from ..pipeline import ExportSession, TargetOutcome

log = logging.getLogger(__name__)


def build(sess: ExportSession, work: Path) -> TargetOutcome:
    from ..runtime.litert import LiteRTRunner
    from .tflite import convert_tflite, tflite_census

    opts = sess.opts
    outcome = TargetOutcome()

    def convert(mode: str, name: str, io_dtype: str = "float32", metadata: dict[str, str] | None = None) -> Path:
        calib = sess.require_calib().images if mode in ("int8", "full_integer") else None
        log.info("converting to LiteRT %s", mode)
        path = work / name
        outcome.info[mode] = convert_tflite(sess.folded, path, mode=mode, calib_images=calib, img_size=sess.img_size,
                                            io_dtype=io_dtype, metadata=metadata or sess.metadata)
        return path

    fp32 = convert("fp32", "model.tflite")
    runner = LiteRTRunner(fp32)
    outcome.info["executor"] = runner.name
    outcome.stages.append(sess.verify("export", "LiteRT fp32 (model.tflite)", runner, precision="fp32"))
    outcome.artifacts.append({"file": fp32.name, "precision": "fp32", "runtime": "LiteRT / TFLite (XNNPACK)"})
    if opts.fp16:
        p = convert("fp16", "model.fp16.tflite")
        outcome.stages.append(sess.verify("fp16", "LiteRT fp16 weights (model.fp16.tflite)", LiteRTRunner(p),
                                          precision="fp16"))
        outcome.artifacts.append({"file": p.name, "precision": "fp16", "runtime": "LiteRT / TFLite"})
    if opts.int8:
        mode = "full_integer" if opts.full_integer else "int8"
        name = "model.full_integer.tflite" if opts.full_integer else "model.int8.tflite"
        io = opts.io_dtype if opts.full_integer else "float32"
        meta = None
        if mode == "int8":  # litert-torch's hybrid model hands back int8 logits; say so in the file
            meta = dict(sess.metadata, output="logits: int8, dequantize with the output tensor's scale and zero point")
        p = convert(mode, name, io, meta)
        census = tflite_census(p)
        calib = sess.require_calib()
        outcome.quantization = {
            "recipe": {"mode": mode, "io_dtypes": census.get("io_dtypes"),
                       "tool": "ai-edge-quantizer static_wi8_ai8, global min/max" if opts.full_integer
                       else "litert-torch PT2EQuantizer (per-channel weights, static activations)",
                       "notes": outcome.info[mode].get("notes")},
            "census": census,
            "calibration": calib.describe() | {"used": len(calib)},
        }
        outcome.stages.append(sess.verify("int8", f"LiteRT {mode} ({name})", LiteRTRunner(p), precision="int8"))
        outcome.artifacts.append({"file": name, "precision": mode, "runtime": "LiteRT / TFLite (XNNPACK, NPU)"})
    return outcome
