"""Named model variants, listed with shell-style wildcards (``list-models 'castling_deit*'``)."""
from __future__ import annotations

import fnmatch

from ..errors import UsageError
from .vit import CastlingViT, ViTConfig

# Variant name -> (config, one-line description). Paper rows: Castling-DeiT-T 5.6M params, 1.18 GMACs.
VARIANTS: dict[str, tuple[ViTConfig, str]] = {
    "castling_nano": (
        ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=10),
        "CPU-trainable toy (64 dim, 4 blocks, 4 heads, patch 8, 32 px); the shipped demo",
    ),
    "castling_deit_tiny": (
        ViTConfig(embed_dim=192, depth=12, num_heads=3),
        "Castling-DeiT-T (192 dim, 12 blocks, 3 heads, patch 16, 224 px)",
    ),
    "castling_deit_small": (
        ViTConfig(embed_dim=384, depth=12, num_heads=6),
        "Castling-DeiT-S (384 dim, 12 blocks, 6 heads, patch 16, 224 px)",
    ),
    "castling_deit_base": (
        ViTConfig(embed_dim=768, depth=12, num_heads=12),
        "Castling-DeiT-B (768 dim, 12 blocks, 12 heads, patch 16, 224 px)",
    ),
}


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in VARIANTS if fnmatch.fnmatchcase(n, pattern))


def get_config(name: str, **overrides: object) -> ViTConfig:
    if name not in VARIANTS:
        known = ", ".join(sorted(VARIANTS))
        raise UsageError(f"unknown architecture {name!r}; choose one of: {known} (see `castling-deploy list-models`)")
    return VARIANTS[name][0].with_(**overrides)


def create_model(name: str, **overrides: object) -> CastlingViT:
    return CastlingViT(get_config(name, **overrides))


def describe(name: str) -> str:
    return VARIANTS[name][1]
