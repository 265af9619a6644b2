"""PNG charts (matplotlib, Agg backend, imported lazily: it is the ``profile`` extra)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..optional import import_optional
from ..output import atomic_path


def _pyplot() -> Any:
    matplotlib = import_optional("matplotlib", "matplotlib", "profile", "latency charts")
    matplotlib.use("Agg", force=True)
    return import_optional("matplotlib.pyplot", "matplotlib", "profile", "latency charts")


def _save_atomic(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return path


def latency_chart(result: dict, path: Path) -> Path:
    """Histogram of per-run latency with mean and p50/p90/p99 lines."""
    plt = _pyplot()
    samples = result["samples_ms"]
    lat = result["latency_ms"]
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        ax.hist(samples, bins=min(50, max(10, len(samples) // 4)), color="#4C72B0", alpha=0.8)
        for key, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
            ax.axvline(lat[key], color="#C44E52", linestyle=style, label=f"{key} {lat[key]:.2f} ms")
        ax.axvline(lat["mean"], color="#55A868", label=f"mean {lat['mean']:.2f} ms")
        ax.set_xlabel("latency per batch (ms)")
        ax.set_ylabel("runs")
        art = result["artifact"]
        ax.set_title(f"{art['file']} — {result['runtime']}, batch {result['batch']}, threads {result['threads']}",
                     fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return _save_atomic(fig, path)
    finally:
        plt.close(fig)


def sweep_chart(result: dict, path: Path) -> Path:
    """Latency (p50) and MACs against token count, one line per model (Castling vs softmax baseline)."""
    plt = _pyplot()
    fig, (ax_lat, ax_mac) = plt.subplots(1, 2, figsize=(11, 4))
    try:
        for name, rows in result["series"].items():
            tokens = [r["tokens"] for r in rows]
            ax_lat.plot(tokens, [r["latency_ms_p50"] for r in rows], marker="o", label=name)
            ax_mac.plot(tokens, [r["macs"] / 1e9 for r in rows], marker="o", label=name)
            for r in rows:
                ax_lat.annotate(f"{r['img_size']}px", (r["tokens"], r["latency_ms_p50"]), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
        ax_lat.set_xlabel("tokens")
        ax_lat.set_ylabel(f"ORT latency p50 (ms, {result.get('threads') or 'default'} thread(s))")
        ax_mac.set_xlabel("tokens")
        ax_mac.set_ylabel("GMACs")
        for ax in (ax_lat, ax_mac):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("Resolution sweep: Castling (linear-angular) vs softmax attention", fontsize=10)
        fig.tight_layout()
        return _save_atomic(fig, path)
    finally:
        plt.close(fig)
