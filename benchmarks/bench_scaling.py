"""Scaling benchmark: folded Castling-DeiT-T vs its softmax baseline at growing resolutions.

Exports each model at each size to ONNX, times it on ONNX Runtime (CPU, 1 thread by default), counts MACs,
and reports the latency/MAC ratio of the largest to the smallest size. Linear-angular attention is O(N·d²), so
its ratio should stay close to the token ratio while softmax (O(N²·d)) grows faster.

    .venv/bin/python benchmarks/bench_scaling.py                  # 224/384/512, 20 runs, 1 thread
    .venv/bin/python benchmarks/bench_scaling.py --sizes 224 448 --runs 50 --threads 2

Writes benchmarks/results/scaling.json, scaling.md and scaling.png (the PNG is git-ignored).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from castling_deploy.models import create_model  # noqa: E402
from castling_deploy.profiling import format_sweep_table, profile_sweep  # noqa: E402


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="castling_deit_tiny")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 384, 512])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-baseline", action="store_true", help="skip the softmax baseline")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    def castling(size: int):
        return create_model(args.arch, form="deploy", img_size=size)

    def softmax(size: int):
        return create_model(args.arch, attention="softmax", img_size=size)

    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="castling-bench-scaling-") as tmp:
        result = profile_sweep(
            castling,
            args.sizes,
            baseline=None if args.no_baseline else softmax,
            runs=args.runs,
            warmup=args.warmup,
            threads=args.threads,
            workdir=Path(tmp),
            chart_path=args.out / "scaling.png",
        )
    for rows in result["series"].values():
        for r in rows:
            r.pop("onnx", None)  # temporary path, gone now
    import onnxruntime
    import torch

    result["arch"] = args.arch
    result["environment"] = {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    table = format_sweep_table(result)
    _write_atomic(args.out / "scaling.json", json.dumps(result, indent=2) + "\n")
    env = result["environment"]
    _write_atomic(
        args.out / "scaling.md",
        f"# Scaling: {args.arch} (Castling, folded) vs softmax baseline\n\n{table}\n\n"
        f"Host: {env['processor']}, {env['cpu_count']} CPUs, torch {env['torch']}, "
        f"onnxruntime {env['onnxruntime']}; random weights (latency does not depend on them).\n",
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
