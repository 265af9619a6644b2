"""LiteRT modes vs ONNX Runtime FP32: latency, size, conversion time and logit fidelity of castling_deit_tiny.

Converts one random-weight deploy-form model with ``castling_deploy.targets.tflite.convert_tflite`` in the
modes fp32, int8 (hybrid PT2E), full_integer (float32 I/O; class-token path 16x8, the default) and
full_integer --strict-int8 (every activation int8), exports the same model to ONNX as the ORT FP32
baseline, and times every artifact with its runner (LiteRTRunner / OrtRunner) at each thread count, batch 1,
in interleaved rounds so a shared machine's noise hits every variant alike.

    .venv/bin/python benchmarks/bench_litert.py                       # deit_tiny@224, 1 and 2 threads
    .venv/bin/python benchmarks/bench_litert.py --arch castling_nano --img-size 32 --runs 50

Writes benchmarks/results/litert.json and litert.md and prints the markdown table.
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
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from castling_deploy.output import atomic_write_bytes  # noqa: E402
from castling_deploy.quiet import quiet_native_output  # noqa: E402
from castling_deploy.targets.onnx.target import cpu_isa  # noqa: E402

log = logging.getLogger("bench_litert")

MODES = ("fp32", "int8", "full_integer", "full_integer_strict")
# row -> (convert_tflite mode, extra arguments)
CONVERT = {"full_integer_strict": ("full_integer", {"class_token_int16": False})}
PEER = "peer_full_integer"  # LiteRT's quantizer defaults (static_wi8_ai8, its own calibration) on model.tflite
BASELINE = "ort_fp32"


def _image_like(n: int, s: int, seed: int) -> np.ndarray:
    """N(0,1) noise on a 28x28 grid, bicubic to s x s, unit std: smooth like pictures (docs: int8.md)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.randn(n, 3, 28, 28, generator=g), size=(s, s), mode="bicubic", align_corners=False)
    return (x / x.std()).numpy().astype(np.float32)


ANALYSIS_MARKER = "<!-- analysis: kept when the benchmark rewrites the table above -->"


