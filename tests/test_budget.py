"""The one accept/reject rule and its metrics, at their boundaries: hand-computed metrics, NaN/Inf logits, the
fp16 atol, the tolerance with and without labels, the fold's agreement override."""
from __future__ import annotations

import math

import numpy as np
import pytest

from castling_deploy.budget import FLOAT_ATOL, accuracy_goal_failures, check_stage, logit_metrics


def _stage(ref, out, labels=None, **kw):
    return check_stage("s", "ref", "cand", "numpy", np.asarray(ref, np.float64), np.asarray(out, np.float64),
                       None if labels is None else np.asarray(labels), **kw)


def test_logit_metrics_by_hand() -> None:
    ref = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    out = np.array([[2.0, 0.5, 0.0], [0.0, 1.0, 0.0]])
    m = logit_metrics(ref, out, np.array([0, 2]))
    assert m["n"] == 2 and m["max_abs_logit"] == 0.5 and m["mean_abs_logit"] == pytest.approx(0.5 / 6)
    assert m["cosine"] == pytest.approx(5 / math.sqrt(5 * 5.25))  # <ref,out> / (|ref| |out|)
    assert m["min_sample_cosine"] == pytest.approx(4 / (2 * math.sqrt(4.25)))
    assert m["sqnr_db"] == pytest.approx(10 * math.log10(5 / 0.25))  # sum ref^2 / sum err^2
    assert m["top1_agreement"] == 1.0
    assert (m["ref_top1_acc"], m["top1_acc"], m["top1_drop_points"]) == (50.0, 50.0, 0.0)
    assert logit_metrics(ref, ref)["sqnr_db"] == math.inf and "top1_acc" not in logit_metrics(ref, ref)
    with pytest.raises(ValueError, match="shapes differ"):
        logit_metrics(ref, ref[:1])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the metrics of non-finite logits are NaN; that is the point
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_fail_even_when_every_prediction_agrees(bad: float) -> None:
    ref = np.array([[3.0, 0.0, 1.0], [0.0, 2.0, 1.0]])
    out = ref.copy()
    out[1, 0 if bad == -np.inf else 1] = bad  # NaN/+inf where argmax already points, -inf elsewhere
    assert (out.argmax(1) == ref.argmax(1)).all()  # the accuracy goal alone would pass this artifact
    for labels in (None, [0, 1]):
        s = _stage(ref, out, labels)  # an int8 stage: no atol, so only the finiteness check can catch it
        assert not s.passed and "artifact produced NaN/Inf logits" in s.failures, s.failures


def test_float_atols_are_the_readme_goals_and_inclusive() -> None:
    assert FLOAT_ATOL == {"fp32": 1e-4, "fp16": 5e-2}  # README: "an atol (1e-4 fp32, 5e-2 fp16)"
    ref = np.array([[1.0, 0.0, 0.0]])
    at = ref.copy()
    at[0, 1] = FLOAT_ATOL["fp16"]  # |Δ| exactly at the goal
    above = ref.copy()
    above[0, 1] = np.nextafter(FLOAT_ATOL["fp16"], 1.0)  # one float64 step above it
    assert _stage(ref, at, [0], atol=FLOAT_ATOL["fp16"]).passed
    s = _stage(ref, above, [0], atol=FLOAT_ATOL["fp16"])
    assert not s.passed and s.failures == [f"max |Δlogit| {above[0, 1]:.3g} > atol 0.05"]
    assert s.goals["atol"] == 0.05 and s.metrics["top1_drop_points"] == 0.0  # failed on the atol alone
    assert not _stage(ref, at, [0], atol=FLOAT_ATOL["fp32"]).passed


