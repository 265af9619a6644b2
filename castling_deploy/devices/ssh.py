"""``ssh://[user@]host[:port]`` through the system OpenSSH client, so the user's keys, agent, ProxyJump and
Host aliases work as they do in a terminal.

- Never a password prompt: ``BatchMode=yes`` (a missing key fails at once with a fix, nothing hangs).
- One handshake per device: a ControlMaster started once (``-N -f``) in a private temp folder, then every call
  multiplexes over its socket (``ControlMaster=no``); ``close()`` (or interpreter exit) stops it and removes the
  folder. ``ControlPersist`` bounds how long an orphaned master can live if we are killed.
- ``ssh_config`` becomes ``ssh -F FILE``: OpenSSH reads ~/.ssh/config from the passwd home, not $HOME, so a
  test or CI job that needs its own config must pass it explicitly (and then ~/.ssh/config is not read).
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path

from .base import ShellDevice
from .errors import DeviceUsageError
from .proc import Completed
from .uri import DeviceSpec

log = logging.getLogger("castling_deploy.devices")
CONTROL_PERSIST_S = 300

# (what ssh printed, what it means, the one-line fix)
_SSH_FAILURES = (
    ("Permission denied", "authentication failed (no accepted key; passwords are never asked)",
     "add your public key on the device (ssh-copy-id HOST) or load it into ssh-agent"),
    ("Host key verification failed", "the host key is unknown or does not match known_hosts",
     "run `ssh HOST` once in a terminal to check and accept the host key"),
    ("Could not resolve hostname", "host name not found",
     "check the name or the Host alias in your ssh config (pass the config with CASTLING_DEPLOY_SSH_CONFIG)"),
    ("Connection refused", "connection refused", "check that sshd runs on the device and the port is right"),
    ("timed out", "connection timed out", "check that the device is on and reachable (ping it)"),
    ("No route to host", "no route to host", "check that the device is on and on your network"),
    ("Network is unreachable", "network unreachable", "check this machine's network/VPN"),
    ("Connection closed by", "the device closed the connection", "check sshd's log on the device"),
    ("Connection reset", "the connection was reset", "check sshd's log on the device"),
    ("kex_exchange_identification", "the SSH handshake failed", "check sshd's log on the device"),
    ("Too many authentication failures", "too many keys offered",
     "set IdentitiesOnly yes and the right IdentityFile for this host in your ssh config"),
)


def classify_ssh_failure(uri: str, stderr: str) -> DeviceUsageError | None:
    """Map OpenSSH's stderr to a typed error with a fix; None if it is not a connection/auth failure."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip() and not ln.startswith("Warning:")]
    for needle, meaning, fix in _SSH_FAILURES:
        hit = next((ln for ln in lines if needle in ln), None)
        if hit is not None:
            return DeviceUsageError(uri, f"cannot connect: {meaning} ({hit[:200]})", fix)
    return None


def _stop_master(argv: list[str], control_dir: str) -> None:
    try:
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=15, check=False)
    except (OSError, subprocess.SubprocessError):
        pass
    shutil.rmtree(control_dir, ignore_errors=True)


class SshDevice(ShellDevice):
    kind = "ssh"

    def __init__(self, spec: DeviceSpec, *, python: str = "python3", ssh_config: Path | None = None,
                 cache_dir: str | None = None, tmp_dir: str | None = None, connect_timeout: float = 10.0) -> None:
        super().__init__(cache_dir=cache_dir, tmp_dir=tmp_dir)
        self.spec, self.uri, self.python = spec, spec.uri, python
        self.ssh_config = Path(ssh_config).expanduser() if ssh_config else None
        self.connect_timeout = connect_timeout
        self._control_dir: str | None = None
        self._finalizer: weakref.finalize | None = None
        self._master_lock = threading.Lock()

    def _opts(self) -> list[str]:
        opts = ["-F", str(self.ssh_config)] if self.ssh_config else []
        opts += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, round(self.connect_timeout))}",
                 "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3"]
        if self.spec.user:
            opts += ["-l", self.spec.user]
        if self.spec.port:
            opts += ["-p", str(self.spec.port)]
        if self._control_dir:
            opts += ["-o", f"ControlPath={self._control_dir}/%C"]
        return opts

    def _ensure_master(self) -> None:
        """Connect once (authenticating, failing fast with a fix) and leave a master for later calls."""
        with self._master_lock:
            if os.name == "nt":  # Windows OpenSSH has no ControlMaster: every call handshakes
                return
            if self._control_dir is not None:
                if any(os.scandir(self._control_dir)):
                    return
                # The master is gone (ControlPersist idle expiry, killed): clean up and start a new one.
                if self._finalizer is not None:
                    self._finalizer()
                    self._finalizer = None
                self._control_dir = None
            base = "/tmp" if os.access("/tmp", os.W_OK) else None  # short: unix socket paths max ~104 bytes
            control_dir = tempfile.mkdtemp(prefix="cd-ssh-", dir=base)
            self._control_dir = control_dir
            argv = ["ssh", *self._opts(), "-o", "ControlMaster=yes", "-o", f"ControlPersist={CONTROL_PERSIST_S}",
                    "-N", "-f", "--", self.spec.host]
            log.info("%s: connecting", self.uri)
            try:
                with tempfile.TemporaryFile() as err:
                    try:
                        rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                            timeout=2 * self.connect_timeout + 30, check=False).returncode
                    except subprocess.TimeoutExpired:
                        rc, _ = 255, err.write(b"ssh: connection timed out\n")
                    except FileNotFoundError as exc:
                        raise DeviceUsageError(self.uri, "the ssh client is not installed on this machine",
                                               "install OpenSSH's client (apt install openssh-client)") from exc
                    err.seek(0)
                    text = err.read().decode("utf-8", "replace")
                if rc != 0:
                    raise classify_ssh_failure(self.uri, text) or DeviceUsageError(
                        self.uri, f"ssh failed: {(text.strip().splitlines() or ['exit %d' % rc])[-1][:200]}",
                        "run `ssh -v HOST` in a terminal to see why")
            except BaseException:
                self._control_dir = None
                shutil.rmtree(control_dir, ignore_errors=True)
                raise
            stop = ["ssh", *self._opts(), "-O", "exit", "--", self.spec.host]
            self._finalizer = weakref.finalize(self, _stop_master, stop, control_dir)

    def _argv(self, command: str) -> list[str]:
        self._ensure_master()
        return ["ssh", *self._opts(), "-o", "ControlMaster=no", "--", self.spec.host, command]

    def _transport_error(self, res: Completed) -> Exception | None:
        return classify_ssh_failure(self.uri, res.err_text) if res.rc == 255 else None

    def close(self) -> None:
        """Stop the control master and remove its socket folder (idempotent)."""
        with self._master_lock:
            if self._finalizer is not None:
                self._finalizer()
                self._finalizer = None
            self._control_dir = None
