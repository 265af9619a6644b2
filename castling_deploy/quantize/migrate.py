"""Channel-scale migration: an exact fold that moves post-LayerNorm outlier channels out of int8 activations.

For a LayerNorm feeding Linears, ``y = W (γ ⊙ n(x) + β) + b`` equals ``y = (W diag(s)) ((γ/s) ⊙ n(x) + β/s) + b``
for any positive per-channel ``s``: divide the LayerNorm's gamma and beta by ``s``, multiply the consuming Linears'
input columns by ``s`` — the float function is unchanged (up to float rounding, which the pipeline checks as its own
error-budget stage, max |Δlogit| <= 1e-4). SmoothQuant's choice ``s_c = max|x_c|^α / max|W_{:,c}|^(1-α)`` flattens
the activation (what per-tensor int8 needs) at the price of the weights (which are int8 per output channel and
absorb it far better). α is chosen per LayerNorm on the calibration set: the value in ``ALPHAS`` that minimizes
the simulated int8 error of the Linear's output (per-tensor percentile activations, per-channel weights, the
recipes' scheme) on a seeded token sample; if none beats leaving the layer alone, it is left alone.

Pairs migrated: ``blocks.N.norm1 -> blocks.N.attn.qkv``, ``blocks.N.norm2 -> blocks.N.mlp.fc1``. The final
``norm -> head`` is reported but not migrated: the head reads one token per image, so α is chosen on a few dozen
rows and overfits them (castling_deit_tiny, random weights: migrating it alone cost 3.5 dB of logit SQNR).
The Castling attention reads qkv's *output* (through the L2 norms of q, k and through v), which does not change.
Every INT8 path consumes the migrated float model: the ONNX / TensorRT QDQ models are exported from it, LiteRT
(PT2E and full-integer) and Core ML W8A8 convert it.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .outliers import SPREAD_WARN, ChannelStats, collect_channel_stats, is_layernorm_output, large_spreads, spread_rows

log = logging.getLogger(__name__)

# Migration is on by default for a LayerNorm whose output channel spread exceeds this. castling_deit_tiny@224,
# TensorRT-recipe QDQ under exact QDQ semantics, 64 held-out inputs (benchmarks/results/outliers.md), logit SQNR
# without -> with migration: outlier-free random weights (spreads 1.2-1.3) 27.9 -> 28.0 dB; x2 outliers (spread
# 2.5) 26.8 -> 27.8; x4 (4.9) 24.1 -> 27.8; x10 (12) 17.4 -> 27.7. Below ~2.5 the gain is within what calibration
# choices move; the shipped demo's largest LayerNorm spread is 1.95, so it is never migrated.
SPREAD_THRESHOLD = SPREAD_WARN
ALPHAS = tuple(round(float(a), 2) for a in np.linspace(0.0, 1.0, 11))
SAMPLE_TOKENS = 4096
MAX_CALIB_IMAGES = 64
PERCENTILE = 99.99
EXACT_ATOL = 1e-4
S_MIN = 1e-5


def migration_pairs(model: nn.Module) -> list[tuple[str, nn.LayerNorm, list[tuple[str, nn.Linear]]]]:
    """(LayerNorm name, LayerNorm, [(Linear name, Linear), ...]): each block's norm1 -> qkv and norm2 -> fc1."""
    pairs = []
    for i, blk in enumerate(getattr(model, "blocks", [])):
        pairs.append((f"blocks.{i}.norm1", blk.norm1, [(f"blocks.{i}.attn.qkv", blk.attn.qkv)]))
        pairs.append((f"blocks.{i}.norm2", blk.norm2, [(f"blocks.{i}.mlp.fc1", blk.mlp.fc1)]))
    return [p for p in pairs if isinstance(p[1], nn.LayerNorm) and p[1].elementwise_affine and p[1].bias is not None]


def _percentile_abs(x: torch.Tensor, percentile: float) -> torch.Tensor:
    """The ``percentile`` of |x| (the recipes' activation range), from the top-k values instead of a full sort."""
    flat = x.abs().flatten()
    k = max(1, round(flat.numel() * (1 - percentile / 100)))
    return flat.topk(k).values[-1] if k < flat.numel() else flat.min()


