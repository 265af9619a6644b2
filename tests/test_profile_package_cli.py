"""profile / package / inspect / verify through the CLI on real demo exports (ONNX + LiteRT)."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from .conftest import DIGITS_VAL, invoke


@pytest.fixture(scope="module")
def demo_exports(tmp_path_factory: pytest.TempPathFactory, demo_onnx_trt, demo_tflite) -> Path:
    """The session's demo ONNX (--int8) and LiteRT (--fp16 --int8) exports, copied into one model folder (profile
    writes latency into a report.json, so the shared originals stay untouched)."""
    import shutil

    root = tmp_path_factory.mktemp("exports") / "castling_nano_digits"
    shutil.copytree(demo_onnx_trt.folder("onnx"), root / "onnx")
    shutil.copytree(demo_tflite.folder("tflite"), root / "tflite")
    return root


@pytest.mark.parametrize("artifact", ["onnx/model.onnx", "onnx/model.int8.onnx", "tflite/model.tflite",
                                      "tflite/model.int8.tflite"])
def test_profile_prints_percentiles_json_and_chart(runner, demo_exports: Path, tmp_path: Path, artifact: str) -> None:
    path = demo_exports / artifact
    chart = tmp_path / "lat.png"
    r = invoke(runner, "profile", path, "--runs", 30, "--warmup", 3, "--threads", 1, "--chart", chart, "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    lat = d["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert abs(lat["throughput_ips"] - 1000.0 / lat["mean"]) / lat["throughput_ips"] < 1e-3
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if artifact.endswith(".onnx"):
        assert d["per_op"]["by_op_type"]
    r = invoke(runner, "profile", path, "--runs", 10, "--warmup", 1, "--chart", chart)
    assert r.exit_code == 0 and "p99" in r.stdout


def test_package_inspect_verify_round_trip_and_tamper(runner, demo_exports: Path, tmp_path: Path) -> None:
    pkg = tmp_path / "demo.zip"
    r = invoke(runner, "package", demo_exports, "-o", pkg)
    assert r.exit_code == 0, r.stderr
    r = invoke(runner, "inspect", pkg, "--json")
    manifest = json.loads(r.stdout)
    files = {f["path"] for f in manifest["files"]} if isinstance(manifest["files"], list) else set(manifest["files"])
    assert any(p.endswith("model.int8.onnx") for p in files) and any(p.endswith("model.int8.tflite") for p in files)
    r = invoke(runner, "verify", pkg, "--val", DIGITS_VAL, "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    measured = [a for a in res["accuracy"] if "measured_top1" in a]
    assert len(measured) >= 4 and all(a["measured_top1"] >= 95.0 for a in measured)
    assert res["signature"]["status"] == "unsigned" and res["goals"]["recorded_accuracy_trusted"] is False
    # tamper with one artifact byte
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(pkg) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("model.onnx"):
                data = data[:-1] + bytes([data[-1] ^ 1])
            dst.writestr(info, data)
    r = invoke(runner, "verify", tampered)
    assert r.exit_code == 3 and "model.onnx" in r.stderr


def _chance_onnx(path: Path, shape: list, classes: int = 10, seed: int = 3) -> None:
    """Same input/output as the demo model, random linear weights: top-1 near chance (~10%)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c, h, w = (int(d) for d in shape[1:])
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])], "chance",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", c, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(rng.standard_normal((c * h * w, classes)).astype(np.float32), "w"),
         numpy_helper.from_array(np.zeros(classes, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


def test_issue_13_forged_demo_package_fails_verify(runner, demo_exports: Path, tmp_path: Path) -> None:
    """Issue #13 item 1, as reported: model.onnx replaced by a ~chance model, its sha256 and size updated in the
    manifest and the manifest's tolerance set to 100 -> `verify PKG --val calib/digits/val` used to exit 0."""
    import hashlib

    pkg = tmp_path / "demo.zip"
    assert invoke(runner, "package", demo_exports, "-o", pkg).exit_code == 0
    bad = tmp_path / "chance.onnx"
    with zipfile.ZipFile(pkg) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    _chance_onnx(bad, manifest["input"]["shape"])
    data = bad.read_bytes()
    manifest["files"]["onnx/model.onnx"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    for t in manifest["targets"]:
        t["goals"] = {"tolerance_points": 100}
        for a in t["artifacts"]:
            if a.get("recorded"):
                a["recorded"]["tolerance_points"] = 100.0
    forged = tmp_path / "forged.zip"
    with zipfile.ZipFile(pkg) as src, zipfile.ZipFile(forged, "w") as dst:
        for info in src.infolist():
            body = {"onnx/model.onnx": data, "manifest.json": json.dumps(manifest).encode()}.get(info.filename)
            dst.writestr(info, body if body is not None else src.read(info))
    r = invoke(runner, "verify", forged, "--val", DIGITS_VAL, "--json")
    assert r.exit_code == 3, r.stderr
    res = json.loads(r.stdout)
    row = next(a for a in res["accuracy"] if a["file"] == "onnx/model.onnx")
    assert row["status"] == "failed" and row["measured_top1"] < 30 and res["goals"]["tolerance_points"] == 0.5
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "onnx/model.onnx: top-1" in errors[0] and "the best fp32 artifact" in errors[0]


def test_profile_bounds_batch_and_needs_a_shape_for_dynamic_models(runner, tmp_path: Path, monkeypatch) -> None:
    from .test_package_hostile import _no_runner
    from .test_profile import tiny_onnx
    from .test_trust import _one_line_error

    dyn = tmp_path / "dyn.onnx"
    tiny_onnx(dyn, hw="size")  # H, W dynamic and no report.json beside it
    loaded = _no_runner(monkeypatch)
    _one_line_error(invoke(runner, "profile", dyn, "--batch", 100000), 2, "at most 1024")
    _one_line_error(invoke(runner, "profile", dyn, "--shape", "1,3,8"), 2, "N,C,H,W")
    _one_line_error(invoke(runner, "profile", dyn, "--shape", "2,3,8,8", "--batch", 3), 2, "contradicts")
    _one_line_error(invoke(runner, "profile", dyn, "--shape", "1,3,100000,100000"), 2, "over the limit")
    assert loaded == []  # nothing was loaded, let alone measured
    _one_line_error(invoke(runner, "profile", dyn, "--runs", 2, "--warmup", 0), 2, "pass --shape N,C,H,W")
    r = invoke(runner, "profile", dyn, "--shape", "2,3,8,8", "--runs", 3, "--warmup", 0, "--no-per-op", "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["input_shape"] == [2, 3, 8, 8] and d["batch"] == 2


def test_profile_checks_the_chart_destination_before_measuring(runner, tmp_path: Path, monkeypatch) -> None:
    import os

    from .test_package_hostile import _no_runner
    from .test_profile import tiny_onnx
    from .test_trust import _one_line_error

    art_dir = tmp_path / "art"
    art_dir.mkdir()
    art = art_dir / "tiny.onnx"
    tiny_onnx(art)
    loaded = _no_runner(monkeypatch)
    _one_line_error(invoke(runner, "profile", art, "--chart", tmp_path), 2, "is a folder")
    _one_line_error(invoke(runner, "profile", art, "--chart", tmp_path / "nope" / "c.png"), 2,
                    "not an existing folder")
    assert loaded == []
    # the artifact's folder is read-only (simulated: tests may run as root): no default chart, still measured
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **k: False if Path(p) == art_dir else real_access(p, m, **k))
    _one_line_error(invoke(runner, "profile", art, "--chart", art_dir / "c.png"), 2, "not writable")
    r = invoke(runner, "profile", art, "--runs", 3, "--warmup", 0, "--no-per-op", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["chart"] is None and "no latency chart" in r.stderr
    assert sorted(p.name for p in art_dir.iterdir()) == ["tiny.onnx"]


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt"])
def test_unsafe_archive_refused_with_exit_2(runner, tmp_path: Path, member: str) -> None:
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("manifest.json", "{}")
        z.writestr(member, "pwned")
    r = invoke(runner, "verify", bad)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path.parent / "evil.txt").exists() and not Path("/abs/evil.txt").exists()


def test_sweep_shows_linear_vs_quadratic_growth(runner, tmp_path: Path) -> None:
    from .conftest import DEMO_CKPT

    chart = tmp_path / "sweep.png"
    r = invoke(runner, "profile", DEMO_CKPT, "--sweep", "32,96", "--baseline", "softmax", "--runs", 10, "--warmup", 2,
               "--chart", chart, "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    rows = {(name, row["img_size"]): row for name, series in d["series"].items() for row in series}
    assert rows[("castling", 96)]["tokens"] == 145 == rows[("softmax", 96)]["tokens"]
    castling_growth = rows[("castling", 96)]["macs"] / rows[("castling", 32)]["macs"]
    softmax_growth = rows[("softmax", 96)]["macs"] / rows[("softmax", 32)]["macs"]
    assert castling_growth < softmax_growth
    assert d["summary"]["castling"]["macs_ratio"] < d["summary"]["softmax"]["macs_ratio"]
    assert chart.read_bytes()[:4] == b"\x89PNG"


def test_sweep_size_not_a_multiple_of_the_patch_exits_2(runner, tmp_path: Path) -> None:
    from .conftest import DEMO_CKPT

    chart = tmp_path / "sweep.png"
    r = invoke(runner, "profile", DEMO_CKPT, "--sweep", "32,36,64", "--runs", 2, "--warmup", 0, "--chart", chart)
    assert r.exit_code == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "36" in lines[0] and "patch size 8" in lines[0]  # castling_nano: 32 px in 8-px patches
    assert "32" not in lines[0].split("[")[-1].split("]")[0]  # only the bad size is named
    assert not chart.exists() and r.stdout == ""
