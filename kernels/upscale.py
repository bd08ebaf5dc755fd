"""One upscale block of the EoMT mask path, channels-last:
ConvTranspose2d(C, C, k=2, s=2) -> act -> depthwise Conv2d 3x3 (pad 1, no bias) -> LayerNorm over C, act the
model's hidden_act (GELU in every released model; the names of ``linear.ACTIVATION_REFS``).

A k=2, s=2 transposed convolution has no overlap: every input pixel is one GEMM row
(C -> 4C) whose four C-wide pieces are the output pixels (2i+a, 2j+b). With the weight prepared once
as (C_in, 2, 2, C_out) (``prepare_convt_weight``) the GEMM output is already in (a, b, channel) order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import activation_ref, check_activation


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
    activation: str = "gelu",
) -> torch.Tensor:
    """x (B, H, W, C) channels-last -> (B, 2H, 2W, C) channels-last.

    convt_weight is the prepared (C_in, 2, 2, C_out) layout; dw_weight is the depthwise conv weight
    (C, 1, 3, 3) as stored in checkpoints.
    """
    batch, height, width, channels = x.shape
    out_channels = convt_weight.shape[-1]
    y = torch.matmul(x, convt_weight.reshape(channels, 4 * out_channels))  # (B, H, W, 2*2*C_out)
    y = y.view(batch, height, width, 2, 2, out_channels).permute(0, 1, 3, 2, 4, 5)
    y = activation_ref(y.reshape(batch, 2 * height, 2 * width, out_channels) + convt_bias, activation)
    y = F.conv2d(y.permute(0, 3, 1, 2), dw_weight, padding=1, groups=out_channels)  # channels-last strides
    y = y.permute(0, 2, 3, 1)
    return F.layer_norm(y, (out_channels,), ln_weight, ln_bias, eps)


# ---- Triton: two kernels per block -------------------------------------------------------------------
#
# 1. ConvTranspose 2x2 + bias + act: one GEMM, M = B*H*W input pixels, K = C_in, N = 4*C_out, with
#        y[b, 2i+a, 2j+c, o] = act(sum_k x[b, i, j, k] * Wp[k, a, c, o] + bias[o])   (n = (a*2 + c)*C_out + o)
#    The prepared weight Wp (C_in, 2, 2, C_out) is read in place as a (K, N) matrix with unit N stride (the
#    "x @ W" layout, no per-forward transpose); the input is read through its (b, i, j) strides, so the
#    patch slice of the token buffer works without a copy. The epilogue adds bias[n % C_out], applies the
#    activation (gemm.apply_activation: the exact erf GELU, SiLU, ReLU) in fp32 and scatters each row's
#    four C_out-wide pieces to their 2x2 output pixels of the channels-last (B, 2H, 2W, C_out) tensor,
#    rounded once to the model dtype.
# 2. depthwise 3x3 (zero padding 1, no bias) + LayerNorm over channels: one program walks a segment of
#    one output row in blocks of BLOCK_P pixels, each with all C channels in registers (fp32): nine taps
#    (read from L1/L2), the two-pass LayerNorm statistics, the block's output. The nine weight vectors
#    (a strided gather from the checkpoint's (C, 1, 3, 3) layout) are loaded once per program.
# fp16/bf16: tensor cores for the GEMM, fp32 accumulation and fp32 math everywhere else, one rounding of
# the activation's output (the reference rounds after every op). fp32: "ieee" dots (gemm.FP32_DOT_PRECISION).

import functools  # noqa: E402

from . import gemm as _gemm  # noqa: E402
from ._autotune import autotune  # noqa: E402
from ._triton import INTERPRETING, LAUNCH_OPTIONS, cdiv, check_devices, gpu_arch, next_power_of_2, on_input_device, tl, triton  # noqa: E402  (Triton, or a stand-in)
from .gemm import apply_activation, grouped_tile, split_columns  # noqa: E402

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_CHANNELS = 4096  # the depthwise + LayerNorm kernel holds a pixel's channels in registers


def convt_configs(fp32: bool = False) -> list[_gemm.GemmConfig]:
    """The tiles the autotuner tries (one under the interpreter): gemm.py's lists for epilogues that
    compute scattered addresses (at most 64 fp32 accumulators a thread)."""
    return _gemm.gemm_configs(fp32=fp32, view_4d=True)


@functools.lru_cache(maxsize=None)
def _tuned_convt_kernel(fp32: bool, arch: tuple[int, int] | None = None):  # one per arch: _triton.gpu_arch
    configs = [triton.Config(c.meta(), num_warps=c.num_warps, num_stages=c.num_stages) for c in convt_configs(fp32)]
    key = ["M", "N", "K", "ACTIVATION", "ALIGNED", "OUT_ALIGNED"]  # every flag that changes the compiled code
    return autotune(_convt_act_kernel, configs, key)


@triton.jit
def _convt_epilogue(
    acc, offs_m, offs_n, M, N, C_out, H, W, Bias, Out,
    stride_ob, stride_oh, stride_ow, stride_oc, ACTIVATION: tl.constexpr, OUT_ALIGNED: tl.constexpr,
):
    """act(acc + bias) of rows offs_m = (b, i, j), columns offs_n = (a, c, o) to Out[b, 2i+a, 2j+c, o]."""
    if OUT_ALIGNED:  # N % 16 == 0 in a form the alignment analysis reads (vector-wide masks)
        mask_n = offs_n < N // 16 * 16
    else:
        mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    channel = offs_n % C_out
    y = acc + tl.load(Bias + channel, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = apply_activation(y, ACTIVATION)
    pixel = offs_m % (H * W)
    out_rows = (Out + (offs_m // (H * W)).to(tl.int64) * stride_ob + (2 * (pixel // W)).to(tl.int64) * stride_oh
                + (2 * (pixel % W)).to(tl.int64) * stride_ow)  # [BLOCK_M] output pixel (2i, 2j)
    out_cols = (offs_n // (2 * C_out)) * stride_oh + ((offs_n // C_out) % 2) * stride_ow + channel * stride_oc
    if OUT_ALIGNED:  # C_out % 16 == 0, 16-element aligned pixel strides: runs of 16 contiguous channels
        out_rows = tl.multiple_of(out_rows, [16])
        out_cols = tl.max_contiguous(tl.multiple_of(out_cols, [16]), [16])
    tl.store(out_rows[:, None] + out_cols[None, :], y.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _convt_act_kernel(
    X,  # (B, H, W, C_in) input, channels-last, any strides
    Wt,  # (C_in, 4*C_out) prepared ConvTranspose weight (C_in, 2, 2, C_out) as a (K, N) matrix
    Bias,  # (C_out,) unit stride
    Out,  # (B, 2H, 2W, C_out) output, any strides
    M, N, K,  # M = B*H*W, N = 4*C_out, K = C_in
    C_out, H, W,
    stride_xb, stride_xh, stride_xw, stride_xc,
    stride_wk, stride_wn,
    stride_ob, stride_oh, stride_ow, stride_oc,
    ACTIVATION: tl.constexpr,  # gemm.ACTIVATIONS code of the activation
    ALIGNED: tl.constexpr,  # K % 16 == 0, N % 16 == 0, 16-byte aligned input pixels and weight rows
    OUT_ALIGNED: tl.constexpr,  # C_out % 16 == 0, 16-element aligned output pixel strides, aligned Out
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
    pixel = rows % (H * W)
    x_rows = (X + (rows // (H * W)).to(tl.int64) * stride_xb + (pixel // W).to(tl.int64) * stride_xh
              + (pixel % W).to(tl.int64) * stride_xw)  # [BLOCK_M] input pixels
    k_hi = K
    if ALIGNED:
        x_rows = tl.multiple_of(x_rows, [16])
        # N % 16 == 0: the wrapped columns are runs of 16 consecutive ones (hinted on the modulo itself: a
        # hint on ``cols * stride_wn`` would vanish when the JIT folds stride_wn == 1)
        cols = tl.max_contiguous(tl.multiple_of(cols, [16]), [16])
        k_hi = K // 16 * 16  # a no-op, in a form the alignment analysis reads
    w_cols = cols * stride_wn
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, k_hi, BLOCK_K):
        mask_k = offs_k < k_hi
        w_rows = Wt + offs_k.to(tl.int64) * stride_wk  # [BLOCK_K] weight rows (input channels)
        if ALIGNED:
            w_rows = tl.multiple_of(w_rows, [16])
        a = tl.load(x_rows[:, None] + offs_k[None, :] * stride_xc, mask=mask_k[None, :], other=0.0)
        w = tl.load(w_rows[:, None] + w_cols[None, :], mask=mask_k[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        offs_k += BLOCK_K
    if EPILOGUE_SUBTILES == 2:  # two column halves in turn: fewer live registers
        acc_left, acc_right = split_columns(acc, BLOCK_M, BLOCK_N)
        offs_left = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
        _convt_epilogue(acc_left, offs_m, offs_left, M, N, C_out, H, W, Bias, Out,
                        stride_ob, stride_oh, stride_ow, stride_oc, ACTIVATION, OUT_ALIGNED)
        _convt_epilogue(acc_right, offs_m, offs_left + BLOCK_N // 2, M, N, C_out, H, W, Bias, Out,
                        stride_ob, stride_oh, stride_ow, stride_oc, ACTIVATION, OUT_ALIGNED)
    else:
        _convt_epilogue(acc, offs_m, offs_n, M, N, C_out, H, W, Bias, Out,
                        stride_ob, stride_oh, stride_ow, stride_oc, ACTIVATION, OUT_ALIGNED)


@triton.jit
def _dwconv_tap(acc, row, row_inside, cols, W, offs_c, mask_c, stride_yw, stride_yc, tap, ALIGNED: tl.constexpr):
    """acc + Y[b, r, cols, :] * tap for the input row starting at ``row``; zero outside the image (the conv's
    padding): ``row_inside`` (a [BLOCK_P] vector) says whether row r exists."""
    inside = row_inside & (cols >= 0) & (cols < W)
    pixels = row + cols.to(tl.int64) * stride_yw  # [BLOCK_P]
    if ALIGNED:
        pixels = tl.multiple_of(pixels, [16])
    x = tl.load(pixels[:, None] + offs_c[None, :] * stride_yc, mask=inside[:, None] & mask_c[None, :], other=0.0)
    return acc + x.to(tl.float32) * tap[None, :]


# B only keys the autotuner: not specialised (batch 1 would otherwise compile every tile again, and as
# another binary than the one check-kernels compiles)
@triton.jit(do_not_specialize=["B"])
def _dwconv_layernorm_kernel(
    Y,  # (B, H, W, C) act(ConvTranspose) output, channels-last, any strides
    Wd,  # (C, 1, 3, 3) depthwise conv weight, any strides
    LnW, LnB,  # (C,) LayerNorm weight and bias, unit stride
    Out,  # (B, H, W, C) output, any strides
    B,  # batch: not read by the kernel, an autotune key (the grid is B * H x W / SEGMENT programs)
    H, W, C, eps,
    stride_yb, stride_yh, stride_yw, stride_yc,
    stride_wc, stride_wh, stride_ww,
    stride_ob, stride_oh, stride_ow, stride_oc,
    ALIGNED: tl.constexpr,  # C % 16 == 0 and 16-byte aligned pixels of Y and Out
    BLOCK_P: tl.constexpr,  # output pixels computed at once (all their channels in registers)
    BLOCK_C: tl.constexpr,  # next_power_of_2(C)
    SEGMENT: tl.constexpr,  # output pixels of one row per program, in BLOCK_P steps (tuned: DWCONV_GPU_SEGMENTS)
):
    """LayerNorm_C(depthwise_conv3x3(Y)) for SEGMENT pixels of row program_id(0) = b*H + h.

    The nine weight vectors (a strided gather from the (C, 1, 3, 3) layout) and the LayerNorm weights are
    loaded once per program and reused for its SEGMENT / BLOCK_P pixel blocks."""
    row = tl.program_id(0)
    b = row // H
    h = row % H
    first = tl.program_id(1) * SEGMENT
    offs_c = tl.arange(0, BLOCK_C)
    if ALIGNED:
        mask_c = offs_c < C // 16 * 16  # = C, in a form the alignment analysis reads
    else:
        mask_c = offs_c < C
    taps = Wd + offs_c * stride_wc
    w00 = tl.load(taps, mask=mask_c, other=0.0).to(tl.float32)
    w01 = tl.load(taps + stride_ww, mask=mask_c, other=0.0).to(tl.float32)
    w02 = tl.load(taps + 2 * stride_ww, mask=mask_c, other=0.0).to(tl.float32)
    w10 = tl.load(taps + stride_wh, mask=mask_c, other=0.0).to(tl.float32)
    w11 = tl.load(taps + stride_wh + stride_ww, mask=mask_c, other=0.0).to(tl.float32)
    w12 = tl.load(taps + stride_wh + 2 * stride_ww, mask=mask_c, other=0.0).to(tl.float32)
    w20 = tl.load(taps + 2 * stride_wh, mask=mask_c, other=0.0).to(tl.float32)
    w21 = tl.load(taps + 2 * stride_wh + stride_ww, mask=mask_c, other=0.0).to(tl.float32)
    w22 = tl.load(taps + 2 * stride_wh + 2 * stride_ww, mask=mask_c, other=0.0).to(tl.float32)
    gamma = tl.load(LnW + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    beta = tl.load(LnB + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    row_here = Y + b.to(tl.int64) * stride_yb + h.to(tl.int64) * stride_yh
    row_above = row_here - stride_yh
    row_below = row_here + stride_yh
    out_row = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    # whether the rows above and below exist, as vectors: Triton's interpreter cannot combine a scalar
    # condition with a vector mask
    h_vec = tl.zeros((BLOCK_P,), dtype=tl.int32) + h
    above_inside = h_vec > 0
    below_inside = h_vec < H - 1
    here_inside = h_vec >= 0
    for start in range(first, tl.minimum(first + SEGMENT, W), BLOCK_P):
        offs_p = start + tl.arange(0, BLOCK_P)
        left, right = offs_p - 1, offs_p + 1
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        acc = _dwconv_tap(acc, row_above, above_inside, left, W, offs_c, mask_c, stride_yw, stride_yc, w00, ALIGNED)
        acc = _dwconv_tap(acc, row_above, above_inside, offs_p, W, offs_c, mask_c, stride_yw, stride_yc, w01, ALIGNED)
        acc = _dwconv_tap(acc, row_above, above_inside, right, W, offs_c, mask_c, stride_yw, stride_yc, w02, ALIGNED)
        acc = _dwconv_tap(acc, row_here, here_inside, left, W, offs_c, mask_c, stride_yw, stride_yc, w10, ALIGNED)
        acc = _dwconv_tap(acc, row_here, here_inside, offs_p, W, offs_c, mask_c, stride_yw, stride_yc, w11, ALIGNED)
        acc = _dwconv_tap(acc, row_here, here_inside, right, W, offs_c, mask_c, stride_yw, stride_yc, w12, ALIGNED)
        acc = _dwconv_tap(acc, row_below, below_inside, left, W, offs_c, mask_c, stride_yw, stride_yc, w20, ALIGNED)
        acc = _dwconv_tap(acc, row_below, below_inside, offs_p, W, offs_c, mask_c, stride_yw, stride_yc, w21, ALIGNED)
        acc = _dwconv_tap(acc, row_below, below_inside, right, W, offs_c, mask_c, stride_yw, stride_yc, w22, ALIGNED)
        # LayerNorm over the channels: two-pass statistics in fp32
        mean = tl.sum(acc, axis=1) / C
        centered = tl.where(mask_c[None, :], acc - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / C + eps)
        out = centered * rstd[:, None] * gamma[None, :] + beta[None, :]
        out_pixels = out_row + offs_p.to(tl.int64) * stride_ow
        if ALIGNED:
            out_pixels = tl.multiple_of(out_pixels, [16])
        tl.store(out_pixels[:, None] + offs_c[None, :] * stride_oc, out.to(Out.dtype.element_ty),
                 mask=(offs_p < W)[:, None] & mask_c[None, :])


def _aligned16(t: torch.Tensor, strides) -> bool:
    """t's data starts on 16 bytes and every given stride is a multiple of 16 bytes."""
    return t.data_ptr() % 16 == 0 and all((s * t.element_size()) % 16 == 0 for s in strides)


