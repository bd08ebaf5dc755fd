"""Rotary position embeddings of EoMT-DINOv3, on the fused QKV projection's output.

- ``rope_ref``: for the last P tokens of qkv (B, S, 3C) (the patch tokens: queries, CLS and registers come
  first and are left alone), every query and key head x of head_dim D becomes
  ``x * cos + rotate_half(x) * sin`` with cos, sin (P, D) and rotate_half(x) = cat(-x[D/2:], x[:D/2]):
  transformers' ``apply_rotary_pos_emb`` of EomtDinov3. Values are untouched. With ``out=qkv`` it
  rotates in place. Computes in the input dtype (as transformers, whose cos/sin are in that dtype too).
- ``rope_tables_ref``: the cos/sin tables of a g_h x g_w patch grid (DINOv3's axial RoPE: patch centres
  in [-1, 1], D/4 frequencies per axis, the y angles then the x angles, repeated for the two halves),
  computed on the CPU as transformers computes them: frequencies and coordinates in float32, the angles in
  float32 (float64 for a float64 model, whose cast frequency buffer makes transformers' angles float64).

The Triton kernel rotates in place, one (token block, head, image) per program, in fp32 with one rounding
to the output dtype; it reads each q/k element once and writes it once (values are never read).
"""

from __future__ import annotations

import math

import torch

from ._triton import INTERPRETING, LAUNCH_OPTIONS, cdiv, check_devices, next_power_of_2, on_input_device, tl, triton
from .gemm import with_out



