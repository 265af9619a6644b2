"""What a (QDQ) ONNX artifact really runs in int8, read from the file itself — not from the recipe that made it.

A compute node (Conv/MatMul/Gemm) counts as int8 when both its data inputs come from DequantizeLinear of an
8-bit tensor: ONNX Runtime and TensorRT then fuse the pattern into an integer kernel. MACs are for batch 1: the
graph inputs' symbolic batch dim is bound to 1 and ONNX shape inference re-run, so dims derived from it (an exporter
flattening batch x tokens before each Gemm) come out concrete too; any dim still symbolic is taken as 1.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .graph import COMPUTE_OPS, GraphStructureError, classify_nodes

_8BIT = {2: "uint8", 3: "int8"}  # onnx.TensorProto.UINT8 / INT8
# com.microsoft ops whose one output has its one input's shape and type (ORT's transformer fusions make Gelu).
_ELEMENTWISE_CONTRIB = ("Gelu", "FastGelu")


def _dims(vi: "onnx.ValueInfoProto") -> list[int] | None:  # noqa: F821
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]


def _macs(node, shapes: dict[str, list[int]], inits: dict[str, Any]) -> int:
    out = shapes.get(node.output[0])
    if out is None:
        return 0
    if node.op_type == "Conv":
        w = shapes.get(node.input[1])
        if w is None:
            return 0
        return int(np.prod(out, dtype=np.int64) * int(np.prod(w[1:], dtype=np.int64)))
    a = shapes.get(node.input[0])
    if a is None:
        return 0
    k = a[-1]
    if node.op_type == "Gemm":
        trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
        k = a[0] if trans_a else a[-1]
    return int(np.prod(out, dtype=np.int64) * k)


def _bind_batch_to_1(model: "onnx.ModelProto") -> bool:  # noqa: F821
    """Set each graph input's symbolic leading (batch) dim to 1, in place; True if any was symbolic."""
    bound = False
    for vi in model.graph.input:
        shape = vi.type.tensor_type.shape if vi.type.HasField("tensor_type") else None
        if shape is None or not shape.dim or shape.dim[0].HasField("dim_value"):
            continue
        shape.dim[0].Clear()
        shape.dim[0].dim_value = 1
        bound = True
    return bound


def _infer_shapes_at_batch_1(model: "onnx.ModelProto") -> "onnx.ModelProto":  # noqa: F821
    """Shape inference with the batch bound to 1 on ``model`` (loaded for the census only, so edited in place).

    The stale value_info is dropped first: it holds the exporter's symbolic dims (``unk__3`` for batch x tokens),
    which inference would otherwise keep. If inference fails, the model comes back with that value_info restored
    (MACs then read 0 or take symbolic dims as 1) — the census still reports precisions without them."""
    import onnx

    stale = list(model.graph.value_info)
    if _bind_batch_to_1(model):
        del model.graph.value_info[:]
    # ONNX's inference does not know ONNX Runtime's contrib ops and leaves everything after them unshaped (the
    # onnx target's INT8 model holds com.microsoft Gelu from ORT's fusions), so while inferring, the elementwise
    # ones are spelled as a standard elementwise op with the same output shape and type.
    swapped = [(i, n.op_type, n.domain) for i, n in enumerate(model.graph.node)
               if n.domain == "com.microsoft" and n.op_type in _ELEMENTWISE_CONTRIB and len(n.input) == 1
               and not n.attribute]
    for i, _, _ in swapped:
        model.graph.node[i].op_type, model.graph.node[i].domain = "Relu", ""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # census still works without MACs
        inferred = model
        if not model.graph.value_info:
            model.graph.value_info.extend(stale)
    for m in {id(model): model, id(inferred): inferred}.values():
        for i, op_type, domain in swapped:
            m.graph.node[i].op_type, m.graph.node[i].domain = op_type, domain
    return inferred


