"""Full-integer LiteRT: every activation int8, calibrated, with the graph spelled so that int8 keeps the signal.

Why the graph is rewritten (found with ``trace.trace_tensors`` on a clean castling_deit_tiny@224, image-like
inputs): the residual stream is one int8 tensor per block whose per-tensor scale is set by the patch tokens
(|x| up to ~3.3, step ~0.028), while the class token's row — the only row the head reads — has rms 0.025 at
block 0 growing to 0.34 at block 12. Requantizing that row at the patch tokens' step on each of the 24 residual
ADDs left the class token at 7 dB SQNR while the whole tensor still read 21 dB; top-1 agreement 0.31.

``split_stream_copy`` computes the same function with the class token and the patch tokens in two residual
tensors (each gets its own int8 scale): per block, the LayerNorms run on each stream, their unit-scale outputs are
concatenated for attention (which sees the whole sequence, as before), and its output is sliced back onto each
stream. The MLP is per token, so it runs on each stream on its own (same weights, no concatenation): the class
token's fc1 / GELU / fc2 outputs get their own int8 scales instead of the patch tokens' (castling_deit_tiny@224,
32 held-out image-like inputs: 21.93 -> 22.26 dB logit SQNR vs the fp32 .tflite; no latency change measured).
All ops stay plain int8 CONCATENATION / SLICE / ADD (XNNPACK-friendly); no int16 anywhere.

XNNPACK (issue 14): litert-torch's lowering of LayerNorm (SQUARED_DIFFERENCE, an ADD / SUB of a ~1e-9-scale
constant), the L2 norm's ``clamp_min`` (MAXIMUM) and asymmetric int8 BATCH_MATMULs are ops the XNNPACK delegate
refuses in int8 (measured with ``census.delegation_split`` on one-op models, ai-edge-litert 2.3.0), so they ran on
builtin kernels and cut the graph into ~150 delegate partitions. ``XnnLayerNorm`` / ``XnnCastlingAttention`` spell
the same functions with SUB / MUL / MEAN / FULLY_CONNECTED and ``xnnpack_recipe`` quantizes BATCH_MATMUL
activations symmetrically, which XNNPACK takes. Left on builtin kernels: RSQRT and GELU, which XNNPACK has no
int8 kernel for (it runs float RSQRT / GELU, but a float island would break the no-float-tensor contract).
"""
from __future__ import annotations

import copy
import importlib
import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...optional import import_optional

NORM_REWRITE_ATOL = 1e-4
SIGNATURE = "serving_default"
INPUT_NAME = "images"


