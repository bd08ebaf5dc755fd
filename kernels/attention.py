"""Masked query-patch attention: softmax(q k^T * D^-0.5 + mask) v for every head, not causal.

Token layout: [Q queries | CLS | R registers | P patches]. Only the query->patch block of the mask is
data dependent; every other pair is always allowed. The mask is therefore passed compactly as a
boolean (B, Q, P) tensor (True = may attend), shared by all heads, and no (S, S) mask is ever built.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from ._autotune import autotune
from ._triton import INTERPRETING, LAUNCH_OPTIONS, cdiv, check_devices, eager_direct, gpu_arch, next_power_of_2, on_input_device, tl, triton  # Triton, or a stand-in without it


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


def _split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, S, 3*C) -> q, k, v, each a (B, H, S, D) view."""
    three_c = qkv.shape[-1]
    if three_c % (3 * num_heads):
        raise ValueError(f"qkv last dimension {three_c} is not 3 * num_heads ({num_heads}) * head_dim")
    head_dim = three_c // (3 * num_heads)
    return qkv.unflatten(-1, (3, num_heads, head_dim)).permute(2, 0, 3, 1, 4).unbind(0)


def _query_rows(query_patch_mask: torch.Tensor, seq_len: int, patch_start: int | None) -> torch.Tensor:
    """The checked (B, Q, P) mask as (B, 1, Q, S) boolean rows, broadcast over the heads."""
    if patch_start is None:
        raise ValueError("patch_start is required with a query_patch_mask")
    if query_patch_mask.dtype != torch.bool:
        raise TypeError(f"query_patch_mask must be bool, got {query_patch_mask.dtype}")
    return expand_query_patch_mask(query_patch_mask, seq_len, patch_start)[:, None]


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
    q, k, v = _split_heads(qkv, num_heads)
    scale = q.shape[-1] ** -0.5
    if query_patch_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        rows = _query_rows(query_patch_mask, seq_len, patch_start)
        num_queries = rows.shape[2]
        out_queries = F.scaled_dot_product_attention(q[:, :, :num_queries], k, v, attn_mask=rows, scale=scale)
        out_others = F.scaled_dot_product_attention(q[:, :, num_queries:], k, v, scale=scale)
        out = torch.cat([out_queries, out_others], dim=2)
    return out.transpose(1, 2).reshape(batch, seq_len, three_c // 3)


def attention_probabilities(
    qkv: torch.Tensor,
    num_heads: int,
    query_patch_mask: torch.Tensor | None = None,
    patch_start: int | None = None,
) -> torch.Tensor:
    """The (B, H, S, S) attention probabilities of the attention above, as transformers' eager attention
    returns them for ``output_attentions=True``: q k^T * D^-0.5 in the input dtype, masked pairs at -inf
    (the additive -1e9 of transformers gives the same zeros), softmax in float32 (float64 stays float64,
    where transformers' eager attention rounds through float32), cast back. Plain PyTorch and O(S^2)
    memory: only for callers who ask for the weights, never on the forward's own path."""
    q, k, _ = _split_heads(qkv, num_heads)
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if query_patch_mask is not None:
        rows = _query_rows(query_patch_mask, qkv.shape[1], patch_start)
        scores[:, :, :rows.shape[2]].masked_fill_(~rows, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.promote_types(qkv.dtype, torch.float32)).to(qkv.dtype)


# ---------------------------------------------------------------------------------------------------
# Triton kernel
#
#   out[b, s, h*D:(h+1)*D] = softmax_t(q_s . k_t * D^-0.5 + bias[b, s, t]) @ v_t    for every head h,
#   bias[b, s, t] = -inf where s < Q, t >= patch_start and not query_patch_mask[b, s, t - patch_start],
#                   0 everywhere else.
#
# One program computes BLOCK_M rows of one (batch, head) with the online softmax (fp32 running max m,
# running sum l and accumulator acc), walking the keys in blocks of BLOCK_N. Only row blocks that hold
# query rows (start_m < Q) look at the mask; every other row block runs the plain loop.
# For those, a tiny helper kernel first packs the compact (B, Q, P) mask into 32-bit words in token
# coordinates, (B, Q, n_words) int32, bit j of word w = "row may attend to token 32*w + j" (tokens
# before patch_start read as allowed, the padding past S as blocked). A key tile loads its
# (BLOCK_M, BLOCK_N / 32) words (2 words a thread at 128 x 128 tiles; rows >= Q read as all ones):
# all zero -> the tile is skipped; all ones -> the unmasked path; otherwise the words are expanded to
# the (BLOCK_M, BLOCK_N) mask in registers.
# No row's softmax is ever empty: patch_start >= Q >= 1 whenever rows are masked, so key 0 is allowed
# for every row and the first key tile, processed first, is never skipped; the running max m is finite
# from then on, and a row blocked in a whole later tile only adds exp2(-inf - m) = 0.
# ---------------------------------------------------------------------------------------------------

# fp32 inputs: both dots run as three TF32 products ("tf32x3", error about fp32 rounding, ~1e-6
# relative) on the tensor cores, instead of plain TF32 (~1e-3) or "ieee" FMA dots (several times slower).
# fp16/bf16 inputs: 16-bit operands, fp32 accumulation; input_precision does not apply to them.
FP32_DOT_PRECISION = "tf32x3"
# Packed mask rows hold a multiple of 16 words (64 bytes): every key block of up to 512 tokens is
# inside the row, and the row stride keeps 16-byte alignment.
MASK_WORD_ALIGN = 16
MAX_BLOCK_N = 32 * MASK_WORD_ALIGN



def _configs() -> list[triton.Config]:
    if INTERPRETING:  # autotune with several configs needs a GPU: exactly one under the interpreter
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 64, 4, 3),
            (128, 64, 8, 3),
            (128, 128, 8, 2),
            (128, 128, 8, 3),
            (64, 64, 4, 3),
            (64, 64, 4, 4),
            (64, 128, 4, 2),
            (128, 64, 4, 4),
            # fp32 only (see _prune_configs): tf32x3 keeps hi/lo halves of the operands, so narrow key tiles
            (64, 32, 4, 1),
            (64, 32, 4, 2),
            (128, 32, 8, 2),
        ]
    ]


