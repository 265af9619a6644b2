"""Run one local process (ssh, adb, sh) with a hard timeout and a cap on what it may print.

Why not subprocess.run(capture_output=True): a device that streams gigabytes (a wrong path passed to ``cat``,
a runtime that loops printing) would fill our memory; here stdout beyond ``limit`` kills the process.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import IO

MAX_OUTPUT = 64 * 2**20  # largest stdout we accept from a device call
STDERR_KEEP = 256 * 1024  # stderr tail kept for error messages


@dataclass
class Completed:
    rc: int
    stdout: bytes
    stderr: bytes

    @property
    def err_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")


class OutputTooLarge(Exception):
    """The process printed more than the limit on stdout; it was killed."""


def _read_limited(stream: IO[bytes], out: list[bytes], limit: int, overflow: threading.Event,
                  proc: subprocess.Popen, keep_tail: bool) -> None:
    size = 0
    while True:
        chunk = stream.read(65536)
        if not chunk:
            return
        size += len(chunk)
        out.append(chunk)
        if keep_tail:
            while size > limit and len(out) > 1:
                size -= len(out.pop(0))
        elif size > limit:
            overflow.set()
            _kill(proc)
            out.clear()
            return


def _write_all(stream: IO[bytes], data: bytes) -> None:
    try:
        stream.write(data)
    except (BrokenPipeError, OSError):
        pass  # the process exited early; its exit status and stderr tell why
    finally:
        try:
            stream.close()
        except OSError:
            pass


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        try:
            proc.kill()
        except OSError:
            pass


def run_bounded(argv: list[str], *, stdin: bytes | IO[bytes] | None = None, timeout: float,
                limit: int = MAX_OUTPUT, env: dict[str, str] | None = None) -> Completed:
    """Run ``argv``; feed ``stdin`` (bytes or an open binary file); raise subprocess.TimeoutExpired after
    ``timeout`` s and OutputTooLarge past ``limit`` bytes of stdout (the process and its group are killed)."""
    feed = stdin if isinstance(stdin, (bytes, bytearray)) else None
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if feed is not None else (stdin if stdin is not None else subprocess.DEVNULL),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True,
    )
    out: list[bytes] = []
    err: list[bytes] = []
    overflow = threading.Event()
    threads = [
        threading.Thread(target=_read_limited, args=(proc.stdout, out, limit, overflow, proc, False), daemon=True),
        threading.Thread(target=_read_limited, args=(proc.stderr, err, STDERR_KEEP, overflow, proc, True),
                         daemon=True),
    ]
    if feed is not None:
        threads.append(threading.Thread(target=_write_all, args=(proc.stdin, bytes(feed)), daemon=True))
    for t in threads:
        t.start()
    killed = False
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        killed = True
        _kill(proc)
        proc.wait()
        raise
    finally:
        # An ssh mux client hands its pipes to the control master, which keeps them open until the remote
        # command ends: after a kill, do not wait for EOF from a command we have given up on.
        deadline = time.monotonic() + (1.0 if killed or overflow.is_set() else 10.0)
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
    if overflow.is_set():
        raise OutputTooLarge(f"more than {limit // 2**20} MiB of output")
    return Completed(rc=rc, stdout=b"".join(out), stderr=b"".join(err))