# Output pixels of a row per program of the depthwise + LayerNorm kernel, a tuning choice: long segments
# load the eleven weight vectors fewer times, short ones make more programs (an 80x80 output at batch 1 is
# 80 rows: 240 programs of 32 pixels for 132 SMs, each walking its pixels in turn). DWCONV_SEGMENT is the one
# the interpreter and check-kernels use.
DWCONV_SEGMENT = 32
DWCONV_GPU_SEGMENTS = (4, 8, 32)
# (BLOCK_P, num_warps) of the depthwise + LayerNorm kernel the autotuner tries, kept to those where a thread
# holds at most 8 channels of each of the nine weight vectors and 4 to 16 fp32 accumulators
# (``dwconv_configs``): the nine taps' loads are issued together, so registers grow fast with BLOCK_P (8
# pixels x 1024 channels on 8 warps spills); fewer pixels a block means more warps an SM. Which wins is a
# question for the GPU.
DWCONV_GPU_CONFIGS = ((1, 4), (2, 4), (4, 4), (1, 8), (2, 8), (4, 8), (8, 8))


def dwconv_configs(channels: int) -> list[tuple[int, int]]:
    """(BLOCK_P, num_warps) pairs for this many channels (exactly one under the interpreter)."""
    block_c = next_power_of_2(channels)
    if INTERPRETING:
        return [(max(1, min(DWCONV_SEGMENT, 4096 // block_c)), 4)]
    fits = [(p, w) for p, w in DWCONV_GPU_CONFIGS
            if block_c // (32 * w) <= 8 and 4 <= p * block_c // (32 * w) <= 16]
    return fits or [(1, 8)]


def _prune_dwconv_configs(configs, named_args, **kwargs):
    keep = dwconv_configs(named_args["C"])
    return [c for c in configs if (c.kwargs["BLOCK_P"], c.num_warps) in keep]


@functools.lru_cache(maxsize=None)
def _tuned_dwconv_kernel(arch: tuple[int, int] | None = None):  # one per arch: _triton.gpu_arch
    pairs = [dwconv_configs(1)[0]] if INTERPRETING else DWCONV_GPU_CONFIGS
    segments = [DWCONV_SEGMENT] if INTERPRETING else DWCONV_GPU_SEGMENTS
    configs = [triton.Config({"BLOCK_P": p, "SEGMENT": s}, num_warps=w, num_stages=1)
               for p, w in pairs for s in segments if s >= p]
    prune = None if INTERPRETING else {"early_config_prune": _prune_dwconv_configs}
    return autotune(_dwconv_layernorm_kernel, configs, ["B", "H", "W", "C", "ALIGNED"], prune_configs_by=prune)


@on_input_device
def convt_activation(x: torch.Tensor, convt_weight: torch.Tensor, convt_bias: torch.Tensor, activation: str = "gelu",
                     *, out: torch.Tensor | None = None, config: _gemm.GemmConfig | None = None) -> torch.Tensor:
    """act(ConvTranspose2d(k=2, s=2)(x) + bias), channels-last: (B, H, W, C_in) -> (B, 2H, 2W, C_out)."""
    batch, height, width, c_in = x.shape
    c_out = convt_weight.shape[-1]
    weight = convt_weight.reshape(c_in, 4 * c_out)  # a view of the prepared (contiguous) weight
    if out is None:
        out = torch.empty((batch, 2 * height, 2 * width, c_out), dtype=x.dtype, device=x.device)
    m, n, k = batch * height * width, 4 * c_out, c_in
    if out.numel() == 0:
        return out
    bias = convt_bias if convt_bias.stride(0) == 1 else convt_bias.contiguous()
    aligned = (k % 16 == 0 and n % 16 == 0 and x.stride(3) == 1 and weight.stride(1) == 1
               and _aligned16(x, x.stride()[:3]) and _aligned16(weight, weight.stride()[:1]))
    out_aligned = (c_out % 16 == 0 and out.stride(3) == 1 and _aligned16(out, out.stride()[:3])
                   and all(s % 16 == 0 for s in out.stride()[:3]))
    args = (x, weight, bias, out, m, n, k, c_out, height, width, *x.stride(), *weight.stride(), *out.stride())
    meta = dict(ACTIVATION=_gemm.ACTIVATIONS[check_activation(activation)], ALIGNED=aligned, OUT_ALIGNED=out_aligned,
                DOT_PRECISION=_gemm.FP32_DOT_PRECISION if x.dtype == torch.float32 else "tf32")  # 16-bit: unused
    grid = lambda cfg: (cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]),)  # noqa: E731
    if config is not None:
        _convt_act_kernel[grid(config.meta())](*args, **meta, **config.meta(), num_warps=config.num_warps,
                                                num_stages=config.num_stages, **LAUNCH_OPTIONS)
    else:
        _tuned_convt_kernel(x.dtype == torch.float32, arch=gpu_arch(x))[grid](*args, **meta, **LAUNCH_OPTIONS)
    return out


@on_input_device
def dwconv_layernorm(y: torch.Tensor, dw_weight: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                     eps: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm over channels of the depthwise 3x3 conv (pad 1, no bias) of channels-last y (B, H, W, C)."""
    batch, height, width, channels = y.shape
    if out is None:
        out = torch.empty_like(y, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    ln_weight = ln_weight if ln_weight.stride(0) == 1 else ln_weight.contiguous()
    ln_bias = ln_bias if ln_bias.stride(0) == 1 else ln_bias.contiguous()
    aligned = (channels % 16 == 0 and y.stride(3) == 1 and out.stride(3) == 1
               and _aligned16(y, y.stride()[:3]) and _aligned16(out, out.stride()[:3]))
    grid = lambda meta: (batch * height, cdiv(width, meta["SEGMENT"]))  # noqa: E731
    _tuned_dwconv_kernel(arch=gpu_arch(y))[grid](
        y, dw_weight, ln_weight, ln_bias, out, batch, height, width, channels, eps,
        *y.stride(), dw_weight.stride(0), dw_weight.stride(2), dw_weight.stride(3), *out.stride(),
        ALIGNED=aligned, BLOCK_C=next_power_of_2(channels), **LAUNCH_OPTIONS)
    return out


def upscale_block_forward(
    x: torch.Tensor,
    convt_weight: torch.Tensor,
    convt_bias: torch.Tensor,
    dw_weight: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    activation: str = "gelu",
    *,
    out: torch.Tensor | None = None,
    config: _gemm.GemmConfig | None = None,
) -> torch.Tensor:
    """Triton ``upscale_block_ref``: (B, H, W, C) channels-last -> (B, 2H, 2W, C), two kernels.

    x may be any strided view with unit channel stride (e.g. the patch tokens of the token buffer viewed as
    (B, g, g, C)); ``out`` a (B, 2H, 2W, C) tensor to write into; ``config`` fixes the ConvTranspose GEMM
    tile instead of autotuning."""
    check_activation(activation)
    if x.dim() != 4:
        raise ValueError(f"x must be channels-last (B, H, W, C), got shape {tuple(x.shape)}")
    batch, height, width, channels = x.shape
    if convt_weight.dim() != 4 or tuple(convt_weight.shape[:3]) != (channels, 2, 2):
        raise ValueError(f"convt_weight must be prepared as ({channels}, 2, 2, C_out), got {tuple(convt_weight.shape)}")
    c_out = convt_weight.shape[3]
    for name, t, shape in (("convt_bias", convt_bias, (c_out,)), ("dw_weight", dw_weight, (c_out, 1, 3, 3)),
                           ("ln_weight", ln_weight, (c_out,)), ("ln_bias", ln_bias, (c_out,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    dtype = x.dtype
    if dtype not in _DTYPES or any(t.dtype != dtype for t in (convt_weight, convt_bias, dw_weight, ln_weight, ln_bias)):
        raise TypeError(f"x and the block's weights must share one of fp16/bf16/fp32, got x {dtype}")
    if next_power_of_2(c_out) > MAX_CHANNELS:
        raise ValueError(f"at most {MAX_CHANNELS} channels (held in registers), got {c_out}")
    if x.device.type != "cuda" and not INTERPRETING:
        raise RuntimeError(f"upscale runs on CUDA (or in Triton's interpreter), x is on {x.device}")
    check_devices("x", x, convt_weight=convt_weight, convt_bias=convt_bias, dw_weight=dw_weight,
                  ln_weight=ln_weight, ln_bias=ln_bias, out=out)
    shape = (batch, 2 * height, 2 * width, c_out)
    if out is not None and (tuple(out.shape) != shape or out.dtype != dtype):
        raise ValueError(f"out must be a {dtype} tensor of shape {shape}, got {out.dtype} {tuple(out.shape)}")
    y = convt_activation(x, convt_weight, convt_bias, activation, config=config)
    return dwconv_layernorm(y, dw_weight, ln_weight, ln_bias, eps, out=out)


# Registered op: opaque to torch.compile (fullgraph) and safe under CUDA graphs (no host syncs; the
# autotuner runs on the first call, so warm up before capturing).

@torch.library.custom_op("eomt_fast::upscale", mutates_args=())
def upscale_block(
    x: torch.Tensor,
    convt_weight: torch.Tensor,
    convt_bias: torch.Tensor,
    dw_weight: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    activation: str = "gelu",
) -> torch.Tensor:
    """Triton ``upscale_block_ref`` (ConvTranspose 2x2 + act, depthwise 3x3 + LayerNorm)."""
    return upscale_block_forward(x, convt_weight, convt_bias, dw_weight, ln_weight, ln_bias, eps, activation)


@upscale_block.register_fake
def _(x, convt_weight, convt_bias, dw_weight, ln_weight, ln_bias, eps, activation="gelu"):
    batch, height, width, _ = x.shape
    return x.new_empty((batch, 2 * height, 2 * width, convt_weight.shape[-1]))


TRITON_OPS = {"upscale": upscale_block}


# ---- ahead-of-time compile checks (eomt-fast check-kernels) ----------------------------------------------

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def convt_aot_spec(dtype: torch.dtype, config: _gemm.GemmConfig, activation: str = "gelu"):
    """``_convt_act_kernel`` as the launcher compiles it on a GPU for a contiguous input and output and the
    prepared weight (unit strides are constants, as the JIT specialises them; ALIGNED flags set)."""
    from eomt_fast.aot import KernelSpec

    t = _TRITON_DTYPE[dtype]
    ints = ["M", "N", "K", "C_out", "H", "W", "stride_xb", "stride_xh", "stride_xw", "stride_wk",
            "stride_ob", "stride_oh", "stride_ow"]
    constexprs = {"stride_xc": 1, "stride_wn": 1, "stride_oc": 1, "ACTIVATION": _gemm.ACTIVATIONS[activation],
                  "ALIGNED": True, "OUT_ALIGNED": True,
                  "DOT_PRECISION": _gemm.FP32_DOT_PRECISION if dtype == torch.float32 else "tf32", **config.meta()}
    signature = {"X": f"*{t}", "Wt": f"*{t}", "Bias": f"*{t}", "Out": f"*{t}", **{n: "i32" for n in ints},
                 **{n: "constexpr" for n in constexprs}}
    c = config
    name = (f"upscale_convt_{activation}_{t}_{c.block_m}x{c.block_n}x{c.block_k}_w{c.num_warps}s{c.num_stages}"
            + (f"_sub{c.epilogue_subtiles}" if c.epilogue_subtiles > 1 else ""))
    return KernelSpec(name=name, fn=_convt_act_kernel, signature=signature, constexprs=constexprs,
                      num_warps=c.num_warps, num_stages=c.num_stages, needs_wgmma=dtype != torch.float32)


def dwconv_aot_spec(dtype: torch.dtype, channels: int, block_p: int, num_warps: int):
    from eomt_fast.aot import KernelSpec

    t = _TRITON_DTYPE[dtype]
    ints = ["B", "H", "W", "C", "stride_yb", "stride_yh", "stride_yw", "stride_wc", "stride_wh",
            "stride_ob", "stride_oh", "stride_ow"]
    constexprs = {"stride_yc": 1, "stride_ww": 1, "stride_oc": 1, "ALIGNED": True, "BLOCK_P": block_p,
                  "BLOCK_C": next_power_of_2(channels), "SEGMENT": DWCONV_SEGMENT}
    signature = {"Y": f"*{t}", "Wd": f"*{t}", "LnW": f"*{t}", "LnB": f"*{t}", "Out": f"*{t}", "eps": "fp32",
                 **{n: "i32" for n in ints}, **{n: "constexpr" for n in constexprs}}
    return KernelSpec(name=f"upscale_dwconv_layernorm_{t}_C{channels}_p{block_p}w{num_warps}",
                      fn=_dwconv_layernorm_kernel, signature=signature, constexprs=constexprs,
                      num_warps=num_warps, num_stages=1)


def aot_specs() -> list:
    # the ConvT GEMM: every bf16 tile of the autotune list, the first in fp16, fp32, SiLU (EoMT-DINOv3's gated
    # models) at the largest bf16 tile; the depthwise +
    # LayerNorm kernel at every tile of the hidden sizes of ViT-S/B/L/g (384, 768, 1024, 1536), bf16 and fp32
    configs = convt_configs()
    return ([convt_aot_spec(torch.bfloat16, c) for c in configs]
            + [convt_aot_spec(torch.float16, configs[0]), convt_aot_spec(torch.bfloat16, configs[0], "silu")]
            + [convt_aot_spec(torch.float32, c) for c in convt_configs(fp32=True)]
            + [dwconv_aot_spec(dtype, c, p, w) for dtype in (torch.bfloat16, torch.float32)
               for c in (384, 768, 1024, 1536) for p, w in dwconv_configs(c)]
            + [dwconv_aot_spec(torch.float16, 1024, *dwconv_configs(1024)[0])])

