"""Outlier channels (the seeded trained-like builder), the per-channel spread report, and the channel-scale
migration: exact in float, flattening the int8 inputs, on by default only when needed, off with --no-migrate."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from castling_deploy.budget import logit_metrics
from castling_deploy.fold import predict
from castling_deploy.models.checkpoint import load_checkpoint, save_checkpoint
from castling_deploy.models.trained_like import add_outlier_channels, outlier_pattern, trained_like_model
from castling_deploy.quantize.migrate import EXACT_ATOL, migrate_model
from castling_deploy.quantize.outliers import channel_spread, collect_channel_stats, format_spread_table

from .conftest import LABELS, NANO_PP, invoke


def _images(n: int, seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


@pytest.fixture(scope="module")
def nano() -> dict:
    calib, evals = _images(64, 0), _images(32, 1)
    plain = trained_like_model("castling_nano", 1.0, channels=3)
    x30 = trained_like_model("castling_nano", 30.0, channels=3)
    return {"calib": calib, "eval": evals, "plain": plain, "x30": x30}


def test_trained_like_keeps_the_function_and_makes_layernorm_outliers(nano) -> None:
    plain, x30, x = nano["plain"], nano["x30"], nano["eval"]
    assert np.abs(predict(plain, x) - predict(x30, x)).max() < 1e-4
    before, after = collect_channel_stats(plain, x), collect_channel_stats(x30, x)
    for b in range(plain.cfg.depth):
        for lin, norm in (("attn.qkv", "norm1"), ("mlp.fc1", "norm2")):
            name = f"blocks.{b}.{lin}"
            assert before[name].spread < 3 and after[name].spread > 20
            top = set(np.argsort(after[name].absmax)[-3:].tolist())
            assert top == set(x30.outlier_channels[f"blocks.{b}.{norm}"])
    assert after["head"].spread < 3  # the final norm is left as it was


def test_outlier_pattern_is_seeded_and_magnitudes_can_vary() -> None:
    assert outlier_pattern(4, 64, 4, seed=3) == outlier_pattern(4, 64, 4, seed=3)
    assert outlier_pattern(4, 64, 4, seed=3) != outlier_pattern(4, 64, 4, seed=4)
    torch.manual_seed(0)
    base = trained_like_model("castling_nano", 1.0)
    mixed = add_outlier_channels(base, (10.0, 100.0), channels=4, seed=1)
    x = _images(16, 2)
    assert np.abs(predict(base, x) - predict(mixed, x)).max() < 1e-4
    s = collect_channel_stats(mixed, x)["blocks.0.attn.qkv"]
    ratios = np.sort(s.absmax)[::-1][:4] / np.median(s.absmax)
    assert ratios[0] > 50 and 5 < ratios[-1] < 30  # two channels x100, two x10
    assert channel_spread(np.ones(8)) == 1.0


def test_migration_is_exact_and_flattens_the_int8_inputs(nano) -> None:
    x30, calib, x = nano["x30"], nano["calib"], nano["eval"]
    w0 = x30.blocks[0].attn.qkv.weight.clone()
    migrated, mig = migrate_model(x30, calib)
    assert torch.equal(x30.blocks[0].attn.qkv.weight, w0)  # a copy, never in place
    assert mig.applied and mig.mode == "auto"
    assert np.abs(predict(migrated, x) - predict(x30, x)).max() < EXACT_ATOL
    d = mig.to_dict()
    assert d["max_layernorm_spread_before"] > 20 and d["max_layernorm_spread_after"] < 3
    assert [r["norm"] for r in d["layers"]] == [f"blocks.{b}.norm{i}" for b in range(4) for i in (1, 2)]
    assert all(r["alpha"] is not None and r["sqnr_db_after"] > r["sqnr_db_before"] + 10 for r in d["layers"])
    rows = {r["consumer"]: r for r in mig.channel_spread}
    assert rows["head"]["tensor"] == "norm" and rows["head"]["spread_after"] == rows["head"]["spread"]  # not migrated
    assert rows["blocks.1.mlp.fc1"]["tensor"] == "blocks.1.norm2" and rows["blocks.1.mlp.fc1"]["spread_after"] < 3
    assert "blocks.0.norm1" in format_spread_table(mig.channel_spread)
    assert not mig.warnings()


def test_outlier_free_model_is_left_alone_and_off_warns(nano) -> None:
    same, mig = migrate_model(nano["plain"], nano["calib"])
    assert same is nano["plain"] and not mig.applied and "not needed" in mig.reason
    same, mig = migrate_model(nano["x30"], nano["calib"], mode="off")
    assert same is nano["x30"] and not mig.applied
    (line,) = mig.warnings()
    assert "--no-migrate" in line and "blocks.0.attn.qkv" in line


def _qdq_sqnr(model: torch.nn.Module, calib: np.ndarray, x: np.ndarray, ref: np.ndarray, work: Path) -> dict:
    import onnxruntime as ort

    from castling_deploy.quantize import CalibrationSet, QuantRecipe, quantize_onnx
    from castling_deploy.targets.onnx.convert import export_onnx

    size = model.cfg.img_size
    work.mkdir()
    export_onnx(model, work / "fp32.onnx", size)
    cs = CalibrationSet(calib, f"test-{len(calib)}", "N(0,1)")
    quantize_onnx(work / "fp32.onnx", work / "q.onnx", cs, QuantRecipe.for_target("tensorrt"), cache_dir=work / "c")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # exact QDQ semantics
    s = ort.InferenceSession(str(work / "q.onnx"), opts, providers=["CPUExecutionProvider"])
    return logit_metrics(ref, s.run(None, {"images": x})[0])


@pytest.mark.slow
def test_migration_restores_tensorrt_qdq_fidelity_on_nano(nano, tmp_path: Path) -> None:
    x30, calib, x = nano["x30"], nano["calib"], nano["eval"]
    ref = predict(x30, x)
    before = _qdq_sqnr(x30, calib, x, ref, tmp_path / "off")
    after = _qdq_sqnr(migrate_model(x30, calib)[0], calib, x, ref, tmp_path / "on")
    plain = _qdq_sqnr(nano["plain"], calib, x, predict(nano["plain"], x), tmp_path / "plain")
    # Measured: 9.9 dB without, 27.4 dB with migration, 26.7 dB for the same weights without outliers.
    assert before["sqnr_db"] < 15 and after["sqnr_db"] > before["sqnr_db"] + 10
    assert after["sqnr_db"] > plain["sqnr_db"] - 1.5


@pytest.fixture(scope="module")
def x30_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("x30")
    save_checkpoint(d / "x30.pt", trained_like_model("castling_nano", 30.0, channels=3), "castling_nano", NANO_PP,
                    LABELS)
    np.savez(d / "calib.npz", images=_images(64, 0))
    np.savez(d / "val.npz", images=_images(32, 1))
    return d / "x30.pt", d / "calib.npz", d / "val.npz"


def test_export_migrates_by_default_with_an_exactness_stage(runner, x30_ckpt, tmp_path: Path) -> None:
    ckpt, calib, val = x30_ckpt
    r = invoke(runner, "export", ckpt, "--target", "onnx", "--int8", "--calib", calib, "--val", val,
               "--tolerance", 100, "-o", tmp_path, "--json")
    assert r.exit_code == 0, r.stderr
    on = json.loads(r.stdout)["reports"][0]
    stages = {s["stage"]: s for s in on["error_budget"]}
    assert stages["migrate"]["passed"] and stages["migrate"]["metrics"]["max_abs_logit"] < EXACT_ATOL
    assert stages["migrate"]["goals"]["atol"] == EXACT_ATOL
    # Measured here: int8 SQNR 26-27 dB with migration, ~10 dB with --no-migrate (cosine 0.999 vs 0.91).
    assert stages["int8"]["metrics"]["sqnr_db"] > 20 and stages["int8"]["metrics"]["min_sample_cosine"] > 0.99
    mig = on["fold"]["migration"]
    assert mig["applied"] and mig["mode"] == "auto" and mig["max_layernorm_spread_after"] < 3
    assert any(r["alpha"] is not None for r in mig["layers"])
    spread = {r["consumer"]: r for r in on["quantization"]["channel_spread"]}
    assert spread["blocks.0.attn.qkv"]["spread"] > 20 and spread["blocks.0.attn.qkv"]["spread_after"] < 3
    assert on["options"]["migrate"] is True and "channel-scale migration: 8/8 LayerNorms migrated" in r.stderr


def test_no_migrate_keeps_todays_session(x30_ckpt, caplog: pytest.LogCaptureFixture) -> None:
    from castling_deploy.pipeline import prepare_session
    from castling_deploy.targets.base import ExportOptions
    from castling_deploy.targets.registry import all_option_defaults

    ckpt, calib, val = x30_ckpt
    opts = ExportOptions(["onnx"], int8=True, calib=calib, val=val, migrate=False,
                         target_options=all_option_defaults())
    with caplog.at_level("WARNING"):
        sess = prepare_session(ckpt, opts)
    ref_model = load_checkpoint(ckpt).build_model()
    assert all(torch.equal(a, b) for a, b in zip(sess.folded.state_dict().values(), ref_model.state_dict().values()))
    assert sess.fold_report.migration_stage is None
    rec = sess.fold_report.to_dict()["migration"]
    assert rec["mode"] == "off" and not rec["applied"] and rec["max_layernorm_spread_before"] > 20
    assert "--no-migrate" in caplog.text and "per-channel range spread" in caplog.text


def test_no_migrate_needs_int8(runner, tmp_path: Path) -> None:
    r = invoke(runner, "export", "--target", "onnx", "--no-migrate", "-o", tmp_path)
    assert r.exit_code == 2 and "--no-migrate" in r.stderr


@pytest.mark.slow
def test_deit_tiny_x30_tensorrt_qdq_meets_the_goal_only_with_migration(tmp_path: Path) -> None:
    """The issue's acceptance: castling_deit_tiny@224 with x30 outlier channels, TensorRT recipe under exact QDQ
    semantics, 64 calibration / 32 held-out inputs: SQNR >= 24 dB and top-1 agreement >= 0.9 with migration."""
    model = trained_like_model("castling_deit_tiny", 30.0)
    calib, x = _images(64, 0, 224), _images(32, 1, 224)
    ref = predict(model, x)
    migrated, mig = migrate_model(model, calib)
    assert mig.applied and np.abs(predict(migrated, x) - ref).max() < EXACT_ATOL
    after = _qdq_sqnr(migrated, calib, x, ref, tmp_path / "on")
    assert after["sqnr_db"] >= 24 and after["top1_agreement"] >= 0.9, after
    before = _qdq_sqnr(model, calib, x, ref, tmp_path / "off")
    assert before["sqnr_db"] < 15, before
