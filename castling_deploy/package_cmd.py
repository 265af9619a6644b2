"""`castling-deploy verify FILE`: hashes, then (optionally) accuracy on a val set."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from .errors import ToleranceError


def run_verify_package(file: Path, val: Path | None, limit: int | None, as_json: bool,
                       emit_json: Callable[[Any], None]) -> None:
    from .data import load_image_set
    from .errors import DataError
    from .package import format_verify_result, inspect_package, verify_package

    images = labels = None
    if val is not None:
        manifest = inspect_package(file)
        data = load_image_set(val, manifest["preprocess"], manifest.get("labels"), limit=limit)
        if data.labels is None:
            raise DataError(f"{val}: accuracy needs labeled images (class_name/xxx.png subfolders)")
        images, labels = data.images, data.labels
    try:
        result = verify_package(file, val_images=images, val_labels=labels)
    except ToleranceError as exc:
        result = getattr(exc, "result", None)
        if result is not None:
            if as_json:
                emit_json(result)
            else:
                click.echo(format_verify_result(result), err=True)
        raise
    if as_json:
        emit_json(result)
    else:
        click.echo(format_verify_result(result))
