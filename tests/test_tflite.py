"""LiteRT target: every mode converts castling_nano and its numbers hold against the torch model."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")

from castling_deploy.errors import MissingDependencyError, UsageError  # noqa: E402
from castling_deploy.models import create_model  # noqa: E402
from castling_deploy.runtime.litert import LiteRTRunner  # noqa: E402
from castling_deploy.targets.tflite.convert import convert_tflite, read_tflite_metadata, tflite_census  # noqa: E402

IMG = 32
META = {"preprocessing": '{"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}', "labels": "cat,dog,é", "tool": "0.1.0"}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = create_model("castling_nano", form="deploy").eval()
    # A trained model's class token is O(1); at init (std 0.02) the final LayerNorm blows the int8 noise on that
    # one token up and full-integer cosine measured 0.93 — a property of untrained weights, not of the export.
    with torch.no_grad():
        m.cls_token.normal_(0.0, 1.0)
    return m


@pytest.fixture(scope="module")
def data(model: torch.nn.Module) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(1)
    calib = torch.randn(64, 3, IMG, IMG, generator=g).numpy()
    test = torch.randn(32, 3, IMG, IMG, generator=g).numpy()
    with torch.no_grad():
        ref = model(torch.from_numpy(test)).numpy()
    return {"calib": calib, "test": test, "ref": ref}


def _convert(model, data, tmp_path: Path, mode: str, io_dtype: str = "float32") -> tuple[Path, dict]:
    out = tmp_path / f"nano_{mode}_{io_dtype}.tflite"
    info = convert_tflite(
        model, out, mode=mode, calib_images=data["calib"], img_size=IMG, io_dtype=io_dtype, metadata=META
    )
    return out, info


@pytest.fixture(scope="module")
def fp32(model, data, tmp_path_factory) -> tuple[Path, dict]:
    return _convert(model, data, tmp_path_factory.mktemp("fp32"), "fp32")


def test_fp32_matches_torch(fp32, data) -> None:
    path, info = fp32
    y = LiteRTRunner(path, threads=1).run(data["test"])
    assert np.abs(y - data["ref"]).max() < 1e-4
    assert info["mode"] == "fp32" and info["input_dtype"] == "float32" and info["output_dtype"] == "float32"
    assert info["file_bytes"] == path.stat().st_size > 0
    assert info["versions"]["litert-torch"] != "absent" and info["conversion_seconds"] > 0
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # atomic write leaves no temp file


def test_signature_names_and_metadata_round_trip(fp32) -> None:
    path, _ = fp32
    from ai_edge_litert.interpreter import Interpreter

    sig = Interpreter(model_path=str(path)).get_signature_list()
    assert sig == {"serving_default": {"inputs": ["images"], "outputs": ["logits"]}}
    meta = read_tflite_metadata(path)
    assert {k: meta[k] for k in META} == META


def test_runner_batches_and_details(fp32, data) -> None:
    path, _ = fp32
    runner = LiteRTRunner(path, threads=2)
    batch = runner.run(data["test"][:4])
    single = np.concatenate([runner.run(data["test"][i : i + 1]) for i in range(4)])
    assert batch.shape == (4, 10) and batch.dtype == np.float32
    assert np.abs(batch - single).max() == 0.0
    assert runner.layout == "NCHW" and runner.input_details[0]["shape"].tolist() == [1, 3, IMG, IMG]
    assert "ai-edge-litert" in runner.name
    with pytest.raises(UsageError):
        runner.run(np.zeros((2, IMG, IMG, 3), np.float32))


def test_fp32_census_is_all_float(fp32) -> None:
    census = tflite_census(fp32[0])
    assert "int8" not in census["tensor_dtypes"] and census["tensor_dtypes"]["float32"] > 100
    assert census["ops"]["FULLY_CONNECTED"] == 17  # 4 blocks x (qkv, proj, fc1, fc2) + head
    assert census["ops"]["BATCH_MATMUL"] == 8 and "SOFTMAX" not in census["ops"]  # linear attention only
    assert census["float_activation_tensors_excluding_io"] > 100


@pytest.mark.slow
def test_fp16_close(model, data, tmp_path) -> None:
    path, info = _convert(model, data, tmp_path, "fp16")
    y = LiteRTRunner(path).run(data["test"])
    assert cosine(y, data["ref"]) > 0.999
    assert tflite_census(path)["tensor_dtypes"].get("float16", 0) >= 17


@pytest.mark.slow
def test_int8_hybrid(model, data, tmp_path) -> None:
    path, info = _convert(model, data, tmp_path, "int8")
    y = LiteRTRunner(path).run(data["test"])
    assert cosine(y, data["ref"]) >= 0.99
    assert (y.argmax(1) == data["ref"].argmax(1)).mean() >= 0.9
    census = info["census"]
    assert census["activation_dtypes"]["int8"] > 50 and census["ops"]["FULLY_CONNECTED"] == 17
    assert info["output_dtype"] == "int8"  # hybrid: float input, int8 logits the runner dequantizes
    assert read_tflite_metadata(path)["labels"] == META["labels"]


@pytest.mark.slow
@pytest.mark.parametrize("io_dtype", ["float32", "int8"])
def test_full_integer(model, data, tmp_path, io_dtype) -> None:
    path, info = _convert(model, data, tmp_path, "full_integer", io_dtype)
    assert info["norm_rewrite_max_abs_diff"] < 1e-4
    y = LiteRTRunner(path).run(data["test"])
    assert cosine(y, data["ref"]) >= 0.99
    census = tflite_census(path)
    assert census["float_activation_tensors_excluding_io"] == 0
    assert census["io_dtypes"] == {"inputs": [io_dtype], "outputs": [io_dtype]}
    if io_dtype == "int8":
        assert "float32" not in census["activation_dtypes"]  # no float tensor anywhere
        assert runner_input_is_quantized(path)


def runner_input_is_quantized(path: Path) -> bool:
    detail = LiteRTRunner(path).input_details[0]
    return detail["dtype"] == np.int8 and detail["quantization"][0] > 0


def test_bad_arguments(model, tmp_path) -> None:
    with pytest.raises(UsageError):
        convert_tflite(model, tmp_path / "x.tflite", mode="int4", calib_images=None, img_size=IMG)
    with pytest.raises(UsageError):
        convert_tflite(model, tmp_path / "x.tflite", mode="fp32", calib_images=None, img_size=IMG, io_dtype="int8")
    with pytest.raises(UsageError):
        convert_tflite(model, tmp_path / "x.tflite", mode="int8", calib_images=None, img_size=IMG)
    with pytest.raises(UsageError):
        convert_tflite(
            model, tmp_path / "x.tflite", mode="fp32", calib_images=None, img_size=IMG,
            metadata={"min_runtime_version": "1"},
        )
    assert not list(tmp_path.iterdir())


def test_missing_litert_torch_names_the_extra(model, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "litert_torch", None)
    with pytest.raises(MissingDependencyError) as err:
        convert_tflite(model, tmp_path / "x.tflite", mode="fp32", calib_images=None, img_size=IMG)
    assert err.value.extra == "tflite" and "litert-torch" in str(err.value)
