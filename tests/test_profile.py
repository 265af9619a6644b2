"""Profiling: latency statistics, per-op trace aggregation, charts, progress bar, resolution sweep."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from castling_deploy.errors import MissingDependencyError, UsageError
from castling_deploy.profiling import format_profile_table, format_sweep_table, profile_artifact, profile_sweep
from castling_deploy.profiling.ops import aggregate_ort_trace
from castling_deploy.profiling.progress import ProgressBar

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_onnx(path: Path, *, hw: int | str = 8, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 3x8x8 -> 10 linear classifier (Flatten + Gemm); returns its weights so tests know the true logits."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((3 * 8 * 8, classes)).astype(np.float32)
    b = rng.standard_normal(classes).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"], axis=1, name="flatten"),
         helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], name="head")],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, hw, hw])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return w, b


def test_profile_tiny_onnx_percentiles_json_png(tmp_path: Path) -> None:
    onnx_path = tmp_path / "tiny.onnx"
    tiny_onnx(onnx_path)
    chart = tmp_path / "lat.png"
    r = profile_artifact(onnx_path, runs=40, warmup=3, threads=1, chart_path=chart, progress=False)
    lat = r["latency_ms"]
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert lat["min"] <= lat["mean"] <= lat["max"] and lat["std"] >= 0
    assert len(r["samples_ms"]) == 40
    assert np.isclose(np.median(r["samples_ms"]), lat["p50"], atol=1e-3)
    assert lat["throughput_ips"] == pytest.approx(1000.0 / lat["mean"], rel=1e-2)
    assert r["input_shape"] == [1, 3, 8, 8] and r["output_shape"] == [1, 10]
    assert r["load_ms"] > 0 and r["memory"]["peak_rss_mb"] > 10
    assert json.loads(json.dumps(r)) == r  # plain JSON types only
    assert chart.read_bytes()[:8] == PNG_MAGIC and chart.stat().st_size > 5000
    ops = {row["op_type"]: row for row in r["per_op"]["by_op_type"]}
    assert set(ops) == {"Flatten", "Gemm"} and ops["Gemm"]["nodes"] == 1
    assert sum(row["percent"] for row in ops.values()) == pytest.approx(100.0, abs=0.05)
    assert {row["node"] for row in r["per_op"]["by_node"]} == {"flatten", "head"}
    text = format_profile_table(r)
    assert "p50/p90/p99" in text and "Gemm" in text


def test_profile_batch_scales_input_and_throughput(tmp_path: Path) -> None:
    onnx_path = tmp_path / "tiny.onnx"
    tiny_onnx(onnx_path)
    r = profile_artifact(onnx_path, runs=10, warmup=1, batch=4, per_op=False, progress=False)
    assert r["input_shape"] == [4, 3, 8, 8] and r["output_shape"] == [4, 10]
    assert r["latency_ms"]["throughput_ips"] == pytest.approx(4000.0 / r["latency_ms"]["mean"], rel=1e-2)
    assert r["per_op"] is None and r["chart"] is None


def test_input_shape_from_report_when_graph_is_symbolic(tmp_path: Path) -> None:
    onnx_path = tmp_path / "tiny.onnx"
    tiny_onnx(onnx_path, hw="size")
    with pytest.raises(UsageError, match="input shape"):
        profile_artifact(onnx_path, runs=2, warmup=0, per_op=False, progress=False)
    (tmp_path / "report.json").write_text(json.dumps({"preprocess": {"resize": 9, "crop": 8}}))
    r = profile_artifact(onnx_path, runs=2, warmup=0, per_op=False, progress=False)
    assert r["input_shape"] == [1, 3, 8, 8]


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    onnx_path = tmp_path / "tiny.onnx"
    tiny_onnx(onnx_path)
    with pytest.raises(UsageError):
        profile_artifact(onnx_path, runs=0)
    with pytest.raises(UsageError):
        profile_artifact(onnx_path, threads=0)
    with pytest.raises(UsageError):
        profile_artifact(tmp_path / "missing.onnx")


def test_aggregate_ort_trace_numbers() -> None:
    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 400},
        {"cat": "Node", "name": "a_kernel_time", "ts": 1, "dur": 100, "args": {"op_name": "MatMul"}},
        {"cat": "Node", "name": "a_fence_before", "ts": 1, "dur": 0, "args": {"op_name": "MatMul"}},
        {"cat": "Node", "name": "b_kernel_time", "ts": 2, "dur": 300, "args": {"op_name": "MatMul"}},
        {"cat": "Node", "name": "c_kernel_time", "ts": 3, "dur": 200, "args": {"op_name": "Add"}},
        {"cat": "Session", "name": "model_run", "ts": 10, "dur": 400},
        {"cat": "Node", "name": "a_kernel_time", "ts": 11, "dur": 100, "args": {"op_name": "MatMul"}},
        {"cat": "Node", "name": "b_kernel_time", "ts": 12, "dur": 300, "args": {"op_name": "MatMul"}},
        {"cat": "Node", "name": "c_kernel_time", "ts": 13, "dur": 200, "args": {"op_name": "Add"}},
    ]
    agg = aggregate_ort_trace(events, runs=2)
    assert agg["kernel_ms_per_run"] == pytest.approx(0.6)
    assert agg["model_run_ms_mean"] == pytest.approx(0.4)
    mm, add = agg["by_op_type"]
    assert (mm["op_type"], mm["ms_per_run"], mm["percent"], mm["nodes"]) == ("MatMul", 0.4, 66.67, 2)
    assert (add["op_type"], add["ms_per_run"], add["nodes"]) == ("Add", 0.2, 1)
    assert [n["node"] for n in agg["by_node"]] == ["b", "c", "a"]
    assert agg["by_node"][0]["ms_per_run"] == pytest.approx(0.3)


def test_missing_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    onnx_path = tmp_path / "tiny.onnx"
    tiny_onnx(onnx_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError) as info:
        profile_artifact(onnx_path, runs=2, warmup=0, per_op=False, progress=False, chart_path=tmp_path / "c.png")
    assert info.value.extra == "profile" and info.value.exit_code == 4
    assert not (tmp_path / "c.png").exists()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_tty() -> None:
    quiet = io.StringIO()
    with ProgressBar(5, "x", stream=quiet) as bar:
        for _ in range(5):
            bar.update()
    assert quiet.getvalue() == ""
    tty = _Tty()
    with ProgressBar(5, "runs", stream=tty) as bar:
        for _ in range(5):
            bar.update()
    out = tty.getvalue()
    assert "runs [" in out and "5/5" in out and out.endswith("\n")
    off = _Tty()
    with ProgressBar(5, "x", stream=off, enabled=False) as bar:
        bar.update(5)
    assert off.getvalue() == ""


@pytest.mark.slow
def test_sweep_castling_vs_softmax_nano(tmp_path: Path) -> None:
    from castling_deploy.models import create_model, get_config

    result = profile_sweep(
        lambda s: create_model("castling_nano", form="deploy", img_size=s),
        [32, 64],
        baseline=lambda s: create_model("castling_nano", attention="softmax", img_size=s),
        runs=6, warmup=1, threads=1, workdir=tmp_path, chart_path=tmp_path / "sweep.png", progress=False,
    )
    cast, soft = result["series"]["castling"], result["series"]["softmax"]
    patch = get_config("castling_nano").patch_size
    tokens = [(32 // patch) ** 2 + 1, (64 // patch) ** 2 + 1]
    assert [r["tokens"] for r in cast] == tokens and [r["tokens"] for r in soft] == tokens
    assert cast[0]["macs_ratio"] == 1.0 and cast[1]["macs_ratio"] > 3.0
    # Quadratic attention grows faster in MACs than linear-angular attention.
    assert soft[1]["macs_ratio"] > cast[1]["macs_ratio"]
    assert all(r["latency_ms_p50"] > 0 for r in cast + soft)
    assert json.loads(json.dumps(result)) == result
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG_MAGIC
    assert f"| castling | 64 | {tokens[1]} |" in format_sweep_table(result)


def test_input_shape_from_report_input_entry(tmp_path: Path) -> None:
    onnx_path = tmp_path / "tiny.onnx"
    tiny_onnx(onnx_path, hw="size")
    (tmp_path / "report.json").write_text(json.dumps({"input": {"shape": ["batch", 3, 8, 8], "layout": "NCHW"}}))
    r = profile_artifact(onnx_path, runs=2, warmup=0, batch=2, per_op=False, progress=False)
    assert r["input_shape"] == [2, 3, 8, 8] and r["output_shape"] == [2, 10]
