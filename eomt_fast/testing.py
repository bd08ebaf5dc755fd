"""Helpers for tests and benchmarks: random-weight transformers EoMT models to compare against, and the
shared checks of the Triton kernel tests (error bounds against float64, seeded inputs, AOT compiles).

``random_hf_model`` needs transformers (the ``test`` extra). Nothing here downloads anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

# Shapes to test with. "hf_tiny" is the config of transformers' own EoMT tests.
TEST_CONFIGS: dict[str, dict[str, Any]] = {
    "hf_tiny": dict(image_size=40, patch_size=2, num_queries=5, num_register_tokens=19, num_labels=4,
                    hidden_size=8, num_attention_heads=2, num_hidden_layers=4, num_blocks=1),
    "small_r4": dict(image_size=64, patch_size=8, num_queries=7, num_register_tokens=4, num_labels=5,
                     hidden_size=64, num_attention_heads=4, num_hidden_layers=4, num_blocks=2),
    "r0_swiglu": dict(image_size=48, patch_size=8, num_queries=6, num_register_tokens=0, num_labels=3,
                      hidden_size=48, num_attention_heads=3, num_hidden_layers=3, num_blocks=3, use_swiglu_ffn=True),
    "hd64_up1": dict(image_size=32, patch_size=4, num_queries=9, num_register_tokens=4, num_labels=6,
                     hidden_size=128, num_attention_heads=2, num_hidden_layers=3, num_blocks=1, num_upscale_blocks=1),
    # hidden_act SiLU: in the MLP, the mask head and the upscale blocks
    "silu_r2": dict(image_size=32, patch_size=4, num_queries=6, num_register_tokens=2, num_labels=4,
                    hidden_size=64, num_attention_heads=4, num_hidden_layers=3, num_blocks=2, hidden_act="silu"),
}

# EoMT-DINOv3 shapes (model_type "eomt_dinov3", transformers' EomtDinov3Config keywords): rotary embeddings,
# the default biases (no key bias), and every other bias left out once; head_dim 16 and 12 (a half of 6:
# not a power of two); the gated MLP with hidden_act SiLU (SwiGLU, and SiLU in the mask head and upscale
# blocks) and GELU (GeGLU) without biases.
DINOV3_TEST_CONFIGS: dict[str, dict[str, Any]] = {
    "dinov3_r4": dict(image_size=64, patch_size=8, num_queries=7, num_register_tokens=4, num_labels=5,
                      hidden_size=64, num_attention_heads=4, intermediate_size=96, num_hidden_layers=4, num_blocks=2,
                      rope_parameters={"rope_type": "default", "rope_theta": 100.0}),
    "dinov3_nobias_hd12": dict(image_size=48, patch_size=8, num_queries=6, num_register_tokens=0, num_labels=3,
                               hidden_size=36, num_attention_heads=3, intermediate_size=72, num_hidden_layers=3,
                               num_blocks=3, query_bias=False, value_bias=False, proj_bias=False, mlp_bias=False,
                               rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
    "dinov3_gated_silu": dict(image_size=48, patch_size=8, num_queries=6, num_register_tokens=4, num_labels=4,
                              hidden_size=48, num_attention_heads=3, intermediate_size=88, num_hidden_layers=3,
                              num_blocks=2, use_gated_mlp=True, hidden_act="silu"),
    "dinov3_geglu_nobias": dict(image_size=32, patch_size=8, num_queries=5, num_register_tokens=1, num_labels=3,
                                hidden_size=32, num_attention_heads=2, intermediate_size=40, num_hidden_layers=2,
                                num_blocks=1, use_gated_mlp=True, mlp_bias=False),
}

ORACLE_ATTENTION = "sdpa_same_dtype_mask"


def register_oracle_attention() -> str:
    """transformers' sdpa attention with its float mask cast to the query dtype.

    transformers builds the masked-layer mask in float32 whatever the model dtype. PyTorch 2.13's CPU
    ``scaled_dot_product_attention`` computes wrong results for float64 q/k/v with a float32 mask (the
    answer changes when the same mask is passed as float64), so a float64 oracle casts the mask first.
    For float32 models the cast is a no-op; for fp16/bf16 the mask values (+1 / -1e9) only change rounding.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def sdpa_same_dtype_mask(module, query, key, value, attention_mask, **kwargs):
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.to(query.dtype)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(ORACLE_ATTENTION, sdpa_same_dtype_mask)
    return ORACLE_ATTENTION


