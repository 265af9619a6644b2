"""LiteRT / TFLite target: FP32 (always, the export stage), FP16 weights (--fp16), hybrid INT8 through
litert-torch's PT2E quantizer (--int8), or full-integer through ai-edge-quantizer (--int8 --full-integer),
each verified with the ai-edge-litert interpreter."""
from __future__ import annotations

import logging
from pathlib import Path

from ..base import ExportSession, TargetOutcome

log = logging.getLogger(__name__)


def census_summary(c: dict) -> str:
    """One line on the .tflite's tensor types, read from the flatbuffer itself."""
    return (f"tensors {c['tensor_dtypes']}; float activations besides I/O: "
            f"{c['float_activation_tensors_excluding_io']}; I/O {c['io_dtypes']}")


def build(sess: ExportSession, work: Path) -> TargetOutcome:
    from ...runtime.litert import LiteRTRunner
    from .convert import convert_tflite, tflite_census

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
    stage = sess.verify("export", "LiteRT fp32 (model.tflite)", runner, precision="fp32")
    outcome.stages.append(stage)
    outcome.add(fp32.name, "fp32", "LiteRT / TFLite (XNNPACK)", stage)
    if opts.fp16:
        p = convert("fp16", "model.fp16.tflite")
        stage = sess.verify("fp16", "LiteRT fp16 weights (model.fp16.tflite)", LiteRTRunner(p), precision="fp16")
        outcome.stages.append(stage)
        outcome.add(p.name, "fp16", "LiteRT / TFLite", stage)
    if opts.int8:
        full_integer = opts.option("full_integer")
        mode = "full_integer" if full_integer else "int8"
        name = "model.full_integer.tflite" if full_integer else "model.int8.tflite"
        io = opts.option("io_dtype") if full_integer else "float32"
        meta = None
        if mode == "int8":  # litert-torch's hybrid model hands back int8 logits; say so in the file
            meta = dict(sess.metadata, output="logits: int8, dequantize with the output tensor's scale and zero point")
        p = convert(mode, name, io, meta)
        census = tflite_census(p)
        calib = sess.require_calib()
        outcome.quantization = {
            "recipe": {"mode": mode, "io_dtypes": census.get("io_dtypes"),
                       "tool": "ai-edge-quantizer static_wi8_ai8, global min/max" if full_integer
                       else "litert-torch PT2EQuantizer (per-channel weights, static activations)",
                       "notes": outcome.info[mode].get("notes")},
            "census": census,
            "calibration": calib.describe() | {"used": len(calib)},
        }
        stage = sess.verify("int8", f"LiteRT {mode} ({name})", LiteRTRunner(p), precision="int8")
        outcome.stages.append(stage)
        outcome.add(name, mode, "LiteRT / TFLite (XNNPACK, NPU)", stage)
    return outcome
