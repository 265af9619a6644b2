"""What a device run happened on: host, OS/kernel, arch, CPU, memory, clocks, Jetson facts, runtime versions.

SELF-CONTAINED: this file's text is sent to the device python over stdin (``python3 - < script``), so it may
import only the standard library and must run on old device pythons (JetPack 4 ships 3.6: no annotations
evaluated at runtime, no walrus, no ``from __future__``). Every probe is best effort: a missing file or tool
gives None, never an error, because a fingerprint must not be the reason a benchmark fails.
"""
import glob
import os
import platform
import re
import socket
import subprocess

RUNTIME_MODULES = (
    ("onnxruntime", ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino")),
    ("ai_edge_litert", ("ai-edge-litert", "ai-edge-litert-nightly")),
    ("tflite_runtime", ("tflite-runtime",)),
    ("tensorrt", ("tensorrt", "tensorrt-cu12", "tensorrt-cu11")),
    ("coremltools", ("coremltools",)),
    ("numpy", ("numpy",)),
)


def _read(path, limit=65536):
    try:
        with open(path, "rb") as fh:
            return fh.read(limit).decode("utf-8", "replace")
    except OSError:
        return None


def _cmd(argv, timeout=5.0):
    try:
        out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, check=False)
        return out.stdout.decode("utf-8", "replace").strip() if out.returncode == 0 else None
    except Exception:  # missing tool, permission, timeout: all mean "unknown"
        return None


def _cpu_model():
    text = _read("/proc/cpuinfo") or ""
    for key in ("model name", "Hardware", "Model", "cpu model", "Processor"):
        m = re.search(r"^" + key + r"\s*:\s*(.+)$", text, re.MULTILINE)
        if m:
            return m.group(1).strip()
    lscpu = _cmd(["lscpu"])
    if lscpu:
        m = re.search(r"^Model name:\s*(.+)$", lscpu, re.MULTILINE)
        if m:
            return m.group(1).strip()
    if platform.system() == "Darwin":
        return _cmd(["sysctl", "-n", "machdep.cpu.brand_string"])
    return platform.processor() or None


def _cpu_flags():
    text = _read("/proc/cpuinfo") or ""
    m = re.search(r"^(flags|Features)\s*:\s*(.+)$", text, re.MULTILINE)
    flags = set(m.group(2).split()) if m else set()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "neon", "asimd",
              "asimddp", "i8mm", "sve", "fphp", "asimdhp")
    return sorted(f for f in wanted if f in flags)


def _memory_mb():
    text = _read("/proc/meminfo")
    if text:
        m = re.search(r"^MemTotal:\s*(\d+)\s*kB", text, re.MULTILINE)
        if m:
            return round(int(m.group(1)) / 1024.0, 1)
    if platform.system() == "Darwin":
        size = _cmd(["sysctl", "-n", "hw.memsize"])
        if size and size.isdigit():
            return round(int(size) / 2.0 ** 20, 1)
    return None


def _os_release():
    text = _read("/etc/os-release") or ""
    m = re.search(r'^PRETTY_NAME="?([^"\n]+)"?', text, re.MULTILINE)
    if m:
        return m.group(1)
    if platform.system() == "Darwin":
        return "macOS " + platform.mac_ver()[0]
    return None


def _clocks():
    """Governor and whether min == max frequency on cpu0 (pinned clocks make latency repeatable)."""
    base = "/sys/devices/system/cpu/cpu0/cpufreq/"
    gov, lo, hi = (_read(base + n) for n in ("scaling_governor", "scaling_min_freq", "scaling_max_freq"))
    pinned = None
    if lo and hi and lo.strip().isdigit() and hi.strip().isdigit():
        pinned = lo.strip() == hi.strip()
    return {"cpu_governor": gov.strip() if gov else None, "cpu_clocks_pinned": pinned,
            "cpu_max_khz": int(hi.strip()) if hi and hi.strip().isdigit() else None}


# Jetson SoC (device-tree "compatible") -> the GPU's compute capability: what a TensorRT engine is compiled for.
JETSON_SM = (("tegra234", "8.7"), ("tegra194", "7.2"), ("tegra186", "6.2"), ("tegra210", "5.3"))


