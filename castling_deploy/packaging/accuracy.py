"""``verify --val``: every model file in a package re-measured here, against goals the *verifier* sets.

The package's recorded accuracies, tolerances and artifact list are claims by whoever wrote the package. So:
- the files to re-measure are found from the package's files (every file a runtime can load), not from the
  manifest's artifact list, which only adds precision and recorded accuracy;
- the tolerance is the verifier's own (``--tolerance``, default 0.5 points); the manifest's is never used;
- every artifact must stay within the tolerance of the best fp32 artifact measured here (the float reference the
  export verified against is not in the package), and above ``--min-top1`` when given;
- only when the package is signed by a key the verifier trusts is each artifact also held to the accuracy
  recorded at export (measured top-1 within the tolerance of it).
"""
from __future__ import annotations

import math
from pathlib import Path, PurePosixPath
from typing import Callable, Any

import numpy as np

from ..errors import MissingDependencyError, UsageError
from .checks import resolve_inside


def model_files(files: dict[str, Any]) -> list[str]:
    """Every model a runtime can load in a package's file table: files with a runtime suffix, and folder models
    (``.mlpackage``) by their folder."""
    from ..runtime import RUNTIMES

    found: set[str] = set()
    for name in files:
        parts = name.split("/")
        for i, part in enumerate(parts):
            suffix = PurePosixPath(part).suffix.lower()
            if suffix in RUNTIMES and (i == len(parts) - 1 or RUNTIMES[suffix].kind == "coreml"):
                found.add("/".join(parts[: i + 1]))
                break
    return sorted(found)


def check_artifact_entries(manifest: dict, source: str) -> None:
    """Each artifact the manifest describes must be one of the package's files or folders (exit 2 otherwise)."""
    files = manifest["files"]
    for t in manifest["targets"]:
        for a in t.get("artifacts") or []:
            name = a["file"]
            if name not in files and not any(f.startswith(name + "/") for f in files):
                raise UsageError(f"{source}: artifact {name!r} is not one of the package's files")


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


LogitsFn = Callable[[Path, np.ndarray], tuple[np.ndarray, str]]


def local_logits(batch: int) -> LogitsFn:
    """Run a model file here with the runtime its suffix implies: (logits, runtime name)."""
    from ..devices.engine_compat import check_engine_runs_here
    from ..quiet import quiet_native_output
    from ..runtime import load_runner
    from ..runtime.base import run_batched

    def run(path: Path, images: np.ndarray) -> tuple[np.ndarray, str]:
        check_engine_runs_here(path)  # an engine for another GPU / TensorRT: skipped, said why, before loading
        with quiet_native_output():  # the runtimes' load-time chatter stays off the terminal, as during export
            runner = load_runner(path)
            return run_batched(runner, images, batch), runner.name

    return run


def _run_model(logits_fn: LogitsFn, dest: Path, name: str, images: np.ndarray) -> tuple[np.ndarray, str] | str:
    """(logits, runtime) of package file ``name`` on ``images``, or why it was skipped: its runtime is absent (or
    refuses it) where ``logits_fn`` runs it."""
    from ..devices import DeviceRuntimeMissing, DeviceUsageError
    from ..devices.engine_compat import EngineMismatchError

    try:
        return logits_fn(resolve_inside(dest, name, "artifact"), images)
    except (MissingDependencyError, DeviceRuntimeMissing, DeviceUsageError, EngineMismatchError) as exc:
        return str(exc)


def rerun_accuracy(dest: Path, manifest: dict, images: np.ndarray, labels: np.ndarray, *, batch: int,
                   tolerance: float, trusted: bool, min_top1: float | None,
                   logits_fn: LogitsFn | None = None) -> tuple[list[dict], list[str]]:
    """Measure every model file on (images, labels) — here, or wherever ``logits_fn`` runs it (a device);
    returns the rows and the failed goals (one line each). A file whose runtime is absent is skipped, said so."""
    logits_fn = logits_fn or local_logits(batch)

    meta: dict[str, tuple[dict, dict]] = {}
    for t in manifest["targets"]:
        for a in t.get("artifacts") or []:
            meta.setdefault(a["file"], (t, a))
    models = model_files(manifest["files"])
    rows: list[dict[str, Any]] = []
    for name in sorted(set(meta) - set(models)):
        t, a = meta[name]
        rows.append({"target": t.get("target"), "file": name, "status": "skipped",
                     "reason": "not a model file (helper script or data)"})
    for name in models:
        t, a = meta.get(name, ({}, {}))
        rec = a.get("recorded") or {}
        row: dict[str, Any] = {"target": t.get("target"), "file": name, "precision": a.get("precision", "?"),
                               "recorded_top1": _number(rec.get("top1_acc")), "recorded_trusted": trusted}
        ran = _run_model(logits_fn, dest, name, images)
        if isinstance(ran, str):
            rows.append({**row, "status": "skipped", "reason": ran})
            continue
        logits, runtime = ran
        acc = float((np.asarray(logits).argmax(1) == labels).mean() * 100)
        rows.append({**row, "runtime": runtime, "n": len(labels), "measured_top1": round(acc, 4)})
    return rows, _apply_goals(rows, tolerance=tolerance, trusted=trusted, min_top1=min_top1)


