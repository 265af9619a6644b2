"""Archive I/O: deterministic writers, and a reader that treats every archive as untrusted input.

Format: **.zip** by default (``.tar.gz``/``.tgz`` also written and read). Zip because the consumer is an app
developer: Finder, Explorer, Xcode and Android Studio open it natively, and its central directory gives random
access, so ``inspect`` reads ``manifest.json`` without decompressing hundreds of MB of weights. Both writers are
deterministic (sorted members, fixed timestamps, no owner info): the same export gives byte-identical archives.
Reading: every member is checked (names, types, sizes) before anything is extracted.
"""
from __future__ import annotations

import gzip
import io
import json
import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from ..errors import UsageError
from ..output import atomic_path
from .checks import validate_manifest
from .manifest import MANIFEST

MAX_MEMBER_BYTES = 8 * 2**30
MAX_TOTAL_BYTES = 32 * 2**30
MAX_MEMBERS = 100_000
MAX_MANIFEST_BYTES = 64 * 2**20
# Weights barely compress (float noise): a package whose members claim far more bytes than the archive holds is a
# decompression bomb. Small packages are exempt (a tiny helper script may compress 100x).
MAX_EXPANSION = 100
EXPANSION_EXEMPT_BYTES = 64 * 2**20
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def archive_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    raise UsageError(f"{path}: package name must end in .zip (recommended) or .tar.gz")



def write_archive(out_file: Path, blobs: list[tuple[str, bytes | Path]]) -> Path:
    """Write ``(archive name, bytes or source file)`` pairs in order, atomically (temp file + rename)."""
    fmt = archive_format(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_file) as tmp, open(tmp, "wb") as raw:
        (write_zip if fmt == "zip" else write_targz)(raw, blobs)
    return out_file


def write_zip(raw: IO[bytes], blobs: list[tuple[str, bytes | Path]]) -> None:
    with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for name, src in blobs:
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as dst:
                if isinstance(src, bytes):
                    dst.write(src)
                else:
                    with open(src, "rb") as fh:
                        shutil.copyfileobj(fh, dst, 1 << 20)


def write_targz(raw: IO[bytes], blobs: list[tuple[str, bytes | Path]]) -> None:
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, src in blobs:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, 0, "", ""
            if isinstance(src, bytes):
                info.size = len(src)
                tf.addfile(info, io.BytesIO(src))
            else:
                info.size = src.stat().st_size
                with open(src, "rb") as fh:
                    tf.addfile(info, fh)


@dataclass
class Member:
    name: str  # normalized posix path, no leading "./" or trailing "/"
    size: int
    kind: str  # file, dir, symlink, hardlink, device, other
    handle: Any


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if info.is_dir():
        return "dir"
    if info.create_system == 3 and stat.S_IFMT(mode):  # unix file-type bits present
        if stat.S_ISLNK(mode):
            return "symlink"
        if stat.S_ISREG(mode):
            return "file"
        return "dir" if stat.S_ISDIR(mode) else "device"
    return "file"


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.isreg():
        return "file"
    if info.isdir():
        return "dir"
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    return "device" if (info.ischr() or info.isblk() or info.isfifo()) else "other"


def _unsafe_reason(raw: str) -> str | None:
    if not raw or "\x00" in raw:
        return "empty or NUL in name"
    if "\\" in raw:
        return "backslash in name"
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(raw).parts:
        return "'..' in path"
    return None


