"""The mask side of predict(): per-query mask logits, and the attention mask of a masked layer.

- ``mask_logits_ref``: einsum("bqc,bhwc->bqhw") of the mask embeddings (mask-head output) with the
  channels-last pixel embeddings (upscale output): (B, Q, 4g, 4g) logits.
- ``grid_attention_mask_ref``: the boolean query->patch mask a masked layer needs,
  bilinear_resize(mask_logits, (g, g)) > 0. Resizing and the einsum are both linear, so the resize is
  applied to the pixel embeddings first (C channels instead of Q; for the default 4x upscale this is
  the mean of the pixels 4i+1..4i+2, 4j+1..4j+2) and the einsum runs at grid resolution: 16x less
  work, and the (B, Q, 4g, 4g) logits are never written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mask_logits_ref(mask_embeddings: torch.Tensor, pixel_embeddings: torch.Tensor) -> torch.Tensor:
    """mask_embeddings (B, Q, C), pixel_embeddings (B, H, W, C) -> logits (B, Q, H, W)."""
    batch, height, width, channels = pixel_embeddings.shape
    logits = torch.bmm(mask_embeddings, pixel_embeddings.reshape(batch, height * width, channels).transpose(1, 2))
    return logits.view(batch, mask_embeddings.shape[1], height, width)


def grid_attention_mask_ref(
    mask_embeddings: torch.Tensor, pixel_embeddings: torch.Tensor, grid_size: int
) -> torch.Tensor:
    """(B, Q, C), (B, H, W, C) -> boolean (B, Q, g*g): may query q attend to patch p.

    Equal to ``F.interpolate(mask_logits, (g, g), mode="bilinear") > 0`` (align_corners=False, no
    antialias) up to rounding, where the logit is within rounding of 0.
    """
    batch, height, width, channels = pixel_embeddings.shape
    if (height, width) == (grid_size, grid_size):
        small = pixel_embeddings
    else:
        small = F.interpolate(
            pixel_embeddings.permute(0, 3, 1, 2), size=(grid_size, grid_size), mode="bilinear", align_corners=False
        ).permute(0, 2, 3, 1)
    logits = torch.bmm(mask_embeddings, small.reshape(batch, grid_size * grid_size, channels).transpose(1, 2))
    return logits > 0
