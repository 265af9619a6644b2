"""Reference inputs: every export carries seeded inputs with the folded model's and each file's own logits, and
`verify PACKAGE` without --val re-runs the files on them (a replaced weight fails, exit 3; a hostile reference
file is refused, exit 2)."""
from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import castling_deploy as cd
from castling_deploy.errors import ToleranceError, UsageError
from castling_deploy.reference import MIN_COSINE, REFERENCE_COUNT, load_reference
from castling_deploy.report import load_report
from castling_deploy.runtime.ort import OrtRunner

from .conftest import DEMO_CKPT, DIGITS_VAL, invoke


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    res = cd.export(DEMO_CKPT, targets=["onnx"], val=DIGITS_VAL, out=tmp_path_factory.mktemp("ref"), limit=40)
    assert res.passed
    return res["onnx"].folder


def test_export_writes_reference_inputs_with_each_files_logits(onnx_export: Path) -> None:
    ref = load_reference(onnx_export / "reference.npz")
    assert ref.inputs.shape == (REFERENCE_COUNT, 3, 32, 32) and abs(float(ref.inputs.std()) - 1) < 0.05
    assert sorted(ref.runs) == ["model.onnx"] and ref.folded.shape == (REFERENCE_COUNT, 10)
    again = OrtRunner(onnx_export / "model.onnx").run(ref.inputs)
    assert np.abs(again - ref.runs["model.onnx"]).max() < 1e-5  # the file's own logits, as recorded
    assert np.abs(again - ref.folded).max() < 1e-4  # and the folded model's, within the fp32 atol
    info = load_report(onnx_export / "report.json").target_info["reference"]
    assert info["files"] == ["model.onnx"] and info["inputs"] == REFERENCE_COUNT


def test_verify_without_val_checks_the_reference_inputs(onnx_export: Path, tmp_path: Path) -> None:
    res = cd.verify(cd.package(onnx_export, tmp_path / "ok.zip"))
    (row,) = res["reference"]
    assert row["file"] == "onnx/model.onnx" and row["status"] == "passed"
    assert row["min_cosine_vs_export"] > 0.99999 and row["max_abs_vs_folded"] < 1e-4


def _tampered(folder: Path, dst: Path) -> Path:
    """The head weight's rows permuted and the report's hash rewritten to match (what an attacker or a bad copy
    would ship); reference.npz untouched."""
    shutil.copytree(folder, dst)
    m = onnx.load(dst / "model.onnx")
    init = next(i for i in m.graph.initializer if "head" in i.name and len(i.dims) == 2)
    w = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(np.random.default_rng(0).permutation(w), init.name))
    onnx.save(m, dst / "model.onnx")
    rep = json.loads((dst / "report.json").read_text())
    from castling_deploy.digest import file_sha256

    rep["artifacts"][0].update(sha256=file_sha256(dst / "model.onnx"), bytes=(dst / "model.onnx").stat().st_size)
    (dst / "report.json").write_text(json.dumps(rep))
    return dst


def test_a_replaced_weight_fails_without_a_dataset(runner, onnx_export: Path, tmp_path: Path) -> None:
    pkg = cd.package(_tampered(onnx_export, tmp_path / "bad"), tmp_path / "bad.zip")
    with pytest.raises(ToleranceError) as err:
        cd.verify(pkg)
    (row,) = err.value.result["reference"]  # type: ignore[attr-defined]
    assert row["status"] == "failed" and row["min_cosine_vs_export"] < MIN_COSINE
    r = invoke(runner, "verify", pkg)
    assert r.exit_code == 3 and "bad/model.onnx: per-sample cosine" in r.stderr and "(reference inputs)" in r.stderr


def _with_reference(pkg: Path, out: Path, data: bytes) -> Path:
    """``pkg`` with onnx/reference.npz replaced by ``data`` and the manifest's hash of it updated (unsigned)."""
    import hashlib

    with zipfile.ZipFile(pkg) as src, zipfile.ZipFile(out, "w") as dst:
        manifest = json.loads(src.read("manifest.json"))
        manifest["files"]["onnx/reference.npz"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        for info in src.infolist():
            body = data if info.filename == "onnx/reference.npz" else src.read(info.filename)
            if info.filename == "manifest.json":
                body = json.dumps(manifest).encode()
            dst.writestr(info.filename, body)
    return out


@pytest.mark.parametrize("case", ["pickled", "shapes", "extra_member"])
def test_hostile_reference_files_are_refused(onnx_export: Path, tmp_path: Path, case: str) -> None:
    pkg = cd.package(onnx_export, tmp_path / "ok.zip")
    ref = load_reference(onnx_export / "reference.npz")
    buf = io.BytesIO()
    arrays = {"inputs": ref.inputs, "folded": ref.folded, "files": np.array(["model.onnx"]),
              "logits": ref.runs["model.onnx"][None]}
    if case == "pickled":
        arrays["files"] = np.array([{"a": 1}], dtype=object)
    elif case == "shapes":
        arrays["folded"] = ref.folded[:3]
    else:
        arrays["payload"] = np.zeros(3)
    np.savez(buf, **arrays)
    bad = _with_reference(pkg, tmp_path / "bad.zip", buf.getvalue())
    with pytest.raises(UsageError, match="reference"):
        cd.verify(bad)
