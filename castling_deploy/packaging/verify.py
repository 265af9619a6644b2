"""``verify_package``: the signature, safe extraction, sha256 of every file, and optionally top-1 re-measured.

Order, so that an untrusted archive costs little before it is rejected:
1. members checked (names, kinds, sizes, bombs) and the manifest's shape validated — exit 2;
2. with ``trust``: the signature checked against the trusted key, its subjects against the member names and the
   manifest's bytes — exit 3 (an unsigned package with ``trust`` is exit 3 too);
3. member names and sizes against the manifest's file table — exit 3, nothing extracted;
4. extraction of exactly the listed members, then every sha256 (against the signature and the manifest) — exit 3;
5. with validation images: accuracy against the verifier's own goals (``accuracy.py``) — exit 3.
"""
from __future__ import annotations

import hashlib
import math
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..budget import DEFAULT_TOLERANCE_POINTS
from ..errors import DiskFullError, ToleranceError, UsageError
from ..output import new_run_temp_dir, remove_temp_dir
from .accuracy import (LogitsFn, check_artifact_entries, format_reference_rows, format_rows, rerun_accuracy,
                       rerun_reference)
from .archive import (
    MAX_MANIFEST_BYTES,
    MAX_MEMBER_BYTES,
    MAX_TOTAL_BYTES,
    Archive,
    Member,
    check_members,
    extract_members,
    read_manifest,
    read_member,
)
from .checks import resolve_inside
from .manifest import MANIFEST, sha256_file
from .signing import MAX_SIGNATURE_BYTES, SIGNATURE, SignatureInvalid, envelope_key_ids

UNTRUSTED_NOTE = ("recorded accuracies were not trusted ({why}): each artifact was held to the best fp32 artifact "
                  "measured here; pass --trust SIGNER.pub to also hold it to the accuracy recorded at export")


def _fail(file: Path, result: dict, failures: list[str]) -> ToleranceError:
    result.update(passed=False, status="failed", failures=failures)
    err = ToleranceError(f"{file}: package verification failed: {'; '.join(failures)}")
    err.result = result  # type: ignore[attr-defined]
    return err


def _precheck(members: list[Member], manifest: dict) -> dict:
    """Member names and sizes against the manifest's file table, before anything is extracted."""
    listed: dict[str, dict] = manifest["files"]
    present = {m.name: m.size for m in members if m.name not in (MANIFEST, SIGNATURE)}
    out = {"checked": 0,
           "missing": sorted(set(listed) - set(present)),
           "extra": sorted(set(present) - set(listed)),
           "mismatched": sorted(n for n in set(listed) & set(present) if present[n] != listed[n]["bytes"])}
    out["passed"] = not _integrity_failures(out)
    return out


def _integrity_failures(integrity: dict) -> list[str]:
    return [f"{k} files: {', '.join(integrity[k][:5])}" for k in ("missing", "extra", "mismatched") if integrity[k]]


def _check_numbers(tolerance: float, min_top1: float | None, batch: int) -> None:
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and 0 <= tolerance <= 100):
        raise UsageError(f"--tolerance {tolerance}: must be a number of top-1 points between 0 and 100")
    if min_top1 is not None and not (math.isfinite(min_top1) and 0 <= min_top1 <= 100):
        raise UsageError(f"--min-top1 {min_top1}: must be a top-1 percentage between 0 and 100")
    if not 1 <= batch <= 1024:
        raise UsageError(f"batch {batch}: must be between 1 and 1024")


def _prepare_dest(extract_to: Path | None, need: int) -> tuple[Path, bool, bool]:
    if extract_to is not None:
        dest = Path(extract_to)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise UsageError(f"{dest}: extraction folder must be empty or absent")
        created = not dest.exists()
        dest.mkdir(parents=True, exist_ok=True)
        keep = True
    else:
        dest, keep, created = new_run_temp_dir("verify"), False, True  # up to the package size: removed on
        # return, exception and SIGINT/SIGTERM; after SIGKILL by the next run
    free = shutil.disk_usage(dest).free
    if need > free:
        if created:
            remove_temp_dir(dest)
        raise DiskFullError(f"{dest}: {need} bytes to extract but only {free} free; nothing was extracted")
    return dest, keep, created


