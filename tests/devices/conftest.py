"""Device-test fixtures: a REAL OpenSSH server on 127.0.0.1 (skipped with the reason when openssh-server is
absent), tiny real artifacts, a device python without onnxruntime, and device factories that clean up."""
from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from castling_deploy.devices import parse_device
from castling_deploy.devices.base import ShellDevice

from .sshd import LoopbackSshd, missing_tools

IMG = 32  # castling_nano's input size


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackSshd]:
    why = missing_tools()
    if why:
        pytest.skip(f"SSH device tests skipped: {why}")
    try:
        server = LoopbackSshd(tmp_path_factory.mktemp("sshd")).start()
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"SSH device tests skipped: cannot start a loopback sshd here ({exc})")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nano_model() -> torch.nn.Module:
    from castling_deploy.models import create_model

    torch.manual_seed(0)
    return create_model("castling_nano").eval()


@pytest.fixture(scope="session")
def onnx_artifact(nano_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """castling_nano as ONNX with a dynamic batch. The TorchScript exporter (opset 17) takes ~2 s where the
    dynamo exporter takes 6-25 s on a busy 2-core box (both match torch to ~1e-7); how the file was made does
    not matter to the device layer, so the fast one is used and dynamo only if it fails."""
    import warnings

    path = tmp_path_factory.mktemp("art") / "nano.onnx"
    x = torch.randn(1, 3, IMG, IMG)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(nano_model, (x,), str(path), dynamo=False, opset_version=17, input_names=["images"],
                              output_names=["logits"], dynamic_axes={"images": {0: "batch"}})
    except Exception:
        torch.onnx.export(nano_model, (x,), str(path), dynamo=True, opset_version=18, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    return path


class TinyConvNet(torch.nn.Module):
    """A classifier small enough to convert to .tflite in ~2 s (castling_nano takes ~10 s); the device layer
    only needs *a* real .tflite with an NCHW image input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).relu().mean(dim=(2, 3)))


@pytest.fixture(scope="session")
def tflite_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    litert_torch = pytest.importorskip("litert_torch", reason="litert-torch not installed: no .tflite to profile")
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert not installed")
    path = tmp_path_factory.mktemp("art") / "tiny.tflite"
    torch.manual_seed(0)
    litert_torch.convert(TinyConvNet().eval(), (torch.randn(1, 3, IMG, IMG),)).export(str(path))
    return path


@pytest.fixture(scope="session")
def no_ort_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A device python whose modules lack onnxruntime: this venv's python with a shadowing package that
    refuses to import (what a device without onnxruntime looks like to our runner)."""
    root = tmp_path_factory.mktemp("no_ort")
    (root / "block" / "onnxruntime").mkdir(parents=True)
    (root / "block" / "onnxruntime" / "__init__.py").write_text(
        'raise ImportError("No module named \'onnxruntime\' (blocked for this test)")\n')
    wrapper = root / "python3"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={root / "block"} exec {sys.executable} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(wrapper)


@pytest.fixture
def device_dirs(tmp_path: Path) -> dict[str, Path]:
    """Per-test cache and temp folders "on the device" (the loopback device is this machine)."""
    dirs = {"cache": tmp_path / "device-cache", "tmp": tmp_path / "device-tmp"}
    for d in dirs.values():
        d.mkdir()
    return dirs


@pytest.fixture
def make_device(sshd: LoopbackSshd, device_dirs: dict[str, Path]) -> Iterator[Callable[..., ShellDevice]]:
    """``make_device("ssh://loopback", python=...)``: a device using the loopback server's config, the test's
    cache/temp folders and this venv's python by default; closed at teardown."""
    made: list[ShellDevice] = []

    def make(uri: str = "ssh://loopback", **kw: object) -> ShellDevice:
        kw.setdefault("python", sys.executable)
        kw.setdefault("cache_dir", str(device_dirs["cache"]))
        kw.setdefault("tmp_dir", str(device_dirs["tmp"]))
        if uri.startswith("ssh://"):
            kw.setdefault("ssh_config", sshd.config)
        dev = parse_device(uri, **kw)  # type: ignore[arg-type]
        made.append(dev)  # type: ignore[arg-type]
        return dev  # type: ignore[return-value]

    yield make
    for dev in made:
        dev.close()


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))
