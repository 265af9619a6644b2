"""``adb:SERIAL`` (or ``adb:`` for the only device): Android over the platform-tools ``adb`` client.

Written against adb's documented behaviour — ``adb -s SERIAL shell CMD`` runs CMD with the device's sh and
(shell protocol v2, Android 7+) returns its exit status; ``adb -s SERIAL push LOCAL REMOTE`` / ``pull`` copy
files. Android has no python, so profiling runs LiteRT's ``benchmark_model`` binary (given by the user, pushed
content-addressed like artifacts) and parses its output; logits are not available on adb devices.
Not exercised in CI (no device, no adb there): only the output parser is tested.
"""
from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

from .base import ShellDevice, q, sha256_of, transfer_timeout
from .benchmark_model import parse_benchmark_output, to_profile_keys
from .errors import DeviceError, DeviceUsageError
from .proc import Completed, run_bounded
from .uri import DeviceSpec

log = logging.getLogger("castling_deploy.devices")
PROPS = ("ro.product.manufacturer", "ro.product.model", "ro.board.platform", "ro.soc.manufacturer", "ro.soc.model",
         "ro.hardware", "ro.build.version.release", "ro.build.version.sdk", "ro.product.cpu.abi")
_ADB_FAILURES = (
    ("no devices/emulators found", "no device connected", "connect the device and enable USB debugging"),
    ("not found", "device not found", "check the serial with `adb devices`"),
    ("unauthorized", "device unauthorized", "accept the RSA key prompt on the device's screen"),
    ("offline", "device offline", "reconnect the cable or run `adb reconnect`"),
    ("more than one device", "more than one device connected", "name one: --device adb:SERIAL (see `adb devices`)"),
)


class AdbDevice(ShellDevice):
    kind = "adb"
    default_cache = "/data/local/tmp/castling-deploy"

    def __init__(self, spec: DeviceSpec, *, benchmark_model: Path | None = None, cache_dir: str | None = None,
                 tmp_dir: str | None = None) -> None:
        super().__init__(cache_dir=cache_dir, tmp_dir=tmp_dir or "/data/local/tmp")
        self.spec, self.uri, self.python = spec, spec.uri, ""
        self.benchmark_model = Path(benchmark_model) if benchmark_model else None

    def _adb(self) -> list[str]:
        return ["adb", "-s", self.spec.serial] if self.spec.serial else ["adb"]

    def _argv(self, command: str) -> list[str]:
        return [*self._adb(), "shell", command]

    def _transport_error(self, res: Completed) -> Exception | None:
        text = res.err_text
        if "error:" not in text and not text.startswith("adb:"):
            return None
        for needle, meaning, fix in _ADB_FAILURES:
            if needle in text:
                return DeviceUsageError(self.uri, meaning, fix)
        return None

    def _upload(self, local: Path, remote: str, folder: str) -> None:
        self.check(f"mkdir -p {q(folder)}", folder=folder)
        res = run_bounded([*self._adb(), "push", str(local), remote], timeout=transfer_timeout(local.stat().st_size))
        if res.rc != 0:
            raise self._transport_error(res) or self._command_error(res, folder)

    def _download(self, remote: str, local: Path, limit: int) -> None:
        size = self.check(f"stat -c %s {q(remote)}").decode().strip()
        if not size.isdigit() or int(size) > limit:
            raise DeviceError(self.uri, f"{remote} is {size} bytes", f"refusing files over {limit // 2**20} MiB")
        res = run_bounded([*self._adb(), "pull", remote, str(local)], timeout=transfer_timeout(int(size)))
        if res.rc != 0:
            raise self._transport_error(res) or self._command_error(res, str(local.parent))

    def home(self) -> str:
        return "/data/local/tmp"

    def run_script(self, script: str, args: list[str], timeout: float) -> str:
        raise DeviceUsageError(self.uri, "adb devices have no python to run scripts",
                               "profile .tflite files there with benchmark_model=PATH, or use an SSH device")

    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            cmd = "; ".join(f"printf '%s=%s\\n' {p} \"$(getprop {p})\"" for p in PROPS)
            cmd += ("; printf 'uname=%s\\n' \"$(uname -srm)\"; printf 'cores=%s\\n' \"$(nproc 2>/dev/null)\""
                    "; printf 'hostname=%s\\n' \"$(hostname 2>/dev/null)\""
                    "; printf 'mem=%s\\n' \"$(grep MemTotal /proc/meminfo)\"")
            kv = dict(ln.split("=", 1) for ln in self.check(cmd, timeout=60).decode().splitlines() if "=" in ln)
            uname = kv.get("uname", "").split()
            mem = kv.get("mem", "").split()
            self._fingerprint = {
                "hostname": kv.get("hostname") or None, "os": "Android",
                "os_release": f"Android {kv.get('ro.build.version.release', '?')}",
                "kernel": uname[1] if len(uname) > 1 else None, "arch": uname[2] if len(uname) > 2 else None,
                "cpu_model": kv.get("ro.soc.model") or kv.get("ro.board.platform") or kv.get("ro.hardware") or None,
                "cpu_cores": int(kv["cores"]) if kv.get("cores", "").isdigit() else None,
                "memory_mb": round(int(mem[1]) / 1024.0, 1) if len(mem) > 1 and mem[1].isdigit() else None,
                "android": {p: kv.get(p) or None for p in PROPS},
                "runtimes": {"benchmark_model": str(self.benchmark_model) if self.benchmark_model else None},
            }
        return dict(self._fingerprint)


