"""ONNX target: float ONNX (the portable base of every other ONNX-fed runtime) and, with --int8, a QDQ model.

The INT8 part is shared with the TensorRT target, which differs in its recipe (weights as Q->DQ pairs, no int32
bias; see ``quantize.recipe.QuantRecipe.for_target``) and in its float graph. The onnx target's INT8 model is for
ONNX Runtime: it quantizes the float graph after ORT's transformer fusions (``quantize.optimize.ort_fuse``: the erf
GELU -> com.microsoft Gelu), measured faster on ORT CPU, and uses 8-bit weights unless ``--weight-bits 7``
(x86 AVX2 without VNNI, whose ORT int8 kernels can saturate). model.onnx stays standard-domain ONNX.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from ...fold import predict
from ...output import new_run_temp_dir, run_temp_dir
from ...runtime.ort import OrtRunner
from ...budget import StageResult
from ..base import ExportSession, TargetOutcome
from .convert import export_onnx

log = logging.getLogger(__name__)

FALLBACK_EVAL_IMAGES = 256


def census_summary(c: dict[str, Any]) -> str:
    """One line on how much of a QDQ ONNX really runs in int8, read from the artifact itself."""
    return (f"{c['int8_compute_nodes']}/{c['compute_nodes']} Conv/MatMul/Gemm in int8 "
            f"({c['int8_mac_fraction'] * 100:.1f}% of MACs); zero points all 0: {c['zero_points_all_zero']}")


def export_float(sess: ExportSession, work: Path, outcome: TargetOutcome, name: str = "model.onnx") -> Path:
    """The verified float ONNX; exported once per run and copied for the next target that needs it."""
    path = work / name
    built = sess.shared.get("float_onnx")
    if built is not None and Path(built[0]).is_file():
        shutil.copy2(built[0], path)
        info, stage = built[1], built[2]
        log.info("float ONNX: reusing the one exported and verified for the previous target")
    else:
        log.info("exporting ONNX (opset %d)", sess.opts.opset)
        info = export_onnx(sess.folded, path, sess.img_size, in_chans=sess.folded.cfg.in_chans,
                           opset=sess.opts.opset, metadata=sess.metadata)
        stage = sess.verify("export", f"ONNX fp32 ({path.name})", OrtRunner(path), precision="fp32")
        keep = new_run_temp_dir("float-onnx") / name  # removed by run_export when the run ends
        shutil.copy2(path, keep)
        sess.shared["float_onnx"] = (keep, info, stage)
    outcome.info["export"] = info
    outcome.stages.append(stage)
    outcome.add(name, "fp32", "onnxruntime / any ONNX runtime", stage)
    return path


def quantize_int8(sess: ExportSession, fp32: Path, out: Path, target: str, outcome: TargetOutcome,
                  candidate: str) -> StageResult:
    """Calibrate, quantize (with the sensitivity sweep / auto-fallback when asked), verify on ORT CPU.

    For target 'onnx' the float graph is first fused for ONNX Runtime (``_ort_fused``) and the weight range follows
    ``--weight-bits``; the TensorRT target quantizes the standard-domain graph with 8-bit weights."""
    if target != "onnx":
        return _quantize_int8(sess, fp32, out, target, outcome, candidate, {}, {})
    bits, bits_info = weight_bits(sess.opts.option("weight_bits"))
    with run_temp_dir("ort-fused") as tmp:
        src, graph_info = _ort_fused(fp32, tmp / fp32.name)
        return _quantize_int8(sess, src, out, target, outcome, candidate, {"reduce_range": bits == 7},
                              {"weight_bits": bits_info, "float_graph": graph_info})


def _quantize_int8(sess: ExportSession, fp32: Path, out: Path, target: str, outcome: TargetOutcome,
                   candidate: str, recipe_changes: dict[str, Any], extra: dict[str, Any]) -> StageResult:
    from ...quantize.calibration import CalibrationSet
    from ...quantize.ort_int8 import quantize_onnx
    from ...quantize.recipe import QuantRecipe
    from ...quantize.sensitivity import auto_fallback, format_sensitivity_table, sensitivity_sweep

    opts = sess.opts
    images = sess.require_calib()
    calib = CalibrationSet(images.images, images.digest, images.source)
    recipe = QuantRecipe.for_target(target, calibration=opts.calib_method, calib_size=opts.calib_size,
                                    seed=opts.seed, **recipe_changes)
    quant: dict[str, Any] = {}
    if opts.auto_fallback or opts.sensitivity:
        # Decisions are made on calibration images, never on the val set that judges the result.
        n = min(FALLBACK_EVAL_IMAGES, len(images))
        eval_x = images.images[:n]
        eval_y = images.labels[:n] if images.labels is not None else None
        ref = predict(sess.folded, eval_x)
        log.info("sensitivity sweep over %d blocks on %d calibration images", sess.folded.cfg.depth, n)
        rows = sensitivity_sweep(fp32, calib, recipe, eval_x, ref, eval_y)
        log.info("per-block INT8 sensitivity (one block int8 at a time)\n%s", format_sensitivity_table(rows))
        quant["sensitivity"] = rows
        if opts.auto_fallback:
            recipe, trials = auto_fallback(fp32, calib, recipe, eval_x, ref, eval_y,
                                           tolerance_points=opts.tolerance, rows=rows)
            quant["fallback_trials"] = trials
            quant["fallback_blocks"] = list(recipe.excluded_blocks)
            log.info("auto-fallback keeps blocks %s in float", list(recipe.excluded_blocks) or "none")
    log.info("quantizing to INT8 QDQ (%s calibration, %d images)", recipe.calibration, min(len(calib), opts.calib_size))
    info = quantize_onnx(fp32, out, calib, recipe)
    quant.update(info)
    if "weight_bits" in extra:
        quant["recipe"]["weights"] += "; " + extra["weight_bits"]["assumes"]
    quant.update(extra)
    if target == "onnx":
        quant["per_op"] = _per_op(out, sess.img_size)
    outcome.quantization = quant
    stage = sess.verify("int8", candidate, OrtRunner(out), precision="int8")
    outcome.stages.append(stage)
    return stage


ASSUMES_DOT_PRODUCT = ("assumes an int8 dot-product CPU (x86 AVX-512 VNNI / AVX-VNNI, ARM dot product); "
                       "x86 AVX2 without VNNI may saturate in ONNX Runtime's int8 kernels: use --weight-bits 7")
FOR_AVX2 = ("7-bit weights (--weight-bits 7) for x86 AVX2 without VNNI, where ONNX Runtime's int8 kernels "
            "saturate 8-bit weights; where they are not needed they cost up to ~2.7 dB logit SQNR (Castling-DeiT-T)")


def weight_bits(chosen: Any) -> tuple[int, dict[str, Any]]:
    """The onnx target's INT8 weight bits (``--weight-bits``; None = not chosen = 8) and what the report records.
    Not chosen on an export host known to lack int8 dot products: a warning, since it is likely the deploy CPU."""
    isa = cpu_isa()
    dot = int8_dot_product(isa)
    bits = 8 if chosen is None else int(chosen)
    if chosen is None and dot is False:
        log.warning("this CPU (%s) has no VNNI / ARM dot product: ONNX Runtime's int8 kernels may saturate with the "
                    "default 8-bit weights of model.int8.onnx; if it is the deploy CPU, export with --weight-bits 7",
                    isa)
    return bits, {"bits": bits, "chosen_by": "default" if chosen is None else "--weight-bits",
                  "assumes": ASSUMES_DOT_PRODUCT if bits == 8 else FOR_AVX2,
                  "export_host_isa": isa, "export_host_int8_dot_product": dot}


def _ort_fused(fp32: Path, dst: Path) -> tuple[Path, dict[str, Any]]:
    """The float graph through ORT's transformer fusions (``dst``), or ``fp32`` itself when fusing fails, fuses
    nothing, or leaves a graph the quantizer cannot map onto blocks. Returns (path to quantize, report entry)."""
    import onnx
    import onnxruntime

    from ...quantize.graph import classify_nodes
    from ...quantize.optimize import ort_fuse

    tool = f"onnxruntime {onnxruntime.__version__} transformers optimizer (model_type vit, opt_level 0)"
    try:
        info = ort_fuse(fp32, dst)
        if not info["fused_ops"]:
            return fp32, {"ort_fused": False, "tool": tool, "reason": "nothing to fuse"}
        classify_nodes(onnx.load(str(dst), load_external_data=False))
    except Exception as exc:  # the fusion is a speed-up; quantizing the graph as exported is still correct
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        log.warning("ORT transformer fusion not used (%s); quantizing the float graph as exported", reason)
        return fp32, {"ort_fused": False, "tool": tool, "reason": reason}
    return dst, {"ort_fused": True, "tool": tool, **info,
                 "note": "com.microsoft contrib ops: model.int8.onnx is for ONNX Runtime (model.onnx is standard ONNX)"}


def _per_op(path: Path, img_size: int) -> dict[str, Any]:
    """Where the INT8 artifact's time goes on ONNX Runtime CPU (1 thread, batch 1), per op type ORT ran; a profile
    that fails is reported as such rather than failing the export."""
    import platform

    from ...quantize.op_profile import op_time_table

    try:
        table = op_time_table(path, runs=10, warmup=3, img_size=img_size)
    except Exception as exc:  # the profile is information only
        log.warning("per-op profile of %s failed: %s", path.name, str(exc).splitlines()[0][:200])
        return {"error": str(exc).splitlines()[0][:200]}
    table["host"] = platform.machine()
    table["isa"] = cpu_isa()
    return table


def cpu_isa() -> str:
    """The x86 int8 features ORT's kernels care about (VNNI avoids the u8*s8 int16 saturation), or the machine."""
    import platform

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    flags = next((set(ln.split(":", 1)[1].split()) for ln in text.splitlines() if ln.startswith(("flags", "Features"))),
                 set())
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm") if f in flags]
    return " ".join(have) or platform.machine()


