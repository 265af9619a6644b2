"""The Device interface and the one code path behind ``local``, ``ssh://`` and ``adb:``: POSIX shell commands
built with shlex.quote, scripts piped to the device python, artifacts pushed content-addressed (sha256).

A transport only says how to run one shell command string on the device (``_argv``) and how it fails
(``_transport_error``); adb also overrides file upload/download. Everything else is shared, so the loopback
and ``local`` tests exercise the code real devices run.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import shlex
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from .errors import DeviceError, DeviceNoSpace, DeviceTimeout, DeviceUsageError
from .proc import MAX_OUTPUT, Completed, OutputTooLarge, run_bounded

log = logging.getLogger("castling_deploy.devices")
_SHA = re.compile(r"\b[0-9a-f]{64}\b")
NO_SPACE = "No space left on device"
# The first sha256 tool the device has (coreutils/busybox/toybox, macOS, openssl); prints 64 hex chars.
HASH_FN = ('h() { if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1"; '
           'elif command -v shasum >/dev/null 2>&1; then shasum -a 256 "$1"; '
           'else openssl dgst -sha256 -r "$1"; fi 2>/dev/null | cut -c1-64; }')


@runtime_checkable
class Device(Protocol):
    uri: str
    python: str

    def fingerprint(self) -> dict[str, Any]: ...
    def push(self, path: Path) -> str: ...
    def run_script(self, script: str, args: list[str], timeout: float) -> str: ...
    def fetch(self, remote: str, local: Path) -> Path: ...
    def close(self) -> None: ...


def q(path: str) -> str:
    """Quote a device path for the shell, keeping a leading ``~/`` expandable (``"$HOME"/rest``)."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def sha256_of(path: Path) -> str:
    """sha256 of a file, or of a folder (.mlpackage) as the hash of its sorted (relative path, file hash) list."""
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path).as_posix()}\0{sha256_of(f)}\n".encode())
        return h.hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _last_sha(out: bytes) -> str:
    """The last sha256 in a command's output (a shell rc file may print before it); "" if none."""
    found = _SHA.findall(out.decode("utf-8", "replace"))
    return found[-1] if found else ""


def transfer_timeout(nbytes: int) -> float:
    return 120.0 + nbytes / 1e6  # a 1 MB/s floor: slow Wi-Fi to a Jetson still finishes