def rope_tables_ref(grid_h: int, grid_w: int, head_dim: int, theta: float,
                    device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (grid_h * grid_w, head_dim) for the patches in row-major order, as transformers'
    EomtDinov3RotaryEmbedding computes them in inference (no coordinate augmentation). ``dtype``: that of
    the frequencies in the angle product, float32 (transformers' buffer) or float64 (the buffer after
    ``model.double()``); computed on the CPU, then moved to ``device``."""
    if head_dim % 4:
        raise ValueError(f"rotary embeddings need head_dim divisible by 4, got {head_dim}")
    inv_freq = (1.0 / theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32)).to(dtype)
    coords_h = torch.arange(0.5, grid_h, dtype=torch.float32) / grid_h
    coords_w = torch.arange(0.5, grid_w, dtype=torch.float32) / grid_w
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0  # (P, 2) (y, x) in [-1, 1], float32 as in transformers
    angles = (2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]).flatten(1, 2).tile(2)  # (P, D)
    return torch.cos(angles).to(device), torch.sin(angles).to(device)


def _check(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> tuple[int, int]:
    """Validate as rope_ref does; returns (hidden, head_dim)."""
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be (B, S, 3*C), got shape {tuple(qkv.shape)}")
    if num_heads < 1 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv last dimension {qkv.shape[-1]} is not 3 * num_heads ({num_heads}) * head_dim")
    hidden = qkv.shape[-1] // 3
    head_dim = hidden // num_heads
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != head_dim:
        raise ValueError(f"cos and sin must both be (P, head_dim={head_dim}), got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    if cos.shape[0] > qkv.shape[1]:
        raise ValueError(f"cos/sin cover {cos.shape[0]} patch tokens, but qkv has only {qkv.shape[1]} tokens")
    if not (qkv.is_floating_point() and cos.is_floating_point() and sin.is_floating_point()):
        raise TypeError(f"rope takes floating-point tensors, got {qkv.dtype}, {cos.dtype}, {sin.dtype}")
    check_devices("qkv", qkv, cos=cos, sin=sin)
    return hidden, head_dim


def _copy_to_out(qkv: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The tensor to rotate in place: a copy of qkv, or ``out`` (checked) holding qkv's values."""
    if out is None:
        return qkv.clone()
    if out.shape != qkv.shape or out.dtype != qkv.dtype:
        raise ValueError(f"out must be a {qkv.dtype} tensor of shape {tuple(qkv.shape)}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    check_devices("qkv", qkv, out=out)
    return out if out is qkv else out.copy_(qkv)


def rope_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, *,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """qkv (B, S, 3C) with the query and key heads of its last P tokens rotated by cos, sin (P, D); a new
    tensor, or written into ``out`` (``qkv`` itself: in place) and ``out`` returned."""
    hidden, head_dim = _check(qkv, cos, sin, num_heads)
    out = _copy_to_out(qkv, out)
    num_patches = cos.shape[0]
    if num_patches == 0 or out.numel() == 0:
        return out
    qk = out[:, out.shape[1] - num_patches:, :2 * hidden]
    heads = qk.unflatten(-1, (2 * num_heads, head_dim))  # (B, P, 2H, D): q heads, then k heads
    c, s = cos.to(qkv.dtype)[:, None, :], sin.to(qkv.dtype)[:, None, :]
    half = head_dim // 2
    rotated = torch.cat((-heads[..., half:], heads[..., :half]), dim=-1)
    qk.copy_((heads * c + rotated * s).flatten(-2))
    return out


# ---- Triton ------------------------------------------------------------------------------------------

@triton.jit
def _rope_kernel(
    X,  # (B, S, 3C) qkv, rotated in place: head h of q is columns [h*D, (h+1)*D), head h of k [C + h*D, ...)
    Cos, Sin,  # (P, D)
    S, P,
    stride_xb, stride_xs, stride_xc,
    stride_cp, stride_cd, stride_sp, stride_sd,
    HALF: tl.constexpr,  # head_dim // 2
    BLOCK_T: tl.constexpr,  # patch tokens per program
    BLOCK_HALF: tl.constexpr,  # next power of two >= HALF
):
    """x * cos + rotate_half(x) * sin for one q or k head (program_id(1)) of BLOCK_T patch tokens of one
    image (program_id(2)): [x1, x2] -> [x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2] by halves."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # patch index
    head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_t[:, None] < P) & (offs_d[None, :] < HALF)
    table = offs_t[:, None].to(tl.int64)
    cos1 = tl.load(Cos + table * stride_cp + offs_d[None, :] * stride_cd, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(Cos + table * stride_cp + (offs_d[None, :] + HALF) * stride_cd, mask=mask,
                   other=0.0).to(tl.float32)
    sin1 = tl.load(Sin + table * stride_sp + offs_d[None, :] * stride_sd, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(Sin + table * stride_sp + (offs_d[None, :] + HALF) * stride_sd, mask=mask,
                   other=0.0).to(tl.float32)
    rows = X + b * stride_xb + (S - P + offs_t[:, None]).to(tl.int64) * stride_xs  # the last P tokens
    first = rows + (head * 2 * HALF + offs_d[None, :]).to(tl.int64) * stride_xc
    second = first + HALF * stride_xc
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(second, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos1 - x2 * sin1).to(X.dtype.element_ty), mask=mask)
    tl.store(second, (x2 * cos2 + x1 * sin2).to(X.dtype.element_ty), mask=mask)


ROPE_BLOCK_T = 32  # tokens per program: 1600 patches x 32 q/k heads of EoMT-L/640 are 1,600 programs per image


@on_input_device
def rope_forward(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, *,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton ``rope_ref``: copies qkv into ``out`` (a new tensor when None) unless out is qkv, then rotates
    out's q/k heads of the patch tokens in place."""
    hidden, head_dim = _check(qkv, cos, sin, num_heads)
    if qkv.device.type != "cuda" and not INTERPRETING:
        raise RuntimeError(f"rope runs on CUDA (or in Triton's interpreter), qkv is on {qkv.device}")
    out = _copy_to_out(qkv, out)
    num_patches = cos.shape[0]
    if num_patches == 0 or out.numel() == 0:
        return out
    half = head_dim // 2
    grid = (cdiv(num_patches, ROPE_BLOCK_T), 2 * num_heads, out.shape[0])
    _rope_kernel[grid](out, cos, sin, out.shape[1], num_patches, *out.stride(), *cos.stride(), *sin.stride(),
                       HALF=half, BLOCK_T=ROPE_BLOCK_T, BLOCK_HALF=max(16, next_power_of_2(half)),
                       num_warps=4, **LAUNCH_OPTIONS)
    return out


# Registered ops: opaque to torch.compile (fullgraph) and safe under CUDA graphs (no host syncs, no autotuner).
# ``rope_into`` writes into ``out`` (the model passes qkv itself: in place); ``rope_op`` is what dispatch
# gives the model.

@torch.library.custom_op("eomt_fast::rope", mutates_args=())
def rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Triton ``rope_ref`` into a new tensor."""
    return rope_forward(qkv, cos, sin, num_heads)


@rope.register_fake
def _(qkv, cos, sin, num_heads):
    return torch.empty_like(qkv)


@torch.library.custom_op("eomt_fast::rope_into", mutates_args=("out",))
def rope_into(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, out: torch.Tensor) -> None:
    """``rope`` written into ``out``, which may be ``qkv`` itself (in place)."""
    rope_forward(qkv, cos, sin, num_heads, out=out)


@rope_into.register_fake
def _(qkv, cos, sin, num_heads, out):
    return None


rope_op = with_out(rope, rope_into, rope_ref)

TRITON_OPS = {"rope": rope_op}


def aot_specs() -> list:
    """The kernel at EoMT-L's head_dim 64 in bf16 and fp16, for check-kernels."""
    from eomt_fast.aot import KernelSpec

    ints = ["S", "P", "stride_xb", "stride_xs", "stride_cp", "stride_sp"]
    specs = []
    for short in ("bf16", "fp16", "fp32"):
        constexprs = {"stride_xc": 1, "stride_cd": 1, "stride_sd": 1, "HALF": 32, "BLOCK_T": ROPE_BLOCK_T,
                      "BLOCK_HALF": 32}
        signature = {"X": f"*{short}", "Cos": f"*{short}", "Sin": f"*{short}", **{n: "i32" for n in ints},
                     **{n: "constexpr" for n in constexprs}}
        specs.append(KernelSpec(name=f"rope_{short}_d64", fn=_rope_kernel, signature=signature,
                                constexprs=constexprs, num_warps=4, num_stages=1))
    return specs
