"""ONNX Runtime's transformer optimizer as an optional float-graph step before INT8 (ORT-only artifacts).

``ort_fuse(src, dst)`` runs ``onnxruntime.transformers.optimizer.optimize_model`` (model_type "vit", python
fusions only, opt_level 0): it fuses the erf GELU (Div/Erf/Add/Mul/Mul -> com.microsoft Gelu) and LayerNorm
patterns. The result holds com.microsoft contrib ops, so it is for ONNX Runtime only, never for the TensorRT
target's QDQ model. Measured in benchmarks/bench_int8.py (rows "ORT-fused"); see benchmarks/results/int8.md for
whether it pays.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import sys
from pathlib import Path
from typing import Any


def ort_fuse(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Write the fused float model to ``dst``; returns {'fused_ops': {op: count}, 'nodes_before', 'nodes'}."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    before = onnx.load(str(src), load_external_data=False)
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(sys.stderr):
        opt = optimize_model(str(src), model_type="vit", num_heads=0, hidden_size=0, opt_level=0)
    opt.model.producer_name = before.producer_name
    opt.save_model_to_file(str(dst))
    old = collections.Counter(n.op_type for n in before.graph.node)
    new = collections.Counter(n.op_type for n in opt.model.graph.node)
    return {"fused_ops": {k: v for k, v in new.items() if v > old.get(k, 0)}, "nodes_before": len(before.graph.node),
            "nodes": len(opt.model.graph.node)}
