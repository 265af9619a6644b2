"""Runners: load a deployed artifact with its real runtime and map NCHW float32 images to float32 logits.

Each backend lives in its own module and imports its runtime lazily, so a missing optional runtime only
matters when that artifact kind is used (MissingDependencyError -> exit 4).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UsageError
from .base import Runner

__all__ = ["Runner", "RUNTIMES", "RuntimeSpec", "artifact_kind", "load_runner", "runtime_spec"]



def _ort(p: Path, threads: int | None) -> Runner:
    from .ort import OrtRunner

    return OrtRunner(p, threads=threads)


def _litert(p: Path, threads: int | None) -> Runner:
    from .litert import LiteRTRunner

    return LiteRTRunner(p, threads=threads)


def _coreml(p: Path, threads: int | None) -> Runner:
    from .coreml import load_coreml_runner

    return load_coreml_runner(p)


def _tensorrt(p: Path, threads: int | None) -> Runner:
    from .tensorrt import TensorRTRunner

    return TensorRTRunner(p)


def _executorch(p: Path, threads: int | None) -> Runner:
    from .executorch import ExecuTorchRunner

    return ExecuTorchRunner(p, threads=threads)


@dataclass(frozen=True)
class RuntimeSpec:
    kind: str
    description: str  # what an app developer needs to know to run the file (goes into package READMEs)
    load: Callable[[Path, int | None], Runner]


# The one table of artifact kinds -> the runtime that executes them. A target that writes a new kind of file
# adds its runner module here (targets/registry.py lists which suffixes each target writes).
RUNTIMES: dict[str, RuntimeSpec] = {
    ".onnx": RuntimeSpec("onnx", "ONNX Runtime (any OS; also the TensorRT/ModelOpt builder input)", _ort),
    ".tflite": RuntimeSpec("tflite", "LiteRT / TFLite (Android, embedded Linux; XNNPACK delegate on CPU)", _litert),
    ".mlpackage": RuntimeSpec("coreml", "Core ML (iOS 17+/macOS 14+; drag into Xcode)", _coreml),
    ".engine": RuntimeSpec("tensorrt", "TensorRT (only the GPU model + TensorRT version it was built with)", _tensorrt),
    ".plan": RuntimeSpec("tensorrt", "TensorRT (only the GPU model + TensorRT version it was built with)", _tensorrt),
    ".pte": RuntimeSpec("executorch", "ExecuTorch runtime with the XNNPACK backend (Android, iOS, embedded Linux; "
                        "batch 1)", _executorch),
}


def runtime_spec(path: str | Path) -> RuntimeSpec:
    p = Path(path)
    spec = RUNTIMES.get(p.suffix.lower())
    if spec is None:
        raise UsageError(f"{p}: unknown artifact type {p.suffix!r}; expected one of {', '.join(sorted(RUNTIMES))}")
    return spec


def artifact_kind(path: str | Path) -> str:
    return runtime_spec(path).kind


def load_runner(path: str | Path, threads: int | None = None) -> Runner:
    """Load ``path`` with the runtime its suffix implies."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such artifact; pass the path of an exported model file")
    return runtime_spec(p).load(p, threads)
