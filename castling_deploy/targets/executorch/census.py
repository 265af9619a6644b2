"""What a ``.pte`` really runs, read from the file: which ops XNNPACK took, which stayed on ExecuTorch's portable
kernels, and where the multiply-accumulates are (delegated or not, int8 or float).

The program flatbuffer is read with ExecuTorch's own deserializer; each XNNPACK delegate payload (an ``XNNHeader``
followed by an ``XNNGraph`` flatbuffer) is decoded to JSON with the ``flatc`` and ``schema.fbs`` that ship in the
executorch wheel. MACs: fully connected = output elements x input features, batch matmul = output elements x the
shared dimension, convolution = output elements x kernel area x input channels per group. Portable kernels are
counted from their argument tensors' shapes in the program (mm, bmm, addmm, linear, convolution).
"""
from __future__ import annotations

import collections
import json
import math
import re
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from ...errors import UsageError
from ...optional import import_optional

INT8_TYPES = frozenset({"xnn_datatype_qint8", "xnn_datatype_quint8", "xnn_datatype_qdint8", "xnn_datatype_qpint8"})
_PORTABLE_MAC_OPS = ("mm", "bmm", "addmm", "linear", "convolution", "matmul")


def _read_program(path: Path) -> Any:
    import_optional("executorch.exir", "executorch", "executorch", "reading .pte files")
    from executorch.exir._serialize._program import deserialize_pte_binary

    if not path.is_file():
        raise UsageError(f"{path}: no such .pte file")
    try:
        return deserialize_pte_binary(path.read_bytes()).program
    except Exception as exc:  # flatc / struct errors on garbage
        raise UsageError(f"{path}: not a readable ExecuTorch program ({str(exc).splitlines()[0][:200]})") from exc


def _delegate_bytes(program: Any, delegate: Any) -> bytes:
    """A delegate's payload (the deserializer moves segment data inline)."""
    return bytes(program.backend_delegate_data[delegate.processed.index].data)


def xnn_graph(blob: bytes) -> dict[str, Any]:
    """An XNNPACK delegate payload decoded to the JSON form of its ``XNNGraph`` (nodes, values)."""
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
    from executorch.exir._serialize._flatbuffer import _flatc_decompile

    header = XNNHeader.from_bytes(blob[: XNNHeader.EXPECTED_LENGTH])
    flatbuffer = blob[header.flatbuffer_offset : header.flatbuffer_offset + header.flatbuffer_size]
    schema = resources.files("executorch.backends.xnnpack.serialization").joinpath("schema.fbs")
    with tempfile.TemporaryDirectory(prefix="castling-xnn-") as tmp, resources.as_file(schema) as schema_path:
        (Path(tmp) / "graph.bin").write_bytes(flatbuffer)
        _flatc_decompile(tmp, str(schema_path), str(Path(tmp) / "graph.bin"))
        text = (Path(tmp) / "graph.json").read_text()
    return json.loads(re.sub(r"(?<=[\s:\[,])-?(inf|nan)\b", "null", text))  # flatc writes bare inf


def _values(graph: dict[str, Any]) -> dict[int, dict[str, Any]]:
    out = {}
    for v in graph.get("xvalues") or []:
        tensor = v["xvalue_union"]
        tensor = tensor.get("tensor_value", tensor)  # a quantized value wraps a tensor value
        out[int(tensor["id_out"])] = tensor
    return out


def _xnn_node_macs(kind: str, node: dict[str, Any], values: dict[int, dict[str, Any]]) -> tuple[int, str]:
    """(MACs, input datatype) of one XNNPACK node; MACs 0 for ops that do not multiply-accumulate."""
    if kind == "XNNFullyConnected":
        x, y = values[node["input1_id"]], values[node["output_id"]]
        return math.prod(y["dims"]) * x["dims"][-1], x["datatype"]
    if kind == "XNNBatchMatrixMultiply":
        a, y = values[node["input1_id"]], values[node["output_id"]]
        return math.prod(y["dims"]) * a["dims"][-1], a["datatype"]
    if kind in ("XNNConv2d", "XNNDepthwiseConv2d", "XNNConvTranspose2d"):
        x, y = values[node["input1_id"]], values[node["output_id"]]
        per_output = node["kernel_height"] * node["kernel_width"] * max(1, node["group_input_channels"])
        return math.prod(y["dims"]) * per_output, x["datatype"]
    return 0, ""


