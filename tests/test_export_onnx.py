"""ONNX export end to end: demo accuracy, DeiT-T at two resolutions and two batch sizes, broken artifacts
fail with exit 3, bad output folders exit 2, interruptions leave nothing half-written."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from castling_deploy.targets.onnx.convert import read_onnx_metadata
from castling_deploy.fold import fold_softmax_branch, predict
from castling_deploy.models import create_model
from castling_deploy.models.checkpoint import load_checkpoint
from castling_deploy.runtime.ort import OrtRunner

from .conftest import DEMO_CKPT, invoke


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory: pytest.TempPathFactory):
    from click.testing import CliRunner

    from castling_deploy.cli import cli

    out = tmp_path_factory.mktemp("exports")
    r = CliRunner().invoke(cli, ["export", "--target", "onnx", "-o", str(out), "--json"], catch_exceptions=False)
    return r, out / "castling_nano_digits" / "onnx"


def test_demo_onnx_matches_torch_on_val(demo_export) -> None:
    r, folder = demo_export
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["status"] == "passed"
    report = json.loads((folder / "report.json").read_text())
    assert report == json.loads(json.dumps(doc["reports"][0], default=str)) | {} or report["status"] == "passed"
    stages = {s["stage"]: s for s in report["error_budget"]}
    assert list(stages) == ["fold", "export"]
    exp = stages["export"]["metrics"]
    assert exp["max_abs_logit"] < 1e-4 and exp["top1_agreement"] == 1.0
    assert exp["top1_acc"] == exp["ref_top1_acc"] >= 95.0
    assert report["data"]["val"]["count"] == 359 and report["data"]["val"]["digest"].startswith("sha256:")
    # independent re-check of the written file against the folded torch model
    ck = load_checkpoint(DEMO_CKPT)
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    ref = predict(fold_softmax_branch(ck.build_model()), x)
    assert np.abs(OrtRunner(folder / "model.onnx").run(x) - ref).max() < 1e-4
    meta = read_onnx_metadata(folder / "model.onnx")
    assert meta["architecture"] == "castling_nano" and meta["checkpoint_sha256"] == ck.sha256
    assert json.loads(meta["labels"]) == ck.labels and json.loads(meta["preprocess"])["crop"] == 32
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".partial-")]


@pytest.fixture(scope="module")
def deit_tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("deit") / "deit_tiny_random.pth"
    torch.save({"model": create_model("castling_deit_tiny", form="deploy").state_dict()}, p)
    return p


@pytest.mark.parametrize("imgsz", [224, 384])
def test_deit_tiny_exports_and_matches_at_two_resolutions(runner, deit_tiny_ckpt: Path, tmp_path: Path,
                                                         imgsz: int) -> None:
    val = tmp_path / "val.npz"  # 8 preprocessed images keep the 384 px reference pass short
    np.savez(val, images=np.random.default_rng(0).standard_normal((8, 3, imgsz, imgsz)).astype(np.float32))
    r = invoke(runner, "export", deit_tiny_ckpt, "--arch", "castling_deit_tiny", "--imgsz", imgsz,
               "--val", val, "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)["reports"][0]
    assert report["target_info"]["export"]["simplifier"].startswith("onnxsim")
    assert report["error_budget"][-1]["metrics"]["max_abs_logit"] < 1e-4
    path = tmp_path / "out" / "deit_tiny_random" / "onnx" / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    ck = load_checkpoint(deit_tiny_ckpt, arch="castling_deit_tiny", img_size=imgsz)
    model = ck.build_model()
    ort = OrtRunner(path)
    for batch in (1, 8):
        x = np.random.default_rng(batch).standard_normal((batch, 3, imgsz, imgsz)).astype(np.float32)
        diff = np.abs(ort.run(x) - predict(model, x))
        assert diff.shape == (batch, 1000) and diff.max() < 1e-4


def _perturb_one_weight(real_export):
    def export(model, path, *a, **kw):
        info = real_export(model, path, *a, **kw)
        m = onnx.load(str(path))
        init = max(m.graph.initializer, key=lambda t: len(t.raw_data))  # the largest weight matrix
        arr = onnx.numpy_helper.to_array(init).copy()
        arr.flat[0] += 50.0
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
        onnx.save(m, str(path))
        return info

    return export


def test_broken_artifact_fails_with_exit_3_and_a_failed_report(runner, tmp_path: Path, monkeypatch) -> None:
    import castling_deploy.targets.onnx.target as onnx_target

    monkeypatch.setattr(onnx_target, "export_onnx", _perturb_one_weight(onnx_target.export_onnx))
    r = invoke(runner, "export", "-o", tmp_path, "--json")
    assert r.exit_code == 3
    assert "max |Δlogit|" in r.stderr.strip().splitlines()[-1]
    report = json.loads((tmp_path / "castling_nano_digits" / "onnx" / "report.json").read_text())
    assert report["status"] == "failed" and json.loads(r.stdout)["status"] == "failed"
    export = report["error_budget"][-1]
    assert not export["passed"] and export["metrics"]["max_abs_logit"] > 1e-4


def test_unwritable_output_exits_2_and_leaves_nothing(runner, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a regular file where a folder should be")
    r = invoke(runner, "export", "-o", blocker / "out")
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert r.exit_code == 2 and len(errors) == 1 and "not writable" in errors[0] and "Traceback" not in r.stderr
    assert blocker.read_text().startswith("a regular file")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        r = invoke(runner, "export", "-o", ro)
        assert r.exit_code == 2 and not any(ro.iterdir())


def test_interrupt_mid_export_leaves_no_artifact(runner, tmp_path: Path, monkeypatch) -> None:
    import castling_deploy.targets.onnx.target as onnx_target

    def export_then_interrupt(model, path, *a, **kw):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_target, "export_onnx", export_then_interrupt)
    r = invoke(runner, "export", "-o", tmp_path)
    assert r.exit_code == 130
    model_dir = tmp_path / "castling_nano_digits"
    assert not (model_dir / "onnx").exists()
    assert list(model_dir.iterdir()) == []


def test_sigterm_during_export_leaves_no_artifact(deit_tiny_ckpt: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "castling_deploy.cli", "export", str(deit_tiny_ckpt), "-o",
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    model_dir = tmp_path / "deit_tiny_random"
    deadline = time.time() + 120
    while time.time() < deadline and not (model_dir.exists() and any(model_dir.glob(".partial-*"))):
        time.sleep(0.05)
    assert any(model_dir.glob(".partial-*")), "the export never started staging"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-500:]
    assert list(model_dir.iterdir()) == []