def _fake_quant_error(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, s: torch.Tensor, percentile: float,
                      wbits: int) -> float:
    """Relative squared error of ``Q(x/s) Q(W s)^T`` vs ``y = x W^T``: per-tensor symmetric int8 activations at the
    ``percentile`` of |x/s|, per-output-channel symmetric weights (``wbits`` bits)."""
    xs, ws = x / s, w * s
    qa = 127.0
    a = _percentile_abs(xs, percentile).clamp_min(1e-12) / qa
    xq = (xs / a).round().clamp(-qa, qa) * a
    qw = float(2 ** (wbits - 1) - 1)
    sw = ws.abs().amax(1, keepdim=True).clamp_min(1e-12) / qw
    wq = (ws / sw).round().clamp(-qw, qw) * sw
    return float(((xq @ wq.T - y) ** 2).sum() / (y**2).sum().clamp_min(1e-30))


def smooth_scales(x_absmax: np.ndarray, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_c = max|x_c|^α / max|W_{:,c}|^(1-α)``, normalized to median 1 (only ratios matter)."""
    ax = torch.from_numpy(np.asarray(x_absmax, dtype=np.float64)).clamp_min(S_MIN)
    aw = w.detach().double().abs().amax(0).clamp_min(S_MIN)
    s = ax.pow(alpha) / aw.pow(1 - alpha)
    return (s / s.median()).clamp_min(S_MIN).float()


def _db(err: float) -> float:
    return round(-10 * math.log10(err), 2) if err > 0 else float("inf")


def choose_alpha(stats: ChannelStats, weights: list[torch.Tensor], *, alphas: tuple[float, ...] = ALPHAS,
                 percentile: float = PERCENTILE, wbits: int = 8) -> tuple[float | None, torch.Tensor | None, dict]:
    """The α (and scales) minimizing the simulated int8 error over the consumers, or (None, None) when leaving the
    layer alone is at least as good. Also returns the per-α errors (SQNR dB of the Linear outputs)."""
    assert stats.sample is not None, "collect_channel_stats(sample_tokens=...) first"
    x = torch.from_numpy(stats.sample).float()
    w = torch.cat([t.detach().float() for t in weights], 0)
    y = x @ w.T
    base = _fake_quant_error(x, w, y, torch.ones(x.shape[1]), percentile, wbits)
    best: tuple[float, float | None, torch.Tensor | None] = (base, None, None)
    tried = {"none": _db(base)}
    for a in alphas:
        s = smooth_scales(stats.absmax, w, a)
        err = _fake_quant_error(x, w, y, s, percentile, wbits)
        tried[f"{a:g}"] = _db(err)
        if err < best[0] * 0.98:  # a 0.1 dB gain at least: migration is not free (weights get larger ranges)
            best = (err, a, s)
    return best[1], best[2], {"sqnr_db_by_alpha": tried, "sqnr_db_before": _db(base), "sqnr_db_after": _db(best[0])}


@torch.no_grad()
def apply_scales(norm: nn.LayerNorm, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """In place: gamma, beta /= s; each Linear's input columns *= s (the exact rewrite)."""
    s = s.to(norm.weight.dtype)
    norm.weight.div_(s)
    norm.bias.div_(s)
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])


