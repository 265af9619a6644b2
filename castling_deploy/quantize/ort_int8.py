"""Float ONNX -> INT8 QDQ ONNX with ONNX Runtime's static quantizer, following a QuantRecipe.

The QDQ model is the portable int8 artifact: ONNX Runtime runs it on CPU and TensorRT builds an explicit-precision
engine from it (symmetric int8, zero points 0, standard-domain QuantizeLinear/DequantizeLinear, opset >= 13).
An optional NVIDIA ModelOpt route (``backend="modelopt"``) exists for TensorRT-style QDQ placement; it is used
only when ``modelopt`` imports and never by default (its extras pin other onnx/onnxruntime versions).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CastlingError, DiskFullError, UsageError
from ..optional import import_optional
from .calibration import CalibrationCache, CalibrationReader, CalibrationSet, file_digest
from .graph import classify_nodes, depth_of
from .recipe import QuantRecipe

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

RECIPE_METADATA_KEY = "castling_deploy.quant_recipe"
# Below this much free space, a file we just wrote that reads back corrupt is taken to be a full disk.
LOW_SPACE_BYTES = 64 << 20
_NO_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _free_bytes(folder: Path) -> int | None:
    for p in (folder, *folder.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def _is_decode_error(exc: BaseException) -> bool:
    """A serialized model that did not parse back: protobuf's DecodeError, or ONNX Runtime's / onnx's wording."""
    text = str(exc)
    return (type(exc).__name__ in ("DecodeError", "InvalidProtobuf") or "Wire format" in text
            or "Protobuf parsing failed" in text or "Error parsing message" in text)


def disk_error(exc: BaseException, folders: list[Path]) -> DiskFullError | None:
    """The one-line error for a write that failed for lack of space, or None when ``exc`` is something else.

    ``OSError`` ENOSPC/EDQUOT is one directly. A file that parses back corrupt (protobuf ``DecodeError`` "Wire
    format was corrupt", ORT's InvalidProtobuf) after a native writer silently truncated it is one when a folder
    written to has less than LOW_SPACE_BYTES free. Must be called before temporary files are removed.
    """
    where: Path | None = None
    text = str(exc).splitlines()[0][:120] if str(exc) else ""
    if isinstance(exc, OSError) and (exc.errno in _NO_SPACE_ERRNOS or "No space left" in text):
        name = exc.filename if isinstance(exc.filename, (str, bytes, os.PathLike)) else None
        if name:
            written = Path(os.fsdecode(name)).absolute()
            where = next((f for f in folders if written.is_relative_to(f.absolute())), written.parent)
        text = "No space left on device"
    elif not ("No space left" in text or _is_decode_error(exc)):
        return None
    if where is None:
        free = {f: _free_bytes(f) for f in folders}
        low = [f for f, b in free.items() if b is not None and b < LOW_SPACE_BYTES]
        if not low and "No space left" not in text:
            return None  # a corrupt file on a disk with room: not ours to explain
        where = min(low or folders, key=lambda f: free.get(f) or 0)
    return DiskFullError(f"no space left on device ({where}) while quantizing ({type(exc).__name__}: {text}); "
                         "free some space or write elsewhere (-o DIR; the calibration cache follows "
                         "CASTLING_DEPLOY_CACHE)")


@contextlib.contextmanager
def _translate_disk_errors(*folders: Path) -> Iterator[None]:
    """Re-raise a lack of space under ``folders`` as DiskFullError; anything else unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        err = disk_error(exc, list(folders))
        if err is None:
            raise
        raise err from exc


def _preprocess(src: Path, dst: Path) -> str:
    """Shape inference + ORT basic graph optimizations. Symbolic shape inference is skipped: it fails on
    ReduceL2 at opset 18 (docs/architecture.md). Returns what was done, for the report."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        return "quant_pre_process(skip_symbolic_shape=True)"
    except Exception as exc:  # the pre-processor is a convenience; quantizing without it is still correct
        log.warning("quant_pre_process failed (%s); quantizing the graph as exported", str(exc).splitlines()[0][:200])
        dst.write_bytes(src.read_bytes())
        return "none (quant_pre_process failed)"


def quantize_onnx(
    fp32_onnx: str | Path,
    out_path: str | Path,
    calib: CalibrationSet,
    recipe: QuantRecipe | None = None,
    *,
    cache_dir: str | Path | None = None,
    batch: int = 8,
    preprocess: bool = True,
    backend: str = "ort",
) -> dict[str, Any]:
    """Write an INT8 QDQ copy of ``fp32_onnx`` to ``out_path`` (atomically) and return a report dict:
    recipe, which nodes went int8 / stayed float, calibration provenance (digest, size, cache hit), census.
    A lack of disk space (for the artifact, its temporary files or the calibration cache) is a DiskFullError."""
    recipe = recipe or QuantRecipe()
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    if not fp32_onnx.is_file():
        raise UsageError(f"{fp32_onnx}: no such ONNX model")
    if backend == "modelopt":
        return _quantize_modelopt(fp32_onnx, out_path, calib, recipe, batch=batch)
    if backend != "ort":
        raise UsageError(f"unknown quantizer backend {backend!r}; use 'ort' (default) or 'modelopt'")

    t0 = time.perf_counter()
    sub = calib.subsample(recipe.calib_size, recipe.seed)
    sub.check_batch(batch)
    model_digest = file_digest(fp32_onnx)
    cache = CalibrationCache(cache_dir)
    with _translate_disk_errors(out_path.parent, cache.dir):
        return _quantize_ort(fp32_onnx, out_path, sub, recipe, cache, model_digest, batch, preprocess, t0)


