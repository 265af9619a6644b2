"""``create_package`` and ``inspect_package``: the two cheap operations on a package."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .archive import MAX_MEMBER_BYTES, MAX_TOTAL_BYTES, Archive, archive_format, check_members, read_manifest
from .archive import write_archive
from ..errors import UsageError
from ..output import to_jsonable
from .manifest import MANIFEST, README, build_manifest, render_readme, sha256_file


def create_package(export_dir: Path, out_file: Path, *, allow_failed: bool = False,
                   sign_key: Path | None = None) -> Path:
    """Write artifacts + report.json files + manifest.json + README.md into one archive, atomically.

    ``export_dir`` is a target folder (holding report.json) or a model folder holding several target folders.
    Reports marked failed are refused (ToleranceError) unless ``allow_failed``. With ``sign_key`` (a PEM private
    key), ``signature.json`` signs the sha256 of every other member, manifest included (see ``signing.py``).
    """
    out_file = Path(out_file)
    if out_file.is_dir():
        raise UsageError(f"{out_file}: is a folder; pass -o with a file name such as {out_file / 'model.zip'}")
    archive_format(out_file)  # reject an unknown suffix before hashing anything
    if out_file.parent.exists() and not out_file.parent.is_dir():
        raise UsageError(f"{out_file.parent}: not a folder; pass -o with a file in a writable folder")
    key = None
    if sign_key is not None:
        from .signing import load_private_key

        key = load_private_key(Path(sign_key))  # a bad key fails before any hashing
    manifest, members = build_manifest(Path(export_dir), allow_failed=allow_failed)
    reserved = [n for n in members if n.split("/")[0] in (MANIFEST, README, "signature.json")]
    if reserved:
        raise UsageError(f"{export_dir}: {reserved[0]!r} would clash with the package's own files; rename the "
                         "target folder")
    readme = render_readme(manifest).encode()
    files = {name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for name, p in sorted(members.items())}
    files[README] = {"sha256": hashlib.sha256(readme).hexdigest(), "bytes": len(readme)}
    manifest["files"] = dict(sorted(files.items()))
    manifest_bytes = (json.dumps(to_jsonable(manifest), indent=2, allow_nan=False) + "\n").encode()
    blobs: list[tuple[str, bytes | Path]] = [(MANIFEST, manifest_bytes), (README, readme), *sorted(members.items())]
    if key is not None:
        from .signing import SIGNATURE, sign_digests

        digests = {name: f["sha256"] for name, f in files.items()}
        digests[MANIFEST] = hashlib.sha256(manifest_bytes).hexdigest()
        blobs.append((SIGNATURE, sign_digests(key, digests)))
    try:
        return write_archive(out_file, blobs)
    except (PermissionError, NotADirectoryError, IsADirectoryError) as exc:
        raise UsageError(f"{out_file}: cannot write the package ({exc.strerror}); pass -o in a writable "
                         "folder") from None


def inspect_package(file: Path) -> dict:
    """The manifest, read without extracting anything else (the archive's members are still checked)."""
    with Archive(Path(file)) as arc:
        files = check_members(arc, MAX_MEMBER_BYTES, MAX_TOTAL_BYTES)
        return read_manifest(arc, files)