def _census_xnnpack(graph: dict[str, Any], acc: dict[str, Any]) -> None:
    values = _values(graph)
    for entry in graph.get("xnodes") or []:
        kind = entry["xnode_union_type"]
        acc["delegated_ops"][kind] += 1
        macs, dtype = _xnn_node_macs(kind, entry["xnode_union"], values)
        acc["macs"]["delegated"] += macs
        if dtype in INT8_TYPES:
            acc["macs"]["int8"] += macs
        for key in ("input_id", "input1_id", "input2_id", "output_id"):
            vid = entry["xnode_union"].get(key)
            if vid is not None and vid in values:
                acc["xnn_value_dtypes"][values[vid]["datatype"].replace("xnn_datatype_", "")] += 1


def _tensor_sizes(plan: Any, index: int) -> list[int] | None:
    val = plan.values[index].val
    return list(val.sizes) if hasattr(val, "sizes") else None


def _portable_macs(name: str, plan: Any, args: list[int]) -> int:
    """MACs of a non-delegated kernel from the shapes of its arguments (0 when it does not multiply)."""
    base = name.split("::")[-1]
    if base not in _PORTABLE_MAC_OPS:
        return 0
    shapes = [s for s in (_tensor_sizes(plan, a) for a in args) if s]
    if len(shapes) < 2:
        return 0
    out = shapes[-1]
    if base == "convolution":
        weight = shapes[1]
        return math.prod(out) * math.prod(weight[1:])
    first = shapes[1] if base == "addmm" else shapes[0]
    return math.prod(out) * first[-1]


def pte_census(path: str | Path) -> dict[str, Any]:
    """Delegation and precision census of the ``forward`` plan of a ``.pte``."""
    path = Path(path)
    program = _read_program(path)
    plan = next((p for p in program.execution_plan if p.name == "forward"), program.execution_plan[0])
    acc: dict[str, Any] = {"delegated_ops": collections.Counter(), "portable_ops": collections.Counter(),
                           "xnn_value_dtypes": collections.Counter(), "delegates": collections.Counter(),
                           "macs": {"delegated": 0, "portable": 0, "int8": 0}}
    for instr in (i for chain in plan.chains for i in chain.instructions):
        args = instr.instr_args
        if hasattr(args, "delegate_index"):
            delegate = plan.delegates[args.delegate_index]
            acc["delegates"][delegate.id] += 1
            if delegate.id == "XnnpackBackend":
                _census_xnnpack(xnn_graph(_delegate_bytes(program, delegate)), acc)
        elif hasattr(args, "op_index"):
            op = plan.operators[args.op_index]
            name = f"{op.name}.{op.overload}" if op.overload else op.name
            acc["portable_ops"][name] += 1
            acc["macs"]["portable"] += _portable_macs(op.name, plan, list(args.args))
    return _summarize(acc, path)


def _summarize(acc: dict[str, Any], path: Path) -> dict[str, Any]:
    macs = acc["macs"]
    total = macs["delegated"] + macs["portable"]
    n_deleg, n_port = sum(acc["delegated_ops"].values()), sum(acc["portable_ops"].values())
    return {
        "file_bytes": path.stat().st_size,
        "delegate_calls": dict(acc["delegates"]),
        "delegated_ops": dict(acc["delegated_ops"].most_common()),
        "portable_ops": dict(acc["portable_ops"].most_common()),
        "delegated_op_fraction": round(n_deleg / max(1, n_deleg + n_port), 4),
        "macs": {"total": total, **macs},
        "delegated_mac_fraction": round(macs["delegated"] / total, 4) if total else None,
        "int8_mac_fraction": round(macs["int8"] / total, 4) if total else None,
        "xnn_value_dtypes": dict(acc["xnn_value_dtypes"].most_common()),
    }
