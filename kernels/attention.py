"""Masked query-patch attention: softmax(q k^T * D^-0.5 + mask) v for every head, not causal.

Token layout: [Q queries | CLS | R registers | P patches]. Only the query->patch block of the mask is
data dependent; every other pair is always allowed. The mask is therefore passed compactly as a
boolean (B, Q, P) tensor (True = may attend), shared by all heads, and no (S, S) mask is ever built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_query_patch_mask(query_patch_mask: torch.Tensor, seq_len: int, patch_start: int) -> torch.Tensor:
    """(B, Q, P) query->patch mask -> (B, Q, S) boolean rows for the query tokens.

    Columns before ``patch_start`` (queries, CLS, registers) are always allowed, so a query whose
    patch mask is all False still attends to them and its softmax row is never empty.
    """
    batch, num_queries, num_patches = query_patch_mask.shape
    if patch_start + num_patches != seq_len:
        raise ValueError(
            f"query_patch_mask covers {num_patches} patches starting at token {patch_start}, "
            f"but the sequence has {seq_len} tokens"
        )
    rows = query_patch_mask.new_ones((batch, num_queries, seq_len), dtype=torch.bool)
    rows[:, :, patch_start:] = query_patch_mask
    return rows


def attention_ref(
    qkv: torch.Tensor,
    num_heads: int,
    query_patch_mask: torch.Tensor | None = None,
    patch_start: int | None = None,
) -> torch.Tensor:
    """Reference for the masked query-patch attention kernel.

    qkv: (B, S, 3*C), the output of the fused QKV projection (q, k, v concatenated on the last dim),
    or any strided view with that shape. query_patch_mask: None (no masking) or a boolean (B, Q, P)
    tensor for the rows [0, Q) and the columns [patch_start, S), P = S - patch_start.
    Returns (B, S, C), heads concatenated, ready for the output projection.

    Computed in the input dtype with ``scaled_dot_product_attention``. With a mask, the Q query rows
    (the only masked ones) and the other S - Q rows are two calls, so memory stays O(Q * S).
    """
    batch, seq_len, three_c = qkv.shape
    if three_c % (3 * num_heads):
        raise ValueError(f"qkv last dimension {three_c} is not 3 * num_heads ({num_heads}) * head_dim")
    hidden = three_c // 3
    head_dim = hidden // num_heads
    q, k, v = qkv.unflatten(-1, (3, num_heads, head_dim)).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, S, D)
    scale = head_dim**-0.5
    if query_patch_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        if patch_start is None:
            raise ValueError("patch_start is required with a query_patch_mask")
        if query_patch_mask.dtype != torch.bool:
            raise TypeError(f"query_patch_mask must be bool, got {query_patch_mask.dtype}")
        num_queries = query_patch_mask.shape[1]
        rows = expand_query_patch_mask(query_patch_mask, seq_len, patch_start)[:, None]  # (B, 1, Q, S)
        out_queries = F.scaled_dot_product_attention(q[:, :, :num_queries], k, v, attn_mask=rows, scale=scale)
        out_others = F.scaled_dot_product_attention(q[:, :, num_queries:], k, v, scale=scale)
        out = torch.cat([out_queries, out_others], dim=2)
    return out.transpose(1, 2).reshape(batch, seq_len, hidden)
