"""The Triton upscale block of kernels/upscale.py (ConvTranspose 2x2 + activation GEMM, depthwise 3x3 + LayerNorm)
against upscale_block_ref in float64.

Without CUDA the kernels run in Triton's interpreter (fp32 and fp16) at small, awkward shapes; the ``gpu``
tests use EoMT-L/640 (C 1024, 40 -> 80 -> 160) and ViT-S/B/g hidden sizes in bf16, fp16 and fp32. Every
launch writes into a NaN-poisoned output. Error bound: ours <= 2 x PyTorch's own error in the same dtype +
a tiny floor, both against float64.
"""

import pytest
import torch
import torch.nn.functional as F

from eomt_fast.kernels.upscale import (
    TRITON_OPS,
    convt_activation,
    dwconv_layernorm,
    prepare_convt_weight,
    upscale_block,
    upscale_block_forward,
    upscale_block_ref,
)
from eomt_fast.testing import (
    DTYPE_IDS,
    assert_close,
    assert_close_to_ref,
    compile_aot_specs_sm90,
    normal_sampler,
    upcast,
)
from tests.conftest import poison_

EPS = 1e-6  # EomtLayerNorm2d's eps


def make_weights(channels, dtype, device="cpu", seed=0):
    """convt_weight (prepared), convt_bias, dw_weight, ln_weight, ln_bias, initialised like the model."""
    g = torch.Generator().manual_seed(seed)

    def uniform(*shape, bound):
        return ((torch.rand(*shape, generator=g) * 2 - 1) * bound).to(device=device, dtype=dtype)

    rnd = normal_sampler(g, dtype, device)
    return (prepare_convt_weight(uniform(channels, channels, 2, 2, bound=channels**-0.5)), rnd(channels, std=0.1),
            uniform(channels, 1, 3, 3, bound=1 / 3), rnd(channels, std=0.1, mean=1.0), rnd(channels, std=0.1))


