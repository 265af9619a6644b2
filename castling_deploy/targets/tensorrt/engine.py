"""TensorRT engine building (TensorRT 10 Python API). Runs only where TensorRT exists: on the target GPU/Jetson.

An INT8 engine is built from the INT8 QDQ ONNX (explicit quantization: the Q/DQ scales are used as they are, so
TensorRT needs symmetric int8 with zero point 0, which QuantRecipe always writes); an FP16 engine from the float
ONNX. Engines are specific to the GPU, the TensorRT version and the CUDA version; the metadata JSON beside the
engine records them. ``trtexec_command`` gives the equivalent command line for machines without Python bindings.
"""
from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

from ...output import atomic_write_bytes
from ...errors import CastlingError, UsageError
from ...optional import import_optional

PRECISIONS = ("fp32", "fp16", "int8", "best")
INPUT_NAME = "images"


def _import_tensorrt() -> Any:
    # OSError too (import_optional catches it): a placeholder wheel or missing CUDA libraries
    return import_optional("tensorrt", "tensorrt", "tensorrt", "engine building")


def _check_batches(min_batch: int, opt_batch: int, max_batch: int) -> None:
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UsageError(f"batch range must satisfy 1 <= min <= opt <= max, got {min_batch}/{opt_batch}/{max_batch}")


def trtexec_command(
    onnx_path: str | Path,
    engine_path: str | Path,
    precision: str,
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    img_size: int,
    *,
    input_name: str = INPUT_NAME,
    timing_cache: str | Path | None = None,
) -> str:
    """The ``trtexec`` command that builds the same engine as ``build_engine`` (for a shell on the device)."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown TensorRT precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    _check_batches(min_batch, opt_batch, max_batch)
    shape = f"3x{img_size}x{img_size}"
    args = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={engine_path}",
        f"--minShapes={input_name}:{min_batch}x{shape}",
        f"--optShapes={input_name}:{opt_batch}x{shape}",
        f"--maxShapes={input_name}:{max_batch}x{shape}",
    ]
    if precision in ("fp16", "int8", "best"):
        args.append("--fp16")  # layers without Q/DQ may then run in fp16 instead of fp32
    if precision == "int8":
        args.append("--int8")
    if precision == "best":
        args.append("--best")
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    return " ".join(shlex.quote(str(a)) for a in args)


def _gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # torch without CUDA, or no driver
        pass
    try:
        from cuda import cudart  # cuda-python

        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            return props.name.decode(errors="replace").rstrip("\x00")
    except Exception:
        pass
    return "unknown"


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    precision: str = "fp16",
    batch_range: tuple[int, int, int] = (1, 1, 8),
    timing_cache: str | Path | None = None,
    workspace_gib: float = 2.0,
) -> dict[str, Any]:
    """Parse ``onnx_path``, build a serialized engine with a dynamic-batch profile, write it (atomically) to
    ``engine_path`` and its metadata to ``<engine>.json``; return the metadata."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown TensorRT precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    min_b, opt_b, max_b = batch_range
    _check_batches(min_b, opt_b, max_b)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise UsageError(f"{onnx_path}: no such ONNX model")
    trt = _import_tensorrt()

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CastlingError(f"TensorRT cannot parse {onnx_path.name}: {errors[:400]}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision in ("fp16", "int8", "best"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision in ("int8", "best") and hasattr(trt.BuilderFlag, "INT8"):
        # Explicit quantization reads the Q/DQ scales; the flag only allows int8 kernels (deprecated in 10.x).
        config.set_flag(trt.BuilderFlag.INT8)

    profile = builder.create_optimization_profile()
    inp = network.get_input(0)
    chw = tuple(inp.shape)[1:]
    if any(d < 0 for d in chw):
        raise UsageError(f"{onnx_path.name}: only the batch axis may be dynamic, input shape is {tuple(inp.shape)}")
    profile.set_shape(inp.name, (min_b, *chw), (opt_b, *chw), (max_b, *chw))
    config.add_optimization_profile(profile)

    cache_bytes = b""
    if timing_cache and Path(timing_cache).is_file():
        cache_bytes = Path(timing_cache).read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CastlingError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    build_seconds = time.perf_counter() - t0

    engine_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(engine_path, bytes(serialized))
    if timing_cache:
        _atomic_write(Path(timing_cache), bytes(cache.serialize()))
    meta = {
        "tensorrt": trt.__version__,
        "gpu": _gpu_name(),
        "precision": precision,
        "batch_range": [min_b, opt_b, max_b],
        "input": {"name": inp.name, "shape": [-1, *chw]},
        "onnx": str(onnx_path),
        "engine": str(engine_path),
        "engine_bytes": engine_path.stat().st_size,
        "build_seconds": round(build_seconds, 3),
        "timing_cache": str(timing_cache) if timing_cache else None,
        "timing_cache_reused": bool(cache_bytes),
        "trtexec": trtexec_command(onnx_path, engine_path, precision, min_b, opt_b, max_b, chw[-1],
                                   input_name=inp.name, timing_cache=timing_cache),
    }
    _atomic_write(engine_metadata_path(engine_path), json.dumps(meta, indent=2).encode())
    return meta


def engine_metadata_path(engine_path: str | Path) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


_atomic_write = atomic_write_bytes


def qdq_tensorrt_problems(onnx_path: str | Path) -> list[str]:
    """Why TensorRT would reject or mis-build this QDQ model; empty when it is compatible.

    TensorRT's explicit quantization wants: standard-domain QuantizeLinear/DequantizeLinear (opset >= 13 for
    per-channel ``axis``), int8 zero points that are all 0, and no ONNX Runtime contrib ops.
    """
    from ...quantize.census import onnx_census

    c = onnx_census(onnx_path)
    problems = []
    if c["opset"] < 13:
        problems.append(f"opset {c['opset']} < 13 (per-channel QDQ needs 13)")
    if any(d not in ("ai.onnx",) for d in c["domains"]):
        problems.append(f"non-standard op domains {c['domains']}")
    if c["qdq_nodes"] and not c["zero_points_all_zero"]:
        problems.append("non-zero zero points (TensorRT supports symmetric int8 only)")
    bad_zp = {k: v for k, v in c["zero_point_dtypes"].items() if k not in ("INT8", "INT32")}
    if bad_zp:
        problems.append(f"zero points of type {sorted(bad_zp)} (TensorRT needs INT8)")
    if c["dq_int32_inputs"]:
        problems.append(f"{c['dq_int32_inputs']} DequantizeLinear nodes of int32 (quantized bias); "
                        "quantize with QuantRecipe.for_target('tensorrt')")
    mixed = [n["name"] for n in c["nodes"] if n["precision"] == "uint8/int8"]
    if mixed:
        problems.append(f"{len(mixed)} compute nodes with uint8 inputs, e.g. {mixed[0]}")
    return problems
