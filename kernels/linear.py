"""Projection GEMMs with their epilogues (and the prologue LayerNorm of the QKV projection).

- ``layernorm_linear_ref``: LN1 + fused QKV projection, y = LN(x) @ W^T + b, W = cat([Wq, Wk, Wv]).
- ``linear_residual_ref``: output projection + bias + LayerScale + residual, r + (x @ W^T + b) * ls; with
  ``out=r`` the residual stream is updated in place (the model's token buffer).
- ``mask_head_ref``: the mask head MLP, fc3(act(fc2(act(fc1(x))))), act the model's hidden_act (GELU).
All references compute in the input dtype; the GELU is the exact erf form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gelu_ref(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU, x * Phi(x) with the erf (not the tanh approximation)."""
    return F.gelu(x)


# The activations the kernels apply in their epilogues (gemm.ACTIVATIONS has the same names and "none"),
# as transformers' ACT2FN computes them: "gelu" the exact erf GELU, "silu" x * sigmoid(x), "relu".
ACTIVATION_REFS = {"gelu": gelu_ref, "silu": F.silu, "relu": F.relu}


def check_activation(activation: str) -> str:
    """``activation`` when it names one of ``ACTIVATION_REFS``, else a ValueError naming the choices."""
    if activation not in ACTIVATION_REFS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATION_REFS)}, got {activation!r}")
    return activation


def activation_ref(x: torch.Tensor, activation: str) -> torch.Tensor:
    """``activation`` (a name of ``ACTIVATION_REFS``) applied to x."""
    apply = ACTIVATION_REFS[check_activation(activation)]  # bound first: kernel[grid](...) is a launch
    return apply(x)


