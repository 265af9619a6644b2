"""Atomic output folders and report files.

Every stage writes into a hidden staging folder beside its destination and renames it into place only when
complete, so an interrupted run (Ctrl-C, SIGTERM, a crash) leaves no half-written artifact behind. Run-scoped
temporary folders (``run_temp_dir``) are named ``castling-<what>-<pid>-XXXXXXXX`` and registered for the same
interrupt cleanup. Nothing can clean up at SIGKILL, so staging folders and temp folders a killed run left behind
(its pid no longer alive) are removed by the next run.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable, Iterator
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
    except (PermissionError, OverflowError, ValueError):  # another user's process, or no pid we can judge: keep
        return True
    return True


# Names of the staging and temp folders this process made. A folder named with our own pid that is not among them
# was left by a dead process that had the same pid (pids repeat, e.g. pid 1 in every fresh container).
_MINE: set[str] = set()


def _is_stale(name: str, pid: int) -> bool:
    if pid == os.getpid():
        return name not in _MINE
    return not _pid_alive(pid)


def _remove_if_own_dir(path: Path) -> bool:
    """rmtree ``path`` only if it is a real folder (never a symlink) owned by this user."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    getuid = getattr(os, "getuid", None)
    if not stat.S_ISDIR(st.st_mode) or (getuid is not None and st.st_uid != getuid()):
        return False
    shutil.rmtree(path, ignore_errors=True)  # rmtree itself refuses a folder swapped for a symlink meanwhile
    return True


def remove_orphaned_staging(parent: Path) -> None:
    """Remove the staging folders (``.partial-<pid>-<name>-XXXX``) and results moved aside
    (``.partial-<pid>-old-<name>``) in ``parent`` whose run is gone (killed while building or swapping)."""
    if not parent.is_dir():
        return
    for p in parent.glob(f"{STAGING_PREFIX}*"):
        try:
            pid = int(p.name.split("-")[1])  # .partial-<pid>-<name>-<random> or .partial-<pid>-old-<name>
        except (IndexError, ValueError):
            continue
        if _is_stale(p.name, pid):
            _remove_if_own_dir(p)


TEMP_PREFIX = "castling-"
_WHAT = re.compile(r"[a-z][a-z0-9]*(?:-[a-z][a-z0-9]*)*")
# castling-<what>-<pid>-<8 mkdtemp characters>; every part of <what> starts with a letter, so <pid> is unambiguous.
_TEMP_NAME = re.compile(rf"{re.escape(TEMP_PREFIX)}{_WHAT.pattern}-(\d+)-[a-z0-9_]{{8}}")


def remove_stale_temp_dirs(root: Path | None = None) -> list[Path]:
    """Remove the run temp folders (``castling-<what>-<pid>-XXXXXXXX`` in ``root``, default the temp dir) of runs that
    are gone, e.g. killed with SIGKILL. Only real folders with exactly that name and owned by this user are touched;
    a live run's folders stay. Called at the start of every export, verify and profile. Returns what was removed."""
    root = Path(root if root is not None else tempfile.gettempdir())
    try:
        names = [e.name for e in os.scandir(root)]
    except OSError:
        return []
    removed = []
    for name in names:
        m = _TEMP_NAME.fullmatch(name)
        if m is not None and _is_stale(name, int(m.group(1))) and _remove_if_own_dir(root / name):
            removed.append(root / name)
    return removed


def new_run_temp_dir(what: str) -> Path:
    """A private temp folder ``castling-<what>-<pid>-XXXXXXXX``, registered for interrupt cleanup. Remove it with
    ``remove_temp_dir`` (or use ``run_temp_dir``); if the process is killed, the next run removes it."""
    if not _WHAT.fullmatch(what):
        raise ValueError(f"temp folder kind {what!r}: lowercase words joined by '-', each starting with a letter")
    path = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{what}-{os.getpid()}-"))
    _MINE.add(path.name)
    register_cleanup(path)
    return path


def remove_temp_dir(path: Path) -> None:
    """Remove a folder registered for interrupt cleanup, then forget it (a signal in between removes it too)."""
    shutil.rmtree(path, ignore_errors=True)
    unregister_cleanup(path)


@contextlib.contextmanager
def run_temp_dir(what: str) -> Iterator[Path]:
    """A run-scoped temp folder (see ``new_run_temp_dir``), removed when the block ends, fails or is interrupted."""
    path = new_run_temp_dir(what)
    try:
        yield path
    finally:
        remove_temp_dir(path)


@contextlib.contextmanager
def command_temp_root() -> Iterator[Path | None]:
    """For one CLI command: sweep the leftovers of dead runs, then point ``tempfile`` and ``$TMPDIR`` (which the
    converters and runtimes we call read: coremltools, ONNX Runtime's quantizer, torch.export, subprocesses) at a
    folder ``castling-run-<pid>-XXXXXXXX``, so their temp files go with it on exit, on SIGINT/SIGTERM, and after a
    SIGKILL at the next run's sweep. If no such folder can be made, the command runs with the temp dir as it was."""
    remove_stale_temp_dirs()
    try:
        root = new_run_temp_dir("run")
    except OSError:
        yield None
        return
    saved_dir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = os.environ["TMPDIR"] = str(root)
    try:
        yield root
    finally:
        tempfile.tempdir = saved_dir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        remove_temp_dir(root)


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
def _sigint_sigterm_handled_by(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """``handler`` for SIGINT/SIGTERM inside the block, the previous handlers restored after it. Off the main thread
    nothing is installed (signals are handled in the main thread anyway)."""
    signals = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = [signal.signal(s, handler) for s in signals]
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for s, prev in zip(signals, previous):
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)


def interrupts_clean_up() -> contextlib.AbstractContextManager[None]:
    """While a build runs, Ctrl-C and `kill` (SIGINT/SIGTERM) remove the registered paths and exit 130 (off the main
    thread, exceptions still clean up through staged_dir)."""
    return _sigint_sigterm_handled_by(_on_interrupt)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM arriving inside the block take effect (with the handler that was installed) when it ends, so
    a result is never caught half-swapped: its previous version moved aside, the new one not yet in place."""
    pending: list[int] = []
    try:
        with _sigint_sigterm_handled_by(lambda signum, frame: pending.append(signum)):
            yield
    finally:
        if pending:
            signal.raise_signal(pending[0])


def _swap_into_place(staging: Path, final: Path) -> None:
    """Rename ``staging`` onto ``final``. A previous ``final`` goes aside as ``.partial-<pid>-old-<name>`` and is
    removed once the new one is in place (by us, by the interrupt handler, or — after SIGKILL — by the next run); if
    the rename fails it is put back."""
    if not final.exists():
        os.replace(staging, final)
        return
    old = final.parent / f"{STAGING_PREFIX}{os.getpid()}-old-{final.name}"
    _MINE.add(old.name)
    swapped = False
    try:
        with _signals_deferred():
            os.replace(final, old)
            register_cleanup(old)
            try:
                os.replace(staging, final)
            except BaseException:
                unregister_cleanup(old)
                os.replace(old, final)
                raise
            swapped = True
    finally:
        if swapped:
            remove_temp_dir(old)


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a staging folder; on normal exit it replaces ``final`` atomically, on any exception it is removed."""
    final = Path(final)
    parent = ensure_writable_dir(final.parent)
    remove_orphaned_staging(parent)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f"{STAGING_PREFIX}{os.getpid()}-{final.name}-"))
    _MINE.add(staging.name)
    register_cleanup(staging)
    try:
        yield staging
        _normalize_modes(staging)
        _swap_into_place(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        unregister_cleanup(staging)


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
