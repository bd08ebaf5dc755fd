"""The Triton patch embedding of kernels/patch_embed.py (im2col GEMM + bias + position embedding) against
patch_embed_ref in float64.

Without CUDA the kernel runs in Triton's interpreter (fp32 and fp16) at small, awkward shapes; the ``gpu``
tests use ViT-S/B/L shapes at 640 x 640 in bf16, fp16 and fp32. Every launch writes into a NaN-poisoned
output. Error bound: ours <= 2 x PyTorch's own error in the same dtype + a tiny floor, both against float64.
"""

import pytest
import torch

from eomt_fast.kernels.patch_embed import (
    TRITON_OPS,
    patch_embed,
    patch_embed_forward,
    patch_embed_into,
    patch_embed_op,
    patch_embed_ref,
)
from eomt_fast.testing import DTYPE_IDS, assert_close_to_ref, compile_aot_specs_sm90, normal_sampler
from tests.conftest import poison_


def make_inputs(batch, channels, patch, grid, hidden, dtype, device="cpu", seed=0):
    """pixel_values (B, ch, g*p, g*p) ~ N(0, 1), a conv weight of unit output variance, bias, position embedding."""
    rnd = normal_sampler(torch.Generator().manual_seed(seed), dtype, device)
    k = channels * patch * patch
    return (rnd(batch, channels, grid * patch, grid * patch), rnd(hidden, k, std=k**-0.5), rnd(hidden, std=0.1),
            rnd(grid * grid, hidden), patch)


def run(args, out=None):
    pixel_values, weight, _, pos, patch = args
    if out is None:
        out = poison_(weight.new_empty(pixel_values.shape[0], pos.shape[0], weight.shape[0]))
    assert patch_embed_forward(*args, out=out) is out
    assert_close_to_ref(out, patch_embed_ref, args)
    return out


# (B, channels, patch, grid, C)
SHAPES = [
    (1, 3, 16, 2, 24),  # EoMT's patch 16: the aligned path (16-pixel runs, no K masks), K = 768 = 12 steps
    (2, 3, 16, 3, 64),  # ... 18 patches over 2 images: the batch/patch split of the rows
    (2, 3, 4, 3, 8),  # K = 48 < one 64-wide K step (masked), C = 8
    (1, 2, 3, 5, 24),  # an odd patch size (no power-of-2 addressing), K = 18, 25 patches
    (2, 1, 8, 1, 64),  # one patch per image, one channel
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-ch{s[1]}-p{s[2]}-g{s[3]}-C{s[4]}")
def test_matches_reference(shape, dtype):
    run(make_inputs(*shape, dtype=dtype))


def test_writes_into_token_buffer():
    """out = the patch slice of [CLS | registers | patches]: the prefix rows stay untouched."""
    batch, prefix = 2, 5
    args = make_inputs(batch, 3, 16, 2, 32, torch.float16, seed=1)
    tokens = poison_(torch.empty(batch, prefix + 4, 32, dtype=torch.float16))
    run(args, out=tokens[:, prefix:])
    assert torch.isnan(tokens[:, :prefix]).all(), "wrote outside the patch slice"


def test_strided_pixel_values():
    """pixel_values a crop of a bigger image (odd strides: the unaligned path), read in place."""
    pixel_values, weight, bias, pos, patch = make_inputs(2, 3, 4, 3, 24, torch.float32, seed=2)
    big = torch.randn(2, 4, 15, 17)
    big[:, :3, 1:13, 3:15] = pixel_values
    run((big[:, :3, 1:13, 3:15], weight, bias, pos, patch))


def test_registered_ops():
    """torch.library.opcheck (schema, fake tensor, dispatch) of both ops, a torch.compile(fullgraph) graph, and
    the dispatch entry."""
    from eomt_fast.dispatch import triton_ops

    assert TRITON_OPS["patch_embed"] is patch_embed_op and triton_ops()["patch_embed"] is patch_embed_op
    args = make_inputs(2, 3, 4, 2, 16, torch.float32, seed=3)
    torch.library.opcheck(patch_embed, args)
    torch.library.opcheck(patch_embed_into, (*args, torch.empty(2, 4, 16)))
    compiled = torch.compile(patch_embed, fullgraph=True, backend="aot_eager")
    expected = patch_embed(*args)
    torch.testing.assert_close(compiled(*args), expected, rtol=0, atol=0)
    out = poison_(torch.empty(2, 4, 16))
    patch_embed_into(*args, out)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_dispatch_entry_and_reference_write_into_the_token_buffer():
    """dispatch's patch_embed with out= (the model's call): the Triton entry (patch_embed_into) and the
    reference write the patch rows of a poisoned token buffer, and give what they give without out."""
    batch, prefix = 2, 3
    args = make_inputs(batch, 3, 4, 2, 16, torch.float32, seed=4)
    for fn in (patch_embed_op, patch_embed_ref):
        tokens = poison_(torch.empty(batch, prefix + 4, 16))
        assert fn(*args, out=tokens[:, prefix:]) is not None
        assert torch.isnan(tokens[:, :prefix]).all(), "wrote outside the patch slice"
        assert torch.equal(tokens[:, prefix:], fn(*args))


def test_invalid_inputs():
    pixel_values, weight, bias, pos, _ = make_inputs(1, 3, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="patches"):
        patch_embed_forward(pixel_values, weight, bias, pos, 3)  # 8 x 8 is not whole 3 x 3 patches
    with pytest.raises(TypeError):
        patch_embed_forward(pixel_values.half(), weight, bias, pos, 4)  # pixel_values not in the weight dtype
    with pytest.raises(ValueError, match="position_embeddings"):
        patch_embed_forward(pixel_values, weight, bias, pos[:3], 4)
    with pytest.raises(ValueError, match="out"):
        patch_embed_forward(pixel_values, weight, bias, pos, 4, out=torch.empty(1, 4, 15))


def test_aot_sm90_no_spills_and_wgmma():
    """Every bf16/fp32 AOT spec compiles for sm_90 without spills (in a subprocess, without the interpreter;
    fp16 compiles to the same code as bf16, so bf16 and fp32 stand for all here)."""
    reports = compile_aot_specs_sm90("patch_embed")
    assert reports
    for r in reports:
        assert r["wgmma"] == ("fp32" not in r["name"]), r["line"]  # 16-bit tiles on wgmma; fp32 runs "ieee" FMA


# ---- GPU: 640 x 640 images, patch 16 (g = 40), ViT-S/B/L hidden sizes -----------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("batch", [1, 2], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("hidden", [384, 768, 1024], ids=lambda c: f"C{c}")
def test_real_shapes_gpu(hidden, batch, dtype):
    run(make_inputs(batch, 3, 16, 40, hidden, dtype, device="cuda"))


@pytest.mark.gpu
def test_token_buffer_gpu():
    """The model's layout: patches after CLS + 4 registers of a (B, 1605, 1024) bf16 buffer."""
    batch, prefix = 2, 5
    args = make_inputs(batch, 3, 16, 40, 1024, torch.bfloat16, device="cuda")
    tokens = poison_(torch.empty(batch, prefix + 1600, 1024, dtype=torch.bfloat16, device="cuda"))
    run(args, out=tokens[:, prefix:])
    assert torch.isnan(tokens[:, :prefix]).all()
