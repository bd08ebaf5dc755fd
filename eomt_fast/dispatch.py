"""Which implementation every op of the model runs, and why: the one place that decides.

Each op has a plain-PyTorch reference in ``eomt_fast.kernels`` (the CPU fallback). A Triton kernel is
used for an op when it is registered in ``TRITON_KERNELS`` and the backend/device allow it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "torch", "triton")

# op name -> (reference function in eomt_fast.kernels, what it computes)
OPS: dict[str, tuple[str, str]] = {
    "patch_embed": ("patch_embed_ref", "patch GEMM + bias + position embedding"),
    "layernorm_qkv": ("layernorm_linear_ref", "LN1 + fused QKV projection"),
    "attention": ("attention_ref", "masked query-patch attention"),
    "out_projection": ("linear_residual_ref", "output projection + LayerScale + residual"),
    "layernorm_mlp": ("layernorm_mlp_ref", "LN2 + MLP (GELU or SwiGLU) + LayerScale + residual"),
    "mask_head": ("mask_head_ref", "mask head MLP and class head"),
    "upscale": ("upscale_block_ref", "ConvTranspose 2x2 + GELU + depthwise 3x3 + LayerNorm"),
    "mask_logits": ("mask_logits_ref", "final mask-logit einsum"),
    "grid_attention_mask": ("grid_attention_mask_ref", "query->patch mask of masked layers at grid size"),
}

# op name -> Triton implementation; filled in by the kernel modules as they land.
TRITON_KERNELS: dict[str, object] = {}


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class OpPath:
    op: str
    impl: str  # "triton" or "torch"
    reason: str


def check_backend(backend: str, device: torch.device) -> None:
    """Raise a clear error when ``backend`` cannot run on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend != "triton":
        return
    if device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(
            f"backend='triton' needs a CUDA device (the model is on {device}); on a CPU the kernels run only "
            "in Triton's interpreter: set TRITON_INTERPRET=1 before importing eomt_fast, or use backend='auto'"
        )
    missing = [op for op in OPS if op not in TRITON_KERNELS]
    if missing:
        raise NotImplementedError(f"backend='triton': no Triton kernel yet for {', '.join(missing)}; use backend='auto'")


def plan(backend: str, device: torch.device) -> list[OpPath]:
    """The implementation of every op for this backend and device, with the reason."""
    check_backend(backend, device)
    paths = []
    for op in OPS:
        if backend == "torch":
            paths.append(OpPath(op, "torch", "backend='torch' was asked for"))
        elif backend == "triton":
            paths.append(OpPath(op, "triton", "backend='triton' was asked for"))
        elif device.type != "cuda":
            paths.append(OpPath(op, "torch", f"{device.type} device: the Triton kernels run on CUDA only"))
        elif op not in TRITON_KERNELS:
            paths.append(OpPath(op, "torch", "no Triton kernel for this op yet"))
        else:
            paths.append(OpPath(op, "triton", "CUDA device and a Triton kernel"))
    return paths
