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


# ---- Triton ------------------------------------------------------------------------------------------
#
# mask_logits: per batch element one GEMM of gemm.py, logits[b] (Q, H*W) = E[b] (Q, C) @ X[b] (H*W, C)^T:
#   the channels-last pixel embeddings are already the nn.Linear-layout "weight" of that GEMM, read in
#   place; the logits are written in the model dtype (fp32 accumulation, one rounding).
# grid_attention_mask: one kernel per (patch tile, query tile, batch element),
#   mask[b, q, p] = (sum_c xs[b, p, c] * E[b, q, c]) > 0,   p = i*g + j,
#   xs[b, p, :] = bilinear (align_corners=False) resize of X to g x g. For an integer factor f = H / g the
#   source pixel of row i is f*i + f/2 - 1/2: even f -> the mean of rows f*i + f/2 - 1 and f*i + f/2
#   (weights exactly 1/2), odd f -> row f*i + (f-1)/2 alone (weight exactly 1; f = 1 is the identity);
#   the same for columns. So xs is the mean of 1, 2 or 4 pixels, averaged in fp32 as the A operand is
#   loaded and rounded to the model dtype (where F.interpolate rounds it), and the (B, Q, H, W) logits are
#   never written: the epilogue stores acc > 0 as one byte per (q, p). Other factors fall back to the
#   reference. The downsampled pixels are the A operand (registers -> wgmma), the mask embeddings the
#   B operand; the tile is stored transposed into the (B, Q, g*g) mask.
# fp16/bf16: tensor cores, fp32 accumulation; fp32: "ieee" dots (gemm.FP32_DOT_PRECISION).

import functools  # noqa: E402

