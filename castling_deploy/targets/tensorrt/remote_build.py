"""``castling-deploy build-engine EXPORT_DIR --device ssh://jetson``: build the engine ON the device.

The export's typed ONNX goes into the device's content-addressed artifact cache (a rebuild reuses it), a
``build_engine.sh`` for the asked precision and batch range goes into a fresh device temp folder, and the
device's own ``trtexec`` builds there: the script reads the TensorRT version from trtexec's banner and passes
the flags that version accepts (strong typing on 10.12+ / 11.x, weak on 10.0-10.11 such as JetPack 6's 10.3).
The engine, the timing cache and the build log come back; with ``--val`` the engine is verified on the device
(its logits against the fp32 ONNX on ORT CPU here) before anything is written into the export folder. The
device's fingerprint (GPU, compute capability, TensorRT, L4T) goes into ``model.engine.json`` so an engine is
refused on a device it cannot run on (``devices/engine_compat.py``). Nothing is left in the device temp folder,
and a failed build or verification leaves the export folder as it was.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from ...devices import logits_on_device
from ...devices.base import ShellDevice, q
from ...devices.engine_compat import device_gpu, device_tensorrt, version_key
from ...devices.errors import DeviceError, DeviceToolMissing
from ...digest import file_sha256
from ...errors import UsageError
from ...output import atomic_write_bytes
from ...report import ArtifactRecord
from .build_engine import resolve_engine_input, verify_engine
from .script import build_script
from .target import ENGINE_NAME

log = logging.getLogger(__name__)

MAX_ENGINE_BYTES = 4 * 2**30
MAX_CACHE_BYTES = 512 * 2**20
MAX_LOG_BYTES = 16 * 2**20
FINGERPRINT_KEYS = ("hostname", "os", "os_release", "kernel", "arch", "cpu_model", "memory_mb")


def _onnx_io(onnx_path: Path) -> tuple[str, int]:
    """(input name, image size) of the engine's ONNX, read from its graph (no weights loaded)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inp = graph.input[0]
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[2] <= 0 or dims[2] != dims[3]:
        raise UsageError(f"{onnx_path.name}: expected a static square NCHW image input, got dims {dims}; re-export it")
    return inp.name, int(dims[2])


def _log_tail(text: str, lines: int = 4) -> str:
    keep = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in keep if ln.startswith(("[E]", "ERROR", "build_engine.sh:")) or "Error" in ln]
    return " | ".join((errors or keep)[-lines:])[:600]


def _device_facts(fp: dict[str, Any], uri: str) -> dict[str, Any]:
    gpu = device_gpu(fp)
    return {"device": uri, "gpu": gpu["name"], "compute_capability": gpu["compute_capability"],
            "device_tensorrt": device_tensorrt(fp), "jetson": fp.get("jetson"),
            "fingerprint": {k: fp.get(k) for k in FINGERPRINT_KEYS}}


