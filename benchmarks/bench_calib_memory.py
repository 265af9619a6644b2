"""Peak memory of INT8 calibration + quantization vs the number of calibration images (castling_deit_tiny @ 224).

Each size runs in a fresh subprocess (fresh calibration cache) that builds its images, calls ``quantize_onnx`` with
the default ONNX recipe (percentile 99.99) and reports its own peak RSS (``getrusage`` ru_maxrss). Images are
image-like random inputs (N(0,1) on 28x28, bicubic to 224, unit std). "stream" is the shipped calibrator
(``quantize/stream_calib.py``); "ORT in-memory" is ONNX Runtime's own calibrator (what shipped before), run only at
small sizes because it holds every batch's activations (~38 MB per image on this model).

    .venv/bin/python benchmarks/bench_calib_memory.py [--sizes 128 512 2048] [--legacy-sizes 32 64]
Writes benchmarks/results/calib_memory.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np, torch
import torch.nn.functional as F
from castling_deploy.quantize import CalibrationSet, QuantRecipe, quantize_onnx
import castling_deploy.quantize.ort_int8 as qi

fp32, n, mode, work = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
if mode == "legacy":
    qi._calibrate = qi._calibrate_in_memory
rng = np.random.default_rng(1)
imgs = np.empty((n, 3, 224, 224), np.float32)
for i in range(0, n, 64):
    small = torch.from_numpy(rng.standard_normal((min(64, n - i), 3, 28, 28)).astype(np.float32))
    up = F.interpolate(small, size=224, mode="bicubic", align_corners=False)
    imgs[i : i + len(up)] = (up / up.std(dim=(1, 2, 3), keepdim=True)).numpy()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
rep = quantize_onnx(fp32, work / "int8.onnx", CalibrationSet(imgs, f"imglike-{n}", f"image-like x{n}"),
                    QuantRecipe(calib_size=n), cache_dir=work / "cache")
ranges = json.loads(Path(rep["calibration"]["cache_file"]).read_text())["data"]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"images": n, "mode": mode, "peak_rss_mb": peak / 1024, "rss_before_quantize_mb": base / 1024,
                  "image_array_mb": imgs.nbytes / 2**20, "seconds": time.perf_counter() - t0,
                  "tensors": len(ranges)}))
"""


def run_one(fp32: Path, n: int, mode: str, tmp: Path) -> dict:
    work = tmp / f"{mode}-{n}"
    work.mkdir()
    out = subprocess.run([sys.executable, "-c", CHILD, str(fp32), str(n), mode, str(work)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def isa() -> str:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return " ".join(have) or platform.machine()


def main() -> None:
    import torch

    from castling_deploy.models import create_model
    from castling_deploy.targets.onnx.convert import export_onnx

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--legacy-sizes", type=int, nargs="*", default=[32, 64])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "calib_memory.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model = create_model("castling_deit_tiny", form="deploy").eval()
    rows = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        fp32 = tmp / "fp32.onnx"
        export_onnx(model, fp32, 224)
        for mode, sizes in (("legacy", args.legacy_sizes), ("stream", args.sizes)):
            for n in sizes:
                rows.append(run_one(fp32, n, mode, tmp))
                print(json.dumps(rows[-1]), file=sys.stderr)
    result = {"model": "castling_deit_tiny", "img_size": 224, "recipe": "onnx default (percentile 99.99, batch 8)",
              "isa": isa(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"castling_deit_tiny @ 224, INT8 calibration + quantize_onnx, peak RSS per fresh process ({result['isa']})\n")
    print("| calibrator | images | peak RSS MB | of which images MB | seconds |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        name = "stream (ours)" if r["mode"] == "stream" else "ORT in-memory (before)"
        print(f"| {name} | {r['images']} | {r['peak_rss_mb']:.0f} | {r['image_array_mb']:.0f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
