"""On-device loaders for LiteRT (.tflite), TensorRT 10 (.engine/.plan) and Core ML (.mlpackage, macOS).

SELF-CONTAINED like remote_runner.py, whose text precedes this one on the device (it provides RuntimeMissing,
_numpy and _dist_version). Each class: ``.shape`` (NCHW, None = dynamic), ``.name``, ``.runtime``,
``.version``, ``.run(x: NCHW float32) -> float32 logits``. The TensorRT part follows the TensorRT 10 tensor API
(``num_io_tensors``/``get_tensor_*``/``set_input_shape``/``set_tensor_address``/``execute_async_v3``); TensorRT 11
dropped weak typing but kept this runtime API, so engines from either run here.
"""
import json
import os
import sys

if "RuntimeMissing" not in globals():  # imported on the host (tests); on the device the runner text precedes
    from castling_deploy.devices.remote_runner import RuntimeMissing, UsageProblem, _dist_version, _numpy


class LiteModel:
    """Mirrors the host's LiteRTRunner: NCHW float in; int8 I/O, NHWC and fixed batches handled here."""

    kind = "tflite"

    def __init__(self, path, threads):
        try:
            from ai_edge_litert.interpreter import Interpreter
            self.runtime = "ai-edge-litert"
        except ImportError:
            try:
                from tflite_runtime.interpreter import Interpreter
                self.runtime = "tflite-runtime"
            except ImportError:
                raise RuntimeMissing("ai_edge_litert", "ai-edge-litert")
        self.version = _dist_version(self.runtime)
        self.it = Interpreter(model_path=path, num_threads=threads)
        self.it.allocate_tensors()
        self._in, self._out = self.it.get_input_details()[0], self.it.get_output_details()[0]
        shape = [int(d) for d in self._in["shape"]]
        self.nhwc = len(shape) == 4 and shape[3] == 3 and shape[1] != 3
        sig = self._in.get("shape_signature")
        self.dynamic = sig is not None and len(sig) > 0 and int(sig[0]) == -1
        nchw = [shape[0], shape[3], shape[1], shape[2]] if self.nhwc else shape
        self.shape = [None if self.dynamic else nchw[0]] + nchw[1:]
        self.model_batch = shape[0]
        self.name = "%s %s Interpreter CPU/XNNPACK threads=%s" % (self.runtime, self.version, threads or "default")

    def _invoke(self, x):
        np = _numpy()
        if self.nhwc:
            x = x.transpose(0, 2, 3, 1)
        d = self._in
        if not np.issubdtype(d["dtype"], np.floating):
            scale, zero = d["quantization"]
            info = np.iinfo(d["dtype"])
            x = np.clip(np.round(x / scale) + zero, info.min, info.max)
        self.it.set_tensor(d["index"], np.ascontiguousarray(x, dtype=d["dtype"]))
        self.it.invoke()
        y = self.it.get_tensor(self._out["index"])
        if not np.issubdtype(y.dtype, np.floating):
            scale, zero = self._out["quantization"]
            y = (y.astype(np.float32) - zero) * (scale or 1.0)
        return y.astype(np.float32)

    def run(self, x):
        n = x.shape[0]
        if n != int(self._in["shape"][0]) and self.dynamic:
            shape = [int(d) for d in self._in["shape"]]
            shape[0] = n
            self.it.resize_tensor_input(self._in["index"], shape)
            self.it.allocate_tensors()
            self._in, self._out = self.it.get_input_details()[0], self.it.get_output_details()[0]
        if n == int(self._in["shape"][0]):
            return self._invoke(x).reshape(n, -1)
        b = self.model_batch
        if n % b:
            raise UsageProblem("batch %d is not a multiple of the model's fixed batch %d" % (n, b))
        np = _numpy()
        return np.concatenate([self._invoke(x[i:i + b]).reshape(b, -1) for i in range(0, n, b)], axis=0)


