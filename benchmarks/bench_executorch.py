"""ExecuTorch .pte (fp32, INT8) vs LiteRT .tflite (fp32, hybrid INT8) on castling_deit_tiny: latency, size,
conversion time, logit fidelity and XNNPACK delegation.

Converts one random-weight deploy-form model with ``castling_deploy.targets.executorch.convert`` (fp32, int8 with
the XNNPACK quantizer) and ``castling_deploy.targets.tflite.convert`` (fp32, int8 hybrid PT2E), plus an ablation:
the ExecuTorch fp32 program lowered with ExecuTorch's default decompositions only (without our XNNPACK rewrites).
Every artifact is timed with its runner at batch 1, in interleaved rounds so a shared machine's noise hits every
variant alike; the ExecuTorch programs are also timed by ExecuTorch's own event tracer (ETDump).

    .venv/bin/python benchmarks/bench_executorch.py                       # deit_tiny@224, 1 thread
    .venv/bin/python benchmarks/bench_executorch.py --arch castling_nano --img-size 32 --threads 1 2

Writes benchmarks/results/executorch.json and executorch.md and prints the markdown table.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from castling_deploy.output import atomic_write_bytes  # noqa: E402
from castling_deploy.quiet import quiet_native_output  # noqa: E402
from castling_deploy.targets.onnx.target import cpu_isa  # noqa: E402

from bench_litert import _image_like  # noqa: E402  (same inputs as the LiteRT rows)

log = logging.getLogger("bench_executorch")
BASELINE = "litert_fp32"
LABELS = {"et_fp32": "ExecuTorch fp32 (XNNPACK)", "et_int8": "ExecuTorch INT8 (XNNPACK quantizer)",
          "et_fp32_default": "ExecuTorch fp32, default decompositions", "litert_fp32": "LiteRT fp32",
          "litert_int8": "LiteRT INT8 (hybrid PT2E)"}


def _fidelity(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    cos = np.sum(ref * out, 1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1), 1e-30)
    return {"cosine_min": round(float(cos.min()), 6), "max_abs_diff": round(float(np.abs(ref - out).max()), 6),
            "top1_agreement": round(float(np.mean(ref.argmax(1) == out.argmax(1))), 4)}


def _convert_all(model: Any, s: int, calib: np.ndarray, tmp: Path) -> dict[str, dict[str, Any]]:
    from castling_deploy.output import atomic_write_bytes as write
    from castling_deploy.targets.executorch.census import pte_census
    from castling_deploy.targets.executorch.convert import convert_executorch, lower_to_pte
    from castling_deploy.targets.tflite.convert import convert_tflite

    arts: dict[str, dict[str, Any]] = {}
    for mode in ("fp32", "int8"):
        for kind in ("et", "litert"):
            name, path = f"{kind}_{mode}", tmp / f"{kind}_{mode}{'.pte' if kind == 'et' else '.tflite'}"
            log.info("converting %s ...", name)
            cal = calib if mode == "int8" else None
            with quiet_native_output(enabled=False):
                info = (convert_executorch(model, path, mode=mode, calib_images=cal, img_size=s) if kind == "et"
                        else convert_tflite(model, path, mode=mode, calib_images=cal, img_size=s))
            arts[name] = {"path": path, "conversion_seconds": info["conversion_seconds"],
                          "file_bytes": path.stat().st_size, "census": info["census"] if kind == "et" else None}
    log.info("converting et_fp32_default (ablation) ...")
    path, t0 = tmp / "et_fp32_default.pte", time.perf_counter()
    write(path, lower_to_pte(model, s, xnnpack_rewrites=False))
    arts["et_fp32_default"] = {"path": path, "conversion_seconds": round(time.perf_counter() - t0, 3),
                               "file_bytes": path.stat().st_size, "census": pte_census(path)}
    return arts


def _time(arts: dict[str, dict[str, Any]], threads: int, x: np.ndarray, held: np.ndarray, ref: np.ndarray,
          args: argparse.Namespace) -> list[dict[str, Any]]:
    from castling_deploy.profiling.timer import time_interleaved
    from castling_deploy.runtime.executorch import ExecuTorchRunner, etdump_profile, set_threads
    from castling_deploy.runtime.litert import LiteRTRunner

    gc.collect()  # ExecuTorch programs loaded under another pool size must be gone before it is resized
    set_threads(threads)
    runners = {n: ExecuTorchRunner(a["path"]) if n.startswith("et") else LiteRTRunner(a["path"], threads=threads)
               for n, a in arts.items()}
    for n, r in runners.items():
        arts[n].setdefault("fidelity", _fidelity(ref, r.run(held)))
    lat = time_interleaved([(lambda r=r: r.run(x)) for r in runners.values()], args.runs, args.warmup, args.rounds)
    rows = [{"variant": n, "threads": threads, "p50_ms": round(float(np.percentile(v, 50)), 3),
             "p90_ms": round(float(np.percentile(v, 90)), 3), "min_ms": round(float(v.min()), 3)}
            for n, v in zip(runners, lat, strict=True)]
    base = next(r["p50_ms"] for r in rows if r["variant"] == BASELINE)
    base_min = next(r["min_ms"] for r in rows if r["variant"] == BASELINE)
    for row in rows:
        row["ratio_vs_litert_fp32"] = round(row["p50_ms"] / base, 3)
        row["min_ratio_vs_litert_fp32"] = round(row["min_ms"] / base_min, 3)
        if row["variant"].startswith("et"):
            prof = etdump_profile(arts[row["variant"]]["path"], runs=args.runs, warmup=args.warmup)
            row["etdump_ms"] = prof["latency_ms"]
            row["etdump_top_ops"] = prof["by_op_kind"][:6]
    del runners
    return rows


def _table(result: dict[str, Any]) -> str:
    arts = result["artifacts"]
    head = ("| variant | threads | p50 ms | min ms | × LiteRT fp32 (p50 / min) | ETDump p50 / min ms | MB | "
            "convert s | cosine min | top-1 agree | XNNPACK calls · portable ops | MACs on XNNPACK · int8 |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["latency"]:
        a, n = arts[row["variant"]], row["variant"]
        c = a.get("census")
        et = f"{row['etdump_ms']['p50']:.2f} / {row['etdump_ms']['min']:.2f}" if "etdump_ms" in row else "–"
        deleg = (f"{sum(c['delegate_calls'].values())} · {sum(c['portable_ops'].values())}" if c else "–")
        macs = (f"{100 * c['delegated_mac_fraction']:.1f}% · {100 * (c['int8_mac_fraction'] or 0):.1f}%"
                if c else "–")
        f = a["fidelity"]
        lines.append(f"| {LABELS[n]} | {row['threads']} | {row['p50_ms']:.2f} | {row['min_ms']:.2f} | "
                     f"{row['ratio_vs_litert_fp32']:.2f}× / {row['min_ratio_vs_litert_fp32']:.2f}× | {et} | "
                     f"{a['file_bytes'] / 1e6:.2f} | {a['conversion_seconds']:.1f} | {f['cosine_min']:.5f} | "
                     f"{f['top1_agreement']:.3f} | {deleg} | {macs} |")
    return "\n".join(lines)


def _markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    v = result["versions"]
    return (f"# ExecuTorch vs LiteRT: {args.arch} @ {args.img_size}\n\n{_table(result)}\n\n"
            f"Batch 1, {args.runs} timed runs after {args.warmup} warmup per (variant, threads), in {args.rounds} "
            "interleaved rounds (Python wall clock around each runner's `run`); × = ratio to LiteRT fp32 at the "
            "same thread count (lower is faster). ETDump = the same program timed by ExecuTorch's own event tracer "
            f"(`Method::execute`, {args.runs} runs). Fidelity: {args.eval} held-out image-like inputs vs the torch "
            f"float model; INT8 calibrated on {args.calib} other image-like inputs. Random weights. The machine is "
            "shared: min is the least disturbed sample, p50 includes other processes' preemption.\n\n"
            f"Host: {result['host']['machine']}, {result['host']['cpus']} CPUs (shared), ISA {result['host']['isa']}; "
            f"torch {v['torch']}, executorch {v['executorch']}, torchao {v['torchao']}, ai-edge-litert "
            f"{v['ai-edge-litert']}, litert-torch {v['litert-torch']}. Wall time {result['wall_seconds']:.0f} s.\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="castling_deit_tiny")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--runs", type=int, default=30, help="timed runs per (variant, threads)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--calib", type=int, default=64, help="seeded image-like calibration inputs")
    ap.add_argument("--eval", type=int, default=32, help="held-out image-like inputs for the logit comparison")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from importlib import metadata as md

    import torch

    from castling_deploy.models import create_model

    t_start = time.perf_counter()
    torch.manual_seed(0)
    model = create_model(args.arch, form="deploy", img_size=args.img_size).eval()
    s = args.img_size
    calib, held = _image_like(args.calib, s, seed=1), _image_like(args.eval, s, seed=2)
    with torch.no_grad():
        ref = torch.cat([model(torch.from_numpy(held[i : i + 8])) for i in range(0, len(held), 8)]).numpy()
    x = held[:1]
    with tempfile.TemporaryDirectory(prefix="castling-bench-executorch-") as tmp:
        arts = _convert_all(model, s, calib, Path(tmp))
        latency = [row for t in args.threads for row in _time(arts, t, x, held, ref, args)]
    for a in arts.values():
        a.pop("path")
    result = {"arch": args.arch, "img_size": s, "artifacts": arts, "latency": latency,
              "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "isa": cpu_isa()},
              "versions": {p: md.version(p) for p in ("torch", "executorch", "torchao", "ai-edge-litert",
                                                       "litert-torch")},
              "wall_seconds": round(time.perf_counter() - t_start, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "executorch.json", (json.dumps(result, indent=2) + "\n").encode())
    text = _markdown(result, args)
    atomic_write_bytes(args.out / "executorch.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
