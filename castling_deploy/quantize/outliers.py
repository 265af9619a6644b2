"""Outlier-aware calibration report: how unevenly each int8 input spends its range across channels.

A per-tensor int8 activation scale covers the largest channel; when a few channels are tens of times larger than
the rest (post-LayerNorm outliers of trained ViTs), every other channel is left a handful of levels. The spread of
an input is ``max_c r_c / median_c r_c`` with ``r_c = max |x_c|`` over the calibration set (symmetric int8: the
absolute maximum is what the scale covers). It is measured on the float torch model with forward hooks on every
``nn.Linear`` input — qkv (after norm1), proj, fc1 (after norm2), fc2 (after GELU), head (after the final norm) —
which are exactly the activations the int8 recipes quantize per tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# A LayerNorm output whose per-channel spread exceeds this is warned about, and is what turns the channel-scale
# migration on by default (measurements behind the number: quantize/migrate.py, benchmarks/results/outliers.md).
SPREAD_WARN = 4.0
# Other int8 inputs (attention output -> proj, GELU -> fc2) cannot be migrated into a LayerNorm; they are warned
# about only above this: the shipped demo's GELU outputs reach 8-11 and its INT8 logits keep cosine 0.9999.
OTHER_SPREAD_WARN = 32.0

PRODUCERS = {"attn.qkv": "norm1", "mlp.fc1": "norm2", "attn.proj": "attention output", "mlp.fc2": "GELU output"}


def producer_of(linear: str) -> str:
    """The tensor that feeds a Linear, by name: ``blocks.3.attn.qkv`` -> ``blocks.3.norm1``; ``head`` -> ``norm``."""
    if linear == "head":
        return "norm"
    prefix, _, tail = linear.partition(".attn.") if ".attn." in linear else linear.partition(".mlp.")
    kind = ("attn." if ".attn." in linear else "mlp.") + tail
    src = PRODUCERS.get(kind)
    if src is None:
        return f"{linear} input"
    return f"{prefix}.{src}" if src.startswith("norm") else f"{prefix} {src}"


@dataclass
class ChannelStats:
    """Per-channel |x| maxima of one Linear's input over the calibration set, and a seeded token sample."""

    linear: str
    absmax: np.ndarray  # (C,)
    sample: np.ndarray | None = None  # (tokens, C) float32, for choosing migration scales

    @property
    def spread(self) -> float:
        return channel_spread(self.absmax)


def channel_spread(absmax: np.ndarray) -> float:
    """max / median of per-channel ranges (1.0 = perfectly even)."""
    absmax = np.asarray(absmax, dtype=np.float64)
    med = float(np.median(absmax))
    return float(absmax.max() / med) if med > 0 else float("inf") if absmax.max() > 0 else 1.0


@torch.no_grad()
def collect_channel_stats(model: torch.nn.Module, images: np.ndarray, *, batch: int = 16,
                          sample_tokens: int = 0, seed: int = 0) -> dict[str, ChannelStats]:
    """Run ``model`` over ``images`` and return, per ``nn.Linear`` (by module name), the per-channel absolute
    maxima of its input; with ``sample_tokens`` > 0 also a seeded sample of that many input rows (tokens)."""
    model.eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    maxima: dict[str, torch.Tensor] = {}
    pools: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    rng = np.random.default_rng(seed)
    n_batches = max(1, -(-len(images) // batch))
    per_batch = -(-sample_tokens // n_batches) if sample_tokens else 0

    def hook(name: str):
        def fn(_mod: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            m = x.abs().amax(0)
            maxima[name] = m if name not in maxima else torch.maximum(maxima[name], m)
            if per_batch:
                idx = rng.choice(len(x), size=min(per_batch, len(x)), replace=False)
                pools[name].append(x[torch.from_numpy(idx)].clone())
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        for i in range(0, len(images), batch):
            model(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n in linears:
        if n not in maxima:
            continue
        sample = torch.cat(pools[n]).numpy()[:sample_tokens] if pools[n] else None
        out[n] = ChannelStats(n, maxima[n].numpy().astype(np.float64), sample)
    return out


def spread_rows(stats: dict[str, ChannelStats], after: dict[str, ChannelStats] | None = None) -> list[dict[str, Any]]:
    """One report row per int8 input: tensor, consumer, channels, spread (and spread after migration)."""
    rows = []
    for name, s in stats.items():
        top = np.argsort(s.absmax)[::-1][:3]
        row: dict[str, Any] = {"tensor": producer_of(name), "consumer": name, "channels": len(s.absmax),
                               "spread": round(s.spread, 3), "max_range": float(s.absmax.max()),
                               "median_range": float(np.median(s.absmax)), "top_channels": [int(c) for c in top]}
        if after is not None and name in after:
            row["spread_after"] = round(after[name].spread, 3)
        rows.append(row)
    return rows


def is_layernorm_output(row: dict[str, Any]) -> bool:
    """A block's norm1 / norm2 output: the inputs the channel-scale migration can flatten."""
    return row["tensor"].endswith((".norm1", ".norm2"))


def warn_limit(row: dict[str, Any]) -> float:
    return SPREAD_WARN if is_layernorm_output(row) else OTHER_SPREAD_WARN


def large_spreads(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose spread (after migration, when there was one) exceeds their warning limit."""
    return [r for r in rows if r.get("spread_after", r["spread"]) > warn_limit(r)]


def format_spread_table(rows: list[dict[str, Any]]) -> str:
    """Text table: per int8 input, the channel range spread before (and after) migration."""
    has_after = any("spread_after" in r for r in rows)
    head = f"{'int8 input':<28} {'consumer':<20} {'spread':>8}" + (f" {'after':>8}" if has_after else "")
    lines = ["per-channel range spread (max channel |x| / median channel |x|, calibration set)", head]
    for r in rows:
        line = f"{r['tensor']:<28} {r['consumer']:<20} {r['spread']:>8.2f}"
        if has_after:
            line += f" {r.get('spread_after', r['spread']):>8.2f}"
        flag = r.get("spread_after", r["spread"])
        lines.append(line + ("  <- large" if flag > warn_limit(r) else ""))
    return "\n".join(lines)
