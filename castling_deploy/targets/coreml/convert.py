"""Core ML target: torch deploy-form model -> mlprogram .mlpackage (fp32 / fp16 / w8 / w8a8), plus a census.

coremltools 9.0 converts on Linux; ``predict`` is macOS-only, so quantization here never calls it:
- ``w8``: ``ct.optimize.coreml.linear_quantize_weights`` (int8, symmetric, per output channel).
- ``w8a8`` (default method ``"mil-ranges"``): the fp16 program is run by our MIL reference interpreter on
  **all** calibration images, global min/max per tensor is recorded (coremltools 9.0's own
  ``linear_quantize_activations`` needs predict and keeps only the last sample's range), and those ranges are
  fed to coremltools' own graph passes (``insert_prefix/suffix_quantize_dequantize_pair``), then weights go
  int8 as in ``w8``. The alternative ``"torch-linear-quantizer"`` (coremltools.optimize.torch LinearQuantizer:
  prepare, calibrate, finalize, trace, convert) is kept for comparison; on castling_nano it was far less
  accurate (cosine ~0.84 vs >0.99) because it quantizes every activation, including the L2-normalized q/k.
"""
from __future__ import annotations

import copy
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import UsageError
from ...optional import import_optional
from ...output import run_temp_dir
from ...runtime.pixels import to_pixels

MODES = ("fp32", "fp16", "w8", "w8a8")
W8A8_METHODS = ("mil-ranges", "torch-linear-quantizer")
# Activations quantized in w8a8: inputs of the weight ops only (like ORT's Conv/MatMul/Gemm recipe, which was
# both faster and more accurate than quantizing every op). Residual adds stay fp16.
W8A8_ACTIVATION_OPS = ("linear", "conv")
W8A8_PASSES = ("compression::insert_prefix_quantize_dequantize_pair",)
INPUT_NAME = "x"
IMAGE_INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def _ct() -> Any:
    return import_optional("coremltools", "coremltools", "coreml", "Core ML export")


def image_preprocessing(mean: list[float], std: list[float]) -> dict[str, Any]:
    """How normalization maps onto Core ML's ImageType (one scalar scale, per-channel bias).

    Convention: pixels p are 0..255 RGB; the model wants (p/255 - mean_c)/std_c.
    Equal stds: scale = 1/(255 s), bias_c = -mean_c/s, exactly. Per-channel stds: scale = 1/255,
    bias_c = -mean_c and 1/std_c is folded into the first conv's input channels (exact: the conv is linear per
    input channel and zero padding commutes with per-channel scaling since the mean is already removed).
    """
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise UsageError(f"mean/std must be 3 positive-std RGB values, got mean={mean} std={std}")
    if max(std) - min(std) <= 1e-12 * max(std):
        s = float(std[0])
        return {"scale": 1.0 / (255.0 * s), "bias": [-m / s for m in mean], "fold_std_into_conv": None}
    return {"scale": 1.0 / 255.0, "bias": [-float(m) for m in mean], "fold_std_into_conv": [float(s) for s in std]}


def _fold_std_into_first_conv(model: Any, std: list[float]) -> str:
    import torch

    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if conv is None or conv.in_channels != 3 or conv.groups != 1:
        raise UsageError("cannot fold per-channel std: the model's first conv does not take 3 RGB channels")
    with torch.no_grad():
        conv.weight.div_(torch.tensor(std, dtype=conv.weight.dtype).view(1, 3, 1, 1))
    return "per-channel 1/std folded into the first conv's weights (ImageType scale=1/255, bias=-mean)"


