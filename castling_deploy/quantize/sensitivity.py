"""Per-block INT8 sensitivity and automatic float fallback.

Sweep: quantize one transformer block at a time (every other block, the patch Conv and the head float) and
measure the logits against the float reference: SQNR in dB and top-1 agreement. Fallback: keep the fewest,
most sensitive blocks in float until the accuracy goal holds. Calibration ranges are cached per (model, data,
method), so each trial costs one quantization pass and one evaluation, not a new calibration.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..budget import accuracy_goal_failures
from ..budget import logit_metrics as verify_logit_metrics
from ..errors import UsageError
from ..output import run_temp_dir
from .calibration import CalibrationSet
from .recipe import QuantRecipe

log = logging.getLogger(__name__)


def logit_metrics(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    """The verification metrics (castling_deploy.budget.logit_metrics) in the sweep's row format:
    SQNR (dB), min/mean per-sample cosine, max |diff|, top-1 agreement, accuracy as fractions when labels exist."""
    v = verify_logit_metrics(ref, out, labels)
    m = {
        "sqnr_db": round(v["sqnr_db"], 3),
        "cosine_min": v["min_sample_cosine"],
        "cosine_mean": v["mean_sample_cosine"],
        "max_abs_diff": v["max_abs_logit"],
        "top1_agreement": v["top1_agreement"],
    }
    if labels is not None:
        m["top1_acc"] = v["top1_acc"] / 100
        m["ref_top1_acc"] = v["ref_top1_acc"] / 100
        m["top1_drop_points"] = round(v["top1_drop_points"], 4)
    return m


def meets_goal(metrics: dict[str, float], tolerance_points: float) -> bool:
    """Top-1 drop <= tolerance with labels; without labels, top-1 agreement >= 1 - tolerance/100."""
    return not accuracy_goal_failures(metrics.get("top1_drop_points"), metrics["top1_agreement"], tolerance_points)


def _evaluate(
    fp32_onnx: Path, calib: CalibrationSet, recipe: QuantRecipe, images: np.ndarray, ref: np.ndarray,
    labels: np.ndarray | None, work: Path, cache_dir: str | Path | None, batch: int,
) -> dict[str, Any]:
    from ..runtime.base import run_batched
    from ..runtime.ort import OrtRunner
    from .ort_int8 import quantize_onnx

    out = work / "trial.onnx"
    rep = quantize_onnx(fp32_onnx, out, calib, recipe, cache_dir=cache_dir, batch=batch)
    logits = run_batched(OrtRunner(out), images)
    return {**logit_metrics(ref, logits, labels), "int8_mac_fraction": rep["census"]["int8_mac_fraction"]}


def _depth(fp32_onnx: Path) -> int:
    import onnx

    from .graph import classify_nodes, depth_of

    return depth_of(classify_nodes(onnx.load(str(fp32_onnx))))


def sensitivity_sweep(
    fp32_onnx: str | Path,
    calib: CalibrationSet,
    recipe: QuantRecipe,
    eval_images: np.ndarray,
    ref_logits: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    cache_dir: str | Path | None = None,
    batch: int = 8,
) -> list[dict[str, Any]]:
    """One row per block (that block int8 with the recipe's kinds, all else float) plus an ``all`` row (the recipe
    as given, every non-excluded block int8). Rows: unit, block, sqnr_db, top1_agreement, cosine, max diff."""
    fp32_onnx = Path(fp32_onnx)
    if len(eval_images) != len(ref_logits):
        raise UsageError(f"{len(eval_images)} evaluation images but {len(ref_logits)} reference logits")
    depth = _depth(fp32_onnx)
    block_kinds = tuple(k for k in recipe.int8_kinds if k not in ("patch_embed", "head"))
    rows: list[dict[str, Any]] = []
    with run_temp_dir("sens") as tmp:
        for b in range(depth):
            r = recipe.with_(int8_kinds=block_kinds, excluded_blocks=tuple(i for i in range(depth) if i != b))
            m = _evaluate(fp32_onnx, calib, r, eval_images, ref_logits, labels, Path(tmp), cache_dir, batch)
            rows.append({"unit": f"blocks.{b}", "block": b, **m})
            log.info("sensitivity blocks.%d: %.2f dB, agreement %.4f", b, m["sqnr_db"], m["top1_agreement"])
        m = _evaluate(fp32_onnx, calib, recipe, eval_images, ref_logits, labels, Path(tmp), cache_dir, batch)
        rows.append({"unit": "all", "block": None, **m})
    return rows


def auto_fallback(
    fp32_onnx: str | Path,
    calib: CalibrationSet,
    recipe: QuantRecipe,
    eval_images: np.ndarray,
    ref_logits: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    tolerance_points: float = 0.5,
    rows: list[dict[str, Any]] | None = None,
    max_float_blocks: int | None = None,
    cache_dir: str | Path | None = None,
    batch: int = 8,
) -> tuple[QuantRecipe, list[dict[str, Any]]]:
    """Return the recipe with the fewest blocks in float (most sensitive = lowest SQNR first) that meets the goal,
    and every trial (excluded blocks, metrics, passed). If no trial passes, the last (most-float) recipe comes back
    with all trials marked failed; the caller raises ToleranceError with the report."""
    fp32_onnx = Path(fp32_onnx)
    trials: list[dict[str, Any]] = []
    with run_temp_dir("fallback") as tmp:

        def attempt(r: QuantRecipe) -> bool:
            m = _evaluate(fp32_onnx, calib, r, eval_images, ref_logits, labels, Path(tmp), cache_dir, batch)
            ok = meets_goal(m, tolerance_points)
            trials.append({"excluded_blocks": list(r.excluded_blocks), **m, "passed": ok})
            return ok

        if attempt(recipe):
            return recipe, trials
        if rows is None:
            rows = sensitivity_sweep(fp32_onnx, calib, recipe, eval_images, ref_logits, labels,
                                     cache_dir=cache_dir, batch=batch)
        order = [r["block"] for r in sorted((r for r in rows if r["block"] is not None),
                                            key=lambda r: (r["sqnr_db"], r["top1_agreement"]))]
        order = [b for b in order if b not in recipe.excluded_blocks]
        limit = len(order) if max_float_blocks is None else min(max_float_blocks, len(order))
        current = recipe
        for n in range(1, limit + 1):
            current = recipe.with_(excluded_blocks=tuple(recipe.excluded_blocks) + tuple(order[:n]))
            if attempt(current):
                return current, trials
    return current, trials


def format_sensitivity_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of a sweep (or of fallback trials), most sensitive block first."""
    has_acc = any("top1_acc" in r for r in rows)
    head = "| unit | SQNR dB | cosine min | top-1 agree |" + (" top-1 acc | drop pts |" if has_acc else "")
    sep = "|---|---:|---:|---:|" + ("---:|---:|" if has_acc else "")
    lines = [head, sep]
    blocks = sorted((r for r in rows if r.get("block") is not None), key=lambda r: r["sqnr_db"])
    rest = [r for r in rows if r.get("block") is None]
    for r in blocks + rest:
        unit = r.get("unit") or f"float blocks {r.get('excluded_blocks')}"
        line = f"| {unit} | {r['sqnr_db']:.2f} | {r['cosine_min']:.5f} | {r['top1_agreement']:.4f} |"
        if has_acc:
            line += f" {r.get('top1_acc', float('nan')):.4f} | {r.get('top1_drop_points', float('nan')):.2f} |"
        lines.append(line)
    return "\n".join(lines)
