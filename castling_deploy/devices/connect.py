"""``parse_device``: a device URI -> the Device that reaches it (the one place that knows every device kind)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .adb import AdbDevice
from .base import Device
from .errors import DeviceUsageError
from .local import LocalDevice
from .ssh import SshDevice
from .uri import SSH_CONFIG_ENV, parse_uri

DEVICE_CACHE_ENV = "CASTLING_DEPLOY_DEVICE_CACHE"


def parse_device(
    uri: str,
    *,
    python: str | None = None,
    ssh_config: Path | None = None,
    benchmark_model: Path | None = None,
    cache_dir: str | None = None,
    tmp_dir: str | None = None,
    connect_timeout: float = 10.0,
) -> Device:
    """A Device for ``uri``. ``python`` is the interpreter on the device (default ``python3`` over SSH, this
    interpreter for ``local``); ``ssh_config`` (or $CASTLING_DEPLOY_SSH_CONFIG) is passed as ``ssh -F``;
    ``benchmark_model`` is the LiteRT benchmark binary pushed to adb devices. Nothing connects until first use."""
    spec = parse_uri(uri)
    # Where artifacts are cached ON the device (default ~/.cache/castling-deploy/artifacts there).
    cache_dir = cache_dir or os.environ.get(DEVICE_CACHE_ENV) or None
    if spec.kind == "local":
        return LocalDevice(python=python or sys.executable, cache_dir=cache_dir, tmp_dir=tmp_dir)
    if spec.kind == "ssh":
        config = ssh_config or (Path(os.environ[SSH_CONFIG_ENV]) if os.environ.get(SSH_CONFIG_ENV) else None)
        if config is not None and not Path(config).expanduser().is_file():
            raise DeviceUsageError(spec.uri, f"ssh config {config} does not exist",
                                   f"fix the path or unset {SSH_CONFIG_ENV}")
        return SshDevice(spec, python=python or "python3", ssh_config=config, cache_dir=cache_dir,
                         tmp_dir=tmp_dir, connect_timeout=connect_timeout)
    return AdbDevice(spec, benchmark_model=benchmark_model, cache_dir=cache_dir, tmp_dir=tmp_dir)
