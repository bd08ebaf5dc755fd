"""The LayerNorm-MLP sublayer of an EoMT layer, with LayerScale and the residual add.

- MLP:        x + fc2(act(fc1(LN(x)))) * ls, act the model's hidden_act (GELU in every released model)
- gated MLP:  x + down(act(gate(LN x)) * up(LN x)) * ls, with gate and up as one GEMM over
  ``gate_up_weight = cat([W_gate, W_up])`` (the layout transformers 4.x stored as ``mlp.weights_in``);
  SwiGLU with act = SiLU (EoMT's use_swiglu_ffn always; EoMT-DINOv3's use_gated_mlp applies hidden_act).
With ``out=x`` the residual stream is updated in place (the model's token buffer). The activations are
``linear.ACTIVATION_REFS``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import _add_into, activation_ref


def layernorm_mlp_ref(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    scale: torch.Tensor,
    activation: str = "gelu",
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x + fc2(act(fc1(LayerNorm(x)))) * scale, computed in the input dtype; written into ``out`` when given
    (any strides; ``x`` itself for an in-place update) and ``out`` returned."""
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    h = activation_ref(F.linear(h, fc1_weight, fc1_bias), activation)
    return _add_into(F.linear(h, fc2_weight, fc2_bias) * scale, x, out)


