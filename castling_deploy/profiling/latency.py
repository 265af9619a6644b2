"""Latency, throughput and memory of one deployed artifact, measured through its real runtime.

Why a separate load time: on device the first inference pays for session creation / engine deserialization,
which an app pays once at startup; mixing it into per-image latency would mislead both numbers.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from .progress import ProgressBar
from .timer import time_interleaved

log = logging.getLogger(__name__)

SCHEMA = "castling-deploy/profile/1"
SEED = 0
MAX_BATCH = 1024
MAX_INPUT_ELEMENTS = 1 << 28  # one float32 input batch of at most 1 GiB
SHAPE_HINT = "pass --shape N,C,H,W (API: input_shape=(N, C, H, W))"


class RssSampler:
    """Samples this process's resident set size in a thread (Linux /proc); the peak over a block of work
    is what an app must budget for on top of what it already holds."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.baseline = current_rss_bytes()
        self.peak = self.baseline or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = current_rss_bytes()
            if rss is not None and rss > self.peak:
                self.peak = rss
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        if self.baseline is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        rss = current_rss_bytes()
        if rss is not None:
            self.peak = max(self.peak, rss)


def current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def max_rss_bytes() -> int:
    """Lifetime peak RSS of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def artifact_bytes(path: Path) -> int:
    if path.is_dir():  # .mlpackage is a directory
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def infer_input_shape(runner: Any, path: Path, batch: int) -> tuple[int, ...]:
    """NCHW input shape: the runner's own declaration, else ORT's graph input, else the export's report.json."""
    shape = getattr(runner, "input_shape", None)
    session = getattr(runner, "session", None)
    if shape is None and session is not None and hasattr(session, "get_inputs"):
        shape = session.get_inputs()[0].shape
    if shape is not None:
        dims = list(shape)
        if len(dims) == 4 and all(isinstance(d, int) and d > 0 for d in dims[1:]):
            return (batch, *(int(d) for d in dims[1:]))
    report = path.parent / "report.json"
    data = None
    if report.is_file() and report.stat().st_size < 64 * 2**20:
        try:
            data = json.loads(report.read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            data = None
    try:  # a report.json is metadata: anything malformed in it means "not known", never a crash
        shape = _shape_from_report(data, batch) if isinstance(data, dict) else None
    except (TypeError, ValueError, AttributeError):
        shape = None
    if shape is not None:
        return shape
    raise UsageError(f"{path}: cannot tell the input shape (the model declares no fixed C, H, W and no report.json "
                     f"beside it does); {SHAPE_HINT}")


def _shape_from_report(data: dict, batch: int) -> tuple[int, ...] | None:
    declared = (data.get("input") or {}).get("shape")
    if isinstance(declared, list) and len(declared) == 4 and all(isinstance(d, int) for d in declared[1:]):
        return (batch, *(int(d) for d in declared[1:]))
    pre = data.get("preprocess") or {}
    if pre.get("input_shape"):
        return (batch, *(int(d) for d in list(pre["input_shape"])[1:]))
    size = pre.get("crop") or pre.get("img_size") or pre.get("input_size")
    if size:
        h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        return (batch, int(pre.get("in_chans", 3)), int(h), int(w))
    return None


def check_input_shape(shape: Any, batch: int | None = None) -> tuple[int, ...]:
    """A concrete NCHW shape within bounds (batch <= MAX_BATCH, at most MAX_INPUT_ELEMENTS floats), or exit 2."""
    dims = list(shape) if isinstance(shape, (list, tuple)) else []
    if len(dims) != 4 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise UsageError(f"input shape {shape}: expected 4 positive integers N,C,H,W")
    if batch is not None:
        dims[0] = batch
    if dims[0] > MAX_BATCH:
        raise UsageError(f"batch {dims[0]}: at most {MAX_BATCH} images per batch can be profiled")
    if int(np.prod(dims, dtype=np.int64)) > MAX_INPUT_ELEMENTS:
        raise UsageError(f"input shape {tuple(dims)}: {int(np.prod(dims, dtype=np.int64))} values is over the "
                         f"limit of {MAX_INPUT_ELEMENTS} (1 GiB of float32); use a smaller batch or size")
    return tuple(dims)


def check_chart_destination(path: Path) -> Path:
    """Refuse, before anything is measured, a chart path that cannot be written (exit 2) or a missing matplotlib
    (exit 4)."""
    from ..optional import import_optional

    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--chart {path}: is a folder; pass a file name such as {path / 'latency.png'}")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"--chart {path}: {parent} is not an existing folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--chart {path}: {parent} is not writable; pass --chart in a writable folder")
    import_optional("matplotlib", "matplotlib", "profile", "latency charts")
    return path


def latency_stats(lat_ms: np.ndarray, batch: int) -> dict[str, float]:
    p50, p90, p99 = np.percentile(lat_ms, [50, 90, 99])
    mean = float(lat_ms.mean())
    return {
        "mean": round(mean, 4),
        "std": round(float(lat_ms.std(ddof=1)) if len(lat_ms) > 1 else 0.0, 4),
        "p50": round(float(p50), 4),
        "p90": round(float(p90), 4),
        "p99": round(float(p99), 4),
        "min": round(float(lat_ms.min()), 4),
        "max": round(float(lat_ms.max()), 4),
        "throughput_ips": round(1000.0 * batch / mean, 2) if mean > 0 else None,
    }


def profile_artifact(
    path: str | Path,
    *,
    runs: int = 100,
    warmup: int = 10,
    threads: int | None = None,
    batch: int = 1,
    chart_path: Path | None = None,
    per_op: bool = True,
    progress: bool = True,
    input_shape: tuple[int, ...] | None = None,
) -> dict:
    """Load ``path`` with its runtime, time ``runs`` inferences of one seeded random batch after ``warmup``.

    Returns a JSON-serializable dict (schema ``castling-deploy/profile/1``): load time, latency stats in ms,
    throughput, memory, the raw samples, and for ONNX a per-op breakdown from ORT's profiler.
    """
    from ..runtime import artifact_kind, load_runner

    path = Path(path)
    if runs < 1 or warmup < 0 or batch < 1:
        raise UsageError(f"need runs >= 1, warmup >= 0, batch >= 1 (got {runs}, {warmup}, {batch})")
    if batch > MAX_BATCH:
        raise UsageError(f"--batch {batch}: at most {MAX_BATCH} images per batch can be profiled")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1 (got {threads})")
    if input_shape is not None:
        check_input_shape(input_shape, batch)
    kind = artifact_kind(path)
    if kind == "tensorrt":  # another GPU / TensorRT version: exit 2 with the rebuild command, before loading
        from ..devices.engine_compat import check_engine_runs_here

        for note in check_engine_runs_here(path):
            log.warning("%s: %s", path.name, note)
    if chart_path is not None:
        check_chart_destination(Path(chart_path))
    with RssSampler() as load_mem:
        t0 = time.perf_counter()
        runner = load_runner(path, threads=threads)
        load_ms = (time.perf_counter() - t0) * 1000.0
    shape = check_input_shape(tuple(input_shape) if input_shape else infer_input_shape(runner, path, batch), batch)
    x = np.random.default_rng(SEED).standard_normal(shape, dtype=np.float32)

    with RssSampler() as run_mem, ProgressBar(warmup + runs, f"profiling {path.name}", enabled=progress) as bar:
        (lat_ms,) = time_interleaved([lambda: runner.run(x)], runs, warmup, on_call=bar.update)
    out = runner.run(x)

    result: dict[str, Any] = {
        "schema": SCHEMA,
        "artifact": {"path": str(path), "file": path.name, "kind": kind, "bytes": artifact_bytes(path)},
        "runtime": getattr(runner, "name", kind),
        "host": {
            "machine": platform.machine(),
            "system": platform.system(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        "threads": threads,
        "batch": batch,
        "input_shape": list(shape),
        "output_shape": list(np.asarray(out).shape),
        "runs": runs,
        "warmup": warmup,
        "load_ms": round(load_ms, 3),
        "latency_ms": latency_stats(lat_ms, batch),
        "samples_ms": [round(float(v), 4) for v in lat_ms],
        "memory": {
            "peak_rss_mb": round(max_rss_bytes() / 2**20, 1),
            "rss_before_load_mb": _mb(load_mem.baseline),
            "rss_after_load_mb": _mb(current_rss_bytes()),
            "load_rss_delta_mb": _mb(load_mem.peak - load_mem.baseline) if load_mem.baseline else None,
            "run_rss_peak_mb": _mb(run_mem.peak) if run_mem.baseline else None,
            "load_and_run_rss_delta_mb": (
                _mb(max(load_mem.peak, run_mem.peak) - load_mem.baseline) if load_mem.baseline else None
            ),
        },
        "per_op": None,
        "chart": None,
    }
    if per_op and kind == "onnx":
        from .ops import ort_per_op

        result["per_op"] = ort_per_op(path, x, threads=threads, runs=min(runs, 20), warmup=min(warmup, 2))
    if chart_path is not None:
        from .charts import latency_chart

        result["chart"] = str(latency_chart(result, Path(chart_path)))
    return result


def _mb(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def format_profile_table(result: dict) -> str:
    """A plain-text summary for terminals (the JSON form is the machine interface)."""
    lat = result["latency_ms"]
    mem = result.get("memory") or {}
    art = result["artifact"]
    lines = [
        f"{art['file']}  ({art['kind']}, {art['bytes'] / 2**20:.2f} MiB)  runtime: {result['runtime']}",
        f"input {tuple(result['input_shape'])}  threads {result['threads'] or 'default'}  "
        f"runs {result['runs']} (+{result['warmup']} warmup)",
        "",
        f"  load          {result['load_ms']:10.2f} ms",
        f"  mean ± std    {lat['mean']:10.3f} ± {lat['std']:.3f} ms",
        f"  p50/p90/p99   {lat['p50']:10.3f} / {lat['p90']:.3f} / {lat['p99']:.3f} ms",
        f"  min/max       {lat['min']:10.3f} / {lat['max']:.3f} ms",
        f"  throughput    {lat['throughput_ips']:10.1f} images/s",
        f"  peak RSS      {mem.get('peak_rss_mb', float('nan')):10.1f} MiB"
        + (f"  (load+run +{mem['load_and_run_rss_delta_mb']:.1f} MiB)" if mem.get("load_and_run_rss_delta_mb") else ""),
    ]
    per_op = result.get("per_op")
    if per_op:
        lines += ["", f"per op type (ORT trace, {per_op['profiled_runs']} runs, "
                      f"kernels {per_op['kernel_ms_per_run']:.3f} ms/run):"]
        lines += [f"  {'op type':<24}{'ms/run':>10}{'%':>8}{'nodes':>7}"]
        for r in per_op["by_op_type"]:
            lines.append(f"  {r['op_type']:<24}{r['ms_per_run']:>10.3f}{r['percent']:>8.1f}{r['nodes']:>7}")
        lines += ["", f"top {len(per_op['by_node'])} nodes:"]
        for r in per_op["by_node"]:
            name = r["node"] if len(r["node"]) <= 48 else "…" + r["node"][-47:]
            lines.append(f"  {name:<49}{r['op_type']:<18}{r['ms_per_run']:>9.3f}{r['percent']:>7.1f}%")
    if result.get("chart"):
        lines += ["", f"chart: {result['chart']}"]
    return "\n".join(lines)
