"""Typed device failures. Each names the device and ends with one actionable fix, so a fleet report reads
as a list of things to do, one per device; the CLI maps them to exit codes like every other CastlingError."""
from __future__ import annotations

from ..errors import CastlingError, UsageError


class DeviceError(CastlingError):
    """A device call failed for a reason we could not classify (exit 1); the message keeps the stderr tail."""

    def __init__(self, uri: str, message: str, fix: str = "") -> None:
        self.uri, self.fix = uri, fix
        super().__init__(f"{uri}: {message}" + (f"; {fix}" if fix else ""))


class DeviceUsageError(UsageError):
    """Unreachable, refused, wrong key, bad URI, device python not found (exit 2)."""

    def __init__(self, uri: str, message: str, fix: str = "") -> None:
        self.uri, self.fix = uri, fix
        super().__init__(f"{uri}: {message}" + (f"; {fix}" if fix else ""))


class DeviceNoSpace(DeviceUsageError):
    """"No space left on device" on the device, in ``folder`` (exit 2)."""

    def __init__(self, uri: str, folder: str) -> None:
        self.folder = folder
        super().__init__(uri, f"no space left on the device in {folder}",
                         "free space there or pass another cache/temp folder on a larger filesystem")


class DeviceTimeout(DeviceError):
    """A remote call ran past its timeout (exit 1): a hung runtime or an overloaded device."""


class DeviceRuntimeMissing(CastlingError):
    """The device python cannot import the artifact's runtime (exit 4); the fix is a pip command run ON the device."""

    exit_code = 4

    def __init__(self, uri: str, module: str, pip_package: str, python: str = "python3") -> None:
        self.uri, self.module, self.pip_package, self.python = uri, module, pip_package, python
        self.fix = f"on the device run: {python} -m pip install {pip_package}"
        super().__init__(f"{uri}: the device python ({python}) cannot import {module}; {self.fix}")


class DeviceToolMissing(CastlingError):
    """A tool the device must provide (trtexec) is absent or unusable there (exit 4, like a missing runtime)."""

    exit_code = 4

    def __init__(self, uri: str, message: str, fix: str) -> None:
        self.uri, self.fix = uri, fix
        super().__init__(f"{uri}: {message}; {fix}")
