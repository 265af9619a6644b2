"""The fold: lossless when the branch is dead, refused with numbers when alive, --force records the drop."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
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


def test_labelled_refusal_on_accuracy_while_agreement_holds(runner, alive_branch_ckpt: Path, tmp_path: Path) -> None:
    """With labels the fold must also keep top-1 accuracy within --tolerance: 99 of 100 predictions agree (the
    0.99 agreement goal holds), but the one that changes was right, a 1-point drop > 0.5 -> refused, exit 3."""
    ck = load_checkpoint(alive_branch_ckpt)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (600, 32, 32, 3), dtype=np.uint8)
    pool = tmp_path / "pool.npz"
    np.savez(pool, images=raw)
    x = load_image_set(pool, ck.preprocess, ck.labels).images  # the pixels exactly as `fold --calib` will see them
    model = ck.build_model()
    train, deploy = predict(model, x).argmax(1), predict(fold_softmax_branch(model), x).argmax(1)
    same, changed = np.flatnonzero(train == deploy), np.flatnonzero(train != deploy)
    assert len(same) >= 99 and len(changed) >= 1, (len(same), len(changed))
    pick = np.concatenate([changed[:1], same[:99]])
    chosen = tmp_path / "labelled.npz"
    np.savez(chosen, images=raw[pick], labels=train[pick])  # labels = the training form's predictions: 100% top-1
    out = tmp_path / "folded.pt"
    r = invoke(runner, "fold", alive_branch_ckpt, "-o", out, "--calib", chosen, "--json")
    assert r.exit_code == 3, r.stderr
    stage = json.loads(r.stdout)["fold"]["stage"]
    m = stage["metrics"]
    assert m["n"] == 100 and m["top1_agreement"] == 0.99 and m["top1_drop_points"] == pytest.approx(1.0)
    assert "top-1 drop 1.00 points > tolerance 0.5 points" in stage["failures"]
    assert not any("agreement" in f for f in stage["failures"])  # the agreement goal held: accuracy refused it
    assert not out.exists()
    r = invoke(runner, "fold", alive_branch_ckpt, "-o", out, "--calib", chosen, "--tolerance", "1.0", "--json")
    stage = json.loads(r.stdout)["fold"]["stage"]
    assert not any(f.startswith("top-1") for f in stage["failures"])  # within a 1-point tolerance the drop is fine
