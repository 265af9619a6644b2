"""What profiling through a device costs: the same ONNX artifact profiled locally in-process
(``profile_artifact``), through ``--device local`` (fresh python + runner script, no network) and through a
loopback SSH device (a real sshd on 127.0.0.1, so only the transport differs from a remote board).

Reported per scenario, median of ``--repeats``: wall time of the whole profile call, its overhead over the
in-process run, and the p50 inference latency it measured (which should not change: the overhead is outside
the timed loop). Also: one multiplexed ssh call vs a full SSH handshake, and a cold first profile (connect +
push + run). Prints the host ISA (lscpu flags), since absolute numbers depend on it.

    .venv/bin/python benchmarks/bench_device_overhead.py [--runs 50] [--repeats 5] [--device ssh://HOST]
Writes benchmarks/results/device_overhead.json and device_overhead.md. Needs openssh-server for the loopback
case (skipped otherwise) — or pass --device to measure a real device instead.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests/devices/sshd.py, the loopback server helper

from castling_deploy.devices import parse_device, profile_on_device
from castling_deploy.models import create_model
from castling_deploy.profiling.latency import profile_artifact


def isa() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except OSError:
        out = ""
    flags = next((ln.split(":", 1)[1].split() for ln in out.splitlines() if ln.startswith("Flags:")), [])
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name:")), None)
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    return {"cpu": model or platform.processor(), "machine": platform.machine(),
            "flags": {f: f in flags for f in wanted}}


def export_nano(out: Path) -> Path:
    torch.manual_seed(0)
    model = create_model("castling_nano").eval()
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(out), dynamo=True, opset_version=18,
                      external_data=False, verbose=False)
    return out


def timed(fn) -> tuple[float, dict]:
    t = time.perf_counter()
    res = fn()
    return (time.perf_counter() - t) * 1000.0, res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default=None, help="measure this device instead of a loopback sshd")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "device_overhead.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-device-"))
    art = export_nano(work / "nano.onnx")
    kw = {"runs": args.runs, "warmup": args.warmup, "threads": args.threads}

    server = None
    ssh_uri, ssh_kw = args.device, {}
    if ssh_uri is None:
        from tests.devices.sshd import LoopbackSshd, missing_tools

        why = missing_tools()
        if why:
            print(f"loopback SSH skipped: {why}", file=sys.stderr)
        else:
            server = LoopbackSshd(work / "sshd").start()
            ssh_uri = "ssh://loopback"
            ssh_kw = {"ssh_config": server.config, "python": sys.executable}

    rows: dict[str, dict[str, list[float]]] = {}

    def record(name: str, wall: float, res: dict) -> None:
        r = rows.setdefault(name, {"wall_ms": [], "p50_ms": []})
        r["wall_ms"].append(wall)
        r["p50_ms"].append(res["latency_ms"]["p50"])

    local_dev = parse_device("local", cache_dir=str(work / "local-cache"))
    ssh_dev = parse_device(ssh_uri, cache_dir=str(work / "ssh-cache"), **ssh_kw) if ssh_uri else None
    extra: dict = {}
    try:
        if ssh_dev is not None:  # warm the connection and the cache once; cold runs are measured separately
            profile_on_device(ssh_dev, art, runs=2, warmup=0, threads=args.threads)
            call = [timed(lambda: ssh_dev.sh("true"))[0] for _ in range(10)]
            extra["ssh_call_ms_median"] = round(statistics.median(call), 1)
            if server is not None:
                hs = [timed(lambda: subprocess.run(["ssh", "-F", str(server.config), "-o", "BatchMode=yes",
                                                    "-o", "ControlPath=none", "loopback", "true"], check=True))[0]
                      for _ in range(3)]
                extra["ssh_handshake_ms_median"] = round(statistics.median(hs), 1)
        profile_on_device(local_dev, art, runs=2, warmup=0, threads=args.threads)
        for _ in range(args.repeats):  # interleaved, so load from other processes hits every scenario alike
            record("in-process (profile_artifact)", *timed(lambda: profile_artifact(art, per_op=False, progress=False, **kw)))
            record("--device local", *timed(lambda: profile_on_device(local_dev, art, **kw)))
            if ssh_dev is not None:
                record(f"--device {ssh_uri} (warm)", *timed(lambda: profile_on_device(ssh_dev, art, **kw)))
                cold = parse_device(ssh_uri, cache_dir=str(work / f"cold-{time.monotonic_ns()}"), **ssh_kw)
                try:
                    record(f"--device {ssh_uri} (cold: connect+push)", *timed(lambda c=cold: profile_on_device(c, art, **kw)))
                finally:
                    cold.close()
    finally:
        if ssh_dev is not None:
            ssh_dev.close()
        if server is not None:
            server.stop()

    base = statistics.median(next(iter(rows.values()))["wall_ms"])
    table = []
    for name, r in rows.items():
        wall = statistics.median(r["wall_ms"])
        table.append({"scenario": name, "wall_ms": round(wall, 1), "overhead_ms": round(wall - base, 1),
                      "p50_ms": round(statistics.median(r["p50_ms"]), 4), "repeats": len(r["wall_ms"])})
    host = isa()
    load = (round(load_before, 2), round(os.getloadavg()[0], 2))  # a busy box inflates every wall time
    flags = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in host["flags"].items())
    lines = [f"host: {host['cpu']} ({host['machine']}); {flags}",
             (f"artifact: castling_nano ONNX fp32 @32px, {args.runs} runs + {args.warmup} warmup, "
              f"{args.threads} thread(s), median of {args.repeats}; 1-min load average {load[0]} -> {load[1]} "
              f"on {os.cpu_count()} CPUs"), "",
             "| scenario | wall ms | overhead ms | p50 ms (measured) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['scenario']} | {r['wall_ms']} | {r['overhead_ms']:+} | {r['p50_ms']} |" for r in table]
    if extra:
        lines += ["", "one multiplexed ssh call: %s ms; one full SSH handshake: %s ms" % (
            extra.get("ssh_call_ms_median"), extra.get("ssh_handshake_ms_median", "n/a"))]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host": host, "runs": args.runs, "warmup": args.warmup, "threads": args.threads,
                               "repeats": args.repeats, "rows": table, **extra, "load_avg_1min": load,
                               "cpu_count": os.cpu_count(),
                               "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