def convert_coreml(
    model: Any,
    out_path: Path,
    *,
    mode: str,
    calib_images: np.ndarray | None,
    img_size: int,
    mean: list[float],
    std: list[float],
    labels: list[str] | None,
    metadata: dict[str, str] | None = None,
    input_type: str = "image",
    w8a8_method: str = "mil-ranges",
) -> dict[str, Any]:
    """Convert ``model`` (deploy form, eval, NCHW float32 normalized input) to an mlprogram at ``out_path``.

    Batch is fixed at 1 (static shapes keep the program ANE-friendly); runners loop over a batch.
    Returns an info dict (mode, versions, seconds, bytes, quantization method, notes).
    """
    ct = _ct()
    import torch

    _check_args(mode, input_type, w8a8_method, calib_images)
    t0 = time.perf_counter()
    out_path = Path(out_path)
    notes: list[str] = []
    model = copy.deepcopy(model).eval().float()
    ex = torch.zeros(1, 3, img_size, img_size)
    if calib_images is not None and len(calib_images):
        ex = torch.from_numpy(np.ascontiguousarray(calib_images[:1], dtype=np.float32))

    pre: dict[str, Any] = {}
    if input_type == "image":
        pre = image_preprocessing(mean, std)
        if pre["fold_std_into_conv"] is not None:
            notes.append(_fold_std_into_first_conv(model, pre["fold_std_into_conv"]))
        ct_input = ct.ImageType(name=IMAGE_INPUT_NAME, shape=(1, 3, img_size, img_size), scale=pre["scale"],
                                bias=pre["bias"], color_layout=ct.colorlayout.RGB)
    else:
        ct_input = ct.TensorType(name=INPUT_NAME, shape=(1, 3, img_size, img_size), dtype=np.float32)

    method = {"fp32": "none", "fp16": "fp16 weights+activations", "w8": "int8 per-channel symmetric weights"}.get(mode)
    if mode == "w8a8" and w8a8_method == "torch-linear-quantizer":
        model = _torch_linear_quantizer(model, calib_images, ex)
        method = "coremltools.optimize.torch LinearQuantizer (symmetric int8 W+A, calibrated in torch)"

    with torch.no_grad():
        traced = torch.jit.trace(model, ex)
    precision = ct.precision.FLOAT32 if mode == "fp32" else ct.precision.FLOAT16
    mlmodel = ct.convert(
        traced,
        inputs=[ct_input],
        outputs=[ct.TensorType(name=OUTPUT_NAME)],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS17,
        compute_precision=precision,
    )
    if mode == "w8a8" and w8a8_method == "mil-ranges":
        mlmodel, n_ranges = _quantize_activations_with_mil_ranges(mlmodel, calib_images, input_type, mean, std, pre)
        method = (f"MIL-interpreter global min/max over all {len(calib_images)} calib images ({n_ranges} tensors) "
                  "-> coremltools insert_prefix/suffix_quantize_dequantize_pair; int8 per-channel weights")
    if mode in ("w8", "w8a8"):
        mlmodel = _quantize_weights(mlmodel)

    _set_metadata(mlmodel, metadata, labels, mode, input_type, mean, std, pre)
    _save_atomically(mlmodel, out_path)
    if labels:
        notes.append("class labels stored in user_defined_metadata['classes'] (output stays raw 'logits')")
    return _info(mode, out_path, ct.__version__, time.perf_counter() - t0, method, input_type, pre, notes)


def _check_args(mode: str, input_type: str, w8a8_method: str, calib_images: np.ndarray | None) -> None:
    if mode not in MODES:
        raise UsageError(f"unknown Core ML mode {mode!r}; choose one of: {', '.join(MODES)}")
    if input_type not in ("image", "tensor"):
        raise UsageError(f"input_type must be 'image' or 'tensor', got {input_type!r}")
    if w8a8_method not in W8A8_METHODS:
        raise UsageError(f"unknown w8a8 method {w8a8_method!r}; choose one of: {', '.join(W8A8_METHODS)}")
    if mode == "w8a8" and (calib_images is None or len(calib_images) == 0):
        raise UsageError("w8a8 needs calibration images (calib_images is empty)")


