"""The Python API end to end, the typed report and the shipped JSON Schemas checked against real files."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import jsonschema
import pytest

import castling_deploy as cd
from castling_deploy.errors import UsageError
from castling_deploy.report import SCHEMA_VERSION, load_report
from castling_deploy.schemas import load_schema
from castling_deploy.targets.registry import TARGETS, check_target_options

from .conftest import DEMO_CKPT, DIGITS_TRAIN, DIGITS_VAL


@pytest.fixture(scope="module")
def api_export(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("api")
    return out, cd.export(DEMO_CKPT, targets=["onnx"], int8=True, calib=DIGITS_TRAIN, val=DIGITS_VAL, out=out,
                          calib_size=64, limit=120, seed=0)


def test_api_export_returns_the_reports_it_wrote(api_export) -> None:
    out, result = api_export
    assert result.passed and result.failures == [] and result.error() is None
    t = result["onnx"]
    assert t.folder == out / "castling_nano_digits" / "onnx"
    on_disk = json.loads((t.folder / "report.json").read_text())
    assert on_disk == t.report.to_dict()  # what the API returns is exactly what was written
    assert on_disk["schema_version"] == SCHEMA_VERSION
    assert on_disk["data"]["val"]["count"] == 120 and on_disk["options"]["calib_size"] == 64
    with pytest.raises(KeyError):
        result["tflite"]


def test_every_artifact_names_the_stage_that_verified_it(api_export) -> None:
    _, result = api_export
    rep = result["onnx"].report
    ids = [s.id for s in rep.error_budget]
    assert ids == ["fold", "export", "int8"] and len(set(ids)) == len(ids)
    links = {a.file: a.verified_by for a in rep.artifacts}
    assert links == {"model.onnx": "export", "model.int8.onnx": "int8"}
    int8 = rep.stage("int8")
    assert "model.int8.onnx" in int8.candidate and int8.metrics["n"] == 120
    # fp32 ONNX is exact to 1e-4, int8 is not: the links point at rows that measured different files
    assert rep.stage("export").metrics["max_abs_logit"] < 1e-4 < int8.metrics["max_abs_logit"]


def test_report_and_manifest_validate_against_the_shipped_schemas(api_export, tmp_path: Path) -> None:
    out, result = api_export
    report = json.loads((result["onnx"].folder / "report.json").read_text())
    jsonschema.validate(report, load_schema("report"))
    pkg = cd.package(out / "castling_nano_digits", tmp_path / "m.zip")
    manifest = json.loads(zipfile.ZipFile(pkg).read("manifest.json"))
    jsonschema.validate(manifest, load_schema("manifest"))
    # the schemas are not vacuous: a report without artifacts' links, or with an escaping path, is rejected
    bad = json.loads(json.dumps(report))
    del bad["artifacts"][0]["verified_by"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, load_schema("report"))
    bad = json.loads(json.dumps(report))
    bad["artifacts"][0]["file"] = "../../etc/passwd"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, load_schema("report"))


def test_api_verify_and_profile(api_export, tmp_path: Path) -> None:
    out, result = api_export
    pkg = cd.package(out / "castling_nano_digits", tmp_path / "p.zip")
    res = cd.verify(pkg, val=DIGITS_VAL, limit=60)
    assert res["passed"] and all(r["status"] == "passed" for r in res["accuracy"])
    prof = cd.profile(result["onnx"].folder / "model.onnx", runs=5, warmup=1, threads=1, per_op=False)
    assert 0 < prof["latency_ms"]["p50"] < 1000
    rep = load_report(result["onnx"].folder / "report.json")
    assert rep.latency["model.onnx"]["latency_ms"]["p50"] == prof["latency_ms"]["p50"]  # recorded via the report


def test_report_refuses_artifact_paths_outside_its_folder(api_export, tmp_path: Path) -> None:
    _, result = api_export
    data = result["onnx"].report.to_dict()
    for evil in ("../../etc/passwd", "/etc/passwd", ".."):
        data["artifacts"][0]["file"] = evil
        p = tmp_path / "report.json"
        p.write_text(json.dumps(data))
        with pytest.raises(UsageError, match="leaves its folder"):
            load_report(p)


def test_target_options_are_checked_generically() -> None:
    check_target_options(["tflite"], {"full_integer": True, "io_dtype": "int8"}, int8=True)  # valid
    with pytest.raises(UsageError, match="--full-integer applies only to --target tflite"):
        check_target_options(["onnx", "coreml"], {"full_integer": True}, int8=True)
    with pytest.raises(UsageError, match="--weights-only needs --int8"):
        check_target_options(["coreml"], {"weights_only": True}, int8=False)
    with pytest.raises(UsageError, match="--io-dtype applies only with --full-integer"):
        check_target_options(["tflite"], {"io_dtype": "int8"}, int8=True)
    check_target_options(["onnx"], {"weight_bits": 7}, int8=True)  # valid
    with pytest.raises(UsageError, match="--weight-bits applies only to --target onnx"):
        check_target_options(["tensorrt"], {"weight_bits": 8}, int8=True)
    with pytest.raises(UsageError, match="--weight-bits needs --int8"):
        check_target_options(["onnx"], {"weight_bits": 7}, int8=False)
    with pytest.raises(UsageError, match="--strict-int8 applies only with --full-integer"):
        check_target_options(["tflite"], {"strict_int8": True}, int8=True)
    check_target_options(["tflite"], {"full_integer": True, "strict_int8": True}, int8=True)  # valid
    every = {o.name for s in TARGETS.values() for o in s.options}
    assert every == {"full_integer", "io_dtype", "strict_int8", "weights_only", "quantizer", "weight_bits"}


def test_api_rejects_a_weight_bits_other_than_7_or_8() -> None:
    with pytest.raises(UsageError, match="--weight-bits 6"):
        cd.export(DEMO_CKPT, int8=True, weight_bits=6)


def test_api_rejects_unknown_options_and_targets() -> None:
    with pytest.raises(UsageError, match="unexpected keyword"):
        cd.export(DEMO_CKPT, no_such_option=1)
    with pytest.raises(UsageError, match="unknown --target 'nope'"):
        cd.export(DEMO_CKPT, targets=["nope"])
