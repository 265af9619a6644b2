"""ExecuTorch runner: a ``.pte`` executed by ExecuTorch's own runtime (``executorch.runtime``, the C++ runtime with
the XNNPACK backend behind Python bindings), the same program an app loads on a phone.

Programs we write are planned for batch 1; larger batches are run image by image. ``etdump_profile`` times the
method with the runtime's own event tracer (ETDump): ``Method::execute`` per run, plus time per XNNPACK op kind.
"""
from __future__ import annotations

import collections
import tempfile
import warnings
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..optional import import_optional

METHOD = "forward"


def _runtime_module() -> Any:
    return import_optional("executorch.runtime", "executorch", "executorch", "running .pte programs")


def _version() -> str:
    try:
        return importlib_metadata.version("executorch")
    except importlib_metadata.PackageNotFoundError:
        return "?"


def set_threads(threads: int | None) -> int:
    """Size ExecuTorch's threadpool (one per process) when ``threads`` differs from its size; returns the size.

    XNNPACK methods keep the pool they were loaded with: a method loaded before a resize must not run after it
    (it crashes), so resize only before loading, as ``load_program`` does."""
    from executorch.extension.pybindings import portable_lib

    if threads is not None and threads != portable_lib._threadpool_get_thread_count():
        portable_lib._unsafe_reset_threadpool(int(threads))
    return int(portable_lib._threadpool_get_thread_count())


def load_program(path: str | Path, threads: int | None = None, **kwargs: Any) -> Any:
    """``Runtime.get().load_program(path)`` with our errors: exit 4 without executorch, exit 2 on a bad file.
    ``threads`` sizes the runtime's threadpool first (see ``set_threads``)."""
    runtime = _runtime_module()
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such .pte file")
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be >= 1 (got {threads})")
    set_threads(threads)
    try:
        return runtime.Runtime.get().load_program(p, **kwargs)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"{p}: ExecuTorch cannot load this program ({str(exc).splitlines()[0][:200]})") from exc


class ExecuTorchRunner:
    """Run a ``.pte`` classifier: NCHW float32 normalized images in, float32 logits (N, classes) out."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = str(path)
        self.program = load_program(path, threads)
        if METHOD not in self.program.method_names:
            raise UsageError(f"{path}: the program has no {METHOD!r} method ({sorted(self.program.method_names)})")
        try:
            self.method = self.program.load_method(METHOD)
        except RuntimeError as exc:  # e.g. a delegate this runtime build lacks (Core ML, QNN on Linux)
            raise UsageError(f"{path}: ExecuTorch cannot load {METHOD!r} here ({exc}); backends in this runtime: "
                             f"{registered_backends()}") from exc
        meta = self.method.metadata
        if meta.num_inputs() != 1 or meta.num_outputs() != 1:
            raise UsageError(f"{path}: expected one input and one output, found {meta.num_inputs()} and "
                             f"{meta.num_outputs()}")
        shape = tuple(int(d) for d in meta.input_tensor_meta(0).sizes())
        if len(shape) != 4 or shape[1] != 3:
            raise UsageError(f"{path}: input shape {list(shape)} is not an NCHW RGB image batch")
        self.input_shape = shape
        self.model_batch = shape[0]
        self.threads = set_threads(None)
        self.name = f"executorch {_version()} runtime (XNNPACK) threads={self.threads}"

    def _execute(self, x: np.ndarray) -> np.ndarray:
        import torch

        (out,) = self.method.execute([torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))])
        return out.detach().numpy().astype(np.float32, copy=False)

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape[1:]:
            raise UsageError(f"expected images of shape (N, {', '.join(map(str, self.input_shape[1:]))}), "
                             f"got {x.shape}")
        b, n = self.model_batch, x.shape[0]
        if n == b:
            return self._execute(x).reshape(n, -1)
        if n % b:
            raise UsageError(f"batch {n} is not a multiple of the program's fixed batch {b}")
        return np.concatenate([self._execute(x[i : i + b]).reshape(b, -1) for i in range(0, n, b)], axis=0)


def registered_backends() -> list[str]:
    return list(_runtime_module().Runtime.get().backend_registry.registered_backend_names)


def etdump_profile(path: str | Path, *, runs: int = 50, warmup: int = 5, threads: int | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """Latency of ``forward`` measured by ExecuTorch's event tracer (not a Python timer) and the time per
    XNNPACK op kind, over ``runs`` executions of one seeded random input after ``warmup`` untimed ones."""
    import torch
    from executorch.devtools import Inspector

    program = load_program(path, threads, enable_etdump=True, debug_buffer_size=0)
    method = program.load_method(METHOD)
    shape = tuple(int(d) for d in method.metadata.input_tensor_meta(0).sizes())
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))
    used = set_threads(None)
    for _ in range(warmup + runs):
        method.execute([x])
    with tempfile.TemporaryDirectory(prefix="castling-etdump-") as tmp:
        program.write_etdump_result_to_file(f"{tmp}/run.etdp", f"{tmp}/debug.bin")
        with warnings.catch_warnings():  # "Output Buffer not found": we record timings, not tensors
            warnings.simplefilter("ignore", UserWarning)
            inspector = Inspector(etdump_path=f"{tmp}/run.etdp")
    return _summarize_etdump(inspector, warmup, runs) | {"threads": used, "runs": runs, "warmup": warmup,
                                                         "timer": "ExecuTorch ETDump (Method::execute)"}


def _summarize_etdump(inspector: Any, warmup: int, runs: int) -> dict[str, Any]:
    execute_ms: list[float] = []
    by_kind: collections.Counter[str] = collections.Counter()
    for block in inspector.event_blocks:
        for event in block.events:
            samples = list(event.perf_data.raw) if event.perf_data is not None else []
            if event.name == "Method::execute":
                execute_ms = samples
            elif event.is_delegated_op and samples:
                kind = event.name.split(" #")[0]
                by_kind[kind] += float(np.mean(samples[warmup:] or samples))
    lat = np.asarray(execute_ms[warmup:] or execute_ms, dtype=np.float64)
    if lat.size == 0:
        raise UsageError("ExecuTorch wrote no Method::execute events; this runtime build has no event tracer")
    total = sum(by_kind.values()) or 1.0
    return {
        "latency_ms": {"mean": round(float(lat.mean()), 4), "p50": round(float(np.percentile(lat, 50)), 4),
                       "p90": round(float(np.percentile(lat, 90)), 4), "min": round(float(lat.min()), 4)},
        "by_op_kind": [{"op": k, "ms_per_run": round(v, 4), "percent": round(100 * v / total, 1)}
                       for k, v in by_kind.most_common(12)],
    }