def verify_package(
    file: Path,
    *,
    val_images: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
    extract_to: Path | None = None,
    batch: int = 32,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    tolerance: float = DEFAULT_TOLERANCE_POINTS,
    trust: Path | None = None,
    min_top1: float | None = None,
    logits_fn: LogitsFn | None = None,
) -> dict:
    """Check a package and optionally re-measure top-1 accuracy against the verifier's own goals.

    ``trust``: a PEM public key; the package must carry a valid signature by it, and only then are the accuracies
    recorded at export used as goals. ``tolerance`` (points) and ``min_top1`` (%) are the verifier's goals; the
    package's own tolerance is never used. Unsafe or malformed archives -> UsageError before anything is written;
    a bad signature, integrity or accuracy failure -> ToleranceError (its ``.result`` holds the full result dict).
    """
    file = Path(file)
    if (val_images is None) != (val_labels is None):
        raise UsageError("pass both validation images and labels, or neither")
    if val_images is not None and len(val_images) != len(val_labels):  # type: ignore[arg-type]
        raise UsageError(f"{len(val_images)} validation images but {len(val_labels)} labels")  # type: ignore[arg-type]
    _check_numbers(tolerance, min_top1, batch)
    key = None
    if trust is not None:
        from .signing import fingerprint, load_public_key

        key = load_public_key(Path(trust))
    with Archive(file) as arc:
        members = check_members(arc, max_member_bytes, max_total_bytes)
        manifest = read_manifest(arc, members)
        check_artifact_entries(manifest, f"{file}: {MANIFEST}")
        by_name = {m.name: m for m in members}
        sig_raw = read_member(arc, by_name[SIGNATURE], MAX_SIGNATURE_BYTES, SIGNATURE) if SIGNATURE in by_name \
            else None
        manifest_sha = hashlib.sha256(read_member(arc, by_name[MANIFEST], MAX_MANIFEST_BYTES, MANIFEST)).hexdigest()
        result: dict[str, Any] = {
            "package": str(file), "package_sha256": sha256_file(file), "model_name": manifest.get("model_name"),
            "signature": {"status": "unsigned" if sig_raw is None else "unchecked", "key_fingerprint": None,
                          "key_ids": envelope_key_ids(sig_raw) if sig_raw is not None else []},
            "goals": {"tolerance_points": tolerance, "min_top1": min_top1, "recorded_accuracy_trusted": False},
            "integrity": None, "accuracy": None, "notes": [], "extracted_to": None,
        }
        subjects: dict[str, str] | None = None
        if key is not None:
            sig = result["signature"]
            sig["key_fingerprint"] = fingerprint(key)
            if sig_raw is None:
                raise _fail(file, result, ["package is unsigned but --trust was given"])
            from .signing import open_envelope, subject_problems

            try:
                subjects = open_envelope(sig_raw, key)
                names: dict[str, str | None] = {m.name: None for m in members if m.name != SIGNATURE}
                names[MANIFEST] = manifest_sha
                problems = subject_problems(subjects, names)
                if problems:
                    raise SignatureInvalid("; ".join(problems))
            except SignatureInvalid as exc:
                sig.update(status="invalid", reason=str(exc))
                raise _fail(file, result, [f"signature: {exc}"]) from None
        integrity = _precheck(members, manifest)
        result["integrity"] = integrity
        if _integrity_failures(integrity):
            if subjects is not None:  # the manifest is signed, so members that differ from it mean tampering
                result["signature"].update(status="invalid", reason="members differ from the signed manifest")
            raise _fail(file, result, [f + " (nothing was extracted)" for f in _integrity_failures(integrity)])
        listed = [m for m in members if m.name in manifest["files"] or m.name in (MANIFEST, SIGNATURE)]
        dest, keep, created = _prepare_dest(extract_to, sum(m.size for m in listed))
        try:
            extract_members(arc, listed, dest)
        except BaseException as exc:
            if created:
                remove_temp_dir(dest)
            if isinstance(exc, (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError)):
                raise UsageError(f"{file}: corrupt package ({exc}); nothing kept") from exc
            raise
    try:
        result["extracted_to"] = str(dest) if keep else None
        _after_extraction(file, dest, manifest, subjects, result, val_images, val_labels, batch, logits_fn)
        return result
    finally:
        if not keep:
            remove_temp_dir(dest)


