"""Resolution sweep: how latency and MACs grow with token count, Castling vs a softmax baseline.

This is the measurement behind the paper's claim: linear-angular attention is O(N·d²), softmax O(N²·d), so
the gap must widen as the resolution (token count) grows — on a real runtime, not only in MAC counts.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import nn

from ..errors import UsageError
from .progress import ProgressBar
from .timer import time_interleaved

log = logging.getLogger(__name__)

SCHEMA = "castling-deploy/sweep/1"


def _tokens(model: nn.Module, img_size: int) -> int | None:
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "patch_size"):
        return (img_size // cfg.patch_size) ** 2 + 1
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if proj is not None and hasattr(proj, "stride"):
        return (img_size // proj.stride[0]) ** 2 + 1
    return None


def profile_sweep(
    make_model: Callable[[int], nn.Module],
    sizes: list[int],
    *,
    baseline: Callable[[int], nn.Module] | None = None,
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = 1,
    workdir: Path,
    chart_path: Path | None = None,
    names: tuple[str, str] = ("castling", "softmax"),
    progress: bool = True,
    rounds: int = 5,
) -> dict:
    """Export each model at each size to ONNX, time it on ONNX Runtime, count MACs and tokens.

    Each row has the latency p50/mean, MACs, export seconds and their ratios to the smallest size. Timing runs
    in ``rounds`` interleaved rounds over all artifacts (see phase 2).
    """
    from ..targets.onnx.convert import export_onnx
    from ..models.macs import count_macs, count_params
    from ..runtime import load_runner
    from .latency import latency_stats

    if not sizes:
        raise UsageError("the sweep needs at least one image size")
    sizes = sorted(set(int(s) for s in sizes))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    builders: list[tuple[str, Callable[[int], nn.Module]]] = [(names[0], make_model)]
    if baseline is not None:
        builders.append((names[1], baseline))

    # Phase 1: export every (model, size) and count its MACs.
    series: dict[str, list[dict[str, Any]]] = {}
    for name, build in builders:
        rows: list[dict[str, Any]] = []
        for size in sizes:
            model = build(size).eval()
            onnx_path = workdir / f"{name}_{size}.onnx"
            t0 = time.perf_counter()
            info = export_onnx(model, onnx_path, size, metadata={"sweep": f"{name}@{size}"})
            rows.append({
                "img_size": size,
                "tokens": _tokens(model, size),
                "in_chans": int(getattr(getattr(model, "cfg", None), "in_chans", 3)),
                "params": count_params(model),
                "macs": int(count_macs(model, size)),
                "export_s": round(time.perf_counter() - t0, 2),
                "onnx_nodes": info.get("nodes"),
                "onnx_bytes": info.get("bytes"),
                "onnx": str(onnx_path),
            })
            del model
        series[name] = rows
    # Phase 2: time all artifacts in interleaved rounds, so load drift on a shared machine hits every model
    # alike instead of biasing whichever ran last.
    all_rows = [r for rows in series.values() for r in rows]
    runners, inputs = [], []
    for r in all_rows:
        t0 = time.perf_counter()
        runners.append(load_runner(r["onnx"], threads=threads))
        r["load_ms"] = round((time.perf_counter() - t0) * 1000.0, 1)
        inputs.append(np.random.default_rng(0).standard_normal((1, r["in_chans"], r["img_size"], r["img_size"]),
                                                               dtype=np.float32))
    with ProgressBar(len(all_rows) * (warmup + runs), "sweep", enabled=progress) as bar:
        calls = [(lambda r=runner, x=x: r.run(x)) for runner, x in zip(runners, inputs)]
        samples = time_interleaved(calls, runs, warmup, rounds, on_call=bar.update)
    for r, s in zip(all_rows, samples):
        st = latency_stats(np.asarray(s), 1)
        r.update(latency_ms_p50=st["p50"], latency_ms_mean=st["mean"], latency_ms_std=st["std"],
                 latency_ms_p90=st["p90"], latency_ms_min=st["min"])
        log.info("%s: %.2f ms p50, %.3f GMACs", Path(r["onnx"]).stem, st["p50"], r["macs"] / 1e9)
    for rows in series.values():
        base = rows[0]
        for r in rows:
            r["latency_ratio"] = round(r["latency_ms_p50"] / base["latency_ms_p50"], 3)
            r["macs_ratio"] = round(r["macs"] / base["macs"], 3)

    summary: dict[str, Any] = {
        name: {
            "sizes": f"{rows[-1]['img_size']}/{rows[0]['img_size']}",
            "latency_ratio": rows[-1]["latency_ratio"],
            "macs_ratio": rows[-1]["macs_ratio"],
        }
        for name, rows in series.items()
    }
    if baseline is not None:
        ours, theirs = series[names[0]], series[names[1]]
        summary["speedup_vs_baseline"] = {
            str(a["img_size"]): round(b["latency_ms_p50"] / a["latency_ms_p50"], 3) for a, b in zip(ours, theirs)
        }
        summary["macs_saving_vs_baseline"] = {
            str(a["img_size"]): round(1.0 - a["macs"] / b["macs"], 3) for a, b in zip(ours, theirs)
        }
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "sizes": sizes,
        "runs": runs,
        "warmup": warmup,
        "threads": threads,
        "rounds": rounds,
        "series": series,
        "summary": summary,
        "chart": None,
    }
    if chart_path is not None:
        from .charts import sweep_chart

        result["chart"] = str(sweep_chart(result, Path(chart_path)))
    return result


def format_sweep_table(result: dict) -> str:
    """A markdown table (renders in terminals and READMEs alike)."""
    header = ("| model | size | tokens | GMACs | MACs × | export s | p50 ms | mean ± std ms | latency × |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [header]
    for name, rows in result["series"].items():
        for r in rows:
            lines.append(
                f"| {name} | {r['img_size']} | {r['tokens']} | {r['macs'] / 1e9:.3f} | {r['macs_ratio']:.2f} | "
                f"{r['export_s']:.1f} | {r['latency_ms_p50']:.2f} | {r['latency_ms_mean']:.2f} ± "
                f"{r['latency_ms_std']:.2f} | {r['latency_ratio']:.2f} |"
            )
    summ = result["summary"]
    lines.append("")
    for name in result["series"]:
        s = summ[name]
        lines.append(f"- {name}: latency ratio {s['sizes']} = **{s['latency_ratio']:.2f}×**, "
                     f"MACs ratio = {s['macs_ratio']:.2f}×")
    if "speedup_vs_baseline" in summ:
        sp = ", ".join(f"{k}px {v:.2f}×" for k, v in summ["speedup_vs_baseline"].items())
        ms = ", ".join(f"{k}px {100 * v:.0f}%" for k, v in summ["macs_saving_vs_baseline"].items())
        lines.append(f"- speedup vs baseline (p50): {sp}")
        lines.append(f"- MACs saved vs baseline: {ms}")
    lines.append(f"\n{result['runs']} runs after {result['warmup']} warmup, ONNX Runtime CPU, "
                 f"{result['threads'] or 'default'} thread(s), batch 1.")
    return "\n".join(lines)