def _kept_analysis(path: Path) -> str:
    """The hand-written analysis below the marker of the previous litert.md (re-runs replace only the table)."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    return "\n" + old[old.index(ANALYSIS_MARKER):] if ANALYSIS_MARKER in old else ""


def quiet_logging() -> None:
    """Our progress on stderr; the converters' own loggers only on errors."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("absl", "tensorflow", "torch", "litert_torch", "ai_edge_quantizer"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def environment(*dists: str) -> dict[str, Any]:
    """The host (ISA included) and the versions of torch and of ``dists``, for the results JSON."""
    import torch

    from castling_deploy.targets.tflite.convert import _version

    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            **{d: _version(d) for d in dists}, "isa": cpu_isa()}


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _fidelity(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Cosine of logits per image (min/mean), max |diff|, SQNR (dB) and top-1 agreement against ``ref``."""
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    sqnr = 10 * np.log10(np.sum(ref**2) / max(float(np.sum((ref - out) ** 2)), 1e-30))
    cos = np.sum(ref * out, 1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1), 1e-30)
    return {
        "cosine_min": round(float(cos.min()), 6),
        "cosine_mean": round(float(cos.mean()), 6),
        "max_abs_diff": round(float(np.abs(ref - out).max()), 6),
        "top1_agreement": round(float(np.mean(ref.argmax(1) == out.argmax(1))), 4),
        "sqnr_db": round(float(sqnr), 2),
    }


def _time_interleaved(
    runners: list[Any], x: np.ndarray, runs: int, warmup: int, rounds: int
) -> list[np.ndarray]:
    """Latency samples (ms) per runner; ``runs`` split over ``rounds`` passes across all runners."""
    from castling_deploy.profiling.timer import time_interleaved

    return time_interleaved([(lambda r=r: r.run(x)) for r in runners], runs, warmup, rounds)


def _table(result: dict[str, Any]) -> str:
    arts = result["artifacts"]
    lines = [
        "| variant | threads | p50 ms | p90 ms | × LiteRT fp32 (p50) | MB | convert s | cosine min | "
        "SQNR dB | top-1 agree | int8 tensors | ops on XNNPACK |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["latency"]:
        a = arts[row["variant"]]
        census = a.get("census") or {}
        int8 = f"{100 * census['int8_tensor_fraction']:.1f}%" if census else "–"
        dele = a.get("delegation")
        facts = f"{dele['ops_on_xnnpack']}/{dele['ops_total']}" if dele else "–"
        f = a["fidelity"]
        lines.append(
            f"| {a['label']} | {row['threads']} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | "
            f"{row['ratio_vs_litert_fp32']:.2f}× | {a['file_bytes'] / 1e6:.2f} | {a['conversion_seconds']:.1f} | "
            f"{f['cosine_min']:.5f} | {f['sqnr_db']:.1f} | {f['top1_agreement']:.3f} | {int8} | {facts} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="castling_deit_tiny")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--runs", type=int, default=30, help="timed runs per (variant, threads)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--calib", type=int, default=64, help="seeded image-like calibration inputs")
    ap.add_argument("--eval", type=int, default=32, help="held-out image-like inputs for the logit comparison")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    quiet_logging()

    import torch

    from castling_deploy.targets.onnx.convert import export_onnx
    from castling_deploy.models import create_model
    from castling_deploy.runtime.litert import LiteRTRunner
    from castling_deploy.runtime.ort import OrtRunner
    from castling_deploy.targets.tflite.census import delegation_split
    from castling_deploy.targets.tflite.convert import _float_io, convert_tflite
    from castling_deploy.targets.tflite.full_integer import quantize_defaults

    t_start = time.perf_counter()
    torch.manual_seed(0)
    model = create_model(args.arch, form="deploy", img_size=args.img_size).eval()
    s = args.img_size
    calib = _image_like(args.calib, s, seed=1)
    held = _image_like(args.eval, s, seed=2)  # another seed: disjoint
    with torch.no_grad():
        ref = torch.cat([model(torch.from_numpy(held[i : i + 8])) for i in range(0, len(held), 8)]).numpy()

    args.out.mkdir(parents=True, exist_ok=True)
    artifacts: dict[str, dict[str, Any]] = {}
    latency: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="castling-bench-litert-") as tmp:
        paths: dict[str, Path] = {}
        for mode in MODES:
            path = Path(tmp) / f"{mode}.tflite"
            log.info("converting %s ...", mode)
            with quiet_native_output(enabled=False):
                real_mode, extra = CONVERT.get(mode, (mode, {}))
                info = convert_tflite(
                    model, path, mode=real_mode, calib_images=None if mode == "fp32" else calib, img_size=s,
                    io_dtype="float32", **extra,
                )
            info.pop("float_twin", None)
            census = info["census"]
            paths[mode] = path
            artifacts[mode] = {
                "label": f"LiteRT {mode}" + (" (hybrid PT2E)" if mode == "int8" else "")
                + {"full_integer": " (float I/O, class token 16x8)",
                   "full_integer_strict": " --strict-int8 (float I/O)"}.get(mode, ""),
                "runtime": "litert",
                "conversion_seconds": info["conversion_seconds"],
                "file_bytes": info["file_bytes"],
                "io_dtypes": census["io_dtypes"],
                "census": {
                    "int8_tensor_fraction": census["int8_tensor_fraction"],
                    "float_activation_tensors_excluding_io": census["float_activation_tensors_excluding_io"],
                    "activation_dtypes": census["activation_dtypes"],
                    "tensor_dtypes": census["tensor_dtypes"],
                    "num_ops": census["num_ops"],
                    "ops": census["ops"],
                },
                "notes": info["notes"],
            }
            if "norm_rewrite_max_abs_diff" in info:
                artifacts[mode]["norm_rewrite_max_abs_diff"] = info["norm_rewrite_max_abs_diff"]
            log.info("%s: %.1f s, %.2f MB, int8 tensors %.1f%%", mode, info["conversion_seconds"],
                     info["file_bytes"] / 1e6, 100 * census["int8_tensor_fraction"])
        log.info("converting %s (quantizer defaults on fp32.tflite) ...", PEER)
        t0 = time.perf_counter()
        peer = _float_io(quantize_defaults(paths["fp32"].read_bytes(), calib))
        paths[PEER] = Path(tmp) / f"{PEER}.tflite"
        paths[PEER].write_bytes(peer)
        artifacts[PEER] = {
            "label": "peer: LiteRT quantizer defaults (static_wi8_ai8)", "runtime": "litert",
            "conversion_seconds": round(time.perf_counter() - t0, 3), "file_bytes": len(peer), "census": None,
            "notes": ["litert-quantizer recipe.static_wi8_ai8() + Quantizer.calibrate defaults on model.tflite"],
        }
        for name in (*MODES, PEER):
            artifacts[name]["delegation"] = delegation_split(paths[name])
        onnx_path = Path(tmp) / "fp32.onnx"
        log.info("exporting ONNX ...")
        with quiet_native_output(enabled=False):
            oinfo = export_onnx(model, onnx_path, s)
        paths[BASELINE] = onnx_path
        artifacts[BASELINE] = {
            "label": "ORT fp32 (ONNX)", "runtime": "onnxruntime", "conversion_seconds": oinfo["total_seconds"],
            "file_bytes": oinfo["bytes"], "simplifier": oinfo["simplifier"], "census": None,
        }
        order = [*MODES, PEER, BASELINE]

        def load(name: str, threads: int) -> Any:
            cls = OrtRunner if name == BASELINE else LiteRTRunner
            return cls(paths[name], threads=threads)

        for name in order:  # fidelity is thread-independent: measure once, with the first thread count
            runner = load(name, args.threads[0])
            out = np.concatenate([runner.run(held[i : i + 1]) for i in range(len(held))])
            if name == "fp32":
                ref_tflite = out
            artifacts[name]["fidelity"] = _fidelity(ref_tflite, out)  # vs its own fp32 .tflite
            artifacts[name]["fidelity_vs_torch"] = _fidelity(ref, out)
            log.info("%s: cosine min %.6f, max |Δ| %.4g", name, artifacts[name]["fidelity"]["cosine_min"],
                     artifacts[name]["fidelity"]["max_abs_diff"])
            del runner

        keys = [(name, th) for th in args.threads for name in order]
        runners = [load(name, th) for name, th in keys]
        runners[0].run(held[:1])
        log.info("timing %d runners x %d runs in %d interleaved rounds ...", len(runners), args.runs, args.rounds)
        samples = _time_interleaved(runners, held[:1], args.runs, args.warmup, args.rounds)
        stats = {k: (float(np.percentile(v, 50)), float(np.percentile(v, 90)), float(v.min()))
                 for k, v in zip(keys, samples)}
        for (name, th), v in zip(keys, samples):
            p50, p90, mn = stats[(name, th)]
            latency.append({
                "variant": name, "threads": th, "p50_ms": round(p50, 3), "p90_ms": round(p90, 3),
                "min_ms": round(mn, 3), "mean_ms": round(float(v.mean()), 3),
                "ratio_vs_litert_fp32": round(p50 / stats[("fp32", th)][0], 3),
                "samples_ms": [round(float(t), 3) for t in v],
            })
        del runners

    result = {
        "arch": args.arch, "img_size": s, "batch": 1, "runs": args.runs, "warmup": args.warmup,
        "rounds": args.rounds, "threads": args.threads, "calib_images": args.calib, "eval_images": args.eval,
        "weights": "random, torch.manual_seed(0); inputs image-like (N(0,1) 28x28, bicubic, unit std), seeds 1 / 2",
        "artifacts": artifacts, "latency": latency,
        "environment": environment("onnxruntime", "ai-edge-litert", "litert-torch", "ai-edge-quantizer",
                                   "litert-quantizer"),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    table = _table(result)
    env = result["environment"]
    _write_text(args.out / "litert.json", json.dumps(result, indent=2) + "\n")
    _write_text(
        args.out / "litert.md",
        f"# LiteRT modes vs ORT FP32: {args.arch} @ {s}\n\n{table}\n\n"
        f"Batch 1, {args.runs} timed runs after {args.warmup} warmup per (variant, threads), in {args.rounds} "
        f"interleaved rounds; × = p50 / LiteRT fp32 p50 at the same thread count (lower is faster). Fidelity: "
        f"{args.eval} held-out image-like inputs vs the model's own LiteRT fp32 .tflite; int8 modes calibrated on "
        f"{args.calib} other image-like inputs. Random weights. Ops on XNNPACK: delegation census "
        f"(castling_deploy/targets/tflite/census.py).\n\n"
        f"Host: {env['processor']} ({env['isa']}), {env['cpu_count']} CPUs (shared), torch {env['torch']}, "
        f"ai-edge-litert {env['ai-edge-litert']}, litert-torch {env['litert-torch']}, "
        f"litert-quantizer {env['litert-quantizer']}, onnxruntime {env['onnxruntime']}. "
        f"Wall time {result['wall_s']} s.\n" + _kept_analysis(args.out / "litert.md"),
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
