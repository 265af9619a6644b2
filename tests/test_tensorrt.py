"""TensorRT: command lines, QDQ compatibility and engine-input choice run everywhere; engine build/run only where
tensorrt imports (never on this project's CPU-only machines: see test_tensorrt_api.py for the API checks)."""
from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from castling_deploy.errors import MissingDependencyError, UsageError
from castling_deploy.targets.tensorrt.engine import (_import_tensorrt, build_engine, qdq_tensorrt_problems,
                                                     trtexec_command)
from castling_deploy.targets.tensorrt.versions import TRTEXEC11_REMOVED_FLAGS

def _has_trt() -> bool:
    """The runtime, not the tensorrt-stubs namespace package (which imports but has nothing in it)."""
    try:
        _import_tensorrt()
    except MissingDependencyError:
        return False
    return True


HAS_TRT = _has_trt()


def test_trtexec_command_line_per_version() -> None:
    cmd = trtexec_command("m/int8.onnx", "m/model.engine", "int8", 1, 8, 32, 224, timing_cache="t.cache")
    args = shlex.split(cmd)  # default: TensorRT 11, strongly typed only, no precision flag exists
    assert args[0] == "trtexec"
    assert "--onnx=m/int8.onnx" in args and "--saveEngine=m/model.engine" in args
    assert "--minShapes=images:1x3x224x224" in args
    assert "--optShapes=images:8x3x224x224" in args
    assert "--maxShapes=images:32x3x224x224" in args and "--timingCacheFile=t.cache" in args
    assert not [a for a in args if a in TRTEXEC11_REMOVED_FLAGS or a == "--stronglyTyped"]
    strong = shlex.split(trtexec_command("a.onnx", "a.engine", "fp16", 1, 1, 4, 32, tensorrt="10.13.0"))
    assert "--stronglyTyped" in strong and "--fp16" not in strong and "--maxShapes=images:4x3x32x32" in strong
    weak = shlex.split(trtexec_command("a.onnx", "a.engine", "int8", 1, 1, 4, 32, tensorrt="10.3.0.30"))
    assert "--fp16" in weak and "--int8" in weak and "--stronglyTyped" not in weak
    assert "--fp16" not in shlex.split(trtexec_command("a.onnx", "a.engine", "fp32", 1, 1, 1, 32, tensorrt="10.3"))
    with pytest.raises(UsageError):
        trtexec_command("a.onnx", "a.engine", "best", 1, 1, 1, 32)  # --best went with TensorRT 11
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


def test_build_engine_for_export_picks_the_typed_onnx_of_each_precision() -> None:
    from castling_deploy.targets.tensorrt.build_engine import _engine_input

    info = {"precision": "int8", "onnx_for_engine": "model.int8.onnx",
            "engine_inputs": {"fp32": "model.onnx", "int8": "model.int8.onnx"}}
    assert _engine_input(info, "int8") == "model.int8.onnx" and _engine_input(info, "fp32") == "model.onnx"
    with pytest.raises(UsageError, match="re-export with --fp16"):
        _engine_input(info, "fp16")
    legacy = {"precision": "fp16", "onnx_for_engine": "model.onnx"}  # a report from before typed exports
    assert _engine_input(legacy, "fp16") == "model.onnx" and _engine_input(legacy, "fp32") == "model.onnx"


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="tensorrt is not installed (engines are built on the target GPU)")
def test_build_and_run_typed_engines(qdq_models: dict) -> None:
    """On a machine with TensorRT and a GPU: the typed INT8 QDQ and the typed fp16 ONNX build (strongly typed on
    10.12+/11.x) and run close to the float model. Never runs on the CPU-only machines of this project."""
    from castling_deploy.quantize.fp16 import write_fp16_onnx
    from castling_deploy.runtime.ort import OrtRunner
    from castling_deploy.runtime.tensorrt import TensorRTRunner

    d = qdq_models["dir"]
    typed_int8, fp16 = d / "int8_typed.onnx", d / "fp16.onnx"
    write_fp16_onnx(qdq_models["trt"], typed_int8)
    write_fp16_onnx(qdq_models["fp32"], fp16)
    engine = d / "int8.engine"
    meta = build_engine(typed_int8, engine, precision="int8", batch_range=(1, 4, 8), timing_cache=d / "timing.cache")
    assert engine.is_file() and Path(str(engine) + ".json").is_file()
    assert meta["tensorrt"] and meta["build_seconds"] > 0 and meta["batch_range"] == [1, 4, 8]
    x = np.random.default_rng(1).standard_normal((10, 3, 32, 32)).astype(np.float32)
    ref = OrtRunner(qdq_models["fp32"]).run(x)
    out = TensorRTRunner(engine).run(x)  # 10 > max batch 8: the runner chunks
    cos = np.sum(ref * out, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    assert out.shape == ref.shape and cos.min() >= 0.98
    meta2 = build_engine(fp16, d / "fp16.engine", precision="fp16", timing_cache=d / "timing.cache")
    assert meta2["timing_cache_reused"]
    out16 = TensorRTRunner(d / "fp16.engine").run(x)
    assert np.max(np.abs(out16 - ref)) < 5e-2
