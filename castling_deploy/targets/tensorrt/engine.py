"""TensorRT engine building, version-aware (TensorRT 10.x on JetPack, 11.x on GPUs). Runs only where TensorRT
exists: on the target GPU/Jetson.

TensorRT 11 builds every network strongly typed and removed the precision builder flags, so the precision is in
the ONNX that is built (``versions.py`` has the matrix): fp32 from the float ONNX, fp16 from the typed fp16 ONNX
(``quantize/fp16.py``), int8 from the typed INT8 QDQ ONNX (symmetric int8, zero points 0, float islands fp16).
TensorRT 10.12+ builds strongly typed too (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``); TensorRT 10.0-10.11
(JetPack 6 ships 10.3) falls back to weak typing with ``BuilderFlag.FP16``/``INT8``, recorded in the metadata.
No attribute that TensorRT 11 removed is touched on 11.x. Engines are specific to the GPU, the TensorRT version and
the CUDA version; the metadata JSON beside the engine records them. ``trtexec_command`` gives the equivalent
command line for machines without Python bindings.
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
from .versions import PRECISIONS, STRONG, STRONG_ONLY, WEAK, builder_flags, check_precision, trtexec_flags, typing_mode

__all__ = ["PRECISIONS", "build_engine", "engine_metadata_path", "qdq_tensorrt_problems", "trtexec_command"]

INPUT_NAME = "images"
CURRENT_TENSORRT = "11.0"  # what `pip install tensorrt` gives: the command lines default to it


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
    tensorrt: str = CURRENT_TENSORRT,
    program: str = "trtexec",
) -> str:
    """The ``trtexec`` command that builds the same engine as ``build_engine`` on TensorRT ``tensorrt``:
    no precision flag on 11.x, ``--stronglyTyped`` on 10.12+, ``--fp16 [--int8]`` (weak typing) before."""
    check_precision(precision)
    _check_batches(min_batch, opt_batch, max_batch)
    shape = f"3x{img_size}x{img_size}"
    args = [
        program,
        f"--onnx={onnx_path}",
        f"--saveEngine={engine_path}",
        f"--minShapes={input_name}:{min_batch}x{shape}",
        f"--optShapes={input_name}:{opt_batch}x{shape}",
        f"--maxShapes={input_name}:{max_batch}x{shape}",
        *trtexec_flags(typing_mode(tensorrt), precision),
    ]
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    return " ".join(shlex.quote(str(a)) for a in args)


def _gpu() -> tuple[str, str | None]:
    """(name, compute capability "major.minor") of CUDA device 0: what an engine built here is compiled for."""
    from ...devices.engine_compat import local_gpu

    return local_gpu()


def onnx_precision_problem(onnx_path: Path, precision: str) -> str | None:
    """Why ``onnx_path`` cannot give a ``precision`` engine under strong typing (the ONNX types are the engine's
    types), or None: fp16 needs fp16 tensors, int8 needs Q/DQ nodes."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    fp16 = any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute)
        for n in model.graph.node)
    if precision == "int8" and "QuantizeLinear" not in ops and "DequantizeLinear" not in ops:
        return f"{onnx_path.name} has no Q/DQ nodes: an int8 engine is built from the INT8 QDQ ONNX (model.int8.onnx)"
    if precision == "fp16" and not fp16:
        return (f"{onnx_path.name} has no fp16 tensors: under strong typing an fp16 engine is built from the typed "
                "fp16 ONNX (model.fp16.onnx: export with --fp16)")
    return None


def _create_network(trt: Any, builder: Any, mode: str) -> tuple[Any, list[str]]:
    if mode == STRONG:
        return builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)), ["STRONGLY_TYPED"]
    return builder.create_network(0), []  # 11.x: strongly typed is the only mode; 10.x weak: explicit batch only