@torch.no_grad()
def random_hf_model(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_mask_probs: list[float] | None = None,
    attn_implementation: str | None = None,
    model_type: str = "eomt",
    **config_kwargs: Any,
):
    """A transformers EomtForUniversalSegmentation (``model_type="eomt_dinov3"``:
    EomtDinov3ForUniversalSegmentation) with random weights, in eval mode.

    Every parameter is perturbed after transformers' init so that nothing sits at an identity value
    (register tokens are zeros, LayerNorm weights ones and LayerScale 1.0 after a plain init), which
    would let a wrong mapping of those weights pass unnoticed.
    """
    import transformers

    classes = {"eomt": ("EomtConfig", "EomtForUniversalSegmentation"),
               "eomt_dinov3": ("EomtDinov3Config", "EomtDinov3ForUniversalSegmentation")}
    config_class, model_class = (getattr(transformers, name) for name in classes[model_type])
    torch.manual_seed(seed)
    model = model_class(config_class(**config_kwargs)).eval()
    for param in model.parameters():
        param.add_(torch.randn_like(param) * 0.1 * (param.abs().mean() + 0.1))
    if attn_mask_probs is not None:
        model.attn_mask_probs.copy_(torch.tensor(attn_mask_probs, dtype=model.attn_mask_probs.dtype))
    model.set_attn_implementation(attn_implementation or register_oracle_attention())
    model = model.to(dtype)
    rotary = getattr(model, "rope_embeddings", None)
    if rotary is not None and dtype in (torch.float16, torch.bfloat16):
        # .to() casts EoMT-DINOv3's frequency buffer too (from_pretrained(dtype=...) keeps it float32):
        # a bf16 inv_freq would be transformers' own error, not the dtype's
        rotary.inv_freq = rotary.inv_freq.float()
        rotary.original_inv_freq = rotary.original_inv_freq.float()
    return model


# Masked layers threshold mask logits at 0: a logit within rounding of 0 flips in fp16/bf16, for transformers
# and for us alike, and one flipped mask entry changes a query's attention, so the error of a masked forward
# in low precision is a few such flips on top of rounding. Per model the flips make it vary several-fold;
# summed over several seeded models it measures the implementation (how often each flips against the
# float64 masks: the same, 7 against 9 in fp16 over 20 dinov3_r4 models).
MASKED_ERROR_SEEDS = tuple(range(9, 17))


@torch.no_grad()
def low_precision_errors(dtype: torch.dtype, seeds: Sequence[int], batch: int = 2,
                         **model_kwargs: Any) -> tuple[dict[str, float], dict[str, float]]:
    """(ours, transformers'): per output, the mean |output - float64 transformers| of our model converted from
    transformers' ``dtype`` model and of that model itself, summed over a random model and input per seed
    (``model_kwargs``: those of ``random_hf_model``, e.g. a config and ``attn_mask_probs``)."""
    from . import EomtFastForUniversalSegmentation

    names = ("masks_queries_logits", "class_queries_logits", "last_hidden_state")
    ours, theirs = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for seed in seeds:
        hf64 = random_hf_model(seed=seed, dtype=torch.float64, **model_kwargs)
        size = hf64.config.image_size
        x = torch.randn(batch, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        truth = hf64(x)
        hf_low = random_hf_model(seed=seed, dtype=dtype, **model_kwargs)
        model = EomtFastForUniversalSegmentation.from_hf(hf_low)
        if model.dtype != dtype:
            raise AssertionError(f"from_hf of a {dtype} model gave a {model.dtype} one")
        got, expected = model(x.to(dtype)), hf_low(x.to(dtype))
        for name in names:
            ref = getattr(truth, name)
            for errors, out in ((ours, got), (theirs, expected)):
                value = getattr(out, name)
                if value.dtype != dtype or value.shape != ref.shape:
                    raise AssertionError(f"{name}: {value.dtype} {tuple(value.shape)}, expected {dtype} "
                                         f"{tuple(ref.shape)}")
                errors[name] += (value.double() - ref).abs().mean().item()
    return ours, theirs


# ---- Triton kernel tests ---------------------------------------------------------------------------------

DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}  # pytest ids per dtype
ERROR_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}  # x max |exact|


