"""Parse the text LiteRT/TFLite's ``benchmark_model`` prints, into our profile keys.

Lines handled (any ``INFO: `` / ``I tflite  : `` prefix ignored; numbers may be ``2.95034e+06``):
- ``count=50 first=.. curr=.. min=.. max=.. avg=.. std=..`` [``p5=.. median=.. p95=..`` in newer builds]:
  the first is the warmup block, the last the regular runs (all values in microseconds);
- ``Inference timings in us: Init: X, First inference: Y, Warmup (avg): Z, Inference (avg): W``;
- ``Peak memory footprint (MB): init=.. overall=..`` (older builds: ``Memory footprint delta from the start of the
  tool (MB): ..``; with --report_peak_memory_footprint: ``Overall peak memory footprint (MB) via periodic monitoring: X``);
- with --enable_op_profiling=true, the "Summary by node type" table after
  "Operator-wise Profiling Info for Regular Benchmark Runs".
"""
from __future__ import annotations

import re
from typing import Any

_NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
_COUNT = re.compile(r"count=(\d+)((?:\s+\w+=" + _NUM[1:-1] + r")*)")
_KV = re.compile(r"(\w+)=" + _NUM)
_TIMINGS = re.compile(r"Inference timings in us: Init: " + _NUM + r", First inference: " + _NUM
                      + r", Warmup \(avg\): " + _NUM + r", Inference \(avg\): " + _NUM)
_PEAK = re.compile(r"(Peak memory footprint|Memory footprint delta from the start of the tool) \(MB\): init="
                   + _NUM + r" overall=" + _NUM)
_PERIODIC = re.compile(r"Overall peak memory footprint \(MB\) via periodic monitoring: " + _NUM)
REGULAR = "Operator-wise Profiling Info for Regular Benchmark Runs"
SUMMARY = "Summary by node type"


def _count_lines(text: str) -> list[dict[str, float]]:
    rows = []
    for line in text.splitlines():
        if "Timings (microseconds)" in line or "Memory (bytes)" in line:
            continue  # the op profiler's own summaries repeat the count= syntax
        m = _COUNT.search(line)
        if m and ("curr=" in line or "avg=" in line):
            row = {"count": float(m.group(1))}
            row.update({k: float(v) for k, v in _KV.findall(m.group(2))})
            rows.append(row)
    return rows


def _op_summary(text: str) -> list[dict[str, Any]]:
    start = text.find(REGULAR)
    if start < 0:
        return []
    pos = text.find(SUMMARY, start)
    if pos < 0:
        return []
    rows: list[dict[str, Any]] = []
    for line in text[pos:].splitlines()[2:]:  # skip the title and the [Node type] header
        fields = line.split()
        if len(fields) < 7:
            break  # the blank line that ends the table
        try:
            count, avg_ms = int(fields[-6]), float(fields[-5])
            avg_pct, cdf_pct = float(fields[-4].rstrip("%")), float(fields[-3].rstrip("%"))
            mem_kb, called = float(fields[-2]), int(fields[-1])
        except ValueError:
            break
        node = " ".join(fields[:-6])
        node = re.sub(r"^(INFO:|I tflite\s*:)\s*", "", node)
        rows.append({"node_type": node, "count": count, "avg_ms": avg_ms, "percent": avg_pct,
                     "cdf_percent": cdf_pct, "mem_kb": mem_kb, "times_called": called})
    return rows


def parse_benchmark_output(text: str) -> dict[str, Any]:
    """Everything we read from one benchmark_model run; missing parts are None / empty."""
    out: dict[str, Any] = {"init_us": None, "first_inference_us": None, "warmup_avg_us": None,
                           "inference_avg_us": None, "warmup": None, "regular": None,
                           "memory_init_mb": None, "memory_overall_mb": None, "memory_kind": None,
                           "peak_memory_periodic_mb": None, "ops_by_type": _op_summary(text)}
    m = _TIMINGS.search(text)
    if m:
        out["init_us"], out["first_inference_us"], out["warmup_avg_us"], out["inference_avg_us"] = map(float, m.groups())
    counts = _count_lines(text)
    if counts:
        out["regular"] = counts[-1]
        out["warmup"] = counts[0] if len(counts) > 1 else None
    m = _PEAK.search(text)
    if m:
        out["memory_kind"] = "peak" if m.group(1).startswith("Peak") else "delta"
        out["memory_init_mb"], out["memory_overall_mb"] = float(m.group(2)), float(m.group(3))
    m = _PERIODIC.search(text)
    if m:
        out["peak_memory_periodic_mb"] = float(m.group(1))
    return out


def to_profile_keys(parsed: dict[str, Any], *, batch: int = 1) -> dict[str, Any]:
    """Map a parsed run onto the local profile keys (ms). benchmark_model prints no p90/p99: those are None,
    p50 is its ``median`` when printed."""
    reg = parsed.get("regular") or {}
    if not reg and parsed.get("inference_avg_us") is None:
        raise ValueError("benchmark_model printed no timings")
    ms = lambda v: None if v is None else round(v / 1000.0, 4)
    mean = ms(reg.get("avg", parsed.get("inference_avg_us")))
    peak = parsed.get("peak_memory_periodic_mb") or (parsed["memory_overall_mb"]
                                                     if parsed.get("memory_kind") == "peak" else None)
    return {
        "runs": int(reg["count"]) if reg.get("count") else None,
        "warmup": int(parsed["warmup"]["count"]) if parsed.get("warmup") else None,
        "load_ms": ms(parsed.get("init_us")),
        "first_inference_ms": ms(parsed.get("first_inference_us")),
        "latency_ms": {
            "mean": mean, "std": ms(reg.get("std")), "p50": ms(reg.get("median")), "p90": None, "p99": None,
            "min": ms(reg.get("min")), "max": ms(reg.get("max")),
            "throughput_ips": round(1000.0 * batch / mean, 2) if mean else None,
        },
        "memory": {"peak_rss_mb": peak, "init_mb": parsed.get("memory_init_mb"),
                   "overall_mb": parsed.get("memory_overall_mb"), "kind": parsed.get("memory_kind")},
        "per_op": {"by_op_type": [{"op_type": r["node_type"], "ms_per_run": r["avg_ms"], "percent": r["percent"],
                                   "nodes": r["count"]} for r in parsed["ops_by_type"]]}
        if parsed.get("ops_by_type") else None,
    }
