"""Linear-angular attention (Castling-ViT) in training and deploy form, and a softmax baseline.

You, Haoran et al., "Castling-ViT: Compressing Self-Attention via Switching Towards Linear-Angular
Attention at Vision Transformer Inference", CVPR 2023. The math follows the authors' reference attention:

    sparse = (softmax(q k^T d^-0.5) > threshold) * softmax(...)        # training form only
    x      = sparse @ v + 0.5 v + (1/pi) q_hat @ (k_hat^T @ v)
    x      = x / ||x|| + DWConv_(9,1)(v)
    out    = proj(merge_heads(x))

The softmax branch has no weights, so the same state dict loads into both forms.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# Clamp on norms only, so that an all-zero vector gives zero instead of NaN.
NORM_EPS = 1e-12


def l2_normalize(x: torch.Tensor, form: str = "div") -> torch.Tensor:
    """x / ||x|| over the last axis.

    ``form="div"`` is the plain spelling; ``form="rsqrt"`` is the exact rewrite ``x * rsqrt(sum(x*x))`` that
    full-integer quantizers accept (ABS and ReduceL2 are not quantizable there).
    """
    if form == "rsqrt":
        return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True).clamp_min(NORM_EPS * NORM_EPS))
    if form == "div":
        return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    raise ValueError(f"unknown norm form {form!r}")


class LinearAngularAttention(nn.Module):
    """Castling attention. ``sparse_reg=True`` is the training form (with the masked softmax branch)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        sparse_reg: bool = True,
        threshold: float = 0.02,
        kernel_size: int = 9,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.sparse_reg = sparse_reg
        self.threshold = threshold
        self.norm_form = "div"
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dconv = nn.Conv2d(
            num_heads, num_heads, (kernel_size, 1), padding=(kernel_size // 2, 0), groups=num_heads, bias=False
        )
        # Set by the fold's measurement hooks; None during normal inference.
        self.branch_stats: list[tuple[float, float]] | None = None

    def heads(self, flat: torch.Tensor) -> torch.Tensor:
        """The qkv projection [B, N, 3C] as [3, B, heads, N, head_dim] (q, k, v along the first axis)."""
        b, n, _ = flat.shape
        return flat.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def _split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = self.heads(self.qkv(x))
        return qkv[0], qkv[1], qkv[2]

    def linear_branch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``0.5 v + (1/pi) q_hat (k_hat^T v)``: the linear-angular term, before the softmax branch and the norm."""
        qn = l2_normalize(q, self.norm_form)
        kn = l2_normalize(k, self.norm_form)
        return 0.5 * v + (1.0 / math.pi) * (qn @ (kn.transpose(-2, -1) @ v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self._split_heads(x)
        sparse_out = None
        if self.sparse_reg:
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            sparse_out = ((attn > self.threshold).to(attn.dtype) * attn) @ v
        linear = self.linear_branch(q, k, v)
        if sparse_out is not None:
            if self.branch_stats is not None:
                ratio = sparse_out.flatten(1).norm(dim=1) / linear.flatten(1).norm(dim=1).clamp_min(NORM_EPS)
                self.branch_stats.append((float(ratio.mean()), float(ratio.max())))
            out = sparse_out + linear
        else:
            out = linear
        out = l2_normalize(out, self.norm_form) + self.dconv(v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SoftmaxAttention(nn.Module):
    """Plain multi-head softmax attention (DeiT): the O(N^2) baseline the fold is compared against."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
