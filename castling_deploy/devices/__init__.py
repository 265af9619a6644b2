"""Run and measure artifacts on other machines: ``ssh://[user@]host[:port]``, ``adb:SERIAL``, ``local``.

    from castling_deploy.devices import parse_device, profile_on_device, profile_fleet, logits_on_device
    with parse_device("ssh://jetson", python="python3") as dev:
        result = profile_on_device(dev, Path("model.onnx"), runs=100, warmup=10, threads=4, batch=1)

Progress is logged on logger ``castling_deploy.devices``; failures are typed (see errors.py) and name the
device plus one fix.
"""
from .base import Device
from .errors import DeviceError, DeviceNoSpace, DeviceRuntimeMissing, DeviceTimeout, DeviceUsageError
from .fleet import DeviceResult, close_all, fleet_exit_code, map_devices, profile_fleet
from .profile import logits_on_device, profile_on_device
from .connect import parse_device
from .uri import SSH_CONFIG_ENV, DeviceSpec, parse_uri

__all__ = [
    "SSH_CONFIG_ENV", "Device", "DeviceError", "DeviceNoSpace", "DeviceResult", "DeviceRuntimeMissing", "DeviceSpec",
    "DeviceTimeout", "DeviceUsageError", "close_all", "fleet_exit_code", "logits_on_device", "map_devices",
    "parse_device", "parse_uri", "profile_fleet", "profile_on_device",
]
