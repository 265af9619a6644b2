"""Delegation census: which ops of a .tflite the XNNPACK delegate takes, which run on LiteRT's builtin kernels.

Method (ai-edge-litert's Python Interpreter; no per-op profiler is exposed there): load the model with the default
delegate (XNNPACK) applied. ``_get_ops_details()`` then lists the original nodes followed by one ``DELEGATE`` node
per partition XNNPACK took. An original node was delegated iff each of its outputs is either an output of a
``DELEGATE`` node or a tensor the runtime never allocated (internal to a partition: the arena planner only
allocates tensors the execution plan touches). Everything else runs on a builtin kernel. Time: the whole model is
timed with XNNPACK and with builtin kernels only (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``), interleaved, medians.
"""
from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

import numpy as np


def _interpreter(path: str | Path, delegate: bool, threads: int = 1) -> Any:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kind = OpResolverType.AUTO if delegate else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interp = Interpreter(model_path=str(path), num_threads=threads, experimental_op_resolver_type=kind)
    interp.allocate_tensors()
    return interp


def _allocated(interp: Any, index: int) -> bool:
    try:
        interp.get_tensor(index)
        return True
    except ValueError:
        return False


def delegation_split(path: str | Path) -> dict[str, Any]:
    """Per op type: how many nodes XNNPACK took and how many run on builtin kernels."""
    interp = _interpreter(path, delegate=True)
    ops = interp._get_ops_details()
    partitions = [o for o in ops if o["op_name"] == "DELEGATE"]
    delegate_out = {int(t) for o in partitions for t in o["outputs"]}
    graph_io = {d["index"] for d in interp.get_input_details() + interp.get_output_details()}
    delegated: collections.Counter[str] = collections.Counter()
    builtin: collections.Counter[str] = collections.Counter()
    for op in ops:
        if op["op_name"] == "DELEGATE":
            continue
        outs = [int(t) for t in op["outputs"]]
        taken = all(t in delegate_out or (t not in graph_io and not _allocated(interp, t)) for t in outs)
        (delegated if taken else builtin)[op["op_name"]] += 1
    total = sum(delegated.values()) + sum(builtin.values())
    return {
        "method": "ai-edge-litert Interpreter, default XNNPACK delegate: node delegated iff its outputs are DELEGATE "
                  "outputs or unallocated partition-internal tensors",
        "xnnpack_partitions": len(partitions),
        "ops_total": total,
        "ops_on_xnnpack": sum(delegated.values()),
        "ops_on_builtin": sum(builtin.values()),
        "fraction_on_xnnpack": round(sum(delegated.values()) / max(1, total), 4),
        "builtin_ops": dict(builtin.most_common()),
        "xnnpack_ops": dict(delegated.most_common()),
    }


def _feed_zeros(interp: Any) -> None:
    for d in interp.get_input_details():
        interp.set_tensor(d["index"], np.zeros(d["shape"], dtype=d["dtype"]))


def delegation_timing(path: str | Path, runs: int = 10, threads: int = 1) -> dict[str, Any]:
    """Median latency (ms) with XNNPACK vs builtin kernels only, interleaved so a noisy host hits both alike."""
    interps = {"xnnpack": _interpreter(path, True, threads), "builtin_only": _interpreter(path, False, threads)}
    samples: dict[str, list[float]] = {k: [] for k in interps}
    for interp in interps.values():
        _feed_zeros(interp)
        interp.invoke()
    for _ in range(runs):
        for name, interp in interps.items():
            t = time.perf_counter()
            interp.invoke()
            samples[name].append((time.perf_counter() - t) * 1e3)
    med = {k: float(np.median(v)) for k, v in samples.items()}
    return {"threads": threads, "runs": runs, "p50_ms_with_xnnpack": round(med["xnnpack"], 3),
            "p50_ms_builtin_only": round(med["builtin_only"], 3),
            "xnnpack_speedup": round(med["builtin_only"] / max(med["xnnpack"], 1e-9), 3)}


def delegation_census(path: str | Path, runs: int = 10, threads: int = 1) -> dict[str, Any]:
    """The split and the timing in one dict (what report.json records per .tflite artifact)."""
    out = delegation_split(path)
    if runs > 0:
        out["timing"] = delegation_timing(path, runs, threads)
    return out
