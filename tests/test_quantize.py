"""INT8 calibration, recipe, QDQ quantization, census, sensitivity and fallback on tiny random models."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from castling_deploy.errors import DataError, UsageError
from castling_deploy.quantize import CalibrationSet, QuantRecipe, classify_nodes, onnx_census, quantize_onnx
from castling_deploy.quantize.calibration import CalibrationReader, calibration_cache_key
from castling_deploy.quantize.graph import depth_of, roles_from_metadata
from castling_deploy.quantize.sensitivity import auto_fallback, format_sensitivity_table, sensitivity_sweep
from castling_deploy.runtime.ort import OrtRunner


def _export(model: torch.nn.Module, path: Path, size: int, simplify: bool = True) -> Path:
    from castling_deploy.targets.onnx.convert import export_onnx

    export_onnx(model, path, size, simplify=simplify)
    return path


def _highest(entry: dict) -> float:
    """Upper range of one tensor in ORT's range file (a plain float or a serialized array, by method)."""
    h = entry["highest"]
    h = h["data"] if isinstance(h, dict) else h
    return float(h[0] if isinstance(h, list) else h)


def _cos_min(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


@pytest.fixture(scope="module")
def nano(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from castling_deploy.models import create_model

    torch.manual_seed(0)
    model = create_model("castling_nano", form="deploy").eval()
    d = tmp_path_factory.mktemp("nano")
    rng = np.random.default_rng(0)
    images = rng.standard_normal((32, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(images)).numpy()
    return {
        "model": model,
        "onnx": _export(model, d / "fp32.onnx", 32),
        "dir": d,
        "calib": CalibrationSet(rng.standard_normal((48, 3, 32, 32)).astype(np.float32), "nano-a", "random-a"),
        "images": images,
        "ref": ref,
    }


def test_int8_qdq_close_to_float_and_census_is_int8(nano: dict) -> None:
    out = nano["dir"] / "int8.onnx"
    rep = quantize_onnx(nano["onnx"], out, nano["calib"], QuantRecipe(), cache_dir=nano["dir"] / "cache")
    q = OrtRunner(out).run(nano["images"])
    cos = _cos_min(nano["ref"], q)
    assert cos >= 0.99, cos
    c = onnx_census(out)
    assert c == {**rep["census"]}
    # Every weight-bearing Conv/MatMul/Gemm runs in int8 except the depth-wise token Conv (float by recipe).
    weight = [n for n in c["nodes"] if n["weight"]]
    assert {n["kind"] for n in weight if n["precision"] != "int8"} == {"dwconv"}
    assert c["by_kind"]["qkv"] == {"int8": 4, "float": 0} and c["by_kind"]["head"] == {"int8": 1, "float": 0}
    assert c["by_kind"]["attn_kv"]["int8"] == 4 and c["by_kind"]["attn_q"]["int8"] == 4
    assert c["zero_points_all_zero"] and c["zero_points"] > 0
    assert c["int8_mac_fraction"] > 0.95
    assert c["initializer_dtypes"]["INT8"] >= 4 * 4 + 2
    assert c["domains"] == ["ai.onnx"] and c["opset"] >= 13
    # Never in int8: norms, LayerNorm, GELU, residual adds (only Conv/MatMul/Gemm are quantized).
    assert not any(n["precision"] == "int8" and n["op_type"] not in ("Conv", "MatMul", "Gemm") for n in c["nodes"])
    meta = {p.key: p.value for p in __import__("onnx").load(str(out)).metadata_props}
    assert json.loads(meta["castling_deploy.quant_recipe"])["activation_symmetric"] is True


def test_classify_nodes_matches_exporter_metadata(nano: dict) -> None:
    import onnx

    raw = onnx.load(str(_export(nano["model"], nano["dir"] / "raw.onnx", 32, simplify=False)))
    scopes = roles_from_metadata(raw)
    roles = classify_nodes(raw)
    assert depth_of(roles) == 4 and len(roles) == 1 + 4 * 7 + 1
    module = {"patch_embed": "patch_embed.proj", "qkv": "attn.qkv", "proj": "attn.proj", "dwconv": "attn.dconv",
              "fc1": "mlp.fc1", "fc2": "mlp.fc2", "head": "head", "attn_kv": "attn", "attn_q": "attn"}
    for r in roles:
        want = module[r.kind] if r.block is None else f"blocks.{r.block}.{module[r.kind]}"
        assert scopes[r.name] == want, (r, scopes[r.name])
    # The simplified graph (no metadata, de-duplicated initializers) gives the same layout.
    simp = classify_nodes(onnx.load(str(nano["onnx"])))
    assert [(r.kind, r.block) for r in simp] == [(r.kind, r.block) for r in roles]


def test_recipe_maps_blocks_to_ort_arguments(nano: dict) -> None:
    import onnx

    roles = classify_nodes(onnx.load(str(nano["onnx"])))
    r = QuantRecipe(excluded_blocks=(2,), calibration="percentile", percentile=99.99)
    kw = r.ort_kwargs(roles)
    excluded = set(kw["nodes_to_exclude"])
    assert {x.name for x in roles if x.block == 2} <= excluded
    assert {x.name for x in roles if x.kind == "dwconv"} <= excluded
    assert not {x.name for x in roles if x.block in (0, 1, 3) and x.kind != "dwconv"} & excluded
    assert kw["per_channel"] and kw["op_types_to_quantize"] == ["Conv", "MatMul", "Gemm"]
    assert kw["extra_options"]["ActivationSymmetric"] and kw["extra_options"]["WeightSymmetric"]
    d = r.to_dict()
    assert d["excluded_blocks"] == [2] and d["calibration"] == "percentile" and "LayerNormalization" in d["float_ops"]
    assert QuantRecipe.from_dict(d) == r
    trt = QuantRecipe.for_target("tensorrt")
    assert not trt.reduce_range and not trt.quantize_bias and trt.weight_qdq_pair
    with pytest.raises(UsageError):
        QuantRecipe(int8_kinds=("qkv", "softmax"))
    with pytest.raises(UsageError):
        QuantRecipe(calibration="kl")


def test_calibration_set_guards(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(DataError) as e:
        CalibrationSet(np.zeros((0, 3, 8, 8), np.float32), "x", "empty")
    assert e.value.exit_code == 2
    small = CalibrationSet(np.ones((4, 3, 8, 8), np.float32), "small-digest", "small")
    with pytest.raises(DataError):
        CalibrationReader(small, batch=8)
    with caplog.at_level(logging.WARNING):
        small.subsample(512)
    assert "only 4 calibration images" in caplog.text
    big = CalibrationSet(np.arange(600, dtype=np.float32).reshape(600, 1, 1, 1), "big", "big")
    a, b, c = big.subsample(512, seed=0), big.subsample(512, seed=0), big.subsample(512, seed=1)
    assert len(a) == 512 and np.array_equal(a.images, b.images) and a.digest == b.digest
    assert not np.array_equal(a.images, c.images) and a.digest != c.digest
    assert np.all(np.diff(a.images.ravel()) > 0)  # order kept


def test_calibration_cache_is_keyed_and_never_crosses_keys(nano: dict, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    out = tmp_path / "q.onnx"
    calib_a = nano["calib"]
    calib_b = CalibrationSet(calib_a.images * 3.0, "nano-b", "random-b")
    first = quantize_onnx(nano["onnx"], out, calib_a, QuantRecipe(), cache_dir=cache)["calibration"]
    again = quantize_onnx(nano["onnx"], out, calib_a, QuantRecipe(excluded_blocks=(1,)), cache_dir=cache)
    assert not first["cache_hit"] and first["batches_run"] == 6
    assert again["calibration"]["cache_hit"] and again["calibration"]["batches_run"] == 0
    assert again["calibration"]["cache_file"] == first["cache_file"]
    other_data = quantize_onnx(nano["onnx"], out, calib_b, QuantRecipe(), cache_dir=cache)["calibration"]
    other_method = quantize_onnx(nano["onnx"], out, calib_a, QuantRecipe(calibration="entropy"), cache_dir=cache)
    for rep in (other_data, other_method["calibration"]):
        assert not rep["cache_hit"] and rep["batches_run"] > 0 and rep["cache_file"] != first["cache_file"]
    # Different data gives different ranges (3x images -> larger patch-embed input range).
    ra = _highest(json.loads(Path(first["cache_file"]).read_text())["data"]["images"])
    rb = _highest(json.loads(Path(other_data["cache_file"]).read_text())["data"]["images"])
    assert rb == pytest.approx(3 * ra, rel=1e-4)
    # A meta file that does not match its key is a miss, not a reuse.
    meta = Path(first["cache_file"].replace(".json", ".meta.json"))
    meta.write_text(json.dumps({"model": "other", "data": "nano-a", "method": "minmax", "recipe": "x"}))
    rep = quantize_onnx(nano["onnx"], out, calib_a, QuantRecipe(), cache_dir=cache)["calibration"]
    assert not rep["cache_hit"] and rep["batches_run"] == 6
    assert len({calibration_cache_key("m", "d", "minmax", "r"), calibration_cache_key("m", "d", "entropy", "r"),
                calibration_cache_key("m2", "d", "minmax", "r"), calibration_cache_key("m", "d2", "minmax", "r")}) == 4


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """castling_nano with an activation outlier channel in block 2's qkv input: float function unchanged
    (LayerNorm channel x300, matching qkv column /300), but per-tensor int8 of that input crushes the rest."""
    from castling_deploy.models import create_model

    torch.manual_seed(0)
    model = create_model("castling_nano", form="deploy").eval()
    with torch.no_grad():
        blk = model.blocks[2]
        blk.norm1.weight[5] *= 300.0
        blk.norm1.bias[5] *= 300.0
        blk.attn.qkv.weight[:, 5] /= 300.0
    d = tmp_path_factory.mktemp("sens")
    rng = np.random.default_rng(1)
    images = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(images)).numpy()
    return {
        "onnx": _export(model, d / "fp32.onnx", 32),
        "calib": CalibrationSet(rng.standard_normal((48, 3, 32, 32)).astype(np.float32), "sens-a", "random"),
        "images": images,
        "ref": ref,
        "cache": d / "cache",
    }


def test_sensitivity_sweep_finds_the_outlier_block(sensitive: dict) -> None:
    rows = sensitivity_sweep(sensitive["onnx"], sensitive["calib"], QuantRecipe(), sensitive["images"],
                             sensitive["ref"], cache_dir=sensitive["cache"])
    assert [r["unit"] for r in rows] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "all"]
    worst = min(rows[:4], key=lambda r: r["sqnr_db"])
    assert worst["block"] == 2 and worst["sqnr_db"] < 10.0
    assert all(r["sqnr_db"] > 20.0 for r in rows[:4] if r["block"] != 2)
    assert rows[-1]["sqnr_db"] < 10.0
    table = format_sensitivity_table(rows)
    assert table.splitlines()[2].startswith("| blocks.2 |")
    sensitive["rows"] = rows


def test_auto_fallback_keeps_the_sensitive_block_float(sensitive: dict) -> None:
    rec, trials = auto_fallback(sensitive["onnx"], sensitive["calib"], QuantRecipe(), sensitive["images"],
                                sensitive["ref"], tolerance_points=10.0, rows=sensitive.get("rows"),
                                cache_dir=sensitive["cache"])
    assert not trials[0]["passed"] and trials[0]["excluded_blocks"] == []
    assert trials[0]["top1_agreement"] < 0.9
    assert trials[-1]["passed"] and rec.excluded_blocks == (2,)
    assert trials[-1]["top1_agreement"] >= 0.9 and trials[-1]["sqnr_db"] > 20.0
    # With labels the goal is the accuracy drop in points.
    labels = sensitive["ref"].argmax(1)
    rec2, trials2 = auto_fallback(sensitive["onnx"], sensitive["calib"], QuantRecipe(), sensitive["images"],
                                  sensitive["ref"], labels, tolerance_points=10.0, rows=sensitive.get("rows"),
                                  cache_dir=sensitive["cache"])
    assert rec2.excluded_blocks == (2,) and trials2[-1]["top1_drop_points"] <= 10.0
    assert trials2[0]["top1_drop_points"] > 10.0


@pytest.mark.slow
def test_deit_tiny_224_int8_cosine(tmp_path: Path) -> None:
    from castling_deploy.models import create_model

    torch.manual_seed(0)
    model = create_model("castling_deit_tiny", form="deploy").eval()
    rng = np.random.default_rng(0)
    images = rng.standard_normal((64, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        ref = torch.cat([model(torch.from_numpy(images[i : i + 16])) for i in range(0, 64, 16)]).numpy()
    fp32 = _export(model, tmp_path / "fp32.onnx", 224)
    calib = CalibrationSet(rng.standard_normal((64, 3, 224, 224)).astype(np.float32), "deit-a", "random")
    out = tmp_path / "int8.onnx"
    rep = quantize_onnx(fp32, out, calib, QuantRecipe(), cache_dir=tmp_path / "cache")
    from castling_deploy.quantize.sensitivity import logit_metrics
    from castling_deploy.runtime.base import run_batched

    m = logit_metrics(ref, run_batched(OrtRunner(out), images, 16))
    # Measured (benchmarks/results/int8.md): SQNR 25.3 dB, cosine min 0.9971 / overall 0.9985 with the default
    # recipe (percentile 99.99, 7-bit weights); minmax gave 23.9 dB / 0.9969. 0.999 is not reached: with random
    # weights the class token is built only from ~84 int8 paths of equal weight, and even the exact QDQ math with
    # 8-bit weights tops out at 27.7 dB / min cosine 0.998 (the floor of per-tensor int8 activations, see int8.md).
    assert m["sqnr_db"] >= 25.0, m
    assert m["cosine_min"] >= 0.9965, m
    assert rep["census"]["int8_mac_fraction"] > 0.95 and rep["census"]["zero_points_all_zero"]


def test_mse_threshold_matches_brute_force() -> None:
    from castling_deploy.quantize.ort_int8 import mse_threshold

    x = np.abs(np.random.default_rng(0).standard_normal(1_000_000)).astype(np.float32)
    hist, edges = np.histogram(x, 2048)
    t = mse_threshold(hist, edges)

    def err(th: float) -> float:
        s = th / 127
        return float(np.mean((np.clip(np.round(x / s), -127, 127) * s - x) ** 2))

    grid = np.linspace(3.0, float(x.max()), 60)
    best = grid[int(np.argmin([err(g) for g in grid]))]
    assert 3.7 < t < 4.2 and abs(t - best) < 0.2, (t, best)  # ~4 sigma for a Gaussian at int8, not the max
    assert err(t) < 0.85 * err(float(x.max()))  # measured 0.76


def test_mse_calibration_ranges_are_inside_minmax(nano: dict, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    mm = quantize_onnx(nano["onnx"], out, nano["calib"], QuantRecipe(calibration="minmax"), cache_dir=tmp_path)
    ms = quantize_onnx(nano["onnx"], out, nano["calib"], QuantRecipe(calibration="mse"), cache_dir=tmp_path)
    a = json.loads(Path(mm["calibration"]["cache_file"]).read_text())["data"]
    b = json.loads(Path(ms["calibration"]["cache_file"]).read_text())["data"]
    hi = {k: (_highest(a[k]), _highest(b[k])) for k in a}
    assert all(0 < y <= x * (1 + 1e-6) for x, y in hi.values())
    assert sum(y < 0.9 * x for x, y in hi.values()) >= len(hi) // 2  # most tensors are clipped below their max
    q = OrtRunner(out).run(nano["images"])
    assert _cos_min(nano["ref"], q) >= 0.99