def _gpu():
    """First NVIDIA GPU per nvidia-smi: name, compute capability, driver, memory; None without nvidia-smi.
    (Older drivers lack the compute_cap field: asked again without it.)"""
    fields = "name,compute_cap,driver_version,memory.total"
    out = _cmd(["nvidia-smi", "--query-gpu=" + fields, "--format=csv,noheader,nounits"])
    if out is None:
        fields = "name,driver_version,memory.total"
        out = _cmd(["nvidia-smi", "--query-gpu=" + fields, "--format=csv,noheader,nounits"])
    if not out:
        return None
    values = [v.strip() for v in out.splitlines()[0].split(",")]
    info = dict(zip(fields.split(","), values))
    cc = info.get("compute_cap")
    mem = info.get("memory.total", "")
    return {"name": info.get("name") or None,
            "compute_capability": cc if cc and re.match(r"^\d+\.\d+$", cc) else None,
            "driver": info.get("driver_version") or None,
            "memory_mb": int(mem) if mem.isdigit() else None}


def _jetson(root="/"):
    """L4T release, CUDA, TensorRT (deb), power mode and GPU clock pinning; None off Jetson. ``root`` lets
    tests point the file probes at a fake tree."""
    rel = _read(root + "etc/nv_tegra_release")
    if rel is None:
        return None
    info = {"l4t_release_raw": rel.splitlines()[0].strip() if rel.strip() else None, "l4t": None, "cuda": None}
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", rel)
    if m:
        info["l4t"] = m.group(1) + "." + m.group(2).rstrip(".")
    cuda = _read(root + "usr/local/cuda/version.json")
    if cuda:
        m = re.search(r'"cuda"\s*:\s*\{[^}]*"version"\s*:\s*"([^"]+)"', cuda)
        info["cuda"] = m.group(1) if m else None
    if info["cuda"] is None:
        txt = _read(root + "usr/local/cuda/version.txt") or _cmd([root + "usr/local/cuda/bin/nvcc", "--version"]) or ""
        m = re.search(r"(?:CUDA Version|release)\s*([\d.]+)", txt)
        info["cuda"] = m.group(1).rstrip(".,") if m else None
    info["tensorrt_deb"] = _cmd(["dpkg-query", "-W", "-f=${Version}", "tensorrt"]) or \
        _cmd(["dpkg-query", "-W", "-f=${Version}", "libnvinfer-bin"])
    q = _cmd(["nvpmodel", "-q"])
    m = re.search(r"NV Power Mode:\s*(\S+)", q or "")
    info["power_mode"] = m.group(1) if m else None
    info["power_mode_id"] = q.splitlines()[-1].strip() if q and q.splitlines()[-1].strip().isdigit() else None
    model = _read(root + "proc/device-tree/model")
    info["model"] = model.strip("\x00\n ") if model else None
    compatible = _read(root + "proc/device-tree/compatible") or ""
    info["compute_capability"] = next((cc for soc, cc in JETSON_SM if soc in compatible), None)
    info["gpu_clocks_pinned"] = None  # jetson_clocks sets the GPU devfreq min to its max
    for dev in sorted(glob.glob(root + "sys/class/devfreq/*")):
        if re.search(r"gpu|gv11b|ga10b|gp10b|gm20b", os.path.basename(dev)):
            lo, hi = _read(dev + "/min_freq"), _read(dev + "/max_freq")
            if lo and hi:
                info["gpu_clocks_pinned"] = lo.strip() == hi.strip()
                break
    return info


def _module_version(module, dists):
    try:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        from importlib import metadata  # python >= 3.8

        for dist in dists:
            try:
                return metadata.version(dist)
            except Exception:
                continue
    except ImportError:
        pass
    try:  # system packages (JetPack's tensorrt) carry no pip metadata: ask the module itself
        mod = __import__(module)
        return str(getattr(mod, "__version__", "unknown"))
    except Exception as exc:  # importable spec but broken install: say so
        return "broken: " + type(exc).__name__


def collect_fingerprint():
    """The fingerprint dict (JSON-serializable). Keys are stable; unknown values are None."""
    import sys

    uname = platform.uname()
    fp = {
        "hostname": socket.gethostname(),
        "os": uname.system,
        "os_release": _os_release(),
        "kernel": uname.release,
        "arch": uname.machine,
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_flags": _cpu_flags(),
        "memory_mb": _memory_mb(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "runtimes": {m: _module_version(m, d) for m, d in RUNTIME_MODULES},
    }
    fp.update(_clocks())
    fp["gpu"] = _gpu()
    fp["jetson"] = _jetson()
    return fp