def _flipped(n: int, wrong: list[int], ref_wrong: list[int] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n samples, 4 classes; the reference is right except on ``ref_wrong``; the artifact moves ``wrong`` to
    another class."""
    labels = np.arange(n) % 4
    ref_cls = labels.copy()
    ref_cls[list(ref_wrong)] = (labels[list(ref_wrong)] + 1) % 4
    ref = np.eye(4)[ref_cls] * 5.0
    out_cls = ref_cls.copy()
    out_cls[wrong] = (ref_cls[wrong] + 2) % 4
    return ref, np.eye(4)[out_cls] * 5.0, labels


def test_tolerance_boundary_with_labels() -> None:
    # 200 labelled images: each image the artifact gets wrong is 0.5 points of top-1.
    ref, out, y = _flipped(200, [7])
    s = _stage(ref, out, y, tolerance_points=0.5)
    assert s.metrics["top1_drop_points"] == pytest.approx(0.5) and s.passed  # drop == tolerance passes
    assert s.goals == {"max_top1_drop_points": 0.5}  # with labels, accuracy is the goal (no agreement goal)
    ref, out, y = _flipped(200, [7, 8])
    s = _stage(ref, out, y, tolerance_points=0.5)
    assert s.failures == ["top-1 drop 1.00 points > tolerance 0.5 points"]
    assert _stage(ref, out, y, tolerance_points=1.0).passed
    # Disagreements on images the reference already got wrong cost no accuracy: with labels they pass.
    ref, out, y = _flipped(200, [3, 5, 9], ref_wrong=[3, 5, 9])
    s = _stage(ref, out, y, tolerance_points=0.0)
    assert s.metrics["top1_agreement"] == 0.985 and s.metrics["top1_drop_points"] == 0.0 and s.passed
    # An artifact more accurate than the reference (negative drop) passes a zero tolerance.
    ref, out, y = _flipped(200, [], ref_wrong=[4])
    better = np.eye(4)[y] * 5.0
    assert _stage(ref, better, y, tolerance_points=0.0).metrics["top1_drop_points"] == -0.5
    assert _stage(ref, better, y, tolerance_points=0.0).passed


def test_tolerance_boundary_without_labels_is_agreement() -> None:
    ref, out, _ = _flipped(200, [7])  # agreement 0.995 = 1 - 0.5/100
    s = _stage(ref, out, tolerance_points=0.5)
    assert s.passed and s.goals == {"min_top1_agreement": pytest.approx(0.995)}
    ref, out, _ = _flipped(200, [7, 8])  # 0.99
    s = _stage(ref, out, tolerance_points=0.5)
    assert s.failures == ["top-1 agreement 0.9900 < 0.9950"]
    assert _stage(ref, out, tolerance_points=1.0).passed


def test_min_agreement_overrides_even_with_labels() -> None:
    """The fold's rule: agreement >= 0.99 *and* the accuracy tolerance."""
    ref, out, y = _flipped(200, [3, 5, 9], ref_wrong=[3, 5, 9])  # no accuracy lost, agreement 0.985
    s = _stage(ref, out, y, tolerance_points=0.5, min_agreement=0.99)
    assert s.failures == ["top-1 agreement 0.9850 < 0.9900"]
    ref, out, y = _flipped(200, [3, 5], ref_wrong=[3, 5])  # 0.99: on the boundary
    assert _stage(ref, out, y, tolerance_points=0.5, min_agreement=0.99).passed
    ref, out, y = _flipped(200, [7, 8])  # agreement 0.99 holds, accuracy drops 1 point: refused on accuracy
    assert _stage(ref, out, y, tolerance_points=0.5, min_agreement=0.99).failures == [
        "top-1 drop 1.00 points > tolerance 0.5 points"]


def test_accuracy_goal_failures_records_the_goals_it_applied() -> None:
    goals: dict = {}
    assert accuracy_goal_failures(0.0, 1.0, 0.5, goals=goals) == [] and goals == {"max_top1_drop_points": 0.5}
    goals = {}
    assert accuracy_goal_failures(None, 0.994, 0.5, goals=goals) == ["top-1 agreement 0.9940 < 0.9950"]
    assert goals == {"min_top1_agreement": pytest.approx(0.995)}
    assert accuracy_goal_failures(0.6, 1.0, 0.5) == ["top-1 drop 0.60 points > tolerance 0.5 points"]
    assert accuracy_goal_failures(-3.0, 0.5, 0.0) == []  # better than the reference; agreement is no goal here
    with pytest.raises(ValueError, match="tolerance"):
        _stage([[1.0, 0.0]], [[1.0, 0.0]], tolerance_points=float("nan"))