def _quantize_ort(fp32_onnx: Path, out_path: Path, sub: CalibrationSet, recipe: QuantRecipe,
                  cache: CalibrationCache, model_digest: str, batch: int, preprocess: bool, t0: float
                  ) -> dict[str, Any]:
    import onnx
    import onnxruntime

    cache.dir.mkdir(parents=True, exist_ok=True)
    # Tensor names (the range keys) differ with and without pre-processing, so that is part of the key.
    calib_key = recipe.calibration_key() + (":pre" if preprocess else ":raw")
    ranges_path, hit = cache.entry(model_digest, sub.digest, recipe.calibration, calib_key)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize-") as tmp, \
            _translate_disk_errors(out_path.parent, cache.dir):  # free space is measured before tmp is removed
        pre = Path(tmp) / "pre.onnx"
        if preprocess:
            pre_done = _preprocess(fp32_onnx, pre)
        else:
            pre.write_bytes(fp32_onnx.read_bytes())
            pre_done = "none"
        pre_model = onnx.load(str(pre))
        roles = classify_nodes(pre_model)
        input_name = pre_model.graph.input[0].name
        kwargs = recipe.ort_kwargs(roles)
        reader = CalibrationReader(sub, input_name=input_name, batch=batch)
        if not hit:
            _calibrate(pre, reader, recipe, ranges_path, Path(tmp))
        staged = Path(tmp) / "int8.onnx"
        from onnxruntime.quantization import quantize_static

        with _quiet_ort_quantizer():
            # The range file exists now, so ORT skips its own calibration and reads our ranges.
            quantize_static(str(pre), str(staged), calibration_data_reader=None, calibration_cache_path=ranges_path,
                            **kwargs)
        cache.commit(model_digest, sub.digest, recipe.calibration, calib_key)
        q = onnx.load(str(staged))
        src_meta = {p.key: p.value for p in onnx.load(str(fp32_onnx), load_external_data=False).metadata_props}
        src_meta[RECIPE_METADATA_KEY] = json.dumps(recipe.to_dict(), sort_keys=True)
        del q.metadata_props[:]
        for k, v in src_meta.items():
            e = q.metadata_props.add()
            e.key, e.value = k, v
        q.producer_name = "castling-deploy"
        onnx.save(q, str(staged))
        onnx.checker.check_model(str(staged))
        os.replace(staged, out_path)

    from .census import onnx_census

    quant, keep = recipe.split_nodes(roles)
    int8_units = sorted({r.unit for r in roles if recipe.is_int8(r)})
    return {
        "quantizer": f"onnxruntime {onnxruntime.__version__} quantize_static (QDQ)",
        "recipe": recipe.to_dict(),
        "preprocess": pre_done,
        "depth": depth_of(roles),
        "int8_nodes": len(quant),
        "float_compute_nodes": len(keep),
        "int8_units": int8_units,
        "calibration": {
            "source": sub.source,
            "images": len(sub),
            "data_digest": sub.digest,
            "model_digest": model_digest,
            "method": recipe.calibration,
            "cache_file": str(ranges_path),
            "cache_hit": hit,
            "batches_run": reader.calls,
            "batch": reader.batch_size,
        },
        "census": onnx_census(out_path),
        "seconds": round(time.perf_counter() - t0, 3),
        "path": str(out_path),
    }


def _calibrate(model: Path, reader: Any, recipe: QuantRecipe, ranges_path: Path, tmp: Path) -> None:
    """Collect activation ranges on the float model, batch by batch in bounded memory (``stream_calib``), and save
    them in ORT's cache format. The ranges equal those of ORT's own calibrators (``_calibrate_in_memory``), which
    hold every batch's activations at once (22 GB for castling_deit_tiny@224 with 512 images)."""
    import numpy as np
    from onnxruntime.quantization.calibrate import save_tensors_data

    from .recipe import ORT_OP_TYPES
    from .stream_calib import calibrate_streaming

    def batches() -> Iterator[dict]:
        for b in reader.batches:
            yield {reader.input_name: np.ascontiguousarray(b)}

    data = calibrate_streaming(model, batches, recipe.calibration, recipe.percentile, ORT_OP_TYPES, tmp)
    reader.calls = len(reader.batches)
    save_tensors_data(data, ranges_path)


