"""Packaging: artifacts + manifest.json + README.md in one archive; safe inspection and verification."""
from .create import create_package, inspect_package
from .manifest import build_manifest, format_manifest, render_readme
from .verify import format_verify_result, verify_package

__all__ = ["build_manifest", "create_package", "format_manifest", "inspect_package", "render_readme", "verify_package",
           "format_verify_result"]
