"""LiteRT / TFLite target: FP32 (always, the export stage), FP16 weights (--fp16), hybrid INT8 through
litert-torch's PT2E quantizer (--int8), or full-integer through ai-edge-quantizer (--int8 --full-integer),
each verified with the ai-edge-litert interpreter."""
from __future__ import annotations

import logging
from pathlib import Path

from ..base import ExportSession, TargetOutcome

log = logging.getLogger(__name__)
DELEGATION_RUNS = 5  # timed invokes per kernel set for the delegation census
TRACE_IMAGES = 4  # calibration images the per-tensor error trace runs on


def _error_trace(fp32: bytes, quantized: Path, images) -> dict:
    """Per-tensor SQNR of the full-integer model against its fp32 twin: where the signal is first lost."""
    from .trace import first_loss, trace_tensors, worst_drops

    rows = trace_tensors(fp32, quantized, images[:TRACE_IMAGES])
    return {"images": min(TRACE_IMAGES, len(images)), "first_below_20db": first_loss(rows, 20.0),
            "worst_drops": worst_drops(rows, 10), "output_sqnr_db": rows[-1]["sqnr_db"] if rows else None,
            "tensors": [{k: r[k] for k in ("position", "op", "dtype", "sqnr_db")} for r in rows]}


def census_summary(c: dict) -> str:
    """One line on the .tflite's tensor types, read from the flatbuffer itself."""
    return (f"tensors {c['tensor_dtypes']}; float activations besides I/O: "
            f"{c['float_activation_tensors_excluding_io']}; I/O {c['io_dtypes']}")


def build(sess: ExportSession, work: Path) -> TargetOutcome:
    from ...runtime.litert import LiteRTRunner
    from .census import delegation_census
    from .convert import convert_tflite, tflite_census

    opts = sess.opts
    outcome = TargetOutcome()

    def convert(mode: str, name: str, io_dtype: str = "float32", metadata: dict[str, str] | None = None) -> Path:
        calib = sess.require_calib().images if mode in ("int8", "full_integer") else None
        log.info("converting to LiteRT %s", mode)
        path = work / name
        outcome.info[mode] = convert_tflite(sess.folded, path, mode=mode, calib_images=calib, img_size=sess.img_size,
                                            io_dtype=io_dtype, metadata=metadata or sess.metadata,
                                            class_token_int16=not opts.option("strict_int8"))
        outcome.info.setdefault("delegation", {})[name] = delegation_census(path, runs=DELEGATION_RUNS)
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
        int16_ops = (outcome.info[mode].get("activation_ranges") or {}).get("int16_ops", {})
        outcome.quantization = {
            "recipe": {"mode": mode, "io_dtypes": census.get("io_dtypes"),
                       "tool": f"{outcome.info[mode].get('quantizer', 'LiteRT quantizer')} static_wi8_ai8 "
                               "(symmetric BATCH_MATMUL activations), global min/max narrowed to MSE-optimal clips"
                               + ("; class-token path 16x8" if any(int16_ops.values()) else "")
                               if full_integer
                       else "litert-torch PT2EQuantizer (per-channel weights, static activations)",
                       "notes": outcome.info[mode].get("notes"),
                       "activation_ranges": outcome.info[mode].get("activation_ranges")},
            "census": census,
            "delegation": outcome.info["delegation"][name],
            "calibration": calib.describe() | {"used": len(calib)},
        }
        twin = outcome.info[mode].pop("float_twin", None)
        if full_integer and twin is not None:
            outcome.quantization["error_trace"] = _error_trace(twin, p, calib.images)
        stage = sess.verify("int8", f"LiteRT {mode} ({name})", LiteRTRunner(p), precision="int8")
        outcome.stages.append(stage)
        outcome.add(name, mode, "LiteRT / TFLite (XNNPACK, NPU)", stage)
    return outcome