def _parse(trt: Any, network: Any, logger: Any, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CastlingError(f"TensorRT cannot parse {onnx_path.name}: {errors[:400]}")


def _config(trt: Any, builder: Any, mode: str, precision: str, workspace_gib: float) -> tuple[Any, list[str]]:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    flags = list(builder_flags(mode, precision))  # empty unless weak typing (10.0-10.11)
    for name in flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    return config, flags


def _profile(builder: Any, network: Any, config: Any, batch_range: tuple[int, int, int],
             onnx_path: Path) -> tuple[str, tuple[int, ...]]:
    min_b, opt_b, max_b = batch_range
    profile = builder.create_optimization_profile()
    inp = network.get_input(0)
    chw = tuple(inp.shape)[1:]
    if any(d < 0 for d in chw):
        raise UsageError(f"{onnx_path.name}: only the batch axis may be dynamic, input shape is {tuple(inp.shape)}")
    profile.set_shape(inp.name, (min_b, *chw), (opt_b, *chw), (max_b, *chw))
    config.add_optimization_profile(profile)
    return inp.name, chw


def _timing_cache(config: Any, timing_cache: str | Path | None) -> tuple[Any, bytes]:
    cache_bytes = b""
    if timing_cache and Path(timing_cache).is_file():
        cache_bytes = Path(timing_cache).read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache, cache_bytes


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    precision: str = "fp16",
    batch_range: tuple[int, int, int] = (1, 1, 8),
    timing_cache: str | Path | None = None,
    workspace_gib: float = 2.0,
) -> dict[str, Any]:
    """Parse ``onnx_path``, build a serialized engine with a dynamic-batch profile the way this TensorRT version
    wants (strongly typed where it can), write it (atomically) to ``engine_path`` and its metadata to
    ``<engine>.json``; return the metadata."""
    check_precision(precision)
    _check_batches(*batch_range)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise UsageError(f"{onnx_path}: no such ONNX model")
    trt = _import_tensorrt()
    version = str(trt.__version__)
    mode = typing_mode(version)
    problem = onnx_precision_problem(onnx_path, precision) if mode != WEAK else None
    if problem:
        raise UsageError(problem)

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, network_flags = _create_network(trt, builder, mode)
    _parse(trt, network, logger, onnx_path)
    config, flags = _config(trt, builder, mode, precision, workspace_gib)
    input_name, chw = _profile(builder, network, config, batch_range, onnx_path)
    cache, cache_bytes = _timing_cache(config, timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CastlingError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    build_seconds = time.perf_counter() - t0
    gpu, cc = _gpu()

    engine_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(engine_path, bytes(serialized))
    if timing_cache:
        _atomic_write(Path(timing_cache), bytes(cache.serialize()))
    meta = {
        "tensorrt": version, "typing": mode, "typing_note": _TYPING_NOTES[mode], "network_flags": network_flags,
        "builder_flags": flags, "gpu": gpu, "compute_capability": cc, "precision": precision, "batch_range": list(batch_range),
        "input": {"name": input_name, "shape": [-1, *chw]}, "onnx": str(onnx_path), "engine": str(engine_path),
        "engine_bytes": engine_path.stat().st_size, "build_seconds": round(build_seconds, 3),
        "timing_cache": str(timing_cache) if timing_cache else None, "timing_cache_reused": bool(cache_bytes),
        "trtexec": trtexec_command(onnx_path, engine_path, precision, *batch_range, chw[-1], input_name=input_name,
                                   timing_cache=timing_cache, tensorrt=version),
    }
    _atomic_write(engine_metadata_path(engine_path), json.dumps(meta, indent=2).encode())
    return meta


_TYPING_NOTES = {
    STRONG_ONLY: "strongly typed (the only mode in TensorRT 11): tensor types come from the ONNX",
    STRONG: "strongly typed (NetworkDefinitionCreationFlag.STRONGLY_TYPED): tensor types come from the ONNX",
    WEAK: "weak typing (deprecated since TensorRT 10.12), the fallback for 10.0-10.11: BuilderFlag FP16/INT8 let "
          "TensorRT pick fp16 kernels for layers the ONNX leaves fp32",
}


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
