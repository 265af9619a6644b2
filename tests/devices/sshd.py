"""A throwaway OpenSSH server on 127.0.0.1 for the device tests and the overhead benchmark.

Real sshd (Debian's openssh-server), a fresh host key and client key, an ssh client config with Host aliases;
nothing of the user's ~/.ssh is read or written (the client config is passed with ``ssh -F``).
"""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def missing_tools() -> str | None:
    """Why a loopback server cannot run here, or None."""
    if not os.path.exists(SSHD):
        return "openssh-server is not installed (/usr/sbin/sshd; apt-get install openssh-server)"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install openssh-client)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class LoopbackSshd:
    """``with LoopbackSshd(tmp) as srv:`` → ``srv.config`` (client config), aliases ``loopback``, ``loopback2``,
    ``loopback-badkey`` (a key the server does not accept); ``srv.log`` is sshd's log."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.port = free_port()
        self.user = getpass.getuser()
        self.config = self.root / "ssh_config"
        self.log = self.root / "sshd.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> LoopbackSshd:
        r = self.root
        r.mkdir(parents=True, exist_ok=True)
        for name in ("host_key", "client_key", "other_key"):
            _keygen(r / name)
        (r / "authorized_keys").write_text((r / "client_key.pub").read_text())
        (r / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {r / 'host_key'}\n"
            f"AuthorizedKeysFile {r / 'authorized_keys'}\nPidFile {r / 'sshd.pid'}\n"
            "StrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPrintMotd no\nMaxSessions 64\nMaxStartups 64\nLogLevel INFO\n")
        hosts = ""
        for alias, key in (("loopback", "client_key"), ("loopback2", "client_key"), ("loopback-badkey", "other_key")):
            hosts += (f"Host {alias}\n  HostName 127.0.0.1\n  Port {self.port}\n  User {self.user}\n"
                      f"  IdentityFile {r / key}\n  IdentitiesOnly yes\n  IdentityAgent none\n")
        self.config.write_text(
            hosts + f"Host *\n  UserKnownHostsFile {r / 'known_hosts'}\n  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking accept-new\n  LogLevel ERROR\n")
        try:
            os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation folder
        except OSError:
            pass
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(r / "sshd_config")], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log.read_text()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not listen on {self.port}: {self.log.read_text()[-500:]}")

    def accepted(self) -> int:
        """How many authentications sshd accepted so far (one per real handshake)."""
        return self.log.read_text(errors="replace").count("Accepted publickey")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> LoopbackSshd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
