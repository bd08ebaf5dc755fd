"""The Triton mask ops of kernels/mask_logits.py against float64.

- mask_logits (the final einsum, gemm.py per batch element): ours <= 2 x PyTorch's own error in the same
  dtype + a tiny floor, both against float64, into a NaN-poisoned output.
- grid_attention_mask (the fused grid-resolution mask of a masked layer): identical to
  ``F.interpolate(mask_logits_ref(E, X), (g, g), mode="bilinear") > 0`` computed in float64 on the same
  (rounded) inputs, wherever that logit is farther from 0 than the kernel's rounding error can reach
  (``rounding_margin``), into an output whose bytes are poisoned with 0xFF.
Without CUDA the kernels run in Triton's interpreter (fp32 and fp16) at small, awkward shapes; the ``gpu``
tests use EoMT-L/640 (Q 200, C 1024, g 40, 160 x 160 pixels) in bf16, fp16 and fp32.
"""

import pytest
import torch
import torch.nn.functional as F

from eomt_fast.kernels.mask_logits import (
    TRITON_OPS,
    grid_attention_mask,
    grid_attention_mask_forward,
    grid_attention_mask_ref,
    grid_sampling,
    mask_logits,
    mask_logits_forward,
    mask_logits_ref,
)
from eomt_fast.testing import DTYPE_IDS, assert_close, compile_aot_specs_sm90
from tests.conftest import poison_


