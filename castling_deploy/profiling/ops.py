"""Per-op time of an ONNX model from ONNX Runtime's own profiling trace (Chrome trace JSON).

A separate, profiling-enabled session is used so the tracing overhead never leaks into the latency numbers.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

TOP_K = 15


def aggregate_ort_trace(events: list[dict], runs: int, top_k: int = TOP_K) -> dict:
    """Sum kernel time per op type and per node over ``runs`` profiled runs; report ms per run."""
    by_type: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_node: dict[str, list] = {}
    model_run_us: list[float] = []
    for ev in events:
        if ev.get("cat") == "Session" and ev.get("name") == "model_run":
            model_run_us.append(float(ev.get("dur", 0)))
        if ev.get("cat") != "Node" or not str(ev.get("name", "")).endswith("_kernel_time"):
            continue
        args = ev.get("args", {})
        op = str(args.get("op_name", "?"))
        node = str(ev["name"])[: -len("_kernel_time")]
        dur = float(ev.get("dur", 0))
        by_type[op][0] += dur
        by_type[op][1] += 1
        entry = by_node.setdefault(node, [op, 0.0, str(args.get("provider", ""))])
        entry[1] += dur
    runs = max(runs, 1)
    kernel_total_us = sum(v[0] for v in by_type.values())
    denom = kernel_total_us or 1.0
    types = [
        {
            "op_type": op,
            "ms_per_run": round(us / runs / 1000.0, 4),
            "percent": round(100.0 * us / denom, 2),
            "nodes": count // runs,
        }
        for op, (us, count) in by_type.items()
    ]
    types.sort(key=lambda r: -r["ms_per_run"])
    nodes = [
        {
            "node": name,
            "op_type": op,
            "ms_per_run": round(us / runs / 1000.0, 4),
            "percent": round(100.0 * us / denom, 2),
            "provider": provider,
        }
        for name, (op, us, provider) in by_node.items()
    ]
    nodes.sort(key=lambda r: -r["ms_per_run"])
    return {
        "source": "onnxruntime profiling trace",
        "profiled_runs": runs,
        "kernel_ms_per_run": round(kernel_total_us / runs / 1000.0, 4),
        "model_run_ms_mean": round(float(np.mean(model_run_us)) / 1000.0, 4) if model_run_us else None,
        "op_types": len(types),
        "node_count": len(nodes),
        "by_op_type": types[:top_k],
        "by_node": nodes[:top_k],
    }


def ort_per_op(path: Path, x: np.ndarray, *, threads: int | None, runs: int, warmup: int = 2) -> dict:
    """Profile ``runs`` runs of ``x`` through a fresh profiling-enabled ORT session; aggregate the trace."""
    from ..runtime.ort import OrtRunner

    with tempfile.TemporaryDirectory(prefix="castling-ort-profile-") as tmp:
        runner = OrtRunner(path, threads=threads, profile_prefix=os.path.join(tmp, "ort"))
        for _ in range(warmup):
            runner.run(x)
        for _ in range(runs):
            runner.run(x)
        trace_file = runner.session.end_profiling()
        events = json.loads(Path(trace_file).read_text())
    # Warmup runs are the first ``warmup`` model_run spans; drop node events that fall inside them.
    runs_spans = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        for e in events
        if e.get("cat") == "Session" and e.get("name") == "model_run"
    )
    if len(runs_spans) > warmup:
        cutoff = runs_spans[warmup][0]
        events = [e for e in events if float(e.get("ts", 0)) >= cutoff or e.get("cat") != "Node"]
        events = [e for e in events if not (e.get("cat") == "Session" and float(e.get("ts", 0)) < cutoff)]
    return aggregate_ort_trace(events, runs)
