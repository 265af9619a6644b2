"""Runners: load a deployed artifact with its real runtime and map NCHW float32 images to float32 logits.

Each backend lives in its own module and imports its runtime lazily, so a missing optional runtime only
matters when that artifact kind is used (MissingDependencyError -> exit 4).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from .base import Runner

__all__ = ["Runner", "load_runner", "artifact_kind"]

_SUFFIX_KIND = {
    ".onnx": "onnx",
    ".tflite": "tflite",
    ".mlpackage": "coreml",
    ".engine": "tensorrt",
    ".plan": "tensorrt",
}


def artifact_kind(path: str | Path) -> str:
    p = Path(path)
    kind = _SUFFIX_KIND.get(p.suffix.lower())
    if kind is None:
        raise UsageError(
            f"{p}: unknown artifact type {p.suffix!r}; expected one of {', '.join(sorted(_SUFFIX_KIND))}"
        )
    return kind


def load_runner(path: str | Path, threads: int | None = None) -> Runner:
    """Load ``path`` with the runtime its suffix implies."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such artifact; pass the path of an exported model file")
    kind = artifact_kind(p)
    if kind == "onnx":
        from .ort import OrtRunner

        return OrtRunner(p, threads=threads)
    if kind == "tflite":
        from .litert import LiteRTRunner

        return LiteRTRunner(p, threads=threads)
    if kind == "coreml":
        from .coreml import load_coreml_runner

        return load_coreml_runner(p)
    from .tensorrt import TensorRTRunner

    return TensorRTRunner(p)
