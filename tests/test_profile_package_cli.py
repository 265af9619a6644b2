"""profile / package / inspect / verify through the CLI on real demo exports (ONNX + LiteRT)."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from .conftest import DIGITS_VAL, invoke


@pytest.fixture(scope="module")
def demo_exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from click.testing import CliRunner

    from castling_deploy.cli import cli

    out = tmp_path_factory.mktemp("exports")
    r = CliRunner().invoke(cli, ["export", "--target", "onnx", "--target", "tflite", "--int8", "-o", str(out)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    return out / "castling_nano_digits"


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
