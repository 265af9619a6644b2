"""TensorRT: command lines and QDQ compatibility run everywhere; engine build/run only where tensorrt imports."""
from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from castling_deploy.errors import MissingDependencyError, UsageError
from castling_deploy.targets.tensorrt.engine import build_engine, qdq_tensorrt_problems, trtexec_command

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_trtexec_command_line() -> None:
    cmd = trtexec_command("m/int8.onnx", "m/model.engine", "int8", 1, 8, 32, 224, timing_cache="t.cache")
    args = shlex.split(cmd)
    assert args[0] == "trtexec"
    assert "--onnx=m/int8.onnx" in args and "--saveEngine=m/model.engine" in args
    assert "--minShapes=images:1x3x224x224" in args
    assert "--optShapes=images:8x3x224x224" in args
    assert "--maxShapes=images:32x3x224x224" in args
    assert "--int8" in args and "--fp16" in args and "--timingCacheFile=t.cache" in args
    fp16 = shlex.split(trtexec_command("a.onnx", "a.engine", "fp16", 1, 1, 4, 32))
    assert "--fp16" in fp16 and "--int8" not in fp16 and "--maxShapes=images:4x3x32x32" in fp16
    assert "--fp16" not in shlex.split(trtexec_command("a.onnx", "a.engine", "fp32", 1, 1, 1, 32))
    with pytest.raises(UsageError):
        trtexec_command("a.onnx", "a.engine", "int4", 1, 1, 1, 32)
    with pytest.raises(UsageError):
        trtexec_command("a.onnx", "a.engine", "fp16", 4, 2, 8, 32)


@pytest.fixture(scope="module")
def qdq_models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from castling_deploy.targets.onnx.convert import export_onnx
    from castling_deploy.models import create_model
    from castling_deploy.quantize import CalibrationSet, QuantRecipe, quantize_onnx

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("trt")
    fp32 = d / "fp32.onnx"
    export_onnx(create_model("castling_nano", form="deploy").eval(), fp32, 32)
    calib = CalibrationSet(np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32), "t", "r")
    out = {"fp32": fp32, "dir": d}
    for name, recipe in (("trt", QuantRecipe.for_target("tensorrt")), ("ort", QuantRecipe())):
        out[name] = d / f"int8_{name}.onnx"
        quantize_onnx(fp32, out[name], calib, recipe, cache_dir=d / "cache")
    return out


def test_tensorrt_recipe_gives_a_compatible_qdq_model(qdq_models: dict) -> None:
    from castling_deploy.quantize import onnx_census

    assert qdq_tensorrt_problems(qdq_models["trt"]) == []
    c = onnx_census(qdq_models["trt"])
    assert c["opset"] >= 13 and c["domains"] == ["ai.onnx"]
    assert c["zero_points_all_zero"] and set(c["zero_point_dtypes"]) == {"INT8"}
    assert c["dq_int32_inputs"] == 0 and c["int8_mac_fraction"] > 0.95
    # The ORT CPU recipe quantizes the head bias to int32, which TensorRT's parser rejects: the check says so.
    problems = qdq_tensorrt_problems(qdq_models["ort"])
    assert any("int32" in p for p in problems)


def test_missing_tensorrt_raises_missing_dependency(qdq_models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import now raises ImportError
    with pytest.raises(MissingDependencyError) as e:
        build_engine(qdq_models["trt"], qdq_models["dir"] / "m.engine", precision="int8")
    assert e.value.exit_code == 4 and e.value.extra == "tensorrt" and "engine building" in str(e.value)
    from castling_deploy.runtime.tensorrt import TensorRTRunner

    with pytest.raises(MissingDependencyError):
        TensorRTRunner(qdq_models["dir"] / "m.engine")
    assert not (qdq_models["dir"] / "m.engine").exists()


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="tensorrt is not installed (engines are built on the target GPU)")
def test_build_and_run_int8_engine(qdq_models: dict) -> None:
    import onnxruntime  # noqa: F401

    from castling_deploy.runtime.ort import OrtRunner
    from castling_deploy.runtime.tensorrt import TensorRTRunner

    engine = qdq_models["dir"] / "int8.engine"
    meta = build_engine(qdq_models["trt"], engine, precision="int8", batch_range=(1, 4, 8),
                        timing_cache=qdq_models["dir"] / "timing.cache")
    assert engine.is_file() and Path(str(engine) + ".json").is_file()
    assert meta["tensorrt"] and meta["build_seconds"] > 0 and meta["batch_range"] == [1, 4, 8]
    x = np.random.default_rng(1).standard_normal((10, 3, 32, 32)).astype(np.float32)
    ref = OrtRunner(qdq_models["fp32"]).run(x)
    out = TensorRTRunner(engine).run(x)  # 10 > max batch 8: the runner chunks
    cos = np.sum(ref * out, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    assert out.shape == ref.shape and cos.min() >= 0.98
    meta2 = build_engine(qdq_models["fp32"], qdq_models["dir"] / "fp16.engine", precision="fp16",
                         timing_cache=qdq_models["dir"] / "timing.cache")
    assert meta2["timing_cache_reused"]
    out16 = TensorRTRunner(qdq_models["dir"] / "fp16.engine").run(x)
    assert np.max(np.abs(out16 - ref)) < 5e-2
