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
All ops stay plain int8 CONCATENATION / SLICE / ADD (XNNPACK-friendly).

The class-token path in 16x8 (issue 16, default; ``--strict-int8`` turns it off): with the streams split, the
per-tensor trace showed the class stream losing ~0.5 dB per block while the patch stream's int8 requantizations
hardly mattered (int16 residual ADDs for the patch stream: +0.1 dB; for the class stream: +1.4 dB). Every op
whose output is one token (``[1, 1, C]``: the class stream's ADDs, its LayerNorms, proj, fc1 / GELU / fc2, the
head) gets int16 activations with int8 weights, LiteRT's 16x8 scheme; the quantizer puts int8 <-> int16
QUANTIZE ops at the borders. castling_deit_tiny@224, 32 / 128 held-out image-like inputs vs the fp32 .tflite:
23.49 / 23.36 dB -> 26.79 / 26.58 dB, top-1 agreement 0.781 / 0.844 -> 0.844 / 0.930, for +6 % latency on
XNNPACK (1 thread: 12.11 -> 12.89 ms, LiteRT fp32 20.80 ms): the int16 ops run on builtin kernels (XNNPACK has
no int16), but they are 1 token of 197. No float tensor anywhere either way. Delegates without 16-bit kernels
(Edge TPU, Ethos-U) take ``--strict-int8``.

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
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...models.token_conv import TokenConv, swap_modules
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
            x = torch.cat([blk.norm1(c), blk.norm1(p)], dim=1)
            if hasattr(blk.attn, "pre_proj"):  # proj per stream too: the class row gets its own output scale
                o = blk.attn.pre_proj(x)
                c, p = c + blk.attn.attn.proj(o[:, :1]), p + blk.attn.attn.proj(o[:, 1:])
            else:
                o = blk.attn(x)
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
        self.token_conv = TokenConv(attn)

    def _l2(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        """``gain * x / |x|``, the gain folded into the sum-of-squares FULLY_CONNECTED (weights and bias / gain^2)."""
        inv = 1.0 / (gain * gain)
        return x * torch.rsqrt(F.linear(x * x, self.ones * inv, self.eps2 * inv))

    def pre_proj(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        b, n, c = x.shape
        flat = a.qkv(x)
        qkv = a.heads(flat)
        # q and k normalised as one tensor (one sum-of-squares FC, one RSQRT for both: a builtin-kernel op and an
        # XNNPACK partition boundary fewer per block), each with gain sqrt(2/pi), so qn (kn^T v) carries the 2/pi
        # of l2(0.5 v + qn (kn^T v) / pi) = l2(v + (2/pi) qn (kn^T v)): the L2 norm is scale-invariant, so the
        # two constant MULs go too, with their int8 requantizations
        qkn = self._l2(qkv[:2], math.sqrt(2.0 / math.pi))
        qn, kn, v = qkn[0], qkn[1], qkv[2]
        out = self._l2(v + qn @ (kn.transpose(-2, -1) @ v)).transpose(1, 2).reshape(b, n, c)
        return out + self.token_conv(flat[..., 2 * c:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.proj(self.pre_proj(x))


def _xnn_spelling(model: nn.Module) -> int:
    """Swap LayerNorms and deploy-form Castling attentions for their XNNPACK-int8 spellings; count swaps."""
    from ...models.attention import LinearAngularAttention

    def spelled(m: nn.Module) -> nn.Module | None:
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            return XnnLayerNorm(m)
        if isinstance(m, LinearAngularAttention) and not m.sparse_reg:
            return XnnCastlingAttention(m)
        return None

    return swap_modules(model, spelled)


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


# op types of the class-token path that run 16x8 (SLICE / RESHAPE excluded: their int16 twin would make the
# quantizer requantize the whole sequence tensor they slice the class row from)
INT16_OPS = ("ADD", "SUB", "MUL", "MEAN", "RSQRT", "FULLY_CONNECTED", "GELU")


def class_token_ops(interp: Any) -> dict[str, list[str]]:
    """Op type -> output tensor names of the ops whose output is a single token (every axis but the last 1), read
    from a LiteRT interpreter of the float graph.

    In a split-stream graph (batch 1) those are the class token's path: its residual ADDs, LayerNorms, proj,
    MLP and the head. The patch stream and the attention over the whole sequence are never single-token."""
    details = interp.get_tensor_details()
    out: dict[str, list[str]] = {}
    for op in interp._get_ops_details():
        outputs = [i for i in op["outputs"] if i >= 0]
        if op["op_name"] not in INT16_OPS or len(outputs) != 1:
            continue
        shape = [int(d) for d in details[outputs[0]]["shape"]]
        if len(shape) >= 2 and all(d == 1 for d in shape[:-1]):
            out.setdefault(op["op_name"], []).append(details[outputs[0]]["name"])
    return out


def quantize_static_int8(fp32: bytes, calib: np.ndarray,
                         class_token_int16: bool = True) -> tuple[bytes, str, dict[str, Any]]:
    """``xnnpack_recipe`` (static_wi8_ai8): global min/max over the whole set (the default moving average clips),
    then each int8 activation's range narrowed to its MSE-optimal clip (``mse_clip_ranges``); with
    ``class_token_int16`` the class-token path runs 16x8 (``class_token_ops``). Returns the model, the
    quantizer's name and the range summary for the report (``int16_ops``: how many ops run 16x8)."""
    from .trace import keeping_interpreter

    quantizer, _, _, _, tool = import_quantizer_modules()
    interp = keeping_interpreter(fp32, threads=max(1, os.cpu_count() or 1))  # one float graph for both passes
    int16 = class_token_ops(interp) if class_token_int16 else {}
    qt = quantizer.Quantizer(bytearray(fp32), xnnpack_recipe(int16))
    keep = {name for names in int16.values() for name in names}
    qsvs, ranges = mse_clip_ranges(interp, min_max_qsvs(fp32, calib, qt), calib, keep_full=keep)
    ranges["int16_ops"] = {op: len(names) for op, names in sorted(int16.items())}
    result = qt.quantize(qsvs, **_quiet_kwargs(qt.quantize))
    return bytes(result.quantized_model), tool, ranges


def min_max_qsvs(fp32: bytes, calib: np.ndarray, qt: Any = None) -> dict[str, Any]:
    """Per-tensor min/max over the whole calibration set (the quantizer's calibrator, ``xnnpack_recipe``)."""
    quantizer, calibrator, _, qsv_utils, _ = import_quantizer_modules()
    qt = qt or quantizer.Quantizer(bytearray(fp32), xnnpack_recipe())
    cal = calibrator.Calibrator(fp32, num_threads=max(1, os.cpu_count() or 1), qsv_update_func=qsv_utils.min_max_update)
    cal.calibrate({SIGNATURE: [{INPUT_NAME: img[None]} for img in calib]}, qt._recipe_manager)
    return cal.get_model_qsvs()


CLIP_GRID = np.round(np.arange(0.25, 1.0001, 0.025), 3)  # fraction of each end of the min/max range kept
HIST_BINS = 2048


def best_clip(hist: np.ndarray, lo: float, hi: float, symmetric: bool) -> tuple[float, float, float, float]:
    """The clip of a histogram over [lo, hi] with the smallest expected squared int8 error.

    Asymmetric: each end scaled on its own by a fraction in CLIP_GRID (a tail on one side is cut without
    shrinking the other); symmetric: one fraction of max(|lo|, |hi|) on a 127-level grid each side.
    Returns (fraction kept of lo, of hi, error of that clip, error of the full range)."""
    centres = lo + (np.arange(len(hist)) + 0.5) * (hi - lo) / len(hist)
    if symmetric:
        m = max(abs(lo), abs(hi)) * CLIP_GRID[:, None]
        step = m / 127.0
        q = np.clip(np.round(centres[None] / step), -127, 127) * step
        err = (hist[None] * (centres[None] - q) ** 2).sum(1)
        i = _last_argmin(err)
        return float(CLIP_GRID[i]), float(CLIP_GRID[i]), float(err[i]), float(err[-1])
    best = (1.0, 1.0, np.inf)
    full = np.inf
    b = hi * CLIP_GRID[:, None]  # every hi fraction at once
    for t_lo in CLIP_GRID[::-1]:  # widest first: a tie keeps the wider range
        a = lo * t_lo
        step = (b - a) / 255.0
        q = np.clip(np.round((centres[None] - a) / step), 0, 255) * step + a
        err = (hist[None] * (centres[None] - q) ** 2).sum(1)
        j = _last_argmin(err)
        if err[j] < best[2]:
            best = (float(t_lo), float(CLIP_GRID[j]), float(err[j]))
        if t_lo == CLIP_GRID[-1]:
            full = float(err[-1])
    return best[0], best[1], best[2], full


def _last_argmin(err: np.ndarray) -> int:
    return len(err) - 1 - int(np.argmin(err[::-1]))


def mse_clip_ranges(interp: Any, qsvs: dict[str, Any], calib: np.ndarray,
                    keep_full: set[str] | frozenset[str] = frozenset()) -> tuple[dict[str, Any], dict[str, Any]]:
    """Narrow each activation's calibrated [min, max] to the clip that minimises its int8 error on the calib set.

    Global min/max spends the int8 grid on the few extreme values of the set: castling_deit_tiny@224 (image-like
    inputs, 64 calibration / 32 held-out) 22.37 dB -> 22.89 dB logit SQNR vs the fp32 .tflite. A second pass runs
    the float graph (builtin kernels, every tensor kept) over the calibration images and builds a fixed-size
    histogram per tensor over its min/max range, so memory does not grow with the set; the clip (25-100 % of
    each end of the range) with the smallest expected squared error is kept. RSQRT inputs (the
    LayerNorm variances and L2 sums of squares) keep their full range: clipping them mis-normalises exactly the
    largest tokens (measured: 22.76 dB when they are clipped too). BATCH_MATMUL tensors are scored on the
    symmetric grid the recipe gives them. Tensors named in ``keep_full`` (int16 ones: their grid is fine enough)
    keep their range too. ``interp``: ``trace.keeping_interpreter`` of the float graph the ranges belong to.
    """
    from .trace import feed

    details = {d["name"]: d for d in interp.get_tensor_details()}
    by_index = {d["index"]: d["name"] for d in details.values()}
    ops = interp._get_ops_details()
    int16_kept = bool(keep_full)
    keep_full = set(keep_full) | {by_index[i] for o in ops if o["op_name"] == "RSQRT" for i in o["inputs"]
                                  if i in by_index}
    symmetric = {by_index[i] for o in ops if o["op_name"] == "BATCH_MATMUL"
                 for i in list(o["inputs"]) + list(o["outputs"]) if i in by_index}
    spans: dict[str, tuple[float, float]] = {}
    for name, qsv in qsvs.items():
        if name in keep_full or name not in details or np.size(qsv.get("min", [])) != 1:
            continue
        lo, hi = min(float(np.min(qsv["min"])), 0.0), max(float(np.max(qsv["max"])), 0.0)
        if hi > lo:
            spans[name] = (lo, hi)
    hists = {name: np.zeros(HIST_BINS) for name in spans}
    for img in calib:
        feed(interp, img)
        for name, (lo, hi) in spans.items():
            try:
                values = interp.get_tensor(details[name]["index"])
            except ValueError:  # not materialised (internal to a fused op)
                continue
            hists[name] += np.histogram(values, bins=HIST_BINS, range=(lo, hi))[0]
    out = dict(qsvs)
    kept, clipped = [], 0
    for name, (lo, hi) in spans.items():
        if hists[name].sum() == 0:
            continue
        t_lo, t_hi, _, _ = best_clip(hists[name], lo, hi, name in symmetric)
        kept.append(t_lo * abs(lo) / (abs(lo) + hi) + t_hi * hi / (abs(lo) + hi))  # fraction of the span kept
        if (t_lo, t_hi) != (1.0, 1.0):
            clipped += 1
            out[name] = dict(qsvs[name], min=np.asarray(qsvs[name]["min"]) * t_lo,
                             max=np.asarray(qsvs[name]["max"]) * t_hi)
    summary = {"method": "MSE-optimal clip of each end of the global min/max range per activation (histogram, "
                         f"{HIST_BINS} bins, 25-100 % of each end kept); RSQRT inputs"
                         + (" and the int16 (16x8) tensors" if int16_kept else "") + " keep the full range",
               "tensors": len(kept), "clipped": clipped,
               "median_kept_fraction": round(float(np.median(kept)), 3) if kept else 1.0}
    return out, summary


def xnnpack_recipe(int16: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """static_wi8_ai8, with BATCH_MATMUL activations symmetric: XNNPACK takes an int8 BATCH_MATMUL of two
    activations only when the right-hand input's zero point is 0 (measured: of 24 asymmetric ones it took the
    3 whose calibrated zero point happened to be 0). ``int16``: op type -> output tensor names of ops that get
    int16 activations (symmetric, LiteRT's 16x8), one scope regex per op type (the quantizer matches every
    scope against every op: one alternation is ~100x faster than a regex per op)."""
    quantizer, _, recipe, _, _ = import_quantizer_modules()
    pkg = quantizer.__name__.rsplit(".", 1)[0]
    qtyping = importlib.import_module(f"{pkg}.qtyping")
    recipe_manager = importlib.import_module(f"{pkg}.recipe_manager")
    rm = recipe_manager.RecipeManager()
    rm.load_quantization_recipe(recipe.static_wi8_ai8())

    def symmetric(activation_bits: int) -> Any:  # symmetric activations, int8 per-channel weights
        return qtyping.OpQuantizationConfig(
            activation_tensor_config=qtyping.TensorQuantizationConfig(num_bits=activation_bits, symmetric=True),
            weight_tensor_config=qtyping.TensorQuantizationConfig(
                num_bits=8, symmetric=True, granularity=qtyping.QuantGranularity.CHANNELWISE),
            compute_precision=qtyping.ComputePrecision.INTEGER, explicit_dequantize=False)

    rm.add_quantization_config(".*", qtyping.TFLOperationName.BATCH_MATMUL, op_config=symmetric(8))
    for op, names in sorted((int16 or {}).items()):
        rm.add_quantization_config(
            "^(" + "|".join(re.escape(n) for n in names) + ");$",  # an op's scope: its output names, then ';'
            getattr(qtyping.TFLOperationName, op), op_config=symmetric(16))
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
