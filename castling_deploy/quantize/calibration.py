"""Calibration images, the ONNX Runtime data reader, and the on-disk cache of calibration ranges.

The cache key is sha256(model digest, data digest, method, recipe calibration key): a range file is only ever read
back for the same float model, the same images and the same calibration settings.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..digest import file_sha256
from ..errors import DataError

log = logging.getLogger(__name__)

MIN_RECOMMENDED_IMAGES = 256
DEFAULT_CALIB_SIZE = 512
_WARNED: set[str] = set()


@dataclass(frozen=True)
class CalibrationSet:
    """Preprocessed NCHW float32 images plus the data module's content digest and where they came from."""

    images: np.ndarray
    digest: str
    source: str

    def __post_init__(self) -> None:
        if not isinstance(self.images, np.ndarray) or self.images.ndim != 4:
            shape = getattr(self.images, "shape", None)
            raise DataError(f"{self.source}: calibration images must be an (N, C, H, W) array, got shape {shape}")
        if len(self.images) == 0:
            raise DataError(f"{self.source}: the calibration set is empty; pass --calib DIR with images")
        if self.images.dtype != np.float32:
            object.__setattr__(self, "images", self.images.astype(np.float32))

    def __len__(self) -> int:
        return len(self.images)

    def subsample(self, calib_size: int = DEFAULT_CALIB_SIZE, seed: int = 0) -> "CalibrationSet":
        """A deterministic subset of ``calib_size`` images (all of them, in order, when there are fewer)."""
        n = len(self.images)
        if n < MIN_RECOMMENDED_IMAGES and self.digest not in _WARNED:
            _WARNED.add(self.digest)  # once per image set, not once per fallback trial
            log.warning(
                "%s: only %d calibration images (>= %d recommended); int8 ranges may be poor",
                self.source, n, MIN_RECOMMENDED_IMAGES,
            )
        if n <= calib_size:
            return self
        idx = np.sort(np.random.default_rng(seed).choice(n, size=calib_size, replace=False))
        digest = hashlib.sha256(f"{self.digest}:{calib_size}:{seed}".encode()).hexdigest()
        return CalibrationSet(self.images[idx], digest, f"{self.source}[{calib_size} of {n}, seed {seed}]")

    def check_batch(self, batch: int) -> None:
        if len(self.images) < batch:
            raise DataError(
                f"{self.source}: {len(self.images)} calibration images is fewer than the batch of {batch}; "
                "add images or lower the batch"
            )


def even_batch(n: int, batch: int) -> int:
    """The largest batch size <= ``batch`` that divides ``n`` images into equal batches.

    ONNX Runtime's histogram calibrators (percentile, entropy, and our mse) stack the outputs of all batches into
    one array, which fails on a short last batch ("inhomogeneous shape"). The histograms only see the flattened
    values, so how the images are grouped does not change the ranges: equal batches give exactly the ranges one
    pass over all images would, and for multiples of ``batch`` nothing changes at all.
    """
    if n < 1 or batch < 1:
        raise DataError(f"cannot batch {n} calibration images in batches of {batch}")
    return next(d for d in range(min(batch, n), 0, -1) if n % d == 0)


class CalibrationReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over a CalibrationSet, in equal batches of at most
    ``batch`` images (``even_batch``: every calibration size works with every calibration method).

    Subclassing happens lazily so that importing this module does not import onnxruntime.
    """

    def __new__(cls, calib: CalibrationSet, input_name: str = "images", batch: int = 8):
        from onnxruntime.quantization import CalibrationDataReader

        class _Reader(CalibrationDataReader):
            def __init__(self) -> None:
                calib.check_batch(batch)
                self.input_name = input_name
                self.batch_size = size = even_batch(len(calib.images), batch)
                self.batches = [calib.images[i : i + size] for i in range(0, len(calib.images), size)]
                self.calls = 0  # how many batches were served (tests use it to see whether calibration ran)
                self._it = iter(self.batches)

            def get_next(self) -> dict[str, np.ndarray] | None:
                nxt = next(self._it, None)
                if nxt is None:
                    return None
                self.calls += 1
                return {self.input_name: np.ascontiguousarray(nxt)}

            def rewind(self) -> None:
                self._it = iter(self.batches)

            def __len__(self) -> int:
                return len(self.batches)

            def set_range(self, start_index: int, end_index: int) -> None:
                self._it = iter(self.batches[start_index:end_index])

        return _Reader()


file_digest = file_sha256  # the model half of a calibration cache key


def calibration_cache_key(model_digest: str, data_digest: str, method: str, recipe_key: str) -> str:
    payload = json.dumps([model_digest, data_digest, method, recipe_key])
    return hashlib.sha256(payload.encode()).hexdigest()


def default_cache_dir() -> Path:
    root = os.environ.get("CASTLING_DEPLOY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "castling-deploy"
    )
    return Path(root) / "calibration"


class CalibrationCache:
    """Range files ``<key>.json`` (ONNX Runtime's own TensorsData format) plus ``<key>.meta.json``.

    The meta file repeats what the key was made of; a mismatch (a hash collision or a hand-edited file) is treated
    as a miss, so ranges are never reused for another model, data set or method.
    """

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def entry(self, model_digest: str, data_digest: str, method: str, recipe_key: str) -> tuple[Path, bool]:
        """(range file path, hit?). On a stale/mismatched entry the files are removed and a miss is returned."""
        key = calibration_cache_key(model_digest, data_digest, method, recipe_key)
        ranges, meta = self.dir / f"{key}.json", self.dir / f"{key}.meta.json"
        want = {"model": model_digest, "data": data_digest, "method": method, "recipe": recipe_key}
        if ranges.is_file() and meta.is_file():
            try:
                if json.loads(meta.read_text()) == want:
                    return ranges, True
            except (OSError, ValueError):
                pass
            log.warning("calibration cache %s does not match its key; recalibrating", ranges.name)
        for p in (ranges, meta):
            p.unlink(missing_ok=True)
        return ranges, False

    def commit(self, model_digest: str, data_digest: str, method: str, recipe_key: str) -> None:
        """Write the meta file once ORT has written the ranges (so a crash leaves no half entry that hits)."""
        key = calibration_cache_key(model_digest, data_digest, method, recipe_key)
        if not (self.dir / f"{key}.json").is_file():
            return
        meta = self.dir / f"{key}.meta.json"
        tmp = meta.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model": model_digest, "data": data_digest, "method": method, "recipe": recipe_key}))
        os.replace(tmp, meta)
