"""The package manifest: what was built from which checkpoint, how well it verified, and every file's sha256.

It is assembled from the export folders' ``report.json`` files (unknown keys are carried along untouched) and
rendered twice: as ``manifest.json`` for tools and as a short ``README.md`` for the app developer.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..digest import file_sha256
from ..errors import ToleranceError, UsageError
from ..report import ArtifactRecord, Report, load_report
from ..budget import DEFAULT_TOLERANCE_POINTS
from .checks import unsafe_path_reason

SCHEMA = "castling-deploy/manifest/1"
MANIFEST = "manifest.json"
README = "README.md"

sha256_file = file_sha256


def describe_runtime(path: Path) -> str:
    from ..runtime import RUNTIMES

    spec = RUNTIMES.get(path.suffix.lower())
    return spec.description if spec else "-"


def _tree_digest(entries: dict[str, str]) -> str:
    """Digest of a directory artifact (.mlpackage): sha256 over sorted ``relpath\\0sha256`` lines."""
    return hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(entries.items())).encode()).hexdigest()


def _find_target_dirs(export_dir: Path) -> list[Path]:
    if not export_dir.is_dir():
        raise UsageError(f"{export_dir}: not a folder; pass an export folder holding report.json")
    if (export_dir / "report.json").is_file():
        return [export_dir]
    dirs = sorted(p for p in export_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / "report.json").is_file())
    if not dirs:
        raise UsageError(f"{export_dir}: no report.json here or in its subfolders; run `castling-deploy export` first")
    return dirs


def collect_files(target_dir: Path) -> list[Path]:
    """Regular files under a target folder; refuse links (they could pull in files from elsewhere)."""
    out: list[Path] = []
    for p in sorted(target_dir.rglob("*")):
        rel = p.relative_to(target_dir)
        if any(part.startswith(".") for part in rel.parts):
            continue  # temporary/staging files of an interrupted run
        if p.is_symlink():
            raise UsageError(f"{p}: symbolic links cannot be packaged; replace it with the real file")
        if p.is_file():
            out.append(p)
    return out


def _recorded_accuracy(report: Report, artifact: ArtifactRecord) -> dict | None:
    """What the stage that verified this artifact (its ``verified_by`` id) measured; None when no stage did."""
    stage = report.stage(artifact.verified_by)
    if stage is None:
        return None
    m = stage.metrics
    tol = stage.goals.get("max_top1_drop_points", report.goals.get("tolerance_points"))
    rec = {
        "stage": stage.id,
        "executor": stage.executor,
        "n": m.get("n"),
        "top1_acc": m.get("top1_acc"),
        "float_top1_acc": m.get("ref_top1_acc"),
        "top1_drop_points": m.get("top1_drop_points"),
        "top1_agreement": m.get("top1_agreement"),
        "cosine": m.get("cosine"),
        "max_abs_logit": m.get("max_abs_logit"),
        "tolerance_points": float(tol) if tol is not None else DEFAULT_TOLERANCE_POINTS,
        "passed": stage.passed,
    }
    return {k: v for k, v in rec.items() if v is not None}


def _artifact_source(tdir: Path, rel: str) -> Path:
    """The file a report names, which must exist inside its target folder (no link, absolute path or '..')."""
    reason = unsafe_path_reason(rel)
    src = tdir / rel
    if reason is None and not src.resolve().is_relative_to(tdir.resolve()):
        reason = "resolves outside the folder"
    if reason:
        raise UsageError(f"{tdir / 'report.json'}: artifact path {rel[:80]!r} leaves its folder ({reason}); only "
                         "files inside the export folder can be packaged")
    if src.is_symlink():
        raise UsageError(f"{src}: symbolic links cannot be packaged; replace it with the real file")
    if not src.exists():
        raise UsageError(f"{src}: listed in report.json but missing; re-run the export")
    return src


def build_manifest(export_dir: Path, *, allow_failed: bool = False) -> tuple[dict, dict[str, Path]]:
    """Manifest (without the ``files`` table) and the archive-name -> source-file map."""
    export_dir = Path(export_dir)
    members: dict[str, Path] = {}
    targets: list[dict] = []
    common: dict[str, Any] = {}
    for tdir in _find_target_dirs(export_dir):
        report = load_report(tdir / "report.json")
        if report.status != "passed" and not allow_failed:
            raise ToleranceError(f"{tdir}: export report status is {report.status!r}; refusing to package "
                                 "an artifact that failed verification", str(tdir / "report.json"))
        for key in ("model_name", "checkpoint", "preprocess", "labels"):
            value = getattr(report, key)
            if key in common and value != common[key]:
                raise UsageError(f"{tdir}: {key} differs from the other targets; package one model per archive")
            common[key] = value
        common.setdefault("input", report.input)
        prefix = tdir.name
        for f in collect_files(tdir):
            members[f"{prefix}/{f.relative_to(tdir).as_posix()}"] = f
        artifacts = []
        for a in report.artifacts:
            src = _artifact_source(tdir, a.file)
            if not src.is_dir() and f"{prefix}/{a.file}" not in members:
                raise UsageError(f"{src}: listed in report.json but not a regular file of {tdir}; re-run the export")
            runtime = a.runtime or describe_runtime(src)
            entry = {**{k: v for k, v in asdict(a).items() if v is not None}, "file": f"{prefix}/{a.file}",
                     "runtime": runtime}
            if src.is_dir():
                files = {p.relative_to(src).as_posix(): sha256_file(p) for p in collect_files(src)}
                entry.update(directory=True, tree_sha256=_tree_digest(files), bytes=sum(
                    p.stat().st_size for p in collect_files(src)))
            else:
                digest = sha256_file(src)
                if a.sha256 and a.sha256 != digest:
                    raise ToleranceError(f"{src}: sha256 differs from report.json; the file changed after it was "
                                         "verified — re-run the export", str(tdir / "report.json"))
                entry.update(sha256=digest, bytes=src.stat().st_size)
            entry["recorded"] = _recorded_accuracy(report, a)
            artifacts.append(entry)
        d = report.to_dict()
        targets.append({"target": report.target, "folder": prefix, "status": report.status,
                        "report": f"{prefix}/report.json", "input": report.input, "artifacts": artifacts,
                        **{k: d[k] for k in ("options", "fold", "quantization", "data", "error_budget", "goals",
                                             "latency", "tool", "runtime_versions")}})
    from .. import __version__

    pre = common.get("preprocess") or {}
    crop = pre.get("crop") or pre.get("img_size") or ((common.get("checkpoint") or {}).get("config") or {}).get("img_size")
    manifest = {
        "schema": SCHEMA,
        "created_by": {"name": "castling-deploy", "version": __version__},
        "model_name": common.get("model_name"),
        "checkpoint": common.get("checkpoint"),
        "input": common.get("input") or {"name": "images", "shape": ["batch", 3, crop, crop] if crop else None,
                                          "layout": "NCHW", "dtype": "float32"},
        "preprocess": pre,
        "labels": common.get("labels"),
        "targets": targets,
    }
    return manifest, members


def _shape(shape: object) -> str:
    return "(" + ", ".join(map(str, shape)) + ")" if isinstance(shape, list) else "?"


def render_readme(manifest: dict) -> str:
    """A short guide for the app developer: what goes in, what comes out, which file for which runtime."""
    pre, inp = manifest.get("preprocess") or {}, manifest.get("input") or {}
    labels = manifest.get("labels") or []
    ck = manifest.get("checkpoint") or {}
    lines = [f"# {manifest.get('model_name') or 'model'} — deployment package", "",
             f"Built by castling-deploy {manifest['created_by']['version']} from checkpoint "
             f"`{Path(str(ck.get('path', '?'))).name}` (sha256 `{_short(ck.get('sha256'))}…`, "
             f"arch `{ck.get('arch', '?')}`).", "",
             "## Input and output",
             f"- input `{inp.get('name')}`: {inp.get('dtype', 'float32')} {inp.get('layout')} {_shape(inp.get('shape'))} unless the "
             "table below says otherwise; output: float32 logits (N, classes) — apply softmax for probabilities.",
             f"- preprocessing: RGB, resize short side to {pre.get('resize')} ({pre.get('interpolation', 'bicubic')}), "
             f"center-crop {pre.get('crop')}, scale to [0, 1], subtract mean {pre.get('mean')}, "
             f"divide by std {pre.get('std')}.",
             (f"- labels: {len(labels)} classes, index order as in `manifest.json` → `labels` (first: "
              f"{', '.join(map(str, labels[:5]))}{'…' if len(labels) > 5 else ''})." if labels else
              "- labels: none recorded in the checkpoint; the output index is the class index."),
             "", "## Files",
             "| file | runtime | precision | size | top-1 here | float model | drop (pts) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for t in manifest["targets"]:
        for a in t["artifacts"]:
            r = a.get("recorded") or {}
            fmt = (lambda v: f"{v:.2f}%" if isinstance(v, (int, float)) else "-")  # noqa: E731
            drop = r.get("top1_drop_points")
            lines.append(f"| `{a['file']}` | {a['runtime']} | {a.get('precision', '?')} | "
                         f"{a.get('bytes', 0) / 2**20:.1f} MiB | {fmt(r.get('top1_acc'))} | "
                         f"{fmt(r.get('float_top1_acc'))} | {f'{drop:+.2f}' if drop is not None else '-'} |")
    lines += ["", "Accuracy is top-1 on the validation set recorded in `manifest.json` (`targets[].data.val`), "
              "measured by running each file in its runtime against the folded float model in PyTorch; each target "
              "folder's `report.json` has the full error budget (fold → export → fp16 → int8).", "",
              "Check the package before shipping: `castling-deploy verify <this archive> --val IMAGES "
              "--trust SIGNER.pub` (the signature over every file, then each file's accuracy again on your images; "
              "without a trusted signature the accuracies recorded here are not evidence).", ""]
    return "\n".join(lines)



def _num(v: object, spec: str) -> str:
    """A number from an untrusted manifest formatted with ``spec``, or '-' when it is not one."""
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _mib(v: object) -> str:
    return f"{v / 2**20:8.2f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "       -"


def _short(digest: object) -> str:
    return str(digest).removeprefix("sha256:")[:12] if digest else "-"


def format_manifest(manifest: dict) -> str:
    """Human-readable summary of a manifest (``castling-deploy inspect``)."""
    ck = manifest.get("checkpoint") or {}
    lines = [f"model     {manifest.get('model_name')}  (arch {ck.get('arch')}, form {ck.get('form')})",
             f"checkpoint {Path(str(ck.get('path', '?'))).name}  sha256 {_short(ck.get('sha256'))}…",
             f"input     {_shape((manifest.get('input') or {}).get('shape'))} {(manifest.get('input') or {}).get('layout')}"
             f"  labels {len(manifest.get('labels') or [])}",
             f"built by  castling-deploy {(manifest.get('created_by') or {}).get('version')}", ""]
    for t in manifest.get("targets") or []:
        data = t.get("data") or {}
        val, calib = (v if isinstance(v, dict) else {} for v in (data.get("val"), data.get("calib")))
        rv = ", ".join(f"{k} {v}" for k, v in (t.get("runtime_versions") or {}).items())
        lines.append(f"[{t.get('target')}] status {t.get('status')}  runtimes: {rv or '-'}")
        lines.append(f"  val {val.get('count', '-')} images ({_short(val.get('digest'))})  "
                     f"calib {calib.get('count', '-')} ({_short(calib.get('digest'))})")
        for a in t.get("artifacts") or []:
            r = a.get("recorded") or {}
            acc = f"top-1 {_num(r.get('top1_acc'), '.2f')}%"
            lines.append(f"  {a['file']:<40} {str(a.get('precision', '?')):<6} {_mib(a.get('bytes'))} MiB  "
                         f"{acc}  (tol {_num(r.get('tolerance_points'), 'g')} pts, as recorded)")
        for s in t.get("error_budget") or []:
            m = s.get("metrics") or {}
            lines.append(f"    {str(s.get('stage', '?')):<8} cos {_num(m.get('cosine'), '.6f')}  "
                         f"max|Δ| {_num(m.get('max_abs_logit'), '.2e')}  "
                         f"{'ok' if s.get('passed') is True else 'FAILED'}")
        for name, lat in (t.get("latency") or {}).items():  # recorded by `castling-deploy profile`, per file
            lat = lat if isinstance(lat, dict) else {}
            lm = lat.get("latency_ms") if isinstance(lat.get("latency_ms"), dict) else {}
            lines.append(f"  latency {name}: p50 {_num(lm.get('p50'), 'g')} ms  p99 {_num(lm.get('p99'), 'g')} ms "
                         f"({lat.get('runtime', '?')}, {lat.get('threads') or 'default'} threads, batch {lat.get('batch')})")
    lines.append(f"\n{len(manifest.get('files') or {})} files with sha256 in the manifest")
    return "\n".join(lines)
