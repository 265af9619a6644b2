"""LiteRT (TFLite) runner: ``ai_edge_litert`` Interpreter on CPU (XNNPACK), ``tflite_runtime`` only as fallback.

Handles what the app side of a .tflite must handle: int8 I/O (quantize the image, dequantize the logits with the
tensor's scale/zero point), NCHW vs NHWC input as the model declares it, and batches larger than the model's.
"""
from __future__ import annotations

from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingDependencyError, UsageError


def _load_interpreter_class() -> tuple[Any, str]:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, f"ai-edge-litert {_version('ai-edge-litert')}"
    except ImportError:
        pass
    try:  # abandoned at 2.14 (numpy<2, old op versions): only used when it is all there is
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, f"tflite-runtime {_version('tflite-runtime')} (fallback; prefer ai-edge-litert)"
    except ImportError as exc:
        raise MissingDependencyError("ai-edge-litert", "tflite", "running .tflite models") from exc


def _version(dist: str) -> str:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return "?"


def _quantize(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero = detail["quantization"]
    if not scale:
        raise UsageError(f"input {detail['name']} is {np.dtype(detail['dtype']).name} without a scale; cannot feed images")
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(detail["dtype"])


def _dequantize(y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    if np.issubdtype(y.dtype, np.floating):
        return y.astype(np.float32)
    scale, zero = detail["quantization"]
    return ((y.astype(np.float32) - zero) * (scale or 1.0)).astype(np.float32)


class LiteRTRunner:
    """Run a .tflite classifier: NCHW float32 normalized images in, float32 logits (N, classes) out."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        interpreter_cls, runtime = _load_interpreter_class()
        self.path = str(path)
        if not Path(path).is_file():
            raise UsageError(f"{path}: no such .tflite file")
        try:
            self.interpreter = interpreter_cls(model_path=self.path, num_threads=threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise UsageError(f"{path}: LiteRT cannot load this model ({str(exc).splitlines()[0][:200]})") from exc
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise UsageError(f"{path}: expected one input and one output, found {len(inputs)} and {len(outputs)}")
        self._in, self._out = inputs[0], outputs[0]
        shape = [int(d) for d in self._in["shape"]]
        if len(shape) != 4 or 3 not in (shape[1], shape[3]):
            raise UsageError(f"{path}: input shape {shape} is not an RGB image batch (NCHW or NHWC)")
        self.layout = "NCHW" if shape[1] == 3 else "NHWC"
        self.model_batch = shape[0]
        sig = self._in.get("shape_signature")
        self.dynamic_batch = sig is not None and len(sig) and int(sig[0]) == -1
        self.threads = threads
        self.name = f"{runtime} Interpreter CPU/XNNPACK threads={threads or 'default'}"

    @property
    def input_details(self) -> list[dict[str, Any]]:
        return self.interpreter.get_input_details()

    @property
    def output_details(self) -> list[dict[str, Any]]:
        return self.interpreter.get_output_details()

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        if self.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        if not np.issubdtype(self._in["dtype"], np.floating):
            x = _quantize(x, self._in)
        self.interpreter.set_tensor(self._in["index"], np.ascontiguousarray(x, dtype=self._in["dtype"]))
        self.interpreter.invoke()
        return _dequantize(self.interpreter.get_tensor(self._out["index"]), self._out)

    def _resize(self, n: int) -> None:
        shape = [int(d) for d in self._in["shape"]]
        shape[0] = n
        self.interpreter.resize_tensor_input(self._in["index"], shape)
        self.interpreter.allocate_tensors()
        self._in, self._out = self.interpreter.get_input_details()[0], self.interpreter.get_output_details()[0]

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 3:
            raise UsageError(f"expected NCHW float32 images (N, 3, H, W), got shape {x.shape}")
        n = x.shape[0]
        if n == int(self._in["shape"][0]):
            return self._invoke(x).reshape(n, -1)
        if self.dynamic_batch:
            self._resize(n)
            return self._invoke(x).reshape(n, -1)
        # Static batch (litert-torch bakes batch 1 into reshapes): loop in model-sized chunks.
        b = self.model_batch
        if n % b:
            raise UsageError(f"batch {n} is not a multiple of the model's fixed batch {b}")
        return np.concatenate([self._invoke(x[i : i + b]).reshape(b, -1) for i in range(0, n, b)], axis=0)
