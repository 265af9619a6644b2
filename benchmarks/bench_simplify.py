"""Which ONNX simplifier should export_onnx default to: none (raw dynamo export), onnxsim or onnxslim?

For each model, exports raw ONNX once (``export_onnx(..., simplify=False)``), simplifies copies of it with
``onnxsim.simplify`` and ``onnxslim.slim`` and reports: seconds to simplify, node count, op-histogram changes
against raw, file MB, ONNX Runtime CPU latency (p50, 1 thread, batch 1, interleaved rounds), max |Δlogit| against
torch, and whether each graph still quantizes (``quantize_onnx`` + ``QuantRecipe.for_target("onnx")``) with
``classify_nodes`` finding the same number of blocks; the INT8 copies are timed and compared too.

    .venv/bin/python benchmarks/bench_simplify.py                       # castling_deit_tiny:224 castling_nano:32
    .venv/bin/python benchmarks/bench_simplify.py --models castling_nano:32 --runs 50

Writes benchmarks/results/simplify.json and simplify.md and prints the markdown tables.
"""
from __future__ import annotations

import argparse
import collections
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

log = logging.getLogger("bench_simplify")


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


VARIANTS = ("raw", "onnxsim", "onnxslim")


def _simplify(proto: Any, tool: str) -> tuple[Any, float, str]:
    """A simplified copy of ``proto`` (the input is left untouched), seconds taken, and a note."""
    import onnx

    src = onnx.ModelProto()
    src.CopyFrom(proto)
    t0 = time.perf_counter()
    with quiet_native_output(enabled=False):  # both tools print progress; stdout is for the table
        if tool == "onnxsim":
            import onnxsim

            out, ok = onnxsim.simplify(src)
            note = f"onnxsim {onnxsim.__version__}, check {'ok' if ok else 'FAILED'}"
        else:
            import onnxslim

            out = onnxslim.slim(src)
            note = f"onnxslim {onnxslim.__version__}"
    return out, time.perf_counter() - t0, note


def _ops(proto: Any) -> collections.Counter:
    return collections.Counter(n.op_type for n in proto.graph.node)


def _fingerprint(proto: Any) -> str:
    """Digest of the op-type sequence and the initializer contents (names ignored): equal graphs, equal prints."""
    import hashlib

    h = hashlib.sha256("|".join(n.op_type for n in proto.graph.node).encode())
    for d in sorted(hashlib.sha256(i.SerializeToString(deterministic=True).replace(i.name.encode(), b"")).hexdigest()
                    for i in proto.graph.initializer):
        h.update(d.encode())
    return h.hexdigest()[:16]


def _op_diff(raw: collections.Counter, other: collections.Counter) -> dict[str, int]:
    """op -> count change against raw, only the ops that changed."""
    return {op: other[op] - raw[op] for op in sorted(set(raw) | set(other)) if other[op] != raw[op]}


