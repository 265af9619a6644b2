"""ExecuTorch target: ``model.pte`` (fp32, the export stage), ``model.fp16.pte`` (--fp16) and ``model.int8.pte``
(--int8, XNNPACK quantizer calibrated on --calib), all XNNPACK-delegated, each verified by running it with
ExecuTorch's runtime against the folded model, with a delegation census and the runtime's own latency (ETDump)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..base import ExportSession, TargetOutcome

log = logging.getLogger(__name__)
RUNTIME = "ExecuTorch (XNNPACK delegate; Android, iOS, Linux)"
PROFILE_RUNS, PROFILE_WARMUP = 20, 3


def census_summary(c: dict) -> str:
    """One line on what XNNPACK took over and how much of the arithmetic is int8, read from the .pte."""
    portable = ", ".join(f"{k} x{v}" for k, v in c["portable_ops"].items()) or "none"
    int8 = f"; {c['int8_mac_fraction'] * 100:.1f}% of MACs int8" if c.get("int8_mac_fraction") else ""
    return (f"XNNPACK: {sum(c['delegated_ops'].values())} ops in {sum(c['delegate_calls'].values())} delegate "
            f"call(s), {c['delegated_mac_fraction'] * 100:.1f}% of MACs{int8}; portable kernels: {portable}")


def _runtime_profile(path: Path) -> dict[str, Any]:
    """A short latency sample with ExecuTorch's own timer (indicative: the build machine, its default pool)."""
    from ...runtime.executorch import etdump_profile

    try:
        return etdump_profile(path, runs=PROFILE_RUNS, warmup=PROFILE_WARMUP)
    except Exception as exc:  # a runtime without the event tracer must not fail the export
        log.warning("ExecuTorch ETDump profile of %s failed: %s", path.name, exc)
        return {"error": str(exc)}


def build(sess: ExportSession, work: Path) -> TargetOutcome:
    from ...runtime.executorch import ExecuTorchRunner
    from .convert import convert_executorch

    opts = sess.opts
    outcome = TargetOutcome()
    outcome.info["runtime_profile"] = {}

    def export(mode: str, name: str, stage_id: str, what: str) -> dict[str, Any]:
        calib = sess.require_calib().images if mode == "int8" else None
        log.info("converting to ExecuTorch %s", mode)
        path = work / name
        info = convert_executorch(sess.folded, path, mode=mode, calib_images=calib, img_size=sess.img_size,
                                  metadata=sess.metadata)
        outcome.info[mode] = info
        runner = ExecuTorchRunner(path)  # the default pool: resizing it under a loaded method crashes
        outcome.info.setdefault("executor", runner.name)
        stage = sess.verify(stage_id, f"ExecuTorch {what} ({name})", runner, precision=mode)
        outcome.stages.append(stage)
        outcome.add(name, mode, RUNTIME, stage)
        outcome.info["runtime_profile"][name] = _runtime_profile(path)
        return info

    export("fp32", "model.pte", "export", "fp32 XNNPACK")
    if opts.fp16:
        export("fp16", "model.fp16.pte", "fp16", "fp16 XNNPACK")
    if opts.int8:
        info = export("int8", "model.int8.pte", "int8", "INT8 XNNPACK (PT2E)")
        calib = sess.require_calib()
        outcome.quantization = {
            "recipe": {"mode": "int8", "tool": "executorch XNNPACKQuantizer (PT2E, torchao convert_pt2e)",
                       "weights": "int8 per-channel symmetric", "activations": "int8 per-tensor, histogram observer",
                       "quantized_ops": ["linear", "conv2d"], "notes": info["notes"]},
            "census": info["census"],
            "calibration": calib.describe() | {"used": info.get("calib_images", len(calib))},
        }
    return outcome
