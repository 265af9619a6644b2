"""Untrusted package metadata: every path read from a package must stay inside it, and a manifest must have the
shape our code reads before anything uses it. Violations are one-line ``UsageError`` / ``MetadataError`` (exit 2).
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import MetadataError, UsageError
from ..limits import check_json_budget

MANIFEST_MAX_DEPTH = 32
MANIFEST_MAX_NODES = 1_000_000
_SHA256 = re.compile(r"[0-9a-f]{64}")


def unsafe_path_reason(raw: str) -> str | None:
    """Why ``raw`` is not a plain relative POSIX path inside its folder (None when it is)."""
    if not raw or "\x00" in raw:
        return "empty or NUL in name"
    if "\\" in raw:
        return "backslash in name"
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        return "absolute path"
    parts = PurePosixPath(raw).parts
    if ".." in parts:
        return "'..' in path"
    if not parts or raw.endswith("/") or "." in raw.split("/") or "" in raw.split("/"):
        return "not a normalized file name"
    return None


def safe_relpath(raw: Any, what: str, source: str) -> str:
    """``raw`` as a relative path inside the package, or exit 2 naming the field and the reason."""
    if not isinstance(raw, str):
        raise MetadataError(f"{source}: {what} must be a file name, got {type(raw).__name__}")
    reason = unsafe_path_reason(raw)
    if reason:
        raise MetadataError(f"{source}: {what} {raw[:80]!r} leaves the package ({reason}); only names inside "
                            "the package are allowed")
    return raw


def resolve_inside(root: Path, rel: str, what: str) -> Path:
    """``root / rel`` resolved (links followed) and still inside ``root``, or exit 2."""
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if not target.is_relative_to(base):
        raise UsageError(f"{what} {rel!r} resolves outside {root}; refusing to read it")
    return target


def _type(value: Any, types: type | tuple[type, ...], where: str, source: str, *, optional: bool = True) -> Any:
    if (value is None and optional) or isinstance(value, types):
        return value
    names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
    raise MetadataError(f"{source}: {where} must be {'null or ' if optional else ''}{names}, "
                        f"got {type(value).__name__}")


def validate_manifest(manifest: Any, source: str = "manifest.json") -> dict:
    """Check the manifest's shape (types, path fields, bounded nesting); return it unchanged.

    Only what our code reads is checked; unknown keys are carried along. Values are not trusted by this check —
    a valid shape says nothing about who wrote it (see ``signing.py``)."""
    _type(manifest, dict, "the top level", source, optional=False)
    check_json_budget(manifest, "manifest", source, max_nodes=MANIFEST_MAX_NODES, max_depth=MANIFEST_MAX_DEPTH)
    for key in ("checkpoint", "input", "preprocess", "created_by"):
        _type(manifest.get(key), dict, key, source)
    _type(manifest.get("model_name"), str, "model_name", source)
    _type(manifest.get("labels"), list, "labels", source)
    files = _type(manifest.get("files"), dict, "files", source, optional=False)
    for name, entry in files.items():
        safe_relpath(name, "files entry", source)
        _type(entry, dict, f"files[{name!r}]", source, optional=False)
        if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
            raise MetadataError(f"{source}: files[{name!r}].sha256 must be 64 lowercase hex digits")
        size = entry.get("bytes")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise MetadataError(f"{source}: files[{name!r}].bytes must be a non-negative integer")
    for i, t in enumerate(_type(manifest.get("targets"), list, "targets", source, optional=False)):
        where = f"targets[{i}]"
        _type(t, dict, where, source, optional=False)
        for key in ("data", "runtime_versions", "latency", "options", "goals"):
            _type(t.get(key), dict, f"{where}.{key}", source)
        for key in ("target", "status"):
            _type(t.get(key), str, f"{where}.{key}", source)
        for key in ("folder", "report"):
            if t.get(key) is not None:
                safe_relpath(t[key], f"{where}.{key}", source)
        for j, s in enumerate(_type(t.get("error_budget"), list, f"{where}.error_budget", source) or []):
            _type(s, dict, f"{where}.error_budget[{j}]", source, optional=False)
            _type(s.get("metrics"), dict, f"{where}.error_budget[{j}].metrics", source)
        for j, a in enumerate(_type(t.get("artifacts"), list, f"{where}.artifacts", source) or []):
            aw = f"{where}.artifacts[{j}]"
            _type(a, dict, aw, source, optional=False)
            safe_relpath(a.get("file"), f"{aw}.file", source)
            _type(a.get("recorded"), dict, f"{aw}.recorded", source)
            for key in ("precision", "runtime"):
                _type(a.get(key), str, f"{aw}.{key}", source)
    return manifest
