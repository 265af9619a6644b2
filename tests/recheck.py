"""Independent re-checks of what an export report claims, and deliberately broken artifacts.

Nothing here goes through the pipeline's verification code: the val images are re-loaded from the paths and options
the report records, the reference is the checkpoint built directly in deploy form (not the ``fold`` function), each
artifact runs on its runtime called directly (``onnxruntime.InferenceSession``, LiteRT's ``Interpreter``, the MIL
interpreter on a ``MILProgram``), and the metrics and the pass/fail decision are recomputed here in numpy. A report
whose stage measured some other file than the one it is linked to (a stage wired to the wrong artifact) cannot
match: the W8A8 Core ML package is ~0.25 off the float model, the fp16 one 5e-3.

Not a test module (no ``test_`` prefix); the CLI tests import it.
"""
from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

MODEL_SUFFIXES = (".onnx", ".tflite", ".mlpackage", ".engine", ".plan")
# How closely the re-computation must reproduce the report. The same file on the same runtime with the same inputs
# gives the same logits up to float summation order (batching): 1e-4 relative on max|Δ| with an absolute floor of
# 1e-5 (fp32 artifacts differ from torch by ~3e-6, pure rounding noise; the nearest real difference, fp16, is 3e-3)
# and 0.5 dB on SQNR (the bound; int8 stages measure 30-37 dB, fp16 ~55 dB, fp32 > 100 dB).
MAX_ABS_REL, MAX_ABS_FLOOR, SQNR_DB, COSINE_ABS = 1e-4, 1e-5, 0.5, 1e-6
FLOAT_ATOL = {"fp32": 1e-4, "fp16": 5e-2}  # README: "float artifacts also meet an atol (1e-4 fp32, 5e-2 fp16)"


# ---- data and reference ---------------------------------------------------------------------------------------
def load_val(report: dict) -> Any:
    """The val images exactly as the export loaded them (same folder, preprocessing, labels, --limit and --seed)."""
    from castling_deploy.data import load_image_set

    opts = report["options"]
    data = load_image_set(Path(opts["val"]), report["preprocess"], report["labels"], limit=opts.get("val_limit"),
                          seed=opts.get("seed", 0), num_classes=report["checkpoint"]["config"]["num_classes"])
    assert data.digest == report["data"]["val"]["digest"], "the report's val digest is not the set it names"
    return data


@functools.lru_cache(maxsize=8)
def _reference(ckpt: str, arch: str | None, imgsz: int | None, val_key: str, images_bytes: bytes,
               shape: tuple[int, ...]) -> np.ndarray:
    from castling_deploy.models.checkpoint import load_checkpoint

    images = np.frombuffer(images_bytes, dtype=np.float32).reshape(shape)
    model = load_checkpoint(ckpt, arch=arch, img_size=imgsz).build_model(form="deploy").eval()
    with torch.no_grad():
        out = [model(torch.from_numpy(images[i : i + 64].copy())).numpy() for i in range(0, len(images), 64)]
    return np.concatenate(out).astype(np.float32)


def reference_logits(report: dict, images: np.ndarray, val_key: str) -> np.ndarray:
    """The deploy-form model built straight from the checkpoint's weights: the folded float model by definition
    (the fold drops the softmax branch; the deploy form never had it)."""
    opts = report["options"]
    return _reference(report["checkpoint"]["path"], opts.get("arch"), opts.get("imgsz"), val_key,
                      np.ascontiguousarray(images, np.float32).tobytes(), tuple(images.shape))


# ---- runtimes, called directly ----------------------------------------------------------------------------------
def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 32]})[0] for i in range(0, len(x), 32)]).astype(np.float32)


