"""Export spelling of the Castling attention's token conv: the same function, laid out for runtime kernels.

The deploy-form ``LinearAngularAttention`` convolves v per head: a (k, 1) depthwise conv over the tokens of
[B, heads, N, head_dim], i.e. an image with 3 channels (castling_deit_tiny). Depthwise kernels vectorise over
channels, so that is their worst case. ``TokenConv`` computes the same values as a depthwise conv over all
C = heads * head_dim channels of the token-major [B, N, C] tensor (each head's kernel repeated for its channels);
the checkpoint and the torch model are unchanged, only the traced graph differs. Measured on castling_deit_tiny@224
(1 thread, AVX-512 VNNI host, two runs of benchmarks/bench_litert.py): LiteRT fp32 21.9 -> 20.7 ms, full-integer
14.7 -> 12.4 ms.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import LinearAngularAttention, l2_normalize


class TokenConv(nn.Module):
    """A Castling attention's token conv (``dconv``: a per-head (k, 1) conv over the tokens of [B, heads, N, d])
    as a depthwise conv on all C = heads * d channels of the token-major [B, N, C] tensor: each head's kernel is
    repeated for its d channels. Same function; the runtimes' depthwise kernels vectorise over channels, and 3
    channels of a 197x64 image is their worst case (LiteRT XNNPACK, castling_deit_tiny@224: 0.2 ms fp32 /
    0.27 ms int8 per block for 0.34 M MACs; ONNX Runtime 0.11 ms)."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        w = attn.dconv.weight.detach()  # [heads, 1, k, 1]
        self.register_buffer("weight", w.repeat_interleave(attn.head_dim, dim=0).clone())
        self.padding = attn.dconv.padding

    def forward(self, v_tok: torch.Tensor) -> torch.Tensor:
        c = v_tok.shape[-1]
        out = F.conv2d(v_tok.transpose(1, 2).unsqueeze(-1), self.weight, padding=self.padding, groups=c)
        return out.squeeze(-1).transpose(1, 2)


class TokenConvAttention(nn.Module):
    """Deploy-form Castling attention with its token conv in token-major layout (``TokenConv``); the rest is
    ``LinearAngularAttention.forward`` (sparse_reg=False) as written."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn
        self.token_conv = TokenConv(attn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        b, n, c = x.shape
        flat = a.qkv(x)
        qkv = a.heads(flat)
        out = l2_normalize(a.linear_branch(qkv[0], qkv[1], qkv[2]), a.norm_form).transpose(1, 2).reshape(b, n, c)
        return a.proj(out + self.token_conv(flat[..., 2 * c:]))


def swap_modules(model: nn.Module, replace: Callable[[nn.Module], nn.Module | None]) -> int:
    """Put ``replace(child)`` in place of every submodule for which it returns a module; the number swapped."""
    swaps = [(parent, name, new) for parent in model.modules() for name, child in parent.named_children()
             if (new := replace(child)) is not None]
    for parent, name, new in swaps:
        setattr(parent, name, new)
    return len(swaps)


def token_conv_copy(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A deep copy with every deploy-form Castling attention as ``TokenConvAttention``: what the exporters trace."""
    rewritten = copy.deepcopy(model).eval()
    swapped = swap_modules(rewritten, lambda m: TokenConvAttention(m)
                           if isinstance(m, LinearAngularAttention) and not m.sparse_reg else None)
    return rewritten, (["attention token conv as a depthwise conv over all channels, token-major"] if swapped else [])
