"""Keep converters' own chatter (C++ logs, progress bars, deprecation warnings) off the user's terminal.

The exporters and converters we drive (torch.onnx, onnxsim, coremltools, litert-torch, TFLite's MLIR) print
hundreds of lines at the file-descriptor level. During a build we point fds 1 and 2 at a temporary file and keep
our own log handler on the real stderr; if the build fails, the tail of what they printed is shown. ``-v``
(or CASTLING_VERBOSE=1) turns this off.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

TAIL_LINES = 25


def _real_fd_streams() -> bool:
    try:
        return sys.__stdout__.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False  # e.g. under click's CliRunner: nothing to silence at the fd level


@contextlib.contextmanager
def quiet_native_output(enabled: bool = True) -> Iterator[None]:
    """Silence converters (``enabled``) or at least keep their output off stdout, which --json owns."""
    with contextlib.redirect_stdout(sys.stderr):
        if not _real_fd_streams():
            yield
        elif not enabled or os.environ.get("CASTLING_VERBOSE"):
            with _native_stdout_to_stderr():
                yield
        else:
            with _captured():
                yield


@contextlib.contextmanager
def _native_stdout_to_stderr() -> Iterator[None]:
    sys.__stdout__.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def _captured() -> Iterator[None]:
    sys.__stdout__.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    real_err = os.fdopen(os.dup(saved_err), "w", buffering=1, encoding="utf-8", errors="replace")
    handlers = [h for h in logging.getLogger("castling_deploy").handlers if isinstance(h, logging.StreamHandler)]
    previous = [h.setStream(real_err) for h in handlers]
    captured = tempfile.TemporaryFile()
    from .output import real_stderr_fd

    real_stderr_fd[0] = real_err.fileno()
    os.dup2(captured.fileno(), 1)
    os.dup2(captured.fileno(), 2)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        sys.__stdout__.flush()
        sys.stderr.flush()
        real_stderr_fd[0] = 2
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        for h, stream in zip(handlers, previous):
            h.setStream(stream)
        if failed:
            captured.seek(0)
            tail = captured.read().decode("utf-8", "replace").splitlines()[-TAIL_LINES:]
            if tail:
                sys.stderr.write("--- last lines printed by the converter ---\n" + "\n".join(tail) + "\n")
        captured.close()
        real_err.close()