def make_inputs(batch, queries, channels, height, width, dtype, device="cpu", seed=0):
    """mask embeddings (B, Q, C) and channels-last pixel embeddings (B, H, W, C), both ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, queries, channels, generator=g).to(device=device, dtype=dtype),
            torch.randn(batch, height, width, channels, generator=g).to(device=device, dtype=dtype))


# ---- mask_logits ------------------------------------------------------------------------------------------

def run_logits(embeddings, pixels):
    batch, height, width, _ = pixels.shape
    out = poison_(embeddings.new_empty(batch, embeddings.shape[1], height, width))
    assert mask_logits_forward(embeddings, pixels, out=out) is out
    assert_close(out, mask_logits_ref(embeddings, pixels), mask_logits_ref(embeddings.double(), pixels.double()))


# (B, Q, C, H, W)
LOGIT_SHAPES = [
    (1, 1, 8, 4, 4),  # one query: a single, mostly wrapped row tile
    (2, 7, 24, 12, 12),  # two images, C = 24, 144 pixels (3 column tiles, the last partial)
    (1, 7, 64, 5, 7),  # a non-square image, 35 pixels
    (2, 7, 64, 24, 24),  # 576 pixels: 9 column tiles per image
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", LOGIT_SHAPES, ids=lambda s: f"B{s[0]}-Q{s[1]}-C{s[2]}-{s[3]}x{s[4]}")
def test_mask_logits_matches_reference(shape, dtype):
    run_logits(*make_inputs(*shape, dtype=dtype))


def test_mask_logits_strided_embeddings():
    """Mask embeddings as a slice of a wider buffer (any strides), read in place."""
    embeddings, pixels = make_inputs(2, 7, 24, 6, 6, torch.float32, seed=1)
    wide = torch.randn(2, 9, 40)
    wide[:, 1:8, 8:32] = embeddings
    run_logits(wide[:, 1:8, 8:32], pixels)


# ---- grid_attention_mask ------------------------------------------------------------------------------------

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def exact_grid_logits(embeddings, pixels, grid_size):
    """F.interpolate(mask_logits_ref(E, X), (g, g), bilinear) in float64 on the same inputs: (B, Q, g*g)."""
    logits = mask_logits_ref(embeddings.double(), pixels.double())
    return F.interpolate(logits, size=(grid_size, grid_size), mode="bilinear", align_corners=False).flatten(2)


def rounding_margin(embeddings, pixels, grid_size):
    """A bound on |kernel logit - exact logit|, per (b, q, p), twice over: the downsampled pixels are rounded
    once to the input dtype (u_in |xs|) and the dot accumulates C products in fp32 (C u_32 sum |e xs|), so
    the error is at most (u_in + C u_32) sum_c |e_c| |xs_c|; where |exact| exceeds this the sign is certain."""
    small = F.interpolate(pixels.double().abs().permute(0, 3, 1, 2), size=(grid_size, grid_size), mode="bilinear",
                          align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)  # >= |xs|: weights are >= 0
    magnitude = embeddings.double().abs() @ small.transpose(1, 2)
    channels = embeddings.shape[-1]
    return 2 * (UNIT_ROUNDOFF[embeddings.dtype] + channels * 2.0**-24) * magnitude + 1e-30


def run_grid_mask(embeddings, pixels, grid_size, min_decided=0.7):
    batch, queries = embeddings.shape[:2]
    out = torch.empty(batch, queries, grid_size * grid_size, dtype=torch.bool, device=embeddings.device)
    out.view(torch.uint8).fill_(0xFF)  # neither False (0) nor True (1): an unwritten byte fails below
    assert grid_attention_mask_forward(embeddings, pixels, grid_size, out=out) is out
    assert (out.view(torch.uint8) <= 1).all(), "an element left unwritten"
    exact = exact_grid_logits(embeddings, pixels, grid_size)
    decided = exact.abs() > rounding_margin(embeddings, pixels, grid_size)
    # most logits are far from 0, or the test would say little
    assert decided.float().mean().item() >= min_decided, decided.float().mean().item()
    wrong = (out != (exact > 0)) & decided
    assert not wrong.any(), f"{int(wrong.sum())} of {int(decided.sum())} decided mask bits differ"
    return out


# (B, Q, C, g, factor): every g in {1, 3, 5}, factor in {1, 2, 4, 8}, Q in {1, 7}, B in {1, 2}, C in {8, 24, 64}
GRID_CASES = [
    (1, 1, 8, 1, 1),  # a single patch at grid resolution already (the identity resize)
    (2, 7, 24, 3, 4),  # EoMT's 4x factor: the mean of pixels 4i+1..4i+2
    (1, 7, 64, 5, 4),
    (2, 1, 64, 5, 8),  # 8x (three upscale blocks): pixels 8i+3..8i+4
    (1, 7, 8, 3, 2),  # 2x (one upscale block): pixels 2i..2i+1
    (2, 7, 24, 1, 8),  # one patch from a 8 x 8 image
    (1, 7, 64, 5, 1),  # identity resize with 25 patches
    (2, 7, 24, 3, 3),  # an odd factor: the single pixel 3i+1 (bilinear weights exactly 1 and 0)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", GRID_CASES, ids=lambda c: f"B{c[0]}-Q{c[1]}-C{c[2]}-g{c[3]}-f{c[4]}")
def test_grid_attention_mask_matches_interpolated_logits(case, dtype):
    batch, queries, channels, grid_size, factor = case
    run_grid_mask(*make_inputs(batch, queries, channels, grid_size * factor, grid_size * factor, dtype), grid_size)


def test_grid_attention_mask_non_square_factors():
    """Different factors per axis (12 x 6 -> 3 x 3: 4 rows, 2 columns) and strided pixel embeddings."""
    embeddings, pixels = make_inputs(2, 7, 24, 12, 6, torch.float16, seed=2)
    wide = torch.zeros(2, 12, 6, 40, dtype=torch.float16)
    wide[..., 8:32] = pixels
    run_grid_mask(embeddings, wide[..., 8:32], 3)


def test_grid_attention_mask_fallback_factor():
    """A factor that is not a whole number (10 -> 4) runs the reference (general bilinear weights)."""
    assert grid_sampling(10, 4) is None and grid_sampling(16, 4) == (4, 1, 2) and grid_sampling(9, 3) == (3, 1, 1)
    embeddings, pixels = make_inputs(1, 7, 24, 10, 10, torch.float32, seed=3)
    assert torch.equal(grid_attention_mask_forward(embeddings, pixels, 4),
                       grid_attention_mask_ref(embeddings, pixels, 4))
    run_grid_mask(embeddings, pixels, 4)


def test_grid_attention_mask_agrees_with_the_reference_op():
    """The reference op computes in the input dtype; it agrees with the kernel on every decided bit too."""
    embeddings, pixels = make_inputs(2, 7, 64, 20, 20, torch.float32, seed=4)
    ours = run_grid_mask(embeddings, pixels, 5)
    decided = exact_grid_logits(embeddings, pixels, 5).abs() > rounding_margin(embeddings, pixels, 5)
    assert torch.equal(ours[decided], grid_attention_mask_ref(embeddings, pixels, 5)[decided])


# ---- registered ops, dispatch, the model ---------------------------------------------------------------------

def test_registered_ops():
    from eomt_fast.dispatch import triton_ops

    assert TRITON_OPS == {"mask_logits": mask_logits, "grid_attention_mask": grid_attention_mask}
    assert triton_ops()["mask_logits"] is mask_logits and triton_ops()["grid_attention_mask"] is grid_attention_mask
    embeddings, pixels = make_inputs(2, 3, 16, 8, 8, torch.float32, seed=5)
    torch.library.opcheck(mask_logits, (embeddings, pixels))
    torch.library.opcheck(grid_attention_mask, (embeddings, pixels, 2))
    for op, args in ((mask_logits, (embeddings, pixels)), (grid_attention_mask, (embeddings, pixels, 2))):
        compiled = torch.compile(op, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(*args), op(*args), rtol=0, atol=0)


@pytest.mark.parametrize("masking", [True, False], ids=["masked", "unmasked"])
def test_model_with_triton_backend(masking):
    """The whole model with backend="triton" (every op a Triton kernel, run by the interpreter here) against
    the same weights in float64: patch embedding, upscale blocks, the grid masks of the masked layers and the
    final mask logits included. fp32: a mask bit could only flip where a logit is within ~1e-6 of 0."""
    from eomt_fast import EomtFastForUniversalSegmentation
    from eomt_fast.config import EomtFastConfig

    config = EomtFastConfig(hidden_size=48, num_attention_heads=3, num_hidden_layers=2, image_size=32, patch_size=8,
                            num_blocks=1, num_queries=5, num_register_tokens=2)
    torch.manual_seed(0)
    model = EomtFastForUniversalSegmentation(config, backend="triton")
    model.attn_mask_probs.fill_(1.0 if masking else 0.0)
    pixel_values = torch.randn(2, 3, 32, 32)
    ours = model(pixel_values)
    model.backend = "torch"
    theirs = model(pixel_values)
    exact = model.double()(pixel_values.double())
    for name in ("masks_queries_logits", "class_queries_logits", "last_hidden_state"):
        assert_close(getattr(ours, name), getattr(theirs, name), getattr(exact, name))


def test_invalid_inputs():
    embeddings, pixels = make_inputs(1, 3, 16, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="differ"):
        mask_logits_forward(embeddings, pixels[..., :8])
    with pytest.raises(TypeError):
        grid_attention_mask_forward(embeddings.half(), pixels, 2)
    with pytest.raises(ValueError, match="out"):
        grid_attention_mask_forward(embeddings, pixels, 2, out=torch.empty(1, 3, 5, dtype=torch.bool))


def test_aot_sm90_no_spills_and_wgmma():
    """Every bf16/fp32 AOT spec compiles for sm_90 without spills, the 16-bit ones with wgmma. In a
    subprocess: under TRITON_INTERPRET the kernels are interpreter functions, not compilable ones."""
    reports = compile_aot_specs_sm90("mask_logits")
    names = [r["name"] for r in reports]
    assert any(n.startswith("mask_logits_bf16") for n in names) and any(n.startswith("grid_attention_mask_bf16")
                                                                         for n in names)
    for r in reports:
        assert r["wgmma"] == ("fp32" not in r["name"]), r["line"]


# ---- GPU: EoMT-L/640 -------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("batch", [1, 2], ids=lambda b: f"B{b}")
def test_mask_logits_real_shapes_gpu(batch, dtype):
    run_logits(*make_inputs(batch, 200, 1024, 160, 160, dtype, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("batch", [1, 2], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("factor", [4, 1, 2], ids=lambda f: f"f{f}")
def test_grid_attention_mask_real_shapes_gpu(factor, batch, dtype):
    # the margin grows with C (1024 fp32 additions) and u_in (bf16): fewer logits are decided
    run_grid_mask(*make_inputs(batch, 200, 1024, 40 * factor, 40 * factor, dtype, device="cuda"), 40,
                  min_decided=0.5)
