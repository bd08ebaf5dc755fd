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
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """pixel_values (B, ch, H, W), weight (C, ch*p*p), bias (C,), position_embeddings (P, C) -> (B, P, C),
    written into ``out`` (a (B, P, C) view of any strides, e.g. the patch rows of the model's token buffer)
    and ``out`` returned when given."""
    batch, channels, height, width = pixel_values.shape
    gh, gw = height // patch_size, width // patch_size
    patches = (
        pixel_values.reshape(batch, channels, gh, patch_size, gw, patch_size)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(batch, gh * gw, channels * patch_size * patch_size)
    )
    y = F.linear(patches, weight, bias) + position_embeddings
    return y if out is None else out.copy_(y)


# ---- Triton: the patch GEMM, im2col in the A-operand addressing ----------------------------------------
#
#   out[b, p, n] = sum_k X[b, c(k), i*P + kh(k), j*P + kw(k)] * W[n, k] + bias[n] + pos[p, n]
#   p = i*gw + j,   k = (c*P + kh)*P + kw   (the flatten order of the Conv2d weight)
#
# One GEMM, M = B*gh*gw patches, N = C, K = channels*P*P. Row m of A is never materialised: its start
# is b*sxb + i*P*sxh + j*P*sxw, and column k adds c*sxc + kh*sxh + kw*sxw, so an (m, k) tile of A is
# read in place from pixel_values (no unfold copy); for P = 16 each tile row is runs of 16 contiguous
# pixels, loaded as 16-byte vectors (ALIGNED). The epilogue adds bias and the position embedding (fp32)
# and stores through any (B, P, C) strides: the patch slice of the model's token buffer works as
# ``out``. fp16/bf16: tensor cores, fp32 accumulation, one rounding; fp32: "ieee" dots (full fp32
# products, gemm.FP32_DOT_PRECISION).

import functools  # noqa: E402

from . import gemm as _gemm  # noqa: E402
from ._autotune import autotune  # noqa: E402
from ._triton import INTERPRETING, LAUNCH_OPTIONS, aligned16, cdiv, check_devices, gpu_arch, on_input_device, tl, triton  # noqa: E402  (Triton, or a stand-in)
from .gemm import grouped_tile, split_columns  # noqa: E402

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def patch_embed_configs(fp32: bool = False) -> list[_gemm.GemmConfig]:
    """The tiles the autotuner tries (one under the interpreter): gemm.py's lists for epilogues that
    index rows through a division (at most 64 fp32 accumulators a thread)."""
    return _gemm.gemm_configs(fp32=fp32, view_4d=True)


@functools.lru_cache(maxsize=None)
def _tuned_kernel(fp32: bool, arch: tuple[int, int] | None = None):  # one per arch: _triton.gpu_arch
    configs = [triton.Config(c.meta(), num_warps=c.num_warps, num_stages=c.num_stages)
               for c in patch_embed_configs(fp32)]
    key = ["M", "N", "K", "PATCH", "ALIGNED", "OUT_ALIGNED"]  # every flag that changes the compiled code
    return autotune(_patch_embed_kernel, configs, key, variant=(fp32,))