def run_tflite(path: Path, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    nhwc = int(inp["shape"][-1]) == 3 and int(inp["shape"][1]) != 3
    res = []
    for i in range(len(x)):  # litert-torch bakes batch 1 into the graph
        xi = x[i : i + 1].transpose(0, 2, 3, 1) if nhwc else x[i : i + 1]
        if np.issubdtype(inp["dtype"], np.integer):  # full-integer I/O: quantize the image with the input's params
            scale, zero = inp["quantization"]
            lim = np.iinfo(inp["dtype"])
            xi = np.clip(np.round(xi / scale) + zero, lim.min, lim.max)
        it.set_tensor(inp["index"], np.ascontiguousarray(xi).astype(inp["dtype"]))
        it.invoke()
        y = it.get_tensor(out["index"])
        if np.issubdtype(y.dtype, np.integer):  # int8 logits: dequantize with the output's params
            scale, zero = out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        res.append(np.asarray(y, np.float32).reshape(1, -1))
    return np.concatenate(res)


def run_mlpackage(path: Path, x: np.ndarray, preprocess: dict) -> np.ndarray:
    """The MIL program executed op by op; an ImageType input gets the 0..255 pixels the app would feed, rebuilt from
    the report's own mean/std (so a package built with other normalization constants would not match)."""
    from castling_deploy.runtime.mil_interp import MILProgram

    prog = MILProgram(path)
    (name,) = prog.input_names
    out_name = "logits" if "logits" in prog.output_names else prog.output_names[0]
    if name in prog.image_inputs:
        m = np.asarray(preprocess["mean"], np.float32).reshape(1, 3, 1, 1)
        s = np.asarray(preprocess["std"], np.float32).reshape(1, 3, 1, 1)
        x = ((x * s + m) * np.float32(255.0)).astype(np.float32)
    return np.concatenate([np.asarray(prog.run({name: x[i : i + 1]})[out_name], np.float32).reshape(1, -1)
                           for i in range(len(x))])


def run_artifact(path: Path, x: np.ndarray, preprocess: dict) -> np.ndarray:
    if path.suffix == ".onnx":
        return run_onnx(path, x)
    if path.suffix == ".tflite":
        return run_tflite(path, x)
    if path.suffix == ".mlpackage":
        return run_mlpackage(path, x, preprocess)
    raise AssertionError(f"no independent runner for {path.name}")


# ---- metrics and goals, recomputed ------------------------------------------------------------------------------
def metrics(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    r, o = ref.astype(np.float64), out.astype(np.float64)
    d = o - r
    noise = float((d * d).sum())
    m = {
        "n": len(r),
        "finite": bool(np.isfinite(o).all()),
        "max_abs_logit": float(np.abs(d).max()),
        "cosine": float((r * o).sum() / (np.linalg.norm(r) * np.linalg.norm(o))),
        "sqnr_db": math.inf if noise == 0 else float(10 * np.log10((r * r).sum() / noise)),
        "top1_agreement": float(np.mean(r.argmax(1) == o.argmax(1))),
    }
    if labels is not None:
        m["ref_top1_acc"] = 100.0 * float(np.mean(r.argmax(1) == labels))
        m["top1_acc"] = 100.0 * float(np.mean(o.argmax(1) == labels))
        m["top1_drop_points"] = m["ref_top1_acc"] - m["top1_acc"]
    return m


def goals_met(m: dict[str, Any], tolerance: float, precision: str) -> bool:
    """The README's goals, applied here: top-1 drop <= --tolerance (with labels; else top-1 agreement >=
    1 - tolerance/100), finite logits, and the float atol for fp32 / fp16 artifacts."""
    ok = m["finite"]
    if "top1_drop_points" in m:
        ok &= m["top1_drop_points"] <= tolerance + 1e-9
    else:
        ok &= m["top1_agreement"] >= 1 - tolerance / 100 - 1e-9
    if precision in FLOAT_ATOL:
        ok &= m["max_abs_logit"] <= FLOAT_ATOL[precision]
    return bool(ok)


def assert_stage_matches(stage: dict, mine: dict[str, Any], where: str) -> None:
    rep = stage["metrics"]
    assert rep["n"] == mine["n"], where
    assert rep["top1_agreement"] == pytest_approx(mine["top1_agreement"]), (where, rep, mine)
    for k in ("ref_top1_acc", "top1_acc", "top1_drop_points"):
        if k in mine:
            assert rep[k] == pytest_approx(mine[k]), (where, k, rep[k], mine[k])
    bound = MAX_ABS_REL * max(rep["max_abs_logit"], mine["max_abs_logit"]) + MAX_ABS_FLOOR
    assert abs(rep["max_abs_logit"] - mine["max_abs_logit"]) <= bound, (
        f"{where}: report says max|Δ| {rep['max_abs_logit']:.3e}, the artifact itself gives {mine['max_abs_logit']:.3e}")
    assert abs(rep["cosine"] - mine["cosine"]) <= COSINE_ABS, (where, rep["cosine"], mine["cosine"])
    rep_sqnr = math.inf if rep["sqnr_db"] is None else rep["sqnr_db"]  # strict JSON writes inf as null
    if mine["max_abs_logit"] > 1e-4:  # a real difference: SQNR is meaningful to 0.5 dB
        assert abs(rep_sqnr - mine["sqnr_db"]) <= SQNR_DB, (where, rep_sqnr, mine["sqnr_db"])
    else:  # float rounding noise: SQNR only says "far above any int8/fp16 level"
        assert rep_sqnr > 80 and mine["sqnr_db"] > 80, (where, rep_sqnr, mine["sqnr_db"])


def pytest_approx(v: float):
    import pytest

    return pytest.approx(v, rel=1e-9, abs=1e-9)


def recheck_folder(folder: Path, report: dict | None = None) -> dict[str, dict[str, Any]]:
    """Re-run every model artifact the folder's report describes and assert the report's numbers and verdicts.
    Returns {file: independently measured metrics}."""
    report = report or json.loads((folder / "report.json").read_text())
    on_disk = sorted(p.name for p in folder.iterdir() if p.suffix in MODEL_SUFFIXES)
    listed = {a["file"]: a for a in report["artifacts"]}
    assert sorted(f for f in listed if Path(f).suffix in MODEL_SUFFIXES) == on_disk, (listed, on_disk)
    stages = {s["id"]: s for s in report["error_budget"]}
    assert len(stages) == len(report["error_budget"]), "stage ids must be unique"
    data = load_val(report)
    ref = reference_logits(report, data.images, data.digest)
    tolerance = report["goals"]["tolerance_points"]
    out: dict[str, dict[str, Any]] = {}
    for name, art in listed.items():
        if Path(name).suffix not in MODEL_SUFFIXES:
            assert art["verified_by"] is None, art  # scripts are not measured, and must not claim to be
            continue
        assert art["verified_by"] in stages, f"{folder.name}/{name} is not linked to a budget stage: {art}"
        stage = stages[art["verified_by"]]
        mine = metrics(ref, run_artifact(folder / name, data.images, report["preprocess"]), data.labels)
        where = f"{folder.name}/{name} vs stage {stage['id']!r}"
        assert_stage_matches(stage, mine, where)
        assert stage["passed"] == goals_met(mine, tolerance, art["precision"]), (where, stage, mine)
        out[name] = mine
    assert report["status"] == ("passed" if all(s["passed"] for s in report["error_budget"]) else "failed")
    return out


# ---- deliberately broken artifacts -----------------------------------------------------------------------------
def _head_shapes(classes: int, dim: int) -> set[tuple[int, ...]]:
    return {(classes, dim), (dim, classes)}


def _negated(a: np.ndarray) -> np.ndarray:
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        return np.clip(-a.astype(np.int64), info.min, info.max).astype(a.dtype)
    return -a


def perturb_onnx(path: Path, classes: int = 10, dim: int = 64) -> int:
    """Negate the classifier weights (float, or the int8 initializer of a QDQ model): logits become -Wx + b."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    n = 0
    for init in m.graph.initializer:
        if tuple(init.dims) in _head_shapes(classes, dim):
            init.CopyFrom(numpy_helper.from_array(_negated(numpy_helper.to_array(init)), init.name))
            n += 1
    onnx.save(m, str(path))
    return n


def perturb_tflite(path: Path, classes: int = 10, dim: int = 64) -> int:
    from ai_edge_litert.tools import flatbuffer_utils as fu

    dtypes = {0: np.float32, 1: np.float16, 9: np.int8}  # TensorType FLOAT32, FLOAT16, INT8
    model = fu.read_model(str(path))
    n = 0
    for t in model.subgraphs[0].tensors:
        buf = model.buffers[t.buffer]
        if t.shape is None or tuple(int(d) for d in t.shape) not in _head_shapes(classes, dim) or buf.data is None:
            continue
        if t.type not in dtypes or len(buf.data) == 0:
            continue
        arr = np.frombuffer(np.asarray(buf.data, np.uint8).tobytes(), dtype=dtypes[t.type])
        buf.data = np.frombuffer(_negated(arr).tobytes(), dtype=np.uint8).copy()
        n += 1
    fu.write_model(model, str(path))
    return n


def perturb_mlpackage(path: Path, classes: int = 10, dim: int = 64) -> int:
    """Negate the classifier weights in the package's weight.bin (fp16 const or int8 quantized_data blob)."""
    from castling_deploy.runtime.mil_interp import _BLOB_META, MILProgram, _np_dtype, _tensor_type

    prog = MILProgram(path)
    n = 0
    for op in prog.block.operations:
        if op.type != "const" and not op.type.startswith("constexpr_"):
            continue
        for key, v in op.attributes.items():
            if key == "name" or v.WhichOneof("value") != "blobFileValue":
                continue
            dtype_name, shape = _tensor_type(v.type)
            if shape not in _head_shapes(classes, dim):
                continue
            weights = prog.weights_dir / v.blobFileValue.fileName.split("/")[-1]
            raw = bytearray(weights.read_bytes())
            at = v.blobFileValue.offset  # a metadata record (sentinel, dtype, size, data offset), then the data
            meta = np.frombuffer(bytes(raw[at : at + _BLOB_META.itemsize]), _BLOB_META)[0]
            start, size = int(meta["offset"]), int(meta["size"])
            arr = np.frombuffer(bytes(raw[start : start + size]), dtype=_np_dtype(dtype_name))
            raw[start : start + size] = _negated(arr).tobytes()
            weights.write_bytes(bytes(raw))
            n += 1
    return n


def perturb(path: Path) -> None:
    n = {".onnx": perturb_onnx, ".tflite": perturb_tflite, ".mlpackage": perturb_mlpackage}[path.suffix](path)
    assert n >= 1, f"found no classifier weights to break in {path}"


def copy_artifact(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