def layernorm_linear_ref(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """LayerNorm over the last dim, then a linear layer: (..., C) -> (..., N)."""
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    return F.linear(h, weight, bias)


def _add_into(y: torch.Tensor, residual: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """y + residual, as a new tensor or written into ``out``; the same rounding either way (``residual.add_(y)``
    when out is the residual: addition commutes exactly). No ``torch.add(..., out=)``: torch.compile
    does not trace it into a strided view of a buffer."""
    if out is None:
        return y + residual
    if out is residual:
        return out.add_(y)
    return out.copy_(y + residual)


def linear_residual_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    residual: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """residual + (x @ W^T + b) * scale, scale a per-channel LayerScale vector. With ``out`` (any strides;
    ``residual`` itself for an in-place update) the result is written there and ``out`` returned."""
    return _add_into(F.linear(x, weight, bias) * scale, residual, out)


def mask_head_ref(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    fc3_weight: torch.Tensor,
    fc3_bias: torch.Tensor,
    activation: str = "gelu",
) -> torch.Tensor:
    """The mask head MLP on the query tokens: fc1 -> act -> fc2 -> act -> fc3, act the model's hidden_act."""
    h = activation_ref(F.linear(x, fc1_weight, fc1_bias), activation)
    h = activation_ref(F.linear(h, fc2_weight, fc2_bias), activation)
    return F.linear(h, fc3_weight, fc3_bias)


# ---- Triton: the projection GEMMs of gemm.py with their epilogues ----------------------------------
#
# layernorm_qkv  : LN1 (gemm.DEFAULT_LN_MODE: a row kernel, or mean/rstd + the GEMM prologue) -> x @ Wqkv^T + b
# out_projection : attn @ Wo^T, epilogue residual + (acc + b) * ls1: one kernel
# mask_head      : three GEMMs, bias + the activation (GELU) in the epilogues of the first two
# fp16/bf16 operands: tensor cores, fp32 accumulation and epilogue, one rounding to the output dtype;
# fp32 operands: input_precision="ieee" (full fp32 products, like PyTorch's default).

from . import gemm as _gemm  # noqa: E402


def _check(x: torch.Tensor, *weights: torch.Tensor) -> None:
    """dtypes only: gemm() checks the shapes."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton kernels take fp16, bf16 or fp32 activations, got {x.dtype}")
    for w in weights:
        if w.dtype != x.dtype:
            raise TypeError(f"weights must have the activations' dtype {x.dtype}, got {w.dtype}")


def _out(x: torch.Tensor, n: int, out: torch.Tensor | None) -> torch.Tensor:
    """A new contiguous (..., n) output like x, or the caller's ``out`` (any strides: e.g. a slice of the
    model's token buffer) after checking it."""
    shape = (*x.shape[:-1], n)
    if out is None:
        return x.new_empty(shape)
    if tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be a {x.dtype} tensor of shape {shape} on {x.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> rows for gemm(): an (M, C) view, or an (Mo, Mi, C) view when the rows are not evenly
    strided (a slice of the token buffer); never a copy (``gemm.as_rows``)."""
    return _gemm.as_rows(t)


def layernorm_linear_forward(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    out: torch.Tensor | None = None,
    ln_mode: str | None = None,
    config: _gemm.GemmConfig | None = None,
) -> torch.Tensor:
    """Triton ``layernorm_linear_ref``: LN over the last dim, then x @ W^T + b, (..., C) -> (..., N).

    ``ln_mode`` "separate" / "prologue" (default ``gemm.DEFAULT_LN_MODE``), ``config`` a fixed tile."""
    _check(x, weight)
    y = _out(x, weight.shape[0], out)
    _gemm.gemm(_flat(x), weight, bias, ln=(ln_weight, ln_bias, eps), ln_mode=ln_mode, out=_flat(y),
               config=config)
    return y


def linear_residual_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    residual: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    split_k: int = 1,
    config: _gemm.GemmConfig | None = None,
) -> torch.Tensor:
    """Triton ``linear_residual_ref``: residual + (x @ W^T + b) * scale in one GEMM epilogue, into ``out`` when
    given (any strides; ``out`` may be ``residual`` itself: the in-place update of the residual stream).

    ``split_k`` > 1 splits K (for few output tiles at batch 1), ``config`` fixes the tile."""
    _check(x, weight)
    y = _out(x, weight.shape[0], out)
    if residual.shape != y.shape:
        raise ValueError(f"residual must have shape {tuple(y.shape)}, got {tuple(residual.shape)}")
    _gemm.gemm(_flat(x), weight, bias, scale=scale, residual=_flat(residual), out=_flat(y),
               split_k=split_k, config=config)
    return y


def mask_head_forward(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    fc3_weight: torch.Tensor,
    fc3_bias: torch.Tensor,
    activation: str = "gelu",
    *,
    out: torch.Tensor | None = None,
    split_k: int = 1,
    config: _gemm.GemmConfig | None = None,
) -> torch.Tensor:
    """Triton ``mask_head_ref``: three GEMMs, bias + the activation fused into the first two epilogues.
    The hidden activations are kept in the model dtype, as in the reference."""
    check_activation(activation)
    _check(x, fc1_weight, fc2_weight, fc3_weight)
    y = _out(x, fc3_weight.shape[0], out)
    h = _gemm.gemm(_flat(x), fc1_weight, fc1_bias, activation=activation, split_k=split_k, config=config)
    h = _gemm.gemm(h, fc2_weight, fc2_bias, activation=activation, split_k=split_k, config=config)
    _gemm.gemm(h, fc3_weight, fc3_bias, out=_flat(y), split_k=split_k, config=config)
    return y


# Registered ops: opaque to torch.compile (fullgraph) and safe under CUDA graphs (no host syncs; the
# autotuner runs on the first call, so warm up before capturing). ``out_projection_into`` writes into
# ``out`` (declared mutated, so torch.compile functionalises it); ``out_projection_op`` is what dispatch
# gives the model.

@torch.library.custom_op("eomt_fast::layernorm_qkv", mutates_args=())
def layernorm_linear(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Triton ``layernorm_linear_ref`` (LN1 + fused QKV projection)."""
    return layernorm_linear_forward(x, ln_weight, ln_bias, eps, weight, bias)


@layernorm_linear.register_fake
def _(x, ln_weight, ln_bias, eps, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("eomt_fast::out_projection", mutates_args=())
def linear_residual(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    residual: torch.Tensor,
) -> torch.Tensor:
    """Triton ``linear_residual_ref`` (output projection + LayerScale + residual)."""
    return linear_residual_forward(x, weight, bias, scale, residual)


@linear_residual.register_fake
def _(x, weight, bias, scale, residual):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("eomt_fast::out_projection_into", mutates_args=("out",))
def linear_residual_into(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    residual: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """``linear_residual`` written into ``out``, which may be ``residual`` itself (in place)."""
    linear_residual_forward(x, weight, bias, scale, residual, out=out)


@linear_residual_into.register_fake
def _(x, weight, bias, scale, residual, out):
    return None


@torch.library.custom_op("eomt_fast::mask_head", mutates_args=())
def mask_head(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    fc3_weight: torch.Tensor,
    fc3_bias: torch.Tensor,
    activation: str = "gelu",
) -> torch.Tensor:
    """Triton ``mask_head_ref`` (fc1 -> act -> fc2 -> act -> fc3)."""
    return mask_head_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc3_weight, fc3_bias, activation)


@mask_head.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc3_weight, fc3_bias, activation="gelu"):
    return x.new_empty((*x.shape[:-1], fc3_weight.shape[0]))


out_projection_op = _gemm.with_out(linear_residual, linear_residual_into, linear_residual_ref)


TRITON_OPS = {"layernorm_qkv": layernorm_linear, "out_projection": out_projection_op, "mask_head": mask_head}

# The GEMMs of these ops at their GPU configurations (EoMT-L: C 1024, QKV N 3072), for check-kernels.
def aot_specs() -> list:
    return [
        *_gemm.gemm_aot_specs("layernorm_qkv"),
        *_gemm.gemm_aot_specs("layernorm_qkv_prologue", ln_prologue=True),
        *_gemm.gemm_aot_specs("out_projection", has_scale=True, has_residual=True),
        # the mask head runs the bias + GELU GEMMs of layernorm_mlp's fc1 (same kernels): one entry to show
        _gemm.gemm_aot_spec("mask_head_gelu", torch.bfloat16, _gemm.GPU_CONFIGS[-1], activation="gelu"),
    ]