def _time_interleaved(runners: list[Any], xs: list[np.ndarray], runs: int, warmup: int,
                      rounds: int) -> list[np.ndarray]:
    for r, x in zip(runners, xs):
        for _ in range(warmup):
            r.run(x)
    rounds = max(1, min(rounds, runs))
    per_round = [runs // rounds + (1 if i < runs % rounds else 0) for i in range(rounds)]
    samples: list[list[float]] = [[] for _ in runners]
    for n in per_round:
        for i, (r, x) in enumerate(zip(runners, xs)):
            for _ in range(n):
                t = time.perf_counter()
                r.run(x)
                samples[i].append((time.perf_counter() - t) * 1000.0)
    return [np.asarray(s) for s in samples]


def _bench_model(arch: str, size: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import onnx
    import torch

    from castling_deploy.targets.onnx.convert import export_onnx
    from castling_deploy.models import create_model
    from castling_deploy.quantize.calibration import CalibrationSet
    from castling_deploy.quantize.graph import classify_nodes, depth_of
    from castling_deploy.quantize.ort_int8 import quantize_onnx
    from castling_deploy.quantize.recipe import QuantRecipe
    from castling_deploy.runtime.ort import OrtRunner

    torch.manual_seed(0)
    model = create_model(arch, form="deploy", img_size=size).eval()
    depth = len(model.blocks) if hasattr(model, "blocks") else None
    rng = np.random.default_rng(0)
    calib_images = rng.standard_normal((args.calib, 3, size, size), dtype=np.float32)
    held = rng.standard_normal((args.eval, 3, size, size), dtype=np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(held)).numpy()
    calib = CalibrationSet(calib_images, f"bench-simplify-{arch}-{size}-n{args.calib}-seed0",
                           f"N(0,1) x{args.calib} (seed 0)")

    raw_path = tmp / f"{arch}_raw.onnx"
    log.info("%s@%d: exporting raw ONNX ...", arch, size)
    with quiet_native_output(enabled=False):
        info = export_onnx(model, raw_path, size, simplify=False)
    raw = onnx.load(str(raw_path))
    raw_ops = _ops(raw)
    rows: dict[str, dict[str, Any]] = {}
    for v in VARIANTS:
        if v == "raw":
            path, secs, note, proto = raw_path, 0.0, f"torch.onnx dynamo export, {info['export_seconds']} s", raw
        else:
            log.info("%s@%d: %s ...", arch, size, v)
            proto, secs, note = _simplify(raw, v)
            path = tmp / f"{arch}_{v}.onnx"
            onnx.save(proto, str(path))
        onnx.checker.check_model(str(path), full_check=True)
        ops = _ops(proto)
        row: dict[str, Any] = {
            "simplify_seconds": round(secs, 3), "note": note, "nodes": len(proto.graph.node),
            "initializers": len(proto.graph.initializer), "file_bytes": path.stat().st_size,
            "ops": dict(sorted(ops.items())), "fingerprint": _fingerprint(proto), "op_diff_vs_raw": _op_diff(raw_ops, ops), "path": str(path),
        }
        # Fidelity at batch len(held): also proves the dynamic batch axis survived simplification.
        row["max_abs_dlogit"] = float(np.abs(OrtRunner(path, threads=1).run(held) - ref).max())
        try:
            roles = classify_nodes(proto)
            row["classify_depth"] = depth_of(roles)
            row["compute_nodes"] = len(roles)
        except Exception as exc:  # GraphStructureError: the point of the check is to report it
            row["classify_depth"], row["classify_error"] = None, str(exc)
        q_path = tmp / f"{arch}_{v}_int8.onnx"
        try:
            with quiet_native_output(enabled=False):
                rep = quantize_onnx(path, q_path, calib, QuantRecipe.for_target("onnx"),
                                    cache_dir=tmp / "cache", batch=min(8, args.calib))
            q_out = OrtRunner(q_path, threads=1).run(held)
            cos = np.sum(ref * q_out, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(q_out, axis=1))
            row["int8"] = {
                "ok": True, "depth": rep["depth"], "int8_nodes": rep["int8_nodes"],
                "float_compute_nodes": rep["float_compute_nodes"], "preprocess": rep["preprocess"],
                "seconds": rep["seconds"], "file_bytes": q_path.stat().st_size,
                "int8_mac_fraction": rep["census"].get("int8_mac_fraction"),
                "max_abs_dlogit": float(np.abs(q_out - ref).max()), "cosine_min": float(cos.min()),
                "path": str(q_path),
            }
        except Exception as exc:
            row["int8"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        log.info("%s@%d %s: %d nodes, %.2f s, max|Δ| %.2e, depth %s, int8 %s", arch, size, v, row["nodes"],
                 secs, row["max_abs_dlogit"], row["classify_depth"], row["int8"].get("ok"))
        rows[v] = row

    # Latency: every float and int8 variant of this model, interleaved, 1 thread, batch 1.
    keys = [(v, kind) for kind in ("fp32", "int8") for v in VARIANTS
            if kind == "fp32" or rows[v]["int8"].get("ok")]
    runners = [OrtRunner(rows[v]["path"] if kind == "fp32" else rows[v]["int8"]["path"], threads=1)
               for v, kind in keys]
    x = held[:1]
    samples = _time_interleaved(runners, [x] * len(runners), args.runs, args.warmup, args.rounds)
    for (v, kind), smp in zip(keys, samples):
        target = rows[v] if kind == "fp32" else rows[v]["int8"]
        target["p50_ms"] = round(float(np.percentile(smp, 50)), 3)
        target["p90_ms"] = round(float(np.percentile(smp, 90)), 3)
        target["min_ms"] = round(float(smp.min()), 3)
        target["samples_ms"] = [round(float(t), 3) for t in smp]
    for v in VARIANTS:
        rows[v].pop("path")
        rows[v]["int8"].pop("path", None)
    return {"arch": arch, "img_size": size, "model_depth": depth, "opset": info["opset"], "variants": rows}


def _fmt_diff(d: dict[str, int]) -> str:
    return ", ".join(f"{op} {n:+d}" for op, n in d.items()) or "–"


def _tables(models: list[dict[str, Any]]) -> str:
    parts = []
    for m in models:
        rows = m["variants"]
        base = rows["raw"]["p50_ms"]
        qbase = rows["raw"]["int8"].get("p50_ms")
        lines = [
            f"### {m['arch']} @ {m['img_size']} (depth {m['model_depth']}, opset {m['opset']})",
            "",
            "| variant | simplify s | nodes | op changes vs raw | MB | p50 ms | × raw | max abs Δlogit | "
            "min ms | blocks found | int8 ok | int8 nodes | int8 p50 ms | int8 × raw-int8 | int8 cos min |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        for v in VARIANTS:
            r = rows[v]
            q = r["int8"]
            if q.get("ok"):
                qcols = (f"yes | {q['int8_nodes']} | {q['p50_ms']:.2f} | "
                         f"{(q['p50_ms'] / qbase) if qbase else float('nan'):.2f}× | {q['cosine_min']:.5f}")
            else:
                qcols = f"NO ({q['error'][:60]}) | – | – | – | –"
            lines.append(
                f"| {v} | {r['simplify_seconds']:.2f} | {r['nodes']} | {_fmt_diff(r['op_diff_vs_raw'])} | "
                f"{r['file_bytes'] / 1e6:.2f} | {r['p50_ms']:.2f} | {r['p50_ms'] / base:.2f}× | "
                f"{r['max_abs_dlogit']:.2e} | {r['min_ms']:.2f} | {r['classify_depth']} | {qcols} |"
            )
        same = rows["onnxsim"]["fingerprint"] == rows["onnxslim"]["fingerprint"]
        lines.append(f"\nonnxsim and onnxslim graphs identical (op sequence + initializer contents): "
                     f"**{'yes' if same else 'no'}**")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["castling_deit_tiny:224", "castling_nano:32"],
                    help="ARCH:IMG_SIZE entries")
    ap.add_argument("--runs", type=int, default=100, help="timed runs per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    ap.add_argument("--calib", type=int, default=32, help="random calibration images for the int8 check")
    ap.add_argument("--eval", type=int, default=8, help="random images for max |Δlogit| (run as one batch)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("castling_deploy.quantize.calibration", "onnxslim"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    specs = []
    for m in args.models:
        arch, _, size = m.partition(":")
        if not size.isdigit():
            ap.error(f"--models entries are ARCH:IMG_SIZE, got {m!r}")
        specs.append((arch, int(size)))

    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="castling-bench-simplify-") as tmp:
        models = [_bench_model(arch, size, args, Path(tmp)) for arch, size in specs]

    import onnx
    import onnxruntime
    import onnxsim
    import onnxslim
    import torch

    result = {
        "runs": args.runs, "warmup": args.warmup, "rounds": args.rounds, "threads": 1, "batch": 1,
        "calib_images": args.calib, "eval_images": args.eval, "models": models,
        "environment": {
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "onnxsim": onnxsim.__version__,
            "onnxslim": onnxslim.__version__,
        },
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    tables = _tables(models)
    env = result["environment"]
    _write_text(args.out / "simplify.json", json.dumps(result, indent=2) + "\n")
    _write_text(
        args.out / "simplify.md",
        f"# ONNX simplifier: raw vs onnxsim vs onnxslim\n\n{tables}\n\n"
        f"Latency: ONNX Runtime CPU, 1 thread, batch 1, {args.runs} runs after {args.warmup} warmup, "
        f"{args.rounds} interleaved rounds over all float and int8 variants of a model; × = p50 / raw p50. "
        f"max |Δlogit| vs the torch deploy model on {args.eval} N(0,1) images run as one batch (checks the "
        f"dynamic batch axis survived). INT8: quantize_onnx + QuantRecipe.for_target('onnx'), {args.calib} "
        f"random calibration images; 'blocks found' = depth from classify_nodes on the float graph. "
        f"Random weights.\n\n"
        f"Host: {env['processor']}, {env['cpu_count']} CPUs (shared), torch {env['torch']}, onnx {env['onnx']}, "
        f"onnxruntime {env['onnxruntime']}, onnxsim {env['onnxsim']}, onnxslim {env['onnxslim']}. "
        f"Wall time {result['wall_s']} s.\n",
    )
    print(tables)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
