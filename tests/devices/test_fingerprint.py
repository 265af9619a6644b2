"""Jetson fields of the fingerprint, read from a fake file tree with the real files' formats (no Jetson here:
the file contents are as L4T 35.4.1 / JetPack 5.1.2 writes them)."""
from __future__ import annotations

from pathlib import Path

from castling_deploy.devices.fingerprint import _jetson, collect_fingerprint


def test_not_a_jetson(tmp_path: Path) -> None:
    assert _jetson(str(tmp_path) + "/") is None


def test_jetson_tree(tmp_path: Path) -> None:
    root = tmp_path
    (root / "etc").mkdir()
    (root / "etc/nv_tegra_release").write_text(
        "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023\n")
    (root / "usr/local/cuda").mkdir(parents=True)
    (root / "usr/local/cuda/version.json").write_text(
        '{\n   "cuda" : {\n      "name" : "CUDA SDK",\n      "version" : "11.4.19"\n   },\n   "cuda_cudart" : {}\n}\n')
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/model").write_text("NVIDIA Jetson AGX Orin Developer Kit\x00")
    (root / "proc/device-tree/compatible").write_text("nvidia,p3737-0000+p3701-0000\x00nvidia,p3701-0000\x00"
                                                       "nvidia,tegra234\x00")
    gpu = root / "sys/class/devfreq/17000000.ga10b"
    gpu.mkdir(parents=True)
    (gpu / "min_freq").write_text("1300500000\n")
    (gpu / "max_freq").write_text("1300500000\n")
    info = _jetson(str(root) + "/")
    assert info["l4t"] == "35.4.1" and info["cuda"] == "11.4.19"
    assert info["model"] == "NVIDIA Jetson AGX Orin Developer Kit" and info["gpu_clocks_pinned"] is True
    assert info["power_mode"] is None  # no nvpmodel here: unknown, not an error
    assert info["compute_capability"] == "8.7"  # tegra234 = Orin: what its TensorRT engines are compiled for


def test_fingerprint_keys() -> None:
    fp = collect_fingerprint()
    assert {"hostname", "os", "kernel", "arch", "cpu_model", "cpu_cores", "memory_mb", "python", "runtimes",
            "cpu_clocks_pinned", "gpu", "jetson"} <= set(fp)
    assert set(fp["runtimes"]) == {"onnxruntime", "ai_edge_litert", "tflite_runtime", "tensorrt", "coremltools",
                                   "numpy"}
