"""The plain-PyTorch references of the fused ops, each against an independent definition in float64."""

import pytest
import torch
import torch.nn.functional as F

from eomt_fast.kernels import (
    attention_ref,
    grid_attention_mask_ref,
    layernorm_mlp_ref,
    layernorm_swiglu_ref,
    linear_residual_ref,
    mask_logits_ref,
    patch_embed_ref,
    upscale_block_ref,
)
from eomt_fast.kernels.upscale import prepare_convt_weight

f64 = torch.float64


def dense_attention(qkv, heads, allowed):
    """softmax over a dense (B, S, S) boolean mask, the way transformers builds it."""
    b, s, three_c = qkv.shape
    d = three_c // 3 // heads
    q, k, v = qkv.unflatten(-1, (3, heads, d)).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) * d**-0.5
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1)


@pytest.mark.parametrize(("batch", "seq", "heads", "q", "prefix"), [(2, 30, 2, 5, 3), (1, 17, 1, 0, 1), (3, 12, 4, 8, 1)],
                         ids=["B2-S30-H2-Q5", "B1-S17-H1-Q0", "B3-S12-H4-Q8"])
@pytest.mark.parametrize("kind", ["none", "random", "all-false", "one-column"])
def test_attention_ref(batch, seq, heads, q, prefix, kind):
    g = torch.Generator().manual_seed(seq)
    wide = torch.randn(batch, seq, 3 * heads * 8 + 5, dtype=f64, generator=g)
    qkv = wide[..., 2:2 + 3 * heads * 8]  # a strided view, as a fused projection's slice would be
    patch_start = q + prefix
    patches = seq - patch_start
    mask = None
    if kind == "random":
        mask = torch.rand(batch, q, patches, generator=g) > 0.5
    elif kind == "all-false":
        mask = torch.zeros(batch, q, patches, dtype=torch.bool)
    elif kind == "one-column":
        mask = torch.zeros(batch, q, patches, dtype=torch.bool)
        mask[..., patches // 2] = True
    allowed = None
    if mask is not None:
        allowed = torch.ones(batch, seq, seq, dtype=torch.bool)
        allowed[:, :q, patch_start:] = mask
    out = attention_ref(qkv, heads, mask, patch_start if mask is not None else None)
    assert out.shape == (batch, seq, heads * 8) and torch.isfinite(out).all()
    torch.testing.assert_close(out, dense_attention(qkv, heads, allowed), rtol=1e-12, atol=1e-12)


def test_attention_ref_rejects_a_mask_of_the_wrong_width():
    qkv = torch.randn(1, 10, 12, dtype=f64)
    with pytest.raises(ValueError, match="covers 4 patches starting at token 3, but the sequence has 10"):
        attention_ref(qkv, 2, torch.ones(1, 2, 4, dtype=torch.bool), 3)


@pytest.mark.parametrize("factor", [1, 2, 4, 8, 3])
def test_grid_attention_mask_equals_resized_logits(factor):
    g = torch.Generator().manual_seed(factor)
    grid, channels = 5, 16
    mask_embeddings = torch.randn(2, 7, channels, dtype=f64, generator=g)
    pixels = torch.randn(2, grid * factor, grid * factor, channels, dtype=f64, generator=g)
    logits = mask_logits_ref(mask_embeddings, pixels)
    expected = F.interpolate(logits, size=(grid, grid), mode="bilinear", align_corners=False) > 0
    got = grid_attention_mask_ref(mask_embeddings, pixels, grid)
    assert got.dtype == torch.bool and got.shape == (2, 7, grid * grid)
    assert torch.equal(got, expected.flatten(2))


def test_4x_downsample_is_the_mean_of_four_pixels():
    """The fact the fused grid mask relies on (eomt-reference.md)."""
    x = torch.randn(1, 3, 40, 40, dtype=f64)
    mean = x.unfold(2, 4, 4).unfold(3, 4, 4)[..., 1:3, 1:3].mean((-1, -2))
    torch.testing.assert_close(F.interpolate(x, size=(10, 10), mode="bilinear"), mean, rtol=1e-14, atol=1e-14)


def test_mask_logits_ref_is_the_einsum():
    me, pe = torch.randn(2, 5, 8, dtype=f64), torch.randn(2, 6, 6, 8, dtype=f64)
    expected = torch.einsum("bqc,bchw->bqhw", me, pe.permute(0, 3, 1, 2))
    torch.testing.assert_close(mask_logits_ref(me, pe), expected)


def test_upscale_block_matches_transformers_scale_layer():
    pytest.importorskip("transformers")
    from transformers import EomtConfig
    from transformers.models.eomt.modeling_eomt import EomtScaleLayer

    torch.manual_seed(0)
    layer = EomtScaleLayer(EomtConfig(hidden_size=16)).double().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 16, 5, 7, dtype=f64)
    expected = layer(x)
    got = upscale_block_ref(x.permute(0, 2, 3, 1), prepare_convt_weight(layer.conv1.weight), layer.conv1.bias,
                            layer.conv2.weight, layer.layernorm2d.weight, layer.layernorm2d.bias, 1e-6)
    assert got.shape == (2, 10, 14, 16)
    torch.testing.assert_close(got.permute(0, 3, 1, 2), expected, rtol=1e-12, atol=1e-12)


def test_patch_embed_ref_is_the_strided_conv():
    x = torch.randn(2, 3, 32, 48, dtype=f64)
    weight, bias, pos = torch.randn(8, 3, 16, 16, dtype=f64), torch.randn(8, dtype=f64), torch.randn(6, 8, dtype=f64)
    expected = F.conv2d(x, weight, bias, stride=16).flatten(2).transpose(1, 2) + pos
    torch.testing.assert_close(patch_embed_ref(x, weight.flatten(1), bias, pos, 16), expected)


def test_layernorm_mlps_and_residual_projection():
    c, hidden = 12, 20
    x = torch.randn(3, 7, c, dtype=f64)
    ln_w, ln_b = torch.randn(c, dtype=f64), torch.randn(c, dtype=f64)
    w1, b1 = torch.randn(2 * hidden, c, dtype=f64), torch.randn(2 * hidden, dtype=f64)
    w2, b2 = torch.randn(c, hidden, dtype=f64), torch.randn(c, dtype=f64)
    scale = torch.randn(c, dtype=f64)
    h = F.layer_norm(x, (c,), ln_w, ln_b, 1e-6)
    gelu = x + scale * (F.gelu(h @ w1[:hidden].T + b1[:hidden]) @ w2.T + b2)
    torch.testing.assert_close(layernorm_mlp_ref(x, ln_w, ln_b, 1e-6, w1[:hidden], b1[:hidden], w2, b2, scale), gelu)
    gate, up = h @ w1[:hidden].T + b1[:hidden], h @ w1[hidden:].T + b1[hidden:]
    swiglu = x + scale * ((F.silu(gate) * up) @ w2.T + b2)
    torch.testing.assert_close(layernorm_swiglu_ref(x, ln_w, ln_b, 1e-6, w1, b1, w2, b2, scale), swiglu)
    torch.testing.assert_close(linear_residual_ref(h, w2[:, :c], b2, scale, x), x + scale * (h @ w2[:, :c].T + b2))
