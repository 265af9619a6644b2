"""castling-deploy: fold, export, quantize and verify Castling-ViT checkpoints for edge runtimes.

The Python API (``export``, ``profile``, ``package``, ``verify``; see ``castling_deploy.api``) is imported on
first use so that ``import castling_deploy`` stays light.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["export", "profile", "package", "verify", "ExportResult", "TargetResult", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("export", "profile", "package", "verify", "ExportResult", "TargetResult"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'castling_deploy' has no attribute {name!r}")