def _prune_configs(configs, named_args, **kwargs):
    """fp32 gets the small tiles only; 16-bit inputs the tensor-core-sized ones."""
    fp32 = named_args["QKV"].dtype == torch.float32
    kept = [c for c in configs if (c.kwargs["BLOCK_N"] == 32) == fp32]
    return kept or configs


@triton.jit
def _pack_mask_kernel(
    Mask,  # (B, Q, P) uint8 query->patch mask, 1 = may attend (a view of the bool mask)
    Bits,  # (B, Q, n_words) int32 output: bit j of word w = row may attend to token 32*w + j
    S, Q, patch_start, n_words,
    stride_mask_b, stride_mask_q, stride_mask_p,
    ROWS: tl.constexpr,
    WORDS: tl.constexpr,  # words per program
):
    pid_w = tl.program_id(0)
    pid_r = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_r * ROWS + tl.arange(0, ROWS)
    cols = pid_w * (WORDS * 32) + tl.arange(0, WORDS * 32)
    # only columns [patch_start, S) come from the data; tokens before them are allowed, the padding
    # past S blocked (so a last key tile with nothing allowed before S is skipped)
    from_data = (rows[:, None] < Q) & (cols[None, :] >= patch_start) & (cols[None, :] < S)
    ptrs = Mask + b * stride_mask_b + rows[:, None] * stride_mask_q + (cols - patch_start)[None, :] * stride_mask_p
    allowed = (tl.load(ptrs, mask=from_data, other=1) != 0) & (cols[None, :] < S)
    bits = allowed.to(tl.int32) << (cols % 32)[None, :]
    # distinct bits: their sum is their OR (bit 31 is the sign bit, so the int32 sum never overflows)
    words = tl.sum(tl.reshape(bits, (ROWS, WORDS, 32)), 2)
    word_idx = pid_w * WORDS + tl.arange(0, WORDS)
    tl.store(Bits + (b * Q + rows[:, None]) * n_words + word_idx[None, :], words,
             mask=(rows[:, None] < Q) & (word_idx[None, :] < n_words))


