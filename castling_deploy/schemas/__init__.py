"""JSON Schemas (draft 2020-12) for report.json and a package's manifest.json, shipped so an app or CI can
validate them without our code: ``castling_deploy/schemas/report.schema.json``, ``manifest.schema.json``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def load_schema(name: str) -> dict[str, Any]:
    """``name`` is "report" or "manifest"."""
    return json.loads((HERE / f"{name}.schema.json").read_text())
