"""The fold gate reads the function, not only predictions: a live softmax branch that keeps accuracy is refused
(exit 3) unless accepted explicitly (--accept-accuracy-only), and that choice is recorded."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from castling_deploy.fold import MIN_FOLD_SAMPLE_COSINE, logit_gate_failure
from castling_deploy.models.checkpoint import load_checkpoint, save_checkpoint

from .conftest import DEMO_CKPT, DIGITS_VAL, invoke


@pytest.fixture(scope="module")
def live_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped demo with its mask threshold set to 0: the softmax branch fully alive (‖sparse@v‖/‖linear‖
    0.27-0.37 per block), yet agreement 99.4% and accuracy +0.56 points on the demo val set."""
    ck = load_checkpoint(DEMO_CKPT)
    model = ck.build_model()
    model.cfg = model.cfg.with_(threshold=0.0)
    for a in model.castling_attentions():
        a.threshold = 0.0
    path = tmp_path_factory.mktemp("live") / "live_demo.pt"
    save_checkpoint(path, model, ck.arch, ck.preprocess, ck.labels)
    return path


def test_live_branch_that_keeps_accuracy_is_refused_on_its_logits(runner, live_demo: Path, tmp_path: Path) -> None:
    r = invoke(runner, "fold", live_demo, "-o", tmp_path / "f.pt", "--calib", DIGITS_VAL, "--json")
    assert r.exit_code == 3
    doc = json.loads(r.stdout)
    m, stage = doc["fold"]["stage"]["metrics"], doc["fold"]["stage"]
    # What the old gate read passes: agreement >= 0.99, accuracy does not drop.
    assert m["top1_agreement"] >= 0.99 and m["top1_drop_points"] <= 0
    assert m["min_sample_cosine"] < 0.9 and m["max_abs_logit"] > 1.0
    assert stage["failures"] == [logit_gate_failure(m)] and stage["goals"]["min_sample_cosine"] == MIN_FOLD_SAMPLE_COSINE
    assert "--accept-accuracy-only" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "f.pt").exists()


def test_accept_accuracy_only_folds_and_records_the_choice(runner, live_demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.pt"
    r = invoke(runner, "fold", live_demo, "-o", out, "--calib", DIGITS_VAL, "--accept-accuracy-only", "--json")
    assert r.exit_code == 0, r.stderr
    fold = json.loads(r.stdout)["fold"]
    assert fold["passed"] and fold["accepted_on"] == "accuracy only"
    assert fold["stage"]["goals"]["accepted_on"] == "accuracy only"
    assert any("--accept-accuracy-only" in n for n in fold["notes"])
    assert load_checkpoint(out).extra["fold"]["accepted_on"] == "accuracy only"  # travels with the checkpoint


def test_export_refuses_the_live_demo_unless_accepted(runner, live_demo: Path, tmp_path: Path) -> None:
    r = invoke(runner, "export", live_demo, "--target", "onnx", "--val", DIGITS_VAL, "-o", tmp_path / "a", "--json")
    assert r.exit_code == 3
    rep = json.loads(r.stdout)["reports"][0]
    assert rep["artifacts"] == [] and rep["failures"][0].startswith("fold: min per-input logit cosine")
    assert "--accept-accuracy-only" in rep["failures"][-1]
    r = invoke(runner, "export", live_demo, "--target", "onnx", "--val", DIGITS_VAL, "-o", tmp_path / "b",
               "--accept-accuracy-only", "--json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)["reports"][0]
    assert rep["status"] == "passed" and rep["fold"]["accepted_on"] == "accuracy only"
    assert rep["options"]["accept_accuracy_only"] is True
    assert rep["error_budget"][0]["stage"] == "fold" and rep["error_budget"][0]["passed"]


def test_accept_accuracy_only_does_not_accept_lost_predictions(runner, alive_branch_ckpt: Path,
                                                               tmp_path: Path) -> None:
    r = invoke(runner, "fold", alive_branch_ckpt, "-o", tmp_path / "f.pt", "--accept-accuracy-only")
    assert r.exit_code == 3 and "top-1 agreement" in r.stderr
    r = invoke(runner, "export", "--target", "onnx", "--force", "--accept-accuracy-only", "-o", tmp_path)
    assert r.exit_code == 2 and "--accept-accuracy-only" in r.stderr


def test_logit_goal_line() -> None:
    assert logit_gate_failure({"min_sample_cosine": 1.0, "max_abs_logit": 0.0}) is None
    assert logit_gate_failure({"min_sample_cosine": MIN_FOLD_SAMPLE_COSINE, "max_abs_logit": 0.0}) is None
    assert "0.9000" in logit_gate_failure({"min_sample_cosine": 0.9, "max_abs_logit": 2.0})
