"""Which implementation every op of the model runs, and why: the one place that decides.

Each op has a plain-PyTorch reference in ``eomt_fast.kernels`` (the CPU fallback). A kernel file offers
a Triton implementation of an op by listing it in its module-level ``TRITON_OPS`` dict
(op name -> function with exactly the reference's signature and semantics); ``resolve`` picks, per op,
the Triton function or the reference for a backend, device and dtype, and says why.

The ops that produce the residual stream (``patch_embed``, ``out_projection``, ``layernorm_mlp``,
``layernorm_swiglu``) take ``out=``: the model passes a view of its token buffer (for the last two, the
residual itself), so the stream is written in place and no layer concatenates or copies it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import kernels
from .kernels._triton import HAS_TRITON, eager_direct, triton_interpreting

BACKENDS = ("auto", "torch", "triton")

# op name -> (reference function in eomt_fast.kernels, what it computes)
OPS: dict[str, tuple[str, str]] = {
    "patch_embed": ("patch_embed_ref", "patch GEMM + bias + position embedding, into the token buffer"),
    "layernorm_qkv": ("layernorm_linear_ref", "LN1 + fused QKV projection"),
    "attention": ("attention_ref", "masked query-patch attention"),
    "out_projection": ("linear_residual_ref", "output projection + LayerScale + residual, in place"),
    "layernorm_mlp": ("layernorm_mlp_ref", "LN2 + MLP (hidden_act) + LayerScale + residual, in place"),
    "layernorm_swiglu": ("layernorm_swiglu_ref", "LN2 + gated MLP (SwiGLU) + LayerScale + residual, in place"),
    "mask_head": ("mask_head_ref", "mask head MLP (fc1-act-fc2-act-fc3)"),
    "upscale": ("upscale_block_ref", "ConvTranspose 2x2 + act + depthwise 3x3 + LayerNorm"),
    "mask_logits": ("mask_logits_ref", "final mask-logit einsum"),
    "grid_attention_mask": ("grid_attention_mask_ref", "query->patch mask of masked layers at grid size"),
    "rope": ("rope_ref", "rotary embeddings of the patch tokens' q/k, in place (EoMT-DINOv3)"),
}

KERNEL_MODULES = ("attention", "gemm", "layernorm_mlp", "linear", "mask_logits", "patch_embed", "rope", "upscale")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_ops() -> dict[str, Callable]:
    """op name -> Triton implementation, from the ``TRITON_OPS`` of every kernel module (none without Triton)."""
    if not HAS_TRITON:
        return {}
    found: dict[str, Callable] = {}
    for name in KERNEL_MODULES:
        found.update(getattr(importlib.import_module(f"eomt_fast.kernels.{name}"), "TRITON_OPS", {}))
    unknown = set(found) - set(OPS)
    if unknown:
        raise AssertionError(f"TRITON_OPS names unknown ops: {sorted(unknown)}")
    return found


def unused_reason(op: str, config) -> str | None:
    """Why a model with this config never calls ``op`` (None: it does, or no config was given)."""
    if config is None:
        return None
    if op == "rope" and not config.rope:
        return "not used by this model (no rotary embeddings: EoMT-DINOv3 only)"
    if op == "layernorm_swiglu" and not config.gated_mlp:
        return "not used by this model (an ungated MLP)"
    if op == "layernorm_mlp" and config.gated_mlp:
        return "not used by this model (a gated MLP)"
    return None


def config_limit(op: str, config) -> str | None:
    """Why the Triton kernel of ``op`` cannot run this model config (None: it can)."""
    if config is None:
        return None
    if op == "attention":
        from .kernels.attention import MAX_HEAD_DIM

        if config.head_dim > MAX_HEAD_DIM:
            return f"head_dim {config.head_dim} > {MAX_HEAD_DIM}, the attention kernel's limit"
    return None


@dataclass(frozen=True)
class OpPath:
    op: str
    impl: str  # "triton" or "torch"
    reason: str


def check_backend(backend: str, device: torch.device, config=None) -> None:
    """Raise a clear error when ``backend`` cannot run on ``device`` (and the model ``config``, if given)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend != "triton":
        return
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs Triton, which is not installed (pip install triton); "
                           "use backend='auto' or 'torch'")
    if device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(
            f"backend='triton' needs a CUDA device (the model is on {device}); on a CPU the kernels run only "
            "in Triton's interpreter: set TRITON_INTERPRET=1 before importing eomt_fast, or use backend='auto'"
        )
    missing = [op for op in OPS if op not in triton_ops()]
    if missing:
        raise NotImplementedError(f"backend='triton': no Triton kernel yet for {', '.join(missing)}; use backend='auto'")
    limits = [f"{op}: {why}" for op in OPS if (why := config_limit(op, config))]
    if limits:
        raise NotImplementedError(f"backend='triton' cannot run this model ({'; '.join(limits)}); use backend='auto'")


def plan(backend: str, device: torch.device, dtype: torch.dtype = torch.float32, config=None) -> list[OpPath]:
    """The implementation of every op for this backend, device, dtype (and model config), with the reason."""
    check_backend(backend, device, config)
    available = triton_ops()
    paths = []
    for op in OPS:
        if backend == "torch":
            paths.append(OpPath(op, "torch", "backend='torch' was asked for"))
        elif backend == "triton":
            where = "CUDA" if device.type == "cuda" else "the Triton interpreter (TRITON_INTERPRET=1)"
            paths.append(OpPath(op, "triton", f"backend='triton' was asked for; runs on {where}"))
        elif device.type != "cuda":
            paths.append(OpPath(op, "torch", f"{device.type} device: the Triton kernels run on CUDA only"))
        elif dtype not in TRITON_DTYPES:
            paths.append(OpPath(op, "torch", f"{dtype}: the Triton kernels take fp16, bf16 and fp32"))
        elif op not in available:
            paths.append(OpPath(op, "torch", "no Triton kernel for this op yet"))
        elif why := config_limit(op, config):
            paths.append(OpPath(op, "torch", why))
        else:
            paths.append(OpPath(op, "triton", "CUDA device and a Triton kernel"))
    return paths


@functools.cache
def _eager_direct(op: Callable) -> Callable:
    return eager_direct(op)  # one wrapper per op, the same object at every resolve


def resolve(backend: str, device: torch.device, dtype: torch.dtype, config=None) -> dict[str, Callable]:
    """op name -> the function the model calls for it: the reference, or the Triton op, a custom op called
    directly in eager mode (``kernels._triton.eager_direct``; the ``out=`` forms do so inside)."""
    available = triton_ops()
    return {
        path.op: _eager_direct(available[path.op]) if path.impl == "triton" else getattr(kernels, OPS[path.op][0])
        for path in plan(backend, device, dtype, config)
    }
