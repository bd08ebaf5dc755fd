"""One upscale block of the EoMT mask path, channels-last:
ConvTranspose2d(C, C, k=2, s=2) -> act -> depthwise Conv2d 3x3 (pad 1, no bias) -> LayerNorm over C, act the
model's hidden_act (GELU in every released model; the names of ``linear.ACTIVATION_REFS``).

A k=2, s=2 transposed convolution has no overlap: every input pixel is one GEMM row
(C -> 4C) whose four C-wide pieces are the output pixels (2i+a, 2j+b). With the weight prepared once
as (2, 2, C_out, C_in) (``prepare_convt_weight``: an nn.Linear-style (N, K) matrix, N = 4 C_out in (a, b,
channel) order) the GEMM output is already in (a, b, channel) order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import activation_ref, check_activation


def prepare_convt_weight(weight: torch.Tensor) -> torch.Tensor:
    """ConvTranspose2d weight (C_in, C_out, 2, 2) -> (2, 2, C_out, C_in), contiguous: the GEMM's (N, K) weight
    with unit K stride, as the TMA tiles of gemm.py read it. Done at load."""
    return weight.permute(2, 3, 1, 0).contiguous()


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

    convt_weight is the prepared (2, 2, C_out, C_in) layout; dw_weight is the depthwise conv weight
    (C, 1, 3, 3) as stored in checkpoints.
    """
    batch, height, width, channels = x.shape
    out_channels = convt_weight.shape[2]
    y = torch.matmul(x, convt_weight.reshape(4 * out_channels, channels).t())  # (B, H, W, 2*2*C_out)
    y = y.view(batch, height, width, 2, 2, out_channels).permute(0, 1, 3, 2, 4, 5)
    y = activation_ref(y.reshape(batch, 2 * height, 2 * width, out_channels) + convt_bias, activation)
    y = F.conv2d(y.permute(0, 3, 1, 2), dw_weight, padding=1, groups=out_channels)  # channels-last strides
    y = y.permute(0, 2, 3, 1)
    return F.layer_norm(y, (out_channels,), ln_weight, ln_bias, eps)


# ---- Triton: two kernels per block -------------------------------------------------------------------
#
# 1. ConvTranspose 2x2 + bias + act: one gemm.gemm call, M = B*H*W input pixels, K = C_in, N = 4*C_out, with
#        y[b, 2i+a, 2j+c, o] = act(sum_k x[b, i, j, k] * Wp[a, c, o, k] + bias[o])   (n = (a*2 + c)*C_out + o)
#    The prepared weight Wp (2, 2, C_out, C_in) is the GEMM's (N, K) matrix as it stands; the input is read as
#    (B, H*W, C_in) rows through its strides, so the patch slice of the token buffer works without a copy.
#    The output goes through gemm's 4-D view rule, out[m // Mi, m % Mi, n // Ni, n % Ni], on the
#    channels-last (B, 2H, 2W, C_out) tensor viewed as (B*H, W, 2, 2*C_out): rows (b, i) and j, columns a
#    and the (c, o) pair, which lies contiguous in the output (pixels 2j and 2j+1 of row 2i+a). The epilogue
#    adds bias[n % C_out] (the bias repeated four times: one small copy a call), applies the activation
#    (the exact erf GELU, SiLU, ReLU) in fp32 and rounds once to the model dtype. It is tuned as every
#    GEMM is: on sm_90, pointer and TMA tiles (gemm._tune), the TMA ones where A is a 2-D matrix (batch 1,
#    or a contiguous input: the second block's).
# 2. depthwise 3x3 (zero padding 1, no bias) + LayerNorm over channels: one program walks a segment of
#    one output row in blocks of BLOCK_P pixels, each with all C channels in registers (fp32): nine taps
#    (read from L1/L2; or, SLIDE, one pixel at a time with the last two input columns kept in registers:
#    three loads a pixel), the two-pass LayerNorm statistics, the block's output. The nine weight vectors
#    (a strided gather from the checkpoint's (C, 1, 3, 3) layout) are loaded once per program.
# fp16/bf16: tensor cores for the GEMM, fp32 accumulation and fp32 math everywhere else, one rounding of
# the activation's output (the reference rounds after every op). fp32: "ieee" dots (gemm.FP32_DOT_PRECISION).

