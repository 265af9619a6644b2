"""Core ML target: FP16 mlprogram (default), W8 (--int8 --weights-only) or W8A8 (--int8), verified on Linux by
our MIL reference interpreter (on macOS by Core ML's own predict). The FP32 conversion is verified too, as the
"export" stage of the error budget, but not shipped.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ...output import run_temp_dir
from ..base import ExportSession, TargetOutcome

log = logging.getLogger(__name__)
RUNTIME = "Core ML (iOS 17+/macOS 14+)"


def census_summary(c: dict) -> str:
    """One line on how much of the Core ML artifact is int8, read from the package itself."""
    return (f"{c['int8_weight_fraction'] * 100:.1f}% of weights int8; {c['quantize_ops']} activation quantize "
            f"ops; activations quantized: {c['activation_quantized']}")


def build(sess: ExportSession, work: Path) -> TargetOutcome:
    from ...runtime.coreml import load_coreml_runner
    from .convert import ane_report, convert_coreml, coreml_census

    opts, pp = sess.opts, sess.ckpt.preprocess
    outcome = TargetOutcome()

    def convert(mode: str, path: Path) -> dict:
        calib = sess.require_calib().images if mode == "w8a8" else None
        log.info("converting to Core ML %s", mode)
        return convert_coreml(sess.folded, path, mode=mode, calib_images=calib, img_size=sess.img_size,
                              mean=pp["mean"], std=pp["std"], labels=sess.ckpt.labels, metadata=sess.metadata,
                              input_type="image")

    with run_temp_dir("coreml-fp32") as tmp:
        fp32 = Path(tmp) / "model_fp32.mlpackage"
        outcome.info["fp32"] = convert("fp32", fp32)
        outcome.stages.append(sess.verify("export", "Core ML fp32 (not shipped)", load_coreml_runner(fp32),
                                          precision="fp32", shipped=False))
    shipped = work / "model.mlpackage"
    outcome.info["fp16"] = convert("fp16", shipped)
    runner = load_coreml_runner(shipped)
    stage = sess.verify("fp16", "Core ML fp16 (model.mlpackage)", runner, precision="fp16")
    outcome.stages.append(stage)
    outcome.add(shipped.name, "fp16", RUNTIME, stage)
    outcome.info["ane"] = ane_report(shipped)
    outcome.info["executor"] = runner.name
    if opts.int8:
        mode = "w8" if opts.option("weights_only") else "w8a8"
        q = work / "model.int8.mlpackage"
        info = convert(mode, q)
        outcome.quantization = {"recipe": {"mode": mode, **{k: info.get(k) for k in ("quantization", "notes")}},
                                "census": coreml_census(q), "calibration": sess.calib.describe()
                                if (sess.calib and mode == "w8a8") else None}
        outcome.info[mode] = info
        stage = sess.verify("int8", f"Core ML {mode.upper()} (model.int8.mlpackage)", load_coreml_runner(q),
                            precision="int8")
        outcome.stages.append(stage)
        outcome.add(q.name, mode, RUNTIME, stage)
    return outcome
