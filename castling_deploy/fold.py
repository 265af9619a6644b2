"""Training form -> deploy form, with the effect of every rewrite measured, never assumed.

One protocol: ``fold_softmax_branch(model)`` returns a *copy* in deploy form (the masked softmax branch
dropped; its weights are shared with nothing, so nothing else changes). ``with_norm_form`` is the exact rewrite
``x/||x|| -> x*rsqrt(sum(x*x))`` that full-integer backends need; both are checked numerically by the callers
through ``measure_fold`` / ``check_exact_rewrite``.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .data import ImageSet
from .errors import CheckpointError, ToleranceError
from .models.macs import count_macs, count_params
from .models.vit import CastlingViT
from .budget import DEFAULT_TOLERANCE_POINTS, StageResult, check_stage

log = logging.getLogger(__name__)

MIN_FOLD_AGREEMENT = 0.99


def fold_softmax_branch(model: CastlingViT) -> CastlingViT:
    """A deploy-form copy of ``model``: linear-angular attention only, O(N d^2)."""
    folded = copy.deepcopy(model).eval()
    for attn in folded.castling_attentions():
        attn.sparse_reg = False
        attn.branch_stats = None
    folded.cfg = folded.cfg.with_(form="deploy")
    return folded


def with_norm_form(model: CastlingViT, form: str) -> CastlingViT:
    """A copy whose L2 norms use ``form`` ("div" or "rsqrt"); an exact rewrite up to float rounding."""
    out = copy.deepcopy(model).eval()
    for attn in out.castling_attentions():
        attn.norm_form = form
    return out


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, batch: int = 64) -> np.ndarray:
    model.eval()
    outs = [model(torch.from_numpy(images[i : i + batch])).numpy() for i in range(0, len(images), batch)]
    return np.concatenate(outs).astype(np.float32)


def check_exact_rewrite(a: torch.nn.Module, b: torch.nn.Module, images: np.ndarray, atol: float = 1e-4) -> float:
    """max |Δlogit| between two forms that must be equal; raises if they are not."""
    diff = float(np.abs(predict(a, images) - predict(b, images)).max())
    if diff > atol:
        raise ToleranceError(f"an exact rewrite changed logits by {diff:.3g} > {atol:g}; this is a bug, please report it")
    return diff


@torch.no_grad()
def branch_ratios(model: CastlingViT, images: np.ndarray, batch: int = 64) -> list[dict[str, float]]:
    """Per block, ``||sparse@v|| / ||0.5v + q̂(k̂ᵀv)/π||`` over the images (mean and max over samples)."""
    attns = model.castling_attentions()
    for a in attns:
        a.branch_stats = []
    try:
        predict(model, images, batch)
        rows = []
        for i, a in enumerate(attns):
            stats = a.branch_stats or []
            means = [m for m, _ in stats]
            maxes = [x for _, x in stats]
            rows.append({"block": i, "mean_ratio": float(np.mean(means)) if means else 0.0,
                         "max_ratio": float(np.max(maxes)) if maxes else 0.0})
        return rows
    finally:
        for a in attns:
            a.branch_stats = None


@dataclass
class FoldReport:
    form_in: str
    data: dict[str, Any]
    blocks: list[dict[str, float]]
    stage: StageResult | None
    macs: dict[str, int]
    params: int
    forced: bool = False
    notes: list[str] = field(default_factory=list)
    earlier: dict[str, Any] | None = None  # the record of a fold done before (a deploy-form checkpoint's history)

    @property
    def passed(self) -> bool:
        return self.stage is None or self.stage.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "form_in": self.form_in,
            "data": self.data,
            "branch_ratio_per_block": self.blocks,
            "stage": self.stage.to_dict() if self.stage else None,
            "macs": self.macs,
            "params": self.params,
            "passed": self.passed,
            "forced": self.forced,
            "notes": self.notes,
            "earlier": self.earlier,
        }


def fold_model(
    model: CastlingViT,
    data: ImageSet,
    *,
    tolerance_points: float = DEFAULT_TOLERANCE_POINTS,
    force: bool = False,
) -> tuple[CastlingViT, FoldReport]:
    """Fold and measure. Raises ToleranceError (exit 3) when the branch still matters, unless ``force``."""
    cfg = model.cfg
    img = cfg.img_size
    folded = fold_softmax_branch(model) if cfg.attention == "castling" else copy.deepcopy(model).eval()
    baseline = CastlingViT(cfg.with_(attention="softmax", form="deploy"))
    macs = {
        "training_form": count_macs(model, img, cfg.in_chans),
        "deploy_form": count_macs(folded, img, cfg.in_chans),
        "softmax_baseline": count_macs(baseline, img, cfg.in_chans),
    }
    notes: list[str] = []
    if data.labels is None and data.digest.startswith("random"):
        notes.append("measured on seeded random inputs: no --calib images given, so accuracy was not measured")
    if cfg.attention != "castling" or cfg.form == "deploy":
        kind = "softmax attention" if cfg.attention != "castling" else "deploy form"
        notes.append(f"checkpoint is already {kind}: nothing to fold")
        form_in = "softmax" if cfg.attention != "castling" else cfg.form
        return folded, FoldReport(form_in, data.describe(), [], None, macs, count_params(folded), force, notes)
    blocks = branch_ratios(model, data.images)
    ref = predict(model, data.images)
    out = predict(folded, data.images)
    if not (np.isfinite(ref).all() and np.isfinite(out).all()):
        # Finite weights (checked at load) that still overflow: nothing downstream could be verified.
        raise CheckpointError(f"the model produces NaN/Inf logits on {data.source}; its weights overflow float32, "
                              "refusing to fold (even with --force)")
    stage = check_stage(
        "fold", "training form", "folded (deploy form)", f"torch {torch.__version__} CPU", ref, out, data.labels,
        tolerance_points=tolerance_points, min_agreement=MIN_FOLD_AGREEMENT,
    )
    report = FoldReport(cfg.form, data.describe(), blocks, stage, macs, count_params(folded), force, notes)
    if not stage.passed:
        if force:
            report.notes.append("softmax branch still mattered; folded anyway because of --force: "
                                + "; ".join(stage.failures))
            log.warning("folding despite a live softmax branch (--force): %s", "; ".join(stage.failures))
        else:
            raise FoldRefused(report)
    return folded, report


class FoldRefused(ToleranceError):
    def __init__(self, report: FoldReport) -> None:
        assert report.stage is not None
        self.context: tuple | None = None  # (checkpoint, val set, calib set), set by the export pipeline
        super().__init__(
            "the softmax branch still matters, so folding would change the model ("
            + "; ".join(report.stage.failures)
            + "); train longer with the mask driven to zero, or pass --force to fold anyway and record the drop"
        )
        self.report = report


def format_fold_report(r: FoldReport) -> str:
    lines = []
    if r.blocks:
        lines.append("softmax-branch size per block  ‖sparse@v‖ / ‖0.5v + q̂(k̂ᵀv)/π‖")
        lines.append(f"{'block':>5} {'mean':>10} {'max':>10}")
        for b in r.blocks:
            lines.append(f"{b['block']:>5} {b['mean_ratio']:>10.3e} {b['max_ratio']:>10.3e}")
    if r.stage is not None:
        m = r.stage.metrics
        acc = ""
        if "top1_acc" in m:
            acc = f", top-1 {m['ref_top1_acc']:.2f}% → {m['top1_acc']:.2f}% ({-m['top1_drop_points']:+.2f} pts)"
        lines.append(
            f"fold effect on {m['n']} inputs: max |Δlogit| {m['max_abs_logit']:.3e}, cosine {m['cosine']:.6f}, "
            f"top-1 agreement {m['top1_agreement'] * 100:.2f}%{acc} — {'ok' if r.stage.passed else 'FAILED'}"
        )
    mc = r.macs
    saving = 1 - mc["deploy_form"] / mc["softmax_baseline"]
    vs = f"{saving * 100:.1f}% fewer" if saving >= 0 else f"{-saving * 100:.1f}% more: too few tokens to pay off"
    lines.append(
        f"MACs: training form {mc['training_form'] / 1e6:.2f}M → deploy form {mc['deploy_form'] / 1e6:.2f}M "
        f"(softmax baseline of the same size: {mc['softmax_baseline'] / 1e6:.2f}M; {vs}); params {r.params / 1e6:.3f}M"
    )
    lines.extend(f"note: {n}" for n in r.notes)
    return "\n".join(lines)