@triton.jit
def _patch_embed_epilogue(
    acc, offs_m, offs_n, M, N, num_patches, Bias, Pos, Out,
    stride_pp, stride_pc, stride_ob, stride_op, stride_oc, OUT_ALIGNED: tl.constexpr,
):
    """out[b, p, n] = acc + bias[n] + pos[p, n] for the tile rows offs_m = b*P + p, columns offs_n."""
    if OUT_ALIGNED:  # N % 16 == 0, in a form the alignment analysis reads (vector-wide masks)
        mask_n = offs_n < N // 16 * 16
    else:
        mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    batch = offs_m // num_patches
    patch = offs_m % num_patches
    pos_rows = Pos + patch.to(tl.int64) * stride_pp
    out_rows = Out + batch.to(tl.int64) * stride_ob + patch.to(tl.int64) * stride_op
    if OUT_ALIGNED:  # 16-byte aligned rows (checked by the launcher)
        pos_rows = tl.multiple_of(pos_rows, [16])
        out_rows = tl.multiple_of(out_rows, [16])
    y = acc + tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y += tl.load(pos_rows[:, None] + offs_n[None, :] * stride_pc, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_rows[:, None] + offs_n[None, :] * stride_oc, y.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _patch_embed_kernel(
    X,  # (B, ch, H, W) pixel values, any strides
    W,  # (N, K) conv weight flattened in (channel, row, column) order, any strides
    Bias,  # (N,) unit stride
    Pos,  # (P, N) position embedding, any strides
    Out,  # (B, P, N) output view, any strides (e.g. the patch slice of a token buffer)
    M, N, K,  # M = B * P patches, N = hidden size, K = ch * PATCH * PATCH
    num_patches, grid_w,  # P = gh * gw, and gw = W // PATCH
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wn, stride_wk,
    stride_pp, stride_pc,
    stride_ob, stride_op, stride_oc,
    PATCH: tl.constexpr,  # patch size (the conv kernel and stride)
    ALIGNED: tl.constexpr,  # PATCH % 16 == 0 and 16-element aligned pixel rows/planes, 16-byte weight rows
    OUT_ALIGNED: tl.constexpr,  # N % 16 == 0 and 16-byte aligned rows of Out and Pos
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SUBTILES: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows/columns past the end are wrapped into range: their loads need no mask, their results are
    # never stored.
    rows = offs_m % M
    cols = offs_n % N
    patch = rows % num_patches
    pix_i = (patch // grid_w) * PATCH
    pix_j = (patch % grid_w) * PATCH
    x_rows = (X + (rows // num_patches).to(tl.int64) * stride_xb + pix_i.to(tl.int64) * stride_xh
              + pix_j.to(tl.int64) * stride_xw)  # [BLOCK_M] top-left pixel of each patch, channel 0
    w_rows = W + cols.to(tl.int64) * stride_wn  # [BLOCK_N] weight rows
    if ALIGNED:
        x_rows = tl.multiple_of(x_rows, [16])
        w_rows = tl.multiple_of(w_rows, [16])
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        # column k of A: channel k // P^2, row (k // P) % P, column k % P of the patch
        x_cols = ((offs_k // (PATCH * PATCH)) * stride_xc + ((offs_k // PATCH) % PATCH) * stride_xh
                  + (offs_k % PATCH) * stride_xw)
        if ALIGNED:  # K = ch * P^2 is a multiple of BLOCK_K: no masks; runs of 16 contiguous pixels
            x_cols = tl.max_contiguous(tl.multiple_of(x_cols, [16]), [16])
            a = tl.load(x_rows[:, None] + x_cols[None, :])
            w = tl.load(w_rows[None, :] + offs_k[:, None] * stride_wk)
        else:
            mask_k = offs_k < K
            a = tl.load(x_rows[:, None] + x_cols[None, :], mask=mask_k[None, :], other=0.0)
            w = tl.load(w_rows[None, :] + offs_k[:, None] * stride_wk, mask=mask_k[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        offs_k += BLOCK_K
    if EPILOGUE_SUBTILES == 2:  # two column halves in turn: fewer live registers
        acc_left, acc_right = split_columns(acc, BLOCK_M, BLOCK_N)
        offs_left = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
        _patch_embed_epilogue(acc_left, offs_m, offs_left, M, N, num_patches, Bias, Pos, Out,
                              stride_pp, stride_pc, stride_ob, stride_op, stride_oc, OUT_ALIGNED)
        _patch_embed_epilogue(acc_right, offs_m, offs_left + BLOCK_N // 2, M, N, num_patches, Bias, Pos, Out,
                              stride_pp, stride_pc, stride_ob, stride_op, stride_oc, OUT_ALIGNED)
    else:
        _patch_embed_epilogue(acc, offs_m, offs_n, M, N, num_patches, Bias, Pos, Out,
                              stride_pp, stride_pc, stride_ob, stride_op, stride_oc, OUT_ALIGNED)


@on_input_device
def patch_embed_forward(
    pixel_values: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    position_embeddings: torch.Tensor,
    patch_size: int,
    *,
    out: torch.Tensor | None = None,
    config: _gemm.GemmConfig | None = None,
) -> torch.Tensor:
    """Triton ``patch_embed_ref``: (B, ch, H, W) -> (B, P, C), one kernel.

    ``out``: a (B, P, C) tensor or strided view of the weight dtype to write into (e.g.
    ``tokens[:, 1 + R:]`` of the model's token buffer); it must not overlap the inputs. ``config`` fixes
    the tile instead of autotuning. All inputs share one dtype (fp16/bf16/fp32), as in the model, which
    casts pixel_values to the weight dtype first."""
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be (B, channels, H, W), got shape {tuple(pixel_values.shape)}")
    batch, channels, height, width = pixel_values.shape
    if patch_size < 1 or height % patch_size or width % patch_size:
        raise ValueError(f"image {height}x{width} is not a whole number of {patch_size}x{patch_size} patches")
    gh, gw = height // patch_size, width // patch_size
    num_patches, k = gh * gw, channels * patch_size * patch_size
    hidden = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight must be (C, {k}) for {channels} channels and patch {patch_size}, "
                         f"got {tuple(weight.shape)}")
    if tuple(bias.shape) != (hidden,) or tuple(position_embeddings.shape) != (num_patches, hidden):
        raise ValueError(f"bias must be ({hidden},) and position_embeddings ({num_patches}, {hidden}), got "
                         f"{tuple(bias.shape)} and {tuple(position_embeddings.shape)}")
    dtype = weight.dtype
    if dtype not in _DTYPES or any(t.dtype != dtype for t in (pixel_values, bias, position_embeddings)):
        raise TypeError("pixel_values, weight, bias and position_embeddings must share one of fp16/bf16/fp32, got "
                        f"{pixel_values.dtype}, {dtype}, {bias.dtype}, {position_embeddings.dtype}")
    if pixel_values.device.type != "cuda" and not INTERPRETING:
        raise RuntimeError(f"patch_embed runs on CUDA (or in Triton's interpreter), got {pixel_values.device}")
    check_devices("pixel_values", pixel_values, weight=weight, bias=bias, position_embeddings=position_embeddings,
                  out=out)
    if out is None:
        out = torch.empty((batch, num_patches, hidden), dtype=dtype, device=pixel_values.device)
    elif tuple(out.shape) != (batch, num_patches, hidden) or out.dtype != dtype:
        raise ValueError(f"out must be a {dtype} (B, P, C) = {(batch, num_patches, hidden)} view, got "
                         f"{out.dtype} {tuple(out.shape)}")
    if out.numel() == 0:
        return out
    bias = bias if bias.stride(0) == 1 else bias.contiguous()

    m = batch * num_patches
    aligned = (patch_size % 16 == 0 and (config is None or k % config.block_k == 0)  # no K masks: see the kernel
               and pixel_values.stride(3) == 1 and weight.stride(1) == 1
               and aligned16(pixel_values, pixel_values.stride()[:3]) and aligned16(weight, weight.stride()[:1])
               and all(s % 16 == 0 for s in pixel_values.stride()[:3]))
    pos = position_embeddings
    out_aligned = (hidden % 16 == 0 and out.stride(2) == 1 and pos.stride(1) == 1
                   and aligned16(out, out.stride()[:2]) and aligned16(pos, pos.stride()[:1]))
    args = (pixel_values, weight, bias, pos, out, m, hidden, k, num_patches, gw,
            *pixel_values.stride(), *weight.stride(), *pos.stride(), *out.stride())
    meta = dict(PATCH=patch_size, ALIGNED=aligned, OUT_ALIGNED=out_aligned,
                DOT_PRECISION=_gemm.FP32_DOT_PRECISION if dtype == torch.float32 else "tf32")  # 16-bit: unused
    grid = lambda cfg: (cdiv(m, cfg["BLOCK_M"]) * cdiv(hidden, cfg["BLOCK_N"]),)  # noqa: E731
    if config is not None:
        _patch_embed_kernel[grid(config.meta())](*args, **meta, **config.meta(), num_warps=config.num_warps,
                                                 num_stages=config.num_stages, **LAUNCH_OPTIONS)
    else:
        _tuned_kernel(dtype == torch.float32, arch=gpu_arch(out))[grid](*args, **meta, **LAUNCH_OPTIONS)
    return out


# Registered ops: opaque to torch.compile (fullgraph) and safe under CUDA graphs (no host syncs; the
# autotuner runs on the first call, so warm up before capturing). ``patch_embed_into`` is the
# mutating form for writing straight into a token buffer inside a compiled graph.

@torch.library.custom_op("eomt_fast::patch_embed", mutates_args=())
def patch_embed(
    pixel_values: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    position_embeddings: torch.Tensor,
    patch_size: int,
) -> torch.Tensor:
    """Triton ``patch_embed_ref`` (patch GEMM + bias + position embedding)."""
    return patch_embed_forward(pixel_values, weight, bias, position_embeddings, patch_size)


@patch_embed.register_fake
def _(pixel_values, weight, bias, position_embeddings, patch_size):
    batch, _, height, width = pixel_values.shape
    return weight.new_empty((batch, (height // patch_size) * (width // patch_size), weight.shape[0]))


@torch.library.custom_op("eomt_fast::patch_embed_into", mutates_args=("out",))
def patch_embed_into(
    pixel_values: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    position_embeddings: torch.Tensor,
    patch_size: int,
    out: torch.Tensor,
) -> None:
    """``patch_embed`` written into ``out``, a (B, P, C) view (e.g. the patch slice of the token buffer)."""
    patch_embed_forward(pixel_values, weight, bias, position_embeddings, patch_size, out=out)


@patch_embed_into.register_fake
def _(pixel_values, weight, bias, position_embeddings, patch_size, out):
    return None


patch_embed_op = _gemm.with_out(patch_embed, patch_embed_into, patch_embed_ref)


TRITON_OPS = {"patch_embed": patch_embed_op}


# ---- ahead-of-time compile checks (eomt-fast check-kernels) ----------------------------------------------

def patch_embed_aot_spec(dtype: torch.dtype, config: _gemm.GemmConfig, patch: int = 16):
    """``_patch_embed_kernel`` as the launcher compiles it on a GPU for contiguous, aligned pixel values,
    weights and position embeddings (unit strides are constants, as the JIT specialises them)."""
    from eomt_fast.aot import KernelSpec

    t = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    ints = ["M", "N", "K", "num_patches", "grid_w", "stride_xb", "stride_xc", "stride_xh", "stride_wn",
            "stride_pp", "stride_ob", "stride_op"]
    constexprs = {"stride_xw": 1, "stride_wk": 1, "stride_pc": 1, "stride_oc": 1, "PATCH": patch,
                  "ALIGNED": True, "OUT_ALIGNED": True,
                  "DOT_PRECISION": _gemm.FP32_DOT_PRECISION if dtype == torch.float32 else "tf32", **config.meta()}
    signature = {"X": f"*{t}", "W": f"*{t}", "Bias": f"*{t}", "Pos": f"*{t}", "Out": f"*{t}",
                 **{name: "i32" for name in ints}, **{name: "constexpr" for name in constexprs}}
    c = config
    name = (f"patch_embed_{t}_p{patch}_{c.block_m}x{c.block_n}x{c.block_k}_w{c.num_warps}s{c.num_stages}"
            + (f"_sub{c.epilogue_subtiles}" if c.epilogue_subtiles > 1 else ""))
    return KernelSpec(name=name, fn=_patch_embed_kernel, signature=signature, constexprs=constexprs,
                      num_warps=c.num_warps, num_stages=c.num_stages, needs_wgmma=dtype != torch.float32)


def aot_specs() -> list:
    # every bf16 tile of the autotune list, the first in fp16 (same registers and shared memory), fp32
    configs = patch_embed_configs()
    return ([patch_embed_aot_spec(torch.bfloat16, c) for c in configs]
            + [patch_embed_aot_spec(torch.float16, configs[0])]
            + [patch_embed_aot_spec(torch.float32, c) for c in patch_embed_configs(fp32=True)])