def _info(mode: str, out_path: Path, version: str, seconds: float, method: str | None, input_type: str,
          pre: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """What a conversion reports (into report.json's target_info)."""
    return {
        "mode": mode,
        "path": str(out_path),
        "coremltools": version,
        "seconds": round(seconds, 2),
        "package_bytes": sum(f.stat().st_size for f in out_path.rglob("*") if f.is_file()),
        "quantization": method,
        "input_type": input_type,
        "input_name": IMAGE_INPUT_NAME if input_type == "image" else INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "image_scale": pre.get("scale"),
        "image_bias": pre.get("bias"),
        "minimum_deployment_target": "iOS17",
        "batch": 1,
        "notes": notes,
    }


def _quantize_weights(mlmodel: Any) -> Any:
    import coremltools.optimize.coreml as cto

    cfg = cto.OptimizationConfig(
        global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                                  weight_threshold=0)
    )
    return cto.linear_quantize_weights(mlmodel, cfg)


def _calib_feeds(calib: np.ndarray, input_type: str, mean: list[float], std: list[float]) -> list[dict[str, np.ndarray]]:
    x = np.asarray(calib, dtype=np.float32)
    if input_type == "image":
        return [{IMAGE_INPUT_NAME: to_pixels(x[i : i + 1], mean, std)} for i in range(len(x))]
    return [{INPUT_NAME: x[i : i + 1]} for i in range(len(x))]


def _quantize_activations_with_mil_ranges(
    mlmodel: Any, calib: np.ndarray, input_type: str, mean: list[float], std: list[float], pre: dict[str, Any]
) -> tuple[Any, int]:
    """Record global min/max of every tensor over all calib images with the interpreter, then insert Q/DQ pairs."""
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil.frontend.milproto import load as milproto_load
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.models import utils as model_utils

    from ...runtime.mil_interp import MILProgram

    with run_temp_dir("coreml") as tmp:
        p = Path(tmp) / "calib.mlpackage"
        mlmodel.save(str(p))
        prog = MILProgram(p)
        stats: dict[str, dict[str, float]] = {}

        def observe(_op: str, name: str, v: np.ndarray) -> None:
            if v.dtype.kind != "f":
                return
            lo, hi = float(v.min()), float(v.max())
            s = stats.get(name)
            stats[name] = {"rmin": lo, "rmax": hi} if s is None else {"rmin": min(s["rmin"], lo), "rmax": max(s["rmax"], hi)}

        for feed in _calib_feeds(calib, input_type, mean, std):
            for k, v in feed.items():
                observe("input", k, v)
            prog.run(feed, observer=observe)
        # concat inputs and output share one range (as coremltools does) so the concat needs no requantization.
        for op in prog.ops:
            if op.type == "concat":
                names = [b.name for b in op.inputs["values"].arguments if b.WhichOneof("binding") == "name"]
                names = [n for n in names + [op.outputs[0].name] if n in stats]
                if names:
                    lo, hi = min(stats[n]["rmin"] for n in names), max(stats[n]["rmax"] for n in names)
                    for n in names:
                        stats[n] = {"rmin": lo, "rmax": hi}
    op_cfg = cto.OpLinearQuantizerConfig(mode="linear_symmetric")
    cfg = cto.OptimizationConfig(op_type_configs={t: op_cfg for t in W8A8_ACTIVATION_OPS})
    passes = []
    for name in W8A8_PASSES:
        gp = PASS_REGISTRY[name]
        gp.set_options([PassOption("config", cfg)])
        gp.set_options([PassOption("activation_stats", stats)])
        passes.append(gp)
    passes.append(PASS_REGISTRY["common::dequantize_quantize_pair_elimination"])
    out = model_utils._apply_graph_pass(mlmodel, passes, spec_version=8, pymil_load_func=milproto_load.load,
                                        skip_model_load=True)
    return out, len(stats)