def layernorm_swiglu_ref(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    gate_up_weight: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    scale: torch.Tensor,
    activation: str = "silu",
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x + down(act(gate) * up) * scale with [gate | up] = LayerNorm(x) @ gate_up_weight^T + bias (SwiGLU with
    the default SiLU); ``out`` as in ``layernorm_mlp_ref``."""
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    gate, up = F.linear(h, gate_up_weight, gate_up_bias).chunk(2, dim=-1)
    return _add_into(F.linear(activation_ref(gate, activation) * up, down_weight, down_bias) * scale, x, out)


# ---- Triton: two GEMMs of gemm.py, every elementwise op in their prologue/epilogues ------------------
#
# MLP:       h = act(LN(x) @ W1^T + b1)                  fc1 GEMM, LN per gemm.DEFAULT_LN_MODE, act epilogue
#            y = x + (h @ W2^T + b2) * ls                fc2 GEMM, bias + LayerScale + residual epilogue
# gated:     h = act(LN(x) @ Wg^T + bg) * (LN(x) @ Wu^T + bu)    one GEMM over [Wg | Wu]: each program
#                                                        computes the gate and the up tile of its columns
#            y = x + (h @ Wd^T + bd) * ls
# h is kept in the model dtype, as in the reference; fp16/bf16 accumulate in fp32 on the tensor cores,
# fp32 runs "ieee" dots (full fp32 products).

from . import gemm as _gemm  # noqa: E402
from .linear import _check, _flat, _out, check_activation  # noqa: E402


def _launch(x, ln, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale, out, ln_mode, split_k, config, **fc1_epilogue):
    """The two GEMMs of either sublayer: h = epilogue(LN(x) @ W1^T + b1), then y = x + (h @ W2^T + b2) * scale
    into ``out`` (checked, or a new tensor like x); ``fc1_epilogue`` the activation (and glu) of the first.
    ``out`` may be x itself: fc1 has read x before fc2 reads each element of x and writes it back."""
    check_activation(fc1_epilogue["activation"])
    _check(x, fc1_weight, fc2_weight)
    y = _out(x, x.shape[-1], out)
    x2 = _flat(x)
    h = _gemm.gemm(x2, fc1_weight, fc1_bias, **fc1_epilogue, ln=ln, ln_mode=ln_mode, config=config)
    _gemm.gemm(h, fc2_weight, fc2_bias, scale=scale, residual=x2, out=_flat(y), split_k=split_k, config=config)
    return y


def layernorm_mlp_forward(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    scale: torch.Tensor,
    activation: str = "gelu",
    *,
    out: torch.Tensor | None = None,
    ln_mode: str | None = None,
    split_k: int = 1,
    config: _gemm.GemmConfig | None = None,
) -> torch.Tensor:
    """Triton ``layernorm_mlp_ref``. ``ln_mode`` "separate" / "prologue" (default ``gemm.DEFAULT_LN_MODE``),
    ``split_k`` for fc2 (N = C gives few tiles at batch 1), ``config`` a fixed tile for both GEMMs. ``out``: any
    strides, x itself for the in-place update of the residual stream (x may be a slice of a token buffer)."""
    return _launch(x, (ln_weight, ln_bias, eps), fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale, out, ln_mode,
                   split_k, config, activation=activation)


def layernorm_swiglu_forward(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    gate_up_weight: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    scale: torch.Tensor,
    activation: str = "silu",
    *,
    out: torch.Tensor | None = None,
    ln_mode: str | None = None,
    split_k: int = 1,
    config: _gemm.GemmConfig | None = None,
) -> torch.Tensor:
    """Triton ``layernorm_swiglu_ref``: gate_up_weight rows [0, H) are the gate, [H, 2H) the up projection;
    act(gate) * up is the epilogue of that one GEMM. Options as ``layernorm_mlp_forward``."""
    return _launch(x, (ln_weight, ln_bias, eps), gate_up_weight, gate_up_bias, down_weight, down_bias, scale, out,
                   ln_mode, split_k, config, activation=activation, glu=True)


# Registered ops: opaque to torch.compile (fullgraph) and safe under CUDA graphs (no host syncs; the
# autotuner runs on the first call, so warm up before capturing). The ``_into`` forms write into ``out``
# (declared mutated, so torch.compile functionalises them); ``*_op`` is what dispatch gives the model.

@torch.library.custom_op("eomt_fast::layernorm_mlp", mutates_args=())
def layernorm_mlp(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    scale: torch.Tensor,
    activation: str = "gelu",
) -> torch.Tensor:
    """Triton ``layernorm_mlp_ref`` (LN2 + MLP + LayerScale + residual)."""
    return layernorm_mlp_forward(x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale,
                                 activation)


@layernorm_mlp.register_fake
def _(x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale, activation="gelu"):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("eomt_fast::layernorm_swiglu", mutates_args=())
def layernorm_swiglu(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    gate_up_weight: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    scale: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """Triton ``layernorm_swiglu_ref`` (LN2 + gated MLP + LayerScale + residual)."""
    return layernorm_swiglu_forward(x, ln_weight, ln_bias, eps, gate_up_weight, gate_up_bias, down_weight,
                                    down_bias, scale, activation)


@layernorm_swiglu.register_fake
def _(x, ln_weight, ln_bias, eps, gate_up_weight, gate_up_bias, down_weight, down_bias, scale, activation="silu"):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# The ``_into`` forms take every argument of the reference, activation included (``gemm.with_out`` fills
# in its default), then ``out``.

@torch.library.custom_op("eomt_fast::layernorm_mlp_into", mutates_args=("out",))
def layernorm_mlp_into(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    scale: torch.Tensor,
    activation: str,
    out: torch.Tensor,
) -> None:
    """``layernorm_mlp`` written into ``out``, which may be ``x`` itself (in place)."""
    layernorm_mlp_forward(x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale, activation,
                          out=out)


@layernorm_mlp_into.register_fake
def _(x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale, activation, out):
    return None


@torch.library.custom_op("eomt_fast::layernorm_swiglu_into", mutates_args=("out",))
def layernorm_swiglu_into(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    gate_up_weight: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    scale: torch.Tensor,
    activation: str,
    out: torch.Tensor,
) -> None:
    """``layernorm_swiglu`` written into ``out``, which may be ``x`` itself (in place)."""
    layernorm_swiglu_forward(x, ln_weight, ln_bias, eps, gate_up_weight, gate_up_bias, down_weight, down_bias,
                             scale, activation, out=out)


@layernorm_swiglu_into.register_fake
def _(x, ln_weight, ln_bias, eps, gate_up_weight, gate_up_bias, down_weight, down_bias, scale, activation, out):
    return None


layernorm_mlp_op = _gemm.with_out(layernorm_mlp, layernorm_mlp_into, layernorm_mlp_ref)
layernorm_swiglu_op = _gemm.with_out(layernorm_swiglu, layernorm_swiglu_into, layernorm_swiglu_ref)


TRITON_OPS = {"layernorm_mlp": layernorm_mlp_op, "layernorm_swiglu": layernorm_swiglu_op}

# The GEMMs of these ops at their GPU configurations (EoMT-L: C 1024, MLP 4096), for check-kernels.
def aot_specs() -> list:
    return [
        *_gemm.gemm_aot_specs("layernorm_mlp_fc1", activation="gelu"),
        *_gemm.gemm_aot_specs("layernorm_mlp_fc1_prologue", activation="gelu", ln_prologue=True),
        *_gemm.gemm_aot_specs("layernorm_mlp_fc2", has_scale=True, has_residual=True),
        *_gemm.gemm_aot_specs("layernorm_swiglu_fc1", glu=True, activation="silu"),
        *_gemm.gemm_aot_specs("layernorm_swiglu_fc1_prologue", glu=True, activation="silu", ln_prologue=True),
    ]