class _TorchCuda:
    def __init__(self):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch has no CUDA device")
        self.torch, self.stream = torch, torch.cuda.Stream()

    def run(self, context, names, x, out_shape, out_dtype):
        t, np = self.torch, _numpy()
        dx = t.from_numpy(x).cuda()
        dy = t.empty(tuple(out_shape), dtype=getattr(t, np.dtype(out_dtype).name), device="cuda")
        context.set_tensor_address(names[0], dx.data_ptr())
        context.set_tensor_address(names[1], dy.data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()
        return dy.cpu().numpy()


class _CudaPython:
    def __init__(self):
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python
        self.rt = cudart
        self.stream = self._ok(cudart.cudaStreamCreate(), "cudaStreamCreate")

    def _ok(self, res, what):
        err = res[0] if isinstance(res, tuple) else res
        if int(err) != 0:
            raise RuntimeError("CUDA %s failed with error %d" % (what, int(err)))
        return res[1] if isinstance(res, tuple) and len(res) > 1 else None

    def run(self, context, names, x, out_shape, out_dtype):
        rt, np = self.rt, _numpy()
        y = np.empty(tuple(out_shape), dtype=out_dtype)
        dx = self._ok(rt.cudaMalloc(x.nbytes), "cudaMalloc")
        dy = self._ok(rt.cudaMalloc(y.nbytes), "cudaMalloc")
        try:
            kind = rt.cudaMemcpyKind
            self._ok(rt.cudaMemcpyAsync(dx, x.ctypes.data, x.nbytes, kind.cudaMemcpyHostToDevice, self.stream), "H2D")
            context.set_tensor_address(names[0], int(dx))
            context.set_tensor_address(names[1], int(dy))
            if not context.execute_async_v3(int(self.stream)):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            self._ok(rt.cudaMemcpyAsync(y.ctypes.data, dy, y.nbytes, kind.cudaMemcpyDeviceToHost, self.stream), "D2H")
            self._ok(rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        finally:
            rt.cudaFree(dx)
            rt.cudaFree(dy)
        return y


def _trt_nptype(trt, dtype):
    np = _numpy()
    if hasattr(trt, "nptype"):
        return np.dtype(trt.nptype(dtype))
    names = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
             "BOOL": np.bool_, "UINT8": np.uint8}
    return np.dtype(names[str(dtype).split(".")[-1]])


class TrtModel:
    """One input, one output engine; the batch may be dynamic within profile 0."""

    kind = "tensorrt"

    def __init__(self, path, threads):
        try:
            import tensorrt as trt
        except ImportError:
            raise RuntimeMissing("tensorrt", "tensorrt")
        self.trt, self.runtime, self.version = trt, "tensorrt", trt.__version__
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._rt = trt.Runtime(self._logger)
        with open(path, "rb") as fh:
            self.engine = self._rt.deserialize_cuda_engine(fh.read())
        if self.engine is None:
            raise UsageProblem("TensorRT %s cannot load this engine (built for another GPU or TensorRT version? "
                               "rebuild it on this device)" % trt.__version__)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(ins) != 1 or len(outs) != 1:
            raise UsageProblem("expected one input and one output, found %s / %s" % (ins, outs))
        self.names = (ins[0], outs[0])
        dims = [int(d) for d in self.engine.get_tensor_shape(ins[0])]
        self.max_batch = dims[0]
        if dims[0] < 0:
            self.max_batch = int(self.engine.get_tensor_profile_shape(ins[0], 0)[2][0])
        self.shape = [None if dims[0] < 0 else dims[0]] + [d if d > 0 else None for d in dims[1:]]
        self.in_dtype = _trt_nptype(trt, self.engine.get_tensor_dtype(ins[0]))
        self.out_dtype = _trt_nptype(trt, self.engine.get_tensor_dtype(outs[0]))
        self.context = self.engine.create_execution_context()
        try:
            self.cuda = _TorchCuda()
        except Exception:
            try:
                self.cuda = _CudaPython()
            except ImportError:
                raise RuntimeMissing("cuda-python", "cuda-python")
        self.name = "tensorrt %s" % trt.__version__

    def run(self, x):
        np = _numpy()
        outs = []
        for i in range(0, len(x), self.max_batch):
            chunk = np.ascontiguousarray(x[i:i + self.max_batch], dtype=self.in_dtype)
            if not self.context.set_input_shape(self.names[0], tuple(chunk.shape)):
                raise UsageProblem("input shape %s is outside the engine's optimization profile" % (chunk.shape,))
            out_shape = tuple(self.context.get_tensor_shape(self.names[1]))
            outs.append(self.cuda.run(self.context, self.names, chunk, out_shape, self.out_dtype))
        return np.concatenate(outs, axis=0).astype(np.float32)


class CoreMLModel:
    """MLModel.predict (macOS only). Image inputs get pixels (x*std+mean)*255 from the package metadata."""

    kind = "coreml"

    def __init__(self, path, threads):
        if sys.platform != "darwin":
            raise UsageProblem("Core ML prediction needs macOS; this device is %s" % sys.platform)
        try:
            import coremltools as ct
        except ImportError:
            raise RuntimeMissing("coremltools", "coremltools")
        self.model = ct.models.MLModel(path)
        desc = self.model.get_spec().description
        inp = desc.input[0]
        self.input_name = inp.name
        self.is_image = inp.type.WhichOneof("Type") == "imageType"
        outs = [o.name for o in desc.output]
        self.output_name = "logits" if "logits" in outs else outs[0]
        md = dict(desc.metadata.userDefined)
        self.mean = json.loads(md.get("castling.mean", "[0.0, 0.0, 0.0]"))
        self.std = json.loads(md.get("castling.std", "[1.0, 1.0, 1.0]"))
        if self.is_image:
            self.shape = [1, 3, int(inp.type.imageType.height), int(inp.type.imageType.width)]
        else:
            self.shape = [int(d) for d in inp.type.multiArrayType.shape]
        self.runtime, self.version = "coremltools", ct.__version__
        self.name = "coremltools %s MLModel.predict (%s)" % (ct.__version__, os.uname().machine)

    def _one(self, x):
        np = _numpy()
        if self.is_image:
            from PIL import Image

            m = np.asarray(self.mean, np.float32).reshape(3, 1, 1)
            s = np.asarray(self.std, np.float32).reshape(3, 1, 1)
            pix = np.clip(np.round((x[0] * s + m) * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)
            feed = Image.fromarray(pix, "RGB")
        else:
            feed = x
        out = self.model.predict({self.input_name: feed})[self.output_name]
        return np.asarray(out, dtype=np.float32).reshape(1, -1)

    def run(self, x):
        np = _numpy()
        return np.concatenate([self._one(x[i:i + 1]) for i in range(len(x))], axis=0)
