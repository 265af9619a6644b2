"""Streaming calibration (quantize/stream_calib.py): the same ranges as ONNX Runtime's in-memory calibrators."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from castling_deploy.quantize import CalibrationSet, QuantRecipe
from castling_deploy.quantize.calibration import CalibrationReader
from castling_deploy.quantize.ort_int8 import _calibrate, _calibrate_in_memory, _preprocess


@pytest.fixture(scope="module")
def nano_pre(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from castling_deploy.models import create_model
    from castling_deploy.targets.onnx.convert import export_onnx

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("stream")
    export_onnx(create_model("castling_nano", form="deploy").eval(), d / "fp32.onnx", 32)
    _preprocess(d / "fp32.onnx", d / "pre.onnx")
    return d / "pre.onnx"


def _ranges(fn, model: Path, calib: CalibrationSet, method: str, work: Path, batch: int = 8) -> dict:
    work.mkdir()
    reader = CalibrationReader(calib, input_name="images", batch=batch)
    fn(model, reader, QuantRecipe(calibration=method), work / "ranges.json", work)
    assert reader.calls == len(reader)
    return json.loads((work / "ranges.json").read_text())


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", pytest.param("entropy", marks=pytest.mark.slow)])
def test_streamed_ranges_equal_ort_in_memory_ranges(nano_pre: Path, tmp_path: Path, method: str) -> None:
    """Exactly equal (the same JSON range file), not within a tolerance: pass 1 finds the global extremes, pass 2
    histograms every batch over ORT's own bin edges, so the summed counts are ORT's one-shot histogram."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((24, 3, 32, 32)).astype(np.float32) * rng.uniform(0.5, 2.0, (24, 1, 1, 1))
    calib = CalibrationSet(x.astype(np.float32), "stream-24", "random x24")
    ours = _ranges(_calibrate, nano_pre, calib, method, tmp_path / "stream")
    ort = _ranges(_calibrate_in_memory, nano_pre, calib, method, tmp_path / "ort")
    assert set(ours["data"]) == set(ort["data"]) and len(ours["data"]) > 20
    assert ours == ort


def test_streamed_ranges_do_not_depend_on_batch_size(nano_pre: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    calib = CalibrationSet(rng.standard_normal((24, 3, 32, 32)).astype(np.float32), "stream-24", "random x24")
    a = _ranges(_calibrate, nano_pre, calib, "percentile", tmp_path / "b8", batch=8)
    b = _ranges(_calibrate, nano_pre, calib, "percentile", tmp_path / "b3", batch=3)
    assert a == b


def test_extremes_merge_exactly() -> None:
    from castling_deploy.quantize.stream_calib import _Extremes

    rng = np.random.default_rng(5)
    parts = [rng.standard_normal(1000).astype(np.float32) + s for s in (-3.0, 0.0, 4.0)]
    ex = _Extremes()
    for p in parts:
        ex.update(p)
    allv = np.concatenate(parts)
    assert (ex.lo, ex.hi, ex.alo, ex.ahi) == (allv.min(), allv.max(), np.abs(allv).min(), np.abs(allv).max())


def test_op_time_table_names_the_gemms(nano_pre: Path) -> None:
    from castling_deploy.quantize.op_profile import format_op_table, op_time_table

    t = op_time_table(nano_pre, runs=3, warmup=1)
    ops = {o["op_type"] for o in t["ops"]}
    assert {"MatMul", "Conv"} <= ops and 0 < t["gemm_fraction"] < 1 and t["total_ms"] > 0
    assert abs(sum(o["share"] for o in t["ops"]) - 1) < 1e-2 and "GEMM share" in format_op_table(t)
