"""Exact ATen rewrites that let XNNPACK take the whole network: without them castling_nano lowers to 30 delegate
calls with 63 portable kernels between them, castling_deit_tiny to 86 calls and 183 kernels; with them, one call.

XNNPACK 1.5.1's partitioner has no LayerNorm, no sum, no ``pow(x, 0.5)``, no ``select`` and no ``expand``; the
default decompositions of ``layer_norm``, ``linalg_vector_norm``, ``select`` and ``matmul`` produce exactly
those, so every norm and every q/k/v split cut the graph into a new delegate call with a portable kernel
between. Each rewrite below spells the same math with ops XNNPACK takes (a mean over the last axis becomes
XNNPACK's mean over a ``(1, rows, C, 1)`` view), is exact up to float rounding, and declines
(``NotImplemented``: the default decomposition applies) for any shape it was not written for. The export stage
measures the result against the folded model like every artifact.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

aten = torch.ops.aten
_FLOATS = (torch.float32, torch.float16)


def _mean_last(x: torch.Tensor) -> torch.Tensor:
    """Mean over the last axis, keepdim, as XNNPACK's 4D mean over dims (2, 3) of a ``(1, rows, C, 1)`` view:
    rows become XNNPACK's (vectorized) channels. The ``(rows, 1, C, 1)`` view reduces one channel at a time:
    20 LayerNorms of (197, 192) took 6.6 ms that way, 1.2 ms this way (portable LayerNorm kernels: 5.3 ms)."""
    rows = x.shape[:-1]
    pooled = x.reshape(1, -1, x.shape[-1], 1).mean(dim=[2, 3], keepdim=True)
    return pooled.reshape(*rows, 1)


def _layer_norm(x: torch.Tensor, shape: list[int], weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, eps: float = 1e-5, cudnn_enable: bool = False) -> Any:
    if len(shape) != 1 or x.dim() < 2 or x.dtype not in _FLOATS:
        return NotImplemented
    centered = x - _mean_last(x)
    out = centered * torch.rsqrt(_mean_last(centered * centered) + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _vector_norm(x: torch.Tensor, ord: float = 2, dim: list[int] | None = None, keepdim: bool = False,
                 dtype: torch.dtype | None = None) -> Any:
    if ord != 2 or dtype is not None or x.dtype not in _FLOATS or not keepdim or dim is None or len(dim) != 1:
        return NotImplemented
    if dim[0] not in (-1, x.dim() - 1) or x.dim() < 2:
        return NotImplemented
    return torch.sqrt(_mean_last(x * x) * float(x.shape[-1]))  # a float: an int would be a cast kernel


def _select(x: torch.Tensor, dim: int, index: int) -> Any:
    dim = dim % x.dim()
    index = index % x.shape[dim]
    out_shape = [s for i, s in enumerate(x.shape) if i != dim]
    return x.narrow(dim, index, 1).reshape(out_shape)


def _expand(x: torch.Tensor, size: list[int], implicit: bool = False) -> Any:
    """An expand that changes nothing (``cls_token.expand(1, -1, -1)`` at batch 1) becomes a view."""
    if len(size) != x.dim() or any(s not in (-1, d) for s, d in zip(size, x.shape, strict=True)):
        return NotImplemented
    return x.view(list(x.shape))


def _gelu(x: torch.Tensor, approximate: str = "none") -> Any:
    """XNNPACK has no fp16 GELU: compute it in fp32 between two casts (XNNPACK converts; no less exact)."""
    if x.dtype != torch.float16:
        return NotImplemented
    return aten.gelu.default(x.to(torch.float32), approximate=approximate).to(torch.float16)


def _matmul(a: torch.Tensor, b: torch.Tensor) -> Any:
    if a.dim() < 3 or a.dim() != b.dim() or a.shape[:-2] != b.shape[:-2]:
        return NotImplemented
    batch = a.shape[:-2]
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out.reshape(*batch, a.shape[-2], b.shape[-1])


XNNPACK_DECOMPOSITIONS: dict[Any, Callable[..., Any]] = {
    aten.layer_norm.default: _layer_norm,
    aten.linalg_vector_norm.default: _vector_norm,
    aten.select.int: _select,
    aten.matmul.default: _matmul,
    aten.expand.default: _expand,
    aten.gelu.default: _gelu,
}


def decompose_for_xnnpack(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``ep`` with the default core-ATen decompositions plus the rewrites above."""
    table = torch.export.default_decompositions()
    for op, fn in XNNPACK_DECOMPOSITIONS.items():
        table[op] = fn
    return ep.run_decompositions(table)
