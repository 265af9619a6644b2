"""The attention math, recomputed independently from the formulas in DESIGN.md (numpy, not the module)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from castling_deploy.models.attention import LinearAngularAttention, SoftmaxAttention


def reference_castling(x: np.ndarray, w_qkv, b_qkv, w_proj, b_proj, w_dconv, heads: int, threshold: float | None):
    """Per head: sparse@v + 0.5 v + (1/pi) q̂ (k̂ᵀ v); normalize; + DWConv_(9,1)(v) over tokens; proj."""
    B, N, C = x.shape
    d = C // heads
    qkv = x @ w_qkv.T + b_qkv  # (B,N,3C)
    q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, N, heads, d).transpose(0, 2, 1, 3) for i in range(3))
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(heads):
            qh, kh, vh = q[b, h], k[b, h], v[b, h]
            qn = qh / np.linalg.norm(qh, axis=-1, keepdims=True)
            kn = kh / np.linalg.norm(kh, axis=-1, keepdims=True)
            y = 0.5 * vh + (qn @ (kn.T @ vh)) / math.pi
            if threshold is not None:
                s = qh @ kh.T / math.sqrt(d)
                p = np.exp(s - s.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
                y = y + (p * (p > threshold)) @ vh
            y = y / np.linalg.norm(y, axis=-1, keepdims=True)
            kern = w_dconv[h, 0, :, 0]  # (9,)
            padded = np.pad(vh, ((4, 4), (0, 0)))
            conv = np.stack([(kern[:, None] * padded[t:t + 9]).sum(0) for t in range(N)])
            out[b, h] = y + conv
    merged = out.transpose(0, 2, 1, 3).reshape(B, N, C)
    return merged @ w_proj.T + b_proj


@pytest.mark.parametrize("sparse,threshold", [(True, 0.02), (True, 0.0), (False, 0.02)])
def test_castling_attention_matches_formulas(sparse: bool, threshold: float) -> None:
    torch.manual_seed(0)
    attn = LinearAngularAttention(48, 3, sparse_reg=sparse, threshold=threshold).double().eval()
    x = torch.randn(2, 13, 48, dtype=torch.float64)
    with torch.no_grad():
        got = attn(x).numpy()
    p = {k: v.detach().numpy() for k, v in attn.state_dict().items()}
    want = reference_castling(x.numpy(), p["qkv.weight"], p["qkv.bias"], p["proj.weight"], p["proj.bias"],
                              p["dconv.weight"], 3, threshold if sparse else None)
    assert np.abs(got - want).max() < 1e-5
    if sparse and threshold == 0.0:  # the branch is alive here, so the deploy form must differ
        attn.sparse_reg = False
        with torch.no_grad():
            assert np.abs(attn(x).numpy() - want).max() > 1e-3


def test_float32_module_matches_reference_to_1e5() -> None:
    torch.manual_seed(3)
    attn = LinearAngularAttention(64, 4, sparse_reg=True, threshold=0.02).eval()
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        got = attn(x).numpy()
    p = {k: v.detach().double().numpy() for k, v in attn.state_dict().items()}
    want = reference_castling(x.double().numpy(), p["qkv.weight"], p["qkv.bias"], p["proj.weight"],
                              p["proj.bias"], p["dconv.weight"], 4, 0.02)
    assert np.abs(got - want).max() < 1e-5


def test_rsqrt_norm_form_is_exact_and_zero_vectors_give_no_nan() -> None:
    torch.manual_seed(0)
    attn = LinearAngularAttention(32, 2, sparse_reg=False).eval()
    x = torch.randn(3, 9, 32)
    with torch.no_grad():
        a = attn(x)
        attn.norm_form = "rsqrt"
        b = attn(x)
        z = attn(torch.zeros(1, 9, 32))
    assert (a - b).abs().max() < 1e-5
    assert torch.isfinite(z).all()


def test_softmax_baseline_matches_formula() -> None:
    torch.manual_seed(0)
    attn = SoftmaxAttention(24, 2).double().eval()
    x = torch.randn(1, 5, 24, dtype=torch.float64)
    p = {k: v.numpy() for k, v in attn.state_dict().items()}
    qkv = x.numpy()[0] @ p["qkv.weight"].T + p["qkv.bias"]
    outs = []
    for h in range(2):
        q, k, v = (qkv[:, i * 24 + h * 12: i * 24 + (h + 1) * 12] for i in range(3))
        s = q @ k.T / math.sqrt(12)
        e = np.exp(s - s.max(-1, keepdims=True))
        outs.append((e / e.sum(-1, keepdims=True)) @ v)
    want = np.concatenate(outs, -1) @ p["proj.weight"].T + p["proj.bias"]
    with torch.no_grad():
        assert np.abs(attn(x).numpy()[0] - want).max() < 1e-10