def _torch_linear_quantizer(model: Any, calib: np.ndarray, ex: Any) -> Any:
    import torch
    from coremltools.optimize.torch.quantization import (
        LinearQuantizer,
        LinearQuantizerConfig,
        ModuleLinearQuantizerConfig,
    )

    cfg = LinearQuantizerConfig(
        global_config=ModuleLinearQuantizerConfig(quantization_scheme="symmetric", milestones=[0, 10**9, 10**9, 0])
    )
    q = LinearQuantizer(model, cfg)
    prepared = q.prepare(example_inputs=(ex,), inplace=False)
    q.step()
    with torch.no_grad():
        for i in range(0, len(calib), 8):
            prepared(torch.from_numpy(np.ascontiguousarray(calib[i : i + 8], dtype=np.float32)))
    return q.finalize(inplace=False).eval()


def _set_metadata(mlmodel: Any, metadata: dict[str, str] | None, labels: list[str] | None, mode: str,
                  input_type: str, mean: list[float], std: list[float], pre: dict[str, Any]) -> None:
    import json

    md = dict(metadata or {})
    mlmodel.short_description = md.pop("short_description", f"Castling-ViT classifier (Core ML {mode})")
    mlmodel.author = md.pop("author", "castling-deploy")
    mlmodel.version = md.pop("version", "1")
    ud = mlmodel.user_defined_metadata
    for k, v in md.items():
        ud[str(k)] = str(v)
    ud["castling.mode"] = mode
    ud["castling.input_type"] = input_type
    ud["castling.mean"] = json.dumps([float(m) for m in mean])
    ud["castling.std"] = json.dumps([float(s) for s in std])
    if input_type == "image":
        ud["castling.pixel_convention"] = "RGB 0..255; pixels = (x*std + mean)*255"
        ud["castling.image_scale"] = repr(pre["scale"])
        ud["castling.image_bias"] = json.dumps(pre["bias"])
    if labels:
        ud["classes"] = json.dumps(list(labels))
    mlmodel.input_description[mlmodel.get_spec().description.input[0].name] = (
        "RGB image 0..255" if input_type == "image" else "NCHW float32, normalized with mean/std")
    mlmodel.output_description[OUTPUT_NAME] = "raw class logits"


