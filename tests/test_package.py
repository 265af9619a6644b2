"""Packaging: manifest round trip, deterministic archives, integrity, accuracy re-run, unsafe archives."""
from __future__ import annotations

import hashlib
import io
import stat
import json
import tarfile
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest

from castling_deploy.errors import ToleranceError, UsageError
from castling_deploy.packaging import (
    create_package,
    format_manifest,
    format_verify_result,
    inspect_package,
    verify_package,
)

try:  # tests/ is a package here; without its __init__.py pytest puts tests/ on sys.path instead
    from .test_profile import tiny_onnx
except ImportError:
    from test_profile import tiny_onnx

N_VAL, N_WRONG = 64, 16  # labels agree with the model on 48 of 64 images -> 75.00% top-1


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _val_set(w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(1).standard_normal((N_VAL, 3, 8, 8)).astype(np.float32)
    pred = (x.reshape(N_VAL, -1) @ w + b).argmax(1)
    labels = pred.copy()
    labels[-N_WRONG:] = (labels[-N_WRONG:] + 1) % 10
    return x, labels


def _target(root: Path, target: str, precision: str, acc: float, *, seed: int, status: str = "passed") -> tuple:
    tdir = root / target
    tdir.mkdir(parents=True)
    w, b = tiny_onnx(tdir / "model.onnx", seed=seed)
    report = {
        "schema": "castling-deploy/report/1",
        "schema_version": 2,
        "status": status,
        "failures": [] if status == "passed" else ["int8: top-1 drop too large"],
        "created": "2026-01-01T00:00:00Z",
        "input": {"name": "images", "shape": ["batch", 3, 8, 8], "dtype": "float32", "layout": "NCHW"},
        "target_info": {},
        "tool": {"name": "castling-deploy", "version": "0.1.0"},
        "runtime_versions": {"onnxruntime": "1.32.0"},
        "checkpoint": {"path": "/ckpt/demo.safetensors", "sha256": "ab" * 32, "arch": "castling_nano",
                       "config": {"img_size": 8}, "form": "deploy"},
        "model_name": "castling_nano",
        "target": target,
        "options": {"opset": 18, "int8": precision == "int8"},
        "preprocess": {"resize": 9, "crop": 8, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic"},
        "labels": [f"class{i}" for i in range(10)],
        "fold": {"agreement": 1.0},
        "artifacts": [{"file": "model.onnx", "sha256": _sha(tdir / "model.onnx"),
                       "bytes": (tdir / "model.onnx").stat().st_size, "precision": precision,
                       "runtime": "onnxruntime", "verified_by": "export" if precision == "fp32" else precision}],
        "data": {"val": {"digest": "cd" * 32, "count": N_VAL, "source": "calib/val"}, "calib": None},
        "quantization": {"recipe": "qdq-minmax"} if precision == "int8" else None,
        "error_budget": [
            {"stage": "fold", "reference": "train", "candidate": "deploy", "executor": "torch",
             "metrics": {"cosine": 1.0, "max_abs_logit": 0.0, "top1_agreement": 1.0}, "goals": {}, "passed": True},
            {"stage": "export" if precision == "fp32" else precision, "reference": "torch", "executor": "ort",
             "candidate": "model.onnx", "goals": {"max_top1_drop_points": 0.5}, "passed": True,
             "metrics": {"n": N_VAL, "cosine": 0.9999, "max_abs_logit": 1e-5, "top1_agreement": 1.0,
                         "ref_top1_acc": 75.0, "top1_acc": acc, "top1_drop_points": 75.0 - acc}},
        ],
        "goals": {"tolerance_points": 0.5},
        "latency": {"latency_ms": {"p50": 0.1, "p99": 0.2}},
        "something_new": {"kept": True},
    }
    if precision == "int8":  # a helper file listed as an artifact, as the TensorRT target does
        (tdir / "build_engine.sh").write_text("#!/bin/sh\ntrtexec --onnx=model.onnx --int8\n")
        report["artifacts"].append({"file": "build_engine.sh", "precision": "int8", "runtime": "shell",
                                    "verified_by": None})
    (tdir / "report.json").write_text(json.dumps(report))
    return w, b


@pytest.fixture()
def export_dir(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    root = tmp_path / "exports" / "castling_nano"
    w, b = _target(root, "onnx", "fp32", 75.0, seed=0)
    _target(root, "onnx-int8", "int8", 75.0, seed=0)
    return root, *_val_set(w, b)


def _rewrite_zip(src: Path, dst: Path, edit) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_round_trip_manifest_and_integrity(export_dir, tmp_path: Path, suffix: str) -> None:
    root, _, _ = export_dir
    pkg = create_package(root, tmp_path / f"pkg{suffix}")
    again = create_package(root, tmp_path / f"again{suffix}")
    assert _sha(pkg) == _sha(again)  # deterministic archive
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind

    m = inspect_package(pkg)
    assert m["schema"] == "castling-deploy/manifest/1" and m["model_name"] == "castling_nano"
    assert set(m["files"]) == {"README.md", "onnx/model.onnx", "onnx/report.json", "onnx-int8/model.onnx",
                               "onnx-int8/report.json", "onnx-int8/build_engine.sh"}
    assert m["files"]["onnx/model.onnx"]["sha256"] == _sha(root / "onnx" / "model.onnx")
    assert m["input"]["shape"] == ["batch", 3, 8, 8] and m["checkpoint"]["sha256"] == "ab" * 32
    fp32 = m["targets"][0]["artifacts"][0]
    assert fp32["recorded"]["top1_acc"] == 75.0 and fp32["recorded"]["tolerance_points"] == 0.5
    assert fp32["recorded"]["stage"] == "export" and m["targets"][1]["quantization"] == {"recipe": "qdq-minmax"}
    text = format_manifest(m)
    assert "onnx-int8/model.onnx" in text and "top-1 75.00%" in text

    out = tmp_path / "unpacked"
    res = verify_package(pkg, extract_to=out)
    assert res["passed"] and res["integrity"]["checked"] == 6 and res["accuracy"] is None
    readme = (out / "README.md").read_text()
    assert "NCHW (batch, 3, 8, 8)" in readme and "center-crop 8" in readme and "`onnx/model.onnx`" in readme and "75.00%" in readme


def test_single_target_folder_and_directory_artifact(tmp_path: Path) -> None:
    root = tmp_path / "m"
    _target(root, "coreml", "fp16", 74.9, seed=0)
    mlp = root / "coreml" / "model.mlpackage"
    (mlp / "Data" / "weights").mkdir(parents=True)
    (mlp / "Data" / "weights" / "weight.bin").write_bytes(b"\x01" * 100)
    (mlp / "Manifest.json").write_text("{}")
    report = json.loads((root / "coreml" / "report.json").read_text())
    report["artifacts"].append({"file": "model.mlpackage", "precision": "fp16"})
    (root / "coreml" / "report.json").write_text(json.dumps(report))
    pkg = create_package(root / "coreml", tmp_path / "p.zip")
    m = inspect_package(pkg)
    assert "coreml/model.mlpackage/Data/weights/weight.bin" in m["files"]
    art = m["targets"][0]["artifacts"][1]
    assert art["directory"] and art["bytes"] == 102 and len(art["tree_sha256"]) == 64
    assert verify_package(pkg)["integrity"]["checked"] == 5


def test_verify_reruns_accuracy(export_dir, tmp_path: Path) -> None:
    root, x, y = export_dir
    pkg = create_package(root, tmp_path / "pkg.zip")
    res = verify_package(pkg, val_images=x, val_labels=y)
    assert res["passed"] and res["signature"]["status"] == "unsigned"
    rows = [r for r in res["accuracy"] if r["status"] != "skipped"]
    assert [r["measured_top1"] for r in rows] == [75.0, 75.0]
    assert all(r["drop_vs_reference"] == 0.0 and r["status"] == "passed" for r in rows)
    assert all("drop_vs_recorded" not in r and r["recorded_trusted"] is False for r in rows)
    assert [r["file"] for r in res["accuracy"] if r["status"] == "skipped"] == ["onnx-int8/build_engine.sh"]
    text = format_verify_result(res)
    assert res["status"] == "passed" and "top-1 75.00% (recorded 75.00%, not trusted" in text
    assert "signature: unsigned" in text and "recorded accuracies were not trusted (package unsigned)" in text
    # 4 more wrong labels -> 68.75% for both: unsigned, nothing says 75% is the goal, so only the relative
    # check (every artifact within the tolerance of the best fp32 one) applies, and it holds.
    y_bad = y.copy()
    y_bad[:4] = (y_bad[:4] + 1) % 10
    res = verify_package(pkg, val_images=x, val_labels=y_bad)
    assert res["passed"] and [r["measured_top1"] for r in res["accuracy"] if "measured_top1" in r] == [68.75] * 2
    # the verifier's own absolute goal
    with pytest.raises(ToleranceError) as info:
        verify_package(pkg, val_images=x, val_labels=y_bad, min_top1=70)
    assert info.value.exit_code == 3 and info.value.result["status"] == "failed"
    assert "FAILED: onnx/model.onnx: top-1 68.75% is below --min-top1 70%" in format_verify_result(info.value.result)
    with pytest.raises(UsageError):
        verify_package(pkg, val_images=x)
    with pytest.raises(UsageError):
        verify_package(pkg, val_images=x, val_labels=y[:10])
    for bad in (-1, 101, float("nan")):
        with pytest.raises(UsageError, match="--tolerance"):
            verify_package(pkg, tolerance=bad)


def test_verify_holds_every_artifact_to_the_best_fp32_one(tmp_path: Path) -> None:
    """Unsigned: an artifact far below the best fp32 artifact fails, whatever the manifest records."""
    root = tmp_path / "m"
    w, b = _target(root, "onnx", "fp32", 75.0, seed=0)
    _target(root, "onnx-int8", "int8", 75.0, seed=5)  # other weights: a broken INT8 model, recorded as 75%
    x, y = _val_set(w, b)
    pkg = create_package(root, tmp_path / "pkg.zip")
    with pytest.raises(ToleranceError) as info:
        verify_package(pkg, val_images=x, val_labels=y, tolerance=1.0)
    res = info.value.result
    bad = next(r for r in res["accuracy"] if r["file"] == "onnx-int8/model.onnx")
    assert bad["status"] == "failed" and bad["reference"] == "onnx/model.onnx" and bad["drop_vs_reference"] > 50
    assert "below onnx/model.onnx (75.00%), the best fp32 artifact measured here (tolerance 1 points)" in \
        res["failures"][0]


def test_tampered_missing_and_extra_files(export_dir, tmp_path: Path) -> None:
    root, _, _ = export_dir
    pkg = create_package(root, tmp_path / "pkg.zip")

    def flip(name: str, data: bytes) -> bytes:
        return data[:-1] + bytes([data[-1] ^ 1]) if name == "onnx-int8/model.onnx" else data

    cases = {
        "mismatched": lambda n, d: flip(n, d),
        "missing": lambda n, d: None if n == "onnx/report.json" else d,
    }
    for key, edit in cases.items():
        bad = tmp_path / f"{key}.zip"
        _rewrite_zip(pkg, bad, edit)
        with pytest.raises(ToleranceError) as info:
            verify_package(bad)
        assert info.value.result["integrity"][key] == [
            "onnx-int8/model.onnx" if key == "mismatched" else "onnx/report.json"]
    extra = tmp_path / "extra.zip"
    _rewrite_zip(pkg, extra, lambda n, d: d)
    with zipfile.ZipFile(extra, "a") as zf:
        zf.writestr("onnx/sneaky.onnx", b"x")
    with pytest.raises(ToleranceError) as info:
        verify_package(extra)
    assert info.value.result["integrity"]["extra"] == ["onnx/sneaky.onnx"]


def _evil_zip(path: Path, name: str, mode: int | None = None) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("manifest.json", json.dumps({"schema": "castling-deploy/manifest/1", "files": {}}))
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.create_system, info.external_attr = 3, mode << 16
        zf.writestr(info, b"/etc/passwd" if mode else b"pwned")


def _evil_tar(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> None:
    with tarfile.open(path, "w:gz") as tf:
        good = json.dumps({"schema": "castling-deploy/manifest/1", "files": {}}).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(good)
        tf.addfile(info, io.BytesIO(good))
        member.size = len(data) if member.type == tarfile.REGTYPE else 0
        tf.addfile(member, io.BytesIO(data) if data else None)


def test_unsafe_archives_are_refused_before_writing(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    abs_target = Path(f"/tmp/castling-evil-{uuid.uuid4().hex}")
    sym = tarfile.TarInfo("onnx/link")
    sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("onnx/hard")
    hard.type, hard.linkname = tarfile.LNKTYPE, "manifest.json"
    dev = tarfile.TarInfo("onnx/dev")
    dev.type = tarfile.CHRTYPE
    cases = {
        "dotdot.zip": lambda p: _evil_zip(p, "../x"),
        "abs.zip": lambda p: _evil_zip(p, str(abs_target)),
        "backslash.zip": lambda p: _evil_zip(p, "..\\x"),
        "sym.zip": lambda p: _evil_zip(p, "onnx/link", stat.S_IFLNK | 0o777),
        "dotdot.tar.gz": lambda p: _evil_tar(p, tarfile.TarInfo("a/../../x"), b"pwned"),
        "abs.tar.gz": lambda p: _evil_tar(p, tarfile.TarInfo(str(abs_target)), b"pwned"),
        "sym.tar.gz": lambda p: _evil_tar(p, sym),
        "hard.tar.gz": lambda p: _evil_tar(p, hard),
        "dev.tar.gz": lambda p: _evil_tar(p, dev),
    }
    for name, build in cases.items():
        pkg = work / name
        build(pkg)
        dest = work / "out" / name
        with pytest.raises(UsageError, match="refusing"):
            verify_package(pkg, extract_to=dest)
        with pytest.raises(UsageError):
            inspect_package(pkg)
        assert not dest.exists(), name
    assert not abs_target.exists() and not (tmp_path / "x").exists() and not (work / "x").exists()
    assert sorted(p.name for p in work.iterdir()) == sorted(cases)  # nothing else written


def test_size_limits(export_dir, tmp_path: Path) -> None:
    root, _, _ = export_dir
    pkg = create_package(root, tmp_path / "pkg.zip")
    with pytest.raises(UsageError, match="limit"):
        verify_package(pkg, max_member_bytes=1000, extract_to=tmp_path / "o1")
    with pytest.raises(UsageError, match="limit"):
        verify_package(pkg, max_total_bytes=5000, extract_to=tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_refuses_failed_or_changed_exports(tmp_path: Path) -> None:
    root = tmp_path / "m"
    _target(root, "onnx", "fp32", 70.0, seed=0, status="failed")
    with pytest.raises(ToleranceError, match="failed"):
        create_package(root, tmp_path / "p.zip")
    assert not (tmp_path / "p.zip").exists()
    assert create_package(root, tmp_path / "p.zip", allow_failed=True).is_file()
    (root / "onnx" / "model.onnx").write_bytes(b"changed")
    with pytest.raises(ToleranceError, match="changed after"):
        create_package(root, tmp_path / "q.zip", allow_failed=True)
    with pytest.raises(UsageError):
        create_package(root, tmp_path / "p.rar")
    with pytest.raises(UsageError):
        create_package(tmp_path / "nowhere", tmp_path / "p.zip")


def test_corrupt_member_data_is_a_usage_error(export_dir, tmp_path: Path) -> None:
    root, _, _ = export_dir
    pkg = create_package(root, tmp_path / "pkg.zip")
    raw = bytearray(pkg.read_bytes())
    with zipfile.ZipFile(pkg) as zf:
        info = zf.getinfo("onnx/model.onnx")
        off = info.header_offset  # local header: 30 fixed bytes, then name and extra of their own lengths
        start = off + 30 + int.from_bytes(raw[off + 26 : off + 28], "little") + int.from_bytes(
            raw[off + 28 : off + 30], "little")
    raw[start + 10 : start + 20] = b"\x00" * 10  # corrupt compressed bytes; headers intact
    bad = tmp_path / "corrupt.zip"
    bad.write_bytes(bytes(raw))
    with pytest.raises(UsageError, match="corrupt"):
        verify_package(bad, extract_to=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_recorded_accuracy_follows_the_verifying_stage_id() -> None:
    """Each artifact names the budget stage that measured it; the manifest never guesses from file names."""
    from castling_deploy.packaging.manifest import _recorded_accuracy
    from castling_deploy.report import ArtifactRecord, Report
    from castling_deploy.budget import StageResult

    rep = Report(model_name="m", target="onnx", checkpoint={}, options={}, preprocess={}, labels=None, input={},
                 fold={}, data={}, goals={"tolerance_points": 0.5}, runtime_versions={}, tool={})
    sid_fold = rep.add_stage(StageResult("fold", "a", "b", "torch", {"top1_acc": 98.0}))
    sid_exp = rep.add_stage(StageResult("export", "a", "model.onnx", "ort", {"top1_acc": 97.0}))
    sid_int8 = rep.add_stage(StageResult("int8", "a", "model.int8.onnx", "ort", {"top1_acc": 96.5},
                                         {"max_top1_drop_points": 1.0}))
    sid_dup = rep.add_stage(StageResult("int8", "a", "again", "ort", {"top1_acc": 90.0}))
    assert (sid_fold, sid_exp, sid_int8, sid_dup) == ("fold", "export", "int8", "int8-2")  # ids stay unique
    assert _recorded_accuracy(rep, ArtifactRecord("model.onnx", "fp32", "ort", "export"))["top1_acc"] == 97.0
    rec = _recorded_accuracy(rep, ArtifactRecord("model.int8.onnx", "int8", "ort", "int8"))
    assert rec["top1_acc"] == 96.5 and rec["tolerance_points"] == 1.0
    assert _recorded_accuracy(rep, ArtifactRecord("model.int8.onnx", "int8", "ort", "int8-2"))["top1_acc"] == 90.0
    assert _recorded_accuracy(rep, ArtifactRecord("build_engine.sh", "script", "sh", None)) is None
