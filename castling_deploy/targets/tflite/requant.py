"""Drop the int8 -> int8 QUANTIZE ops the quantizer leaves between tensors whose parameters could simply agree.

litert-quantizer inserts a requantizing QUANTIZE wherever a producer's output parameters differ from what the
consumer's recipe asks for. In the full-integer Castling graph (castling_deit_tiny@224: 48 of 917 ops) they sit
before each attention BATCH_MATMUL input (asymmetric -> symmetric, scales within 1 %) and after each BATCH_MATMUL
output feeding an ADD (symmetric -> asymmetric). Each costs a pass over the tensor and a second rounding.

Two exact rewrites (the int8 kernels, builtin and XNNPACK alike, derive their multipliers from the tensors'
parameters when the model is prepared, so any parameters a kernel accepts are as good as the recipe's):
- **rewire**: every consumer of the QUANTIZE's output takes any input parameters (ADD, MUL, FULLY_CONNECTED, ...):
  the consumers read the QUANTIZE's input instead.
- **adopt**: the QUANTIZE's input belongs to a group of tensors that must share parameters (joined by RESHAPE /
  TRANSPOSE / SLICE, which copy int8 bytes) produced by one op that can write any output parameters; every other
  reader of the group takes any input parameters: the whole group adopts the QUANTIZE's output parameters (the
  producer then rounds once, onto the grid the BATCH_MATMUL wants) and the QUANTIZE goes. A group is changed at
  most once; a second QUANTIZE from it asking for other parameters is kept.
"""
from __future__ import annotations

from typing import Any

# ops whose int8 output bytes are their input bytes (input and output parameters must be equal)
SAME_PARAMS = {"RESHAPE", "TRANSPOSE", "SLICE", "STRIDED_SLICE", "SQUEEZE", "EXPAND_DIMS"}
# int8 kernels that requantize their inputs from whatever parameters the tensors carry
ANY_INPUT = {"ADD", "SUB", "MUL", "FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "MEAN", "RSQRT", "GELU",
             "QUANTIZE", "DEQUANTIZE"}
# int8 kernels that write their output on any grid
ANY_OUTPUT = {"ADD", "SUB", "MUL", "FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "MEAN"}


def _names(fb: Any) -> dict[int, str]:
    return {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_") and isinstance(v, int)}


def _covers(new: tuple[float, int], old: tuple[float, int], slack: float = 0.01) -> bool:
    """The int8 range of ``new`` spans the int8 range of ``old`` (within ``slack`` of it): adopting clips nothing."""
    lo_new, hi_new = (-128 - new[1]) * new[0], (127 - new[1]) * new[0]
    lo_old, hi_old = (-128 - old[1]) * old[0], (127 - old[1]) * old[0]
    return lo_new <= lo_old * (1 - slack) and hi_new >= hi_old * (1 - slack)


def fold_requantize(tflite: bytes) -> tuple[bytes, dict[str, int]]:
    """The model with the removable int8 -> int8 QUANTIZE ops gone; counts of what was done."""
    from ai_edge_litert.tools import flatbuffer_utils as fb

    model = fb.read_model_from_bytearray(bytearray(tflite))
    sub = model.subgraphs[0]
    names = _names(fb)
    kind = [names.get(max(model.operatorCodes[op.opcodeIndex].builtinCode,
                              model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode), "?") for op in sub.operators]
    graph_io = set(sub.inputs) | set(sub.outputs)

    def readers(t: int) -> list[int]:
        return [i for i, op in enumerate(sub.operators) if i not in removed and t in list(op.inputs)]

    def writer(t: int) -> int | None:
        return next((i for i, op in enumerate(sub.operators) if i not in removed and t in list(op.outputs)), None)

    def params(t: int) -> tuple[float, int] | None:
        tensor = sub.tensors[t]
        q = tensor.quantization
        if tensor.type != fb.TensorType.INT8 or q is None or q.scale is None or len(q.scale) != 1:
            return None
        return float(q.scale[0]), int(q.zeroPoint[0])

    def group(t: int) -> tuple[set[int], int | None] | None:
        """Tensors tied to ``t`` by SAME_PARAMS ops, and the op that writes the group (None: not adoptable)."""
        seen, todo, root = {t}, [t], None
        while todo:
            cur = todo.pop()
            w = writer(cur)
            if w is not None and kind[w] in SAME_PARAMS:
                nxt = [sub.operators[w].inputs[0]]
            elif w is not None and kind[w] in ANY_OUTPUT and root in (None, w):
                root, nxt = w, []
            else:
                return None
            for r in readers(cur):
                if kind[r] in SAME_PARAMS:
                    nxt += list(sub.operators[r].outputs)
            for n in nxt:
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return (seen, root) if root is not None and not seen & graph_io else None

    removed: set[int] = set()
    adopted: set[int] = set()
    counts = {"quantize_before": sum(k == "QUANTIZE" for k in kind), "rewired": 0, "adopted": 0}
    for i, op in enumerate(sub.operators):
        if kind[i] != "QUANTIZE" or i in removed:
            continue
        src, dst = op.inputs[0], op.outputs[0]
        p_src, p_dst = params(src), params(dst)
        if p_src is None or p_dst is None or dst in graph_io:
            continue
        consumers = readers(dst)
        zero_needed = any(kind[c] == "BATCH_MATMUL" for c in consumers)
        if all(kind[c] in ANY_INPUT for c in consumers) or (p_src == p_dst and all(
                kind[c] in ANY_INPUT | {"BATCH_MATMUL"} for c in consumers)):
            action = "rewired"
        elif zero_needed and all(kind[c] in ANY_INPUT | {"BATCH_MATMUL"} for c in consumers):
            tied = group(src)
            if tied is None or tied[0] & adopted or not _covers(p_dst, p_src):
                continue
            members, _ = tied
            others = [r for m in members for r in readers(m) if kind[r] not in SAME_PARAMS and r != i]
            if not all(kind[r] in ANY_INPUT for r in others):
                continue
            for m in members:
                sub.tensors[m].quantization.scale = [p_dst[0]]
                sub.tensors[m].quantization.zeroPoint = [p_dst[1]]
            adopted |= members
            action = "adopted"
        else:
            continue
        for c in consumers:
            sub.operators[c].inputs = [src if t == dst else t for t in sub.operators[c].inputs]
        removed.add(i)
        counts[action] += 1
    sub.operators = [op for i, op in enumerate(sub.operators) if i not in removed]
    counts["quantize_after"] = counts["quantize_before"] - len(removed)
    return bytes(fb.convert_object_to_bytearray(model)), counts
