"""The error budget: compare an artifact's logits with the reference, against goals (one row = one stage).

Reference = the folded float model in PyTorch. Every stage of the error budget (fold, export, fp16, int8) is
a ``StageResult``; a failed goal raises ``ToleranceError`` after the report is written — never a warning.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

DEFAULT_TOLERANCE_POINTS = 0.5
# atol on |Δlogit| for float artifacts, per precision (Optimum keeps tolerances with the model family;
# ours are per precision because the model family is one).
FLOAT_ATOL = {"fp32": 1e-4, "fp16": 5e-2}


def logit_metrics(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """max |Δlogit|, mean |Δ|, cosine (flattened, and worst per sample), SQNR dB, top-1 agreement, accuracies."""
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"logit shapes differ: reference {ref.shape} vs artifact {out.shape}")
    diff = out - ref
    denom = np.linalg.norm(ref) * np.linalg.norm(out)
    cos = float(np.dot(ref.ravel(), out.ravel()) / denom) if denom > 0 else float("nan")
    per = (ref * out).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1), 1e-30)
    noise = float((diff**2).sum())
    sqnr = float(10 * np.log10((ref**2).sum() / noise)) if noise > 0 else float("inf")
    ref_top1, out_top1 = ref.argmax(1), out.argmax(1)
    m: dict[str, Any] = {
        "n": int(len(ref)),
        "max_abs_logit": float(np.abs(diff).max()) if diff.size else 0.0,
        "mean_abs_logit": float(np.abs(diff).mean()) if diff.size else 0.0,
        "cosine": cos,
        "min_sample_cosine": float(per.min()) if len(per) else float("nan"),
        "mean_sample_cosine": float(per.mean()) if len(per) else float("nan"),
        "sqnr_db": sqnr,
        "top1_agreement": float((ref_top1 == out_top1).mean()),
    }
    if labels is not None:
        labels = np.asarray(labels)
        ref_acc = float((ref_top1 == labels).mean() * 100)
        acc = float((out_top1 == labels).mean() * 100)
        m.update(ref_top1_acc=ref_acc, top1_acc=acc, top1_drop_points=ref_acc - acc)
    return m


@dataclass
class StageResult:
    """One row of the error budget: ``stage`` compares ``candidate`` against ``reference``."""

    stage: str
    reference: str
    candidate: str
    executor: str
    metrics: dict[str, Any]
    goals: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    id: str | None = None  # unique within a report (set by report.Report.add_stage); artifacts refer to it

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["id"] is None:
            del d["id"]
        d["passed"] = self.passed
        return d


def accuracy_goal_failures(top1_drop_points: float | None, top1_agreement: float, tolerance_points: float, *,
                           min_agreement: float | None = None, goals: dict[str, Any] | None = None) -> list[str]:
    """The one accept/reject rule: with labels, top-1 drop (points) <= tolerance; without, top-1 agreement
    >= 1 - tolerance/100 (``min_agreement`` overrides the agreement goal). ``goals`` receives what was applied."""
    goals = {} if goals is None else goals
    failures: list[str] = []
    if top1_drop_points is not None:
        goals["max_top1_drop_points"] = tolerance_points
        if top1_drop_points > tolerance_points + 1e-9:
            failures.append(f"top-1 drop {top1_drop_points:.2f} points > tolerance {tolerance_points} points")
    agree_goal = min_agreement if min_agreement is not None else (
        None if top1_drop_points is not None else 1 - tolerance_points / 100)
    if agree_goal is not None:
        goals["min_top1_agreement"] = agree_goal
        if top1_agreement < agree_goal - 1e-9:
            failures.append(f"top-1 agreement {top1_agreement:.4f} < {agree_goal:.4f}")
    return failures


def check_stage(
    stage: str,
    reference: str,
    candidate: str,
    executor: str,
    ref_logits: np.ndarray,
    logits: np.ndarray,
    labels: np.ndarray | None,
    *,
    tolerance_points: float = DEFAULT_TOLERANCE_POINTS,
    atol: float | None = None,
    min_agreement: float | None = None,
) -> StageResult:
    """Compute metrics and evaluate goals: top-1 drop <= tolerance (with labels), else top-1 agreement >=
    ``1 - tolerance/100``; ``atol`` on max |Δlogit| for float artifacts."""
    if not np.isfinite(tolerance_points) or tolerance_points < 0:
        raise ValueError(f"tolerance must be a finite number of points >= 0, got {tolerance_points}")
    m = logit_metrics(ref_logits, logits, labels)
    goals: dict[str, Any] = {}
    failures: list[str] = []
    if not np.isfinite(logits).all():
        failures.append("artifact produced NaN/Inf logits")
    failures += accuracy_goal_failures(m.get("top1_drop_points"), m["top1_agreement"], tolerance_points,
                                       min_agreement=min_agreement, goals=goals)
    if atol is not None:
        goals["atol"] = atol
        if not m["max_abs_logit"] <= atol:
            failures.append(f"max |Δlogit| {m['max_abs_logit']:.3g} > atol {atol:g}")
    return StageResult(stage, reference, candidate, executor, m, goals, failures)


def format_budget(stages: list[StageResult | dict]) -> str:
    """The error-budget table printed after every export."""
    rows = [s.to_dict() if isinstance(s, StageResult) else s for s in stages]
    head = f"{'stage':<10} {'compared':<34} {'max|Δ|':>9} {'cosine':>9} {'agree%':>7} {'top1%':>7} {'drop':>6}  result"
    lines = ["error budget (each stage vs its reference)", head, "-" * len(head)]
    for r in rows:
        m = r["metrics"]
        acc = f"{m['top1_acc']:.2f}" if "top1_acc" in m else "-"
        drop = f"{m['top1_drop_points']:+.2f}" if "top1_drop_points" in m else "-"
        status = "ok" if r["passed"] else "FAILED: " + "; ".join(r["failures"])
        comp = f"{r['reference']} → {r['candidate']}"[:34]
        lines.append(
            f"{r['stage']:<10} {comp:<34} {m['max_abs_logit']:>9.2e} {m['cosine']:>9.6f} "
            f"{m['top1_agreement'] * 100:>7.2f} {acc:>7} {drop:>6}  {status}"
        )
    return "\n".join(lines)