def _apply_goals(rows: list[dict], *, tolerance: float, trusted: bool, min_top1: float | None) -> list[str]:
    measured = [r for r in rows if "measured_top1" in r]
    if not measured:
        return []
    pool = [r for r in measured if r["precision"] == "fp32"] or measured
    ref = max(pool, key=lambda r: r["measured_top1"])
    kind = "fp32 artifact" if ref["precision"] == "fp32" else "artifact"
    failures: list[str] = []
    for r in measured:
        acc = r["measured_top1"]
        ok = True
        r["reference"] = ref["file"]
        r["drop_vs_reference"] = round(ref["measured_top1"] - acc, 4)
        if r["drop_vs_reference"] > tolerance + 1e-9:
            ok = False
            failures.append(f"{r['file']}: top-1 {acc:.2f}% is {r['drop_vs_reference']:.2f} points below "
                            f"{ref['file']} ({ref['measured_top1']:.2f}%), the best {kind} measured here "
                            f"(tolerance {tolerance:g} points)")
        if trusted and r["recorded_top1"] is not None:
            r["drop_vs_recorded"] = round(r["recorded_top1"] - acc, 4)
            if r["drop_vs_recorded"] > tolerance + 1e-9:
                ok = False
                failures.append(f"{r['file']}: top-1 {acc:.2f}% vs {r['recorded_top1']:.2f}% recorded at export "
                                f"and signed (drop {r['drop_vs_recorded']:.2f} > {tolerance:g} points)")
        if min_top1 is not None and acc < min_top1 - 1e-9:
            ok = False
            failures.append(f"{r['file']}: top-1 {acc:.2f}% is below --min-top1 {min_top1:g}%")
        r["status"] = "passed" if ok else "failed"
    return failures


def format_rows(rows: list[dict], trusted: bool) -> list[str]:
    lines = []
    for r in rows:
        if "measured_top1" not in r:
            lines.append(f"  {r['file']:<40} {r['status']}: {r.get('reason', '')}")
            continue
        rec = f"{r['recorded_top1']:.2f}%" if r.get("recorded_top1") is not None else "-"
        vs = f"{r['drop_vs_reference']:+.2f} vs best"
        if "drop_vs_recorded" in r:
            vs += f", {r['drop_vs_recorded']:+.2f} vs recorded"
        lines.append(f"  {r['file']:<40} top-1 {r['measured_top1']:.2f}% (recorded {rec}"
                     f"{'' if trusted else ', not trusted'}; drop {vs})  {r['status']}")
    return lines


def rerun_reference(dest: Path, manifest: dict, *, logits_fn: LogitsFn | None = None,
                    batch: int = 32) -> tuple[list[dict], list[str]]:
    """Every model file re-run on its folder's reference.npz (castling_deploy/reference.py): the file must give its
    export-time logits back (and float files the folded model's, within atol). Returns (rows, failures); no rows
    when the package carries no reference inputs (exported before they existed)."""
    from ..reference import REFERENCE_FILE, check_against_reference, load_reference

    logits_fn = logits_fn or local_logits(batch)
    precision = {a["file"]: a.get("precision", "?") for t in manifest["targets"] for a in t.get("artifacts") or []}
    refs: dict[str, Any] = {}
    rows: list[dict] = []
    for name in model_files(manifest["files"]):
        folder = name.split("/", 1)[0] if "/" in name else ""
        ref_name = f"{folder}/{REFERENCE_FILE}" if folder else REFERENCE_FILE
        if ref_name not in manifest["files"]:
            continue
        if ref_name not in refs:
            refs[ref_name] = load_reference(resolve_inside(dest, ref_name, "reference inputs"))
        ref = refs[ref_name]
        ran = _run_model(logits_fn, dest, name, ref.inputs)
        if isinstance(ran, str):
            rows.append({"file": name, "status": "skipped", "reason": ran})
            continue
        logits, runtime = ran
        rows.append({**check_against_reference(ref, name, precision.get(name, "?"), logits), "runtime": runtime})
    failures = [f"{r['file']}: {f} (reference inputs)" for r in rows for f in r.get("failures", [])]
    return rows, failures


def format_reference_rows(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if r["status"] == "skipped":
            lines.append(f"  {r['file']:<40} skipped: {r['reason']}")
            continue
        cos = f"cosine {r['min_cosine_vs_export']:.6f} vs export" if "min_cosine_vs_export" in r else "no export logits"
        lines.append(f"  {r['file']:<40} {cos}, max|Δ| {r['max_abs_vs_folded']:.2e} vs folded  {r['status']}"
                     + (": " + "; ".join(r["failures"]) if r["failures"] else ""))
    return lines
