"""FP32 vs INT8 QDQ on ONNX Runtime CPU, 1 thread, batch 1: latency, fidelity and per-op time for castling_deit_tiny.

Random weights (seed 0), image-like random inputs: this measures the quantizer and the runtime, not accuracy.
All rows' latencies are measured interleaved in one loop (noisy shared hosts: ratios, medians). Rows: FP32 as
exported; FP32 through ORT's transformer optimizer ("ORT-fused"); our recipes (ORT with 7-bit weights: the former
default, which --weight-bits 7 now applies to the fused graph; 8-bit weights; TensorRT: 8-bit weights as Q->DQ
pairs), also on the ORT-fused float graph (8-bit weights on it: what export --target onnx --int8 ships); and the
peer, ONNX Runtime's own ``quantize_static`` on every op (its defaults, and per-channel), calibrated on the same
images.

    .venv/bin/python benchmarks/bench_int8.py [--runs 60] [--calib 64] [--eval 64]
Writes benchmarks/results/int8.json (rows + per-op tables) and prints the markdown tables.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from castling_deploy.models import create_model
from castling_deploy.quantize import CalibrationSet, QuantRecipe, onnx_census, quantize_onnx
from castling_deploy.quantize.calibration import CalibrationReader
from castling_deploy.quantize.op_profile import format_op_table, op_time_table
from castling_deploy.quantize.optimize import ort_fuse
from castling_deploy.quantize.sensitivity import logit_metrics
from castling_deploy.runtime.base import run_batched
from castling_deploy.runtime.ort import OrtRunner
from castling_deploy.targets.onnx.convert import export_onnx
from castling_deploy.targets.onnx.target import cpu_isa


def fidelity(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """logit_metrics plus the cosine of all logits taken as one vector (the per-sample minimum is the strict one)."""
    a, b = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    return {**logit_metrics(ref, out), "cosine_all": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))}


def image_like(n: int, size: int, seed: int) -> np.ndarray:
    import torch.nn.functional as F

    small = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3, 28, 28)).astype(np.float32))
    up = F.interpolate(small, size=size, mode="bicubic", align_corners=False)
    return (up / up.std(dim=(1, 2, 3), keepdim=True)).numpy()


def peer(fp32: Path, out: Path, calib: CalibrationSet, per_channel: bool) -> Path:
    """What a user does without us: quantize_static on every op, its defaults (QDQ, MinMax, s8 weights)."""
    from onnxruntime.quantization import quantize_static

    quantize_static(str(fp32), str(out), CalibrationReader(calib, batch=8), per_channel=per_channel)
    return out


def build_variants(model: torch.nn.Module, size: int, calib: CalibrationSet, tmp: Path) -> dict[str, Path]:
    fp32, fused = tmp / "fp32.onnx", tmp / "fp32.fused.onnx"
    export_onnx(model, fp32, size)
    ort_fuse(fp32, fused)
    cache = tmp / "cache"
    v = {"FP32": fp32, "FP32, ORT-fused": fused}
    recipes = {
        "INT8 ours, ORT recipe (7-bit w)": (fp32, QuantRecipe.for_target("onnx", reduce_range=True)),
        "INT8 ours, ORT recipe, 8-bit w": (fp32, QuantRecipe.for_target("onnx", reduce_range=False)),
        "INT8 ours, TensorRT recipe (8-bit w)": (fp32, QuantRecipe.for_target("tensorrt")),
        "INT8 ours, 8-bit w, on ORT-fused": (fused, QuantRecipe.for_target("onnx", reduce_range=False)),
    }
    for i, (name, (src, recipe)) in enumerate(recipes.items()):
        quantize_onnx(src, tmp / f"q{i}.onnx", calib, recipe, cache_dir=cache)
        v[name] = tmp / f"q{i}.onnx"
    v["ORT quantize_static (defaults)"] = peer(fp32, tmp / "peer.onnx", calib, per_channel=False)
    v["ORT quantize_static (per-channel)"] = peer(fp32, tmp / "peer_pc.onnx", calib, per_channel=True)
    return v


def main() -> None:
    from castling_deploy.profiling.timer import time_interleaved

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="castling_deit_tiny")
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "int8.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.manual_seed(0)
    model = create_model(args.model, form="deploy").eval()
    size = model.cfg.img_size
    calib = CalibrationSet(image_like(args.calib, size, 1), "bench-imglike-1", f"image-like x{args.calib}")
    images = image_like(args.eval, size, 2)
    with torch.no_grad():
        ref = torch.cat([model(torch.from_numpy(images[i : i + 16])) for i in range(0, len(images), 16)]).numpy()
    with tempfile.TemporaryDirectory() as t:
        variants = build_variants(model, size, calib, Path(t))
        runners = {k: OrtRunner(p, threads=1) for k, p in variants.items()}
        x1 = images[:1]
        # rounds=runs: one call of each variant per round, so load drift on a shared host hits every row alike
        times = time_interleaved([(lambda r=r: r.run(x1)) for r in runners.values()], args.runs, args.warmup,
                                 rounds=args.runs)
        rows = []
        for (name, path), ts in zip(variants.items(), times):
            census = onnx_census(path) if "INT8" in name or "quantize_static" in name else None
            rows.append({"variant": name, "p50_ms": float(np.median(ts)), "p90_ms": float(np.percentile(ts, 90)),
                         **fidelity(ref, run_batched(runners[name], images, 16)),
                         "int8_mac_fraction": census["int8_mac_fraction"] if census else 0.0,
                         "bytes": path.stat().st_size, "per_op": op_time_table(path, runs=20, warmup=3)})
    import onnxruntime

    result = {"model": args.model, "img_size": size, "threads": 1, "batch": 1, "runs": args.runs,
              "calib_images": args.calib, "eval_images": args.eval, "onnxruntime": onnxruntime.__version__,
              "machine": platform.processor() or platform.machine(), "isa": cpu_isa(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print_tables(result)


def print_tables(result: dict) -> None:
    rows = result["rows"]
    print(f"{result['model']} @ {result['img_size']}, ONNX Runtime {result['onnxruntime']} CPU ({result['isa']}), "
          f"1 thread, batch 1, {result['runs']} interleaved runs; fidelity on {result['eval_images']} image-like "
          "inputs vs torch float\n")
    print("| variant | p50 ms | speedup vs FP32 | cosine min | cosine all | SQNR dB | top-1 agree | int8 MACs | "
          "GEMM share of op time | MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = rows[0]["p50_ms"]
    for r in rows:
        print(f"| {r['variant']} | {r['p50_ms']:.2f} | {base / r['p50_ms']:.2f}x | {r['cosine_min']:.5f} | "
              f"{r['cosine_all']:.5f} | {r['sqnr_db']:.2f} | {r['top1_agreement']:.3f} | "
              f"{100 * r['int8_mac_fraction']:.1f}% | {100 * r['per_op']['gemm_fraction']:.0f}% | "
              f"{r['bytes'] / 1e6:.2f} |")
    for r in rows:
        print(f"\nPer-op time, {r['variant']} (ORT profiler, kernel time per run):\n")
        print(format_op_table(r["per_op"], 10))


if __name__ == "__main__":
    main()