class SplitStreamViT(nn.Module):
    """A CastlingViT whose residual stream is two tensors: class token ``[B,1,C]`` and patches ``[B,N,C]``."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit
        p = v.patch_embed(x) + v.pos_embed[:, 1:]
        c = (v.cls_token + v.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        for blk in v.blocks:
            o = blk.attn(torch.cat([blk.norm1(c), blk.norm1(p)], dim=1))
            c, p = c + o[:, :1], p + o[:, 1:]
            c, p = c + blk.mlp(blk.norm2(c)), p + blk.mlp(blk.norm2(p))  # per-token MLP: own int8 scales
        return v.head(v.norm(c)[:, 0])


class XnnLayerNorm(nn.Module):
    """LayerNorm over the last axis spelled with ops XNNPACK runs in int8: SUB, MUL, MEAN, FULLY_CONNECTED.

    ``(x - mean) * rsqrt(mean((x - mean)^2) + eps) * weight + bias`` is LayerNorm itself; litert-torch lowers
    ``nn.LayerNorm`` to SQUARED_DIFFERENCE and a ``0 - mean * rstd`` SUB with a 4e-12-scale constant, which
    XNNPACK refuses in int8 (no int8 SQUARED_DIFFERENCE; input/output scale ratio out of range). The variance
    plus eps is one FULLY_CONNECTED (weights 1/C, exact in int8 per-channel; bias eps) instead of MEAN + ADD of a
    tiny constant (refused by XNNPACK for the same scale ratio). Only RSQRT is left without an int8 XNNPACK kernel.
    """

    def __init__(self, ln: nn.LayerNorm) -> None:
        super().__init__()
        (dim,) = ln.normalized_shape
        self.register_buffer("avg", torch.full((1, dim), 1.0 / dim))
        self.register_buffer("eps", torch.full((1,), float(ln.eps)))
        self.weight = None if ln.weight is None else nn.Parameter(ln.weight.detach().clone(), requires_grad=False)
        self.bias = None if ln.bias is None else nn.Parameter(ln.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x - x.mean(dim=-1, keepdim=True)
        y = xc * torch.rsqrt(F.linear(xc * xc, self.avg, self.eps))
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


class XnnCastlingAttention(nn.Module):
    """Deploy-form linear-angular attention with its L2 norms as ``x * rsqrt(FC_ones(x*x) + eps^2)``.

    Same function as ``LinearAngularAttention.forward`` (``sparse_reg=False``): the sum of squares is a
    FULLY_CONNECTED with all-ones weights (exact in int8) whose bias is the clamp (``rsqrt(s + eps^2)`` equals
    ``rsqrt(max(s, eps^2))`` in float32 for every s but a zero vector, where both give 0 after the multiply), so
    no MAXIMUM (no int8 XNNPACK kernel) is left.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn
        from ...models.attention import NORM_EPS

        self.register_buffer("ones", torch.ones(1, attn.head_dim))
        self.register_buffer("eps2", torch.full((1,), NORM_EPS * NORM_EPS))

    def _l2(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(F.linear(x * x, self.ones, self.eps2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        b, n, c = x.shape
        q, k, v = a._split_heads(x)
        qn, kn = self._l2(q), self._l2(k)
        linear = 0.5 * v + (1.0 / math.pi) * (qn @ (kn.transpose(-2, -1) @ v))
        out = self._l2(linear) + a.dconv(v)
        return a.proj(out.transpose(1, 2).reshape(b, n, c))


def _xnn_spelling(model: nn.Module) -> int:
    """Swap LayerNorms and deploy-form Castling attentions for their XNNPACK-int8 spellings; count swaps."""
    from ...models.attention import LinearAngularAttention

    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.LayerNorm) and len(child.normalized_shape) == 1:
                swaps.append((parent, name, XnnLayerNorm(child)))
            elif isinstance(child, LinearAngularAttention) and not child.sparse_reg:
                swaps.append((parent, name, XnnCastlingAttention(child)))
    for parent, name, new in swaps:
        setattr(parent, name, new)
    return len(swaps)


def supports_split_stream(model: nn.Module) -> bool:
    needed = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm", "head")
    if not all(hasattr(model, n) for n in needed):
        return False
    return all(all(hasattr(b, n) for n in ("norm1", "attn", "norm2", "mlp")) for b in model.blocks)


def quantizable_copy(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The model spelled for full-integer int8: rsqrt L2 norms, split class-token stream (when the layout allows)."""
    rewritten = copy.deepcopy(model).eval()
    notes = []
    if hasattr(rewritten, "castling_attentions"):
        for attn in rewritten.castling_attentions():  # train form (kept as is below): quantizable spelling
            attn.norm_form = "rsqrt"
    swapped = _xnn_spelling(rewritten)
    if hasattr(rewritten, "castling_attentions") or swapped:
        notes.append("Castling L2 norms as x*rsqrt(sum(x*x))" + (
            "; L2 norms and LayerNorms spelled with SUB/MUL/MEAN/FULLY_CONNECTED (int8 ops XNNPACK takes)"
            if swapped else ""))
    if supports_split_stream(rewritten):
        rewritten = SplitStreamViT(rewritten).eval()
        notes.append("class token kept in its own residual tensor and MLP (own int8 scales)")
    return rewritten, notes


def max_abs_logit_diff(a: nn.Module, b: nn.Module, images: np.ndarray, batch: int = 16) -> float:
    worst = 0.0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i : i + batch])
            worst = max(worst, float((a(x) - b(x)).abs().max()))
    return worst


def import_quantizer_modules() -> tuple[Any, Any, Any, Any, str]:
    """(quantizer, calibrator, recipe, qsv_utils, dist name): litert-quantizer, else ai-edge-quantizer."""
    try:
        from litert_quantizer import calibrator, quantizer, recipe
        from litert_quantizer.utils import qsv_utils

        return quantizer, calibrator, recipe, qsv_utils, "litert-quantizer"
    except ImportError:
        import_optional("ai_edge_quantizer", "litert-quantizer", "tflite", "TFLite full-integer quantization")
        from ai_edge_quantizer import calibrator, quantizer, recipe
        from ai_edge_quantizer.utils import qsv_utils

        return quantizer, calibrator, recipe, qsv_utils, "ai-edge-quantizer"


def quantize_static_int8(fp32: bytes, calib: np.ndarray) -> tuple[bytes, str]:
    """``xnnpack_recipe`` (static_wi8_ai8) with global min/max calibration over the whole set (the default moving
    average clips)."""
    quantizer, calibrator, _, qsv_utils, tool = import_quantizer_modules()
    qt = quantizer.Quantizer(bytearray(fp32), xnnpack_recipe())
    cal = calibrator.Calibrator(fp32, num_threads=max(1, os.cpu_count() or 1), qsv_update_func=qsv_utils.min_max_update)
    cal.calibrate({SIGNATURE: [{INPUT_NAME: img[None]} for img in calib]}, qt._recipe_manager)
    result = qt.quantize(cal.get_model_qsvs(), **_quiet_kwargs(qt.quantize))
    return bytes(result.quantized_model), tool


def xnnpack_recipe() -> list[dict[str, Any]]:
    """static_wi8_ai8, with BATCH_MATMUL activations symmetric: XNNPACK takes an int8 BATCH_MATMUL of two
    activations only when the right-hand input's zero point is 0 (measured: of 24 asymmetric ones it took the
    3 whose calibrated zero point happened to be 0)."""
    quantizer, _, recipe, _, _ = import_quantizer_modules()
    pkg = quantizer.__name__.rsplit(".", 1)[0]
    qtyping = importlib.import_module(f"{pkg}.qtyping")
    recipe_manager = importlib.import_module(f"{pkg}.recipe_manager")
    rm = recipe_manager.RecipeManager()
    rm.load_quantization_recipe(recipe.static_wi8_ai8())
    rm.add_quantization_config(
        ".*", qtyping.TFLOperationName.BATCH_MATMUL,
        op_config=qtyping.OpQuantizationConfig(
            activation_tensor_config=qtyping.TensorQuantizationConfig(num_bits=8, symmetric=True),
            weight_tensor_config=qtyping.TensorQuantizationConfig(
                num_bits=8, symmetric=True, granularity=qtyping.QuantGranularity.CHANNELWISE),
            compute_precision=qtyping.ComputePrecision.INTEGER, explicit_dequantize=False),
    )
    return rm.get_quantization_recipe()


def quantize_defaults(fp32: bytes, calib: np.ndarray) -> bytes:
    """The quantizer's own defaults (static_wi8_ai8, its moving-average calibration): the peer row."""
    quantizer, _, recipe, _, _ = import_quantizer_modules()
    qt = quantizer.Quantizer(bytearray(fp32), recipe.static_wi8_ai8())
    qsvs = qt.calibrate({SIGNATURE: [{INPUT_NAME: img[None]} for img in calib]})
    return bytes(qt.quantize(qsvs, **_quiet_kwargs(qt.quantize)).quantized_model)


def _quiet_kwargs(fn: Any) -> dict[str, Any]:
    import inspect

    params = inspect.signature(fn).parameters
    for name in ("enable_progress_report", "enable_progress_bar"):
        if name in params:
            return {name: False}
    return {}
