"""`build-engine EXPORT_DIR --device ssh://...` through a real loopback sshd, and the refusal of an engine on a
device it was not built for.

No TensorRT exists on this machine, so the device's ``trtexec`` is a stand-in shell script (passed with
``--trtexec``): it prints trtexec's real banner (``&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # ...``), logs
the arguments it got, and writes an "engine" whose bytes name the sha256 of the ONNX it was given. What these
tests check is ours: the transport (push, temp folder, bring-back, cleanup), the build_engine.sh the device runs
(version detection from the banner, the flags for that version), the metadata and fingerprint recorded, the
report, and that a failed build or verification leaves the export folder untouched. Whether a real TensorRT builds
a correct engine is not exercised here.
"""
from __future__ import annotations

import hashlib
import json
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import castling_deploy as cd
from castling_deploy.devices import DeviceUsageError, profile_on_device
from castling_deploy.devices.base import ShellDevice
from castling_deploy.devices.engine_compat import engine_mismatch, version_key
from castling_deploy.devices.errors import DeviceError, DeviceRuntimeMissing, DeviceToolMissing
from castling_deploy.report import load_report
from castling_deploy.targets.tensorrt.remote_build import build_engine_on_device

from ..conftest import DEMO_CKPT, DIGITS_VAL, invoke
from .conftest import listing

BANNER = "&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # /usr/src/tensorrt/bin/trtexec"


