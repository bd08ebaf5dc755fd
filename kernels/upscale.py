"""One upscale block of the EoMT mask path, channels-last:
ConvTranspose2d(C, C, k=2, s=2) -> GELU -> depthwise Conv2d 3x3 (pad 1, no bias) -> LayerNorm over C.

A k=2, s=2 transposed convolution has no overlap: every input pixel is one GEMM row
(C -> 4C) whose four C-wide pieces are the output pixels (2i+a, 2j+b). With the weight prepared once
as (C_in, 2, 2, C_out) (``prepare_convt_weight``) the GEMM output is already in (a, b, channel) order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import gelu_ref


def prepare_convt_weight(weight: torch.Tensor) -> torch.Tensor:
    """ConvTranspose2d weight (C_in, C_out, 2, 2) -> (C_in, 2, 2, C_out), contiguous. Done at load."""
    return weight.permute(0, 2, 3, 1).contiguous()


def upscale_block_ref(
    x: torch.Tensor,
    convt_weight: torch.Tensor,
    convt_bias: torch.Tensor,
    dw_weight: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """x (B, H, W, C) channels-last -> (B, 2H, 2W, C) channels-last.

    convt_weight is the prepared (C_in, 2, 2, C_out) layout; dw_weight is the depthwise conv weight
    (C, 1, 3, 3) as stored in checkpoints.
    """
    batch, height, width, channels = x.shape
    out_channels = convt_weight.shape[-1]
    y = torch.matmul(x, convt_weight.reshape(channels, 4 * out_channels))  # (B, H, W, 2*2*C_out)
    y = y.view(batch, height, width, 2, 2, out_channels).permute(0, 1, 3, 2, 4, 5)
    y = gelu_ref(y.reshape(batch, 2 * height, 2 * width, out_channels) + convt_bias)
    y = F.conv2d(y.permute(0, 3, 1, 2), dw_weight, padding=1, groups=out_channels)  # channels-last strides
    y = y.permute(0, 2, 3, 1)
    return F.layer_norm(y, (out_channels,), ln_weight, ln_bias, eps)
