"""Several devices at once: one thread per device, a result or a typed error per device, never one device's
failure stopping the others. Threads suffice: the work is waiting on ssh/adb processes."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..errors import CastlingError
from .base import Device
from .profile import profile_on_device

log = logging.getLogger("castling_deploy.devices")
T = TypeVar("T")


@dataclass
class DeviceResult:
    """One device's outcome: ``result`` when it worked, else ``error`` (one line, with the fix) and the exit
    code its error class maps to (2 unreachable/auth/no space, 4 runtime missing on the device, 1 other)."""

    uri: str
    result: Any = None
    error: str | None = None
    exit_code: int = 0
    error_type: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def map_devices(devices: Sequence[Device], fn: Callable[[Device], T], *, what: str = "run") -> list[DeviceResult]:
    """``fn(device)`` on every device concurrently; results in the order of ``devices``."""

    def one(dev: Device) -> DeviceResult:
        t0 = time.perf_counter()
        log.info("%s: %s started", dev.uri, what)
        try:
            value = fn(dev)
        except CastlingError as exc:
            log.error("%s", exc)
            return DeviceResult(dev.uri, error=str(exc), exit_code=exc.exit_code, error_type=type(exc).__name__,
                                seconds=time.perf_counter() - t0)
        except Exception as exc:  # a bug or an unforeseen failure on one device must not sink the fleet
            log.exception("%s: %s failed unexpectedly", dev.uri, what)
            return DeviceResult(dev.uri, error=f"{dev.uri}: unexpected {type(exc).__name__}: {exc}", exit_code=1,
                                error_type=type(exc).__name__, seconds=time.perf_counter() - t0)
        log.info("%s: %s done in %.1f s", dev.uri, what, time.perf_counter() - t0)
        return DeviceResult(dev.uri, result=value, seconds=time.perf_counter() - t0)

    if not devices:
        return []
    with ThreadPoolExecutor(max_workers=len(devices), thread_name_prefix="device") as pool:
        return list(pool.map(one, devices))


def profile_fleet(devices: Sequence[Device], artifact: Path, **kw: Any) -> list[DeviceResult]:
    """``profile_on_device`` on every device concurrently (keyword arguments as there)."""
    return map_devices(devices, lambda d: profile_on_device(d, Path(artifact), **kw), what=f"profile {Path(artifact).name}")


def fleet_exit_code(results: Iterable[DeviceResult]) -> int:
    """0 when every device succeeded, else the first failing device's code (what the CLI should exit with)."""
    return next((r.exit_code for r in results if not r.ok), 0)


def close_all(devices: Iterable[Device]) -> None:
    for dev in devices:
        try:
            dev.close()
        except Exception:  # closing is best effort; the socket folder is removed at exit anyway
            log.debug("closing %s failed", dev.uri, exc_info=True)


def format_fleet_table(results: Sequence[DeviceResult]) -> str:
    """Devices side by side: one row per device with its fingerprint summary and latency, errors in place."""
    head = (f"{'device':<26} {'host / arch':<28} {'runtime':<26} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} "
            f"{'img/s':>8} {'RSS MiB':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        if not r.ok:
            lines.append(f"{r.uri:<26} FAILED (exit {r.exit_code}): {r.error}")
            continue
        res, fp = r.result, (r.result.get("fingerprint") or {})
        lat, mem = res["latency_ms"], res.get("memory") or {}
        host = f"{fp.get('hostname', '?')} / {fp.get('arch', fp.get('machine', '?'))}"[:28]
        lines.append(f"{r.uri:<26} {host:<28} {str(res.get('runtime', '?'))[:26]:<26} {lat['p50']:>9.3f} "
                     f"{lat['p90']:>9.3f} {lat['p99']:>9.3f} {lat['throughput_ips']:>8.1f} "
                     f"{mem.get('peak_rss_mb', float('nan')):>8.1f}")
    return "\n".join(lines)