def profile_with_benchmark_model(device: AdbDevice, artifact: Path, *, runs: int, warmup: int,
                                 threads: int | None, batch: int) -> dict[str, Any]:
    """Push the .tflite and benchmark_model, run it in a device temp folder, parse what it printed."""
    if artifact.suffix.lower() != ".tflite":
        raise DeviceUsageError(device.uri, f"adb devices profile .tflite files only (got {artifact.name})",
                               "export with --target tflite")
    if device.benchmark_model is None or not device.benchmark_model.is_file():
        raise DeviceUsageError(device.uri, "profiling on Android needs LiteRT's benchmark_model binary",
                               "download the android_aarch64 benchmark_model and pass its path (benchmark_model=PATH)")
    model = device.push(artifact)
    binary = device.push(device.benchmark_model)
    flags = [f"--graph={model}", f"--num_runs={runs}", f"--warmup_runs={warmup}", "--min_secs=0",
             "--warmup_min_secs=0", "--enable_op_profiling=true", "--report_peak_memory_footprint=true"]
    if threads:
        flags.append(f"--num_threads={threads}")
    with device.temp_dir() as tmp:
        cmd = f"cd {shlex.quote(tmp)} && chmod 755 {q(binary)} && {q(binary)} " + " ".join(map(shlex.quote, flags))
        log.info("%s: benchmark_model on %s", device.uri, artifact.name)
        res = device.sh(cmd + " 2>&1", timeout=600.0 + 2.0 * (runs + warmup))
    text = res.stdout.decode("utf-8", "replace")
    if res.rc != 0:
        tail = " | ".join(text.strip().splitlines()[-3:])[:400]
        raise DeviceError(device.uri, f"benchmark_model failed: {tail}", "check the binary matches the device ABI")
    parsed = parse_benchmark_output(text)
    fp = device.fingerprint()
    return {
        "schema": "castling-deploy/profile/1",
        "artifact": {"path": str(artifact), "file": artifact.name, "kind": "tflite",
                     "bytes": artifact.stat().st_size, "sha256": sha256_of(artifact), "remote_path": model},
        "runtime": "benchmark_model (LiteRT C++)", "runtime_info": {"name": "benchmark_model", "version": None},
        "host": {"machine": fp.get("arch"), "system": "Android", "processor": fp.get("cpu_model"),
                 "cpu_count": fp.get("cpu_cores"), "python": None},
        "threads": threads, "batch": batch, "input_shape": None, "output_shape": None,
        **to_profile_keys(parsed, batch=batch), "samples_ms": None, "chart": None,
        "device": device.uri, "fingerprint": fp, "benchmark_model": parsed,
    }