class Archive:
    """A read-only view over a zip or tar.gz with uniform member metadata."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise UsageError(f"{path}: no such package file")
        self.path = path
        try:
            if zipfile.is_zipfile(path):
                self.fmt, self._zf = "zip", zipfile.ZipFile(path)
                infos = self._zf.infolist()
                self.members = [Member(i.filename, i.file_size, _zip_kind(i), i) for i in infos]
            elif tarfile.is_tarfile(path):
                self.fmt, self._tf = "tar", tarfile.open(path, "r:*")
                self.members = [Member(i.name, i.size, _tar_kind(i), i) for i in self._tf.getmembers()]
            else:
                raise UsageError(f"{path}: not a zip or tar.gz package")
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as exc:
            raise UsageError(f"{path}: corrupt package ({exc})") from exc

    def open(self, m: Member) -> IO[bytes]:
        if self.fmt == "zip":
            return self._zf.open(m.handle)
        fh = self._tf.extractfile(m.handle)
        assert fh is not None  # regular files only reach here
        return fh

    def close(self) -> None:
        (self._zf if self.fmt == "zip" else self._tf).close()

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_members(arc: Archive, max_member_bytes: int, max_total_bytes: int) -> list[Member]:
    """Refuse the whole archive before extracting anything: unsafe names, links/devices, a name that is both a
    file and a folder, size bombs (per member, in total, and against the archive's own size)."""
    if len(arc.members) > MAX_MEMBERS:
        raise UsageError(f"{arc.path}: {len(arc.members)} members exceeds the limit of {MAX_MEMBERS}")
    seen: set[str] = set()
    total = 0
    files: list[Member] = []
    for m in arc.members:
        reason = _unsafe_reason(m.name)
        if reason:
            raise UsageError(f"{arc.path}: refusing unsafe member {m.name!r} ({reason}); nothing was extracted")
        if m.kind not in ("file", "dir"):
            raise UsageError(f"{arc.path}: refusing {m.kind} member {m.name!r}; packages hold only regular files")
        name = PurePosixPath(m.name).as_posix().rstrip("/")
        if m.kind == "dir":
            continue
        if name in seen:
            raise UsageError(f"{arc.path}: duplicate member {name!r}; refusing an ambiguous package")
        seen.add(name)
        if m.size > max_member_bytes:
            raise UsageError(f"{arc.path}: member {name!r} is {m.size} bytes, over the {max_member_bytes}-byte limit")
        total += m.size
        if total > max_total_bytes:
            raise UsageError(f"{arc.path}: members total over the {max_total_bytes}-byte limit")
        m.name = name
        files.append(m)
    folders = {str(p) for m in arc.members for p in PurePosixPath(m.name).parents} | {
        PurePosixPath(m.name).as_posix().rstrip("/") for m in arc.members if m.kind == "dir"}
    clash = sorted(seen & folders)
    if clash:
        raise UsageError(f"{arc.path}: member {clash[0]!r} is both a file and a folder; refusing an ambiguous "
                         "package; nothing was extracted")
    packed = arc.path.stat().st_size
    if total > EXPANSION_EXEMPT_BYTES and total > MAX_EXPANSION * packed:
        raise UsageError(f"{arc.path}: members claim {total} bytes from a {packed}-byte archive (over "
                         f"{MAX_EXPANSION}x); refusing a decompression bomb; nothing was extracted")
    return files


def read_member(arc: Archive, m: Member, limit: int, what: str) -> bytes:
    """A member's bytes, refusing one larger than ``limit`` (by its header and by what it really holds)."""
    if m.size > limit:
        raise UsageError(f"{arc.path}: {what} is implausibly large ({m.size} bytes)")
    with arc.open(m) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise UsageError(f"{arc.path}: {what} is larger than its header says")
    return data


def read_manifest(arc: Archive, files: list[Member]) -> dict:
    m = next((f for f in files if f.name == MANIFEST), None)
    if m is None:
        raise UsageError(f"{arc.path}: no {MANIFEST}; not a castling-deploy package")
    raw = read_member(arc, m, MAX_MANIFEST_BYTES, MANIFEST)
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{arc.path}: {MANIFEST} is not valid JSON ({exc})") from None
    except RecursionError:
        raise UsageError(f"{arc.path}: {MANIFEST} is nested too deeply to be a manifest") from None
    if not isinstance(manifest, dict) or not str(manifest.get("schema", "")).startswith("castling-deploy/manifest/"):
        raise UsageError(f"{arc.path}: {MANIFEST} has no castling-deploy manifest schema")
    return validate_manifest(manifest, f"{arc.path}: {MANIFEST}")


def extract_members(arc: Archive, files: list[Member], dest: Path) -> None:
    root = dest.resolve()
    for m in files:
        target = (root / m.name).resolve()
        if not target.is_relative_to(root):  # unreachable after check_members; kept as a second lock
            raise UsageError(f"{arc.path}: member {m.name!r} escapes the extraction folder")
        written = 0
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with arc.open(m) as src, open(target, "xb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    written += len(chunk)
                    if written > m.size:
                        raise UsageError(f"{arc.path}: member {m.name!r} is larger than its header says")
                    dst.write(chunk)
        except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
            raise UsageError(f"{arc.path}: member {m.name!r} collides with another member ({exc.strerror}); "
                             "refusing an ambiguous package") from None