def _calibrate_in_memory(model: Path, reader: Any, recipe: QuantRecipe, ranges_path: Path, tmp: Path) -> None:
    """ORT's own (in-memory) calibrators: the reference the streaming calibrator is tested against.

    Done here rather than inside ``quantize_static`` because that one cannot pass ``num_bins``: its entropy
    calibrator then has 128 bins for 128 quantized bins and always returns the min/max range.
    """
    import numpy as np
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

    from .recipe import ORT_OP_TYPES

    method, options = {
        "minmax": (CalibrationMethod.MinMax, {"symmetric": True}),
        # MSE: the |x| histogram of the percentile calibrator, then the clip that minimizes the expected error.
        "mse": (CalibrationMethod.Percentile, {"symmetric": True, "num_bins": 2048, "percentile": 100.0}),
        "entropy": (CalibrationMethod.Entropy, {"symmetric": True, "num_bins": 2048, "num_quantized_bins": 128}),
        "percentile": (CalibrationMethod.Percentile,
                       {"symmetric": True, "num_bins": 2048, "percentile": recipe.percentile}),
    }[recipe.calibration]
    calibrator = create_calibrator(
        model,
        list(ORT_OP_TYPES),
        augmented_model_path=str(tmp / "augmented.onnx"),
        calibrate_method=method,
        extra_options=options,
    )
    # ORT's histogram calibrators print() progress; stdout must stay clean for --json.
    with contextlib.redirect_stdout(sys.stderr):
        calibrator.collect_data(reader)
        data = calibrator.compute_data()
    if recipe.calibration == "mse":
        from onnxruntime.quantization.calibrate import TensorsData

        hists = calibrator.collector.histogram_dict
        data = TensorsData(CalibrationMethod.Percentile, {
            name: (-t, t, hists[name][0], hists[name][1])
            for name in data.data
            for t in [np.array(mse_threshold(hists[name][0], hists[name][1]), dtype=hists[name][1].dtype)]
        })
    save_tensors_data(data, ranges_path)
    del calibrator


def mse_threshold(hist: "np.ndarray", edges: "np.ndarray", levels: int = 127) -> float:
    """The symmetric clip T minimizing the expected squared error of int8 ``round(x / (T/levels))`` on a histogram
    of |x|: rounding noise (T/levels)^2/12 for |x| < T plus the clipping error (|x|-T)^2 above it.

    For the near-Gaussian activations of a ViT this clips at ~4 sigma instead of the ~5.5 sigma sample maximum.
    """
    import numpy as np

    n = hist.astype(np.float64)
    c = 0.5 * (edges[:-1] + edges[1:]).astype(np.float64)
    t = edges[1:].astype(np.float64)  # candidate thresholds: the upper edge of every bin
    # Tail sums over bins strictly above each candidate: sum n, n*c, n*c^2.
    s0, s1, s2 = (np.concatenate([np.cumsum((n * c**k)[::-1])[::-1][1:], [0.0]]) for k in (0, 1, 2))
    below = np.cumsum(n)
    err = below * (t / levels) ** 2 / 12.0 + (s2 - 2 * t * s1 + t**2 * s0)
    return float(t[int(np.argmin(err))])


@contextlib.contextmanager
def _quiet_ort_quantizer():
    """ORT's quantizer logs 'please pre-process' at WARNING on the root logger; keep --json output clean."""
    root = logging.getLogger()
    old = root.level
    root.setLevel(max(old, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(old)


def _quantize_modelopt(
    fp32_onnx: Path, out_path: Path, calib: CalibrationSet, recipe: QuantRecipe, *, batch: int
) -> dict[str, Any]:
    """NVIDIA ModelOpt ONNX PTQ (TensorRT-style QDQ placement). Optional; not installed by any extra.

    Only the calibration method and the excluded nodes of the recipe map onto it; ModelOpt chooses its own
    op placement (it also quantizes e.g. Add inputs where TensorRT fuses them).
    """
    mo_quantize = import_optional("modelopt.onnx.quantization", "nvidia-modelopt", "modelopt",
                                  "ModelOpt quantization").quantize
    import numpy as np
    import onnx

    t0 = time.perf_counter()
    sub = calib.subsample(recipe.calib_size, recipe.seed)
    sub.check_batch(batch)
    roles = classify_nodes(onnx.load(str(fp32_onnx)))
    _, keep = recipe.split_nodes(roles)
    method = {"minmax": "max", "entropy": "entropy", "percentile": "max", "mse": "max"}[recipe.calibration]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize-") as tmp:
        staged = Path(tmp) / "int8.onnx"
        try:
            mo_quantize(
                onnx_path=str(fp32_onnx),
                quantize_mode="int8",
                calibration_data=np.ascontiguousarray(sub.images),
                calibration_method=method,
                calibration_eps=["cpu"],
                nodes_to_exclude=keep or None,
                high_precision_dtype="fp32",
                output_path=str(staged),
            )
        except Exception as exc:
            raise CastlingError(f"ModelOpt quantization failed: {str(exc).splitlines()[0][:300]}") from exc
        os.replace(staged, out_path)
    from .census import onnx_census

    return {
        "quantizer": "nvidia-modelopt onnx int8",
        "recipe": recipe.to_dict(),
        "calibration": {"source": sub.source, "images": len(sub), "data_digest": sub.digest, "method": method},
        "census": onnx_census(out_path),
        "seconds": round(time.perf_counter() - t0, 3),
        "path": str(out_path),
    }
