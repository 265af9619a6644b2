"""NVIDIA ModelOpt side by side with our QuantRecipe: ``modelopt.onnx.quantization`` INT8 PTQ (the route NVIDIA
documents for TensorRT 11) and ModelOpt AutoCast (fp16 with chosen ops kept fp32).

Optional and never the default (``--quantizer modelopt`` on the TensorRT target): the ``[modelopt]`` extra installs
``nvidia-modelopt`` without its ``[onnx]`` extra, whose pins (onnx~=1.21, onnxruntime-gpu~=1.24) would replace this
project's onnx / onnxruntime. Measured on CPU here (benchmarks/results/modelopt.md): 0.47.0 imports with
onnx-graphsurgeon, nvidia-ml-py, lief and polygraphy added by hand, and quantizes on the CPU execution provider.
ModelOpt places Q/DQ itself (TensorRT's fusion rules: it also quantizes e.g. residual Add inputs and the network
input) and calibrates with entropy or max; only the calibration method and the sample size map from a QuantRecipe.
The float parts are written fp32 (``high_precision_dtype="fp32"``) so that one typed fp16 pass (``fp16.py``, the same
policy for both quantizers) makes the float islands fp16.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import CastlingError, MissingDependencyError
from ..optional import import_optional
from .calibration import CalibrationSet
from .fp16 import KEEP_FP32_OPS, policy_fp32_nodes

log = logging.getLogger(__name__)

CALIBRATION = {"minmax": "max", "entropy": "entropy", "percentile": "entropy", "mse": "entropy"}
MODELOPT_PIP = "nvidia-modelopt"


def _modelopt_quantization() -> Any:
    return import_optional("modelopt.onnx.quantization", MODELOPT_PIP, "modelopt", "ModelOpt quantization")


def modelopt_version() -> str | None:
    """The installed nvidia-modelopt version when its ONNX part imports, else None."""
    try:
        _modelopt_quantization()
    except MissingDependencyError:
        return None
    from importlib.metadata import version

    return version(MODELOPT_PIP)


@contextlib.contextmanager
def _quiet_and_without_stub_tensorrt() -> Iterator[None]:
    """Keep stdout clean (--json) and ModelOpt's INFO logs down; hide a ``tensorrt`` that is not the runtime (the
    ``tensorrt-stubs`` namespace package): ModelOpt would call ``trt.Logger`` on it."""
    import importlib.util

    saved = sys.modules.get("tensorrt", ...)
    if saved is ...:
        spec = importlib.util.find_spec("tensorrt")
        hide = spec is not None and spec.origin in (None, "namespace")
    else:
        hide = saved is not None and getattr(saved, "__file__", None) is None
    if hide:
        sys.modules["tensorrt"] = None  # type: ignore[assignment]  # import tensorrt -> ImportError
    levels = {name: logging.getLogger(name).level for name in ("modelopt", "modelopt.onnx")}
    try:
        for name in levels:
            logging.getLogger(name).setLevel(logging.WARNING)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if hide:
            if saved is ...:
                sys.modules.pop("tensorrt", None)
            else:
                sys.modules["tensorrt"] = saved


def _ort_patch_targets() -> list[Any]:
    from onnxruntime.quantization import base_quantizer, calibrate, qdq_quantizer

    return [calibrate.CalibraterBase, calibrate.MinMaxCalibrater, calibrate.HistogramCalibrater,
            calibrate.HistogramCollector, qdq_quantizer.QDQQuantizer, base_quantizer.BaseQuantizer]


@contextlib.contextmanager
def _restoring_onnxruntime() -> Iterator[None]:
    """ModelOpt patches onnxruntime.quantization in place (``ort_patching.patch_ort_modules``: the calibrators,
    ``calibrate.create_calibrator``, the QDQ quantizer) and never undoes it; afterwards ONNX Runtime's own
    calibration in the same process collects nothing ("Histogram has not been collected"). Put it all back."""
    from onnxruntime.quantization import calibrate

    saved = [(cls, dict(vars(cls))) for cls in _ort_patch_targets()]
    create = calibrate.create_calibrator
    try:
        yield
    finally:
        calibrate.create_calibrator = create
        for cls, before in saved:
            for name in [n for n in vars(cls) if n not in before]:
                delattr(cls, name)
            for name, value in before.items():
                if vars(cls).get(name) is not value:
                    setattr(cls, name, value)


def quantize_modelopt(fp32_onnx: str | Path, out_path: str | Path, calib: CalibrationSet, *,
                      calibration: str = "percentile", calib_size: int = 512, seed: int = 0,
                      high_precision: str = "fp32") -> dict[str, Any]:
    """ModelOpt INT8 QDQ of ``fp32_onnx`` (its own placement, symmetric int8, float parts ``high_precision``: fp32,
    or fp16 by ModelOpt's own conversion) written to ``out_path``; returns a report dict like ``quantize_onnx``'s
    (quantizer, calibration, census, seconds)."""
    from .census import onnx_census

    mq = _modelopt_quantization()
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    t0 = time.perf_counter()
    sub = calib.subsample(calib_size, seed)
    method = CALIBRATION[calibration]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".modelopt-") as tmp, \
            _quiet_and_without_stub_tensorrt(), _restoring_onnxruntime():
        staged = Path(tmp) / "int8.onnx"
        try:
            mq.quantize(onnx_path=str(fp32_onnx), quantize_mode="int8", calibration_data=np.ascontiguousarray(
                sub.images), calibration_method=method, calibration_eps=["cpu"], high_precision_dtype=high_precision,
                output_path=str(staged), log_level="WARNING")
        except Exception as exc:
            raise CastlingError(f"ModelOpt quantization failed: {str(exc).splitlines()[0][:300]}") from exc
        os.replace(staged, out_path)
    return {
        "quantizer": f"nvidia-modelopt {modelopt_version()} modelopt.onnx.quantization int8 (QDQ, CPU EP)",
        "calibration": {"source": sub.source, "images": len(sub), "data_digest": sub.digest, "method": method,
                        "asked": calibration},
        "census": onnx_census(out_path),
        "seconds": round(time.perf_counter() - t0, 3),
        "path": str(out_path),
    }


def autocast_fp16(fp32_onnx: str | Path, out_path: str | Path, *, keep_policy: bool = True) -> dict[str, Any]:
    """ModelOpt AutoCast to fp16, I/O types kept. With ``keep_policy`` the nodes our policy keeps fp32 (LayerNorm,
    the L2 norms, Softmax, the logits) are excluded; AutoCast's own rules (data ranges) decide the rest."""
    mo = import_optional("modelopt.onnx.autocast", MODELOPT_PIP, "modelopt", "ModelOpt AutoCast")
    import re

    import onnx

    t0 = time.perf_counter()
    names = sorted(policy_fp32_nodes(onnx.load(str(fp32_onnx)))) if keep_policy else []
    with _quiet_and_without_stub_tensorrt(), _restoring_onnxruntime():
        try:
            model = mo.convert_to_mixed_precision(
                str(fp32_onnx), low_precision_type="fp16", keep_io_types=True,
                op_types_to_exclude=list(KEEP_FP32_OPS) if keep_policy else None,
                nodes_to_exclude=[f"^{re.escape(n)}$" for n in names] or None, providers=["cpu"])
        except Exception as exc:
            raise CastlingError(f"ModelOpt AutoCast failed: {str(exc).splitlines()[0][:300]}") from exc
    onnx.save(model, str(out_path))
    return {"converter": f"nvidia-modelopt {modelopt_version()} AutoCast", "keep_policy": keep_policy,
            "excluded_nodes": len(names),
            "seconds": round(time.perf_counter() - t0, 3), "path": str(out_path)}
