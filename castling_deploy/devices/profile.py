"""Profile an artifact on a device, or compute its logits there: push (content-addressed), run the
self-contained runner with the device python, read back one JSON line, turn failures into typed errors.

The result mirrors local ``profile_artifact`` (same keys: load_ms, latency_ms.p50 …, memory.peak_rss_mb …)
plus ``device`` and ``fingerprint``, so reports and tables treat local and device runs alike.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from .base import Device, sha256_of
from .engine_compat import ENGINE_SUFFIXES, check_engine_runs_on
from .errors import DeviceError, DeviceNoSpace, DeviceRuntimeMissing, DeviceTimeout, DeviceUsageError
from .remote_runner import MARKER
from .scripts import runner_script

log = logging.getLogger("castling_deploy.devices")
SCHEMA = "castling-deploy/profile/1"  # the local profile schema: a device result is a superset


def artifact_kind(path: Path) -> str:
    """The artifact's kind from the one runtime table (castling_deploy.runtime.RUNTIMES); it must exist here."""
    from ..runtime import artifact_kind as kind_of

    kind = kind_of(path)
    if not path.exists():
        raise UsageError(f"{path}: no such artifact; pass the path of an exported model file")
    return kind


def parse_runner_output(device: Device, text: str) -> dict[str, Any]:
    """The runner's result dict, or the typed error its JSON describes."""
    line = next((ln for ln in reversed(text.splitlines()) if ln.startswith(MARKER)), None)
    if line is None:
        tail = " | ".join(text.strip().splitlines()[-3:])[:300]
        raise DeviceError(device.uri, f"the device runner printed no result ({tail or 'no output'})",
                          "check that the device python runs: python3 -c 'import numpy'")
    doc = json.loads(line[len(MARKER):])
    if doc.get("ok"):
        return doc["result"]
    err = doc.get("error")
    if err == "runtime_missing":
        raise DeviceRuntimeMissing(device.uri, doc["module"], doc["pip"], device.python)
    if err == "no_space":
        raise DeviceNoSpace(device.uri, str(doc.get("path")))
    if err == "timeout":
        raise DeviceTimeout(device.uri, f"the run on the device passed its {doc.get('seconds')} s deadline and "
                            "was stopped there", "raise the timeout or lower --runs")
    if err == "usage":
        raise DeviceUsageError(device.uri, doc.get("message", "bad request"), "fix the artifact or the shape given")
    raise DeviceError(device.uri, f"{doc.get('type', 'error')} on the device: {doc.get('message', '')[:400]}",
                      "check that the artifact suits the runtime version on the device (see the fingerprint)")


def _check_args(runs: int, warmup: int, threads: int | None, batch: int) -> None:
    if runs < 1 or warmup < 0 or batch < 1:
        raise UsageError(f"need runs >= 1, warmup >= 0, batch >= 1 (got {runs}, {warmup}, {batch})")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1 (got {threads})")


def _check_engine(device: Device, artifact: Path) -> None:
    """A TensorRT engine is refused before it is pushed when its recorded TensorRT / GPU is not the device's."""
    if artifact.suffix.lower() in ENGINE_SUFFIXES:
        for note in check_engine_runs_on(artifact, device.fingerprint(), device.uri, export_dir=str(artifact.parent)):
            log.warning("%s: %s; TensorRT will load it but it may run slower than an engine built there",
                        device.uri, note)


def profile_on_device(device: Device, artifact: Path, *, runs: int = 100, warmup: int = 10,
                      threads: int | None = None, batch: int = 1, shape: tuple[int, ...] | None = None,
                      timeout: float | None = None) -> dict[str, Any]:
    """Time ``artifact`` on ``device`` with its runtime there; same keys as local profiling plus ``device``,
    ``fingerprint`` and ``artifact.remote_path``/``sha256``. ``timeout`` bounds the whole remote run (s)."""
    artifact = Path(artifact)
    kind = artifact_kind(artifact)
    _check_args(runs, warmup, threads, batch)
    if getattr(device, "kind", "") == "adb":
        from .adb import profile_with_benchmark_model

        return profile_with_benchmark_model(device, artifact, runs=runs, warmup=warmup, threads=threads, batch=batch)
    _check_engine(device, artifact)
    remote = device.push(artifact)
    args = ["profile", remote, "--runs", str(runs), "--warmup", str(warmup), "--batch", str(batch)]
    if threads:
        args += ["--threads", str(threads)]
    if shape:
        args += ["--shape", ",".join(str(int(d)) for d in shape)]
    log.info("%s: profiling %s (%d runs + %d warmup)", device.uri, artifact.name, runs, warmup)
    out = device.run_script(runner_script(), args, timeout=timeout or 600.0 + 2.0 * (runs + warmup))
    res = parse_runner_output(device, out)
    fp = res.pop("fingerprint")
    size = sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file()) if artifact.is_dir() else artifact.stat().st_size
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "artifact": {"path": str(artifact), "file": artifact.name, "kind": kind, "bytes": size,
                     "sha256": sha256_of(artifact), "remote_path": remote},
        "host": {"machine": fp.get("arch"), "system": fp.get("os"), "processor": fp.get("cpu_model"),
                 "cpu_count": fp.get("cpu_cores"), "python": fp.get("python")},
        **res,
        "per_op": None,
        "chart": None,
        "device": device.uri,
        "fingerprint": fp,
    }
    log.info("%s: %s p50 %.3f ms", device.uri, artifact.name, result["latency_ms"]["p50"])
    return result


def logits_on_device(device: Device, artifact: Path, inputs: np.ndarray, *, threads: int | None = None,
                     timeout: float = 600.0) -> np.ndarray:
    """Run ``artifact`` on ``device`` over ``inputs`` (float32 NCHW) and bring the logits back (float32)."""
    artifact = Path(artifact)
    artifact_kind(artifact)
    if getattr(device, "kind", "") == "adb":
        raise DeviceUsageError(device.uri, "logits need a device python; adb devices have none",
                               "verify on an SSH device or locally")
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    if x.ndim != 4:
        raise UsageError(f"inputs must be NCHW images (N, C, H, W), got shape {x.shape}")
    _check_engine(device, artifact)
    remote = device.push(artifact)
    with tempfile.TemporaryDirectory(prefix="castling-deploy-") as local_tmp, device.temp_dir() as tmp:
        local_in, local_out = Path(local_tmp) / "inputs.npy", Path(local_tmp) / "logits.npy"
        np.save(local_in, x, allow_pickle=False)
        device.put(local_in, f"{tmp}/inputs.npy")
        args = ["logits", remote, f"{tmp}/inputs.npy", f"{tmp}/logits.npy"]
        if threads:
            args += ["--threads", str(threads)]
        log.info("%s: logits of %s for %d inputs", device.uri, artifact.name, len(x))
        parse_runner_output(device, device.run_script(runner_script(), args, timeout=timeout))
        device.fetch(f"{tmp}/logits.npy", local_out)
        y = np.load(local_out, allow_pickle=False)
    if y.shape[0] != x.shape[0]:
        raise DeviceError(device.uri, f"got {y.shape[0]} logit rows for {x.shape[0]} inputs", "report this")
    return y.astype(np.float32, copy=False)
