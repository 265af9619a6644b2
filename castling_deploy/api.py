"""The Python API for people who script deployments; the CLI is a thin layer over it.

    import castling_deploy as cd
    result = cd.export("model.pt", targets=["tensorrt", "tflite"], int8=True, calib="calib/", val="val/")
    assert result.passed, result.failures
    print(result["tensorrt"].folder, result["tensorrt"].report.error_budget)
    cd.profile("exports/model/onnx/model.int8.onnx", threads=1)
    cd.package("exports/model", "model.zip")
    cd.verify("model.zip", val="val/")

Every function raises ``castling_deploy.errors.CastlingError`` subclasses (``UsageError`` for bad input,
``MissingDependencyError`` for an absent optional runtime); ``export`` returns failed goals in the result
(``result.passed``, ``result.error()``) because the reports are written either way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .errors import ToleranceError, UsageError
from .report import Report
from .budget import DEFAULT_TOLERANCE_POINTS

PathLike = str | Path


@dataclass
class TargetResult:
    target: str
    folder: Path
    report: Report

    @property
    def passed(self) -> bool:
        return self.report.status == "passed"


@dataclass
class ExportResult:
    """One ``TargetResult`` per requested target, in order; index it by target name."""

    targets: list[TargetResult]

    def __getitem__(self, target: str) -> TargetResult:
        for t in self.targets:
            if t.target == target:
                return t
        raise KeyError(f"{target!r} was not exported (have: {', '.join(t.target for t in self.targets)})")

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.targets)

    @property
    def failures(self) -> list[str]:
        return [f"{t.target}: {f}" for t in self.targets for f in t.report.failures]

    def error(self) -> ToleranceError | None:
        """The exit-3 error describing the failed goals, or None when every target passed."""
        from .pipeline import failure_error

        return failure_error([(t.folder, t.report) for t in self.targets])

    def to_dict(self) -> dict[str, Any]:
        return {"status": "passed" if self.passed else "failed",
                "reports": [{**t.report.to_dict(), "folder": str(t.folder)} for t in self.targets]}


def check_tolerance(points: float) -> None:
    if not (math.isfinite(points) and 0 <= points <= 100):
        raise UsageError(f"--tolerance {points}: must be a number of top-1 points between 0 and 100")


def _check_export_options(o: Any) -> None:
    """Reject combinations that cannot mean anything, with the fix in the message (exit 2)."""
    from .targets.registry import check_target_options

    check_target_options(o.targets, o.target_options, o.int8)
    bits = o.target_options.get("weight_bits")
    if bits is not None:
        if str(bits) not in ("7", "8"):
            raise UsageError(f"--weight-bits {bits}: choose 8 (int8 dot-product CPUs) or 7 (x86 AVX2 without VNNI)")
        o.target_options["weight_bits"] = int(bits)
    check_tolerance(o.tolerance)
    if o.val_limit is not None and o.val_limit < 1:
        raise UsageError(f"--limit {o.val_limit}: must be >= 1")
    if not (o.opset == 17 or 18 <= o.opset <= 21):
        raise UsageError(f"--opset {o.opset} is not supported; use 17 (legacy exporter) or 18-21 (dynamo exporter)")
    if o.calib_size < 1:
        raise UsageError(f"--calib-size {o.calib_size}: must be >= 1")
    if (o.auto_fallback or o.sensitivity) and not o.int8:
        raise UsageError("--auto-fallback / --sensitivity need --int8")
    if not o.migrate and not o.int8:
        raise UsageError("--no-migrate needs --int8 (the channel-scale migration only runs for INT8 exports)")
    if o.accept_accuracy_only and o.force:
        raise UsageError("--accept-accuracy-only and --force both override the fold gate; pass one (--force also "
                         "folds when accuracy drops)")


def export(ckpt: PathLike, *, targets: Iterable[str] = ("onnx",), int8: bool = False, fp16: bool = False,
           calib: PathLike | None = None, val: PathLike | None = None,
           tolerance: float = DEFAULT_TOLERANCE_POINTS, out: PathLike = "exports", **options: Any) -> ExportResult:
    """Fold ``ckpt``, export it for each target ("all" = every registered target), verify every artifact
    against the folded float model, and write ``out/<model>/<target>/`` with ``report.json``.

    Other keyword options: ``arch, imgsz, opset, force, calib_size, calib_method, auto_fallback, sensitivity,
    limit (val images), seed, verbose, migrate (default True; False = --no-migrate), accept_accuracy_only`` and each target's own options (``full_integer``, ``io_dtype`` for
    tflite; ``weights_only`` for coreml; ``weight_bits`` (7 or 8) for onnx — see ``castling_deploy.targets.registry.TARGETS``)."""
    from .pipeline import run_export
    from .targets.base import ExportOptions
    from .targets.registry import TARGETS, all_option_defaults

    chosen = list(TARGETS) if "all" in targets else list(dict.fromkeys(targets))
    target_opts = all_option_defaults() | {k: options.pop(k) for k in list(options) if k in all_option_defaults()}
    if "limit" in options:
        options["val_limit"] = options.pop("limit")
    try:
        opts = ExportOptions(targets=chosen, int8=int8, fp16=fp16, calib=Path(calib) if calib else None,
                             val=Path(val) if val else None, tolerance=tolerance, out=Path(out),
                             target_options=target_opts, **options)
    except TypeError as exc:
        raise UsageError(f"export: {exc}") from None
    _check_export_options(opts)
    return ExportResult([TargetResult(r.target, f, r) for f, r in run_export(Path(ckpt), opts)])


def profile(artifact: PathLike, *, runs: int = 100, warmup: int = 10, threads: int | None = None, batch: int = 1,
            per_op: bool = True, chart: PathLike | None = None, record: bool = True,
            progress: bool = False) -> dict[str, Any]:
    """Latency of an exported artifact on its runtime here (load time, p50/p90/p99, throughput, memory, per-op).
    With ``record``, the summary is kept in the report.json beside the artifact (when there is one)."""
    from .output import remove_stale_temp_dirs
    from .profiling import profile_artifact
    from .report import record_latency

    remove_stale_temp_dirs()
    if runs < 1 or warmup < 0 or batch < 1 or (threads is not None and threads < 1):
        raise UsageError("--runs and --batch must be >= 1, --warmup >= 0, --threads >= 1")
    artifact = Path(artifact)
    result = profile_artifact(artifact, runs=runs, warmup=warmup, threads=threads, batch=batch,
                              chart_path=Path(chart) if chart else None, per_op=per_op, progress=progress)
    if record and "interpreter" not in str(result.get("runtime", "")):
        record_latency(artifact, result)
    return result


def package(export_dir: PathLike, out_file: PathLike, *, allow_failed: bool = False,
            sign: PathLike | None = None) -> Path:
    """Pack an export folder into one archive with manifest.json and a README for the app developer.
    ``sign``: a PEM private key (``castling-deploy keygen``); ``signature.json`` then covers every file."""
    from .packaging import create_package

    return create_package(Path(export_dir), Path(out_file), allow_failed=allow_failed,
                          sign_key=Path(sign) if sign is not None else None)


def verify(file: PathLike, *, val: PathLike | None = None, limit: int | None = None,
           tolerance: float = DEFAULT_TOLERANCE_POINTS, trust: PathLike | None = None,
           min_top1: float | None = None, devices: Iterable[str] = (), python: str | None = None,
           ssh_config: PathLike | None = None) -> dict[str, Any]:
    """Check a package: with ``trust`` (a PEM public key) its signature must be valid; every sha256; and, with
    ``val`` (labelled images), each model file's accuracy re-measured against *your* goals: within ``tolerance``
    points of the best fp32 artifact measured, above ``min_top1`` when given, and — only when signed by the
    trusted key — within ``tolerance`` of the accuracy recorded at export. The package's own tolerance is never
    used. Every model file is also re-run on the package's reference inputs (seeded inputs stored at export with
    each file's own logits), so a package is checked without a dataset too. With ``devices`` (URIs), the model
    files run on each device instead (their fingerprints are in the result). Raises ``ToleranceError`` (its ``.result`` holds the details) when the package fails."""
    from .data import load_image_set
    from .errors import DataError
    from .output import interrupts_clean_up, remove_stale_temp_dirs
    from .packaging import inspect_package, verify_package

    remove_stale_temp_dirs()  # e.g. the extraction folder of a verify killed with SIGKILL
    check_tolerance(tolerance)
    images = labels = None
    if val is not None:
        manifest = inspect_package(Path(file))
        data = load_image_set(Path(val), manifest.get("preprocess") or {}, manifest.get("labels"), limit=limit)
        if data.labels is None:
            raise DataError(f"{val}: accuracy needs labeled images (class_name/xxx.png subfolders)")
        images, labels = data.images, data.labels
    kw = dict(val_images=images, val_labels=labels, tolerance=tolerance,
              trust=Path(trust) if trust is not None else None, min_top1=min_top1)
    if not devices:
        with interrupts_clean_up():  # SIGINT/SIGTERM remove the extraction folder and exit 130
            return verify_package(Path(file), **kw)
    return _verify_on_devices(Path(file), list(devices), python, Path(ssh_config) if ssh_config else None, kw)


def _verify_on_devices(file: Path, uris: list[str], python: str | None, ssh_config: Path | None,
                       kw: dict[str, Any]) -> dict[str, Any]:
    """The package checked here (signature, hashes), its model files run on each device on the val images and
    held to the same goals; one entry per device with its fingerprint. Any device missing a goal fails."""
    from .devices import close_all, logits_on_device, map_devices, parse_device
    from .packaging import verify_package

    devs = [parse_device(u, python=python, ssh_config=ssh_config) for u in uris]

    def on(dev: Any) -> dict[str, Any]:
        def run(path: Path, x: Any) -> tuple[Any, str]:
            return logits_on_device(dev, path, x), f"{dev.uri} ({path.suffix[1:]} runtime on the device)"

        try:
            res = verify_package(file, logits_fn=run, **kw)
        except ToleranceError as exc:
            res = getattr(exc, "result", None) or {"status": "failed", "failures": [str(exc)]}
        return {**res, "device": dev.uri, "fingerprint": dev.fingerprint()}

    try:
        results = map_devices(devs, on, what=f"verify {file.name}")
    finally:
        close_all(devs)
    out = {"package": str(file), "devices": [r.result if r.ok else {"device": r.uri, "status": "error",
                                                                      "error": r.error, "exit_code": r.exit_code}
                                             for r in results]}
    failed = [d for d in out["devices"] if d.get("status") != "passed"]
    out["status"] = "failed" if failed else "passed"
    if failed:
        err = ToleranceError(f"{file}: " + "; ".join(f"{d['device']}: " + (d.get("error") or ", ".join(
            d.get("failures") or ["failed"])) for d in failed))
        err.result = out  # type: ignore[attr-defined]
        raise err
    return out


def profile_on_devices(artifact: PathLike, devices: Iterable[str], *, python: str | None = None,
                       ssh_config: PathLike | None = None, benchmark_model: PathLike | None = None, runs: int = 100,
                       warmup: int = 10, threads: int | None = None, batch: int = 1,
                       shape: tuple[int, ...] | None = None, record: bool = True) -> list[Any]:
    """Profile ``artifact`` on each device URI concurrently (``ssh://[user@]host[:port]``, ``adb:SERIAL``,
    ``local``); one ``castling_deploy.devices.DeviceResult`` per device, failures included (never raised, so
    one unreachable board does not hide the others). With ``record``, each success (numbers + fingerprint) is
    appended to the ``devices`` list of the report.json beside the artifact."""
    from .devices import close_all, parse_device, profile_fleet
    from .output import remove_stale_temp_dirs
    from .report import record_device_run

    remove_stale_temp_dirs()
    if runs < 1 or warmup < 0 or batch < 1 or (threads is not None and threads < 1):
        raise UsageError("--runs and --batch must be >= 1, --warmup >= 0, --threads >= 1")
    artifact = Path(artifact)
    if not artifact.exists():
        raise UsageError(f"{artifact}: no such artifact; pass the path of an exported model file")
    devs = [parse_device(u, python=python, ssh_config=Path(ssh_config) if ssh_config else None,
                         benchmark_model=Path(benchmark_model) if benchmark_model else None) for u in devices]
    try:
        results = profile_fleet(devs, artifact, runs=runs, warmup=warmup, threads=threads, batch=batch, shape=shape)
    finally:
        close_all(devs)
    if record:
        for r in results:
            if r.ok:
                record_device_run(artifact, {"kind": "profile", "uri": r.uri, "fingerprint": r.result.get(
                    "fingerprint"), **{k: r.result.get(k) for k in ("runtime", "threads", "batch", "runs", "warmup",
                                                                   "latency_ms", "load_ms", "memory")}})
    return results
