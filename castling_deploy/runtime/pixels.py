"""Pixel conversion shared by the Core ML converter (calibration feeds) and its runner (image inputs)."""
from __future__ import annotations

import numpy as np


def to_pixels(x: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """Normalized NCHW -> the 0..255 RGB pixel scale our ImageType expects: (x*std + mean)*255 (unrounded)."""
    m = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    return ((x.astype(np.float32) * s + m) * 255.0).astype(np.float32)
