"""Shared fixtures: tiny checkpoints written in our format, the shipped demo data, a CLI runner."""
from __future__ import annotations

from pathlib import Path

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


def invoke(runner: CliRunner, *args: str):
    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
