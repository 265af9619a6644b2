"""Our error hierarchy. The CLI maps each class to an exit code (docs/architecture.md) and prints one line."""
from __future__ import annotations


class CastlingError(Exception):
    """Base class: anything else that went wrong (exit 1)."""

    exit_code = 1


class UsageError(CastlingError):
    """Bad input from the user: a missing file, a corrupt checkpoint, an unknown name (exit 2)."""

    exit_code = 2


class CheckpointError(UsageError):
    """A checkpoint that cannot be loaded as asked: unsafe, corrupt, wrong architecture, mismatched keys."""


class DataError(UsageError):
    """An image set that is empty, unreadable or too small."""


class MetadataError(UsageError):
    """Untrusted metadata (a checkpoint's or a package manifest's config, preprocess, labels, free-form records)
    that is malformed or outside the bounds in ``castling_deploy.limits``; the message names the field."""


class DiskFullError(CastlingError):
    """No space left on a device while writing an artifact, a temporary file or a cache entry (exit 1)."""


class ToleranceError(CastlingError):
    """A verification goal failed; the report was still written, marked failed (exit 3)."""

    exit_code = 3

    def __init__(self, message: str, report_path: str | None = None) -> None:
        super().__init__(message)
        self.report_path = report_path


class MissingDependencyError(CastlingError):
    """An optional runtime or dependency is absent; the message names the extra to install (exit 4)."""

    exit_code = 4

    def __init__(self, package: str, extra: str, purpose: str = "") -> None:
        what = f" for {purpose}" if purpose else ""
        super().__init__(
            f"{package} is not installed{what}; install it with: pip install 'castling-deploy[{extra}]'"
        )
        self.package = package
        self.extra = extra
