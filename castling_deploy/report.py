"""``report.json``: the one module that builds, reads and updates it.

Every writer (the export pipeline, ``build-engine``, ``profile``, device runs) and every reader (the package
manifest, ``verify``) goes through :class:`Report`. Each artifact names, by stage id, the error-budget stage that
verified it, so nothing has to guess which row measured which file. ``schemas/report.schema.json`` describes the
file for tools that do not use our code (tested against real reports).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import UsageError
from .output import to_jsonable, write_json
from .budget import StageResult

SCHEMA = "castling-deploy/report/1"
SCHEMA_VERSION = 2  # 2: artifacts carry `verified_by` (a stage id), stages carry `id`
MAX_REPORT_BYTES = 64 * 2**20


@dataclass
class ArtifactRecord:
    file: str
    precision: str = "?"
    runtime: str = ""
    verified_by: str | None = None
    sha256: str | None = None
    bytes: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArtifactRecord:
        if not isinstance(d, dict) or not isinstance(d.get("file"), str):
            raise UsageError("report.json: an artifact entry has no file name; re-run the export")
        rel = PurePosixPath(d["file"].replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise UsageError(f"report.json: artifact path {d['file']!r} leaves its folder; only names inside the "
                             "export folder are allowed")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def stage_from_dict(d: dict[str, Any]) -> StageResult:
    return StageResult(str(d.get("stage", "?")), str(d.get("reference", "")), str(d.get("candidate", "")),
                       str(d.get("executor", "")), dict(d.get("metrics") or {}), dict(d.get("goals") or {}),
                       list(d.get("failures") or []), id=d.get("id"))


@dataclass
class Report:
    """One target folder's record: what was built from what, the error budget, and what happened since."""

    model_name: str
    target: str
    checkpoint: dict[str, Any]
    options: dict[str, Any]
    preprocess: dict[str, Any]
    labels: list[str] | None
    input: dict[str, Any]
    fold: dict[str, Any]
    data: dict[str, Any]
    goals: dict[str, Any]
    runtime_versions: dict[str, str]
    tool: dict[str, str]
    error_budget: list[StageResult] = field(default_factory=list)
    artifacts: list[ArtifactRecord] = field(default_factory=list)
    quantization: dict[str, Any] | None = None
    target_info: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] | None = None
    devices: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    @property
    def status(self) -> str:
        return "failed" if self.failures else "passed"

    # -- stages and artifacts ------------------------------------------------------------------------------
    def add_stage(self, stage: StageResult, *, counts: bool = True) -> str:
        """Append a budget row with a unique id; its failures fail the report unless ``counts`` is False."""
        taken = {s.id for s in self.error_budget}
        base = stage.id or stage.stage
        sid, n = base, 2
        while sid in taken:
            sid, n = f"{base}-{n}", n + 1
        stage.id = sid
        self.error_budget.append(stage)
        if counts:
            self.failures += [f"{stage.stage}: {f}" for f in stage.failures]
        return sid

    def stage(self, stage_id: str | None) -> StageResult | None:
        return next((s for s in self.error_budget if stage_id is not None and s.id == stage_id), None)

    def artifact(self, file: str) -> ArtifactRecord | None:
        return next((a for a in self.artifacts if a.file == file), None)

    def set_artifact(self, record: ArtifactRecord) -> None:
        self.artifacts = [a for a in self.artifacts if a.file != record.file] + [record]

    def note(self, text: str) -> None:
        self.target_info.setdefault("notes", []).append(text)

    # -- (de)serialization ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["status"] = self.status
        d["error_budget"] = [s.to_dict() for s in self.error_budget]
        d["artifacts"] = [{k: v for k, v in asdict(a).items() if v is not None or k == "verified_by"}
                          for a in self.artifacts]
        return to_jsonable(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "report.json") -> Report:
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise UsageError(f"{source}: not a castling-deploy report (schema {SCHEMA!r} expected)")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        try:
            kw["error_budget"] = [stage_from_dict(s) for s in d.get("error_budget") or []]
            kw["artifacts"] = [ArtifactRecord.from_dict(a) for a in d.get("artifacts") or []]
            for s in kw["error_budget"]:  # schema 1 reports have no ids: the stage name is the id
                s.id = s.id or s.stage
            kw["schema_version"] = int(d.get("schema_version", 1))
            kw["failures"] = [str(f) for f in d.get("failures") or []]
            if d.get("status") != "passed" and not kw["failures"]:  # never read a failed report as passed
                kw["failures"] = [f"report status is {d.get('status')!r}"]
            return cls(**kw)
        except (TypeError, ValueError, AttributeError) as exc:
            raise UsageError(f"{source}: malformed report ({exc}); re-run the export") from exc

    def save(self, path: Path) -> None:
        write_json(Path(path), self.to_dict())


def load_report(path: Path) -> Report:
    """Read and check a report.json (bounded in size, strict JSON)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path.parent}: no report.json; pass a folder written by `castling-deploy export`")
    if path.stat().st_size > MAX_REPORT_BYTES:
        raise UsageError(f"{path}: {path.stat().st_size} bytes is too large for a report; re-run the export")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UsageError(f"{path}: unreadable report ({type(exc).__name__}); re-run the export") from exc
    return Report.from_dict(data, str(path))


def _report_beside(artifact: Path) -> tuple[Path, Report] | None:
    """The report.json of the export folder ``artifact`` sits in, when it lists that file; else None."""
    report_path = Path(artifact).parent / "report.json"
    if not report_path.is_file():
        return None
    try:
        report = load_report(report_path)
    except UsageError:
        return None
    return (report_path, report) if report.artifact(Path(artifact).name) is not None else None


def record_latency(artifact: Path, result: dict[str, Any]) -> Path | None:
    """When ``artifact`` sits in an export folder, keep its latency summary in that report.json."""
    found = _report_beside(artifact)
    if found is None:
        return None
    report_path, report = found
    lat = report.latency or {}
    lat[Path(artifact).name] = {k: result.get(k) for k in ("runtime", "threads", "batch", "runs", "warmup",
                                                           "latency_ms", "load_ms", "host")}
    report.latency = lat
    report.save(report_path)
    return report_path


def record_device_run(artifact: Path, entry: dict[str, Any]) -> Path | None:
    """Append one device run (what ran where: uri, fingerprint, numbers) to the report beside ``artifact``."""
    found = _report_beside(artifact)
    if found is None:
        return None
    report_path, report = found
    report.devices.append(entry)
    report.save(report_path)
    return report_path