def make_inputs(batch, height, width, channels, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(batch, height, width, channels, generator=g).to(device=device, dtype=dtype)
    return (x, *make_weights(channels, dtype, device, seed), EPS)


def run(args, **options):
    x = args[0]
    batch, height, width, _ = x.shape
    out = poison_(x.new_empty(batch, 2 * height, 2 * width, args[1].shape[2]))  # (2, 2, C_out, C_in)
    assert upscale_block_forward(*args, out=out, **options) is out
    assert_close_to_ref(out, upscale_block_ref, args)


# (B, H, W, C): input pixels and channels of one block
SHAPES = [
    (1, 1, 1, 8),  # one input pixel: every 3x3 tap but the centre ones is padding
    (2, 3, 5, 24),  # C = 24: neither the 4C = 96 GEMM columns nor the channels are a power of 2
    (1, 4, 4, 64),  # 64 channels, 16 input pixels
    (2, 5, 3, 8),  # 60 GEMM rows over two images, output rows of 6 pixels (not a multiple of BLOCK_P)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-H{s[1]}-W{s[2]}-C{s[3]}")
def test_matches_reference(shape, dtype):
    run(make_inputs(*shape, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("channels", [(24, 24), (16, 40), (8, 20)], ids=lambda c: f"Cin{c[0]}-Cout{c[1]}")
def test_convt_activation_pixel_scatter(channels, dtype):
    """The GEMM alone: every one of the 2x2 output pixels of every input pixel written, GELU(ConvT + b); also
    with C_out != C_in (160 GEMM columns: 2.5 column tiles), and with C_out 20 (column pairs of 40: no 16-wide
    runs, so no OUT_ALIGNED promise)."""
    c_in, c_out = channels
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, c_in, generator=g).to(dtype)
    weight = prepare_convt_weight(torch.randn(c_in, c_out, 2, 2, generator=g) * c_in**-0.5).to(dtype)
    bias = (torch.randn(c_out, generator=g) * 0.1).to(dtype)
    out = poison_(x.new_empty(2, 6, 10, c_out))
    assert convt_activation(x, weight, bias, out=out) is out

    def ref(x, w, b):  # the model's nn.ConvTranspose2d weight is (C_in, C_out, 2, 2); prepared (2, 2, C_out, C_in)
        return F.gelu(F.conv_transpose2d(x.permute(0, 3, 1, 2), w.permute(3, 2, 0, 1), b, stride=2)).permute(0, 2, 3, 1)

    theirs = ref(x.float(), weight.float(), bias.float()).to(dtype)  # CPU conv_transpose2d: no fp16 kernel
    assert_close(out, theirs, ref(x.double(), weight.double(), bias.double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("activation", ["silu", "relu"])
def test_other_activations_match_reference(activation, dtype):
    """hidden_act SiLU (EoMT-DINOv3's gated models) or ReLU in place of the GELU after the ConvTranspose."""
    args = (*make_inputs(2, 3, 5, 24, dtype=dtype, seed=2), activation)
    run(args)
    gelu = upscale_block_ref(*args[:-1])
    assert not torch.allclose(upscale_block_ref(*args), gelu, rtol=1e-2, atol=1e-2)


# (B, H, W, C): 7 x 9 with C = 24 (one segment, one pixel block per row); 3 x 40 with C = 200 (BLOCK_C 256);
# (BLOCK_P, SEGMENT, SLIDE): the interpreter's own (32, 32: rows of 40 are segments of 32 + 8 pixels, a block
# each), and tiles the GPU autotuner tries: (8, 32) walks the 32 in four blocks, (2, 4) and (4, 8) give ten and
# five segments a row of 40 (the last of 8 pixels ending past a block of 4 when W is 9); the sliding window
# one pixel at a time over segments of 8 (a window starting mid-row, the right edge at W 9 and 40) and 32
@pytest.mark.parametrize("tile", [None, (8, 32, False), (2, 4, False), (4, 8, False), (1, 8, True), (1, 32, True)],
                         ids=lambda t: (f"P{t[0]}-S{t[1]}" + ("-slide" if t[2] else "")) if t else "default")
@pytest.mark.parametrize("shape", [(2, 7, 9, 24), (1, 3, 40, 200)], ids=lambda s: f"B{s[0]}-H{s[1]}-W{s[2]}-C{s[3]}")
def test_dwconv_layernorm_alone(shape, tile, monkeypatch):
    """The depthwise + LayerNorm kernel alone, into a NaN-poisoned output."""
    if tile is not None:
        from eomt_fast.kernels import upscale
        from eomt_fast.kernels._triton import triton

        tuner = upscale.autotune(upscale._dwconv_layernorm_kernel,
                                 [triton.Config({"BLOCK_P": tile[0], "SEGMENT": tile[1], "SLIDE": tile[2]},
                                                num_warps=4)],
                                 ["B", "H", "W", "C", "ALIGNED"])
        monkeypatch.setattr(upscale, "_tuned_dwconv_kernel", lambda arch=None: tuner)
    g = torch.Generator().manual_seed(2)
    y = torch.randn(*shape, generator=g)
    _, _, dw, lnw, lnb = make_weights(shape[-1], torch.float32, seed=2)
    out = poison_(torch.empty_like(y))
    assert dwconv_layernorm(y, dw, lnw, lnb, EPS, out=out) is out

    def ref(y, dw, lnw, lnb):
        z = F.conv2d(y.permute(0, 3, 1, 2), dw, padding=1, groups=y.shape[-1]).permute(0, 2, 3, 1)
        return F.layer_norm(z, (y.shape[-1],), lnw, lnb, EPS)

    assert_close(out, ref(y, dw, lnw, lnb), ref(y.double(), dw.double(), lnw.double(), lnb.double()))


def test_patch_tokens_of_token_buffer_in_place():
    """The model's first block reads the patch tokens of [queries | CLS | registers | patches] viewed as
    (B, g, g, C): a strided view, no copy."""
    batch, prefix, grid, channels = 2, 3, 3, 24
    tokens = torch.randn(batch, prefix + grid * grid, channels).half()
    x = tokens[:, prefix:].reshape(batch, grid, grid, channels)
    assert x.data_ptr() == tokens[:, prefix:].data_ptr()  # a view
    run((x, *make_weights(channels, torch.float16, seed=3), EPS))


def test_two_blocks_chained():
    """num_upscale_blocks = 2 (the default): 3 x 3 -> 6 x 6 -> 12 x 12, each block one op call."""
    x = torch.randn(1, 3, 3, 24)
    blocks = [make_weights(24, torch.float32, seed=s) for s in (4, 5)]
    ours, exact = x, x.double()
    for weights in blocks:
        ours = upscale_block_forward(ours, *weights, EPS)
        exact = upscale_block_ref(exact, *upcast(weights), EPS)
    theirs = x
    for weights in blocks:
        theirs = upscale_block_ref(theirs, *weights, EPS)
    assert ours.shape == (1, 12, 12, 24)
    assert_close(ours, theirs, exact)


def test_registered_op():
    from eomt_fast.dispatch import triton_ops

    assert TRITON_OPS["upscale"] is upscale_block and triton_ops()["upscale"] is upscale_block
    args = make_inputs(2, 2, 3, 16, torch.float32, seed=6)
    torch.library.opcheck(upscale_block, args)
    torch.library.opcheck(upscale_block, (*args, "silu"))
    compiled = torch.compile(upscale_block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), upscale_block(*args), rtol=0, atol=0)


def test_invalid_inputs():
    x, wt, b, dw, lnw, lnb, eps = make_inputs(1, 2, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="prepared"):
        upscale_block_forward(x, wt.permute(3, 2, 0, 1), b, dw, lnw, lnb, eps)  # the checkpoint layout
    with pytest.raises(ValueError, match="prepared"):
        upscale_block_forward(x, wt.permute(3, 0, 1, 2), b, dw, lnw, lnb, eps)  # the layout before 2026-12-06
    with pytest.raises(TypeError):
        upscale_block_forward(x.half(), wt, b, dw, lnw, lnb, eps)
    with pytest.raises(ValueError, match="dw_weight"):
        upscale_block_forward(x, wt, b, dw[:, :, :2], lnw, lnb, eps)
    for fn in (upscale_block_forward, upscale_block_ref):
        with pytest.raises(ValueError, match="activation must be one of gelu, silu, relu, got 'tanh'"):
            fn(x, wt, b, dw, lnw, lnb, eps, "tanh")


def test_aot_sm90_no_spills_and_wgmma():
    """Every bf16/fp32 AOT spec compiles for sm_90 without spills, the 16-bit ConvT GEMMs (gemm.py's kernel with
    the 4-D output view) with wgmma, its TMA tiles with TMA. In a subprocess: under TRITON_INTERPRET the kernels
    are interpreter functions, not compilable ones."""
    reports = compile_aot_specs_sm90("upscale")
    convt = [r for r in reports if r["name"].startswith(("upscale_convt_gelu_bf16", "upscale_convt_silu_bf16",
                                                          "upscale_convt_gelu_rows3d_bf16"))]
    assert len({r["name"].split("_")[2] for r in convt}) == 2 and all(r["wgmma"] for r in convt)
    assert any(r["name"].endswith("_tma") and r["tma"] for r in convt)
    assert any(r["name"].startswith("upscale_dwconv_layernorm") for r in reports)


# ---- GPU: EoMT-L/640 (C 1024, 40 -> 80 -> 160) and the other hidden sizes --------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(1, 40, 40, 1024), (1, 80, 80, 1024), (2, 40, 40, 1024), (1, 40, 40, 384),
                                   (1, 40, 40, 768), (1, 40, 40, 1536)],
                         ids=lambda s: f"B{s[0]}-H{s[1]}-C{s[3]}")
def test_real_shapes_gpu(shape, dtype):
    run(make_inputs(*shape, dtype=dtype, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 80, 80, 1024), (1, 160, 160, 1024), (2, 80, 80, 384)],
                         ids=lambda s: f"B{s[0]}-H{s[1]}-C{s[3]}")
def test_every_depthwise_config_on_the_gpu(shape, monkeypatch):
    """Each (BLOCK_P, SEGMENT, SLIDE) config the autotuner may pick for these channels, alone, bf16, against
    the reference: the autotuner keeps only the fastest, so the others would otherwise never be checked."""
    from eomt_fast.kernels import upscale
    from eomt_fast.kernels._triton import gpu_arch

    g = torch.Generator().manual_seed(4)
    y = torch.randn(*shape, generator=g).to("cuda", torch.bfloat16)
    _, _, dw, lnw, lnb = make_weights(shape[-1], torch.bfloat16, "cuda", seed=4)
    def ref(y, dw, lnw, lnb):
        z = F.conv2d(y.permute(0, 3, 1, 2), dw, padding=1, groups=y.shape[-1]).permute(0, 2, 3, 1)
        return F.layer_norm(z, (y.shape[-1],), lnw, lnb, EPS)

    theirs, exact = ref(y, dw, lnw, lnb), ref(y.double(), dw.double(), lnw.double(), lnb.double())
    keep = upscale.dwconv_configs(shape[-1])
    configs = [c for c in upscale._tuned_dwconv_kernel(arch=gpu_arch(y)).configs
               if (c.kwargs["BLOCK_P"], c.num_warps) in keep]
    assert any(c.kwargs["SLIDE"] for c in configs) and len(configs) > 4
    for config in configs:
        tuner = upscale.autotune(upscale._dwconv_layernorm_kernel, [config], ["B", "H", "W", "C", "ALIGNED"])
        monkeypatch.setattr(upscale, "_tuned_dwconv_kernel", lambda arch=None, tuner=tuner: tuner)
        out = poison_(torch.empty_like(y))
        dwconv_layernorm(y, dw, lnw, lnb, EPS, out=out)
        try:
            assert_close(out, theirs, exact)
        except AssertionError as error:
            raise AssertionError(f"{config}: {error}") from None