def int8_dot_product(isa: str | None = None) -> bool | None:
    """Whether a CPU (``cpu_isa()`` text; default this one) has int8 dot products, with which ONNX Runtime's int8
    kernels do not saturate 8-bit weights; None when unknown (no /proc/cpuinfo, other than Apple arm64)."""
    import platform

    isa = cpu_isa() if isa is None else isa
    have = set(isa.split())
    if have & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"}:
        return True
    if have & {"avx2", "avx512f"}:
        return False  # flags were read and none of the above is among them
    if isa == "arm64" and platform.system() == "Darwin":
        return True  # every Apple arm64 CPU has the ARMv8.4 dot product
    return None


def build(sess: ExportSession, work: Path) -> TargetOutcome:
    outcome = TargetOutcome()
    fp32 = export_float(sess, work, outcome)
    if sess.opts.fp16:
        outcome.note(
            "--fp16 does not apply to the plain ONNX target (ONNX Runtime CPU has no fp16 kernels worth using); "
            "the fp32 file is the float artifact")
    if sess.opts.int8:
        stage = quantize_int8(sess, fp32, work / "model.int8.onnx", "onnx", outcome, "ONNX INT8 QDQ (model.int8.onnx)")
        outcome.add("model.int8.onnx", "int8", "onnxruntime (QDQ)", stage)
    return outcome
