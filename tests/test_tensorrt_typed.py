"""The typed mixed-precision pass (quantize/fp16.py) that gives strongly typed TensorRT its fp16: the policy read
back from the files, the numbers on ONNX Runtime CPU, the INT8 QDQ with fp16 float islands, and ModelOpt beside it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from castling_deploy.budget import logit_metrics
from castling_deploy.errors import MissingDependencyError
from castling_deploy.quantize.fp16 import convert_fp16, precision_census, write_fp16_onnx
from castling_deploy.targets.tensorrt.engine import qdq_tensorrt_problems

from .conftest import invoke


def _run(path: Path, x: np.ndarray, exact: bool = False) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if exact:  # every Q/DQ computed as written: TensorRT's explicit-quantization semantics
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def nano(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from castling_deploy.models import create_model
    from castling_deploy.quantize import CalibrationSet, QuantRecipe, quantize_onnx
    from castling_deploy.targets.onnx.convert import export_onnx

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("typed")
    out = {"dir": d, "fp32": d / "fp32.onnx", "softmax": d / "softmax.onnx", "qdq": d / "qdq.onnx"}
    export_onnx(create_model("castling_nano", form="deploy").eval(), out["fp32"], 32)
    export_onnx(create_model("castling_nano", form="deploy", attention="softmax").eval(), out["softmax"], 32)
    rng = np.random.default_rng(0)
    calib = CalibrationSet(rng.standard_normal((64, 3, 32, 32)).astype(np.float32), "t", "randn")
    quantize_onnx(out["fp32"], out["qdq"], calib, QuantRecipe.for_target("tensorrt"), cache_dir=d / "cache")
    out["x"] = rng.standard_normal((32, 3, 32, 32)).astype(np.float32)
    return out


def _producers(model: onnx.ModelProto) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


def _types(path: Path) -> dict[str, int]:
    m = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    t = {vi.name: vi.type.tensor_type.elem_type for vi in [*m.graph.input, *m.graph.output, *m.graph.value_info]}
    t.update({i.name: i.data_type for i in m.graph.initializer})
    return t


def test_fp16_policy_read_back_from_the_file(nano: dict) -> None:
    out = nano["dir"] / "fp16.onnx"
    info = write_fp16_onnx(nano["fp32"], out)
    c = precision_census(out)
    by = c["by_op"]
    assert c["inputs"] == ["FLOAT"] and c["outputs"] == ["FLOAT"]  # I/O types as exported
    assert by["LayerNormalization"] == {"fp16": 0, "fp32": 9} and by["ReduceL2"]["fp16"] == 0
    assert by["Clip"]["fp16"] == 0 and by["Conv"]["fp32"] == 0 and by["MatMul"]["fp32"] == 0
    linears = [by.get(k, {"fp16": 0, "fp32": 0}) for k in ("Gemm", "MatMul")]
    assert sum(r["fp32"] for r in linears) == 1 and sum(r["fp16"] for r in linears) == 24  # all but the head
    assert info["kept_fp32"] == {"kept op": 21, "L2 norm": 24, "final logits": 1}
    m, types = onnx.load(str(out)), _types(out)
    prod = _producers(m)
    for n in m.graph.node:  # every Div that applies an L2 norm is fp32 (its divisor comes from a ReduceL2)
        if n.op_type == "Div" and n.input[1] in prod and prod[n.input[1]].op_type == "Clip":
            assert types[n.output[0]] == TensorProto.FLOAT, n.name
    head = next(n for n in m.graph.node if n.output[0] == "logits")
    assert head.op_type in ("Gemm", "MatMul") and all(types[i] == TensorProto.FLOAT for i in head.input)
    ref, got = _run(nano["fp32"], nano["x"]), _run(out, nano["x"])
    assert got.dtype == np.float32 and np.abs(got - ref).max() < 5e-2  # the fp16 atol of the budget
    assert logit_metrics(ref, got)["sqnr_db"] > 50
    # ORT CPU runs fp16 ops it has no kernel for in fp32 between Casts; ONNX's reference evaluator computes in numpy
    # fp16 throughout (what TensorRT's fp16 kernels approach): the file meets the fp16 atol there too
    from onnx.reference import ReferenceEvaluator

    numpy16 = ReferenceEvaluator(str(out)).run(None, {"images": nano["x"][:8]})[0]
    assert np.abs(numpy16 - ref[:8]).max() < 5e-2
    # a second pass changes nothing: it only ever touches fp32 tensors, and keeps their types
    again, info2 = convert_fp16(onnx.load(str(out)))
    assert info2["casts"] == 0 and info2["initializers_fp16"] == 0


def test_softmax_baseline_keeps_softmax_fp32(nano: dict) -> None:
    out = nano["dir"] / "softmax16.onnx"
    write_fp16_onnx(nano["softmax"], out)
    by = precision_census(out)["by_op"]
    assert by["Softmax"]["fp16"] == 0 and by["Softmax"]["fp32"] == 4 and by["MatMul"]["fp16"] > 0
    assert np.abs(_run(out, nano["x"]) - _run(nano["softmax"], nano["x"])).max() < 5e-2


def test_int8_qdq_float_islands_become_fp16(nano: dict) -> None:
    from castling_deploy.quantize.census import onnx_census

    out = nano["dir"] / "qdq16.onnx"
    info = write_fp16_onnx(nano["qdq"], out)
    assert info["qdq_scales"] == "fp16" and info["opset"] == 19  # fp16 Q/DQ scales need QuantizeLinear-19
    before, after = onnx_census(nano["qdq"]), onnx_census(out)
    for k in ("int8_compute_nodes", "qdq_nodes", "zero_points", "zero_point_dtypes", "zero_points_all_zero"):
        assert before[k] == after[k], k  # same quantization, only the float parts changed type
    assert qdq_tensorrt_problems(out) == []
    m, types = onnx.load(str(out)), _types(out)
    consumers = {i: n for n in m.graph.node for i in n.input}
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear":  # a DQ's scale type is its consumer's type: fp16 except the head
            want = TensorProto.FLOAT if consumers[n.output[0]].output[0] == "logits" else TensorProto.FLOAT16
            assert types[n.input[1]] == want, n.name
    ref = _run(nano["fp32"], nano["x"])
    s32 = logit_metrics(ref, _run(nano["qdq"], nano["x"], exact=True))["sqnr_db"]
    s16 = logit_metrics(ref, _run(out, nano["x"], exact=True))["sqnr_db"]
    assert s16 > s32 - 1.0, (s32, s16)  # fp16 islands cost next to nothing beside the int8 rounding


def test_legacy_opset17_export_with_constants(tmp_path: Path) -> None:
    from castling_deploy.models import create_model
    from castling_deploy.targets.onnx.convert import export_onnx

    torch.manual_seed(0)
    fp32, out = tmp_path / "m17.onnx", tmp_path / "m17.fp16.onnx"
    export_onnx(create_model("castling_nano", form="deploy").eval(), fp32, 32, opset=17)
    info = write_fp16_onnx(fp32, out)
    assert info["opset"] == 17 and not any(n.op_type == "Constant" for n in onnx.load(str(out)).graph.node)
    x = np.random.default_rng(2).standard_normal((4, 3, 32, 32)).astype(np.float32)
    assert np.abs(_run(out, x) - _run(fp32, x)).max() < 5e-2


def test_initializer_beyond_fp16_range_keeps_its_node_fp32(tmp_path: Path) -> None:
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.full(16, 1e5, np.float32).tolist())
    v = helper.make_tensor("v", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="big"),
                           helper.make_node("MatMul", ["h", "v"], ["h2"], name="ok"),
                           helper.make_node("Relu", ["h2"], ["r"], name="relu"),
                           helper.make_node("MatMul", ["r", "v"], ["y"], name="head")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w, v])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    src = tmp_path / "big.onnx"
    onnx.save(model, str(src))
    info = write_fp16_onnx(src, tmp_path / "big16.onnx")
    assert info["kept_fp32"] == {"initializer beyond the fp16 range": 1, "final logits": 1}
    types = _types(tmp_path / "big16.onnx")
    assert types["h"] == TensorProto.FLOAT and types["w"] == TensorProto.FLOAT and types["r"] == TensorProto.FLOAT16
    assert types["v"] == TensorProto.FLOAT and types["v__fp16"] == TensorProto.FLOAT16  # read by both kinds


# ---- ModelOpt beside it (optional) ---------------------------------------------------------------------------------
def _modelopt() -> bool:
    from castling_deploy.quantize.modelopt import modelopt_version

    return modelopt_version() is not None


@pytest.mark.skipif(not _modelopt(), reason="nvidia-modelopt not installed (pip install 'castling-deploy[modelopt]')")
def test_modelopt_int8_and_autocast_on_cpu(nano: dict) -> None:
    from castling_deploy.quantize import CalibrationSet
    from castling_deploy.quantize.modelopt import autocast_fp16, quantize_modelopt

    from onnxruntime.quantization import calibrate

    from castling_deploy.quantize import QuantRecipe, quantize_onnx

    calib = CalibrationSet(np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32), "t", "r")
    qdq = nano["dir"] / "mo.onnx"
    before = (calibrate.create_calibrator, calibrate.HistogramCollector.collect_value)
    info = quantize_modelopt(nano["fp32"], qdq, calib, calib_size=64)
    assert info["census"]["int8_compute_nodes"] > 0 and info["census"]["zero_points_all_zero"]
    # ModelOpt patches ONNX Runtime's calibrators in place; they are put back, so our quantizer still works after it
    assert (calibrate.create_calibrator, calibrate.HistogramCollector.collect_value) == before
    quantize_onnx(nano["fp32"], nano["dir"] / "after.onnx", calib, QuantRecipe.for_target("tensorrt"),
                  cache_dir=nano["dir"] / "cache-after")
    write_fp16_onnx(qdq, qdq)
    assert qdq_tensorrt_problems(qdq) == []
    ac = nano["dir"] / "autocast.onnx"
    autocast_fp16(nano["fp32"], ac)
    by = precision_census(ac)["by_op"]
    assert by["LayerNormalization"]["fp16"] == 0 and by["ReduceL2"]["fp16"] == 0 and by["Conv"]["fp16"] > 0
    assert np.abs(_run(ac, nano["x"]) - _run(nano["fp32"], nano["x"])).max() < 5e-2


def test_quantizer_option_needs_int8_and_modelopt(runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = invoke(runner, "export", "--target", "tensorrt", "--quantizer", "modelopt", "-o", tmp_path)
    assert r.exit_code == 2 and "--quantizer needs --int8" in r.stderr
    r = invoke(runner, "export", "--target", "onnx", "--int8", "--quantizer", "modelopt", "-o", tmp_path)
    assert r.exit_code == 2 and "--quantizer applies only to --target tensorrt" in r.stderr
    import castling_deploy.quantize.modelopt as mo

    def absent() -> None:
        raise MissingDependencyError("nvidia-modelopt", "modelopt", "ModelOpt quantization")

    monkeypatch.setattr(mo, "_modelopt_quantization", absent)
    r = invoke(runner, "export", "--target", "tensorrt", "--int8", "--quantizer", "modelopt", "--limit", 16,
               "-o", tmp_path)
    assert r.exit_code == 4 and "castling-deploy[modelopt]" in r.stderr
    assert not (tmp_path / "castling_nano_digits" / "tensorrt").exists()


def test_modelopt_never_sees_a_stub_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """tensorrt-stubs installs a bare tensorrt/ namespace package; ModelOpt would call trt.Logger on it."""
    import sys
    import types

    from castling_deploy.quantize.modelopt import _quiet_and_without_stub_tensorrt

    stub = types.ModuleType("tensorrt")  # no __file__: not the runtime
    monkeypatch.setitem(sys.modules, "tensorrt", stub)
    with _quiet_and_without_stub_tensorrt():
        with pytest.raises(ImportError):
            import tensorrt  # noqa: F401
    assert sys.modules["tensorrt"] is stub
