"""Atomic output folders and report files.

Every stage writes into a hidden staging folder beside its destination and renames it into place only when
complete, so an interrupted run (Ctrl-C, SIGTERM, a crash) leaves no half-written artifact behind. Staging
folders orphaned by SIGKILL are removed by the next run.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UsageError

STAGING_PREFIX = ".partial-"


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` (and parents) or raise a one-line UsageError (exit 2)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-", delete=True)
        probe.close()
    except (PermissionError, NotADirectoryError, FileExistsError, OSError) as exc:
        raise UsageError(f"{path}: output folder is not writable ({exc.strerror or exc}); pass -o with a writable folder") from None
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphaned_staging(parent: Path) -> None:
    if not parent.is_dir():
        return
    for p in parent.glob(f"{STAGING_PREFIX}*"):
        try:
            pid = int(p.name.split("-")[1])  # .partial-<pid>-<name>-<random>
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


# Paths to remove if the process is interrupted: staging folders and run-scoped temporary folders.
_CLEANUP: set[Path] = set()
# Where the interrupt message goes while fd 2 is redirected (quiet.py sets it during a build).
real_stderr_fd: list[int] = [2]


def register_cleanup(path: Path) -> None:
    _CLEANUP.add(Path(path))


def unregister_cleanup(path: Path) -> None:
    _CLEANUP.discard(Path(path))


def _on_interrupt(signum: int, frame: Any) -> None:
    """Remove what is half-written and leave at once. Unwinding a KeyboardInterrupt through a running converter
    (torch.onnx, coremltools, TFLite's MLIR) has crashed the interpreter (SIGSEGV) before its cleanup ran."""
    for p in list(_CLEANUP):
        shutil.rmtree(p, ignore_errors=True)
    try:
        os.write(real_stderr_fd[0], b"\ninterrupted: nothing half-written was left behind\n")
    except OSError:
        pass
    os._exit(130)


@contextlib.contextmanager
def interrupts_clean_up() -> Iterator[None]:
    """While a build runs, Ctrl-C and `kill` (SIGINT/SIGTERM) remove the registered paths and exit 130."""
    signals = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = [signal.signal(s, _on_interrupt) for s in signals]
    except ValueError:  # not the main thread: exceptions still clean up through staged_dir
        yield
        return
    try:
        yield
    finally:
        for s, prev in zip(signals, previous):
            signal.signal(s, prev)


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a staging folder; on normal exit it replaces ``final`` atomically, on any exception it is removed."""
    final = Path(final)
    parent = ensure_writable_dir(final.parent)
    remove_orphaned_staging(parent)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f"{STAGING_PREFIX}{os.getpid()}-{final.name}-"))
    register_cleanup(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        unregister_cleanup(staging)
    _normalize_modes(staging)
    old = None
    if final.exists():
        old = parent / f"{STAGING_PREFIX}{os.getpid()}-old-{final.name}"
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _normalize_modes(root: Path) -> None:
    """Staging uses private temp files (0600/0700); the result gets ordinary modes under the user's umask."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        if p.is_dir():
            p.chmod(0o777 & ~umask)
        else:
            executable = p.stat().st_mode & 0o100
            p.chmod((0o777 if executable else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``: renamed onto it (ordinary file mode) when the block succeeds, removed
    when it fails, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _finite(o: Any) -> Any:
    """Strict JSON has no Infinity/NaN (JavaScript, Swift and Go parsers reject them): they become null."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def to_jsonable(data: Any) -> Any:
    """Plain, strict-JSON data: numpy scalars/arrays and paths converted, non-finite floats as null."""
    return _finite(json.loads(json.dumps(data, default=_json_default)))
