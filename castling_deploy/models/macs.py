"""Multiply-accumulate counts measured with ``torch.utils.flop_counter`` (no hand-written counter)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_macs(model: nn.Module, img_size: int, in_chans: int = 3) -> int:
    """MACs of one forward pass at batch 1 (FLOPs / 2 as torch counts matmul/conv FLOPs as 2 per MAC)."""
    x = torch.zeros(1, in_chans, img_size, img_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(x)
    return counter.get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
