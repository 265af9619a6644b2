"""``local`` runs through the same code path as a remote device (shell commands, the runner script piped to
a fresh python, the content-addressed cache); no server needed, so these run everywhere."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from castling_deploy.devices import DeviceRuntimeMissing, logits_on_device, parse_device, profile_on_device
from castling_deploy.devices.fingerprint import collect_fingerprint
from castling_deploy.errors import UsageError

from .conftest import listing


@pytest.fixture
def local(device_dirs):
    with parse_device("local", cache_dir=str(device_dirs["cache"]), tmp_dir=str(device_dirs["tmp"])) as dev:
        yield dev


def test_local_profile_and_fingerprint(local, onnx_artifact: Path, device_dirs) -> None:
    assert local.python == sys.executable  # `local` defaults to this interpreter
    res = profile_on_device(local, onnx_artifact, runs=10, warmup=2, threads=1)
    assert res["device"] == "local" and res["latency_ms"]["p50"] > 0 and res["input_shape"] == [1, 3, 32, 32]
    here = collect_fingerprint()
    assert {k: res["fingerprint"][k] for k in ("hostname", "arch", "cpu_model", "runtimes")} == \
        {k: here[k] for k in ("hostname", "arch", "cpu_model", "runtimes")}
    assert res["artifact"]["remote_path"].startswith(str(device_dirs["cache"]))
    assert listing(device_dirs["tmp"]) == []


def test_local_logits(local, onnx_artifact: Path, device_dirs) -> None:
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    sess = ort.InferenceSession(str(onnx_artifact), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(logits_on_device(local, onnx_artifact, x), ref, atol=1e-5, rtol=0)
    assert listing(device_dirs["tmp"]) == []


def test_local_missing_runtime(device_dirs, onnx_artifact: Path, no_ort_python: str) -> None:
    with parse_device("local", python=no_ort_python, cache_dir=str(device_dirs["cache"]),
                      tmp_dir=str(device_dirs["tmp"])) as dev, pytest.raises(DeviceRuntimeMissing) as exc:
        logits_on_device(dev, onnx_artifact, np.zeros((1, 3, 32, 32), np.float32))
    assert exc.value.exit_code == 4 and "local:" in str(exc.value) and "pip install onnxruntime" in str(exc.value)
    assert listing(device_dirs["tmp"]) == []  # the logits temp folder is removed on failure too


def test_bad_requests_are_usage_errors(local, onnx_artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        profile_on_device(local, tmp_path / "missing.onnx")
    with pytest.raises(UsageError):
        profile_on_device(local, onnx_artifact, runs=0)
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"x")
    with pytest.raises(UsageError, match="unknown artifact type"):
        profile_on_device(local, bad)
    with pytest.raises(UsageError, match="NCHW"):
        logits_on_device(local, onnx_artifact, np.zeros((3, 32, 32), np.float32))
