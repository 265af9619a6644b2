"""Hostile packages and reports (issue #13, items 2, 9, 11): paths that leave the package, malformed manifests,
ambiguous members and decompression bombs are refused — exit 2 with one line, or exit 3 for members that differ
from the manifest — and nothing is extracted or run."""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from castling_deploy.errors import UsageError
from castling_deploy.packaging import create_package, verify_package

from .conftest import invoke
from .test_package import _target, _val_set
from .test_profile import tiny_onnx
from .test_trust import _one_line_error, _rewrite


@pytest.fixture()
def pkg(tmp_path: Path):
    root = tmp_path / "exports" / "m"
    w, b = _target(root, "onnx", "fp32", 75.0, seed=0)
    x, y = _val_set(w, b)
    return create_package(root, tmp_path / "pkg.zip"), x, y


def _edit_manifest(src: Path, dst: Path, edit) -> Path:
    def f(name: str, data: bytes) -> bytes:
        if name != "manifest.json":
            return data
        m = json.loads(data)
        out = edit(m)
        return out if isinstance(out, bytes) else json.dumps(m).encode()

    _rewrite(src, dst, f)
    return dst


def _no_runner(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    import castling_deploy.runtime as rt

    loaded: list[Path] = []
    real = rt.load_runner
    monkeypatch.setattr(rt, "load_runner", lambda p, *a, **k: (loaded.append(Path(p)), real(p, *a, **k))[1])
    return loaded


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_artifact_path_outside_the_package_is_refused(pkg, tmp_path: Path, runner, monkeypatch, where: str) -> None:
    pkg, x, y = pkg
    good = tmp_path / "elsewhere" / "good.onnx"  # a good model outside the package: must never be run
    good.parent.mkdir()
    tiny_onnx(good, seed=0)
    bad_path = str(good) if where == "absolute" else "../elsewhere/good.onnx"

    def edit(m: dict) -> None:
        m["targets"][0]["artifacts"][0]["file"] = bad_path

    bad = _edit_manifest(pkg, tmp_path / "bad.zip", edit)
    loaded = _no_runner(monkeypatch)
    with pytest.raises(UsageError, match="leaves the package"):
        verify_package(bad, val_images=x, val_labels=y, extract_to=tmp_path / "out")
    assert loaded == [] and not (tmp_path / "out").exists()
    _one_line_error(invoke(runner, "verify", bad), 2, "leaves the package", "absolute path" if where == "absolute"
                    else "'..' in path")
    _one_line_error(invoke(runner, "inspect", bad), 2, "leaves the package")


def test_files_table_and_unknown_artifacts_are_confined(pkg, tmp_path: Path, runner) -> None:
    pkg, _, _ = pkg

    def files_escape(m: dict) -> None:
        m["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}

    def not_in_package(m: dict) -> None:
        m["targets"][0]["artifacts"][0]["file"] = "onnx/other.onnx"

    _one_line_error(invoke(runner, "verify", _edit_manifest(pkg, tmp_path / "a.zip", files_escape)), 2,
                    "files entry '../../etc/passwd' leaves the package")
    _one_line_error(invoke(runner, "verify", _edit_manifest(pkg, tmp_path / "b.zip", not_in_package)), 2,
                    "artifact 'onnx/other.onnx' is not one of the package's files")


@pytest.mark.parametrize("bad_file", ["../../etc/passwd", "/etc/passwd", "link.onnx"])
def test_report_listing_a_file_outside_its_folder_is_not_packaged(tmp_path: Path, runner, bad_file: str) -> None:
    root = tmp_path / "exports" / "m"
    _target(root, "onnx", "fp32", 75.0, seed=0)
    report_path = root / "onnx" / "report.json"
    report = json.loads(report_path.read_text())
    if bad_file == "link.onnx":
        (root / "onnx" / "link.onnx").symlink_to("/etc/passwd")
    report["artifacts"].append({"file": bad_file, "precision": "fp32", "verified_by": None})
    report_path.write_text(json.dumps(report))
    out = tmp_path / "p.zip"
    _one_line_error(invoke(runner, "package", root, "-o", out), 2)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["exports"]


def test_unlisted_and_resized_members_are_refused_before_extraction(pkg, tmp_path: Path, runner) -> None:
    pkg, _, _ = pkg
    extra = tmp_path / "extra.zip"
    _rewrite(pkg, extra, lambda n, d: d)
    with zipfile.ZipFile(extra, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("onnx/huge.bin", b"\0" * (16 * 2**20))  # 16 MiB from ~16 KiB: would be written in full before
    with pytest.raises(Exception) as info:
        verify_package(extra, extract_to=tmp_path / "out")
    assert info.value.exit_code == 3 and "extra files: onnx/huge.bin (nothing was extracted)" in str(info.value)
    assert info.value.result["integrity"]["extra"] == ["onnx/huge.bin"] and not (tmp_path / "out").exists()

    resized = tmp_path / "resized.zip"
    _rewrite(pkg, resized, lambda n, d: d + b"\0" if n == "onnx/model.onnx" else d)
    r = invoke(runner, "verify", resized)
    _one_line_error(r, 3, "mismatched files: onnx/model.onnx (nothing was extracted)")


def test_decompression_bomb_listed_in_the_manifest_is_refused(pkg, tmp_path: Path, runner) -> None:
    pkg, _, _ = pkg
    blob = b"\0" * (80 * 2**20)
    bomb = tmp_path / "bomb.zip"

    def edit(m: dict) -> None:
        m["files"]["onnx/zeros.bin"] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}

    _edit_manifest(pkg, bomb, edit)
    with zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("onnx/zeros.bin", blob)
    assert bomb.stat().st_size < 2**20
    _one_line_error(invoke(runner, "verify", bomb), 2, "decompression bomb", "nothing was extracted")


@pytest.mark.parametrize("case,needle", [
    ("deep", "nested too deeply"),
    ("deep-but-parsable", "nested deeper than 32 levels"),
    ("files-list", "files must be dict, got list"),
    ("targets-string", "targets must be list, got str"),
    ("artifacts-dict", "targets[0].artifacts must be null or list, got dict"),
    ("sha-not-hex", "sha256 must be 64 lowercase hex digits"),
    ("not-json", "is not valid JSON"),
])
def test_malformed_manifests_exit_2(pkg, tmp_path: Path, runner, case: str, needle: str) -> None:
    pkg, _, _ = pkg

    def edit(m: dict) -> bytes | None:
        if case == "deep":
            return b'{"schema": "castling-deploy/manifest/1", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        if case == "deep-but-parsable":
            m["targets"][0]["options"] = json.loads("[" * 200 + "]" * 200)
        if case == "files-list":
            m["files"] = list(m["files"])
        if case == "targets-string":
            m["targets"] = "onnx"
        if case == "artifacts-dict":
            m["targets"][0]["artifacts"] = {"file": "onnx/model.onnx"}
        if case == "sha-not-hex":
            m["files"]["onnx/model.onnx"]["sha256"] = "zz"
        if case == "not-json":
            return b"{not json"
        return None

    bad = _edit_manifest(pkg, tmp_path / "bad.zip", edit)
    for cmd in ("verify", "inspect"):
        _one_line_error(invoke(runner, cmd, bad), 2, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip", "exports", "pkg.zip"]


@pytest.mark.parametrize("order", ["file-first", "folder-first"])
def test_member_that_is_both_a_file_and_a_folder(tmp_path: Path, runner, order: str) -> None:
    bad = tmp_path / "clash.zip"
    members = [("a", b"file"), ("a/b", b"inside")]
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("manifest.json", json.dumps({
            "schema": "castling-deploy/manifest/1", "targets": [],
            "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)} for n, d in members}}))
        for n, d in members if order == "file-first" else members[::-1]:
            zf.writestr(n, d)
    _one_line_error(invoke(runner, "verify", bad), 2, "'a' is both a file and a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clash.zip"]


def test_package_out_must_be_a_file(pkg, tmp_path: Path, runner) -> None:
    root = tmp_path / "exports" / "m"
    folder = tmp_path / "existing"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    _one_line_error(invoke(runner, "package", root, "-o", folder), 2, "is a folder")
    folder_zip = tmp_path / "dir.zip"
    folder_zip.mkdir()
    _one_line_error(invoke(runner, "package", root, "-o", folder_zip), 2, "is a folder")
    assert [p.name for p in folder.iterdir()] == ["keep.txt"] and not any(folder_zip.iterdir())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(invoke(runner, "package", root, "-o", blocker / "p.zip"), 2, "not a folder")
