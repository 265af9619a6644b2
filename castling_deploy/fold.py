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

from .budget import DEFAULT_TOLERANCE_POINTS, StageResult, check_stage
from .data import ImageSet
from .errors import CheckpointError, ToleranceError
from .models.macs import count_macs, count_params
from .models.vit import CastlingViT, ViTConfig

log = logging.getLogger(__name__)

MIN_FOLD_AGREEMENT = 0.99
# The fold must keep the *function*, not only the predictions: the worst per-input cosine between the logits of
# the training form and the folded model. Measured on castling_nano/digits (359 val images, docs/architecture.md):
# checkpoints whose mask is empty (the shipped demo; a 30-epoch retrain at every snapshot after the threshold ramp)
# fold with cosine exactly 1.0; every snapshot with a live branch had 0.87-0.988, among them one the
# agreement/accuracy gate alone accepted (threshold 0.67: 0.988, agreement 99.7%, accuracy +0.28 pts), and the demo
# at threshold 0 has 0.845 (agreement 99.4%, accuracy +0.56 pts). The INT8 artifacts the pipeline accepts for the
# demo reach 0.9962-0.9976 (ONNX, TensorRT QDQ, LiteRT int8): a fold may cost at most what quantization costs.
MIN_FOLD_SAMPLE_COSINE = 0.995


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


# Activation memory one predict() batch may take; large token counts get smaller batches (the logits are the same).
BATCH_MEMORY_BYTES = 1 << 30


def fitting_batch(model: torch.nn.Module, batch: int) -> int:
    """``batch``, lowered so that one batch's activations (tokens x width, plus heads x tokens^2 where an N x N
    attention matrix exists: the training form's softmax branch, softmax attention) stay near BATCH_MEMORY_BYTES."""
    cfg = getattr(model, "cfg", None)
    if not isinstance(model, CastlingViT) or cfg is None:
        return batch
    n = cfg.num_tokens
    per_image = 4 * n * cfg.embed_dim * (2 + 2 * cfg.mlp_ratio)
    if cfg.attention == "softmax" or any(getattr(a, "sparse_reg", False) for a in model.castling_attentions()):
        per_image += 4 * 3 * cfg.num_heads * n * n  # scores, softmax, mask
    return max(1, min(batch, int(BATCH_MEMORY_BYTES // per_image)))


def _macs(cfg: ViTConfig) -> int:
    """MACs of ``cfg`` counted on the meta device: nothing is allocated, whatever the token count."""
    with torch.device("meta"):
        return count_macs(CastlingViT(cfg), cfg.img_size, cfg.in_chans)


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, batch: int = 64) -> np.ndarray:
    model.eval()
    batch = fitting_batch(model, batch)
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
    accepted_on: str = "logits and accuracy"  # or "accuracy only" (--accept-accuracy-only), recorded
    # Set by the export pipeline with --int8: the channel-scale migration (quantize/migrate.py) and its stage.
    migration: Any = None  # quantize.migrate.Migration
    migration_stage: StageResult | None = None

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
            "accepted_on": self.accepted_on,
            "migration": self.migration.to_dict() if self.migration is not None else None,
        }


def fold_model(
    model: CastlingViT,
    data: ImageSet,
    *,
    tolerance_points: float = DEFAULT_TOLERANCE_POINTS,
    force: bool = False,
    accept_accuracy_only: bool = False,
) -> tuple[CastlingViT, FoldReport]:
    """Fold and measure. Raises FoldRefused (exit 3) when the branch still matters, unless ``force``.

    The gate: top-1 agreement >= MIN_FOLD_AGREEMENT and the accuracy tolerance (with labels), *and* logit
    fidelity, min per-input cosine >= MIN_FOLD_SAMPLE_COSINE. ``accept_accuracy_only`` waives the logit goal only
    (the report records it: ``accepted_on`` "accuracy only", a note, the stage's goals)."""
    cfg = model.cfg
    folded = fold_softmax_branch(model) if cfg.attention == "castling" else copy.deepcopy(model).eval()
    macs = {
        "training_form": _macs(model.cfg),
        "deploy_form": _macs(folded.cfg),
        "softmax_baseline": _macs(cfg.with_(attention="softmax", form="deploy")),
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
    _logit_gate(report, stage, accept_accuracy_only)
    if not stage.passed:
        if force:
            report.notes.append("softmax branch still mattered; folded anyway because of --force: "
                                + "; ".join(stage.failures))
            log.warning("folding despite a live softmax branch (--force): %s", "; ".join(stage.failures))
        else:
            raise FoldRefused(report)
    return folded, report


def logit_gate_failure(metrics: dict[str, Any]) -> str | None:
    """The fold's logit-fidelity goal (min per-input cosine), as a failure line, or None when it holds."""
    c = metrics.get("min_sample_cosine")
    if c is None or not np.isfinite(c) or c >= MIN_FOLD_SAMPLE_COSINE:
        return None
    return (f"min per-input logit cosine {c:.4f} < {MIN_FOLD_SAMPLE_COSINE} (the softmax branch changes the "
            f"function; max |Δlogit| {metrics['max_abs_logit']:.3g})")


def _logit_gate(report: FoldReport, stage: StageResult, accept_accuracy_only: bool) -> None:
    stage.goals["min_sample_cosine"] = MIN_FOLD_SAMPLE_COSINE
    failure = logit_gate_failure(stage.metrics)
    if accept_accuracy_only:
        stage.goals["accepted_on"] = report.accepted_on = "accuracy only"
    if failure is None:
        return
    if accept_accuracy_only:
        report.notes.append("accepted on accuracy and agreement only (--accept-accuracy-only) although "
                            + failure + "; the deployed model is not the trained function")
        log.warning("fold accepted on accuracy only: %s", failure)
    else:
        stage.failures.append(failure)


class FoldRefused(ToleranceError):
    def __init__(self, report: FoldReport) -> None:
        assert report.stage is not None
        self.context: tuple | None = None  # (checkpoint, val set, calib set), set by the export pipeline
        super().__init__(
            "the softmax branch still matters, so folding would change the model ("
            + "; ".join(report.stage.failures)
            + "); train longer with the mask driven to zero, "
            + ("--accept-accuracy-only to accept a fold that keeps accuracy but not the logits, "
               if accuracy_kept(report) else "")
            + "or pass --force to fold anyway and record the drop"
        )
        self.report = report


def accuracy_kept(report: FoldReport) -> bool:
    """Whether the only failed goal of a refused fold is logit fidelity (so --accept-accuracy-only would pass)."""
    return report.stage is not None and bool(report.stage.failures) and all(
        f.startswith("min per-input logit cosine") for f in report.stage.failures)


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
            f"fold effect on {m['n']} inputs: max |Δlogit| {m['max_abs_logit']:.3e}, cosine {m['cosine']:.6f} "
            f"(min per input {m['min_sample_cosine']:.6f}), top-1 agreement {m['top1_agreement'] * 100:.2f}%{acc}"
            f" — {'ok' if r.stage.passed else 'FAILED'}" + (" (accepted on accuracy only)"
                                                            if r.accepted_on == "accuracy only" else "")
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
