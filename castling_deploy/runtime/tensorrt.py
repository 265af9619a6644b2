"""TensorRT engine runner (``execute_async_v3`` with tensor addresses: TensorRT 10.x and 11.x). Needs a CUDA GPU.

Only API that TensorRT 11 kept is used (tests/test_tensorrt_api.py checks it against the stubs and the 11.x removals).
The engines built here keep fp32 I/O (the typed ONNX files keep their exported I/O types); other I/O is refused.

Device buffers come from torch.cuda when torch has CUDA, else from cuda-python (``cuda.cudart``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CastlingError, MissingDependencyError, UsageError
from ..optional import import_optional


class _TorchCuda:
    """Buffers and a stream through torch.cuda."""

    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch has no CUDA device")
        self.torch = torch
        self.stream = torch.cuda.Stream()

    def run(self, context: Any, inp: str, out: str, x: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
        t = self.torch
        dx = t.from_numpy(x).cuda()
        dy = t.empty(out_shape, dtype=t.float32, device="cuda")
        context.set_tensor_address(inp, dx.data_ptr())
        context.set_tensor_address(out, dy.data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise CastlingError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()
        return dy.cpu().numpy()


class _CudaPython:
    """Buffers and a stream through cuda-python's runtime API."""

    def __init__(self) -> None:
        from cuda import cudart

        self.cudart = cudart
        err, self.stream = cudart.cudaStreamCreate()
        self._check(err, "cudaStreamCreate")

    def _check(self, err: Any, what: str) -> None:
        if int(err) != 0:
            raise CastlingError(f"CUDA call {what} failed with error {int(err)}")

    def run(self, context: Any, inp: str, out: str, x: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
        c = self.cudart
        y = np.empty(out_shape, dtype=np.float32)
        err, dx = c.cudaMalloc(x.nbytes)
        self._check(err, "cudaMalloc")
        err, dy = c.cudaMalloc(y.nbytes)
        self._check(err, "cudaMalloc")
        try:
            kind = c.cudaMemcpyKind
            self._check(c.cudaMemcpyAsync(dx, x.ctypes.data, x.nbytes, kind.cudaMemcpyHostToDevice, self.stream)[0],
                        "cudaMemcpyAsync")
            context.set_tensor_address(inp, int(dx))
            context.set_tensor_address(out, int(dy))
            if not context.execute_async_v3(int(self.stream)):
                raise CastlingError("TensorRT execute_async_v3 failed")
            self._check(c.cudaMemcpyAsync(y.ctypes.data, dy, y.nbytes, kind.cudaMemcpyDeviceToHost, self.stream)[0],
                        "cudaMemcpyAsync")
            self._check(c.cudaStreamSynchronize(self.stream)[0], "cudaStreamSynchronize")
        finally:
            c.cudaFree(dx)
            c.cudaFree(dy)
        return y


class TensorRTRunner:
    """Runner protocol over a serialized engine (``.engine`` / ``.plan``) with one input and one output."""

    def __init__(self, path: str | Path) -> None:
        trt = import_optional("tensorrt", "tensorrt", "tensorrt", "running TensorRT engines")
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"{p}: no such TensorRT engine")
        self.path = str(p)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(p.read_bytes())
        if self.engine is None:
            raise UsageError(f"{p}: TensorRT {trt.__version__} cannot load this engine (built for another "
                             "GPU or TensorRT version? rebuild it on this device)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise UsageError(f"{p}: expected one input and one output, found {inputs} / {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        for n in (self.input_name, self.output_name):
            if self.engine.get_tensor_dtype(n) != trt.DataType.FLOAT:
                raise UsageError(f"{p}: I/O tensor {n!r} is {self.engine.get_tensor_dtype(n)}, not FLOAT; build the "
                                 "engine from this project's typed ONNX, whose inputs and outputs stay fp32")
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        self.context = self.engine.create_execution_context()
        try:
            self._backend: Any = _TorchCuda()
        except Exception:
            try:
                self._backend = _CudaPython()
            except ImportError as exc:
                raise MissingDependencyError("cuda-python", "tensorrt", "TensorRT device buffers") from exc
        self.name = f"tensorrt {trt.__version__}"

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        outs = []
        for i in range(0, len(x), self.max_batch):  # the engine's profile caps the batch
            chunk = np.ascontiguousarray(x[i : i + self.max_batch])
            if not self.context.set_input_shape(self.input_name, chunk.shape):
                raise UsageError(f"input shape {chunk.shape} is outside the engine's optimization profile")
            out_shape = tuple(self.context.get_tensor_shape(self.output_name))
            outs.append(self._backend.run(self.context, self.input_name, self.output_name, chunk, out_shape))
        return np.concatenate(outs, axis=0).astype(np.float32, copy=False)
