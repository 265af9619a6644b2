"""Shared fixtures: tiny checkpoints written in our format, the shipped demo data, a CLI runner, a private
calibration cache for the whole session, and the demo exports every CLI test re-checks (one run per kind)."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from castling_deploy.cli import cli
from castling_deploy.models import create_model
from castling_deploy.models.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parent.parent
DEMO_CKPT = REPO / "models" / "castling_nano_digits.pt"
DIGITS_VAL = REPO / "calib" / "digits" / "val"
DIGITS_TRAIN = REPO / "calib" / "digits" / "train"
NANO_PP = {"resize": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
           "channels": "RGB"}
LABELS = [str(i) for i in range(10)]

torch.set_num_threads(1)  # tiny models: one thread is fastest and immune to a busy machine


def make_nano_ckpt(path: Path, threshold: float, seed: int = 0, **overrides: object) -> Path:
    torch.manual_seed(seed)
    model = create_model("castling_nano", threshold=threshold, **overrides)
    save_checkpoint(path, model, "castling_nano", NANO_PP, LABELS)
    return path


@pytest.fixture(scope="session")
def dead_branch_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Training form whose softmax-branch mask can never fire (threshold 1): folding must be lossless."""
    return make_nano_ckpt(tmp_path_factory.mktemp("ck") / "dead.pt", threshold=1.0)


@pytest.fixture(scope="session")
def alive_branch_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Training form whose mask keeps every entry (threshold 0): the branch is the full softmax attention."""
    path = tmp_path_factory.mktemp("ck") / "alive.pt"
    torch.manual_seed(1)
    model = create_model("castling_nano", threshold=0.0)
    # Make attention sharp so the softmax branch dominates predictions (a checkpoint not trained to fold).
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(6.0)
        model.head.weight.mul_(20.0)
    save_checkpoint(path, model, "castling_nano", NANO_PP, LABELS)
    return path


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def temp_names(folder: Path, prefixes: tuple[str, ...]) -> list[str]:
    """Names starting with ``prefixes`` in ``folder`` and inside its castling-run-<pid>-* folders (a CLI command
    keeps every temp file of its run, ours and the libraries', in its own such folder)."""
    found = []
    for top in _entries(folder):
        if top.name.startswith(prefixes):
            found.append(top.name)
            if top.name.startswith("castling-run-"):
                found += [p.name for p in _entries(top) if p.name.startswith(prefixes)]
    return sorted(found)


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:  # vanished while a run cleans up
        return []


def image_like(n: int, size: int, seed: int) -> np.ndarray:
    """Seeded picture-like inputs: N(0,1) on a 28x28 grid, bicubic to size x size, unit std (float32 NCHW)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.randn(n, 3, 28, 28, generator=g), size=(size, size), mode="bicubic", align_corners=False)
    return (x / x.std()).numpy().astype(np.float32)


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2)))


def invoke(runner: CliRunner, *args: str):
    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


# ---- isolation ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """No test reads or writes the user's ~/.cache/castling-deploy: every calibration cache of the session (and of
    the subprocesses it starts, which inherit the environment) lives in a fresh temp folder, so no result can come
    from ranges an earlier run left behind."""
    cache = tmp_path_factory.mktemp("castling-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CASTLING_DEPLOY_CACHE", str(cache))
        yield cache


# ---- the demo exports, one run per kind, shared by the CLI tests ------------------------------------------------
# Core ML artifacts are verified by the MIL interpreter (~30 ms per image and package): 120 val images keep that run
# short. Its stages agree with the float model on all 359 images, so a seeded subset is as demanding (one flip in
# 120 would already exceed the 0.5-point tolerance). The other runs use the whole val set.
COREML_VAL_LIMIT = 120


@dataclass
class DemoExport:
    out: Path  # the -o folder
    stdout: str  # the --json document, as printed
    stderr: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def doc(self) -> dict:
        return json.loads(self.stdout)

    def folder(self, target: str) -> Path:
        return self.out / "castling_nano_digits" / target

    def report(self, target: str) -> dict:
        return json.loads((self.folder(target) / "report.json").read_text())


def run_demo_export(out: Path, *args: str) -> DemoExport:
    r = CliRunner().invoke(cli, ["export", *map(str, args), "-o", str(out), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    return DemoExport(out, r.stdout, r.stderr)


@pytest.fixture(scope="session")
def demo_onnx_trt(tmp_path_factory: pytest.TempPathFactory) -> DemoExport:
    """`export --target onnx --target tensorrt --int8` on the demo (one run, so the float ONNX is shared). Records
    how often the ONNX exporter ran and what the run left in a private temp folder."""
    import castling_deploy.targets.onnx.target as onnx_target

    calls: list[str] = []
    real = onnx_target.export_onnx

    def counting_export(model, path, *a, **kw):
        calls.append(Path(path).name)
        return real(model, path, *a, **kw)

    tmp = tmp_path_factory.mktemp("tempdir")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_target, "export_onnx", counting_export)
        mp.setattr(tempfile, "tempdir", str(tmp))
        exp = run_demo_export(tmp_path_factory.mktemp("demo-onnx"), "--target", "onnx", "--target", "tensorrt",
                              "--int8")
    # torch's own compile cache (torchinductor_<user>) may appear there too; only our folders count
    ours = sorted(n for n in os.listdir(tmp) if n.startswith("castling"))
    exp.extra = {"export_onnx_calls": calls, "temp_left": ours}
    return exp


@pytest.fixture(scope="session")
def demo_tflite(tmp_path_factory: pytest.TempPathFactory) -> DemoExport:
    return run_demo_export(tmp_path_factory.mktemp("demo-tflite"), "--target", "tflite", "--fp16", "--int8")


@pytest.fixture(scope="session")
def demo_tflite_full_integer(tmp_path_factory: pytest.TempPathFactory) -> DemoExport:
    return run_demo_export(tmp_path_factory.mktemp("demo-tflite-fi"), "--target", "tflite", "--int8",
                           "--full-integer", "--io-dtype", "int8")


@pytest.fixture(scope="session")
def demo_coreml(tmp_path_factory: pytest.TempPathFactory) -> DemoExport:
    return run_demo_export(tmp_path_factory.mktemp("demo-coreml"), "--target", "coreml", "--int8", "--limit",
                           COREML_VAL_LIMIT)
