"""Map the compute nodes of an exported Castling-ViT ONNX graph to (block, role).

The dynamo exporter names nodes ``node_MatMul_12`` / ``node_matmul_3``, and onnxsim drops the
``pkg.torch.onnx.name_scopes`` metadata and de-duplicates equal initializers (every LayerNorm may end up reading
``blocks.0.norm1.weight``), so neither node nor initializer names say which block a node is in. The structure
does: in execution (= topological) order a ViT has one patch Conv, then per block the weight linears
``qkv, proj, fc1, fc2`` with the two activation x activation MatMuls (k^T@v, q@(k^T v)) and the depth-wise token
Conv between ``qkv`` and ``proj``, and a final head. We read that pattern and refuse graphs that do not match it.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import CastlingError

COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
# Kinds of compute nodes in a Castling ViT, in the order they appear in a block.
BLOCK_KINDS = ("qkv", "attn_kv", "attn_q", "dwconv", "proj", "fc1", "fc2")
OUTSIDE_KINDS = ("patch_embed", "head")
ALL_KINDS = ("patch_embed", *BLOCK_KINDS, "head")


class GraphStructureError(CastlingError):
    """The ONNX graph does not have the Castling-ViT layout, so blocks cannot be located."""


@dataclass(frozen=True)
class NodeRole:
    name: str
    op_type: str
    kind: str  # one of ALL_KINDS
    block: int | None  # None for patch_embed / head

    @property
    def unit(self) -> str:
        return f"blocks.{self.block}.{self.kind}" if self.block is not None else self.kind


def _constant_names(model: "onnx.ModelProto") -> set[str]:  # noqa: F821
    names = {i.name for i in model.graph.initializer}
    names |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return names


def _weight_input(node: "onnx.NodeProto", constants: set[str], producers: dict) -> bool:  # noqa: F821
    """True when input 1 is a constant, possibly behind a DequantizeLinear (already-quantized graphs)."""
    if len(node.input) < 2:
        return False
    src = node.input[1]
    while src not in constants:
        prod = producers.get(src)
        if prod is None or prod.op_type not in ("DequantizeLinear", "QuantizeLinear", "Transpose", "Identity"):
            return False
        src = prod.input[0]
    return True


def classify_nodes(model: "onnx.ModelProto") -> list[NodeRole]:  # noqa: F821
    """Roles of every Conv/MatMul/Gemm node, in graph order. Raises GraphStructureError on an unknown layout."""
    constants = _constant_names(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    compute = [n for n in model.graph.node if n.op_type in COMPUTE_OPS]
    if not compute:
        raise GraphStructureError("the ONNX graph has no Conv/MatMul/Gemm nodes; nothing to quantize")
    for n in compute:
        if not n.name:
            raise GraphStructureError("the ONNX graph has unnamed compute nodes; re-export it with castling-deploy")

    roles: list[NodeRole] = []
    first = compute[0]
    if first.op_type != "Conv" or not _weight_input(first, constants, producers):
        raise GraphStructureError(f"expected the patch-embedding Conv first, found {first.op_type} {first.name!r}")
    roles.append(NodeRole(first.name, first.op_type, "patch_embed", None))

    linears_seen = 0  # weight linears since the patch Conv: qkv, proj, fc1, fc2, qkv, ...
    act_in_block = 0
    for n in compute[1:]:
        block = linears_seen // 4
        if n.op_type == "Conv":
            if linears_seen % 4 != 1:
                raise GraphStructureError(f"Conv {n.name!r} outside the attention of a block")
            roles.append(NodeRole(n.name, n.op_type, "dwconv", block))
        elif _weight_input(n, constants, producers):
            slot = linears_seen % 4
            if slot == 1 and act_in_block != 2:
                raise GraphStructureError(
                    f"block {block}: expected 2 activation MatMuls before proj, found {act_in_block}"
                )
            roles.append(NodeRole(n.name, n.op_type, ("qkv", "proj", "fc1", "fc2")[slot], block))
            linears_seen += 1
            act_in_block = 0
        else:
            if linears_seen % 4 != 1 or act_in_block >= 2:
                raise GraphStructureError(f"activation MatMul {n.name!r} outside the attention of a block")
            roles.append(NodeRole(n.name, n.op_type, ("attn_kv", "attn_q")[act_in_block], block))
            act_in_block += 1
    # The last weight linear is the head: it arrived as the qkv of a phantom block.
    last = roles[-1]
    if last.kind != "qkv" or linears_seen % 4 != 1 or linears_seen < 5:
        raise GraphStructureError(
            f"found {linears_seen} weight linears after the patch Conv; a ViT with D blocks has 4*D+1"
        )
    roles[-1] = NodeRole(last.name, last.op_type, "head", None)
    return roles


def depth_of(roles: list[NodeRole]) -> int:
    return 1 + max((r.block for r in roles if r.block is not None), default=-1)


def roles_from_metadata(model: "onnx.ModelProto") -> dict[str, str]:  # noqa: F821
    """Node name -> module path from the dynamo exporter's ``name_scopes`` metadata (absent after onnxsim).

    Used only to cross-check ``classify_nodes`` on an unsimplified export.
    """
    import ast

    out: dict[str, str] = {}
    for n in model.graph.node:
        for p in n.metadata_props:
            if p.key == "pkg.torch.onnx.name_scopes":
                scopes = [s for s in ast.literal_eval(p.value) if s]
                if len(scopes) >= 2:
                    out[n.name] = scopes[-2]
    return out