@dataclass
class Migration:
    """What ``migrate_model`` did: the record for report.json (``to_dict``) and whether the model changed."""

    applied: bool
    mode: str
    reason: str
    layers: list[dict[str, Any]]
    channel_spread: list[dict[str, Any]]
    threshold: float = SPREAD_THRESHOLD
    calib_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The report record (the full per-input table, ``channel_spread``, goes into the quantization record)."""
        ln = [r for r in self.channel_spread if is_layernorm_output(r)]
        before = [r["spread"] for r in ln]
        after = [r.get("spread_after", r["spread"]) for r in ln]
        return {"applied": self.applied, "mode": self.mode, "reason": self.reason, "threshold": self.threshold,
                "method": "SmoothQuant-style s_c = max|x_c|^a / max|W_c|^(1-a), a per LayerNorm from "
                          f"{list(ALPHAS)} by simulated int8 error on the calibration set",
                "calib_images": self.calib_images,
                "max_layernorm_spread_before": max(before) if before else None,
                "max_layernorm_spread_after": max(after) if after else None,
                "layers": self.layers}

    def warnings(self) -> list[str]:
        """One line per reason for the int8 inputs whose channel spread is still large (after migration)."""
        groups: dict[str, list[str]] = {}
        for r in large_spreads(self.channel_spread):
            if not is_layernorm_output(r):
                why = "not migratable (attention output, GELU, final norm -> head); see --sensitivity / --auto-fallback"
            elif self.mode == "off":
                why = "the channel-scale migration is off (--no-migrate)"
            else:
                why = "the channel-scale migration found no scale that lowers their int8 error"
            groups.setdefault(why, []).append(f"{r['consumer']} {r.get('spread_after', r['spread']):.1f}")
        return [f"{len(v)} int8 input(s) with a large per-channel range spread (max/median channel |x| on the "
                f"calibration set; a per-tensor int8 scale spends its range on a few channels): "
                f"{', '.join(v[:6])}{' ...' if len(v) > 6 else ''}; {why}" for why, v in groups.items()]


def migrate_model(model: nn.Module, calib_images: np.ndarray, *, mode: str = "auto",
                  threshold: float = SPREAD_THRESHOLD, max_images: int = MAX_CALIB_IMAGES,
                  sample_tokens: int = SAMPLE_TOKENS, seed: int = 0, wbits: int = 8,
                  why_off: str | None = None) -> tuple[nn.Module, Migration]:
    """Measure the channel spreads on ``calib_images`` and, per ``mode``, migrate: "auto" migrates each LayerNorm
    whose output spread exceeds ``threshold``, "all" every one (α still chosen, "none" allowed), "off" none.
    Returns (a migrated copy, or ``model`` itself when nothing changed; the record). ``why_off`` replaces the
    recorded reason of mode "off" (default: --no-migrate)."""
    if mode not in ("auto", "all", "off"):
        raise ValueError(f"unknown migration mode {mode!r}")
    pick = np.random.default_rng(seed).choice(len(calib_images), size=min(max_images, len(calib_images)),
                                              replace=False)
    images = calib_images[np.sort(pick)]  # a seeded sample: image folders are ordered by class
    stats = collect_channel_stats(model, images, sample_tokens=0 if mode == "off" else sample_tokens, seed=seed)
    out = copy.deepcopy(model).eval() if mode != "off" else model
    layers: list[dict[str, Any]] = []
    pairs = {name: (ln, lins) for name, ln, lins in migration_pairs(out)}
    for name, (ln, lins) in pairs.items():
        st = stats.get(lins[0][0])
        if st is None:
            continue
        row: dict[str, Any] = {"norm": name, "consumers": [n for n, _ in lins], "spread_before": round(st.spread, 3),
                               "alpha": None}
        if mode == "all" or (mode == "auto" and st.spread > threshold):
            alpha, s, info = choose_alpha(st, [m.weight for _, m in lins], wbits=wbits)
            row.update(alpha=alpha, **info)
            if s is not None:
                apply_scales(ln, [m for _, m in lins], s)
                row["scale_range"] = [float(s.min()), float(s.max())]
        layers.append(row)
    applied = any(r["alpha"] is not None for r in layers)
    if not applied:
        out = model
    after = collect_channel_stats(out, images) if applied else None
    for r in layers:
        r["spread_after"] = round(after[r["consumers"][0]].spread, 3) if after else r["spread_before"]
    reason = why_off if (mode == "off" and why_off) else _reason(mode, applied, layers, threshold)
    return out, Migration(applied, mode, reason, layers, spread_rows(stats, after), threshold, len(images))


def _reason(mode: str, applied: bool, layers: list[dict[str, Any]], threshold: float) -> str:
    if mode == "off":
        return "turned off (--no-migrate)"
    n = sum(r["alpha"] is not None for r in layers)
    if applied:
        which = "every block LayerNorm considered" if mode == "all" else f"output channel spread > {threshold:g}"
        return f"{n}/{len(layers)} LayerNorms migrated ({which} and a simulated int8 gain)"
    big = [r for r in layers if r["spread_before"] > threshold]
    if mode == "auto" and not big:
        return f"not needed: every LayerNorm output channel spread <= {threshold:g}"
    return "no LayerNorm's simulated int8 error improved with any alpha"
