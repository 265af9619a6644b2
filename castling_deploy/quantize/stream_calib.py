"""Calibration in bounded memory: activation statistics collected batch by batch, ranges equal to ORT's.

ONNX Runtime's histogram calibrators (percentile, entropy; our mse reads the percentile histogram) keep every
intermediate output of every calibration batch in memory and build the histograms at the end: castling_deit_tiny
@224 needs ~38 MB of activations per image, so 512 images peaked at 22 GB. Here one batch's activations are alive
at a time, and the result is the same as ORT's one-shot computation, not an approximation:

- pass 1 keeps per tensor the running min / max of x and of |x| (exact under any batching);
- pass 2 (histogram methods only) histograms each batch over the now-known global range, with the same bin count
  and edges ORT derives from the stacked array, and sums the counts. A histogram with fixed edges is a sum over
  elements, so the merged counts equal ORT's (``np.histogram`` of all values at once) exactly;
- the thresholds come from ORT's own ``HistogramCollector`` (percentile / entropy) fed those histograms, and from
  ``mse_threshold`` for mse. ORT's merge-as-you-go path (``collect`` per batch) is *not* used: it re-bins when a
  later batch has a larger max, which changes the ranges.

Cost: two forward passes of the calibration set for histogram methods (one for minmax); the histogramming itself,
which dominates, is done once per element either way. Memory: one batch of activations plus 2048 bins per tensor.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NUM_BINS = 2048
NUM_QUANTIZED_BINS = 128


@dataclass
class _Extremes:
    """Running min/max of x and of |x| for one tensor."""

    lo: Any = None
    hi: Any = None
    alo: Any = None
    ahi: Any = None

    def update(self, a: np.ndarray) -> None:
        if a.size == 0:
            return
        lo, hi = np.nanmin(a), np.nanmax(a)
        # |x| extremes without materializing |x|: max|x| = max(|min|, |max|); min|x| needs the array.
        alo = np.nanmin(np.abs(a)) if lo <= 0 <= hi else min(abs(lo), abs(hi))
        ahi = max(abs(lo), abs(hi))
        self.lo = lo if self.lo is None else min(self.lo, lo)
        self.hi = hi if self.hi is None else max(self.hi, hi)
        self.alo = alo if self.alo is None else min(self.alo, alo)
        self.ahi = ahi if self.ahi is None else max(self.ahi, ahi)


@dataclass
class StreamStats:
    """What the streaming calibrator measured: per-tensor extremes and (for histogram methods) histograms."""

    extremes: dict[str, _Extremes] = field(default_factory=dict)
    hists: dict[str, np.ndarray] = field(default_factory=dict)
    edges: dict[str, np.ndarray] = field(default_factory=dict)
    batches: int = 0


def augmented_session(model_path: Path, op_types: Iterable[str], tmp: Path) -> tuple[Any, list[str]]:
    """An ORT session whose outputs include every tensor ORT would calibrate (inputs/outputs of ``op_types``);
    the tensors are selected by ORT's own calibrator so the range keys are the same. Returns (session, names)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    cal = create_calibrator(model_path, list(op_types), augmented_model_path=str(tmp / "augmented.onnx"),
                            calibrate_method=CalibrationMethod.Percentile, extra_options={"symmetric": True})
    names = sorted(cal.tensors_to_calibrate)
    return cal.infer_session, names


def _run_batches(session: Any, names: list[str], batches: Callable[[], Iterable[dict]],
                 visit: Callable[[str, np.ndarray], None]) -> int:
    n = 0
    for feed in batches():
        outs = session.run(names, feed)
        for name, arr in zip(names, outs):
            visit(name, arr.ravel())
        del outs
        n += 1
    return n


def collect(session: Any, names: list[str], batches: Callable[[], Iterable[dict]], histograms: bool,
            num_bins: int = NUM_BINS, absolute: bool = True) -> StreamStats:
    """Pass 1: extremes; pass 2 (``histograms``): fixed-edge histograms of |x| (``absolute``) or of x over
    [-max|x|, max|x|] (ORT's entropy form), summed over batches."""
    st = StreamStats(extremes={n: _Extremes() for n in names})
    st.batches = _run_batches(session, names, batches, lambda n, a: st.extremes[n].update(a))
    if st.batches == 0:
        raise ValueError("no calibration batches")
    if not histograms:
        return st
    for name, ex in st.extremes.items():
        f32 = np.float32
        rng = (f32(ex.alo), f32(ex.ahi)) if absolute else (-f32(ex.ahi), f32(ex.ahi))
        if rng[0] == rng[1]:  # np.histogram widens a degenerate range by +-0.5
            rng = (rng[0] - f32(0.5), rng[1] + f32(0.5))
        st.edges[name] = np.histogram_bin_edges(np.empty(0, np.float32), num_bins, range=rng)
        st.hists[name] = np.zeros(num_bins, np.int64)

    def add(name: str, a: np.ndarray) -> None:
        e = st.edges[name]
        h, _ = np.histogram(np.abs(a) if absolute else a, num_bins, range=(e[0], e[-1]))
        st.hists[name] += h

    _run_batches(session, names, batches, add)
    return st


def _collector(method: str, percentile: float) -> Any:
    from onnxruntime.quantization.calibrate import HistogramCollector

    return HistogramCollector(method=method, symmetric=True, num_bins=NUM_BINS, num_quantized_bins=NUM_QUANTIZED_BINS,
                              percentile=percentile, scenario="same")


def tensors_data(st: StreamStats, method: str, percentile: float = 99.99) -> Any:
    """ORT ``TensorsData`` for ``method`` from the streamed statistics (the same values ORT would compute)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

    if method == "minmax":
        out = {}
        for name, ex in st.extremes.items():
            m = np.nanmax([np.abs(ex.lo), np.abs(ex.hi)]).reshape(1)  # ORT's ReduceMax output has shape (1,)
            out[name] = (-m, m)
        return TensorsData(CalibrationMethod.MinMax, out)
    f32 = np.float32
    if method in ("percentile", "mse"):
        col = _collector("percentile", 100.0 if method == "mse" else percentile)
        col.histogram_dict = {n: (st.hists[n], st.edges[n].astype(f32), st.extremes[n].lo, st.extremes[n].hi)
                              for n in st.hists}
    elif method == "entropy":
        col = _collector("entropy", 99.99)
        col.histogram_dict = {n: (st.hists[n], st.edges[n], st.extremes[n].lo, st.extremes[n].hi,
                                  f32(st.extremes[n].ahi)) for n in st.hists}
    else:
        raise ValueError(f"unknown calibration method {method!r}")
    with contextlib.redirect_stdout(sys.stderr):  # ORT's collector print()s progress; keep --json clean
        data = col.compute_collection_result()
    if method == "mse":
        from .ort_int8 import mse_threshold

        hd = col.histogram_dict
        data = {n: (-t, t, hd[n][0], hd[n][1]) for n in data
                for t in [np.array(mse_threshold(hd[n][0], hd[n][1]), dtype=hd[n][1].dtype)]}
    return TensorsData(CalibrationMethod.Entropy if method == "entropy" else CalibrationMethod.Percentile, data)


def calibrate_streaming(model_path: Path, batches: Callable[[], Iterable[dict]], method: str, percentile: float,
                        op_types: Iterable[str], tmp: Path) -> Any:
    """Ranges (ORT ``TensorsData``) for the tensors ORT calibrates, in memory bounded by one batch."""
    session, names = augmented_session(Path(model_path), op_types, tmp)
    hist = method != "minmax"
    st = collect(session, names, batches, histograms=hist, absolute=method != "entropy")
    return tensors_data(st, method, percentile)
