"""The Triton projection ops of kernels/linear.py (LN1 + QKV, out-projection + LayerScale + residual, mask
head) against their references in float64.

Without CUDA the kernels run in Triton's interpreter (fp32 and fp16) at small hidden sizes and awkward
token counts; the ``gpu`` tests use EoMT-L shapes in bf16, fp16 and fp32. Every launch writes into a
NaN-poisoned output. Error bound: ours <= 2 x PyTorch's own error in the same dtype + a tiny floor.
"""

import pytest
import torch

from eomt_fast.kernels import gemm
from eomt_fast.kernels.linear import (
    TRITON_OPS,
    layernorm_linear,
    layernorm_linear_forward,
    layernorm_linear_ref,
    linear_residual,
    linear_residual_forward,
    linear_residual_into,
    linear_residual_ref,
    mask_head,
    mask_head_forward,
    mask_head_ref,
    out_projection_op,
)
from eomt_fast.testing import DTYPE_IDS, assert_close, assert_close_to_ref, normal_sampler
from tests.conftest import poison_


def make_inputs(op: str, tokens: int, c: int, dtype, device="cpu", seed=0, batch=None, bias=True):
    rnd = normal_sampler(torch.Generator().manual_seed(seed), dtype, device)
    x = rnd(*((batch,) if batch else ()), tokens, c, mean=0.5)
    if op == "layernorm_qkv":
        return (x, rnd(c, std=0.1, mean=1.0), rnd(c, std=0.1), 1e-6, rnd(3 * c, c, std=c**-0.5),
                rnd(3 * c, std=0.1) if bias else None)
    if op == "out_projection":
        return (x, rnd(c, c, std=c**-0.5), rnd(c, std=0.1) if bias else None, rnd(c, std=0.1, mean=0.5),
                rnd(*x.shape))
    return (x, *(t for _ in range(3) for t in (rnd(c, c, std=c**-0.5), rnd(c, std=0.1))))


OPS = {
    "layernorm_qkv": (layernorm_linear_forward, layernorm_linear_ref),
    "out_projection": (linear_residual_forward, linear_residual_ref),
    "mask_head": (mask_head_forward, mask_head_ref),
}
OUT_FEATURES = {"layernorm_qkv": 3, "out_projection": 1, "mask_head": 1}  # x C

# (tokens, C): 1 token; 7; 130 and 600 (not multiples of the tile; 600 crosses GROUP_M groups); C = 384.
SHAPES = [(1, 32), (7, 48), (130, 64), (600, 48), (7, 384)]


def run(op, args, **options):
    forward, ref = OPS[op]
    x = args[0]
    out = poison_(x.new_empty(*x.shape[:-1], OUT_FEATURES[op] * x.shape[-1]))
    assert forward(*args, out=out, **options) is out
    assert_close_to_ref(out, ref, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}-C{s[1]}")
@pytest.mark.parametrize("op", OPS)
def test_matches_reference(op, shape, dtype):
    run(op, make_inputs(op, *shape, dtype=dtype))


@pytest.mark.parametrize("ln_mode", gemm.LN_MODES)
def test_layernorm_qkv_ln_modes_without_bias(ln_mode):
    run("layernorm_qkv", make_inputs("layernorm_qkv", 130, 48, torch.float16, batch=2, bias=False), ln_mode=ln_mode)


@pytest.mark.parametrize("op", ["out_projection", "mask_head"])
def test_split_k(op):
    run(op, make_inputs(op, 37, 96, torch.float16, batch=3, bias=op == "mask_head"), split_k=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("activation", ["silu", "relu"])
def test_mask_head_other_activations(activation, dtype):
    """hidden_act SiLU (EoMT-DINOv3's gated models) or ReLU in place of the mask head's GELUs; an unknown one
    is refused by name."""
    args = (*make_inputs("mask_head", 130, 64, dtype, seed=4), activation)
    run("mask_head", args)
    assert not torch.allclose(mask_head_ref(*args), mask_head_ref(*args[:-1]), rtol=1e-2, atol=1e-2)
    for fn in (mask_head_forward, mask_head_ref):
        with pytest.raises(ValueError, match="activation must be one of gelu, silu, relu, got 'none'"):
            fn(*args[:-1], "none")


REGISTERED = {"layernorm_qkv": layernorm_linear, "out_projection": linear_residual, "mask_head": mask_head}


@pytest.mark.parametrize("op", OPS)
def test_registered_op(op):
    """torch.library.opcheck (schema, fake tensor, dispatch), and one torch.compile(fullgraph) graph."""
    args = make_inputs(op, 5, 32, torch.float32, batch=2)
    torch.library.opcheck(REGISTERED[op], args)
    compiled = torch.compile(REGISTERED[op], fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), REGISTERED[op](*args), rtol=0, atol=0)
    if op != "mask_head":  # bias is optional in the schema
        args = make_inputs(op, 5, 32, torch.float32, batch=2, bias=False)
        torch.library.opcheck(REGISTERED[op], args)
    else:  # the activation is an argument
        torch.library.opcheck(REGISTERED[op], (*args, "silu"))
    assert TRITON_OPS[op] is (out_projection_op if op == "out_projection" else REGISTERED[op])