def _executable(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


@pytest.fixture(scope="module")
def trt_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    res = cd.export(DEMO_CKPT, targets=["tensorrt"], val=DIGITS_VAL, out=tmp_path_factory.mktemp("trt"), limit=40)
    assert res.passed
    return res["tensorrt"].folder


@pytest.fixture
def export_copy(trt_export: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(trt_export, tmp_path / "export"))


def stand_in_trtexec(folder: Path, *, fail: bool = False) -> tuple[str, Path]:
    """A trtexec stand-in (see the module doc); returns (its path, the file its arguments are logged to)."""
    argv_log = folder / "trtexec.argv"
    body = f"""#!/bin/sh
echo "{BANNER} $*"
case "$*" in *--help*) exit 0 ;; esac
printf '%s\\n' "$@" > {argv_log}
onnx= engine= cache=
for a in "$@"; do
  case "$a" in
    --onnx=*) onnx=${{a#--onnx=}} ;;
    --saveEngine=*) engine=${{a#--saveEngine=}} ;;
    --timingCacheFile=*) cache=${{a#--timingCacheFile=}} ;;
  esac
done
{'echo "[11/26/2026-10:00:01] [E] Error[4]: [network.cpp::validate::3162] Error Code 4: Internal Error (stand-in failure)"; echo "&&&& FAILED TensorRT.trtexec [TensorRT v100300] # trtexec"; exit 1' if fail else ''}
printf 'stand-in engine built from sha256:%s\\n' "$(sha256sum "$onnx" | cut -d' ' -f1)" > "$engine"
echo "timing entry" >> "$cache"
echo "[11/26/2026-10:00:02] [I] Engine built in 0.01 sec."
echo "&&&& PASSED TensorRT.trtexec [TensorRT v100300] # trtexec"
"""
    return _executable(folder / "trtexec", body), argv_log


def _state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_build_on_loopback_device_brings_back_engine_metadata_and_log(
        make_device: Callable[..., ShellDevice], export_copy: Path, device_dirs: dict[str, Path], tmp_path: Path) -> None:
    trtexec, argv_log = stand_in_trtexec(tmp_path)
    dev = make_device("ssh://loopback")
    res = build_engine_on_device(export_copy, dev, trtexec=trtexec, batch_range=(1, 4, 16))
    onnx_sha = hashlib.sha256((export_copy / "model.onnx").read_bytes()).hexdigest()
    assert (export_copy / "model.engine").read_text() == f"stand-in engine built from sha256:{onnx_sha}\n"
    argv = argv_log.read_text().splitlines()
    assert argv[:2] == ["--onnx=model.onnx", "--saveEngine=model.engine"]
    assert "--minShapes=images:1x3x32x32" in argv and "--maxShapes=images:16x3x32x32" in argv
    assert "--stronglyTyped" not in argv  # 10.3 is weak typing; fp32 needs no precision flag
    meta = json.loads((export_copy / "model.engine.json").read_text())
    fp = dev.fingerprint()
    assert meta["tensorrt"] == "10.3.0" and meta["typing"] == "weak" and meta["built_by"] == "build_engine.sh"
    assert meta["device"] == "ssh://loopback" and meta["fingerprint"]["hostname"] == fp["hostname"]
    assert meta["batch_range"] == [1, 4, 16] and meta["engine_bytes"] == (export_copy / "model.engine").stat().st_size
    assert BANNER in (export_copy / "build.log").read_text()
    assert (export_copy / "timing.cache").read_text() == "timing entry\n" and not meta["timing_cache_reused"]
    report = load_report(export_copy / "report.json")
    rec = next(a for a in report.artifacts if a.file == "model.engine")
    assert rec.sha256 == hashlib.sha256((export_copy / "model.engine").read_bytes()).hexdigest()
    assert report.target_info["engine"]["device"] == "ssh://loopback" and res["verified"] is False
    assert listing(device_dirs["tmp"]) == []  # the device temp folder is gone
    # A rebuild sends the timing cache back and reuses the ONNX already in the device cache.
    pushed = dev.stats["pushed"]
    build_engine_on_device(export_copy, dev, trtexec=trtexec, batch_range=(1, 4, 16))
    assert dev.stats["pushed"] == pushed and (export_copy / "timing.cache").read_text() == "timing entry\n" * 2
    assert json.loads((export_copy / "model.engine.json").read_text())["timing_cache_reused"] is True


def test_failed_build_names_the_error_and_leaves_the_export_alone(
        make_device: Callable[..., ShellDevice], export_copy: Path, device_dirs: dict[str, Path], tmp_path: Path) -> None:
    trtexec, _ = stand_in_trtexec(tmp_path, fail=True)
    before = _state(export_copy)
    with pytest.raises(DeviceError, match=r"engine build failed \(exit 1\).*Error Code 4: Internal Error"):
        build_engine_on_device(export_copy, make_device("ssh://loopback"), trtexec=trtexec)
    assert _state(export_copy) == before and listing(device_dirs["tmp"]) == []


def test_device_without_trtexec_is_exit_4_and_verify_needs_tensorrt_there(
        make_device: Callable[..., ShellDevice], export_copy: Path, device_dirs: dict[str, Path], tmp_path: Path) -> None:
    before = _state(export_copy)
    with pytest.raises(DeviceToolMissing, match=r"ssh://loopback: no usable trtexec on the device \(build_engine.sh: "
                                                r"trtexec not found on PATH or in /usr/src/tensorrt/bin.*--trtexec PATH"):
        build_engine_on_device(export_copy, make_device("ssh://loopback"))
    trtexec, _ = stand_in_trtexec(tmp_path)
    # --val verifies on the device before anything is written: this device python has no tensorrt.
    with pytest.raises(DeviceRuntimeMissing, match="cannot import tensorrt") as err:
        build_engine_on_device(export_copy, make_device("ssh://loopback"), trtexec=trtexec, val=DIGITS_VAL, limit=8)
    assert err.value.exit_code == 4
    assert _state(export_copy) == before and listing(device_dirs["tmp"]) == []


def test_cli_build_engine_on_device(runner, sshd, export_copy: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASTLING_DEPLOY_DEVICE_CACHE", str(tmp_path / "device-cache"))
    trtexec, _ = stand_in_trtexec(tmp_path)
    r = invoke(runner, "build-engine", export_copy, "--device", "ssh://loopback", "--ssh-config", sshd.config,
               "--device-python", sys.executable, "--trtexec", trtexec, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["engine"]["tensorrt"] == "10.3.0" and doc["engine"]["device"] == "ssh://loopback"
    r = invoke(runner, "build-engine", export_copy, "--trtexec", trtexec)
    assert r.exit_code == 2 and "add --device URI" in r.stderr


@pytest.fixture
def trt11_python(tmp_path: Path) -> str:
    """A device python whose `tensorrt` reports 11.0.0 (a module with only a version: the engine is refused
    before anything would load it)."""
    pkg = tmp_path / "trt11" / "tensorrt"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('__version__ = "11.0.0"\n')
    return _executable(tmp_path / "python3", f'#!/bin/sh\nPYTHONPATH={pkg.parent} exec {sys.executable} "$@"\n')


def test_engine_built_for_other_tensorrt_is_refused_before_the_push(
        make_device: Callable[..., ShellDevice], export_copy: Path, device_dirs: dict[str, Path], tmp_path: Path,
        trt11_python: str) -> None:
    trtexec, _ = stand_in_trtexec(tmp_path)
    build_engine_on_device(export_copy, make_device("ssh://loopback"), trtexec=trtexec)
    cached = sorted(p.name for p in device_dirs["cache"].rglob("*") if p.is_file())
    dev = make_device("ssh://loopback", python=trt11_python)
    assert dev.fingerprint()["runtimes"]["tensorrt"] == "11.0.0"
    with pytest.raises(DeviceUsageError, match=r"model\.engine cannot run there: it was built with TensorRT 10\.3\.0 "
                                               r"and the device has TensorRT 11\.0\.0; rebuild it on that device: "
                                               r"castling-deploy build-engine .* --device ssh://loopback"):
        profile_on_device(dev, export_copy / "model.engine", runs=2, warmup=0)
    assert sorted(p.name for p in device_dirs["cache"].rglob("*") if p.is_file()) == cached  # nothing pushed


def test_engine_mismatch_rules() -> None:
    meta = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}
    orin = {"runtimes": {"tensorrt": None}, "gpu": None,
            "jetson": {"tensorrt_deb": "10.3.0.30-1+cuda12.5", "model": "NVIDIA Jetson AGX Orin Developer Kit",
                       "compute_capability": "8.7"}}
    assert engine_mismatch(meta, orin) == ([], [])  # the deb version and the device-tree model name match
    xavier = {"jetson": {"tensorrt_deb": "10.3.0.30-1+cuda12.5", "model": "Jetson AGX Xavier", "compute_capability": "7.2"}}
    problems, _ = engine_mismatch(meta, xavier)
    assert problems == ["it was built for compute capability 8.7 (Orin) and the device's GPU is 7.2 (Jetson AGX Xavier)"]
    rtx = {"runtimes": {"tensorrt": "10.3.0"}, "gpu": {"name": "NVIDIA RTX A4000", "compute_capability": "8.6"}}
    a6000 = {"tensorrt": "10.3.0", "gpu": "NVIDIA RTX A6000", "compute_capability": "8.6"}
    assert engine_mismatch(a6000, rtx) == ([], ["it was built on a NVIDIA RTX A6000 and the device has a NVIDIA RTX A4000"])
    assert engine_mismatch({"tensorrt": "10.3.0", "gpu": "NVIDIA RTX A6000"}, {"gpu": {"name": "NVIDIA H100"}})[0]
    assert engine_mismatch(meta, {}) == ([], [])  # nothing known about the device: the runtime decides
    assert version_key("v100300") == (10, 3, 0) and version_key("v8601") == (8, 6, 1)
    assert version_key("10.12.0.36") == (10, 12, 0) and version_key("") is None
