"""Per-tensor error trace: where a quantized .tflite first loses the signal of its float twin.

Both models run on the same inputs with LiteRT's builtin kernels and every intermediate tensor kept
(``experimental_preserve_all_tensors``; XNNPACK-delegated tensors are not readable). Tensors are matched by name
(ai-edge-quantizer quantizes a tensor in place and keeps its name), the quantized one is dequantized with its
own scale / zero point, and each gets an SQNR in dB (``10 log10(sum ref^2 / sum err^2)``) over all inputs, in
execution order of the quantized graph. The first tensor whose SQNR falls below a threshold is where the signal
is lost; a large drop between a tensor and its producer's inputs names the op responsible.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np


def keeping_interpreter(model: str | Path | bytes, threads: int = 1) -> Any:
    """A LiteRT interpreter on builtin kernels that keeps every intermediate tensor readable after ``invoke``."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    src = {"model_content": bytes(model)} if isinstance(model, (bytes, bytearray)) else {"model_path": str(model)}
    with warnings.catch_warnings():  # "preserve_all_tensors is for debugging": reading them is the point here
        warnings.simplefilter("ignore", UserWarning)
        interp = Interpreter(
            **src, num_threads=threads, experimental_preserve_all_tensors=True,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
    interp.allocate_tensors()
    return interp


def feed(interp: Any, image: np.ndarray) -> None:
    """Run one CHW image (batch 1): transposed for an NHWC model, quantized for an integer input."""
    detail = interp.get_input_details()[0]
    x = image[None].astype(np.float32)
    if list(detail["shape"][1:]) != list(x.shape[1:]):  # NHWC model
        x = x.transpose(0, 2, 3, 1)
    if not np.issubdtype(detail["dtype"], np.floating):
        scale, zero = detail["quantization"]
        info = np.iinfo(detail["dtype"])
        x = np.clip(np.round(x / scale) + zero, info.min, info.max)
    interp.set_tensor(detail["index"], x.astype(detail["dtype"]))
    interp.invoke()


def _value(interp: Any, detail: dict[str, Any]) -> np.ndarray | None:
    try:
        v = interp.get_tensor(detail["index"])
    except ValueError:
        return None
    if np.issubdtype(v.dtype, np.floating):
        return v.astype(np.float64)
    scale, zero = detail["quantization"]
    if not scale:
        return None
    return (v.astype(np.float64) - zero) * scale


def _execution_order(interp: Any) -> list[tuple[str, list[int], list[int]]]:
    return [(op["op_name"], list(op["inputs"]), list(op["outputs"])) for op in interp._get_ops_details()]


def trace_tensors(float_path: str | Path | bytes, quant_path: str | Path | bytes,
                  images: Iterable[np.ndarray]) -> list[dict[str, Any]]:
    """One row per op output of the quantized model that has a float twin: op, tensor, dtype, SQNR, range.

    ``float_path`` must be the float model the quantizer was given (for full-integer: the rewritten graph,
    ``convert_tflite(..., info)["float_twin"]``), or names will not match."""
    ref, qnt = keeping_interpreter(float_path), keeping_interpreter(quant_path)
    ref_by_name = {d["name"]: d for d in ref.get_tensor_details()}
    q_details = {d["index"]: d for d in qnt.get_tensor_details()}
    order = _execution_order(qnt)
    sig: dict[str, float] = {}
    err: dict[str, float] = {}
    amax: dict[str, float] = {}
    for image in images:
        feed(ref, image)
        feed(qnt, image)
        for _, _, outputs in order:
            for idx in outputs:
                d = q_details[idx]
                twin = ref_by_name.get(d["name"])
                if twin is None:
                    continue
                a, b = _value(ref, twin), _value(qnt, d)
                if a is None or b is None or a.shape != b.shape:
                    continue
                sig[d["name"]] = sig.get(d["name"], 0.0) + float((a * a).sum())
                err[d["name"]] = err.get(d["name"], 0.0) + float(((a - b) ** 2).sum())
                amax[d["name"]] = max(amax.get(d["name"], 0.0), float(np.abs(a).max()))
    rows = []
    db = {q_details[i]["name"]: _db(sig[q_details[i]["name"]], err[q_details[i]["name"]])
          for _, _, outs in order for i in outs if q_details[i]["name"] in sig}
    for pos, (op, inputs, outputs) in enumerate(order):
        in_db = [db[q_details[i]["name"]] for i in inputs if i in q_details and q_details[i]["name"] in db]
        for idx in outputs:
            d = q_details[idx]
            name = d["name"]
            if name not in sig:
                continue
            scale = d["quantization"][0]
            rows.append({
                "position": pos, "op": op, "tensor": name, "dtype": np.dtype(d["dtype"]).name,
                "sqnr_db": round(_db(sig[name], err[name]), 2), "abs_max": round(amax[name], 5),
                "scale": float(scale) if scale else None,
                "input_sqnr_db": round(min(in_db), 2) if in_db else None,
            })
    return rows


def _db(signal: float, noise: float) -> float:
    return float(10 * np.log10(max(signal, 1e-30) / max(noise, 1e-30)))


def first_loss(rows: list[dict[str, Any]], threshold_db: float = 20.0) -> dict[str, Any] | None:
    """The first traced tensor whose SQNR is below ``threshold_db`` (None: the signal survives everywhere)."""
    return next((r for r in rows if r["sqnr_db"] < threshold_db), None)


def worst_drops(rows: list[dict[str, Any]], k: int = 10) -> list[dict[str, Any]]:
    """The ``k`` ops that lose the most dB between their (worst traced) input and their output."""
    out = [dict(r, drop_db=round(min(r["input_sqnr_db"], 99.0) - r["sqnr_db"], 2))
           for r in rows if r.get("input_sqnr_db") is not None]
    return sorted(out, key=lambda r: -r["drop_db"])[:k]