import functools  # noqa: E402

from . import gemm as _gemm  # noqa: E402
from ._autotune import autotune  # noqa: E402
from ._triton import INTERPRETING, LAUNCH_OPTIONS, aligned16, cdiv, check_devices, gpu_arch, next_power_of_2, on_input_device, tl, triton  # noqa: E402  (Triton, or a stand-in)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_CHANNELS = 4096  # the depthwise + LayerNorm kernel holds a pixel's channels in registers


def convt_configs(fp32: bool = False) -> list[_gemm.GemmConfig]:
    """The pointer tiles the ConvTranspose GEMM is tuned over (gemm.py's list for its 4-D output view; on sm_90
    its TMA tiles too, ``gemm.gemm_configs(view_4d=True, tma=True)``)."""
    return _gemm.gemm_configs(fp32=fp32, view_4d=True)


@triton.jit
def _dwconv_pixels(row, row_inside, cols, W, offs_c, mask_c, stride_yw, stride_yc, ALIGNED: tl.constexpr):
    """Y[b, r, cols, :] in fp32 for the input row starting at ``row``; zero outside the image (the conv's
    padding): ``row_inside`` (a [BLOCK_P] vector) says whether row r exists."""
    inside = row_inside & (cols >= 0) & (cols < W)
    pixels = row + cols.to(tl.int64) * stride_yw  # [BLOCK_P]
    if ALIGNED:
        pixels = tl.multiple_of(pixels, [16])
    x = tl.load(pixels[:, None] + offs_c[None, :] * stride_yc, mask=inside[:, None] & mask_c[None, :], other=0.0)
    return x.to(tl.float32)


@triton.jit
def _dwconv_tap(acc, row, row_inside, cols, W, offs_c, mask_c, stride_yw, stride_yc, tap, ALIGNED: tl.constexpr):
    """acc + Y[b, r, cols, :] * tap (``_dwconv_pixels``)."""
    return acc + _dwconv_pixels(row, row_inside, cols, W, offs_c, mask_c, stride_yw, stride_yc, ALIGNED) * tap[None, :]


@triton.jit
def _dwconv_column(row_above, row_here, row_below, above_inside, here_inside, below_inside, cols, W, offs_c, mask_c,
                   stride_yw, stride_yc, ALIGNED: tl.constexpr):
    """Input column(s) ``cols`` of the rows above, at and below the output row (``_dwconv_pixels`` each)."""
    return (_dwconv_pixels(row_above, above_inside, cols, W, offs_c, mask_c, stride_yw, stride_yc, ALIGNED),
            _dwconv_pixels(row_here, here_inside, cols, W, offs_c, mask_c, stride_yw, stride_yc, ALIGNED),
            _dwconv_pixels(row_below, below_inside, cols, W, offs_c, mask_c, stride_yw, stride_yc, ALIGNED))


@triton.jit
def _dwconv_row_taps(acc, left, middle, right, w_left, w_middle, w_right):
    """acc + one input row's three taps, added left to right (the blocked path's order)."""
    acc = acc + left * w_left[None, :]
    acc = acc + middle * w_middle[None, :]
    return acc + right * w_right[None, :]


