"""`castling-deploy info`: what a checkpoint is, how big, how costly, and whether its softmax branch is alive."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .data import random_inputs
from .fold import branch_ratios
from .models.checkpoint import load_checkpoint
from .models.macs import count_macs, count_params
from .models.vit import CastlingViT

PROBE_INPUTS = 8


def checkpoint_info(path: Path, arch: str | None = None, img_size: int | None = None) -> dict[str, Any]:
    ck = load_checkpoint(path, arch=arch, img_size=img_size)
    cfg = ck.config
    model = ck.build_model()
    deploy = ck.build_model(form="deploy") if cfg.attention == "castling" else model
    baseline = CastlingViT(cfg.with_(attention="softmax", form="deploy"))
    branch: dict[str, Any]
    if cfg.attention != "castling":
        branch = {"status": "n/a (softmax attention)"}
    elif cfg.form == "deploy":
        branch = {"status": "folded (deploy form: no softmax branch)"}
    else:
        rows = branch_ratios(model, random_inputs(PROBE_INPUTS, cfg.img_size).images)
        worst = max((r["max_ratio"] for r in rows), default=0.0)
        if cfg.threshold >= 1.0:
            status = "inert: mask threshold >= 1 can never fire (fold is lossless)"
        elif worst == 0.0:
            status = "inactive on probe inputs (measure on real images with `fold --calib`)"
        else:
            status = f"ALIVE: up to {worst:.3g} of the linear branch on probe inputs (fold may change predictions)"
        branch = {"status": status, "threshold": cfg.threshold, "probe": f"{PROBE_INPUTS} seeded random inputs",
                  "max_ratio_per_block": [r["max_ratio"] for r in rows]}
    return {
        "path": str(path),
        "sha256": ck.sha256,
        "format": ck.source_format,
        "arch": ck.arch,
        "form": cfg.form if cfg.attention == "castling" else "softmax baseline",
        "config": cfg.to_dict(),
        "resolution": cfg.img_size,
        "tokens": cfg.num_tokens,
        "params": count_params(model),
        "macs": {"as_stored": count_macs(model, cfg.img_size, cfg.in_chans),
                 "deploy_form": count_macs(deploy, cfg.img_size, cfg.in_chans),
                 "softmax_baseline": count_macs(baseline, cfg.img_size, cfg.in_chans)},
        "softmax_branch": branch,
        "preprocess": ck.preprocess,
        "labels": ck.labels,
        "train": ck.extra.get("train"),
    }


def format_info(d: dict[str, Any]) -> str:
    m = d["macs"]
    lines = [
        f"checkpoint   {d['path']}  ({d['format']}, sha256 {d['sha256'][:12]}…)",
        f"architecture {d['arch']}  ({d['config']['embed_dim']} dim, {d['config']['depth']} blocks, "
        f"{d['config']['num_heads']} heads, patch {d['config']['patch_size']})",
        f"form         {d['form']}",
        f"resolution   {d['resolution']} px, {d['tokens']} tokens, {d['config']['num_classes']} classes",
        f"params       {d['params'] / 1e6:.3f} M",
        f"MACs         {m['as_stored'] / 1e6:.2f} M as stored, {m['deploy_form'] / 1e6:.2f} M deploy form, "
        f"{m['softmax_baseline'] / 1e6:.2f} M softmax baseline",
        f"softmax branch {d['softmax_branch']['status']}",
    ]
    if d.get("train"):
        t = d["train"]
        lines.append(f"trained      {t.get('command', '?')} — val top-1 {t.get('val_top1', float('nan')):.2f}% "
                     f"in {t.get('seconds', '?')} s")
    return "\n".join(lines)
