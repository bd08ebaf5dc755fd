"""The LayerNorm-MLP sublayer of an EoMT layer, with LayerScale and the residual add.

- GELU MLP:  x + fc2(GELU(fc1(LN(x)))) * ls
- SwiGLU:    x + down(silu(gate(LN x)) * up(LN x)) * ls, with gate and up as one GEMM over
  ``gate_up_weight = cat([W_gate, W_up])`` (the layout transformers 4.x stored as ``mlp.weights_in``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import gelu_ref


def layernorm_mlp_ref(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """x + fc2(GELU(fc1(LayerNorm(x)))) * scale, computed in the input dtype."""
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    h = gelu_ref(F.linear(h, fc1_weight, fc1_bias))
    return F.linear(h, fc2_weight, fc2_bias) * scale + x


def layernorm_swiglu_ref(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    gate_up_weight: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """x + down(silu(gate) * up) * scale with [gate | up] = LayerNorm(x) @ gate_up_weight^T + bias."""
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    gate, up = F.linear(h, gate_up_weight, gate_up_bias).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down_weight, down_bias) * scale + x
