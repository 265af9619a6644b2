"""CLI contract edge cases found in review: strict JSON, goals that cannot be switched off, the fold's record
travelling with a folded checkpoint, calibration never verifying itself, refused folds still reported."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from castling_deploy.data import load_image_set
from castling_deploy.errors import DataError

from .conftest import DIGITS_TRAIN, DIGITS_VAL, LABELS, NANO_PP, invoke


def _strict(text: str):
    def bad(token: str):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=bad)


def test_json_output_is_strict_json(demo_onnx_trt) -> None:
    doc = _strict(demo_onnx_trt.stdout)  # the fold stage has max |Δ| 0 -> infinite SQNR, written as null
    assert doc["reports"][0]["error_budget"][0]["metrics"]["sqnr_db"] is None
    for target in ("onnx", "tensorrt"):
        _strict((demo_onnx_trt.folder(target) / "report.json").read_text())


def test_unexpected_error_is_one_line_and_exit_1(runner, dead_branch_ckpt: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from castling_deploy import pipeline

    def boom(*a, **kw):
        raise RuntimeError("boom: something nobody foresaw\nsecond line with details")

    monkeypatch.setattr(pipeline, "prepare_session", boom)
    monkeypatch.delenv("CASTLING_DEBUG", raising=False)
    r = invoke(runner, "export", dead_branch_ckpt, "-o", tmp_path)
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # one line: the first line of the message, the type, how to see more
    assert lines[0].startswith("error: RuntimeError: boom: something nobody foresaw") and "CASTLING_DEBUG=1" in lines[0]
    assert "second line" not in r.stderr and "Traceback" not in r.output
    monkeypatch.setenv("CASTLING_DEBUG", "1")  # and the traceback is there when asked for
    with pytest.raises(RuntimeError, match="boom"):
        invoke(runner, "export", dead_branch_ckpt, "-o", tmp_path)


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "101"])
def test_tolerance_must_be_a_sane_number(runner, tmp_path: Path, value: str) -> None:
    for cmd in (["export"], ["fold", str(DIGITS_VAL.parent.parent.parent / "models" / "castling_nano_digits.pt"),
                             "-o", str(tmp_path / "f.pt")]):
        r = invoke(runner, *cmd, "--tolerance", value, *(["-o", tmp_path] if cmd == ["export"] else []))
        assert r.exit_code == 2 and "--tolerance" in r.stderr, (cmd, r.stderr)


def test_without_val_calibration_images_are_not_the_verification_images(runner, tmp_path: Path) -> None:
    from .conftest import DEMO_CKPT

    r = invoke(runner, "export", DEMO_CKPT, "--int8", "--calib", DIGITS_TRAIN, "--calib-size", 200, "-o", tmp_path,
               "--json")
    assert r.exit_code == 0, r.stderr
    data = _strict(r.stdout)["reports"][0]["data"]
    assert data["val"]["digest"] != data["calib"]["digest"]
    assert data["val"]["count"] == 40 and data["calib"]["count"] == 160 and data["val"]["labeled"]
    assert "held-out" in data["val"]["source"]


def test_refused_fold_during_export_writes_failed_reports_and_json(runner, alive_branch_ckpt: Path,
                                                                   tmp_path: Path) -> None:
    r = invoke(runner, "export", alive_branch_ckpt, "--target", "onnx", "--target", "tflite", "-o", tmp_path, "--json")
    assert r.exit_code == 3
    doc = _strict(r.stdout)
    assert doc["status"] == "failed" and len(doc["reports"]) == 2
    for target in ("onnx", "tflite"):
        folder = tmp_path / "alive" / target
        report = _strict((folder / "report.json").read_text())
        assert report["status"] == "failed" and report["artifacts"] == []
        assert report["failures"][0].startswith("fold: top-1 agreement")
        assert sorted(p.name for p in folder.iterdir()) == ["report.json"]
    assert "softmax-branch size per block" in r.stderr


def test_forced_fold_stays_on_record_after_export(runner, alive_branch_ckpt: Path, tmp_path: Path) -> None:
    folded = tmp_path / "forced.pt"
    assert invoke(runner, "fold", alive_branch_ckpt, "-o", folded, "--force").exit_code == 0
    r = invoke(runner, "export", folded, "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.stderr
    report = _strict(r.stdout)["reports"][0]
    first = report["error_budget"][0]
    assert first["stage"] == "fold" and "earlier" in first["reference"] and not first["passed"]
    assert report["fold"]["forced"] and report["fold"]["earlier"]["forced"]


def test_orphaned_staging_from_a_killed_run_is_removed(runner, tmp_path: Path) -> None:
    orphan = tmp_path / "castling_nano_digits" / ".partial-999999-onnx-abcd"
    orphan.mkdir(parents=True)
    (orphan / "model.onnx").write_bytes(b"half")
    assert invoke(runner, "export", "-o", tmp_path).exit_code == 0
    assert not orphan.exists()


def test_hidden_folders_and_stray_root_images(tmp_path: Path) -> None:
    root = tmp_path / "val"
    for label in ("1", "2"):
        shutil.copytree(DIGITS_VAL / label, root / label)
    (root / ".ipynb_checkpoints").mkdir()
    shutil.copy(next((DIGITS_VAL / "3").iterdir()), root / ".ipynb_checkpoints" / "x.png")
    shutil.copy(next((DIGITS_VAL / "4").iterdir()), root / "stray.png")
    s = load_image_set(root, NANO_PP, LABELS)
    assert s.labels is not None and set(s.labels.tolist()) == {1, 2}
    assert len(s) == len(os.listdir(root / "1")) + len(os.listdir(root / "2"))


def test_npz_labels_are_validated(tmp_path: Path) -> None:
    imgs = np.zeros((4, 8, 8), np.uint8)
    for labels, needle in [(np.array([0, -1, 2, 3]), "outside the model's classes"),
                           (np.array([0.5, 1, 2, 3]), "integer class indices"),
                           (np.zeros((4, 2), np.int64), "integer class indices")]:
        p = tmp_path / "s.npz"
        np.savez(p, images=imgs, labels=labels)
        with pytest.raises(DataError, match=needle):
            load_image_set(p, NANO_PP, LABELS, num_classes=10)


def test_unlabeled_checkpoint_refuses_partial_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "val"
    for name in ("cat", "dog"):
        shutil.copytree(DIGITS_VAL / "1", root / name)
    with pytest.raises(DataError, match="2 class folders but the model has 10"):
        load_image_set(root, NANO_PP, None, num_classes=10)
    s = load_image_set(DIGITS_VAL, NANO_PP, None, num_classes=10)  # digit folder names are class indices
    assert sorted(set(s.labels.tolist())) == list(range(10))


def test_fold_refuses_to_overwrite_its_input(runner, dead_branch_ckpt: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ck.pt"
    shutil.copy(dead_branch_ckpt, copy)
    before = copy.read_bytes()
    r = invoke(runner, "fold", copy, "-o", copy)
    assert r.exit_code == 2 and "input checkpoint" in r.stderr and copy.read_bytes() == before


def test_int8_without_calib_fails_before_any_work(runner, dead_branch_ckpt: Path, tmp_path: Path) -> None:
    r = invoke(runner, "export", dead_branch_ckpt, "--int8", "-o", tmp_path)
    assert r.exit_code == 2 and "--calib" in r.stderr
    assert not (tmp_path / "dead").exists()


@pytest.mark.parametrize("name,ok", [("model.onnx", True), ("model.mlpackage", True), ("sub/model.tflite", True),
                                     ("../model.onnx", False), ("a/../../etc/passwd", False), ("..", False),
                                     ("/etc/passwd", False), ("..\\model.onnx", False), ("", False)])
def test_report_artifact_paths_stay_inside_the_folder(name: str, ok: bool) -> None:
    """A report.json names its artifacts relative to its folder; readers (package, verify, build-engine) open them
    there, so a name that climbs out ('..', absolute, Windows separators) is refused when the report is read."""
    from castling_deploy.errors import UsageError
    from castling_deploy.report import ArtifactRecord

    entry = {"file": name, "precision": "fp32", "runtime": "onnxruntime", "verified_by": "export"}
    if ok:
        assert ArtifactRecord.from_dict(entry).file == name
    else:
        with pytest.raises(UsageError, match="artifact"):
            ArtifactRecord.from_dict(entry)
