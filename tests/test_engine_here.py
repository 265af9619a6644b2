"""A TensorRT engine run here (local `profile`, `verify`) is checked against this machine's TensorRT and GPU
before TensorRT is asked to load it, as `--device` runs are (engine_compat.check_engine_runs_on)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from castling_deploy.devices import engine_compat
from castling_deploy.packaging.accuracy import _run_model, local_logits

from .conftest import invoke

META = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7", "precision": "int8"}


@pytest.fixture
def engine(tmp_path: Path) -> Path:
    path = tmp_path / "model.engine"
    path.write_bytes(b"not really an engine")  # never loaded when the check refuses it
    (tmp_path / "model.engine.json").write_text(json.dumps(META))
    return path


def _here(monkeypatch, trt: str | None, gpu: tuple[str, str | None]) -> None:
    monkeypatch.setattr(engine_compat, "local_tensorrt", lambda: trt)
    monkeypatch.setattr(engine_compat, "local_gpu", lambda: gpu)


@pytest.mark.parametrize("trt, gpu, says", [
    ("11.0.0", ("NVIDIA Jetson AGX Orin", "8.7"), "built with TensorRT 10.3.0 and this machine has TensorRT 11.0.0"),
    ("10.3.0", ("NVIDIA GeForce RTX 4090", "8.9"), "compute capability 8.7 (Orin) and this machine's GPU is 8.9"),
])
def test_profile_refuses_an_engine_for_another_machine(runner, monkeypatch, engine, trt, gpu, says) -> None:
    _here(monkeypatch, trt, gpu)
    r = invoke(runner, "profile", engine, "--runs", 1)
    assert r.exit_code == 2, r.output
    assert says in r.output and "rebuild it here: castling-deploy build-engine" in r.output
    assert "Traceback" not in r.output


def test_profile_lets_a_matching_engine_through_to_tensorrt(runner, monkeypatch, engine) -> None:
    _here(monkeypatch, "10.3.0", ("NVIDIA Jetson AGX Orin (64GB)", "8.7"))
    r = invoke(runner, "profile", engine, "--runs", 1)
    # the check passes; loading then needs TensorRT, which this machine lacks (exit 4), or fails on the fake bytes
    assert r.exit_code in (2, 4) and "cannot run here" not in r.output, r.output
    if r.exit_code == 4:
        assert "tensorrt" in r.output.lower()


def test_unknown_here_means_the_runtime_decides(monkeypatch, engine) -> None:
    _here(monkeypatch, None, ("unknown", None))
    assert engine_compat.check_engine_runs_here(engine) == []
    (engine.parent / "model.engine.json").unlink()  # no metadata at all: nothing to compare
    _here(monkeypatch, "11.0.0", ("NVIDIA GeForce RTX 4090", "8.9"))
    assert engine_compat.check_engine_runs_here(engine) == []


def test_verify_skips_an_engine_for_another_machine_and_says_why(monkeypatch, engine) -> None:
    _here(monkeypatch, "11.0.0", ("NVIDIA Jetson AGX Orin", "8.7"))
    out = _run_model(local_logits(1), engine.parent, engine.name, np.zeros((1, 3, 32, 32), np.float32))
    assert isinstance(out, str) and "TensorRT 10.3.0" in out and "11.0.0" in out
