"""Core ML runner: MLModel.predict on macOS, our MIL reference interpreter everywhere else.

Input convention (kept identical for both executors): ``run`` takes NCHW float32 images normalized with the
model's mean/std. For ImageType packages the runner maps them back to the 0..255 RGB pixels the ImageType
expects, ``pixels = (x*std + mean)*255`` (mean/std from the package metadata written by the Core ML target).
The interpreter takes those pixels unrounded (exact); macOS predict needs PIL images, so pixels are rounded and
clipped to uint8 there — a real, documented quantization of the input of at most 0.5/255/std per value.
The programs have batch 1; a batch is run image by image.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError


class _Base:
    name: str
    path: str

    def __init__(self, path: str | Path) -> None:
        from .mil_interp import load_spec

        self.path = str(path)
        spec = load_spec(path)
        desc = spec.description
        if len(desc.input) != 1:
            raise UsageError(f"{path}: expected one input, the package has {len(desc.input)}")
        inp = desc.input[0]
        self.input_name = inp.name
        self.is_image = inp.type.WhichOneof("Type") == "imageType"
        outs = [o.name for o in desc.output]
        self.output_name = "logits" if "logits" in outs else outs[0]
        md = dict(desc.metadata.userDefined)
        self.mean = json.loads(md.get("castling.mean", "[0.0, 0.0, 0.0]"))
        self.std = json.loads(md.get("castling.std", "[1.0, 1.0, 1.0]"))
        if self.is_image and "castling.mean" not in md:
            raise UsageError(f"{path}: image input without castling.mean/std metadata; cannot map normalized inputs")

    def pixels(self, x: np.ndarray) -> np.ndarray:
        from .pixels import to_pixels

        return to_pixels(x, self.mean, self.std)

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4:
            raise UsageError(f"expected NCHW images, got shape {x.shape}")
        return np.concatenate([self._run_one(x[i : i + 1]) for i in range(len(x))], axis=0).astype(np.float32)

    def _run_one(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class MILInterpreterRunner(_Base):
    """Runs the package's MIL program op by op in numpy (Linux CI, any OS)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        from .mil_interp import MILProgram

        self.program = MILProgram(path)
        self.name = "mil-reference-interpreter"

    def _run_one(self, x: np.ndarray) -> np.ndarray:
        feed = self.pixels(x) if self.is_image else x
        return np.asarray(self.program.run({self.input_name: feed})[self.output_name], dtype=np.float32)


class CoreMLPredictRunner(_Base):
    """Core ML's own runtime (macOS only)."""

    def __init__(self, path: str | Path, compute_units: str = "ALL") -> None:
        super().__init__(path)
        import coremltools as ct

        self.model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units))
        self.name = f"coreml-predict coremltools {ct.__version__} {compute_units}"

    def _run_one(self, x: np.ndarray) -> np.ndarray:
        if self.is_image:
            from PIL import Image

            px = np.clip(np.rint(self.pixels(x)[0].transpose(1, 2, 0)), 0, 255).astype(np.uint8)
            feed: Any = Image.fromarray(px, mode="RGB")
        else:
            feed = x
        out = self.model.predict({self.input_name: feed})[self.output_name]
        return np.asarray(out, dtype=np.float32).reshape(1, -1)


def predict_available() -> bool:
    """True where coremltools can really execute models (macOS with its native extension)."""
    if platform.system() != "Darwin":
        return False
    try:
        import coremltools.libcoremlpython  # noqa: F401
    except ImportError:
        return False
    return True


def load_coreml_runner(path: str | Path, prefer: str = "auto") -> MILInterpreterRunner | CoreMLPredictRunner:
    """``prefer``: "auto" (predict on macOS, else the interpreter), "predict" or "interpreter"."""
    if prefer not in ("auto", "predict", "interpreter"):
        raise UsageError(f"prefer must be auto, predict or interpreter, got {prefer!r}")
    if not Path(path).exists():
        raise UsageError(f"{path}: no such Core ML package")
    if prefer == "predict" or (prefer == "auto" and predict_available()):
        if not predict_available():
            raise UsageError("Core ML predict needs macOS; use the interpreter (prefer='interpreter') here")
        return CoreMLPredictRunner(path)
    return MILInterpreterRunner(path)


def compare_executors(path: str | Path, x: np.ndarray) -> dict[str, Any]:
    """Core ML predict vs the reference interpreter on the same inputs (both exist only on macOS)."""
    interp = MILInterpreterRunner(path)
    a = interp.run(x)
    if not predict_available():
        return {"compared": False, "reason": "Core ML predict is macOS-only", "interpreter": interp.name}
    pred = CoreMLPredictRunner(path)
    b = pred.run(x)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return {
        "compared": True,
        "interpreter": interp.name,
        "predict": pred.name,
        "max_abs_diff": float(np.abs(a - b).max()),
        "min_cosine": float(cos.min()),
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
    }