@triton.jit
def _layernorm_store(acc, offs_p, W, C, eps, gamma, beta, mask_c, offs_c, out_row, stride_ow, stride_oc, Out,
                     ALIGNED: tl.constexpr):
    """LayerNorm over the channels of acc (two-pass statistics in fp32), stored to pixels offs_p of the row."""
    mean = tl.sum(acc, axis=1) / C
    centered = tl.where(mask_c[None, :], acc - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / C + eps)
    out = centered * rstd[:, None] * gamma[None, :] + beta[None, :]
    out_pixels = out_row + offs_p.to(tl.int64) * stride_ow
    if ALIGNED:
        out_pixels = tl.multiple_of(out_pixels, [16])
    tl.store(out_pixels[:, None] + offs_c[None, :] * stride_oc, out.to(Out.dtype.element_ty),
             mask=(offs_p < W)[:, None] & mask_c[None, :])


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
    SLIDE: tl.constexpr,  # BLOCK_P 1: keep the last two input columns in registers, load one new column a pixel
):
    """LayerNorm_C(depthwise_conv3x3(Y)) for SEGMENT pixels of row program_id(0) = b*H + h.

    The nine weight vectors (a strided gather from the (C, 1, 3, 3) layout) and the LayerNorm weights are
    loaded once per program and reused for its SEGMENT / BLOCK_P pixel blocks. Each block loads its nine
    taps (three columns of three rows, overlapping its neighbours' in L1); with SLIDE one pixel at a time
    slides a three-column window along the row: three loads a pixel instead of nine."""
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
    last = tl.minimum(first + SEGMENT, W)
    if SLIDE:
        tl.static_assert(BLOCK_P == 1, "SLIDE walks one pixel at a time")
        # the window's left and middle columns of the three rows, for the segment's first pixel
        offs_p = first + tl.arange(0, 1)
        above_l, here_l, below_l = _dwconv_column(row_above, row_here, row_below, above_inside, here_inside,
                                                  below_inside, offs_p - 1, W, offs_c, mask_c, stride_yw, stride_yc,
                                                  ALIGNED)
        above_m, here_m, below_m = _dwconv_column(row_above, row_here, row_below, above_inside, here_inside,
                                                  below_inside, offs_p, W, offs_c, mask_c, stride_yw, stride_yc,
                                                  ALIGNED)
        for start in range(first, last):
            offs_p = start + tl.arange(0, 1)
            above_r, here_r, below_r = _dwconv_column(row_above, row_here, row_below, above_inside, here_inside,
                                                      below_inside, offs_p + 1, W, offs_c, mask_c, stride_yw,
                                                      stride_yc, ALIGNED)
            acc = tl.zeros((1, BLOCK_C), dtype=tl.float32)
            acc = _dwconv_row_taps(acc, above_l, above_m, above_r, w00, w01, w02)
            acc = _dwconv_row_taps(acc, here_l, here_m, here_r, w10, w11, w12)
            acc = _dwconv_row_taps(acc, below_l, below_m, below_r, w20, w21, w22)
            _layernorm_store(acc, offs_p, W, C, eps, gamma, beta, mask_c, offs_c, out_row, stride_ow, stride_oc, Out,
                             ALIGNED)
            above_l, here_l, below_l = above_m, here_m, below_m
            above_m, here_m, below_m = above_r, here_r, below_r
    else:
        for start in range(first, last, BLOCK_P):
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
            _layernorm_store(acc, offs_p, W, C, eps, gamma, beta, mask_c, offs_c, out_row, stride_ow, stride_oc, Out,
                             ALIGNED)


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
    configs = [triton.Config({"BLOCK_P": p, "SEGMENT": s, "SLIDE": False}, num_warps=w, num_stages=1)
               for p, w in pairs for s in segments if s >= p]
    if not INTERPRETING:  # the sliding window at the one-pixel tiles (pruned like them by channel count)
        configs += [triton.Config({"BLOCK_P": 1, "SEGMENT": s, "SLIDE": True}, num_warps=w, num_stages=1)
                    for p, w in pairs if p == 1 for s in segments if s >= 8]
    prune = None if INTERPRETING else {"early_config_prune": _prune_dwconv_configs}
    return autotune(_dwconv_layernorm_kernel, configs, ["B", "H", "W", "C", "ALIGNED"], prune_configs_by=prune)


