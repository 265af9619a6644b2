"""ONNX export end to end: demo accuracy, DeiT-T at two resolutions and two batch sizes, the float ONNX exported once
and shared with the TensorRT target, bad output folders exit 2, interruptions and crashes leave nothing half-written
(no staging folder, no temp folder) and never touch the previous good export."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from castling_deploy.fold import predict
from castling_deploy.models import create_model
from castling_deploy.models.checkpoint import load_checkpoint
from castling_deploy.runtime.ort import OrtRunner
from castling_deploy.targets.onnx.convert import read_onnx_metadata

from .conftest import DEMO_CKPT, invoke, temp_names

OUR_TEMP_PREFIXES = ("castling-", ".partial-", ".quantize-", ".onnx-export-")


def test_demo_onnx_matches_torch_on_val(demo_onnx_trt) -> None:
    folder = demo_onnx_trt.folder("onnx")
    doc = demo_onnx_trt.doc
    assert doc["status"] == "passed"
    report = json.loads((folder / "report.json").read_text())
    printed = doc["reports"][0]
    assert printed.pop("folder") == str(folder)
    assert report == printed  # stdout adds only where the folder is
    stages = {s["stage"]: s for s in report["error_budget"]}
    assert list(stages) == ["fold", "export", "int8"]
    exp = stages["export"]["metrics"]
    assert exp["max_abs_logit"] < 1e-4 and exp["top1_agreement"] == 1.0  # README: fp32 atol 1e-4
    assert exp["top1_acc"] == exp["ref_top1_acc"] >= 95.0  # models/README.md: the demo scores 98% on val
    assert report["data"]["val"]["count"] == 359 and report["data"]["val"]["digest"].startswith("sha256:")
    # independent re-check of the written file against the checkpoint's deploy form, on other inputs
    ck = load_checkpoint(DEMO_CKPT)
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    ref = predict(ck.build_model(form="deploy"), x)
    assert np.abs(OrtRunner(folder / "model.onnx").run(x) - ref).max() < 1e-4
    meta = read_onnx_metadata(folder / "model.onnx")
    assert meta["architecture"] == "castling_nano" and meta["checkpoint_sha256"] == ck.sha256
    assert json.loads(meta["labels"]) == ck.labels and json.loads(meta["preprocess"])["crop"] == 32
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".partial-")]


def test_float_onnx_is_exported_once_and_shared_with_tensorrt(demo_onnx_trt) -> None:
    """--target onnx --target tensorrt in one run: one export, one verification, the same bytes in both folders,
    and the run-scoped copy removed when the run ends."""
    assert demo_onnx_trt.extra["export_onnx_calls"] == ["model.onnx"]
    onnx_dir, trt_dir = demo_onnx_trt.folder("onnx"), demo_onnx_trt.folder("tensorrt")
    assert (onnx_dir / "model.onnx").read_bytes() == (trt_dir / "model.onnx").read_bytes()
    export = [{s["id"]: s for s in demo_onnx_trt.report(t)["error_budget"]}["export"] for t in ("onnx", "tensorrt")]
    assert export[0] == export[1]  # the one measurement, recorded in both reports
    arts = [{a["file"]: a for a in demo_onnx_trt.report(t)["artifacts"]}["model.onnx"] for t in ("onnx", "tensorrt")]
    assert arts[0]["sha256"] == arts[1]["sha256"] == hashlib.sha256((onnx_dir / "model.onnx").read_bytes()).hexdigest()
    assert "reusing" in demo_onnx_trt.stderr
    assert demo_onnx_trt.extra["temp_left"] == []


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


def _ours(folder: Path) -> list[str]:
    return temp_names(folder, OUR_TEMP_PREFIXES)


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


def test_interrupt_during_int8_removes_every_temp_folder(runner, tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C right after quantizing: by then the run holds a staging folder and the shared float ONNX in a temp
    folder; neither may survive."""
    from castling_deploy.quantize import ort_int8

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    seen: dict[str, list[str]] = {}
    real = ort_int8.quantize_onnx

    def quantize_then_interrupt(fp32, out, *a, **kw):
        real(fp32, out, *a, **kw)
        seen["temp"], seen["staging"] = _ours(temp), _ours(Path(out).parent.parent)
        raise KeyboardInterrupt

    monkeypatch.setattr(ort_int8, "quantize_onnx", quantize_then_interrupt)
    r = invoke(runner, "export", "--target", "onnx", "--int8", "--limit", 32, "-o", tmp_path / "out")
    assert r.exit_code == 130, r.stderr
    assert any(n.startswith("castling-float-onnx-") for n in seen["temp"]), seen  # it was there
    assert any(n.startswith("castling-run-") for n in seen["temp"]), seen  # inside the command's own temp root
    assert seen["staging"], seen
    assert _ours(temp) == []
    assert list((tmp_path / "out" / "castling_nano_digits").iterdir()) == []


def test_crash_during_reexport_keeps_the_previous_good_export(runner, demo_onnx_trt, tmp_path: Path,
                                                              monkeypatch) -> None:
    import shutil

    import castling_deploy.targets.onnx.target as onnx_target

    out = tmp_path / "out"
    good = out / "castling_nano_digits" / "onnx"
    shutil.copytree(demo_onnx_trt.folder("onnx"), good)
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def crash(model, path, *a, **kw):
        Path(path).write_bytes(b"half")
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(onnx_target, "export_onnx", crash)
    monkeypatch.delenv("CASTLING_DEBUG", raising=False)
    r = invoke(runner, "export", "--int8", "-o", out)
    assert r.exit_code == 1 and "converter crashed" in r.stderr.strip().splitlines()[-1]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert sorted(p.name for p in good.parent.iterdir()) == ["onnx"]  # no staging folder left beside it


def test_sigterm_during_export_leaves_no_artifact(deit_tiny_ckpt: Path, tmp_path: Path) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "castling_deploy.cli", "export", str(deit_tiny_ckpt), "-o",
                             str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, TMPDIR=str(temp)))
    model_dir = tmp_path / "out" / "deit_tiny_random"
    deadline = time.time() + 120
    while time.time() < deadline and not (model_dir.exists() and any(model_dir.glob(".partial-*"))):
        time.sleep(0.05)
    assert any(model_dir.glob(".partial-*")), "the export never started staging"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-500:]
    assert list(model_dir.iterdir()) == []
    assert _ours(temp) == []


def test_sigterm_during_a_second_target_removes_every_temp_folder(tmp_path: Path) -> None:
    """SIGTERM while Core ML converts, after the ONNX target finished: the finished target stays, the staging folder
    and the run's temp folders (the shared float ONNX, Core ML's unshipped fp32 program) go."""
    temp = tmp_path / "temp"
    temp.mkdir()
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "castling_deploy.cli", "export", "--target", "onnx", "--target",
                             "coreml", "--limit", "16", "-o", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, TMPDIR=str(temp)))
    deadline = time.time() + 180
    while time.time() < deadline and not any(n.startswith("castling-coreml-") for n in _ours(temp)):
        time.sleep(0.05)
    during = _ours(temp)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert any(n.startswith("castling-float-onnx-") for n in during), during
    assert any(n.startswith("castling-coreml-") for n in during), (during, err.decode()[-500:])
    assert proc.returncode == 130, err.decode()[-500:]
    model_dir = out / "castling_nano_digits"
    assert sorted(p.name for p in model_dir.iterdir()) == ["onnx"]  # no staging folder
    assert sorted(p.name for p in (model_dir / "onnx").iterdir()) == ["model.onnx", "reference.npz", "report.json"]
    left = _ours(temp)
    assert left == []