@triton.jit
def _attend_tile(
    acc, l_i, m_i, q,
    K, V,  # this (batch, head)'s first key / value element
    words,  # (BLOCK_M, BLOCK_N // 32) packed mask of the tile (used with APPLY_MASK only)
    start_n, offs_n, offs_d, S,
    stride_qkv_s, stride_qkv_c,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CHECK_N: tl.constexpr,  # the key block may run past S
    APPLY_MASK: tl.constexpr,  # the tile mixes allowed and blocked pairs
    ALIGNED: tl.constexpr,  # every key / value row starts 16-byte aligned
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step: fold keys [start_n, start_n + BLOCK_N) into (acc, l_i, m_i)."""
    cols = start_n + offs_n
    k_rows = K + cols * stride_qkv_s
    v_rows = V + cols * stride_qkv_s
    if ALIGNED:
        k_rows = tl.multiple_of(k_rows, [16])
        v_rows = tl.multiple_of(v_rows, [16])
    d_offs = offs_d[None, :] * stride_qkv_c
    if CHECK_N:
        if BLOCK_D == HEAD_DIM:
            kv_mask = cols[:, None] < S
        else:
            kv_mask = (cols[:, None] < S) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_rows[:, None] + d_offs, mask=kv_mask, other=0.0)
    elif BLOCK_D == HEAD_DIM:
        k = tl.load(k_rows[:, None] + d_offs)
    else:
        k = tl.load(k_rows[:, None] + d_offs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    # scores in the log2 domain: qk_scale = D^-0.5 * log2(e), so exp2 below is the softmax's exp
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if CHECK_N:
        qk = tl.where(cols[None, :] < S, qk, float("-inf"))
    if APPLY_MASK:
        bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
        qk = tl.where(tl.reshape(bits, (BLOCK_M, BLOCK_N)) != 0, qk, float("-inf"))
    # finite for every row: the first tile always has an allowed key per row (see the top of this section)
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if CHECK_N:
        v = tl.load(v_rows[:, None] + d_offs, mask=kv_mask, other=0.0)
    elif BLOCK_D == HEAD_DIM:
        v = tl.load(v_rows[:, None] + d_offs)
    else:
        v = tl.load(v_rows[:, None] + d_offs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attend_all_keys(
    acc, l_i, m_i, q, K, V, offs_n, offs_d, S, stride_qkv_s, stride_qkv_c, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Rows without a mask: the full key blocks without bounds checks, then the ragged last block."""
    n_full = (S // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, K, V, 0, start_n, offs_n, offs_d, S, stride_qkv_s, stride_qkv_c, qk_scale,
            HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, False, False, ALIGNED, DOT_PRECISION)
    if n_full < S:
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, K, V, 0, n_full, offs_n, offs_d, S, stride_qkv_s, stride_qkv_c, qk_scale,
            HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, True, False, ALIGNED, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _attend_masked_keys(
    acc, l_i, m_i, q, K, V,
    Bits,  # this batch's (Q, n_words) packed mask
    offs_m, offs_n, offs_d, S, Q, n_words, stride_qkv_s, stride_qkv_c, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Rows holding queries: per key tile, skip it (nothing allowed), take the unmasked path (nothing
    blocked) or apply the mask (mixed). Rows >= Q in the block read as all allowed."""
    word_offs = tl.arange(0, BLOCK_N // 32)
    word_rows = tl.multiple_of(Bits + offs_m * n_words, [16])  # n_words: a multiple of 16 by construction
    row_is_query = offs_m[:, None] < Q
    for start_n in range(0, S, BLOCK_N):
        words = tl.load(word_rows[:, None] + (start_n // 32 + word_offs)[None, :], mask=row_is_query, other=-1)
        any_allowed = tl.max(tl.max((words != 0).to(tl.int32), 1), 0)
        any_blocked = tl.max(tl.max((words != -1).to(tl.int32), 1), 0)
        if any_allowed != 0:  # otherwise every pair of the tile is blocked: skip it
            if any_blocked != 0:
                acc, l_i, m_i = _attend_tile(
                    acc, l_i, m_i, q, K, V, words, start_n, offs_n, offs_d, S, stride_qkv_s, stride_qkv_c,
                    qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, True, True, ALIGNED, DOT_PRECISION)
            else:
                acc, l_i, m_i = _attend_tile(
                    acc, l_i, m_i, q, K, V, words, start_n, offs_n, offs_d, S, stride_qkv_s, stride_qkv_c,
                    qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, True, False, ALIGNED, DOT_PRECISION)
    return acc, l_i, m_i


# B only keys the autotuner: not specialised (batch 1 would otherwise compile every tile again, and as
# another binary than the one check-kernels compiles)
@triton.jit(do_not_specialize=["B"])
def _masked_attention_fwd_kernel(
    QKV,  # (B, S, 3*C) fused projection output, any strides; q | k | v, heads of HEAD_DIM inside each
    Out,  # (B, S, C) output, last dim contiguous
    Bits,  # (B, Q, n_words) int32 packed mask from _pack_mask_kernel (never read without HAS_MASK)
    B,  # batch: not read by the kernel, an autotune key (the grid is B * H x S / BLOCK_M programs)
    S, H, Q, n_words,
    stride_qkv_b, stride_qkv_s, stride_qkv_c,
    stride_out_b, stride_out_s,
    qk_scale,  # D^-0.5 * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of 2 >= HEAD_DIM, at least 16: padded lanes load as 0
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # a multiple of 32 (one mask word), at most MAX_BLOCK_N
    HAS_MASK: tl.constexpr,
    # every row of q, k, v and out starts 16-byte aligned (pointers, row strides and head_dim * itemsize
    # multiples of 16): what the JIT infers from divisible arguments, said so that an ahead-of-time
    # compile, which sees no arguments, vectorises the loads the same way
    ALIGNED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tl.static_assert(BLOCK_N % 32 == 0 and BLOCK_N <= 512)
    # row blocks vary slowest: the first wave holds the query rows (masked, the most work per block)
    pid_bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    head = QKV + b * stride_qkv_b + (h * HEAD_DIM) * stride_qkv_c
    K = head + (H * HEAD_DIM) * stride_qkv_c
    V = head + (2 * H * HEAD_DIM) * stride_qkv_c
    q_rows = head + offs_m * stride_qkv_s
    if ALIGNED:
        q_rows = tl.multiple_of(q_rows, [16])
    q = tl.load(q_rows[:, None] + offs_d[None, :] * stride_qkv_c,
                mask=(offs_m[:, None] < S) & (offs_d[None, :] < HEAD_DIM), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_MASK:
        if start_m < Q:
            acc, l_i, m_i = _attend_masked_keys(
                acc, l_i, m_i, q, K, V, Bits + b * Q * n_words, offs_m, offs_n, offs_d, S, Q, n_words,
                stride_qkv_s, stride_qkv_c, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, ALIGNED, DOT_PRECISION)
        else:
            acc, l_i, m_i = _attend_all_keys(
                acc, l_i, m_i, q, K, V, offs_n, offs_d, S, stride_qkv_s, stride_qkv_c, qk_scale,
                HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, ALIGNED, DOT_PRECISION)
    else:
        acc, l_i, m_i = _attend_all_keys(
            acc, l_i, m_i, q, K, V, offs_n, offs_d, S, stride_qkv_s, stride_qkv_c, qk_scale,
            HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, ALIGNED, DOT_PRECISION)

    # l_i > 0 for every row < S: column 0 is always allowed when Q > 0 (patch_start >= Q >= 1)
    out = acc / l_i[:, None]
    out_rows = Out + b * stride_out_b + offs_m * stride_out_s + h * HEAD_DIM
    if ALIGNED:
        out_rows = tl.multiple_of(out_rows, [16])
    tl.store(out_rows[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=(offs_m[:, None] < S) & (offs_d[None, :] < HEAD_DIM))


# keyed on what sets the grid (B, H, S) and the work of a program (Q, HEAD_DIM, flags): batch 1 and batch 8
# fill the SMs differently, so each gets its own tile
@functools.lru_cache(maxsize=None)
def _tuned_attention_kernel(arch: tuple[int, int] | None = None):  # one per arch: _triton.gpu_arch
    return autotune(_masked_attention_fwd_kernel, _configs(), ["B", "H", "S", "Q", "HEAD_DIM", "HAS_MASK", "ALIGNED"],
                    prune_configs_by={"early_config_prune": _prune_configs})


# ---------------------------------------------------------------------------------------------------
# Launcher, registered op, functional entry point
# ---------------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128


def _check_inputs(qkv: torch.Tensor, num_heads: int, query_patch_mask: torch.Tensor | None,
                  patch_start: int | None) -> tuple[int, int, int, int]:
    """Validate the arguments as attention_ref does; returns (batch, seq_len, hidden, head_dim)."""
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be (B, S, 3*C), got shape {tuple(qkv.shape)}")
    batch, seq_len, three_c = qkv.shape
    if num_heads < 1 or three_c % (3 * num_heads):
        raise ValueError(f"qkv last dimension {three_c} is not 3 * num_heads ({num_heads}) * head_dim")
    if qkv.dtype not in _DTYPES:
        raise TypeError(f"masked_attention takes fp16, bf16 or fp32 qkv, got {qkv.dtype}")
    hidden = three_c // 3
    head_dim = hidden // num_heads
    if head_dim > MAX_HEAD_DIM:
        raise NotImplementedError(f"masked_attention supports head_dim <= {MAX_HEAD_DIM}, got {head_dim}")
    if query_patch_mask is not None:
        if patch_start is None:
            raise ValueError("patch_start is required with a query_patch_mask")
        if query_patch_mask.dtype != torch.bool:
            raise TypeError(f"query_patch_mask must be bool, got {query_patch_mask.dtype}")
        if query_patch_mask.dim() != 3 or query_patch_mask.shape[0] != batch:
            raise ValueError(f"query_patch_mask must be (B={batch}, Q, P), got {tuple(query_patch_mask.shape)}")
        num_queries, num_patches = query_patch_mask.shape[1:]
        if patch_start + num_patches != seq_len:
            raise ValueError(
                f"query_patch_mask covers {num_patches} patches starting at token {patch_start}, "
                f"but the sequence has {seq_len} tokens"
            )
        if num_queries > patch_start:  # [Q queries | CLS | registers | patches]
            raise ValueError(f"{num_queries} query rows but the patches start at token {patch_start}")
        check_devices("qkv", qkv, query_patch_mask=query_patch_mask)
    return batch, seq_len, hidden, head_dim


def _rows_aligned(t: torch.Tensor, head_dim: int) -> bool:
    """Every head's row of t (B, S, n * head_dim) starts 16-byte aligned, its elements contiguous."""
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (head_dim * size) % 16 == 0
            and all((stride * size) % 16 == 0 for stride in t.stride()[:-1]))


@on_input_device
def pack_query_patch_mask(query_patch_mask: torch.Tensor, seq_len: int, patch_start: int) -> torch.Tensor:
    """(B, Q, P) bool -> (B, Q, n_words) int32 in token coordinates, bit j of word w = may attend to
    token 32*w + j; tokens before ``patch_start`` read as allowed, the padding past ``seq_len`` as blocked.
    Q * S / 8 bytes (the kernel never builds a dense mask)."""
    batch, num_queries, _ = query_patch_mask.shape
    n_words = cdiv(seq_len, MAX_BLOCK_N) * MASK_WORD_ALIGN
    bits = torch.empty((batch, num_queries, n_words), dtype=torch.int32, device=query_patch_mask.device)
    if bits.numel():
        mask = query_patch_mask.view(torch.uint8)  # free: same bytes, read as 0/1
        rows, words = 16, 16
        grid = (cdiv(n_words, words), cdiv(num_queries, rows), batch)
        _pack_mask_kernel[grid](mask, bits, seq_len, num_queries, patch_start, n_words, *mask.stride(),
                                ROWS=rows, WORDS=words, **LAUNCH_OPTIONS)
    return bits


@on_input_device
def masked_attention_fwd(
    qkv: torch.Tensor,
    num_heads: int,
    query_patch_mask: torch.Tensor | None = None,
    patch_start: int | None = None,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Launch the Triton kernel: validate, allocate (or fill ``out``), pack the mask, run.

    ``block_m``/``block_n`` bypass the autotuner with a fixed tile (tests use them to cover other tiles
    under the interpreter); by default the autotuned configuration runs.
    """
    batch, seq_len, hidden, head_dim = _check_inputs(qkv, num_heads, query_patch_mask, patch_start)
    if qkv.device.type != "cuda" and not INTERPRETING:
        raise RuntimeError(f"masked_attention runs on CUDA (or in Triton's interpreter), qkv is on {qkv.device}")
    check_devices("qkv", qkv, out=out)
    if out is None:
        out = torch.empty((batch, seq_len, hidden), dtype=qkv.dtype, device=qkv.device)
    elif out.shape != (batch, seq_len, hidden) or out.dtype != qkv.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a {qkv.dtype} tensor of shape {(batch, seq_len, hidden)} with a contiguous "
                         f"last dimension, got {out.dtype} {tuple(out.shape)} strides {out.stride()}")
    if out.numel() == 0:
        return out

    num_queries = 0 if query_patch_mask is None else query_patch_mask.shape[1]
    has_mask = num_queries > 0  # no query rows: nothing to mask
    if has_mask:
        bits = pack_query_patch_mask(query_patch_mask, seq_len, patch_start)
        n_words = bits.shape[-1]
    else:  # HAS_MASK=False: Bits is never read
        bits, n_words = qkv, 0
    args = (qkv, out, bits, batch, seq_len, num_heads, num_queries, n_words, *qkv.stride(), out.stride(0),
            out.stride(1),
            head_dim**-0.5 * math.log2(math.e))
    meta = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, next_power_of_2(head_dim)),
        HAS_MASK=has_mask,
        ALIGNED=_rows_aligned(qkv, head_dim) and _rows_aligned(out, head_dim),
        DOT_PRECISION=FP32_DOT_PRECISION if qkv.dtype == torch.float32 else "tf32",  # 16-bit: not used
    )
    if block_m is None and block_n is None:
        grid = lambda cfg: (batch * num_heads, cdiv(seq_len, cfg["BLOCK_M"]))  # noqa: E731
        _tuned_attention_kernel(arch=gpu_arch(qkv))[grid](*args, **meta, **LAUNCH_OPTIONS)
    else:
        block_m, block_n = block_m or 64, block_n or 64
        if block_n < 32 or block_n > MAX_BLOCK_N or block_n & (block_n - 1):
            raise ValueError(f"block_n must be a power of two from 32 to {MAX_BLOCK_N}, got {block_n}")
        if block_m < 16 or block_m & (block_m - 1):
            raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
        _masked_attention_fwd_kernel[(batch * num_heads, cdiv(seq_len, block_m))](
            *args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2, **LAUNCH_OPTIONS)
    return out


# torch.compile cannot trace into a launcher that allocates, packs and autotunes; as a custom op with a
# fake (meta) implementation it is one opaque node, so fullgraph=True and CUDA graphs work around it.
@torch.library.custom_op("eomt_fast::masked_attention", mutates_args=())
def _masked_attention_op(
    qkv: torch.Tensor, num_heads: int, query_patch_mask: torch.Tensor | None, patch_start: int | None
) -> torch.Tensor:
    return masked_attention_fwd(qkv, num_heads, query_patch_mask, patch_start)


@_masked_attention_op.register_fake
def _(qkv, num_heads, query_patch_mask, patch_start):
    batch, seq_len, three_c = qkv.shape
    return qkv.new_empty((batch, seq_len, three_c // 3))


_masked_attention_call = eager_direct(_masked_attention_op)  # the op, called directly in eager mode


def masked_attention(
    qkv: torch.Tensor,
    num_heads: int,
    query_patch_mask: torch.Tensor | None = None,
    patch_start: int | None = None,
) -> torch.Tensor:
    """Masked query-patch attention with the Triton kernel: same signature and result as attention_ref.

    qkv: (B, S, 3*C) fp16/bf16/fp32 straight from the fused QKV projection, or a strided view of that
    shape (read through its strides, never copied). query_patch_mask: None or bool (B, Q, P), True =
    query q may attend to patch p, for the rows [0, Q) and the columns [patch_start, S); Q <= patch_start.
    Head dim <= 128. Returns (B, S, C), contiguous, in qkv's dtype.

    Precision: fp32 accumulation and online softmax for every dtype. fp16/bf16: both dots take 16-bit
    operands (P is rounded to the input dtype before P @ V, as in FlashAttention). fp32: both dots use
    input_precision="tf32x3" (three TF32 tensor-core products, about fp32 accuracy); Triton's
    interpreter computes them in plain fp32.
    """
    _check_inputs(qkv, num_heads, query_patch_mask, patch_start)
    return _masked_attention_call(qkv, num_heads, query_patch_mask, patch_start)


TRITON_OPS = {"attention": masked_attention}


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile checks (eomt-fast check-kernels): the main GPU configurations at head dim 64
# ---------------------------------------------------------------------------------------------------

AOT_CONFIGS = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)]  # (BLOCK_M, BLOCK_N, warps, stages)


def aot_specs():
    from eomt_fast.aot import KernelSpec

    ints = ["B", "S", "H", "Q", "n_words", "stride_qkv_b", "stride_qkv_s", "stride_out_b", "stride_out_s"]
    specs = []
    for short in ("bf16", "fp16"):
        for has_mask in (False, True):
            for bm, bn, warps, stages in AOT_CONFIGS:
                signature = {"QKV": f"*{short}", "Out": f"*{short}", "Bits": "*i32", "qk_scale": "fp32",
                             **{name: "i32" for name in ints},
                             # a contiguous last dimension: the JIT specialises an integer 1 as a constant
                             "stride_qkv_c": "constexpr"}
                constexprs = {"stride_qkv_c": 1, "HEAD_DIM": 64, "BLOCK_D": 64, "BLOCK_M": bm, "BLOCK_N": bn,
                              "HAS_MASK": has_mask, "ALIGNED": True, "DOT_PRECISION": "tf32"}
                signature.update({name: "constexpr" for name in constexprs})
                specs.append(KernelSpec(
                    name=f"attention_{short}_d64_{'masked' if has_mask else 'plain'}_m{bm}n{bn}w{warps}s{stages}",
                    fn=_masked_attention_fwd_kernel, signature=signature, constexprs=constexprs,
                    num_warps=warps, num_stages=stages,
                    needs_wgmma=bm >= 16 * warps,  # wgmma: 64 rows per warpgroup of 4 warps
                ))
    specs.append(KernelSpec(
        name="attention_pack_mask",
        fn=_pack_mask_kernel,
        signature={"Mask": "*u8", "Bits": "*i32", **{n: "i32" for n in ("S", "Q", "patch_start", "n_words",
                   "stride_mask_b", "stride_mask_q")}, "stride_mask_p": "constexpr", "ROWS": "constexpr",
                   "WORDS": "constexpr"},
        constexprs={"stride_mask_p": 1, "ROWS": 16, "WORDS": 16},
        num_warps=4, num_stages=1,
    ))
    return specs

