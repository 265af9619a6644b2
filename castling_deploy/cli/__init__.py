"""The `castling-deploy` command line: one module per command group over the Python API (castling_deploy.api)."""
from __future__ import annotations

from . import engine, export, fold, models, package, profile  # noqa: F401  (each registers its commands)
from .app import cli

__all__ = ["cli", "main"]


def main() -> None:
    cli(prog_name="castling-deploy")


if __name__ == "__main__":
    main()
