"""``verify_package``: safe extraction, sha256 of every file, and optionally top-1 accuracy re-measured."""
from __future__ import annotations

import shutil
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import MissingDependencyError, ToleranceError, UsageError
from .archive import MAX_MEMBER_BYTES, MAX_TOTAL_BYTES, Archive, check_members, extract_members, read_manifest
from ..budget import DEFAULT_TOLERANCE_POINTS
from .manifest import MANIFEST, sha256_file


def _check_files(dest: Path, manifest: dict) -> dict:
    listed: dict[str, dict] = manifest.get("files") or {}
    present = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} - {MANIFEST}
    missing = sorted(set(listed) - present)
    extra = sorted(present - set(listed))
    mismatched = sorted(n for n in set(listed) & present if sha256_file(dest / n) != listed[n].get("sha256"))
    return {"checked": len(set(listed) & present), "missing": missing, "extra": extra, "mismatched": mismatched,
            "passed": not (missing or extra or mismatched)}


def _iter_artifacts(manifest: dict) -> Iterator[tuple[dict, dict]]:
    for t in manifest.get("targets") or []:
        for a in t.get("artifacts") or []:
            yield t, a


def _rerun_accuracy(dest: Path, manifest: dict, images: np.ndarray, labels: np.ndarray, batch: int) -> list[dict]:
    from ..runtime import artifact_kind, load_runner
    from ..runtime.base import run_batched

    rows = []
    for t, a in _iter_artifacts(manifest):
        rec = a.get("recorded") or {}
        row: dict[str, Any] = {"target": t.get("target"), "file": a["file"], "recorded_top1": rec.get("top1_acc"),
                               "tolerance_points": rec.get("tolerance_points", DEFAULT_TOLERANCE_POINTS)}
        try:
            artifact_kind(a["file"])
        except UsageError:
            rows.append({**row, "status": "skipped", "reason": "not a model file (helper script or data)"})
            continue
        try:
            runner = load_runner(dest / a["file"])
        except MissingDependencyError as exc:
            rows.append({**row, "status": "skipped", "reason": str(exc)})
            continue
        logits = run_batched(runner, images, batch)
        acc = float((logits.argmax(1) == labels).mean() * 100)
        row.update(runtime=runner.name, n=int(len(labels)), measured_top1=round(acc, 4))
        if rec.get("top1_acc") is None:
            row.update(status="no recorded accuracy")
        else:
            drop = float(rec["top1_acc"]) - acc
            ok = drop <= row["tolerance_points"] + 1e-9
            row.update(drop_points=round(drop, 4), status="passed" if ok else "failed")
        rows.append(row)
    return rows


def verify_package(
    file: Path,
    *,
    val_images: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
    extract_to: Path | None = None,
    batch: int = 32,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> dict:
    """Safely extract, check every sha256 against the manifest, and optionally re-measure top-1 accuracy.

    Unsafe archives -> UsageError before anything is written; integrity or accuracy failures -> ToleranceError
    (its ``.result`` holds the full result dict).
    """
    file = Path(file)
    if (val_images is None) != (val_labels is None):
        raise UsageError("pass both validation images and labels, or neither")
    if val_images is not None and len(val_images) != len(val_labels):  # type: ignore[arg-type]
        raise UsageError(f"{len(val_images)} validation images but {len(val_labels)} labels")  # type: ignore[arg-type]
    with Archive(file) as arc:
        files = check_members(arc, max_member_bytes, max_total_bytes)
        manifest = read_manifest(arc, files)
        if extract_to is not None:
            dest, keep = Path(extract_to), True
            if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
                raise UsageError(f"{dest}: extraction folder must be empty or absent")
            created = not dest.exists()
            dest.mkdir(parents=True, exist_ok=True)
        else:
            dest, keep, created = Path(tempfile.mkdtemp(prefix="castling-verify-")), False, True
        try:
            extract_members(arc, files, dest)
        except BaseException as exc:
            if created:
                shutil.rmtree(dest, ignore_errors=True)
            if isinstance(exc, (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError)):
                raise UsageError(f"{file}: corrupt package ({exc}); nothing kept") from exc
            raise
    try:
        integrity = _check_files(dest, manifest)
        result: dict[str, Any] = {
            "package": str(file),
            "package_sha256": sha256_file(file),
            "model_name": manifest.get("model_name"),
            "integrity": integrity,
            "accuracy": None,
            "extracted_to": str(dest) if keep else None,
        }
        failures = [f"{k} files: {', '.join(integrity[k][:5])}" for k in ("missing", "extra", "mismatched")
                    if integrity[k]]
        if not failures and val_images is not None:
            labels = np.asarray(val_labels).astype(np.int64)
            rows = _rerun_accuracy(dest, manifest, np.asarray(val_images, dtype=np.float32), labels, batch)
            result["accuracy"] = rows
            failures += [f"{r['file']}: top-1 {r['measured_top1']:.2f}% vs recorded {r['recorded_top1']:.2f}% "
                         f"(drop {r['drop_points']:.2f} > {r['tolerance_points']} points)"
                         for r in rows if r["status"] == "failed"]
        result["passed"] = not failures
        result["status"] = "passed" if not failures else "failed"
        result["failures"] = failures
        if failures:
            err = ToleranceError(f"{file}: package verification failed: {'; '.join(failures)}")
            err.result = result  # type: ignore[attr-defined]
            raise err
        return result
    finally:
        if not keep:
            shutil.rmtree(dest, ignore_errors=True)


def format_verify_result(result: dict) -> str:
    """Terminal summary of ``verify_package``'s result."""
    integ = result["integrity"]
    lines = [f"{result['package']}: {result.get('status', 'passed' if result.get('passed') else 'failed')}",
             f"  sha256 {result['package_sha256'][:16]}…  model {result.get('model_name')}",
             f"  files: {integ['checked']} checked, {len(integ['missing'])} missing, {len(integ['extra'])} extra, "
             f"{len(integ['mismatched'])} mismatched"]
    for r in result.get("accuracy") or []:
        if "measured_top1" not in r:
            lines.append(f"  {r['file']:<40} {r['status']}: {r.get('reason', '')}")
            continue
        rec = f"{r['recorded_top1']:.2f}%" if r.get("recorded_top1") is not None else "-"
        drop = f"drop {r['drop_points']:+.2f} pts (tol {r['tolerance_points']})" if "drop_points" in r else ""
        lines.append(f"  {r['file']:<40} top-1 {r['measured_top1']:.2f}% (recorded {rec}) {drop}  {r['status']}")
    lines += [f"  FAILED: {f}" for f in result.get("failures") or []]
    return "\n".join(lines)