def onnx_census(path: str | Path) -> dict[str, Any]:
    """Op histogram, int8 vs float compute nodes (count and MACs), initializer dtypes, zero-point symmetry."""
    import onnx
    from onnx import numpy_helper

    model = _infer_shapes_at_batch_1(onnx.load(str(path)))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    shapes: dict[str, list[int]] = {}
    for vi in [*g.input, *g.output, *g.value_info]:
        d = _dims(vi)
        if d is not None:
            shapes[vi.name] = d
    for i in g.initializer:
        shapes[i.name] = list(i.dims)

    def qdtype(tensor: str) -> str | None:
        """The 8-bit dtype feeding ``tensor`` through a DequantizeLinear, else None (float)."""
        dq = producers.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        src = dq.input[0]
        if src in inits:
            return _8BIT.get(inits[src].data_type)
        q = producers.get(src)
        if q is not None and q.op_type == "QuantizeLinear":
            if len(q.input) > 2 and q.input[2] in inits:
                return _8BIT.get(inits[q.input[2]].data_type)
            return "uint8"  # QuantizeLinear's default output type
        return None

    try:
        roles = {r.name: r for r in classify_nodes(model)}
    except GraphStructureError:
        roles = {}
    compute: list[dict[str, Any]] = []
    for n in g.node:
        if n.op_type not in COMPUTE_OPS:
            continue
        dts = [qdtype(t) for t in n.input[:2]]
        dtype = "int8" if dts == ["int8", "int8"] else ("uint8/int8" if all(dts) else "float")
        role = roles.get(n.name)
        compute.append(
            {
                "name": n.name,
                "op_type": n.op_type,
                "unit": role.unit if role else None,
                "kind": role.kind if role else None,
                "weight": (n.input[1] in inits) or (producers.get(n.input[1]) is not None
                                                   and producers[n.input[1]].input[0] in inits),
                "precision": dtype,
                "macs": _macs(n, shapes, inits),
            }
        )

    zps: list[np.ndarray] = []
    zp_dtypes: Counter[str] = Counter()
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            zp = inits[n.input[2]]
            zps.append(numpy_helper.to_array(zp))
            zp_dtypes[onnx.TensorProto.DataType.Name(zp.data_type)] += 1
    init_counts: Counter[str] = Counter()
    init_bytes: Counter[str] = Counter()
    for i in g.initializer:
        name = onnx.TensorProto.DataType.Name(i.data_type)
        init_counts[name] += 1
        init_bytes[name] += numpy_helper.to_array(i).nbytes

    total_macs = sum(c["macs"] for c in compute)
    int8_macs = sum(c["macs"] for c in compute if c["precision"] == "int8")
    weight_ops = [c for c in compute if c["weight"]]
    by_kind: dict[str, dict[str, int]] = {}
    for c in compute:
        k = by_kind.setdefault(c["kind"] or c["op_type"], {"int8": 0, "float": 0})
        k["int8" if c["precision"] == "int8" else "float"] += 1
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return {
        "opset": opset,
        "domains": sorted({n.domain or "ai.onnx" for n in g.node}),  # used by nodes, not just declared
        "op_types": dict(sorted(Counter(n.op_type for n in g.node).items())),
        "compute_nodes": len(compute),
        "int8_compute_nodes": sum(c["precision"] == "int8" for c in compute),
        "float_compute_nodes": [c["name"] for c in compute if c["precision"] == "float"],
        "weight_ops_int8": sum(c["precision"] == "int8" for c in weight_ops),
        "weight_ops": len(weight_ops),
        "by_kind": by_kind,
        "macs_total": total_macs,
        "macs_int8": int8_macs,
        "int8_mac_fraction": round(int8_macs / total_macs, 6) if total_macs else 0.0,
        "int8_node_fraction": round(sum(c["precision"] == "int8" for c in compute) / len(compute), 6)
        if compute else 0.0,
        "initializer_dtypes": dict(init_counts),
        "initializer_bytes": dict(init_bytes),
        "dq_int32_inputs": sum(
            n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type == 6 for n in g.node
        ),
        "qdq_nodes": sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.node),
        "zero_points": len(zps),
        "zero_point_dtypes": dict(zp_dtypes),
        "zero_points_all_zero": bool(zps) and all(not np.any(z) for z in zps),
        "nodes": compute,
    }
