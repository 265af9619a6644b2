"""Reference inputs: verification that needs no dataset.

Every export writes ``reference.npz`` beside its artifacts: a small seeded set of image-like inputs (already
preprocessed, float32 NCHW), the folded float model's logits on them, and each model file's own logits on them
as its verifying runtime computed them at export. ``verify PACKAGE`` (here or ``--device``) re-runs every model
file on these inputs when no ``--val`` is given: the file must reproduce its export-time logits (per-sample
cosine >= 0.999: a replaced weight or a broken runtime on the device cannot) and, for float files, stay within the
export's atol of the folded model. The file is part of the package, so its hash is in the (signed) manifest.
The inputs are synthetic (smooth seeded noise), never the user's images.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .budget import FLOAT_ATOL, logit_metrics
from .errors import UsageError

REFERENCE_FILE = "reference.npz"
REFERENCE_COUNT = 8
REFERENCE_SEED = 20261126
MIN_COSINE = 0.999  # a model file vs its own export-time logits, per sample
MAX_REFERENCE_BYTES = 64 * 2**20
MAX_INPUTS = 64
MAX_CLASSES = 100_000
_KEYS = {"inputs.npy", "folded.npy", "files.npy", "logits.npy"}


def reference_inputs(img_size: int, n: int = REFERENCE_COUNT, seed: int = REFERENCE_SEED) -> np.ndarray:
    """``n`` smooth image-like inputs (8x8 seeded noise, bilinear to ``img_size``, unit std), float32 NCHW."""
    import torch
    import torch.nn.functional as F

    small = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32))
    up = F.interpolate(small, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return np.ascontiguousarray((up / up.std(dim=(1, 2, 3), keepdim=True)).numpy(), dtype=np.float32)


@dataclass
class Reference:
    inputs: np.ndarray  # (N, 3, H, W) float32
    folded: np.ndarray  # (N, classes) float32: the folded model
    runs: dict[str, np.ndarray]  # model file (relative to its folder) -> its export-time logits

    def save(self, path: Path) -> dict[str, Any]:
        """Write the .npz (no pickles: the file list is a unicode array); return the report's summary."""
        files = sorted(self.runs)
        logits = np.stack([self.runs[f] for f in files]).astype(np.float32) if files else \
            np.zeros((0, *self.folded.shape), np.float32)
        buf = io.BytesIO()
        np.savez(buf, inputs=self.inputs.astype(np.float32), folded=self.folded.astype(np.float32),
                 files=np.array(files, dtype=np.str_), logits=logits)
        Path(path).write_bytes(buf.getvalue())
        return {"file": REFERENCE_FILE, "inputs": int(len(self.inputs)), "seed": REFERENCE_SEED, "files": files,
                "min_cosine_goal": MIN_COSINE}


def load_reference(path: Path) -> Reference:
    """Read a reference.npz from an untrusted package: size, members, dtypes and shapes checked before use."""
    path = Path(path)
    if path.stat().st_size > MAX_REFERENCE_BYTES:
        raise UsageError(f"{path}: {path.stat().st_size} bytes is too large for reference inputs "
                         f"(limit {MAX_REFERENCE_BYTES}); re-export the package")
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            if {i.filename for i in infos} != _KEYS or sum(i.file_size for i in infos) > 4 * MAX_REFERENCE_BYTES:
                raise UsageError(f"{path}: not a reference file of this tool (members {[i.filename for i in infos]})")
        with np.load(path, allow_pickle=False) as z:
            inputs, folded, files, logits = (z[k] for k in ("inputs", "folded", "files", "logits"))
    except (zipfile.BadZipFile, ValueError, OSError, KeyError) as exc:
        raise UsageError(f"{path}: unreadable reference inputs ({exc}); re-export the package") from None
    n = len(inputs)
    ok = (inputs.dtype == np.float32 and inputs.ndim == 4 and 0 < n <= MAX_INPUTS and inputs.shape[1] == 3
          and folded.dtype == np.float32 and folded.ndim == 2 and folded.shape[0] == n
          and 0 < folded.shape[1] <= MAX_CLASSES and files.dtype.kind == "U" and files.ndim == 1
          and logits.dtype == np.float32 and logits.shape == (len(files), *folded.shape)
          and len(set(files.tolist())) == len(files))
    if not ok:
        raise UsageError(f"{path}: reference inputs have unexpected shapes or types; re-export the package")
    return Reference(inputs, folded, {str(f): logits[i] for i, f in enumerate(files)})


def check_against_reference(ref: Reference, name: str, precision: str, logits: np.ndarray) -> dict[str, Any]:
    """One row: ``logits`` of model file ``name`` on the reference inputs vs its export-time logits (cosine)
    and, for a float file, vs the folded model (the export's atol)."""
    row: dict[str, Any] = {"file": name, "precision": precision, "n": int(len(ref.inputs))}
    failures: list[str] = []
    logits = np.asarray(logits, dtype=np.float32)
    if logits.shape != ref.folded.shape:
        failures.append(f"logits of shape {logits.shape}, expected {ref.folded.shape}")
    elif not np.isfinite(logits).all():
        failures.append("NaN/Inf logits")
    else:
        own = ref.runs.get(name.rsplit("/", 1)[-1])
        if own is not None:
            m = logit_metrics(own, logits)
            row.update(min_cosine_vs_export=round(m["min_sample_cosine"], 6),
                       agreement_vs_export=m["top1_agreement"])
            if not m["min_sample_cosine"] >= MIN_COSINE:
                failures.append(f"per-sample cosine {m['min_sample_cosine']:.5f} with its own export-time logits "
                                f"< {MIN_COSINE}")
        atol = FLOAT_ATOL.get(precision)
        folded = logit_metrics(ref.folded, logits)
        row["max_abs_vs_folded"] = float(folded["max_abs_logit"])
        if atol is not None and not folded["max_abs_logit"] <= atol:
            failures.append(f"max |Δlogit| {folded['max_abs_logit']:.3g} vs the folded model > atol {atol:g}")
        if own is None and atol is None:
            row["note"] = "no export-time logits recorded for this file: only the shape and finiteness checked"
    row["failures"] = failures
    row["status"] = "failed" if failures else "passed"
    return row
