"""LiteRT / TFLite target: torch -> .tflite (fp32, fp16 weights, hybrid INT8, full-integer) without TensorFlow.

Routes (docs/architecture.md, "LiteRT"):
- fp32 / fp16: litert-torch converts the torch model; fp16 then casts FC/conv weights with ai-edge-quantizer.
- int8: litert-torch's PT2EQuantizer (per-channel weights, calibrated activations) -> a hybrid model:
  linears run in int8; norms and the attention BATCH_MATMULs stay float (benchmarks/results/litert_ceiling.md).
  The patch-embedding conv is left float because quantizing it behind an int8 graph input measured cosine 0.98
  instead of 0.999 (castling_nano).
- full_integer: the fp32 file of the model with its norms written as ``x*rsqrt(sum(x*x))`` and spelled with ops
  XNNPACK runs in int8 (full_integer.py) -> ai-edge-quantizer ``static_wi8_ai8`` (BATCH_MATMUL activations
  symmetric) with global min/max calibration (its default moving average clips), each range then narrowed to
  its MSE-optimal clip.

Every artifact carries the signature ``serving_default(images) -> logits`` and our metadata as TFLite
``metadata`` entries (name -> UTF-8 bytes in a buffer), readable by any flatbuffer reader.
"""
from __future__ import annotations

import collections
import copy
import importlib
import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from ...errors import UsageError
from ...optional import import_optional
from ...output import atomic_write_bytes

MODES = ("fp32", "fp16", "int8", "full_integer")
IO_DTYPES = ("float32", "int8")
SIGNATURE = "serving_default"
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# Metadata names the converter/runtime own; user keys may not shadow them.
RESERVED_METADATA = frozenset(
    {"min_runtime_version", "CONVERSION_METADATA", "TFLITE_METADATA", "keep_stablehlo_constant"}
)
NORM_REWRITE_ATOL = 1e-4
# PT2E leaves modules whose path ends with one of these in float (see module docstring).
_PT2E_FLOAT_MODULES = ("patch_embed.proj",)


class _NamedIO(nn.Module):
    """Gives the exported signature readable names: ``images`` in, ``logits`` out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {OUTPUT_NAME: self.model(images)}


def _import_litert_torch() -> Any:
    return import_optional("litert_torch", "litert-torch", "tflite", "TFLite export")


def _import_quantizer() -> Any:
    """litert-quantizer (the maintained successor, same API), else ai-edge-quantizer."""
    try:
        import litert_quantizer

        return litert_quantizer
    except ImportError:
        return import_optional("ai_edge_quantizer", "litert-quantizer", "tflite", "TFLite fp16/full-integer quantization")


def _import_flatbuffer_utils() -> Any:
    return import_optional("ai_edge_litert.tools.flatbuffer_utils", "ai-edge-litert", "tflite", "reading .tflite files")


def _version(dist: str) -> str:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return "absent"


def _sample(img_size: int) -> torch.Tensor:
    return torch.zeros(1, 3, img_size, img_size, dtype=torch.float32)


def _check_calib(calib_images: np.ndarray | None, img_size: int, mode: str) -> np.ndarray:
    if calib_images is None or len(calib_images) == 0:
        raise UsageError(f"TFLite {mode} needs calibration images; pass --calib DIR")
    calib = np.ascontiguousarray(calib_images, dtype=np.float32)
    if calib.ndim != 4 or calib.shape[1:] != (3, img_size, img_size):
        raise UsageError(f"calibration images have shape {calib.shape}; expected (N, 3, {img_size}, {img_size})")
    return calib


# --------------------------------------------------------------------------------------------- conversions
def litert_float(module: nn.Module, sample: dict[str, torch.Tensor]) -> bytes:
    """A float .tflite of ``module`` traced with keyword inputs ``sample`` (any module, not only a ViT)."""
    return bytes(_import_litert_torch().convert(module.eval(), sample_kwargs=sample).model_content())


def _convert_float(model: nn.Module, img_size: int) -> bytes:
    return litert_float(_NamedIO(model), {INPUT_NAME: _sample(img_size)})


def _fp16_weights(fp32_tflite: bytes) -> bytes:
    """Cast FC/conv weights to float16 (compute stays float32: the runtime dequantizes once at load)."""
    pkg = _import_quantizer().__name__
    algorithm_manager = importlib.import_module(f"{pkg}.algorithm_manager")
    qtyping = importlib.import_module(f"{pkg}.qtyping")
    quantizer = importlib.import_module(f"{pkg}.quantizer")
    from .full_integer import _quiet_kwargs

    qt = quantizer.Quantizer(bytearray(fp32_tflite))
    fp16 = qtyping.TensorQuantizationConfig(num_bits=16, dtype=qtyping.TensorDataType.FLOAT)
    config = qtyping.OpQuantizationConfig(
        weight_tensor_config=fp16, compute_precision=qtyping.ComputePrecision.FLOAT, explicit_dequantize=True
    )
    for op in ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D"):
        qt.update_quantization_recipe(
            regex=".*",
            operation_name=qtyping.TFLOperationName[op],
            op_config=config,
            algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING,
        )
    return bytes(qt.quantize(**_quiet_kwargs(qt.quantize)).quantized_model)


def _pt2e_quantizer() -> Any:
    """litert-torch's PT2EQuantizer, minus the modules we keep float."""
    from litert_torch.quantize import pt2e_quantizer as pq

    class CastlingPT2EQuantizer(pq.PT2EQuantizer):
        def _annotate_all_static_patterns(self, model, quantization_config, filter_fn=None):  # type: ignore[override]
            def keep(node: torch.fx.Node) -> bool:
                stack = node.meta.get("nn_module_stack") or {}
                if any(str(path).endswith(_PT2E_FLOAT_MODULES) for path, _ in stack.values()):
                    return False
                return filter_fn is None or filter_fn(node)

            return super()._annotate_all_static_patterns(model, quantization_config, keep)

    return CastlingPT2EQuantizer().set_global(pq.get_symmetric_quantization_config(is_per_channel=True))


