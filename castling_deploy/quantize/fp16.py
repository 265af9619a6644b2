"""Typed mixed precision: a float ONNX (or an INT8 QDQ ONNX) -> fp16, with the ops that need range kept fp32.

Why: TensorRT 11 builds every network strongly typed (TensorRT 10.12+ can): the precision of each tensor is the
type it has in the ONNX graph, and the builder flags that let TensorRT pick fp16 by itself are gone. An fp16 engine
therefore needs fp16 tensors in the ONNX, and an INT8 QDQ model whose float parts are fp32 would run them in fp32.

The policy (``FP16_POLICY``; the same one NVIDIA's ModelOpt AutoCast applies when told to exclude these ops):
- kept fp32: LayerNormalization; the L2 norms (``ReduceL2 -> Clip -> Div`` of q, k and of the attention output,
  or LpNormalization); Softmax (the softmax baseline); the final logits (the compute node that produces a graph
  output, and anything between it and the output);
- fp16: the compute ops in ``FP16_OPS`` (Conv, MatMul, Gemm, the element-wise ops, Erf) with their weights, and
  the Q/DQ nodes in front of an fp16 consumer (fp16 scales: opset 19);
- data-movement ops (``FOLLOW_OPS``: Reshape, Transpose, Gather, ...) take the type of their input;
- any other op stays fp32, and so does an op whose float initializer does not fit fp16 (|x| > 65504);
- graph inputs and outputs keep their exported types (fp32): a Cast after the input and before the output.
A Cast sits at every fp32/fp16 boundary (one per tensor and direction; TensorRT fuses them).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..output import atomic_path

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16
FP16_MAX = 65504.0
PRECISION_METADATA_KEY = "castling_deploy.precision"

KEEP_FP32_OPS = ("LayerNormalization", "ReduceL2", "ReduceSumSquare", "LpNormalization", "Softmax")
# Between a ReduceL2 and the Div that normalizes with it (x / clamp_min(||x||, eps)): the eps does not exist in fp16.
NORM_CHAIN_OPS = ("Clip", "Max", "Add", "Sqrt", "Reshape", "Unsqueeze", "Squeeze", "Expand", "Transpose")
NORM_APPLY_OPS = ("Div", "Mul")
FP16_OPS = ("Conv", "MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "Neg",
            "Abs", "QuantizeLinear", "DequantizeLinear")
FOLLOW_OPS = ("Reshape", "Transpose", "Gather", "Slice", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Concat",
              "Split", "Expand", "Tile")
TYPELESS_OPS = ("Shape", "Size", "Cast")  # read only the shape of their input, or fix their output type
LOGIT_COMPUTE_OPS = ("Gemm", "MatMul", "Conv")
FP16_POLICY = {
    "fp32": ["LayerNormalization", "L2 norms (ReduceL2 -> Clip -> Div, LpNormalization)", "Softmax",
             "the final logits (the compute node producing each graph output and what follows it)",
             "ops outside the fp16 list", "ops with a float initializer beyond the fp16 range"],
    "fp16": list(FP16_OPS),
    "follow_input": list(FOLLOW_OPS),
    "io": "as exported (fp32), with Casts at the boundary",
}


@dataclass
class _Graph:
    """Index of one ONNX graph: producers, consumers, initializers, which tensors are fp32."""

    model: Any
    producers: dict[str, Any] = field(default_factory=dict)
    consumers: dict[str, list[Any]] = field(default_factory=dict)
    inits: dict[str, Any] = field(default_factory=dict)
    float_tensors: set[str] = field(default_factory=set)

    @classmethod
    def index(cls, model: Any) -> "_Graph":
        import onnx

        g = cls(model)
        for n in model.graph.node:
            for o in n.output:
                g.producers[o] = n
            for i in n.input:
                g.consumers.setdefault(i, []).append(n)
        g.inits = {i.name: i for i in model.graph.initializer}
        typed = onnx.shape_inference.infer_shapes(model)
        for vi in [*typed.graph.input, *typed.graph.output, *typed.graph.value_info]:
            if vi.type.tensor_type.elem_type == FLOAT:
                g.float_tensors.add(vi.name)
        g.float_tensors |= {name for name, t in g.inits.items() if t.data_type == FLOAT}
        return g


def _hoist_constants(model: Any) -> None:
    """Constant nodes with a tensor value become initializers, so that one rule converts every float constant."""
    keep = []
    for n in model.graph.node:
        attr = {a.name: a for a in n.attribute}
        if n.op_type == "Constant" and "value" in attr and not n.domain:
            t = attr["value"].t
            t.name = n.output[0]
            model.graph.initializer.append(t)
        else:
            keep.append(n)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _norm_nodes(g: _Graph) -> set[str]:
    """The nodes of every L2 norm: the reduction, the eps clamp and the Div/Mul that applies it."""
    out: set[str] = set()
    for n in g.model.graph.node:
        if n.op_type not in ("ReduceL2", "ReduceSumSquare"):
            continue
        frontier = list(n.output)
        while frontier:
            for c in g.consumers.get(frontier.pop(), []):
                if c.op_type in NORM_CHAIN_OPS and c.name not in out:
                    out.add(c.name)
                    frontier.extend(c.output)
                elif c.op_type in NORM_APPLY_OPS:
                    out.add(c.name)
    return out


def _logit_nodes(g: _Graph) -> set[str]:
    """The compute node producing each graph output and the nodes between it and the output (e.g. a bias Add)."""
    out: set[str] = set()
    for o in g.model.graph.output:
        frontier = [o.name]
        for _ in range(16):
            if not frontier:
                break
            node = g.producers.get(frontier.pop())
            if node is None or node.op_type in ("DequantizeLinear", "QuantizeLinear"):
                continue
            out.add(node.name)
            if node.op_type not in LOGIT_COMPUTE_OPS:
                frontier.extend(i for i in node.input if i in g.float_tensors and i not in g.inits)
    return out


def _out_of_range(g: _Graph, node: Any) -> bool:
    from onnx import numpy_helper

    for i in node.input:
        t = g.inits.get(i)
        if t is not None and t.data_type == FLOAT:
            a = numpy_helper.to_array(t)
            if a.size and not (np.isfinite(a).all() and np.abs(a).max() <= FP16_MAX):
                return True
    return False


def _fixed_precisions(g: _Graph) -> tuple[dict[str, str], dict[str, str]]:
    """Precision of every node the policy decides by itself: {name: 'fp16'|'fp32'|'follow'|'qdq'|'typeless'},
    and the reason of every policy fp32 decision."""
    norms, logits = _norm_nodes(g), _logit_nodes(g)
    prec: dict[str, str] = {}
    why: dict[str, str] = {}
    for n in g.model.graph.node:
        if not n.name:
            raise UsageError("the ONNX graph has unnamed nodes; re-export it with castling-deploy")
        reason = ("kept op" if n.op_type in KEEP_FP32_OPS else "L2 norm" if n.name in norms
                  else "final logits" if n.name in logits else None)
        if reason is None and n.op_type not in FP16_OPS + FOLLOW_OPS + TYPELESS_OPS:
            reason = "op not in the fp16 list"
        if reason is None and n.op_type not in TYPELESS_OPS and _out_of_range(g, n):
            reason = "initializer beyond the fp16 range"
        if reason is not None:
            prec[n.name], why[n.name] = "fp32", reason
        elif n.op_type in TYPELESS_OPS:
            prec[n.name] = "typeless"
        elif n.op_type in FOLLOW_OPS:
            prec[n.name] = "follow"
        elif n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            prec[n.name] = "qdq"
        else:
            prec[n.name] = "fp16"
    return prec, why


def policy_fp32_nodes(model: Any) -> dict[str, str]:
    """{node name: reason} for every node the policy keeps fp32 by itself (kept op, L2 norm, final logits); used to
    give ModelOpt AutoCast the same exclusions."""
    _, why = _fixed_precisions(_Graph.index(model))
    return {name: reason for name, reason in why.items() if reason in ("kept op", "L2 norm", "final logits")}


def _consumer_precision(g: _Graph, prec: dict[str, str], tensor: str, depth: int = 0) -> set[str]:
    """The precisions of the compute nodes that read ``tensor``, looking through data-movement ops and Q/DQ."""
    found: set[str] = set()
    for c in g.consumers.get(tensor, []):
        p = prec[c.name]
        if p in ("fp16", "fp32"):
            found.add(p)
        elif p in ("follow", "qdq") and depth < 32:
            for o in c.output:
                found |= _consumer_precision(g, prec, o, depth + 1)
    return found


def _resolve(g: _Graph, prec: dict[str, str]) -> dict[str, str]:
    """Q/DQ take the precision of the compute node they feed (one scale type per Q/DQ pair); data-movement ops
    that of their input (fp16 when any non-constant float input is fp16 or all are constants)."""
    for n in g.model.graph.node:
        if prec[n.name] == "qdq":
            prec[n.name] = "fp16" if "fp16" in _consumer_precision(g, prec, n.output[0]) else "fp32"
    resolved = dict(prec)
    for n in g.model.graph.node:
        if prec[n.name] != "follow":
            continue
        dyn = [i for i in n.input if i in g.float_tensors and i not in g.inits]
        if not dyn and not any(i in g.inits and i in g.float_tensors for i in n.input):
            resolved[n.name] = "fp32"  # no float input at all: leave it as it is
            continue
        kinds = {_tensor_precision(g, resolved, i) for i in dyn}
        resolved[n.name] = "fp16" if (not dyn or "fp16" in kinds) else "fp32"
    return resolved


def _tensor_precision(g: _Graph, prec: dict[str, str], tensor: str) -> str:
    node = g.producers.get(tensor)
    return "fp32" if node is None else prec.get(node.name, "fp32")


def _cast_node(src: str, to: int, name: str) -> Any:
    from onnx import helper

    return helper.make_node("Cast", [src], [name], to=to, name=name)


def _rewrite(g: _Graph, prec: dict[str, str]) -> dict[str, int]:
    """Give every node inputs of its own type: Casts for node outputs and graph inputs, fp16 copies of the float
    initializers that fp16 nodes read. Returns counts for the report."""
    from onnx import numpy_helper

    graph = g.model.graph
    casts: dict[tuple[str, int], str] = {}
    init_fp16: dict[str, str] = {}
    fp32_users = {i for n in graph.node if prec[n.name] == "fp32" for i in n.input if i in g.inits}
    new_nodes = []
    for n in graph.node:
        p = prec[n.name]
        if p == "typeless":
            new_nodes.append(n)
            continue
        want = FLOAT16 if p == "fp16" else FLOAT
        for k, name in enumerate(n.input):
            if name not in g.float_tensors:
                continue
            if name in g.inits:
                if want == FLOAT16:
                    n.input[k] = init_fp16.setdefault(name, f"{name}__fp16" if name in fp32_users else name)
                continue
            have = FLOAT16 if _tensor_precision(g, prec, name) == "fp16" else FLOAT
            if have != want:
                key = (name, want)
                if key not in casts:
                    casts[key] = f"{name}__to_{'fp16' if want == FLOAT16 else 'fp32'}"
                    new_nodes.append(_cast_node(name, want, casts[key]))
                n.input[k] = casts[key]
        new_nodes.append(n)
    for name, new in init_fp16.items():
        a = numpy_helper.to_array(g.inits[name]).astype(np.float16)
        t = numpy_helper.from_array(a, new)
        if new == name:
            g.inits[name].CopyFrom(t)
        else:
            graph.initializer.append(t)
    outputs = _cast_outputs(g, prec, new_nodes)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return {"casts": len(casts) + outputs, "initializers_fp16": len(init_fp16)}


def _cast_outputs(g: _Graph, prec: dict[str, str], nodes: list[Any]) -> int:
    """Graph outputs keep their exported fp32 type: an fp16 producer writes ``name__fp16`` and a Cast restores it."""
    n = 0
    for o in g.model.graph.output:
        if o.name not in g.float_tensors or _tensor_precision(g, prec, o.name) != "fp16":
            continue
        inner = f"{o.name}__fp16"
        for node in nodes:
            node.input[:] = [inner if i == o.name else i for i in node.input]
            node.output[:] = [inner if x == o.name else x for x in node.output]
        nodes.append(_cast_node(inner, FLOAT, o.name))
        n += 1
    return n


def _set_opset(model: Any, minimum: int) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, minimum)
            return o.version
    raise UsageError("the ONNX model has no default-domain opset import")


def convert_fp16(model: Any) -> tuple[Any, dict[str, Any]]:
    """The typed mixed-precision copy of an ONNX ModelProto (changed in place and returned) and what was done."""
    import onnx

    _hoist_constants(model)
    g = _Graph.index(model)
    fixed, why = _fixed_precisions(g)
    prec = _resolve(g, fixed)
    counts = _rewrite(g, prec)
    qdq16 = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and prec.get(n.name) == "fp16"
                for n in model.graph.node)
    opset = _set_opset(model, 19 if qdq16 else 1)  # fp16 Q/DQ scales need QuantizeLinear-19
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    kept: dict[str, int] = {}
    for name, reason in why.items():
        kept[reason] = kept.get(reason, 0) + 1
    ops = [n for n in model.graph.node if n.op_type != "Cast" and n.name in prec and prec[n.name] != "typeless"]
    info = {
        "policy": FP16_POLICY,
        "nodes_fp16": sum(prec[n.name] == "fp16" for n in ops),
        "nodes_fp32": sum(prec[n.name] == "fp32" for n in ops),
        "kept_fp32": kept,
        "kept_fp32_ops": sorted({n.op_type for n in ops if prec[n.name] == "fp32"}),
        "qdq_scales": "fp16" if qdq16 else ("fp32" if any(n.op_type == "QuantizeLinear" for n in ops) else None),
        "opset": opset,
        **counts,
    }
    return model, info


def write_fp16_onnx(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Write the typed fp16 copy of ``src`` to ``dst`` (atomically; ``dst`` may be ``src``), checked by the ONNX
    checker with strict type inference. Returns what was converted (for the report)."""
    import onnx

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise UsageError(f"{src}: no such ONNX model")
    model, info = convert_fp16(onnx.load(str(src)))
    meta = {p.key: p.value for p in model.metadata_props}
    meta[PRECISION_METADATA_KEY] = json.dumps({k: v for k, v in info.items() if k != "policy"}, sort_keys=True)
    del model.metadata_props[:]
    for k, v in meta.items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
    info["bytes"] = dst.stat().st_size
    return info


