"""Helpers for tests and benchmarks: random-weight transformers EoMT models to compare against.

Needs transformers (the ``test`` extra). Nothing here downloads anything.
"""

from __future__ import annotations

from typing import Any

import torch

# Shapes to test with. "hf_tiny" is the config of transformers' own EoMT tests.
TEST_CONFIGS: dict[str, dict[str, Any]] = {
    "hf_tiny": dict(image_size=40, patch_size=2, num_queries=5, num_register_tokens=19, num_labels=4,
                    hidden_size=8, num_attention_heads=2, num_hidden_layers=4, num_blocks=1),
    "small_r4": dict(image_size=64, patch_size=8, num_queries=7, num_register_tokens=4, num_labels=5,
                     hidden_size=64, num_attention_heads=4, num_hidden_layers=4, num_blocks=2),
    "r0_swiglu": dict(image_size=48, patch_size=8, num_queries=6, num_register_tokens=0, num_labels=3,
                      hidden_size=48, num_attention_heads=3, num_hidden_layers=3, num_blocks=3, use_swiglu_ffn=True),
    "hd64_up1": dict(image_size=32, patch_size=4, num_queries=9, num_register_tokens=4, num_labels=6,
                     hidden_size=128, num_attention_heads=2, num_hidden_layers=3, num_blocks=1, num_upscale_blocks=1),
}

ORACLE_ATTENTION = "sdpa_same_dtype_mask"


def register_oracle_attention() -> str:
    """transformers' sdpa attention with its float mask cast to the query dtype.

    transformers builds the masked-layer mask in float32 whatever the model dtype. PyTorch 2.13's CPU
    ``scaled_dot_product_attention`` computes wrong results for float64 q/k/v with a float32 mask (the
    answer changes when the same mask is passed as float64), so a float64 oracle casts the mask first.
    For float32 models the cast is a no-op; for fp16/bf16 the mask values (+1 / -1e9) only change rounding.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def sdpa_same_dtype_mask(module, query, key, value, attention_mask, **kwargs):
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.to(query.dtype)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(ORACLE_ATTENTION, sdpa_same_dtype_mask)
    return ORACLE_ATTENTION


@torch.no_grad()
def random_hf_model(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_mask_probs: list[float] | None = None,
    attn_implementation: str | None = None,
    **config_kwargs: Any,
):
    """A transformers EomtForUniversalSegmentation with random weights, in eval mode.

    Every parameter is perturbed after transformers' init so that nothing sits at an identity value
    (register tokens are zeros, LayerNorm weights ones and LayerScale 1.0 after a plain init), which
    would let a wrong mapping of those weights pass unnoticed.
    """
    from transformers import EomtConfig, EomtForUniversalSegmentation

    torch.manual_seed(seed)
    model = EomtForUniversalSegmentation(EomtConfig(**config_kwargs)).eval()
    for param in model.parameters():
        param.add_(torch.randn_like(param) * 0.1 * (param.abs().mean() + 0.1))
    if attn_mask_probs is not None:
        model.attn_mask_probs.copy_(torch.tensor(attn_mask_probs, dtype=model.attn_mask_probs.dtype))
    model.set_attn_implementation(attn_implementation or register_oracle_attention())
    return model.to(dtype)
