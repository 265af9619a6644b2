"""The fold: lossless when the branch is dead, refused with numbers when alive, --force records the drop."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from castling_deploy.data import load_image_set, random_inputs
from castling_deploy.fold import fold_model, fold_softmax_branch, predict
from castling_deploy.models.checkpoint import load_checkpoint

from .conftest import DEMO_CKPT, DIGITS_VAL, invoke


def test_dead_branch_fold_changes_logits_below_1e5(dead_branch_ckpt: Path) -> None:
    model = load_checkpoint(dead_branch_ckpt).build_model()
    x = random_inputs(32, 32, seed=3)
    folded, report = fold_model(model, x)
    diff = np.abs(predict(model, x.images) - predict(folded, x.images)).max()
    assert diff < 1e-5
    assert report.passed and report.stage.metrics["max_abs_logit"] < 1e-5
    assert all(b["max_ratio"] == 0.0 for b in report.blocks)
    assert folded.cfg.form == "deploy" and not any(a.sparse_reg for a in folded.castling_attentions())
    assert model.cfg.form == "train"  # the fold copies, never mutates


def test_alive_branch_is_refused_with_exit_3_and_a_table(runner, alive_branch_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "folded.pt"
    r = invoke(runner, "fold", alive_branch_ckpt, "-o", out, "--json")
    assert r.exit_code == 3
    assert "softmax-branch size per block" in r.stderr and "top-1 agreement" in r.stderr
    assert "--force" in r.stderr.strip().splitlines()[-1]
    doc = json.loads(r.stdout)
    assert doc["status"] == "refused" and doc["written"] is None
    ratios = [b["max_ratio"] for b in doc["fold"]["branch_ratio_per_block"]]
    assert len(ratios) == 4 and max(ratios) > 0.1
    assert doc["fold"]["stage"]["metrics"]["top1_agreement"] < 0.99
    assert not out.exists()


def test_force_folds_and_records_the_drop(runner, alive_branch_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "folded.safetensors"
    r = invoke(runner, "fold", alive_branch_ckpt, "-o", out, "--force", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["status"] == "forced" and doc["fold"]["forced"]
    agreement = doc["fold"]["stage"]["metrics"]["top1_agreement"]
    assert agreement < 0.99
    ck = load_checkpoint(out)
    assert ck.config.form == "deploy"
    assert ck.extra["fold"]["forced"] is True  # the drop travels with the folded checkpoint
    assert ck.extra["fold"]["stage"]["metrics"]["top1_agreement"] == agreement
    assert doc["fold"]["stage"]["metrics"]["max_abs_logit"] > 0.1


def test_fold_with_labeled_images_measures_accuracy(runner, tmp_path: Path) -> None:
    out = tmp_path / "demo_deploy.pt"
    r = invoke(runner, "fold", DEMO_CKPT, "-o", out, "--calib", DIGITS_VAL, "--json")
    assert r.exit_code == 0, r.stderr
    m = json.loads(r.stdout)["fold"]["stage"]["metrics"]
    assert m["max_abs_logit"] < 1e-5 and m["top1_drop_points"] == 0.0 and m["n"] == 359
    info = json.loads(invoke(runner, "info", out, "--json").stdout)
    assert info["form"] == "deploy" and info["macs"]["as_stored"] == info["macs"]["deploy_form"]


def test_demo_checkpoint_reaches_95_percent_in_both_forms() -> None:
    ck = load_checkpoint(DEMO_CKPT)
    val = load_image_set(DIGITS_VAL, ck.preprocess, ck.labels)
    model = ck.build_model()
    folded = fold_softmax_branch(model)
    for m in (model, folded):
        acc = float((predict(m, val.images).argmax(1) == val.labels).mean() * 100)
        assert acc >= 95.0, acc
    torch.testing.assert_close(torch.from_numpy(predict(model, val.images)),
                               torch.from_numpy(predict(folded, val.images)), atol=1e-5, rtol=0)
