"""The commands users type, through a real loopback sshd: `profile --device` (one device and a fleet, with an
unreachable member), `verify PACKAGE --device` (passing, and a tampered model that must fail on the device), and
the device run recorded in report.json with its fingerprint."""
from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import castling_deploy as cd
from castling_deploy.report import load_report

from ..conftest import DEMO_CKPT, DIGITS_VAL, invoke
from .sshd import free_port


@pytest.fixture(autouse=True)
def device_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The "device" is this machine: keep its artifact cache out of the real ~/.cache."""
    monkeypatch.setenv("CASTLING_DEPLOY_DEVICE_CACHE", str(tmp_path / "device-cache"))
    return tmp_path / "device-cache"


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dev_export")
    res = cd.export(DEMO_CKPT, targets=["onnx"], val=DIGITS_VAL, out=out, limit=60)
    assert res.passed
    return res["onnx"].folder


def test_profile_on_loopback_ssh_records_fingerprint(runner, sshd, demo_export: Path, device_cache: Path) -> None:
    onnx_path = demo_export / "model.onnx"
    r = invoke(runner, "profile", onnx_path, "--device", "ssh://loopback", "--ssh-config", sshd.config,
               "--device-python", sys.executable, "--runs", 20, "--warmup", 2, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    (dev,) = doc["devices"]
    assert dev["ok"] and dev["uri"] == "ssh://loopback"
    lat = dev["result"]["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] < 1000
    assert dev["result"]["fingerprint"]["runtimes"]["onnxruntime"]
    cached = list(device_cache.rglob("model.onnx"))
    assert len(cached) == 1 and cached[0].read_bytes() == onnx_path.read_bytes()  # content-addressed push
    rec = load_report(demo_export / "report.json").devices[-1]
    assert rec["uri"] == "ssh://loopback" and rec["latency_ms"]["p50"] == lat["p50"]
    assert rec["fingerprint"]["hostname"] == dev["result"]["fingerprint"]["hostname"]


def test_fleet_prints_every_device_and_exits_with_the_failure(runner, sshd, demo_export: Path) -> None:
    dead = f"ssh://127.0.0.1:{free_port()}"
    r = invoke(runner, "profile", demo_export / "model.onnx", "--device", "local", "--device", "ssh://loopback",
               "--device", dead, "--ssh-config", sshd.config, "--device-python", sys.executable,
               "--runs", 10, "--warmup", 1)
    assert r.exit_code == 2, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[2:]}
    assert set(rows) == {"local", "ssh://loopback", dead}
    assert "FAILED (exit 2)" in rows[dead] and "connection refused" in rows[dead]
    for ok in ("local", "ssh://loopback"):
        p50 = float(rows[ok].split()[-5])
        assert 0 < p50 < 1000
    assert r.stderr.strip().splitlines()[-1].startswith("error: 1 of 3 devices failed")


def _package(folder: Path, out: Path) -> Path:
    return cd.package(folder, out)


def test_verify_package_on_the_device(runner, sshd, demo_export: Path, tmp_path: Path) -> None:
    pkg = _package(demo_export, tmp_path / "ok.zip")
    args = ["--val", DIGITS_VAL, "--limit", 60, "--device", "ssh://loopback", "--ssh-config", sshd.config,
            "--device-python", sys.executable, "--json"]
    r = invoke(runner, "verify", pkg, *args)
    assert r.exit_code == 0, r.stderr
    (dev,) = json.loads(r.stdout)["devices"]
    assert dev["status"] == "passed" and dev["fingerprint"]["arch"]
    measured = {row["file"]: row for row in dev["accuracy"] if "measured_top1" in row}
    assert set(measured) == {"onnx/model.onnx"} and measured["onnx/model.onnx"]["measured_top1"] > 90
    assert "ssh://loopback" in measured["onnx/model.onnx"]["runtime"]


def test_verify_on_the_device_without_a_dataset(runner, sshd, demo_export: Path, tmp_path: Path) -> None:
    """No --val: the package's reference inputs run on the device and each file must give back its export-time
    logits."""
    pkg = _package(demo_export, tmp_path / "ok.zip")
    r = invoke(runner, "verify", pkg, "--device", "ssh://loopback", "--ssh-config", sshd.config,
               "--device-python", sys.executable, "--json")
    assert r.exit_code == 0, r.stderr
    (dev,) = json.loads(r.stdout)["devices"]
    (row,) = dev["reference"]
    assert row["file"] == "onnx/model.onnx" and row["status"] == "passed" and "ssh://loopback" in row["runtime"]
    assert row["min_cosine_vs_export"] > 0.9999 and row["max_abs_vs_folded"] < 1e-4 and dev["accuracy"] is None


def test_tampered_model_fails_on_the_device(runner, sshd, demo_export: Path, tmp_path: Path) -> None:
    """A package whose model was replaced (hashes rewritten to match) and a trusted signer: the device run is
    what catches it — the fp32 model is compared with the accuracy recorded at export, exit 3."""
    key = tmp_path / "k"
    assert invoke(runner, "keygen", "-o", key).exit_code == 0
    bad = tmp_path / "bad"
    shutil.copytree(demo_export, bad)
    m = onnx.load(bad / "model.onnx")
    for init in m.graph.initializer:
        if init.name.endswith("head.weight") or "head" in init.name and init.dims and len(init.dims) == 2:
            w = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(np.random.default_rng(0).permutation(w), init.name))
            break
    else:
        pytest.fail("no head weight found to tamper with")
    onnx.save(m, bad / "model.onnx")
    rep = json.loads((bad / "report.json").read_text())
    from castling_deploy.digest import file_sha256

    rep["artifacts"][0]["sha256"] = file_sha256(bad / "model.onnx")
    rep["artifacts"][0]["bytes"] = (bad / "model.onnx").stat().st_size
    (bad / "report.json").write_text(json.dumps(rep))
    pkg = tmp_path / "bad.zip"
    assert invoke(runner, "package", bad, "-o", pkg, "--sign", key).exit_code == 0
    assert "signature.json" in zipfile.ZipFile(pkg).namelist()
    r = invoke(runner, "verify", pkg, "--val", DIGITS_VAL, "--limit", 60, "--trust", f"{key}.pub",
               "--device", "ssh://loopback", "--ssh-config", sshd.config,
               "--device-python", sys.executable)
    assert r.exit_code == 3, r.stderr
    assert "ssh://loopback" in r.stderr.strip().splitlines()[-1] and "recorded" in r.stderr
