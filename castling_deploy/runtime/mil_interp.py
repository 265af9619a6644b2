"""A small reference interpreter for saved Core ML mlprogram packages, in numpy.

Core ML's own ``predict`` exists only on macOS, so Linux CI could never check a ``.mlpackage`` numerically.
This reads the package's MIL program (``model.mlmodel`` protobuf, parsed with coremltools' own proto classes)
and its blob weights (``weights/weight.bin``, read directly: 64-byte metadata record with sentinel 0xDEADBEEF,
then raw data) and runs it op by op with the semantics coremltools defines for each op (``value_inference`` /
``decompress`` in ``coremltools/converters/mil/mil/ops/defs/iOS15..iOS18``).

Precision: every op computes in float32 (or float64 never) from its inputs and rounds its result to the
dtype the program declares for that output, so fp16 programs reproduce per-op fp16 storage rounding (the
real ANE/GPU accumulate differently inside an op; expect agreement, not bit-exactness).
ImageType inputs: for mlprogram models the image scale/bias are ops inside the program (``*__scaled__``,
``*__biased__``), so image inputs are fed as float pixel arrays (N,3,H,W) on the 0..255 scale.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import UsageError
from ..optional import import_optional

_NP_DTYPES = {
    "BOOL": np.bool_, "FLOAT16": np.float16, "FLOAT32": np.float32, "FLOAT64": np.float64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
}
_STR_DTYPES = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "int8": np.int8, "uint8": np.uint8,
               "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "int64": np.int64, "bool": np.bool_}
_BLOB_SENTINEL = 0xDEADBEEF
_BLOB_META = np.dtype([("sentinel", "<u4"), ("mil_dtype", "<u4"), ("size", "<u8"), ("offset", "<u8")])


def _proto():
    proto = import_optional("coremltools.proto", "coremltools", "coreml", "reading Core ML packages")
    return proto.MIL_pb2, proto.Model_pb2


def package_files(path: str | Path) -> tuple[Path, Path]:
    """(model.mlmodel, weights dir) of an .mlpackage, following its Manifest.json."""
    p = Path(path)
    if p.is_file() and p.suffix == ".mlmodel":
        return p, p.parent / "weights"
    manifest = p / "Manifest.json"
    if not manifest.is_file():
        raise UsageError(f"{p}: not an .mlpackage (no Manifest.json)")
    info = json.loads(manifest.read_text())
    root = info.get("rootModelIdentifier")
    entry = info.get("itemInfoEntries", {}).get(root, {})
    model = p / "Data" / entry.get("author", "com.apple.CoreML") / entry.get("path", "model.mlmodel")
    if not model.is_file():
        model = p / "Data" / "com.apple.CoreML" / "model.mlmodel"
    return model, model.parent / "weights"


def load_spec(path: str | Path) -> Any:
    _, Model_pb2 = _proto()
    model_file, _ = package_files(path)
    spec = Model_pb2.Model()
    spec.ParseFromString(model_file.read_bytes())
    if spec.WhichOneof("Type") != "mlProgram":
        raise UsageError(f"{path}: not an mlprogram model ({spec.WhichOneof('Type')}); only mlprogram is interpreted")
    return spec


class _BlobFile:
    """Reads blobs from a MIL weight file (coremltools' storage format v2) without native code."""

    def __init__(self, path: Path) -> None:
        self.buf = np.memmap(path, dtype=np.uint8, mode="r")

    def read(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        meta = np.frombuffer(self.buf, dtype=_BLOB_META, count=1, offset=offset)[0]
        if int(meta["sentinel"]) != _BLOB_SENTINEL:
            raise UsageError(f"corrupt weight blob at offset {offset} (bad sentinel)")
        start, size = int(meta["offset"]), int(meta["size"])
        return np.frombuffer(self.buf[start : start + size].tobytes(), dtype=dtype).reshape(shape).copy()


def _tensor_type(vt: Any) -> tuple[str, tuple[int, ...] | None]:
    MIL_pb2, _ = _proto()
    which = vt.WhichOneof("type")
    if which != "tensorType":
        return which, None
    tt = vt.tensorType
    dims = []
    for d in tt.dimensions:
        dims.append(d.constant.size if d.WhichOneof("dimension") == "constant" else -1)
    return MIL_pb2.DataType.Name(tt.dataType), tuple(dims)


def _np_dtype(name: str) -> Any:
    if name not in _NP_DTYPES:
        raise UsageError(f"MIL dtype {name} is not supported by the reference interpreter")
    return _NP_DTYPES[name]


class MILProgram:
    """A parsed mlprogram: load once, ``run`` many times."""

    def __init__(self, path: str | Path, function: str = "main") -> None:
        self.path = str(path)
        self.spec = load_spec(path)
        _, self.weights_dir = package_files(path)
        self._blobs: dict[str, _BlobFile] = {}
        prog = self.spec.mlProgram
        if function not in prog.functions:
            raise UsageError(f"{path}: no MIL function {function!r} (has {', '.join(prog.functions)})")
        fn = prog.functions[function]
        self.opset = fn.opset
        self.block = fn.block_specializations[fn.opset]
        self.input_names = [i.name for i in fn.inputs]
        self.input_types = {i.name: _tensor_type(i.type) for i in fn.inputs}
        self.output_names = list(self.block.outputs)
        self.description = self.spec.description
        self.image_inputs = {i.name for i in self.spec.description.input if i.type.WhichOneof("Type") == "imageType"}
        self.consts: dict[str, Any] = {}
        self.ops: list[Any] = []
        for op in self.block.operations:
            if op.type == "const":
                self.consts[op.outputs[0].name] = self._value(op.attributes["val"])
            elif op.type.startswith("constexpr_"):
                self.consts[op.outputs[0].name] = self._constexpr(op)
            else:
                self.ops.append(op)
        self.metadata = dict(self.spec.description.metadata.userDefined)

    # ---- values -------------------------------------------------------------------------------------
    def _value(self, v: Any) -> Any:
        dtype_name, shape = _tensor_type(v.type)
        if shape is None:
            raise UsageError(f"{self.path}: MIL value of type {dtype_name} is not supported by the interpreter")
        if v.WhichOneof("value") == "blobFileValue":
            fname = self.weights_dir / v.blobFileValue.fileName.split("/")[-1]
            blob = self._blobs.setdefault(str(fname), _BlobFile(fname))
            return blob.read(v.blobFileValue.offset, _np_dtype(dtype_name), shape)
        t = v.immediateValue.tensor
        kind = t.WhichOneof("value")
        if dtype_name == "STRING":
            vals = list(t.strings.values)
            return vals[0] if shape == () else np.array(vals).reshape(shape)
        if kind == "bytes":
            arr = np.frombuffer(t.bytes.values, dtype=_np_dtype(dtype_name))
        else:
            arr = np.array(list(getattr(t, kind).values), dtype=_np_dtype(dtype_name))
        return arr.reshape(shape)

    def _constexpr(self, op: Any) -> np.ndarray:
        a = {k: self._value(v) for k, v in op.attributes.items() if k != "name"}
        for k, arg in op.inputs.items():  # iOS18 constexpr ops take their operands as inputs
            a[k] = self._arg(arg, {})
        out_dtype = _np_dtype(_tensor_type(op.outputs[0].type)[0])
        if op.type == "constexpr_affine_dequantize":
            data, scale, zp, axis = a["quantized_data"], a["scale"], a["zero_point"], int(a["axis"])
            shape = [1] * data.ndim
            if np.ndim(scale):
                shape[axis] = -1
            deq = (data.astype(np.float32) - np.reshape(zp, shape if np.ndim(zp) else ()).astype(np.float32)) * np.reshape(
                scale, shape if np.ndim(scale) else ()
            ).astype(np.float32)
            return deq.astype(out_dtype)
        if op.type == "constexpr_blockwise_shift_scale":
            data, scale, offset = a["data"].astype(np.float32), a["scale"].astype(np.float32), a.get("offset")
            for ax, (ds, ss) in enumerate(zip(data.shape, scale.shape)):
                if ds // ss > 1:
                    scale = np.repeat(scale, ds // ss, ax)
                    if offset is not None:
                        offset = np.repeat(offset, ds // ss, ax)
            if offset is not None:
                data = data - offset.astype(np.float32)
            return (scale * data).astype(out_dtype)
        if op.type == "constexpr_cast":
            return a["source_val"].astype(out_dtype)
        raise UsageError(f"{self.path}: constexpr op {op.type!r} is not supported by the reference interpreter")

    def _arg(self, arg: Any, env: dict[str, Any]) -> Any:
        vals = []
        for b in arg.arguments:
            if b.WhichOneof("binding") == "name":
                name = b.name
                if name in env:
                    vals.append(env[name])
                elif name in self.consts:
                    vals.append(self.consts[name])
                else:
                    raise UsageError(f"{self.path}: MIL variable {name!r} used before it is defined")
            else:
                vals.append(self._value(b.value))
        return vals[0] if len(vals) == 1 else vals

    # ---- execution ----------------------------------------------------------------------------------
    def run(
        self, inputs: dict[str, np.ndarray], observer: Callable[[str, str, np.ndarray], None] | None = None
    ) -> dict[str, np.ndarray]:
        """Execute the program; ``observer(op_type, var_name, value)`` sees every op output (calibration)."""
        env: dict[str, Any] = {}
        for name in self.input_names:
            if name not in inputs:
                raise UsageError(f"{self.path}: missing input {name!r} (inputs: {', '.join(self.input_names)})")
            dtype_name, shape = self.input_types[name]
            x = np.asarray(inputs[name])
            if shape is not None and -1 not in shape and tuple(x.shape) != shape:
                raise UsageError(f"{self.path}: input {name!r} has shape {tuple(x.shape)}, the program wants {shape}")
            env[name] = x.astype(_np_dtype(dtype_name))
        for op in self.ops:
            fn = OPS.get(op.type)
            if fn is None:
                raise UsageError(f"MIL op {op.type!r} is not supported by the reference interpreter ({self.path})")
            args = {k: self._arg(v, env) for k, v in op.inputs.items()}
            outs = fn(**args)
            if not isinstance(outs, tuple):
                outs = (outs,)
            for spec_out, val in zip(op.outputs, outs):
                dtype_name, _ = _tensor_type(spec_out.type)
                val = np.asarray(val)
                if dtype_name in _NP_DTYPES:
                    val = val.astype(_NP_DTYPES[dtype_name], copy=False)
                env[spec_out.name] = val
                if observer is not None:
                    observer(op.type, spec_out.name, val)
        return {n: env[n] if n in env else self.consts[n] for n in self.output_names}

    def op_histogram(self) -> dict[str, int]:
        return dict(Counter(op.type for op in self.block.operations))


def run_mlpackage(path: str | Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One-shot helper: load and run an mlprogram package."""
    return MILProgram(path).run(inputs)


def op_histogram(path: str | Path) -> dict[str, int]:
    """Op type -> count over the main function (const and constexpr ops included)."""
    return MILProgram(path).op_histogram()


# ---- op semantics (coremltools MIL defs) ----------------------------------------------------------------
def _f(x: Any) -> np.ndarray:
    """Compute dtype: float32 for floats, untouched for ints/bools."""
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype.kind == "f" else x


def _axes(axes: Any, rank: int) -> tuple[int, ...] | None:
    if axes is None:
        return None
    return tuple(int(a) % rank for a in np.atleast_1d(axes))


def _reduce(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def op(x: Any, axes: Any = None, keep_dims: Any = False) -> np.ndarray:
        x = _f(x)
        return fn(x, axis=_axes(axes, x.ndim), keepdims=bool(keep_dims))

    return op


def _conv(x: Any, weight: Any, bias: Any = None, strides: Any = None, pad_type: Any = "valid", pad: Any = None,
          dilations: Any = None, groups: Any = 1) -> np.ndarray:
    x, w = _f(x), _f(weight)
    sp = x.ndim - 2
    strides = [int(s) for s in (strides if strides is not None else [1] * sp)]
    dil = [int(d) for d in (dilations if dilations is not None else [1] * sp)]
    ks = [(k - 1) * d + 1 for k, d in zip(w.shape[2:], dil)]
    pad_type = str(pad_type)
    if pad_type == "custom":
        pads = [int(p) for p in pad]
        pairs = [(pads[2 * i], pads[2 * i + 1]) for i in range(sp)]
    elif pad_type == "valid":
        pairs = [(0, 0)] * sp
    else:  # same / same_lower: output = ceil(in / stride)
        pairs = []
        for i in range(sp):
            n = x.shape[2 + i]
            total = max((math.ceil(n / strides[i]) - 1) * strides[i] + ks[i] - n, 0)
            lo = total // 2 if pad_type == "same" else total - total // 2
            pairs.append((lo, total - lo))
    x = np.pad(x, [(0, 0), (0, 0)] + pairs)
    win = np.lib.stride_tricks.sliding_window_view(x, ks, axis=tuple(range(2, 2 + sp)))
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)]
    win = win[(Ellipsis,) + tuple(slice(None, None, d) for d in dil)]  # (N, C, *out, *k)
    g = int(groups)
    n, c = x.shape[:2]
    cg, og = c // g, w.shape[0] // g
    outs = []
    letters = "hwd"[:sp]
    kl = "klm"[:sp]
    for gi in range(g):
        xs = win[:, gi * cg : (gi + 1) * cg]
        ws = w[gi * og : (gi + 1) * og]
        outs.append(np.einsum(f"nc{letters}{kl},oc{kl}->no{letters}", xs, ws, optimize=True))
    y = np.concatenate(outs, axis=1)
    if bias is not None:
        y = y + _f(bias).reshape((1, -1) + (1,) * sp)
    return y


def _matmul(x: Any, y: Any, transpose_x: Any = False, transpose_y: Any = False) -> np.ndarray:
    x, y = _f(x), _f(y)
    if transpose_x and x.ndim > 1:
        x = np.swapaxes(x, -1, -2)
    if transpose_y and y.ndim > 1:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _linear(x: Any, weight: Any, bias: Any = None) -> np.ndarray:
    y = np.matmul(_f(x), _f(weight).T)
    return y if bias is None else y + _f(bias)


def _layer_norm(x: Any, axes: Any = None, gamma: Any = None, beta: Any = None, epsilon: Any = 1e-5) -> np.ndarray:
    x = _f(x)
    ax = _axes(axes, x.ndim) if axes is not None else tuple(range(x.ndim))
    mean = x.mean(axis=ax, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=ax, keepdims=True)
    y = (x - mean) / np.sqrt(var + np.float32(epsilon))
    if gamma is not None:
        y = y * _f(gamma)
    if beta is not None:
        y = y + _f(beta)
    return y


def _erf(x: np.ndarray) -> np.ndarray:
    """erf in float64 (numpy has none; torch is a core dependency of this package anyway)."""
    import torch

    return torch.erf(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy().astype(np.float32)


def _gelu(x: Any, mode: Any = "EXACT") -> np.ndarray:
    x = _f(x)
    mode = str(mode)
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1 + np.exp(-1.702 * x))
    return 0.5 * x * (1 + _erf(x / np.sqrt(2.0)))


def _softmax(x: Any, axis: Any = -1) -> np.ndarray:
    x = _f(x)
    e = np.exp(x - x.max(axis=int(axis), keepdims=True))
    return e / e.sum(axis=int(axis), keepdims=True)


def _reshape(x: Any, shape: Any) -> np.ndarray:
    x = np.asarray(x)
    shape = [int(s) for s in np.atleast_1d(shape)]
    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]  # iOS17: 0 copies the input dim
    return x.reshape(shape)


def _slice_by_index(x: Any, begin: Any, end: Any, stride: Any = None, begin_mask: Any = None, end_mask: Any = None,
                    squeeze_mask: Any = None) -> np.ndarray:
    from coremltools.converters.mil.mil.ops.defs._utils import solve_slice_by_index_slice

    x = np.asarray(x)
    sl = solve_slice_by_index_slice(x.shape, np.asarray(begin), np.asarray(end), None if stride is None else
                                    np.asarray(stride), None if begin_mask is None else np.asarray(begin_mask),
                                    None if end_mask is None else np.asarray(end_mask),
                                    None if squeeze_mask is None else np.asarray(squeeze_mask))
    y = x[tuple(sl)]
    if squeeze_mask is not None:
        sq = tuple(i for i, m in enumerate(np.atleast_1d(squeeze_mask)) if m)
        if sq:
            y = np.squeeze(y, axis=sq)
    return y


def _slice_by_size(x: Any, begin: Any, size: Any) -> np.ndarray:
    x = np.asarray(x)
    sl = tuple(slice(int(b), None if int(s) == -1 else int(b) + int(s)) for b, s in zip(begin, size))
    return x[sl]


def _concat(values: Any, axis: Any, interleave: Any = False) -> np.ndarray:
    vals = values if isinstance(values, list) else [values]
    if bool(interleave):
        raise UsageError("concat with interleave=True is not supported by the reference interpreter")
    return np.concatenate([np.asarray(v) for v in vals], axis=int(axis))


def _gather(x: Any, indices: Any, axis: Any = 0, batch_dims: Any = 0, validate_indices: Any = False) -> np.ndarray:
    if int(batch_dims):
        raise UsageError("gather with batch_dims > 0 is not supported by the reference interpreter")
    x, idx = np.asarray(x), np.asarray(indices).astype(np.int64)
    ax = int(axis) % x.ndim
    idx = np.where(idx < 0, idx + x.shape[ax], idx)
    return np.take(x, idx, axis=ax)


def _quantize(input: Any, scale: Any, output_dtype: Any, zero_point: Any = None, axis: Any = None) -> np.ndarray:
    x = _f(input)
    dt = _STR_DTYPES[str(output_dtype)]
    s, zp = _bcast(scale, x, axis), None if zero_point is None else _bcast(zero_point, x, axis)
    q = np.round(x / s)  # np.around: round half to even, as coremltools' quantize_by_scale_and_zp
    if zp is not None:
        q = q + zp.astype(np.float32)
    info = np.iinfo(dt)
    return np.clip(q, info.min, info.max).astype(dt)


def _dequantize(input: Any, scale: Any, zero_point: Any = None, axis: Any = None) -> np.ndarray:
    q = np.asarray(input).astype(np.float32)
    if zero_point is not None:
        q = q - _bcast(zero_point, q, axis).astype(np.float32)
    return q * _bcast(scale, q, axis)


def _bcast(p: Any, data: np.ndarray, axis: Any) -> np.ndarray:
    """Promote a per-axis scale / zero point to the data's rank (coremltools' promote_rank_to_same_as_data)."""
    p = np.asarray(p)
    if p.ndim == 0 or p.ndim == data.ndim:
        return p.astype(np.float32) if p.dtype.kind == "f" else p
    shape = [1] * data.ndim
    shape[int(axis) % data.ndim] = -1
    p = p.reshape(shape)
    return p.astype(np.float32) if p.dtype.kind == "f" else p


def _tile(x: Any, reps: Any) -> np.ndarray:
    return np.tile(np.asarray(x), [int(r) for r in np.atleast_1d(reps)])


def _split(x: Any, num_splits: Any = None, split_sizes: Any = None, axis: Any = 0) -> tuple[np.ndarray, ...]:
    x = np.asarray(x)
    if split_sizes is not None:
        return tuple(np.split(x, np.cumsum(np.atleast_1d(split_sizes))[:-1], axis=int(axis)))
    return tuple(np.split(x, int(num_splits), axis=int(axis)))


OPS: dict[str, Callable[..., Any]] = {
    # elementwise binary (numpy broadcasting = MIL broadcasting)
    "add": lambda x, y: _f(x) + _f(y),
    "sub": lambda x, y: _f(x) - _f(y),
    "mul": lambda x, y: _f(x) * _f(y),
    "real_div": lambda x, y: _f(x) / _f(y),
    "floor_div": lambda x, y: np.floor_divide(_f(x), _f(y)),
    "mod": lambda x, y: np.mod(_f(x), _f(y)),
    "pow": lambda x, y: np.power(_f(x), _f(y)),
    "maximum": lambda x, y: np.maximum(_f(x), _f(y)),
    "minimum": lambda x, y: np.minimum(_f(x), _f(y)),
    "equal": lambda x, y: np.equal(x, y),
    "not_equal": lambda x, y: np.not_equal(x, y),
    "less": lambda x, y: np.less(x, y),
    "less_equal": lambda x, y: np.less_equal(x, y),
    "greater": lambda x, y: np.greater(x, y),
    "greater_equal": lambda x, y: np.greater_equal(x, y),
    "logical_and": lambda x, y: np.logical_and(x, y),
    "logical_or": lambda x, y: np.logical_or(x, y),
    "logical_not": lambda x: np.logical_not(x),
    # elementwise unary
    "abs": lambda x: np.abs(_f(x)),
    "sqrt": lambda x: np.sqrt(_f(x)),
    "rsqrt": lambda x, epsilon=1e-12: 1.0 / np.sqrt(_f(x) + np.float32(epsilon)),
    "inverse": lambda x, epsilon=1e-4: 1.0 / (_f(x) + np.float32(epsilon)),
    "exp": lambda x: np.exp(_f(x)),
    "exp2": lambda x: np.exp2(_f(x)),
    "log": lambda x, epsilon=1e-45: np.log(_f(x) + np.float32(epsilon)),
    "square": lambda x: np.square(_f(x)),
    "tanh": lambda x: np.tanh(_f(x)),
    "erf": lambda x: _erf(_f(x)),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-_f(x))),
    "relu": lambda x: np.maximum(_f(x), 0),
    "silu": lambda x: _f(x) / (1.0 + np.exp(-_f(x))),
    "sign": lambda x: np.sign(_f(x)),
    "floor": lambda x: np.floor(_f(x)),
    "ceil": lambda x: np.ceil(_f(x)),
    "round": lambda x: np.round(_f(x)),
    "cos": lambda x: np.cos(_f(x)),
    "sin": lambda x: np.sin(_f(x)),
    "acos": lambda x: np.arccos(_f(x)),
    "clip": lambda x, alpha, beta: np.minimum(np.maximum(_f(x), _f(alpha)), _f(beta)),
    "gelu": _gelu,
    "softmax": _softmax,
    "identity": lambda x: np.asarray(x),
    "cast": lambda x, dtype: np.asarray(x).astype(_STR_DTYPES[str(dtype)]),
    "select": lambda cond, a, b: np.where(np.asarray(cond), a, b),
    # reductions
    "reduce_sum": _reduce(np.sum),
    "reduce_mean": _reduce(np.mean),
    "reduce_max": _reduce(np.max),
    "reduce_min": _reduce(np.min),
    "reduce_prod": _reduce(np.prod),
    "reduce_l2_norm": _reduce(lambda x, axis, keepdims: np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims))),
    "reduce_l1_norm": _reduce(lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims)),
    "reduce_sum_square": _reduce(lambda x, axis, keepdims: np.sum(x * x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum_exp": _reduce(lambda x, axis, keepdims: np.log(np.sum(np.exp(x), axis=axis, keepdims=keepdims))),
    # linear algebra, conv, norms
    "conv": _conv,
    "linear": _linear,
    "matmul": _matmul,
    "layer_norm": _layer_norm,
    # shapes
    "reshape": _reshape,
    "transpose": lambda x, perm: np.transpose(np.asarray(x), [int(p) for p in perm]),
    "concat": _concat,
    "slice_by_index": _slice_by_index,
    "slice_by_size": _slice_by_size,
    "gather": _gather,
    "gather_along_axis": lambda x, indices, axis=0: np.take_along_axis(np.asarray(x), np.asarray(indices).astype(np.int64), int(axis)),
    "expand_dims": lambda x, axes: np.expand_dims(np.asarray(x), tuple(int(a) for a in np.atleast_1d(axes))),
    "squeeze": lambda x, axes=None: np.squeeze(np.asarray(x), None if axes is None else tuple(int(a) for a in np.atleast_1d(axes))),
    "tile": _tile,
    "split": _split,
    "stack": lambda values, axis: np.stack([np.asarray(v) for v in (values if isinstance(values, list) else [values])], int(axis)),
    "shape": lambda x: np.asarray(np.asarray(x).shape, dtype=np.int32),
    "fill": lambda shape, value=0.0: np.full([int(s) for s in shape], value),
    "range_1d": lambda end, start, step: np.arange(start, end, step),
    # activation quantization (iOS17)
    "quantize": _quantize,
    "dequantize": _dequantize,
}