from . import gemm as _gemm  # noqa: E402
from ._autotune import autotune  # noqa: E402
from ._triton import INTERPRETING, LAUNCH_OPTIONS, aligned16, cdiv, check_devices, gpu_arch, on_input_device, tl, triton  # noqa: E402  (Triton, or a stand-in)
from .gemm import grouped_tile  # noqa: E402

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Tiles of the grid-mask kernel (BLOCK_M patches x BLOCK_N queries x BLOCK_K channels, GROUP_M, warps,
# stages): M = g*g = 1600, N = Q = 200, K = C = 1024 at ViT-L/640, i.e. a small GEMM (0.65 GFLOP a
# frame) that needs small tiles to fill the GPU at batch 1 (25 x 4 tiles of 64 x 64).
GRID_MASK_GPU_CONFIGS = (
    _gemm.GemmConfig(64, 64, 64, 8, 4, 3),
    _gemm.GemmConfig(64, 128, 64, 8, 4, 3),
    _gemm.GemmConfig(128, 64, 64, 8, 8, 3),
    _gemm.GemmConfig(128, 128, 64, 8, 8, 3),
)
# fp32: "ieee" FMA dots, where the register allocation of nearby tiles flips between spilling and not with
# the Triton version and arch: 64 x 64 x 32 spills on sm_90 with 4 warps under Triton 3.9 and with 8 warps
# and 2 stages under 3.6 (once the kernel gained its unread batch argument), 3 stages spill on sm_80; the
# three below compile without spills for sm_80 and sm_90 under both 3.6 and 3.9 (eomt-fast check-kernels)
GRID_MASK_GPU_FP32_CONFIGS = (
    _gemm.GemmConfig(64, 64, 16, 8, 4, 3),
    _gemm.GemmConfig(64, 64, 16, 8, 8, 2),
    _gemm.GemmConfig(128, 64, 32, 8, 8, 2),
)


def grid_mask_configs(fp32: bool = False) -> list[_gemm.GemmConfig]:
    """The tiles the autotuner tries (exactly one under the interpreter)."""
    if INTERPRETING:
        return [_gemm.INTERPRETER_CONFIG]
    return list(GRID_MASK_GPU_FP32_CONFIGS if fp32 else GRID_MASK_GPU_CONFIGS)


@functools.lru_cache(maxsize=None)
def _tuned_grid_mask_kernel(fp32: bool, arch: tuple[int, int] | None = None):  # one per arch: _triton.gpu_arch
    configs = [triton.Config(c.meta(), num_warps=c.num_warps, num_stages=c.num_stages)
               for c in grid_mask_configs(fp32)]
    # batch 1 gives few tiles (g*g x Q), batch 8 eight times as many: each gets its own tile
    key = ["B", "P", "Q", "C", "TAPS_H", "TAPS_W", "ALIGNED"]
    return autotune(_grid_mask_kernel, configs, key, variant=(fp32,))


# B only keys the autotuner: not specialised (batch 1 would otherwise compile every tile again, and as
# another binary than the one check-kernels compiles)
@triton.jit(do_not_specialize=["B"])
def _grid_mask_kernel(
    X,  # (B, H, W, C) pixel embeddings, channels-last, any strides
    E,  # (B, Q, C) mask embeddings, any strides
    Out,  # (B, Q, P) uint8 view of the boolean mask, any strides
    B,  # batch: not read by the kernel, an autotune key (the grid's second axis)
    P, Q, C,  # P = g*g patches (GEMM rows), Q queries (GEMM columns), C channels (the reduction)
    grid_w,  # g
    factor_h, factor_w, offset_h, offset_w,  # source pixel of patch (i, j): (factor*i + offset, ...)
    stride_xb, stride_xh, stride_xw, stride_xc,
    stride_eb, stride_eq, stride_ec,
    stride_ob, stride_oq, stride_op,
    TAPS_H: tl.constexpr, TAPS_W: tl.constexpr,  # 2: mean with the next row / column; 1: that pixel alone
    ALIGNED: tl.constexpr,  # C % 16 == 0, 16-byte aligned pixels of X and rows of E
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SUBTILES: tl.constexpr,  # unused (the epilogue is a compare and a byte store)
):
    b = tl.program_id(1)
    pid_m, pid_n = grouped_tile(tl.program_id(0), P, Q, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows/columns past the end are wrapped into range: their loads need no mask, their results are
    # never stored.
    patch = offs_m % P
    query = offs_n % Q
    x_rows = (X + b.to(tl.int64) * stride_xb + ((patch // grid_w) * factor_h + offset_h).to(tl.int64) * stride_xh
              + ((patch % grid_w) * factor_w + offset_w).to(tl.int64) * stride_xw)  # [BLOCK_M] first tap
    x_right = x_rows + stride_xw  # the other taps (unused with one tap per axis)
    x_below = x_rows + stride_xh
    x_diag = x_below + stride_xw
    e_rows = E + b.to(tl.int64) * stride_eb + query.to(tl.int64) * stride_eq  # [BLOCK_N]
    k_hi = C
    if ALIGNED:
        x_rows = tl.multiple_of(x_rows, [16])
        x_right = tl.multiple_of(x_right, [16])
        x_below = tl.multiple_of(x_below, [16])
        x_diag = tl.multiple_of(x_diag, [16])
        e_rows = tl.multiple_of(e_rows, [16])
        k_hi = C // 16 * 16  # a no-op, in a form the alignment analysis reads
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, k_hi, BLOCK_K):
        mask_k = offs_k < k_hi
        cols_k = offs_k[None, :] * stride_xc
        if TAPS_H * TAPS_W == 1:
            a = tl.load(x_rows[:, None] + cols_k, mask=mask_k[None, :], other=0.0)
        else:  # the bilinear weights are exactly 1/2 per axis: a mean, in fp32, rounded like F.interpolate
            a = tl.load(x_rows[:, None] + cols_k, mask=mask_k[None, :], other=0.0).to(tl.float32)
            if TAPS_W == 2:
                a += tl.load(x_right[:, None] + cols_k, mask=mask_k[None, :], other=0.0).to(tl.float32)
            if TAPS_H == 2:
                a += tl.load(x_below[:, None] + cols_k, mask=mask_k[None, :], other=0.0).to(tl.float32)
                if TAPS_W == 2:
                    a += tl.load(x_diag[:, None] + cols_k, mask=mask_k[None, :], other=0.0).to(tl.float32)
            a = (a * (1.0 / (TAPS_H * TAPS_W))).to(X.dtype.element_ty)
        e = tl.load(e_rows[None, :] + offs_k[:, None] * stride_ec, mask=mask_k[:, None], other=0.0)
        acc = tl.dot(a, e, acc, input_precision=DOT_PRECISION)
        offs_k += BLOCK_K
    mask = (offs_m < P)[:, None] & (offs_n < Q)[None, :]
    out_ptrs = (Out + b.to(tl.int64) * stride_ob + offs_n.to(tl.int64)[None, :] * stride_oq
                + offs_m[:, None] * stride_op)
    tl.store(out_ptrs, (acc > 0).to(tl.uint8), mask=mask)


def _check(mask_embeddings: torch.Tensor, pixel_embeddings: torch.Tensor) -> None:
    if mask_embeddings.dim() != 3 or pixel_embeddings.dim() != 4:
        raise ValueError(f"mask_embeddings must be (B, Q, C) and pixel_embeddings (B, H, W, C), got "
                         f"{tuple(mask_embeddings.shape)} and {tuple(pixel_embeddings.shape)}")
    if (mask_embeddings.shape[0] != pixel_embeddings.shape[0]
            or mask_embeddings.shape[2] != pixel_embeddings.shape[3]):
        raise ValueError(f"batch and channels of mask_embeddings {tuple(mask_embeddings.shape)} and "
                         f"pixel_embeddings {tuple(pixel_embeddings.shape)} differ")
    if mask_embeddings.dtype not in _DTYPES or pixel_embeddings.dtype != mask_embeddings.dtype:
        raise TypeError(f"mask and pixel embeddings must share one of fp16/bf16/fp32, got {mask_embeddings.dtype} "
                        f"and {pixel_embeddings.dtype}")
    if mask_embeddings.device.type != "cuda" and not INTERPRETING:
        raise RuntimeError(f"the mask kernels run on CUDA (or in Triton's interpreter), got {mask_embeddings.device}")
    check_devices("mask_embeddings", mask_embeddings, pixel_embeddings=pixel_embeddings)


def mask_logits_forward(mask_embeddings: torch.Tensor, pixel_embeddings: torch.Tensor, *,
                        out: torch.Tensor | None = None, config: _gemm.GemmConfig | None = None) -> torch.Tensor:
    """Triton ``mask_logits_ref``: (B, Q, C), (B, H, W, C) -> (B, Q, H, W) in the model dtype, one GEMM per
    batch element (gemm.py). ``out`` a (B, Q, H, W) tensor to write into (each out[b] must be viewable as
    (Q, H*W)); ``config`` fixes the tile instead of autotuning."""
    _check(mask_embeddings, pixel_embeddings)
    batch, height, width, channels = pixel_embeddings.shape
    num_queries = mask_embeddings.shape[1]
    shape = (batch, num_queries, height, width)
    if out is None:
        out = mask_embeddings.new_empty(shape)
    elif tuple(out.shape) != shape or out.dtype != mask_embeddings.dtype:
        raise ValueError(f"out must be a {mask_embeddings.dtype} tensor of shape {shape}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    for b in range(batch):  # batch 1 in the common case; at batch 8 each GEMM is still 10 GFLOP (ViT-L/640)
        pixels = pixel_embeddings[b].reshape(height * width, channels)  # a view for a contiguous (H, W)
        _gemm.gemm(mask_embeddings[b], pixels, out=out[b].view(num_queries, height * width), config=config)
    return out


def grid_sampling(size: int, grid_size: int) -> tuple[int, int, int] | None:
    """(factor, offset, taps) of the align_corners=False bilinear resize from ``size`` to ``grid_size`` along
    one axis when size is a whole multiple of grid_size (else None): output i reads input rows
    factor*i + offset (+ 1 when taps == 2), weighted equally."""
    if grid_size < 1 or size % grid_size:
        return None
    factor = size // grid_size
    return (factor, factor // 2 - 1, 2) if factor % 2 == 0 else (factor, (factor - 1) // 2, 1)


@on_input_device
def grid_attention_mask_forward(mask_embeddings: torch.Tensor, pixel_embeddings: torch.Tensor, grid_size: int,
                                *, out: torch.Tensor | None = None,
                                config: _gemm.GemmConfig | None = None) -> torch.Tensor:
    """Triton ``grid_attention_mask_ref``: boolean (B, Q, g*g), one kernel; the (B, Q, H, W) logits are never
    formed. Resize factors H/g, W/g that are not whole numbers run the reference instead. ``out`` a bool
    (B, Q, g*g) tensor (any strides) to write into; ``config`` fixes the tile instead of autotuning."""
    _check(mask_embeddings, pixel_embeddings)
    batch, height, width, channels = pixel_embeddings.shape
    num_queries = mask_embeddings.shape[1]
    num_patches = grid_size * grid_size
    shape = (batch, num_queries, num_patches)
    if out is None:
        out = torch.empty(shape, dtype=torch.bool, device=mask_embeddings.device)
    elif tuple(out.shape) != shape or out.dtype != torch.bool:
        raise ValueError(f"out must be a bool tensor of shape {shape}, got {out.dtype} {tuple(out.shape)}")
    check_devices("mask_embeddings", mask_embeddings, out=out)
    rows, cols = grid_sampling(height, grid_size), grid_sampling(width, grid_size)
    if rows is None or cols is None:
        return out.copy_(grid_attention_mask_ref(mask_embeddings, pixel_embeddings, grid_size))
    if out.numel() == 0:
        return out
    if channels == 0:  # an empty sum: every logit is 0, nothing may be attended
        return out.fill_(False)
    out_bytes = out.view(torch.uint8)
    aligned = (channels % 16 == 0 and pixel_embeddings.stride(3) == 1 and mask_embeddings.stride(2) == 1
               and aligned16(pixel_embeddings, pixel_embeddings.stride()[:3])
               and aligned16(mask_embeddings, mask_embeddings.stride()[:2]))
    args = (pixel_embeddings, mask_embeddings, out_bytes, batch, num_patches, num_queries, channels, grid_size,
            rows[0], cols[0], rows[1], cols[1], *pixel_embeddings.stride(), *mask_embeddings.stride(),
            *out_bytes.stride())
    fp32 = mask_embeddings.dtype == torch.float32
    meta = dict(TAPS_H=rows[2], TAPS_W=cols[2], ALIGNED=aligned,
                DOT_PRECISION=_gemm.FP32_DOT_PRECISION if fp32 else "tf32")  # 16-bit: unused
    grid = lambda cfg: (  # noqa: E731
        cdiv(num_patches, cfg["BLOCK_M"]) * cdiv(num_queries, cfg["BLOCK_N"]), batch)
    if config is not None:
        _grid_mask_kernel[grid(config.meta())](*args, **meta, **config.meta(), num_warps=config.num_warps,
                                               num_stages=config.num_stages, **LAUNCH_OPTIONS)
    else:
        _tuned_grid_mask_kernel(fp32, arch=gpu_arch(out))[grid](*args, **meta, **LAUNCH_OPTIONS)
    return out


# Registered ops: opaque to torch.compile (fullgraph) and safe under CUDA graphs (no host syncs; the
# autotuner runs on the first call, so warm up before capturing).

@torch.library.custom_op("eomt_fast::mask_logits", mutates_args=())
def mask_logits(mask_embeddings: torch.Tensor, pixel_embeddings: torch.Tensor) -> torch.Tensor:
    """Triton ``mask_logits_ref`` (the final mask-logit einsum)."""
    return mask_logits_forward(mask_embeddings, pixel_embeddings)


@mask_logits.register_fake
def _(mask_embeddings, pixel_embeddings):
    batch, height, width, _ = pixel_embeddings.shape
    return mask_embeddings.new_empty((batch, mask_embeddings.shape[1], height, width))


@torch.library.custom_op("eomt_fast::grid_attention_mask", mutates_args=())
def grid_attention_mask(mask_embeddings: torch.Tensor, pixel_embeddings: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Triton ``grid_attention_mask_ref`` (query->patch mask of a masked layer at grid resolution)."""
    return grid_attention_mask_forward(mask_embeddings, pixel_embeddings, grid_size)


@grid_attention_mask.register_fake
def _(mask_embeddings, pixel_embeddings, grid_size):
    return mask_embeddings.new_empty((mask_embeddings.shape[0], mask_embeddings.shape[1], grid_size * grid_size),
                                     dtype=torch.bool)


TRITON_OPS = {"mask_logits": mask_logits, "grid_attention_mask": grid_attention_mask}


# ---- ahead-of-time compile checks (eomt-fast check-kernels) ----------------------------------------------

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def grid_mask_aot_spec(dtype: torch.dtype, config: _gemm.GemmConfig, taps: int = 2):
    """``_grid_mask_kernel`` as the launcher compiles it on a GPU for contiguous embeddings and a new mask
    (unit strides are constants, as the JIT specialises them); taps 2: an even resize factor (EoMT's 4)."""
    from eomt_fast.aot import KernelSpec

    t = _TRITON_DTYPE[dtype]
    ints = ["B", "P", "Q", "C", "grid_w", "factor_h", "factor_w", "offset_h", "offset_w", "stride_xb", "stride_xh",
            "stride_xw", "stride_eb", "stride_eq", "stride_ob", "stride_oq"]
    constexprs = {"stride_xc": 1, "stride_ec": 1, "stride_op": 1, "TAPS_H": taps, "TAPS_W": taps, "ALIGNED": True,
                  "DOT_PRECISION": _gemm.FP32_DOT_PRECISION if dtype == torch.float32 else "tf32", **config.meta()}
    signature = {"X": f"*{t}", "E": f"*{t}", "Out": "*u8", **{n: "i32" for n in ints},
                 **{n: "constexpr" for n in constexprs}}
    c = config
    name = (f"grid_attention_mask_{t}_taps{taps}x{taps}_{c.block_m}x{c.block_n}x{c.block_k}"
            f"_w{c.num_warps}s{c.num_stages}")
    return KernelSpec(name=name, fn=_grid_mask_kernel, signature=signature, constexprs=constexprs,
                      num_warps=c.num_warps, num_stages=c.num_stages, needs_wgmma=dtype != torch.float32)


def aot_specs() -> list:
    # mask_logits: the plain GEMM of gemm.py without bias, every bf16 tile and the first in fp16 (ViT-L/640:
    # M = Q = 200, N = 160*160, K = 1024). The grid mask: every tile at the default 4x factor in bf16, the
    # first in fp16 and at factor 1 (no averaging), and fp32.
    configs = grid_mask_configs()
    return [
        *_gemm.gemm_aot_specs("mask_logits", has_bias=False),
        *(grid_mask_aot_spec(torch.bfloat16, c) for c in configs),
        grid_mask_aot_spec(torch.float16, configs[0]),
        grid_mask_aot_spec(torch.bfloat16, configs[0], taps=1),
        *(grid_mask_aot_spec(torch.float32, c) for c in grid_mask_configs(fp32=True)),
    ]

