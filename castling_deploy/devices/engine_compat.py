"""Whether a TensorRT engine can run on a device, decided before anything is pushed or loaded.

A serialized engine is tied to the TensorRT version that built it (another version refuses to deserialize it)
and to the GPU's compute capability (kernels are compiled for one SM; we never build with hardware- or
version-compatibility). A different GPU model of the same compute capability loads with a TensorRT warning and
may run slower, so it is reported, not refused. The engine's metadata (``model.engine.json`` beside it, else
``target_info.engine`` in the report.json beside it) records what built it; the device's fingerprint says what
it has. Either side unknown means "cannot tell": the runtime on the device then has the last word.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .errors import DeviceUsageError

MAX_META_BYTES = 1 << 20
ENGINE_SUFFIXES = (".engine", ".plan")


def version_key(version: Any) -> tuple[int, int, int] | None:
    """(major, minor, patch) of '10.3.0', '10.3.0.30-1+cuda12.5' (a deb version), 'v100300'; None if unreadable."""
    text = str(version or "").strip()
    m = re.fullmatch(r"v?(\d{4,6})", text)  # trtexec's banner form: v100300 = 10.3.0
    if m:
        v = int(m.group(1))
        return (v // 10000, v // 100 % 100, v % 100) if v >= 100000 else (v // 1000, v // 100 % 10, v % 100)
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def device_tensorrt(fp: dict[str, Any]) -> str | None:
    """The device's TensorRT: its Python package, else JetPack's deb (trtexec-only installs)."""
    py = (fp.get("runtimes") or {}).get("tensorrt")
    if py and not str(py).startswith("broken"):
        return str(py)
    deb = (fp.get("jetson") or {}).get("tensorrt_deb") or (fp.get("gpu") or {}).get("tensorrt_deb")
    return str(deb) if deb else None


def device_gpu(fp: dict[str, Any]) -> dict[str, Any]:
    """{"name", "compute_capability"} of the device's first GPU (nvidia-smi, else the Jetson SoC); values None
    when unknown."""
    gpu = dict(fp.get("gpu") or {})
    jetson = fp.get("jetson") or {}
    return {"name": gpu.get("name") or jetson.get("model"),
            "compute_capability": gpu.get("compute_capability") or jetson.get("compute_capability")}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", name.lower()).strip()


def engine_mismatch(meta: dict[str, Any], fp: dict[str, Any], where: str = "the device") -> tuple[list[str], list[str]]:
    """(problems that stop the engine loading, differences worth a warning) between an engine's metadata and a
    device fingerprint; ``where`` names the machine in the messages."""
    problems: list[str] = []
    notes: list[str] = []
    built, have = meta.get("tensorrt"), device_tensorrt(fp)
    if version_key(built) and version_key(have) and version_key(built) != version_key(have):
        problems.append(f"it was built with TensorRT {built} and {where} has TensorRT {have}")
    gpu = device_gpu(fp)
    built_cc, have_cc = meta.get("compute_capability"), gpu["compute_capability"]
    if built_cc and have_cc and str(built_cc) != str(have_cc):
        problems.append(f"it was built for compute capability {built_cc} ({meta.get('gpu') or 'unknown GPU'}) and "
                        f"{where}'s GPU is {have_cc} ({gpu['name'] or 'unknown'})")
    built_gpu, have_gpu = meta.get("gpu"), gpu["name"]
    if not problems and built_gpu and have_gpu:
        a, b = _norm(str(built_gpu)), _norm(str(have_gpu))
        if a not in b and b not in a:  # torch says "Orin", the device tree "NVIDIA Jetson AGX Orin ...": same GPU
            (notes if built_cc and have_cc else problems).append(
                f"it was built on a {built_gpu} and {where} has a {have_gpu}")
    return problems, notes


def read_engine_metadata(engine: Path) -> dict[str, Any] | None:
    """The metadata recorded for ``engine``: ``<engine>.json`` beside it, else the report.json beside it."""
    engine = Path(engine)
    for path, pick in ((engine.with_name(engine.name + ".json"), lambda d: d),
                       (engine.with_name("report.json"), lambda d: (d.get("target_info") or {}).get("engine"))):
        try:
            if not path.is_file() or path.stat().st_size > MAX_META_BYTES:
                continue
            doc = pick(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(doc, dict):
            return doc
    return None


def check_engine_runs_on(engine: Path, fp: dict[str, Any], uri: str, *, export_dir: str = "EXPORT_DIR") -> list[str]:
    """Refuse (exit 2) an engine whose recorded TensorRT version or GPU does not match the device; return the
    warnings (same compute capability, another GPU model). Engines without metadata pass: the runtime decides."""
    meta = read_engine_metadata(engine)
    if meta is None:
        return []
    problems, notes = engine_mismatch(meta, fp)
    if problems:
        raise DeviceUsageError(uri, f"{Path(engine).name} cannot run there: " + "; ".join(problems),
                               f"rebuild it on that device: castling-deploy build-engine {export_dir} --device {uri}")
    return notes


def local_gpu() -> tuple[str, str | None]:
    """(name, compute capability "major.minor") of this machine's CUDA device 0 ("unknown", None without one):
    what an engine built here is compiled for, and what an engine run here must have been built for."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return torch.cuda.get_device_name(0), f"{major}.{minor}"
    except Exception:  # torch without CUDA, or no driver
        pass
    try:
        from cuda import cudart  # cuda-python

        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            return props.name.decode(errors="replace").rstrip("\x00"), f"{props.major}.{props.minor}"
    except Exception:
        pass
    return "unknown", None


def local_tensorrt() -> str | None:
    """This machine's TensorRT Python package version, found as a device fingerprint finds it (pip metadata, else
    the module itself: JetPack's deb install has no metadata); None without one."""
    from .fingerprint import RUNTIME_MODULES, _module_version

    return _module_version("tensorrt", dict(RUNTIME_MODULES)["tensorrt"])


class EngineMismatchError(UsageError):
    """An engine built with another TensorRT version or for another GPU than this machine's (exit 2)."""


def check_engine_runs_here(engine: Path, *, export_dir: str = "EXPORT_DIR") -> list[str]:
    """``check_engine_runs_on`` for this machine (local ``profile`` / ``verify``): refuse (exit 2) an engine built
    with another TensorRT version or for another compute capability before TensorRT is asked to load it."""
    engine = Path(engine)
    meta = read_engine_metadata(engine) if engine.suffix in ENGINE_SUFFIXES else None
    if meta is None:
        return []  # not an engine, or nothing recorded to compare: the runtime decides
    name, cc = local_gpu()
    fp = {"runtimes": {"tensorrt": local_tensorrt()},
          "gpu": {"name": None if name == "unknown" else name, "compute_capability": cc}}
    problems, notes = engine_mismatch(meta, fp, "this machine")
    if problems:
        raise EngineMismatchError(f"{engine.name} cannot run here: " + "; ".join(problems)
                                  + f"; rebuild it here: castling-deploy build-engine {export_dir}")
    return notes
