"""Full-integer LiteRT: the XNNPACK-int8 spellings of LayerNorm and Castling attention compute the same function."""
from __future__ import annotations

import torch
from torch import nn

from castling_deploy.models import create_model
from castling_deploy.models.attention import LinearAngularAttention
from castling_deploy.models.token_conv import TokenConv, TokenConvAttention, token_conv_copy
from castling_deploy.targets.tflite.full_integer import XnnCastlingAttention, XnnLayerNorm, quantizable_copy


def test_layer_norm_spelling_is_exact() -> None:
    torch.manual_seed(0)
    ln = nn.LayerNorm(48, eps=1e-6)
    with torch.no_grad():
        ln.weight.normal_(1.0, 0.5)
        ln.bias.normal_(0.0, 0.5)
    x = torch.randn(2, 7, 48) * torch.logspace(-3, 1, 7)[None, :, None]  # token scales from 1e-3 to 10
    with torch.no_grad():
        assert torch.allclose(XnnLayerNorm(ln)(x), ln(x), atol=1e-5, rtol=1e-5)


def test_attention_spelling_is_exact_including_zero_rows() -> None:
    torch.manual_seed(0)
    attn = LinearAngularAttention(48, 3, sparse_reg=False).eval()
    x = torch.randn(2, 9, 48)
    x[1] = 0.0  # all-zero tokens: both spellings give the bias path, no NaN
    with torch.no_grad():
        ref, out = attn(x), XnnCastlingAttention(attn)(x)
    assert torch.isfinite(out).all() and torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_quantizable_copy_leaves_no_layer_norm_or_castling_attention() -> None:
    torch.manual_seed(0)
    model = create_model("castling_nano", form="deploy").eval()
    rewritten, _ = quantizable_copy(model)
    kinds = [type(m) for m in rewritten.modules()]
    assert nn.LayerNorm not in kinds and XnnLayerNorm in kinds
    # every attention runs through its wrapper (the wrapped module keeps the weights, its forward is not called)
    assert kinds.count(XnnCastlingAttention) == kinds.count(LinearAngularAttention) == len(model.blocks)
    assert any(isinstance(m, nn.LayerNorm) for m in model.modules())  # the source model is left as it was


def test_token_conv_spelling_is_exact_and_leaves_the_source_alone() -> None:
    torch.manual_seed(0)
    model = create_model("castling_nano", form="deploy").eval()
    for blk in model.blocks:  # a kernel that differs per head and per tap, so a wrong repeat or pad shows
        with torch.no_grad():
            blk.attn.dconv.weight.copy_(torch.randn_like(blk.attn.dconv.weight))
    rewritten, notes = token_conv_copy(model)
    kinds = [type(m) for m in rewritten.modules()]
    assert kinds.count(TokenConvAttention) == len(model.blocks) == kinds.count(TokenConv) and len(notes) == 1
    assert TokenConvAttention not in [type(m) for m in model.modules()]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(x), rewritten(x)
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
        attn = model.blocks[0].attn
        v = torch.randn(2, attn.num_heads, 17, attn.head_dim)  # the conv alone, token-major vs per head
        v_tok = v.transpose(1, 2).reshape(2, 17, -1)
        per_head = attn.dconv(v).transpose(1, 2).reshape(2, 17, -1)
        assert torch.allclose(TokenConv(attn)(v_tok), per_head, atol=1e-6)
