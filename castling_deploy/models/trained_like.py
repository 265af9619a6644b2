"""Seeded "trained-like" test models: random weights plus the post-LayerNorm outlier channels of trained ViTs.

Trained DeiT/ViT/Swin models have a few LayerNorm output channels that are tens of times larger than the rest
(FQ-ViT, PTQ4ViT, RepQ-ViT; the effect SmoothQuant addresses for LLMs). Random-weight models do not, so on them a
per-tensor int8 scale looks fine. This module adds the effect without changing the float function: in every
block, a few channels of ``norm1`` / ``norm2`` get their gamma and beta multiplied by ``magnitude`` and the matching
input columns of ``attn.qkv`` / ``mlp.fc1`` divided by it. Logits change only by float rounding; the activation
statistics the int8 calibration sees are those of a trained model. No real checkpoint is ever needed for tests.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from .registry import create_model
from .vit import CastlingViT

DEFAULT_CHANNELS = 6  # of 192 in DeiT-T: ~3%, as reported for trained ViTs


def outlier_pattern(depth: int, dim: int, channels: int = DEFAULT_CHANNELS, seed: int = 0,
                    norms: Sequence[str] = ("norm1", "norm2")) -> dict[str, list[int]]:
    """Which channels of each LayerNorm become outliers: ``{"blocks.N.norm1": [c, ...], ...}``, seeded.

    Trained ViTs keep most outliers in the same few channels from block to block; half of each LayerNorm's
    outlier channels are shared across blocks and half are drawn per LayerNorm, which covers both cases."""
    if not 0 <= channels <= dim:
        raise ValueError(f"channels must be in [0, {dim}], got {channels}")
    rng = np.random.default_rng(seed)
    shared = rng.choice(dim, size=channels // 2, replace=False)
    rest = np.setdiff1d(np.arange(dim), shared)
    out: dict[str, list[int]] = {}
    for b in range(depth):
        for n in norms:
            own = rng.choice(rest, size=channels - len(shared), replace=False)
            out[f"blocks.{b}.{n}"] = sorted(int(c) for c in np.concatenate([shared, own]))
    return out


def _consumer(block: torch.nn.Module, norm: str) -> torch.nn.Linear:
    if norm == "norm1":
        return block.attn.qkv
    if norm == "norm2":
        return block.mlp.fc1
    raise ValueError(f"unknown block LayerNorm {norm!r}; use norm1 or norm2")


@torch.no_grad()
def add_outlier_channels(model: CastlingViT, magnitude: float | Sequence[float] = 30.0, *,
                         channels: int = DEFAULT_CHANNELS, seed: int = 0,
                         norms: Sequence[str] = ("norm1", "norm2")) -> CastlingViT:
    """A copy of ``model`` with outlier channels (see the module docstring); the float function is unchanged.

    ``magnitude`` is one factor, or several that the outlier channels of each LayerNorm cycle through (e.g.
    ``(10, 30, 100)``). The pattern is ``outlier_pattern(depth, dim, channels, seed, norms)``; it is also left on
    the copy as ``model.outlier_channels``."""
    mags = [float(magnitude)] if isinstance(magnitude, (int, float)) else [float(m) for m in magnitude]
    if not mags or any(not np.isfinite(m) or m <= 0 for m in mags):
        raise ValueError(f"magnitudes must be finite and > 0, got {magnitude!r}")
    out = copy.deepcopy(model).eval()
    pattern = outlier_pattern(out.cfg.depth, out.cfg.embed_dim, channels, seed, norms)
    for name, idx in pattern.items():
        _, b, norm = name.split(".")
        block = out.blocks[int(b)]
        ln, lin = getattr(block, norm), _consumer(block, norm)
        f = torch.tensor([mags[i % len(mags)] for i in range(len(idx))], dtype=ln.weight.dtype)
        ix = torch.tensor(idx, dtype=torch.long)
        ln.weight[ix] *= f
        ln.bias[ix] *= f
        lin.weight[:, ix] /= f
    out.outlier_channels = pattern
    return out


def trained_like_model(arch: str = "castling_deit_tiny", magnitude: float | Sequence[float] = 30.0, *,
                       channels: int = DEFAULT_CHANNELS, seed: int = 0, weight_seed: int = 0,
                       form: str = "deploy", **overrides: object) -> CastlingViT:
    """``create_model(arch)`` with weights seeded by ``weight_seed``, then ``add_outlier_channels``.

    ``magnitude=1`` gives the plain random-weight model (same weights, no outliers), so a sweep over magnitudes
    compares like with like."""
    torch.manual_seed(weight_seed)
    model = create_model(arch, form=form, **overrides).eval()
    return add_outlier_channels(model, magnitude, channels=channels, seed=seed)
