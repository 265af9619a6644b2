"""``create_package`` and ``inspect_package``: the two cheap operations on a package."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .archive import MAX_MEMBER_BYTES, MAX_TOTAL_BYTES, Archive, archive_format, check_members, read_manifest
from .archive import write_archive
from ..output import to_jsonable
from .manifest import MANIFEST, README, build_manifest, render_readme, sha256_file


def create_package(export_dir: Path, out_file: Path, *, allow_failed: bool = False) -> Path:
    """Write artifacts + report.json files + manifest.json + README.md into one archive, atomically.

    ``export_dir`` is a target folder (holding report.json) or a model folder holding several target folders.
    Reports marked failed are refused (ToleranceError) unless ``allow_failed``.
    """
    out_file = Path(out_file)
    archive_format(out_file)  # reject an unknown suffix before hashing anything
    manifest, members = build_manifest(Path(export_dir), allow_failed=allow_failed)
    readme = render_readme(manifest).encode()
    files = {name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for name, p in sorted(members.items())}
    files[README] = {"sha256": hashlib.sha256(readme).hexdigest(), "bytes": len(readme)}
    manifest["files"] = dict(sorted(files.items()))
    manifest_bytes = (json.dumps(to_jsonable(manifest), indent=2, allow_nan=False) + "\n").encode()
    blobs: list[tuple[str, bytes | Path]] = [(MANIFEST, manifest_bytes), (README, readme), *sorted(members.items())]
    return write_archive(out_file, blobs)


def inspect_package(file: Path) -> dict:
    """The manifest, read without extracting anything else (the archive's members are still checked)."""
    with Archive(Path(file)) as arc:
        files = check_members(arc, MAX_MEMBER_BYTES, MAX_TOTAL_BYTES)
        return read_manifest(arc, files)
