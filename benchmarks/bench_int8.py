"""FP32 vs INT8 QDQ on ONNX Runtime CPU, 1 thread: latency and logit fidelity for castling_deit_tiny @ 224.

Random weights (seed 0) and random N(0,1) images: this measures the quantizer and the runtime, not ImageNet
accuracy. Variants: the default ORT recipe (7-bit weights), the same without the two linear-attention matmuls,
and the TensorRT recipe (8-bit weights) run on this CPU (which saturates without VNNI; see recipe.py).

    .venv/bin/python benchmarks/bench_int8.py [--model castling_deit_tiny] [--runs 30]
Writes benchmarks/results/int8.json and prints a markdown table.
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

from castling_deploy.targets.onnx.convert import export_onnx
from castling_deploy.models import create_model
from castling_deploy.quantize import CalibrationSet, QuantRecipe, onnx_census, quantize_onnx
from castling_deploy.quantize.recipe import DEFAULT_INT8_KINDS
from castling_deploy.quantize.sensitivity import logit_metrics
from castling_deploy.runtime.base import run_batched
from castling_deploy.runtime.ort import OrtRunner


def latency_ms(runner: OrtRunner, x: np.ndarray, runs: int, warmup: int) -> dict[str, float]:
    from castling_deploy.profiling.timer import time_interleaved

    (times,) = time_interleaved([lambda: runner.run(x)], runs, warmup)
    return {"p50_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)), "min_ms": float(min(times))}


def fidelity(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """logit_metrics plus the cosine of all logits taken as one vector (the per-sample minimum is the strict one)."""
    a, b = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    return {**logit_metrics(ref, out), "cosine_all": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="castling_deit_tiny")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "int8.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    torch.manual_seed(0)
    model = create_model(args.model, form="deploy").eval()
    size = model.cfg.img_size
    rng = np.random.default_rng(0)
    calib = CalibrationSet(rng.standard_normal((args.calib, 3, size, size)).astype(np.float32), "bench-random-0",
                           f"N(0,1) x{args.calib}")
    images = rng.standard_normal((args.eval, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = torch.cat([model(torch.from_numpy(images[i : i + 16])) for i in range(0, len(images), 16)]).numpy()

    no_attn = tuple(k for k in DEFAULT_INT8_KINDS if not k.startswith("attn_"))
    variants = {
        "INT8 QDQ (default: 7-bit w, percentile 99.99)": QuantRecipe(),
        "INT8 QDQ (previous default: minmax)": QuantRecipe(calibration="minmax"),
        "INT8 QDQ (mse calibration)": QuantRecipe(calibration="mse"),
        "INT8 QDQ (attn matmuls float)": QuantRecipe(int8_kinds=no_attn),
        "INT8 QDQ (TensorRT recipe: 8-bit w) on CPU": QuantRecipe.for_target("tensorrt"),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_onnx(model, fp32, size)
        x1 = images[:1]
        r = OrtRunner(fp32, threads=1)
        rows.append({"variant": "FP32", **latency_ms(r, x1, args.runs, args.warmup),
                     **fidelity(ref, run_batched(r, images, 16)), "int8_mac_fraction": 0.0,
                     "bytes": fp32.stat().st_size})
        for name, recipe in variants.items():
            out = Path(tmp) / "int8.onnx"
            rep = quantize_onnx(fp32, out, calib, recipe, cache_dir=Path(tmp) / "cache")
            r = OrtRunner(out, threads=1)
            rows.append({"variant": name, **latency_ms(r, x1, args.runs, args.warmup),
                         **fidelity(ref, run_batched(r, images, 16)),
                         "int8_mac_fraction": onnx_census(out)["int8_mac_fraction"], "bytes": out.stat().st_size,
                         "quantize_seconds": rep["seconds"], "recipe": recipe.to_dict()})

    import onnxruntime

    result = {
        "model": args.model, "img_size": size, "threads": 1, "batch": 1, "runs": args.runs,
        "calib_images": args.calib, "eval_images": args.eval, "onnxruntime": onnxruntime.__version__,
        "machine": platform.processor() or platform.machine(), "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{args.model} @ {size}, ONNX Runtime {onnxruntime.__version__} CPU, 1 thread, batch 1, "
          f"{args.runs} runs; fidelity on {args.eval} random inputs vs torch float\n")
    print("| variant | p50 ms | p90 ms | speedup | cosine min | cosine all | SQNR dB | top-1 agree | int8 MACs | MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = rows[0]["p50_ms"]
    for r in rows:
        print(f"| {r['variant']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {base / r['p50_ms']:.2f}x | "
              f"{r['cosine_min']:.5f} | {r['cosine_all']:.5f} | {r['sqnr_db']:.2f} | {r['top1_agreement']:.3f} | "
              f"{100 * r['int8_mac_fraction']:.1f}% | {r['bytes'] / 1e6:.2f} |")


if __name__ == "__main__":
    main()
