"""Stable import path for packaging (``castling_deploy.package``); the code lives in ``castling_deploy.packaging``."""
from .packaging import build_manifest, create_package, format_manifest, inspect_package, render_readme, verify_package
from .packaging import format_verify_result

__all__ = ["build_manifest", "create_package", "format_manifest", "inspect_package", "render_readme", "verify_package",
           "format_verify_result"]