def _after_extraction(file: Path, dest: Path, manifest: dict, subjects: dict[str, str] | None, result: dict,
                      val_images: np.ndarray | None, val_labels: np.ndarray | None, batch: int,
                      logits_fn: LogitsFn | None = None) -> None:
    listed: dict[str, dict] = manifest["files"]
    digests = {n: sha256_file(resolve_inside(dest, n, "package file")) for n in listed}
    integrity = result["integrity"]
    integrity["mismatched"] = sorted(n for n in listed if digests[n] != listed[n]["sha256"])
    integrity["checked"] = len(listed)
    sig = result["signature"]
    if subjects is not None:
        from .signing import subject_problems

        problems = subject_problems(subjects, {**digests, MANIFEST: sha256_file(dest / MANIFEST)})
        if problems:
            sig.update(status="invalid", reason="; ".join(problems))
            raise _fail(file, result, [f"signature: {sig['reason']}"])
        sig["status"] = "valid"
    integrity["passed"] = not _integrity_failures(integrity)
    if not integrity["passed"]:
        raise _fail(file, result, _integrity_failures(integrity))
    trusted = sig["status"] == "valid"
    result["goals"]["recorded_accuracy_trusted"] = trusted
    if val_images is not None:
        labels = np.asarray(val_labels).astype(np.int64)
        rows, failures = rerun_accuracy(dest, manifest, np.asarray(val_images, dtype=np.float32), labels,
                                        batch=batch, tolerance=result["goals"]["tolerance_points"],
                                        trusted=trusted, min_top1=result["goals"]["min_top1"], logits_fn=logits_fn)
        result["accuracy"] = rows
        if not trusted:
            why = "package unsigned" if sig["status"] == "unsigned" else "signature not checked: no --trust key"
            result["notes"].append(UNTRUSTED_NOTE.format(why=why))
        if not any("measured_top1" in r for r in rows):
            result["notes"].append("no model file in the package could be run here; accuracy was not measured")
    else:
        failures = []
    ref_rows, ref_failures = rerun_reference(dest, manifest, logits_fn=logits_fn, batch=batch)
    result["reference"] = ref_rows
    if not ref_rows and val_images is None:
        result["notes"].append("the package carries no reference inputs (exported by an older version) and no --val "
                               "was given: only hashes were checked; pass --val DIR to re-measure accuracy")
    if failures or ref_failures:
        raise _fail(file, result, failures + ref_failures)
    result.update(passed=True, status="passed", failures=[])


def format_verify_result(result: dict) -> str:
    """Terminal summary of ``verify_package``'s result."""
    integ = result.get("integrity") or {}
    sig = result.get("signature") or {}
    goals = result.get("goals") or {}
    lines = [f"{result['package']}: {result.get('status', 'passed' if result.get('passed') else 'failed')}",
             f"  sha256 {result['package_sha256'][:16]}…  model {result.get('model_name')}"]
    who = (f"trusted key {sig['key_fingerprint']}" if sig.get("key_fingerprint") else
           f"names key {', '.join(sig['key_ids'])}" if sig.get("key_ids") else "no key")
    explain = {"valid": "signed by the trusted key", "invalid": sig.get("reason", ""), "unsigned": "no signature.json",
               "unchecked": "signed, but no --trust key was given, so the signature was not checked"}
    lines.append(f"  signature: {sig.get('status', '?')} ({explain.get(sig.get('status'), '')}; {who})")
    if integ:
        lines.append(f"  files: {integ.get('checked', 0)} checked, {len(integ.get('missing', []))} missing, "
                     f"{len(integ.get('extra', []))} extra, {len(integ.get('mismatched', []))} mismatched")
    if result.get("reference"):
        lines.append("  reference inputs (seeded, stored at export): each file vs its own export-time logits")
        lines += format_reference_rows(result["reference"])
    if result.get("accuracy") is not None:
        mt = goals.get("min_top1")
        lines.append(f"  goals (the verifier's): tolerance {goals.get('tolerance_points')} points"
                     + (f", min top-1 {mt}%" if mt is not None else ""))
        lines += format_rows(result["accuracy"], bool(goals.get("recorded_accuracy_trusted")))
    lines += [f"  note: {n}" for n in result.get("notes") or []]
    lines += [f"  FAILED: {f}" for f in result.get("failures") or []]
    return "\n".join(lines)