def _save_atomically(mlmodel: Any, out_path: Path) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        staged = tmp / out_path.name
        mlmodel.save(str(staged))
        if out_path.exists():
            shutil.rmtree(out_path) if out_path.is_dir() else out_path.unlink()
        staged.rename(out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- census / ANE report --------------------------------------------------------------------------------
_COMPUTE_OPS_SKIP = {"const"}


def coreml_census(path: str | Path) -> dict[str, Any]:
    """What the package really stores and runs: op histogram, constant dtypes, activation Q/DQ presence."""
    from ...runtime.mil_interp import MILProgram

    prog = MILProgram(path)
    hist = prog.op_histogram()
    stored: dict[str, int] = {}
    params: dict[str, int] = {}
    for op in prog.block.operations:
        if op.type != "const" and not op.type.startswith("constexpr_"):
            continue
        vals = [op.attributes["val"]] if op.type == "const" else [v for k, v in op.attributes.items() if k != "name"]
        for v in vals:
            if v.type.WhichOneof("type") != "tensorType":
                continue
            from coremltools.proto import MIL_pb2

            dt = MIL_pb2.DataType.Name(v.type.tensorType.dataType).lower()
            n = int(np.prod([d.constant.size for d in v.type.tensorType.dimensions])) if v.type.tensorType.rank else 1
            if dt == "string":
                continue
            stored[dt] = stored.get(dt, 0) + 1
            params[dt] = params.get(dt, 0) + n
    total = sum(params.values()) or 1
    return {
        "op_histogram": hist,
        "constants_by_dtype": stored,
        "constant_elements_by_dtype": params,
        "int8_weight_fraction": round((params.get("int8", 0) + params.get("uint8", 0)) / total, 4),
        "quantize_ops": hist.get("quantize", 0),
        "dequantize_ops": hist.get("dequantize", 0),
        "activation_quantized": hist.get("quantize", 0) > 0 and hist.get("dequantize", 0) > 0,
        "weight_dequantize_ops": sum(c for t, c in hist.items() if t.startswith("constexpr_")),
        "compute_ops": sum(c for t, c in hist.items() if t not in _COMPUTE_OPS_SKIP and not t.startswith("constexpr_")),
    }


# Ops that commonly fall back from the Apple Neural Engine to GPU/CPU. Apple publishes no official list; this
# is collected from Apple's "Deploying Transformers on the Apple Neural Engine" (ml-ane-transformers: ANE
# prefers 4D channels-first, no reshapes/transposes of the last axis at scale, no gather), the coremltools
# docs/issues on compute-unit fallbacks, and community measurements (hollance/neural-engine "Unsupported
# layers"). Treat it as a likely-fallback list, not a guarantee: only Xcode's performance report / MLComputePlan
# on a device is authoritative.
ANE_LIKELY_FALLBACK = {
    "gather": "gather/embedding lookups usually run on CPU",
    "gather_along_axis": "dynamic indexing is not ANE-native",
    "gather_nd": "dynamic indexing is not ANE-native",
    "scatter": "scatter ops run on CPU",
    "reduce_l2_norm": "L2-norm reductions have been observed on GPU/CPU; sum-of-squares + rsqrt is safer",
    "reduce_prod": "product reduction not supported on ANE",
    "reduce_log_sum_exp": "not ANE-native",
    "real_div": "division by a tensor is emulated (reciprocal+mul); may split the ANE graph",
    "shape": "dynamic shapes force CPU",
    "range_1d": "dynamic shapes force CPU",
    "fill": "dynamic shapes force CPU",
    "erf": "erf alone may fall back (gelu is native)",
    "acos": "trigonometric ops are not ANE-native",
    "cast": "int32/fp32 casts at the graph edge run on CPU",
    "quantize": "activation int8 is honoured on A17/M4+ ANE only; older ANEs dequantize and compute fp16",
    "dequantize": "see quantize",
}


def ane_report(path: str | Path) -> dict[str, Any]:
    """Which ops probably leave the ANE, and which precision each op computes in (from its output dtype)."""
    from coremltools.proto import MIL_pb2

    from ...runtime.mil_interp import MILProgram

    prog = MILProgram(path)
    hist = prog.op_histogram()
    precision: dict[str, dict[str, int]] = {}
    dynamic: list[str] = []
    fp32_ops: list[str] = []
    for op in prog.ops:
        tt = op.outputs[0].type.tensorType if op.outputs else None
        dt = MIL_pb2.DataType.Name(tt.dataType).lower() if tt is not None else "?"
        precision.setdefault(op.type, {}).setdefault(dt, 0)
        precision[op.type][dt] += 1
        if tt is not None and any(d.WhichOneof("dimension") != "constant" for d in tt.dimensions):
            dynamic.append(op.outputs[0].name)
        if dt == "float32" and op.type not in ("cast",):
            fp32_ops.append(op.type)
    fallback = {t: {"count": hist[t], "why": why} for t, why in ANE_LIKELY_FALLBACK.items() if t in hist}
    matmul_dynamic = sum(1 for op in prog.ops if op.type == "matmul" and
                         all(b.name not in prog.consts for arg in op.inputs.values() for b in arg.arguments
                             if b.WhichOneof("binding") == "name"))
    if matmul_dynamic:
        fallback["matmul(activation x activation)"] = {
            "count": matmul_dynamic,
            "why": "runs on ANE but without constant weights it is bandwidth-bound; large ones may be placed on GPU",
        }
    return {
        "op_histogram": hist,
        "likely_ane_fallback": fallback,
        "dynamic_shape_ops": dynamic,
        "compute_precision_per_op": precision,
        "fp32_compute_ops": len(fp32_ops),
        "source": "heuristic list (see ANE_LIKELY_FALLBACK); verify with Xcode performance report / MLComputePlan",
        "certainty": "low: Apple documents no per-op ANE support table",
    }