def litert_pt2e_int8(module: nn.Module, sample: dict[str, torch.Tensor],
                     calib: Iterable[dict[str, torch.Tensor]]) -> bytes:
    """The hybrid PT2E int8 .tflite of ``module`` (our quantizer), calibrated on the keyword-input batches ``calib``."""
    litert_torch = _import_litert_torch()
    from litert_torch.quantize import quant_config as qcfg
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = _pt2e_quantizer()
    graph = torch.export.export(module.eval(), (), sample).module()
    graph = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for batch in calib:
            graph(**batch)
    graph = convert_pt2e(graph, fold_quantize=False)
    move_exported_model_to_eval(graph)
    graph.training = False  # litert-torch checks the flag; the graph itself is already in eval form
    edge = litert_torch.convert(graph, sample_kwargs=sample, quant_config=qcfg.QuantConfig(pt2e_quantizer=quantizer))
    return bytes(edge.model_content())


def _convert_int8_pt2e(model: nn.Module, calib: np.ndarray, img_size: int) -> bytes:
    batches = ({INPUT_NAME: torch.from_numpy(img[None])} for img in calib)  # batch 1, as the artifact will run
    return litert_pt2e_int8(_NamedIO(model), {INPUT_NAME: _sample(img_size)}, batches)


def rsqrt_norm_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose Castling norms use the quantizable ``x*rsqrt(sum(x*x))`` spelling."""
    rewritten = copy.deepcopy(model).eval()
    for attn in rewritten.castling_attentions():
        attn.norm_form = "rsqrt"
    return rewritten


def _convert_full_integer(model: nn.Module, calib: np.ndarray, img_size: int, io_dtype: str,
                          info: dict[str, Any], class_token_int16: bool = True) -> tuple[bytes, float]:
    from . import full_integer as fi
    from .requant import fold_requantize

    rewritten, notes = fi.quantizable_copy(model)
    diff = fi.max_abs_logit_diff(model, rewritten, calib)
    if diff > NORM_REWRITE_ATOL:
        raise RuntimeError(f"full-integer graph rewrite changed logits by {diff:.3g} (> {NORM_REWRITE_ATOL}); not exporting")
    fp32 = _convert_float(rewritten, img_size)
    quantized, tool, ranges = fi.quantize_static_int8(fp32, calib, class_token_int16)
    quantized, requant = fold_requantize(quantized)
    info["float_twin"] = fp32  # bytes, for the per-tensor error trace; callers pop it before writing JSON
    info["quantizer"] = f"{tool} {_version(tool)}"
    info["activation_ranges"] = ranges
    info["notes"].append(f"{tool} static_wi8_ai8 (BATCH_MATMUL activations symmetric), global min/max "
                         f"calibration, then MSE-optimal clips ({ranges['clipped']} of {ranges['tensors']} "
                         f"activation ranges narrowed); {requant['quantize_before'] - requant['quantize_after']} "
                         "int8->int8 QUANTIZE ops folded into their neighbours (requant.py); " + "; ".join(notes))
    n16 = sum(ranges["int16_ops"].values())
    info["notes"].append(f"class-token path 16x8: {n16} single-token ops with int16 activations and int8 weights "
                         "(builtin kernels)" if n16 else "every activation int8 (--strict-int8 or no class-token path)")
    if io_dtype == "float32":
        quantized = _float_io(quantized)
    return quantized, diff


# ------------------------------------------------------------------------------------- flatbuffer editing
def _opcode_index(fb: Any, model: Any, builtin: int) -> int:
    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            return i
    code = fb.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, 127)
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _float_io(tflite: bytes) -> bytes:
    """Give an int8-I/O model float32 I/O: QUANTIZE after each int8 input, DEQUANTIZE before each int8 output.

    Same as TFLite's ``inference_input_type=float``: the app feeds normalized floats, int8 math inside.
    """
    fb = _import_flatbuffer_utils()
    model = fb.read_model_from_bytearray(bytearray(tflite))
    sub = model.subgraphs[0]
    quant = _opcode_index(fb, model, fb.BuiltinOperator.QUANTIZE)
    dequant = _opcode_index(fb, model, fb.BuiltinOperator.DEQUANTIZE)
    remap: dict[int, int] = {}

    def float_twin(idx: int) -> int:
        old = sub.tensors[idx]
        new = fb.TensorT()
        new.name = old.name
        old.name = _decode(old.name) + "_int8"
        new.type = fb.TensorType.FLOAT32
        new.shape = list(old.shape)
        new.shapeSignature = list(old.shapeSignature) if old.shapeSignature is not None else None
        model.buffers.append(fb.BufferT())
        new.buffer = len(model.buffers) - 1
        sub.tensors.append(new)
        remap[idx] = len(sub.tensors) - 1
        return remap[idx]

    head, tail = [], []
    for pos, idx in enumerate(sub.inputs):
        if sub.tensors[idx].type == fb.TensorType.INT8:
            op = fb.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = quant, [float_twin(idx)], [idx]
            head.append(op)
            sub.inputs[pos] = remap[idx]
    for pos, idx in enumerate(sub.outputs):
        if sub.tensors[idx].type == fb.TensorType.INT8:
            op = fb.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = dequant, [idx], [float_twin(idx)]
            tail.append(op)
            sub.outputs[pos] = remap[idx]
    sub.operators = head + list(sub.operators) + tail
    for sig in model.signatureDefs or []:
        if sig.subgraphIndex == 0:
            for entry in list(sig.inputs or []) + list(sig.outputs or []):
                entry.tensorIndex = remap.get(entry.tensorIndex, entry.tensorIndex)
    return bytes(fb.convert_object_to_bytearray(model))


def _embed_metadata(tflite: bytes, entries: dict[str, str]) -> bytes:
    fb = _import_flatbuffer_utils()
    from ai_edge_litert import schema_py_generated as schema

    model = fb.read_model_from_bytearray(bytearray(tflite))
    model.metadata = list(model.metadata or [])
    kept = [m for m in model.metadata if _decode(m.name) not in entries]
    for name, value in entries.items():
        buf = fb.BufferT()
        buf.data = np.frombuffer(str(value).encode("utf-8"), dtype=np.uint8).copy()
        model.buffers.append(buf)
        meta = schema.MetadataT()
        meta.name, meta.buffer = name, len(model.buffers) - 1
        kept.append(meta)
    model.metadata = kept
    return bytes(fb.convert_object_to_bytearray(model))


def _decode(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def _read_model(path: str | Path) -> Any:
    fb = _import_flatbuffer_utils()
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such .tflite file")
    try:
        return fb.read_model_from_bytearray(bytearray(p.read_bytes()))
    except Exception as exc:  # flatbuffers raises assorted struct/index errors on garbage
        raise UsageError(f"{p}: not a readable TFLite flatbuffer ({exc})") from exc


def read_tflite_metadata(path: str | Path) -> dict[str, str]:
    """Our metadata entries (name -> UTF-8 string); converter-owned entries are left out."""
    model = _read_model(path)
    out: dict[str, str] = {}
    for meta in model.metadata or []:
        name = _decode(meta.name)
        if name in RESERVED_METADATA:
            continue
        data = model.buffers[meta.buffer].data
        try:
            out[name] = bytes(np.asarray(data, dtype=np.uint8)).decode("utf-8") if data is not None else ""
        except UnicodeDecodeError:
            continue
    return out


# --------------------------------------------------------------------------------------------- census
def tflite_census(path: str | Path) -> dict[str, Any]:
    """What the artifact really computes in: tensor dtypes, builtin ops, float activations left inside."""
    fb = _import_flatbuffer_utils()
    model = _read_model(path)
    type_names = {v: k.lower() for k, v in vars(fb.TensorType).items() if not k.startswith("_")}
    op_names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    dtypes: collections.Counter[str] = collections.Counter()
    act_dtypes: collections.Counter[str] = collections.Counter()
    ops: collections.Counter[str] = collections.Counter()
    float_acts = 0
    io_dtypes: dict[str, list[str]] = {"inputs": [], "outputs": []}
    for si, sub in enumerate(model.subgraphs):
        io = set(sub.inputs or []) | set(sub.outputs or [])
        if si == 0:
            io_dtypes["inputs"] = [type_names.get(sub.tensors[i].type, "?") for i in sub.inputs]
            io_dtypes["outputs"] = [type_names.get(sub.tensors[i].type, "?") for i in sub.outputs]
        for ti, t in enumerate(sub.tensors):
            name = type_names.get(t.type, str(t.type))
            dtypes[name] += 1
            buf = model.buffers[t.buffer] if t.buffer < len(model.buffers) else None
            constant = buf is not None and buf.data is not None and len(buf.data) > 0
            if not constant:
                act_dtypes[name] += 1
                if name in ("float32", "float16") and ti not in io:
                    float_acts += 1
        for op in sub.operators:
            code = model.operatorCodes[op.opcodeIndex]
            ops[op_names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")] += 1
    total_ops = sum(ops.values())
    return {
        "tensor_dtypes": dict(dtypes.most_common()),
        "activation_dtypes": dict(act_dtypes.most_common()),
        "ops": dict(ops.most_common()),
        "num_ops": total_ops,
        "io_dtypes": io_dtypes,
        "float_activation_tensors_excluding_io": float_acts,
        "int8_tensor_fraction": round(dtypes.get("int8", 0) / max(1, sum(dtypes.values())), 4),
    }


# ------------------------------------------------------------------------------------------ entry point
def _write_atomic(data: bytes, out_path: Path) -> None:
    atomic_write_bytes(out_path, data)


def convert_tflite(
    model: nn.Module,
    out_path: Path,
    *,
    mode: str,
    calib_images: np.ndarray | None,
    img_size: int,
    io_dtype: str = "float32",
    metadata: dict[str, str] | None = None,
    class_token_int16: bool = True,
) -> dict[str, Any]:
    """Convert a deploy-form CastlingViT (NCHW float32, batch 1) to ``out_path`` and describe what was built.

    ``io_dtype`` matters for ``full_integer`` only: "float32" keeps float I/O (QUANTIZE/DEQUANTIZE at the
    edges, the app feeds normalized floats); "int8" makes the graph input/output int8 (the app quantizes the
    normalized image and dequantizes the logits with the scale/zero point in the tensor details).
    ``class_token_int16`` matters for ``full_integer`` only: the class-token path runs 16x8 (int16 activations,
    int8 weights); False keeps every activation int8 (``--strict-int8``, for delegates without int16 kernels).
    """
    entries = _check_args(mode, io_dtype, metadata)
    _import_litert_torch()
    out_path = Path(out_path)
    info: dict[str, Any] = {"mode": mode, "io_dtype": io_dtype, "notes": []}
    start = time.perf_counter()
    data = _convert(model.eval(), mode, calib_images, img_size, io_dtype, info, class_token_int16)
    data = _embed_metadata(data, entries)
    info["conversion_seconds"] = round(time.perf_counter() - start, 3)
    _write_atomic(data, out_path)
    census = tflite_census(out_path)
    info.update(
        path=str(out_path),
        file_bytes=out_path.stat().st_size,
        signature={"name": SIGNATURE, "inputs": [INPUT_NAME], "outputs": [OUTPUT_NAME]},
        input_dtype=census["io_dtypes"]["inputs"][0] if census["io_dtypes"]["inputs"] else None,
        output_dtype=census["io_dtypes"]["outputs"][0] if census["io_dtypes"]["outputs"] else None,
        census=census,
        versions={
            "litert-torch": _version("litert-torch"),
            "ai-edge-quantizer": _version("ai-edge-quantizer"),
            "litert-quantizer": _version("litert-quantizer"),
            "ai-edge-litert": _version("ai-edge-litert"),
            "torch": torch.__version__,
        },
    )
    return info


def _check_args(mode: str, io_dtype: str, metadata: dict[str, str] | None) -> dict[str, str]:
    if mode not in MODES:
        raise UsageError(f"unknown TFLite mode {mode!r}; choose one of {', '.join(MODES)}")
    if io_dtype not in IO_DTYPES:
        raise UsageError(f"unknown io_dtype {io_dtype!r}; choose float32 or int8")
    if io_dtype == "int8" and mode != "full_integer":
        raise UsageError("io_dtype int8 is only offered for the full_integer TFLite mode")
    entries = {str(k): str(v) for k, v in (metadata or {}).items()}
    clash = RESERVED_METADATA & set(entries)
    if clash:
        raise UsageError(f"metadata keys {sorted(clash)} are reserved by TFLite; rename them")
    return entries


def _convert(model: nn.Module, mode: str, calib_images: np.ndarray | None, img_size: int, io_dtype: str,
             info: dict[str, Any], class_token_int16: bool = True) -> bytes:
    """The flatbuffer for one mode; what was done goes into ``info``."""
    if mode != "full_integer":  # full-integer has its own spelling (quantizable_copy), token conv included
        from ...models.token_conv import token_conv_copy

        model, notes = token_conv_copy(model)
        info["notes"].extend(notes)
    if mode == "fp32":
        data = _convert_float(model, img_size)
    elif mode == "fp16":
        data = _fp16_weights(_convert_float(model, img_size))
        info["notes"].append("float16 weights for FC/conv ops; activations and math stay float32")
    elif mode == "int8":
        calib = _check_calib(calib_images, img_size, mode)
        data = _convert_int8_pt2e(model, calib, img_size)
        info["calib_images"] = len(calib)
        info["notes"].append(
            "hybrid PT2E int8: per-channel int8 weights, HistogramObserver activations; norms/GELU stay float; "
            f"{', '.join(_PT2E_FLOAT_MODULES)} kept float; output logits are int8 (runner dequantizes)"
        )
    else:
        calib = _check_calib(calib_images, img_size, mode)
        data, diff = _convert_full_integer(model, calib, img_size, io_dtype, info, class_token_int16)
        info["calib_images"] = len(calib)
        info["norm_rewrite_max_abs_diff"] = diff
    return data
