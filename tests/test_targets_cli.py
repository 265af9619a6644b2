"""LiteRT and Core ML through the CLI on the demo: every variant verified on the val set within tolerance, the
census read from the artifact, and a missing optional runtime exits 4 naming the extra."""
from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from .conftest import invoke


def _export(runner, tmp_path: Path, *args: str) -> dict:
    r = invoke(runner, "export", *args, "-o", tmp_path, "--json")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)["reports"][0]


def _stages(report: dict) -> dict:
    return {s["stage"]: s["metrics"] for s in report["error_budget"]}


def test_demo_tflite_fp32_fp16_int8(runner, tmp_path: Path) -> None:
    report = _export(runner, tmp_path, "--target", "tflite", "--fp16", "--int8")
    s = _stages(report)
    assert s["export"]["max_abs_logit"] < 1e-4
    assert s["fp16"]["top1_drop_points"] <= 0.5 and s["fp16"]["cosine"] > 0.9999
    assert s["int8"]["top1_drop_points"] <= 0.5 and s["int8"]["cosine"] > 0.999
    assert report["quantization"]["census"]["tensor_dtypes"].get("int8", 0) > 50
    files = {a["file"] for a in report["artifacts"]}
    assert files == {"model.tflite", "model.fp16.tflite", "model.int8.tflite"}
    from castling_deploy.targets.tflite.convert import read_tflite_metadata

    meta = read_tflite_metadata(tmp_path / "castling_nano_digits" / "tflite" / "model.int8.tflite")
    assert meta["architecture"] == "castling_nano" and json.loads(meta["labels"])[3] == "3"


@pytest.mark.parametrize("io_dtype", ["float32", "int8"])
def test_demo_tflite_full_integer(runner, tmp_path: Path, io_dtype: str) -> None:
    report = _export(runner, tmp_path, "--target", "tflite", "--int8", "--full-integer", "--io-dtype", io_dtype)
    s = _stages(report)
    assert s["int8"]["top1_drop_points"] <= 0.5
    c = report["quantization"]["census"]
    assert c["float_activation_tensors_excluding_io"] == 0
    if io_dtype == "int8":
        assert c["io_dtypes"] == {"inputs": ["int8"], "outputs": ["int8"]}
        assert c["tensor_dtypes"].get("float32", 0) == 0


def test_demo_coreml_fp16_and_w8a8_via_interpreter(runner, tmp_path: Path) -> None:
    report = _export(runner, tmp_path, "--target", "coreml", "--int8")
    s = _stages(report)
    assert s["export"]["max_abs_logit"] < 1e-4  # fp32 program through the MIL interpreter
    assert s["fp16"]["top1_drop_points"] <= 0.5 and s["int8"]["top1_drop_points"] <= 0.5
    executors = {st["stage"]: st["executor"] for st in report["error_budget"]}
    assert executors["fp16"] in ("mil-reference-interpreter",) or executors["fp16"].startswith("coreml-predict")
    c = report["quantization"]["census"]
    assert c["activation_quantized"] and c["quantize_ops"] > 0 and c["int8_weight_fraction"] > 0.9
    assert report["target_info"]["ane"]["op_histogram"]


@pytest.mark.slow
def test_demo_coreml_w8(runner, tmp_path: Path) -> None:
    report = _export(runner, tmp_path, "--target", "coreml", "--int8", "--weights-only")
    s = _stages(report)
    assert s["int8"]["top1_drop_points"] <= 0.5
    c = report["quantization"]["census"]
    assert not c["activation_quantized"] and c["int8_weight_fraction"] > 0.9


@pytest.mark.parametrize("target,module,extra", [("tflite", "litert_torch", "tflite"),
                                                 ("coreml", "coremltools", "coreml")])
def test_missing_optional_runtime_exits_4(runner, tmp_path: Path, monkeypatch, target: str, module: str,
                                          extra: str) -> None:
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    r = invoke(runner, "export", "--target", target, "-o", tmp_path)
    assert r.exit_code == 4, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert f"castling-deploy[{extra}]" in line and line.startswith("error:")
    assert not (tmp_path / "castling_nano_digits" / target).exists()


def test_bad_flag_combinations_exit_2(runner, tmp_path: Path) -> None:
    for args, needle in [(["--target", "onnx", "--full-integer"], "--full-integer applies only to --target tflite"),
                         (["--target", "tflite", "--io-dtype", "int8", "--int8"], "--io-dtype applies only with --full-integer"),
                         (["--target", "onnx", "--weights-only", "--int8"], "--weights-only applies only to --target coreml"),
                         (["--auto-fallback"], "need --int8"),
                         (["--tolerance", "-1"], "--tolerance")]:
        r = invoke(runner, "export", *args, "-o", tmp_path)
        assert r.exit_code == 2 and needle in r.stderr, (args, r.stderr)
