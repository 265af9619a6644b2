"""Model families, the registry and checkpoint loading."""
from .attention import LinearAngularAttention, SoftmaxAttention, l2_normalize
from .registry import VARIANTS, create_model, get_config, list_models
from .vit import CastlingViT, ViTConfig, resample_pos_embed

__all__ = [
    "CastlingViT",
    "LinearAngularAttention",
    "SoftmaxAttention",
    "VARIANTS",
    "ViTConfig",
    "create_model",
    "get_config",
    "l2_normalize",
    "list_models",
    "resample_pos_embed",
]
