"""The contract between the pipeline and the targets: options in, a session to work from, an outcome back.

Both ``pipeline`` (above) and every ``targets/<name>/target.py`` (beside it) import this module; it imports only
lower layers (data, models, fold, verify, runtime), so no import runs upward and there is no circle.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data import ImageSet
from ..errors import UsageError
from ..fold import FoldReport
from ..models.checkpoint import Checkpoint
from ..models.vit import CastlingViT
from ..output import to_jsonable
from ..runtime.base import Runner, run_batched
from ..budget import DEFAULT_TOLERANCE_POINTS, FLOAT_ATOL, StageResult, check_stage


@dataclass
class ExportOptions:
    """What the user asked for. Options that only some targets understand live in ``target_options``
    (declared by each target's ``TargetSpec.options``; the API fills in every declared default), so this class
    does not grow with every target."""

    targets: list[str]
    int8: bool = False
    fp16: bool = False
    calib: Path | None = None
    val: Path | None = None
    tolerance: float = DEFAULT_TOLERANCE_POINTS
    imgsz: int | None = None
    opset: int = 18
    out: Path = Path("exports")
    force: bool = False
    arch: str | None = None
    calib_size: int = 512
    calib_method: str = "percentile"
    auto_fallback: bool = False
    sensitivity: bool = False
    val_limit: int | None = None
    seed: int = 0
    verbose: bool = False
    # INT8 only: fold the channel-scale migration (quantize/migrate.py) into the float model when a LayerNorm's
    # output channel spread on the calibration set is large; False = --no-migrate.
    migrate: bool = True
    # The fold gate's logit-fidelity goal (fold.MIN_FOLD_SAMPLE_COSINE) waived: --accept-accuracy-only, recorded.
    accept_accuracy_only: bool = False
    target_options: dict[str, Any] = field(default_factory=dict)

    def option(self, name: str) -> Any:
        """A target-specific option's value (``targets.registry`` declares each one and its default)."""
        try:
            return self.target_options[name]
        except KeyError:
            raise KeyError(f"target option {name!r} was not set; build ExportOptions through castling_deploy.api"
                           ".export or pass target_options=all_option_defaults() | {...}") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("target_options")
        return to_jsonable({**d, **extra})


@dataclass
class ExportSession:
    """Everything the targets of one run share: the checkpoint, the folded model, the reference logits on the
    val set (computed once), the calibration set, and artifacts several targets reuse (``shared``)."""

    ckpt: Checkpoint
    opts: ExportOptions
    folded: CastlingViT
    fold_report: FoldReport
    val: ImageSet
    ref_logits: np.ndarray
    calib: ImageSet | None
    metadata: dict[str, str]
    shared: dict[str, Any] = field(default_factory=dict)
    # Seeded reference inputs (castling_deploy/reference.py), the folded model's logits on them, and each
    # verified runner's logits on them, keyed by ``reference_key(stage)`` (written per target as reference.npz).
    reference_inputs: np.ndarray | None = None
    reference_logits: np.ndarray | None = None
    reference_runs: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.ckpt.name

    @property
    def img_size(self) -> int:
        return self.folded.cfg.img_size

    def verify(self, stage: str, candidate: str, runner: Runner, *, precision: str,
               reference: str = "folded torch fp32", tolerance: float | None = None,
               shipped: bool = True) -> StageResult:
        """Run ``runner`` on the val set and check it against the folded float model; a shipped file's runner also
        runs the reference inputs (reference.npz). ``shipped=False``: an intermediate that is not packaged."""
        t0 = time.perf_counter()
        logits = run_batched(runner, self.val.images)
        result = check_stage(stage, reference, candidate, runner.name, self.ref_logits, logits, self.val.labels,
                             tolerance_points=self.opts.tolerance if tolerance is None else tolerance,
                             atol=FLOAT_ATOL.get(precision))
        result.metrics["seconds"] = round(time.perf_counter() - t0, 3)
        if shipped and self.reference_inputs is not None:
            self.reference_runs[reference_key(result)] = run_batched(runner, self.reference_inputs)
        return result

    def require_calib(self) -> ImageSet:
        if self.calib is None:
            raise UsageError("INT8 needs calibration images: pass --calib DIR (a folder of images or an .npz)")
        return self.calib


def reference_key(stage: StageResult) -> str:
    """Which verify call a stage came from (a stage shared by two targets keeps its key)."""
    return f"{stage.stage}|{stage.candidate}"


@dataclass
class BuiltArtifact:
    """One file (or .mlpackage folder) a target wrote, relative to its folder, and the budget stage that
    verified it (``verified_by`` = that stage's id; None for scripts and other files that are not models)."""

    file: str
    precision: str
    runtime: str
    verified_by: str | None = None


@dataclass
class TargetOutcome:
    """What a target's ``build`` hands back: artifacts, budget stages, target-specific info, quantization."""

    artifacts: list[BuiltArtifact] = field(default_factory=list)
    stages: list[StageResult] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None

    def add(self, file: str, precision: str, runtime: str, stage: StageResult | None = None) -> None:
        """Record an artifact; pass the stage that measured it so the report links the two."""
        self.artifacts.append(BuiltArtifact(file, precision, runtime, stage.stage if stage is not None else None))

    def note(self, text: str) -> None:
        self.info.setdefault("notes", []).append(text)
