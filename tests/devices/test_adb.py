"""adb devices: what can be checked without a phone (argv, refusals, error mapping) runs here; the real
round trip needs a device and skips with the reason. Set CASTLING_DEPLOY_TEST_ADB=SERIAL and
CASTLING_DEPLOY_TEST_BENCHMARK_MODEL=/path/to/android_aarch64_benchmark_model to run it."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from castling_deploy.devices import DeviceUsageError, logits_on_device, parse_device, profile_on_device
from castling_deploy.devices.proc import Completed


def test_adb_refusals_need_no_device(tmp_path: Path) -> None:
    dev = parse_device("adb:EMULATOR-1")
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    tfl = tmp_path / "m.tflite"
    tfl.write_bytes(b"x")
    with pytest.raises(DeviceUsageError, match="no python"):
        dev.run_script("print(1)", [], timeout=5)
    with pytest.raises(DeviceUsageError, match=".tflite files only"):
        profile_on_device(dev, onnx)
    with pytest.raises(DeviceUsageError, match="benchmark_model"):
        profile_on_device(dev, tfl)
    with pytest.raises(DeviceUsageError, match="device python"):
        logits_on_device(dev, tfl, np.zeros((1, 3, 8, 8), np.float32))
    assert dev.cache_root() == "/data/local/tmp/castling-deploy" and dev.tmp_label() == "/data/local/tmp"


@pytest.mark.parametrize("stderr, meaning", [
    (b"adb: no devices/emulators found\n", "no device connected"),
    (b"adb: device 'XYZ' not found\n", "device not found"),
    (b"error: device unauthorized.\nThis adb server's $ADB_VENDOR_KEYS is not set\n", "unauthorized"),
    (b"error: device offline\n", "device offline"),
    (b"adb: more than one device/emulator\n", "more than one device"),
])
def test_adb_failures_are_usage_errors(stderr: bytes, meaning: str) -> None:
    err = parse_device("adb:XYZ")._transport_error(Completed(rc=1, stdout=b"", stderr=stderr))
    assert isinstance(err, DeviceUsageError) and meaning in str(err) and err.exit_code == 2


@pytest.mark.skipif(not (shutil.which("adb") and os.environ.get("CASTLING_DEPLOY_TEST_ADB")),
                    reason="no Android device here: needs `adb` and CASTLING_DEPLOY_TEST_ADB=SERIAL "
                           "(+ CASTLING_DEPLOY_TEST_BENCHMARK_MODEL=PATH)")
def test_adb_round_trip(tflite_artifact: Path) -> None:  # pragma: no cover - needs a phone
    bm = os.environ.get("CASTLING_DEPLOY_TEST_BENCHMARK_MODEL")
    with parse_device(f"adb:{os.environ['CASTLING_DEPLOY_TEST_ADB']}", benchmark_model=Path(bm) if bm else None) as dev:
        fp = dev.fingerprint()
        assert fp["os"] == "Android" and fp["android"]["ro.build.version.sdk"]
        if bm:
            res = profile_on_device(dev, tflite_artifact, runs=20, warmup=2, threads=1)
            assert res["latency_ms"]["mean"] > 0 and res["per_op"]