def precision_census(path: str | Path) -> dict[str, Any]:
    """What an ONNX file really computes in fp16, read from the file: node outputs by element type, the float
    types of Q/DQ scales, the I/O types."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             [*model.graph.input, *model.graph.output, *model.graph.value_info]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    by_op: dict[str, dict[str, int]] = {}
    for n in model.graph.node:
        if n.op_type in ("Cast", *TYPELESS_OPS) or not n.output:
            continue
        t = types.get(n.output[0])
        if t in (FLOAT, FLOAT16):
            row = by_op.setdefault(n.op_type, {"fp16": 0, "fp32": 0})
            row["fp16" if t == FLOAT16 else "fp32"] += 1
    scales = sorted({onnx.TensorProto.DataType.Name(types[n.input[1]]) for n in model.graph.node
                     if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[1] in types})
    name = onnx.TensorProto.DataType.Name
    return {
        "by_op": dict(sorted(by_op.items())),
        "fp16_nodes": sum(r["fp16"] for r in by_op.values()),
        "fp32_nodes": sum(r["fp32"] for r in by_op.values()),
        "casts": sum(n.op_type == "Cast" for n in model.graph.node),
        "qdq_scale_types": scales,
        "inputs": [name(i.type.tensor_type.elem_type) for i in model.graph.input],
        "outputs": [name(o.type.tensor_type.elem_type) for o in model.graph.output],
        "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
    }