def upcast(args: Sequence[Any]) -> tuple:
    """The arguments of an op with every tensor in float64 (the exact computation's inputs)."""
    return tuple(a.double() if torch.is_tensor(a) else a for a in args)


def normal_sampler(generator: torch.Generator, dtype: torch.dtype, device="cpu") -> Callable[..., torch.Tensor]:
    """``rnd(*shape, std=1.0, mean=0.0)``: N(mean, std^2) samples drawn from ``generator`` (on the CPU, so the
    values do not depend on the device), then moved to ``device`` and ``dtype``."""

    def rnd(*shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * std + mean).to(device=device, dtype=dtype)

    return rnd


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor) -> None:
    """ours (the kernel) and theirs (PyTorch in the same dtype) against exact (float64): ours has exact's
    shape, theirs' dtype, no non-finite element, and max |ours - exact| <= 2 x max |theirs - exact| + a tiny
    floor (``ERROR_FLOOR[dtype]`` x max |exact|)."""
    assert ours.shape == exact.shape, (ours.shape, exact.shape)
    assert ours.dtype == theirs.dtype, (ours.dtype, theirs.dtype)
    assert torch.isfinite(ours).all(), "non-finite output (an element left unwritten?)"
    ours_err = (ours.double() - exact).abs().max().item()
    theirs_err = (theirs.double() - exact).abs().max().item()
    floor = ERROR_FLOOR[ours.dtype] * exact.abs().max().item()
    assert ours_err <= 2 * theirs_err + floor, f"error {ours_err:.3g} > 2 x torch's {theirs_err:.3g} + {floor:.3g}"


def assert_close_to_ref(ours: torch.Tensor, ref: Callable[..., torch.Tensor], args: Sequence[Any]) -> None:
    """``assert_close`` with theirs = ref(*args) and exact = ref on the float64 arguments."""
    assert_close(ours, ref(*args), ref(*upcast(args)))


# In a subprocess without TRITON_INTERPRET: under the interpreter @triton.jit gives functions that cannot be
# compiled. fp16 compiles to the same code as bf16 with another element type, so the fp16 specs are left out
# (eomt-fast check-kernels compiles every spec for sm_80 and sm_90).
_AOT_SM90_SCRIPT = """
import dataclasses, json
from eomt_fast import aot
from eomt_fast.kernels import {module}
for spec in {module}.aot_specs():
    if "fp16" not in spec.name:
        report = aot.compile_spec(spec, 90)
        print(json.dumps(dict(dataclasses.asdict(report), ok=report.ok, line=report.line())))
"""


def compile_aot_specs_sm90(module: str) -> list[dict[str, Any]]:
    """Compile every non-fp16 ``aot_specs()`` entry of ``eomt_fast.kernels.<module>`` for sm_90 (no GPU needed)
    and assert that each one is ok (no spills, wgmma where it needs it). Returns the reports as dicts: the
    ``CompileReport`` fields plus ``ok`` and ``line``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _AOT_SM90_SCRIPT.format(module=module)], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    failed = [r["line"] for r in reports if not r["ok"]]
    assert not failed, "\n".join(failed)
    return reports
