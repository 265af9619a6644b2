"""Where the time goes: a per-op-type table of an ONNX model on ONNX Runtime CPU, from ORT's own profiler.

``op_time_table(path)`` runs the model ``runs`` times (after ``warmup``) at batch 1 with ORT's profiling on and sums
the kernel times of the trace per op type (the op types ORT actually ran, i.e. after its graph fusions:
``MatMulIntegerToFloat``, ``QLinearConv``, ``Gelu``, ``SkipLayerNormalization``...). The INT8 step stores this table
in report.json (``quantization.per_op``) so a user sees what is int8, what is float, and what is Q/DQ traffic.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

GEMM_OPS = ("MatMul", "Gemm", "Conv", "MatMulIntegerToFloat", "QLinearMatMul", "QLinearConv", "ConvInteger",
            "MatMulInteger", "DynamicQuantizeMatMul", "FusedMatMul", "FusedConv", "FusedGemm", "QGemm",
            "QLinearGemm")


def _session(path: Path, threads: int, prof_dir: str) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(prof_dir, "ort")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _input_for(sess: Any, img_size: int | None) -> dict[str, np.ndarray]:
    inp = sess.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in inp.shape]
    if img_size and len(shape) == 4:
        shape[2] = shape[3] = img_size
    return {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def op_time_table(path: str | Path, *, runs: int = 20, warmup: int = 5, threads: int = 1,
                  img_size: int | None = None) -> dict[str, Any]:
    """{'runs', 'threads', 'total_ms', 'gemm_fraction', 'ops': [{op_type, ms, share, nodes}]} with ms per run,
    sorted by time. ``gemm_fraction``: the share of kernel time in Conv/MatMul/Gemm kernels (float or int8)."""
    with tempfile.TemporaryDirectory(prefix="castling-prof-") as tmp:
        sess = _session(Path(path), threads, tmp)
        feed = _input_for(sess, img_size)
        for _ in range(warmup):
            sess.run(None, feed)
        # Warm-up runs are in the trace too; count only the last `runs` model_run events' kernels.
        for _ in range(runs):
            sess.run(None, feed)
        trace = json.loads(Path(sess.end_profiling()).read_text())
    return summarize_trace(trace, runs, threads)


def summarize_trace(trace: list[dict], runs: int, threads: int) -> dict[str, Any]:
    """Per node, the median of its kernel time over the last ``runs`` runs (robust to a run being preempted on a
    shared host), summed per op type."""
    model_runs = sorted((e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])
    start = model_runs[-runs]["ts"] if len(model_runs) >= runs else 0
    durs: dict[str, list[float]] = defaultdict(list)
    op_of: dict[str, str] = {}
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < start:
            continue
        durs[e["name"]].append(e["dur"])
        op_of[e["name"]] = e.get("args", {}).get("op_name", "?")
    us: dict[str, float] = defaultdict(float)
    nodes: dict[str, int] = defaultdict(int)
    for name, d in durs.items():
        us[op_of[name]] += float(np.median(d))
        nodes[op_of[name]] += 1
    total = sum(us.values())
    ops = [{"op_type": op, "ms": round(t / 1000, 4), "share": round(t / total, 4) if total else 0.0,
            "nodes": nodes[op]} for op, t in sorted(us.items(), key=lambda kv: -kv[1])]
    gemm = sum(t for op, t in us.items() if op in GEMM_OPS)
    return {"runs": runs, "threads": threads, "batch": 1, "statistic": "sum over nodes of the median kernel time",
            "total_ms": round(total / 1000, 3), "gemm_fraction": round(gemm / total, 4) if total else 0.0,
            "ops": ops}


def format_op_table(table: dict[str, Any], top: int = 14) -> str:
    lines = ["| op type | nodes | ms/run | share |", "|---|---:|---:|---:|"]
    for o in table["ops"][:top]:
        lines.append(f"| {o['op_type']} | {o['nodes']} | {o['ms']:.3f} | {100 * o['share']:.1f}% |")
    lines.append(f"| total (kernels) | | {table['total_ms']:.3f} | GEMM share {100 * table['gemm_fraction']:.1f}% |")
    return "\n".join(lines)
