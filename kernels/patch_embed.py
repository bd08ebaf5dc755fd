"""Patch embedding: the stride-p p x p convolution as a GEMM over patches, plus position embedding.

out[b, i*g + j, :] = W @ patch(b, i, j) + bias + pos[i*g + j], where patch(b, i, j) flattens
pixel_values[b, :, i*p:(i+1)*p, j*p:(j+1)*p] in (channel, row, column) order, the order of a Conv2d
weight (C, channels, p, p) flattened to (C, channels*p*p).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_embed_ref(
    pixel_values: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    position_embeddings: torch.Tensor,
    patch_size: int,
) -> torch.Tensor:
    """pixel_values (B, ch, H, W), weight (C, ch*p*p), bias (C,), position_embeddings (P, C) -> (B, P, C)."""
    batch, channels, height, width = pixel_values.shape
    gh, gw = height // patch_size, width // patch_size
    patches = (
        pixel_values.reshape(batch, channels, gh, patch_size, gw, patch_size)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(batch, gh * gw, channels * patch_size * patch_size)
    )
    return F.linear(patches, weight, bias) + position_embeddings
