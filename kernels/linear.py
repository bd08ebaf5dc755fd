"""Projection GEMMs with their epilogues (and the prologue LayerNorm of the QKV projection).

- ``layernorm_linear_ref``: LN1 + fused QKV projection, y = LN(x) @ W^T + b, W = cat([Wq, Wk, Wv]).
- ``linear_residual_ref``: output projection + bias + LayerScale + residual, r + (x @ W^T + b) * ls.
- ``mask_head_ref``: the mask head MLP, fc3(GELU(fc2(GELU(fc1(x))))).
All references compute in the input dtype; the GELU is the exact erf form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gelu_ref(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU, x * Phi(x) with the erf (not the tanh approximation)."""
    return F.gelu(x)


def layernorm_linear_ref(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """LayerNorm over the last dim, then a linear layer: (..., C) -> (..., N)."""
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    return F.linear(h, weight, bias)


def linear_residual_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    residual: torch.Tensor,
) -> torch.Tensor:
    """residual + (x @ W^T + b) * scale, scale a per-channel LayerScale vector."""
    return F.linear(x, weight, bias) * scale + residual


def mask_head_ref(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    fc3_weight: torch.Tensor,
    fc3_bias: torch.Tensor,
) -> torch.Tensor:
    """The mask head MLP on the query tokens: fc1 -> GELU -> fc2 -> GELU -> fc3."""
    h = gelu_ref(F.linear(x, fc1_weight, fc1_bias))
    h = gelu_ref(F.linear(h, fc2_weight, fc2_bias))
    return F.linear(h, fc3_weight, fc3_bias)
