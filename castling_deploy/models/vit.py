"""Castling-DeiT: a DeiT/timm-style vision transformer whose attention is linear-angular.

Parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.N.norm1``, ``blocks.N.attn.qkv``, ``blocks.N.attn.proj``, ``blocks.N.attn.dconv``,
``blocks.N.mlp.fc1``/``fc2``, ``norm``, ``head``) so checkpoints trained with DeiT code plus the reference
attention load as they are.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import limits
from ..errors import MetadataError
from .attention import LinearAngularAttention, SoftmaxAttention


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    attention: str = "castling"  # "castling" or "softmax"
    form: str = "train"  # "train" (softmax branch present) or "deploy" (folded)
    threshold: float = 0.02
    kernel_size: int = 9

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "") -> "ViTConfig":
        """Build from untrusted metadata: unknown fields, wrong types and out-of-range values are refused
        (MetadataError, exit 2, naming the field) before anything is allocated."""
        where = f"{source}: " if source else ""
        if not isinstance(d, dict):
            raise MetadataError(f"{where}config must be a JSON object, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(str(k)[:40] for k in set(d) - known)
        if unknown:
            raise MetadataError(f"{where}unknown config fields: {unknown[:5]}")
        return cls(**d).validate(source)

    def validate(self, source: str = "") -> "ViTConfig":
        """Types and bounds of every field (castling_deploy.limits) and their consistency; returns a normalized
        copy (integral floats become ints). Raises MetadataError (exit 2) naming the field."""
        L = limits
        v: dict[str, Any] = {}
        v["img_size"] = L.check_int(self.img_size, "config.img_size", 1, L.MAX_IMG_SIZE, source)
        v["patch_size"] = L.check_int(self.patch_size, "config.patch_size", 1, min(L.MAX_PATCH_SIZE, v["img_size"]),
                                      source)
        v["in_chans"] = L.check_int(self.in_chans, "config.in_chans", 3, 3, source)  # the image pipeline feeds RGB
        v["num_classes"] = L.check_int(self.num_classes, "config.num_classes", 0, L.MAX_CLASSES, source)
        v["embed_dim"] = L.check_int(self.embed_dim, "config.embed_dim", 1, L.MAX_EMBED_DIM, source)
        v["depth"] = L.check_int(self.depth, "config.depth", 0, L.MAX_DEPTH, source)
        v["num_heads"] = L.check_int(self.num_heads, "config.num_heads", 1, min(L.MAX_HEADS, v["embed_dim"]), source)
        v["mlp_ratio"] = L.check_float(self.mlp_ratio, "config.mlp_ratio", 0.0, L.MAX_MLP_RATIO, source, lo_open=True)
        v["threshold"] = L.check_float(self.threshold, "config.threshold", 0.0, 1.0, source)
        v["kernel_size"] = L.check_int(self.kernel_size, "config.kernel_size", 1, L.MAX_KERNEL_SIZE, source)
        L.check_choice(self.attention, "config.attention", ("castling", "softmax"), source)
        L.check_choice(self.form, "config.form", ("train", "deploy"), source)
        where = f"{source}: " if source else ""
        if not isinstance(self.qkv_bias, bool):
            raise MetadataError(f"{where}config.qkv_bias must be true or false, got {type(self.qkv_bias).__name__}")
        if v["img_size"] % v["patch_size"] or v["img_size"] // v["patch_size"] > L.MAX_GRID:
            raise MetadataError(f"{where}config.img_size {v['img_size']} must be a multiple of config.patch_size "
                                f"{v['patch_size']} with at most {L.MAX_GRID} patches per side")
        tokens = (v["img_size"] // v["patch_size"]) ** 2 + 1
        if v["num_heads"] * tokens**2 > L.MAX_ATTENTION_ENTRIES:
            raise MetadataError(f"{where}config.img_size {v['img_size']} gives {tokens} tokens: {v['num_heads']} heads x "
                                f"{tokens}^2 attention entries per image exceed {L.MAX_ATTENTION_ENTRIES} (use a "
                                "lower resolution or a larger patch)")
        if v["embed_dim"] % v["num_heads"]:
            raise MetadataError(f"{where}config.embed_dim {v['embed_dim']} is not divisible by config.num_heads "
                                f"{v['num_heads']}")
        if v["kernel_size"] % 2 == 0:
            raise MetadataError(f"{where}config.kernel_size {v['kernel_size']} must be odd")
        if int(v["embed_dim"] * v["mlp_ratio"]) < 1:
            raise MetadataError(f"{where}config.mlp_ratio {v['mlp_ratio']:g} leaves no MLP hidden units")
        return replace(self, **v)

    def with_(self, **changes: Any) -> "ViTConfig":
        return replace(self, **changes)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + 1


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if cfg.attention == "castling":
            self.attn: nn.Module = LinearAngularAttention(
                dim,
                cfg.num_heads,
                qkv_bias=cfg.qkv_bias,
                sparse_reg=cfg.form == "train",
                threshold=cfg.threshold,
                kernel_size=cfg.kernel_size,
            )
        elif cfg.attention == "softmax":
            self.attn = SoftmaxAttention(dim, cfg.num_heads, qkv_bias=cfg.qkv_bias)
        else:
            raise ValueError(f"unknown attention {cfg.attention!r}")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CastlingViT(nn.Module):
    """A class-token ViT classifier (DeiT layout) with Castling or softmax attention."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.embed_dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[:, 0])

    def castling_attentions(self) -> list[LinearAngularAttention]:
        return [b.attn for b in self.blocks if isinstance(b.attn, LinearAngularAttention)]


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix: int = 1) -> torch.Tensor:
    """Bicubic resampling of the patch part of a position embedding to a new square grid (timm's recipe)."""
    prefix, grid_part = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old_grid = int(math.isqrt(grid_part.shape[1]))
    if old_grid * old_grid != grid_part.shape[1]:
        raise ValueError(f"position embedding with {grid_part.shape[1]} patch tokens is not a square grid")
    if old_grid == new_grid:
        return pos_embed
    dim = grid_part.shape[-1]
    g = grid_part.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=True)
    g = g.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, g], dim=1)