def token_buffer_case(dtype, batch=3, queries=5, seq0=37, c=48, seed=3):
    """out_projection's arguments on the model's layout: the residual is the (B, S0, C) slice tokens[:, Q:] of
    a (B, Q + S0, C) token buffer whose query rows are poisoned (rows (Q + S0) * C apart between images)."""
    args = make_inputs("out_projection", seq0, c, dtype, batch=batch, seed=seed)
    tokens = poison_(torch.empty(batch, queries + seq0, c, dtype=dtype))
    tokens[:, queries:] = args[4]
    return args[:4], tokens, tokens[:, queries:]


@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_out_projection_in_place_on_a_token_buffer_slice(dtype, split_k):
    """out = residual = a strided slice of the token buffer: updated in place through its strides (no copy),
    the poisoned query rows neither read nor written; the same result as the functional op."""
    head, tokens, body = token_buffer_case(dtype)
    residual = body.clone()
    assert linear_residual_forward(*head, body, out=body, split_k=split_k) is body
    assert torch.isnan(tokens[:, :5]).all(), "wrote outside the slice"
    assert_close_to_ref(body, linear_residual_ref, (*head, residual))
    assert torch.equal(body, linear_residual_forward(*head, residual, split_k=split_k))


def test_out_projection_op_and_reference_take_out():
    """dispatch's out_projection (Triton) and linear_residual_ref with out=residual: in place, equal to their
    functional results (the reference bit for bit); the mutating op passes opcheck and compiles (fullgraph)."""
    head, tokens, body = token_buffer_case(torch.float32)
    residual = body.clone()
    ref_tokens = tokens.clone()
    assert linear_residual_ref(*head, ref_tokens[:, 5:], out=ref_tokens[:, 5:]) is not None
    assert torch.equal(ref_tokens[:, 5:], linear_residual_ref(*head, residual))
    assert out_projection_op(*head, body, out=body) is body
    assert torch.equal(body, out_projection_op(*head, residual))
    out = poison_(torch.empty_like(residual))
    torch.library.opcheck(linear_residual_into, (*head, residual, out))

    def layer(tokens, *head):
        x = tokens[:, 5:]
        out_projection_op(*head, x, out=x)
        return tokens * 2

    _, fresh, _ = token_buffer_case(torch.float32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    expected = layer(fresh.clone(), *head)
    torch.testing.assert_close(compiled(fresh.clone(), *head), expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("swiglu", [False, True], ids=["gelu_mlp", "swiglu"])
def test_encoder_layer_with_triton_ops(swiglu, dtype):
    """A whole EoMT encoder layer of the model, with the Triton ops of this file and layernorm_mlp.py in
    place of their references (attention stays the reference), against the layer in float64."""
    from eomt_fast import EomtFastForUniversalSegmentation, dispatch, kernels
    from eomt_fast.config import EomtFastConfig
    from eomt_fast.kernels import layernorm_mlp

    config = EomtFastConfig(hidden_size=48, num_attention_heads=3, num_hidden_layers=1, image_size=32, patch_size=8,
                            num_blocks=1, use_swiglu_ffn=swiglu)
    torch.manual_seed(0)
    model = EomtFastForUniversalSegmentation(config)
    references = {op: getattr(kernels, ref) for op, (ref, _) in dispatch.OPS.items()}
    triton_ops = {**references, **TRITON_OPS, **layernorm_mlp.TRITON_OPS}
    x = torch.randn(2, 21, 48)
    exact = model.double().layers[0](x.double(), None, 0, references)  # the layer updates its input in place
    layer = model.to(dtype).layers[0]
    ours, theirs = x.to(dtype), x.to(dtype).clone()
    assert layer(ours, None, 0, triton_ops) is ours and layer(theirs, None, 0, references) is theirs
    assert_close(ours, theirs, exact)


# ---- GPU: EoMT-L (C 1024) at batch 1 and 8 ---------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("batch", [1, 8], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("op", OPS)
def test_real_shapes_gpu(op, batch, dtype):
    tokens = 200 if op == "mask_head" else 1805  # the mask head runs on the query tokens
    modes = gemm.LN_MODES if op == "layernorm_qkv" else (None,)
    for ln_mode in modes:
        options = {"ln_mode": ln_mode} if ln_mode else {}
        run(op, make_inputs(op, tokens, 1024, dtype, device="cuda", batch=batch), **options)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["out_projection", "mask_head"])
def test_split_k_gpu(op):
    tokens = 200 if op == "mask_head" else 1805
    for split_k in (2, 4):
        run(op, make_inputs(op, tokens, 1024, torch.bfloat16, device="cuda"), split_k=split_k)
