"""The one interface every runtime backend implements."""
from __future__ import annotations

from typing import Protocol

import numpy as np


class Runner(Protocol):
    """A loaded artifact. ``run`` takes NCHW float32 images (already normalized with the model's
    preprocessing) and returns float32 logits of shape (N, classes); quantized I/O, layout changes
    and batching are the runner's business."""

    name: str  # runtime and executor, e.g. "onnxruntime 1.32 CPUExecutionProvider"
    path: str

    def run(self, x: np.ndarray) -> np.ndarray: ...


def run_batched(runner: Runner, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """Run ``x`` through ``runner`` in chunks (keeps memory flat on big sets)."""
    outs = [runner.run(np.ascontiguousarray(x[i : i + batch], dtype=np.float32)) for i in range(0, len(x), batch)]
    return np.concatenate(outs, axis=0)