@on_input_device
def convt_activation(x: torch.Tensor, convt_weight: torch.Tensor, convt_bias: torch.Tensor, activation: str = "gelu",
                     *, out: torch.Tensor | None = None, config: _gemm.GemmConfig | None = None) -> torch.Tensor:
    """act(ConvTranspose2d(k=2, s=2)(x) + bias), channels-last: (B, H, W, C_in) -> (B, 2H, 2W, C_out), one GEMM
    (``gemm.gemm``) scattering its rows to the 2x2 output pixels. ``out``: a channels-last contiguous tensor to
    write into; ``config`` fixes the GEMM tile."""
    batch, height, width, c_in = x.shape
    c_out = convt_weight.shape[2]
    if out is None:
        out = torch.empty((batch, 2 * height, 2 * width, c_out), dtype=x.dtype, device=x.device)
    elif not out.is_contiguous():
        raise ValueError("out must be contiguous (channels-last (B, 2H, 2W, C_out)): the GEMM writes it through "
                         "a 4-D view of its (b, i), j, a and (c, o) indices")
    if out.numel() == 0:
        return out
    # out[b, 2i + a, 2j + c, o] = view[(b, i), j, a, (c, o)]: a view of out, written in place
    view = out.view(batch * height, 2, width, 2 * c_out).transpose(1, 2)
    rows = x.reshape(batch, height * width, c_in)  # a view for the token buffer's patch slice and contiguous x
    _gemm.gemm(rows, convt_weight.reshape(4 * c_out, c_in), convt_bias.repeat(4), activation=check_activation(activation),
               out=view,
               config=config)
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
               and aligned16(y, y.stride()[:3]) and aligned16(out, out.stride()[:3]))
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
    if convt_weight.dim() != 4 or tuple(convt_weight.shape[:2]) != (2, 2) or convt_weight.shape[3] != channels:
        raise ValueError(f"convt_weight must be prepared as (2, 2, C_out, {channels}) (prepare_convt_weight), got "
                         f"{tuple(convt_weight.shape)}")
    c_out = convt_weight.shape[2]
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
    return x.new_empty((batch, 2 * height, 2 * width, convt_weight.shape[2]))


TRITON_OPS = {"upscale": upscale_block}


# ---- ahead-of-time compile checks (eomt-fast check-kernels) ----------------------------------------------

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def dwconv_aot_spec(dtype: torch.dtype, channels: int, block_p: int, num_warps: int, slide: bool = False):
    from eomt_fast.aot import KernelSpec

    t = _TRITON_DTYPE[dtype]
    ints = ["B", "H", "W", "C", "stride_yb", "stride_yh", "stride_yw", "stride_wc", "stride_wh",
            "stride_ob", "stride_oh", "stride_ow"]
    constexprs = {"stride_yc": 1, "stride_ww": 1, "stride_oc": 1, "ALIGNED": True, "BLOCK_P": block_p,
                  "BLOCK_C": next_power_of_2(channels), "SEGMENT": DWCONV_SEGMENT, "SLIDE": slide}
    signature = {"Y": f"*{t}", "Wd": f"*{t}", "LnW": f"*{t}", "LnB": f"*{t}", "Out": f"*{t}", "eps": "fp32",
                 **{n: "i32" for n in ints}, **{n: "constexpr" for n in constexprs}}
    return KernelSpec(name=f"upscale_dwconv_layernorm_{t}_C{channels}_p{block_p}w{num_warps}" + ("_slide" if slide else ""),
                      fn=_dwconv_layernorm_kernel, signature=signature, constexprs=constexprs,
                      num_warps=num_warps, num_stages=1)


def aot_specs() -> list:
    # the ConvT GEMM (gemm.py's kernel with the 4-D output view, bias and the activation): every bf16 tile of its
    # autotune lists for a 2-D A (pointer and TMA) and for a row-split one (the token buffer's patch slice at
    # batch > 1: pointer tiles), the first in fp16, SiLU (EoMT-DINOv3's gated models) at the first tile, fp32;
    # the depthwise + LayerNorm kernel at every tile of the hidden sizes of ViT-S/B/L/g (384, 768, 1024,
    # 1536), bf16 and fp32
    convt = dict(view_4d=True, activation="gelu")
    return (_gemm.gemm_aot_specs("upscale_convt_gelu", **convt)
            + [_gemm.gemm_aot_spec("upscale_convt_gelu_rows3d", torch.bfloat16, c, a_split_rows=True, **convt)
               for c in convt_configs()]
            + [_gemm.gemm_aot_spec("upscale_convt_silu", torch.bfloat16, convt_configs()[0], view_4d=True,
                                   activation="silu")]
            + [_gemm.gemm_aot_spec("upscale_convt_gelu", torch.float32, c, **convt) for c in convt_configs(fp32=True)]
            + [dwconv_aot_spec(dtype, c, p, w) for dtype in (torch.bfloat16, torch.float32)
               for c in (384, 768, 1024, 1536) for p, w in dwconv_configs(c)]
            + [dwconv_aot_spec(dtype, c, 1, w, slide=True) for dtype in (torch.bfloat16, torch.float32)
               for c in (384, 768, 1024, 1536) for p, w in dwconv_configs(c) if p == 1]
            + [dwconv_aot_spec(torch.float16, 1024, *dwconv_configs(1024)[0])])