def build_engine_on_device(folder: Path, device: ShellDevice, *, precision: str | None = None,
                           batch_range: tuple[int, int, int] = (1, 8, 32), val: Path | None = None,
                           limit: int | None = None, trtexec: str | None = None,
                           timeout: float = 3600.0) -> dict[str, Any]:
    """Build, bring back, verify (with ``val``) and record an engine built on ``device``; see the module doc."""
    folder = Path(folder)
    report, precision, onnx_path = resolve_engine_input(folder, precision)
    input_name, img_size = _onnx_io(onnx_path)
    script = build_script({precision: onnx_path.name}, precision, img_size, batch_range, input_name=input_name)
    fp = device.fingerprint()
    remote_onnx = device.push(onnx_path)
    with tempfile.TemporaryDirectory(prefix="castling-engine-") as tmp_name, device.temp_dir() as rtmp:
        tmp = Path(tmp_name)
        (tmp / "build_engine.sh").write_text(script)
        device.put(tmp / "build_engine.sh", f"{rtmp}/build_engine.sh")
        cache = folder / "timing.cache"
        if cache.is_file():
            device.put(cache, f"{rtmp}/timing.cache")
        env = f"PRECISION={q(precision)}" + (f" TRTEXEC={q(trtexec)}" if trtexec else "")
        log.info("%s: building the %s engine from %s with the device's trtexec", device.uri, precision,
                 onnx_path.name)
        t0 = time.perf_counter()
        res = device.sh(f"cd {q(rtmp)} && ln -s {q(remote_onnx)} {q(onnx_path.name)} && "
                        f"{env} sh ./build_engine.sh > build.log 2>&1", timeout=timeout)
        seconds = time.perf_counter() - t0
        build_log = device.sh(f"cat {q(rtmp + '/build.log')}", timeout=120, limit=MAX_LOG_BYTES).stdout.decode(
            "utf-8", "replace")
        if res.rc == 4:
            raise DeviceToolMissing(device.uri, f"no usable trtexec on the device ({_log_tail(build_log, 1)})",
                                    "install TensorRT there (JetPack ships /usr/src/tensorrt/bin/trtexec) or pass "
                                    "--trtexec PATH")
        if res.rc != 0:
            raise DeviceError(device.uri, f"the engine build failed (exit {res.rc}): {_log_tail(build_log)}",
                              "nothing was written into the export; fix the cause above and rerun")
        for name, lim in ((ENGINE_NAME, MAX_ENGINE_BYTES), (ENGINE_NAME + ".json", 2**20)):
            device.fetch(f"{rtmp}/{name}", tmp / name, limit=lim)
        if device.sh(f"[ -f {q(rtmp + '/timing.cache')} ]", timeout=60).rc == 0:
            device.fetch(f"{rtmp}/timing.cache", tmp / "timing.cache", limit=MAX_CACHE_BYTES)
        try:
            built = json.loads((tmp / (ENGINE_NAME + ".json")).read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DeviceError(device.uri, "build_engine.sh wrote unreadable engine metadata", "rerun") from exc
        if not isinstance(built, dict) or version_key(built.get("tensorrt")) is None:
            raise DeviceError(device.uri, "build_engine.sh wrote engine metadata without a TensorRT version", "rerun")
        engine = tmp / ENGINE_NAME
        meta = {**{k: built.get(k) for k in ("tensorrt", "typing", "precision", "onnx", "built_by")},
                **_device_facts(fp, device.uri), "batch_range": list(batch_range),
                "input": {"name": input_name, "shape": [-1, 3, img_size, img_size]}, "engine": ENGINE_NAME,
                "engine_bytes": engine.stat().st_size, "build_seconds": round(seconds, 3),
                "timing_cache": "timing.cache" if (tmp / "timing.cache").is_file() else None,
                "timing_cache_reused": cache.is_file(), "build_log": "build.log"}
        (tmp / (ENGINE_NAME + ".json")).write_text(json.dumps(meta, indent=2))
        (tmp / "build.log").write_text(build_log)
        runtime = f"TensorRT {meta['tensorrt']} ({meta['typing']} typing) on {meta['gpu'] or device.uri}"
        record = ArtifactRecord(ENGINE_NAME, precision, runtime, sha256=file_sha256(engine),
                                bytes=engine.stat().st_size)
        result: dict[str, Any] = {"engine": meta, **verify_engine(
            report, folder, precision, f"TensorRT on {device.uri}", record,
            lambda x: logits_on_device(device, engine, x), val, limit)}
        # Only now, built and (with --val) verified, does anything enter the export folder.
        for name in (ENGINE_NAME, ENGINE_NAME + ".json", "timing.cache", "build.log"):
            if (tmp / name).is_file():
                atomic_write_bytes(folder / name, (tmp / name).read_bytes())
    report.set_artifact(record)
    report.target_info["engine"] = meta
    report.save(folder / "report.json")
    result["status"] = report.status
    return result