class ShellDevice:
    """Shared implementation; subclasses set ``uri``, ``python``, ``kind`` and implement ``_argv``."""

    uri: str
    python: str
    kind: str
    default_cache = "~/.cache/castling-deploy/artifacts"

    def __init__(self, *, cache_dir: str | None = None, tmp_dir: str | None = None) -> None:
        self.cache_dir = cache_dir
        self.tmp_dir = tmp_dir
        self.stats = {"calls": 0, "pushed": 0, "reused": 0, "bytes_pushed": 0}
        self._fingerprint: dict[str, Any] | None = None
        self._home: str | None = None
        self._lock = threading.Lock()

    # -- transport hooks -------------------------------------------------------------------------------------
    def _argv(self, command: str) -> list[str]:
        raise NotImplementedError

    def _transport_error(self, res: Completed) -> Exception | None:
        """A connection/auth failure hidden in a finished call, if any (exit 255 from ssh, 'device offline')."""
        return None

    def _upload(self, local: Path, remote: str, folder: str) -> None:
        with open(local, "rb") as fh:
            self.check(f"mkdir -p {q(folder)} && {{ cat > {q(remote)} || {{ rc=$?; rm -f {q(remote)}; exit $rc; }}; }}",
                       stdin=fh, timeout=transfer_timeout(local.stat().st_size), folder=folder)

    def _download(self, remote: str, local: Path, limit: int) -> None:
        data = self.check(f"cat {q(remote)}", timeout=transfer_timeout(limit), limit=limit)
        local.write_bytes(data)

    # -- running commands ------------------------------------------------------------------------------------
    def sh(self, command: str, *, stdin: bytes | IO[bytes] | None = None, timeout: float = 60.0,
           limit: int = MAX_OUTPUT) -> Completed:
        """Run one POSIX shell command on the device; transport failures raise, the command's own status is
        returned (callers decide)."""
        self.stats["calls"] += 1
        argv = self._argv(command)
        try:
            res = run_bounded(argv, stdin=stdin, timeout=timeout, limit=limit)
        except subprocess.TimeoutExpired as exc:
            raise DeviceTimeout(self.uri, f"a device call took longer than {timeout:.0f} s",
                                "check the device is not overloaded or hung, or raise the timeout") from exc
        except OutputTooLarge as exc:
            raise DeviceError(self.uri, f"the device printed {exc}", "refusing to read it") from exc
        except FileNotFoundError as exc:
            raise DeviceUsageError(self.uri, f"{argv[0]} is not installed on this machine",
                                   f"install the {argv[0]} client") from exc
        err = self._transport_error(res)
        if err is not None:
            raise err
        return res

    def check(self, command: str, *, folder: str | None = None, **kw: Any) -> bytes:
        """``sh`` that raises on a non-zero status: "No space left" becomes DeviceNoSpace naming ``folder``."""
        res = self.sh(command, **kw)
        if res.rc != 0:
            raise self._command_error(res, folder)
        return res.stdout

    def _command_error(self, res: Completed, folder: str | None) -> Exception:
        text = res.err_text
        if NO_SPACE in text:
            return DeviceNoSpace(self.uri, folder or "a device folder")
        tail = " | ".join(line.strip() for line in text.strip().splitlines()[-3:]) or f"exit status {res.rc}"
        return DeviceError(self.uri, f"device command failed: {tail[:400]}",
                           "check the device's disk and permissions, then retry")

    def home(self) -> str:
        if self._home is None:
            out = self.check('printf "\\n%s" "$HOME"', timeout=30).decode().splitlines()  # last line: a noisy
            self._home = (out[-1].strip() if out else "") or "/"  # shell rc file may print before it
        return self._home

    def expand(self, path: str) -> str:
        return self.home().rstrip("/") + path[1:] if path == "~" or path.startswith("~/") else path

    def cache_root(self) -> str:
        return self.expand(self.cache_dir or self.default_cache).rstrip("/")

    def tmp_word(self) -> str:
        """The device temp root as a shell word: the given tmp_dir, else $TMPDIR or /tmp."""
        return q(self.expand(self.tmp_dir)) if self.tmp_dir else '"${TMPDIR:-/tmp}"'

    def tmp_label(self) -> str:
        return self.expand(self.tmp_dir) if self.tmp_dir else "$TMPDIR (default /tmp)"

    # -- the Device API --------------------------------------------------------------------------------------
    def push(self, path: Path) -> str:
        """Copy ``path`` to ``<cache>/<sha256>/<name>`` unless the device already holds that content."""
        path = Path(path)
        digest = sha256_of(path)
        folder = f"{self.cache_root()}/{digest}"
        dest = f"{folder}/{path.name}"
        with self._lock:
            if self._remote_digest(dest, folder, path.is_dir()) == digest:
                self.stats["reused"] += 1
                log.info("%s: %s already on the device (sha256 %s…)", self.uri, path.name, digest[:12])
                return dest
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
            log.info("%s: pushing %s (%.1f MiB) to %s", self.uri, path.name, size / 2**20, folder)
            if path.is_dir():
                self._push_dir(path, folder, dest, digest, size)
            else:
                part = f"{folder}/.{path.name}.partial.{uuid.uuid4().hex[:12]}"
                self._upload(path, part, folder)
                got = _last_sha(self.check(f"{HASH_FN}; mv -f {q(part)} {q(dest)} && h {q(dest)}", folder=folder))
                if got and got != digest:
                    raise DeviceError(self.uri, f"{dest} arrived with sha256 {got[:12]}…, expected {digest[:12]}…",
                                      "check the device's storage and retry")
            self.stats["pushed"] += 1
            self.stats["bytes_pushed"] += size
        return dest

    def _remote_digest(self, dest: str, folder: str, is_dir: bool) -> str:
        if is_dir:
            cmd = f"[ -d {q(dest)} ] && cat {q(folder + '/.complete')} 2>/dev/null || true"
        else:
            cmd = f"{HASH_FN}; if [ -f {q(dest)} ]; then h {q(dest)}; fi"
        return _last_sha(self.check(cmd, timeout=120))

    def _push_dir(self, path: Path, folder: str, dest: str, digest: str, size: int) -> None:
        import tarfile

        part = f"{folder}/.partial.{uuid.uuid4().hex[:12]}"
        with tempfile.TemporaryFile() as tmp:
            with tarfile.open(fileobj=tmp, mode="w") as tar:
                tar.add(path, arcname=path.name)
            tmp.seek(0)
            self.check(
                f"mkdir -p {q(folder)} && rm -rf {q(part)} && mkdir {q(part)} && "
                f"{{ tar -xf - -C {q(part)} || {{ rc=$?; rm -rf {q(part)}; exit $rc; }}; }} && rm -rf {q(dest)} && "
                f"mv {q(part + '/' + path.name)} {q(dest)} && rmdir {q(part)} && "
                f"printf %s {digest} > {q(folder + '/.complete')}",
                stdin=tmp, timeout=transfer_timeout(size), folder=folder)

    def run_script(self, script: str, args: list[str], timeout: float) -> str:
        """``python - ARGS < script`` on the device; returns its stdout. Exit 127 = the device python is missing."""
        env = f"CASTLING_DEPLOY_DEADLINE={max(1, int(timeout))} "  # the runner stops itself there (see remote_runner)
        env += f"TMPDIR={self.tmp_word()} " if self.tmp_dir else ""
        cmd = env + " ".join([q(self.python), "-", *(shlex.quote(a) for a in args)])
        res = self.sh(cmd, stdin=script.encode(), timeout=timeout + 20)
        if res.rc in (126, 127) and "@@castling-deploy-result@@" not in res.stdout.decode("utf-8", "replace"):
            raise DeviceUsageError(self.uri, f"device python {self.python!r} not found or not executable",
                                   "pass the interpreter's path on the device with --device-python PATH")
        if res.rc != 0 and "@@castling-deploy-result@@" not in res.stdout.decode("utf-8", "replace"):
            raise self._command_error(res, self.tmp_label())
        return res.stdout.decode("utf-8", "replace")

    def put(self, local: Path, remote: str) -> str:
        """Copy one local file to an exact device path (inputs for a run; artifacts go through ``push``)."""
        self._upload(Path(local), remote, remote.rsplit("/", 1)[0] or "/")
        return remote

    def fetch(self, remote: str, local: Path, *, limit: int = MAX_OUTPUT) -> Path:
        """Copy one device file to ``local`` (refuses files over ``limit`` bytes)."""
        local = Path(local)
        self._download(remote, local, limit)
        return local

    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            import json

            from .scripts import fingerprint_script

            out = self.run_script(fingerprint_script(), [], timeout=60)
            try:
                self._fingerprint = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError) as exc:
                raise DeviceError(self.uri, "the fingerprint script printed no JSON", "check the device python") from exc
        return dict(self._fingerprint)

    @contextlib.contextmanager
    def temp_dir(self) -> Iterator[str]:
        """A fresh ``mktemp -d`` folder on the device, removed however the block ends."""
        base = self.tmp_word()
        path = self.check(f"mkdir -p {base} && mktemp -d {base}/castling-deploy.XXXXXX", folder=self.tmp_label(),
                          timeout=60).decode().strip()
        path = path.splitlines()[-1].strip() if path else path
        if "castling-deploy." not in path or not path.startswith("/"):
            raise DeviceError(self.uri, f"mktemp returned {path!r}", "check the device's mktemp")
        try:
            yield path
        finally:
            try:
                self.check(f"rm -rf {shlex.quote(path)}", timeout=60)
            except Exception as exc:  # the connection may be gone; say what is left behind
                log.warning("%s: could not remove the device temp folder %s (%s)", self.uri, path, exc)

    def close(self) -> None:
        """Release the transport (SSH: the control master and its socket folder)."""

    def __enter__(self) -> ShellDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.uri}>"
