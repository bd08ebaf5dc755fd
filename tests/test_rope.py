"""The Triton rotary embeddings of kernels/rope.py against rope_ref in float64, and rope_ref and
rope_tables_ref against transformers' EomtDinov3 functions.

Without CUDA the kernel runs in Triton's interpreter (fp32 and fp16) at small, awkward shapes; the ``gpu``
tests use EoMT-L-DINOv3's shapes. The kernel rotates in place, so instead of a poisoned output every
launch is checked element for element: the rotated q/k columns of the patch tokens against the float64
reference (random tables: every element changes), and everything else (values, the query/CLS/register
tokens) bit for bit unchanged. Error bound: ours <= 2 x PyTorch's own error in the same dtype + a tiny floor.
"""

import pytest
import torch

from eomt_fast.kernels.rope import TRITON_OPS, rope, rope_forward, rope_into, rope_op, rope_ref, rope_tables_ref
from eomt_fast.testing import DTYPE_IDS, assert_close_to_ref, compile_aot_specs_sm90, normal_sampler
from tests.conftest import poison_


def make_inputs(batch, seq, patches, heads, head_dim, dtype, device="cpu", seed=0):
    """qkv (B, S, 3C) ~ N(0, 1), and cos/sin (P, D) ~ N(0, 1): not the real tables (those are a rotation),
    so that a wrong pairing of halves or of table entries shows."""
    rnd = normal_sampler(torch.Generator().manual_seed(seed), dtype, device)
    return rnd(batch, seq, 3 * heads * head_dim), rnd(patches, head_dim), rnd(patches, head_dim), heads


def run(args, in_place: bool):
    qkv, cos, sin, heads = args
    before = qkv.clone()
    if in_place:
        got = rope_forward(qkv, cos, sin, heads, out=qkv)
        assert got is qkv
    else:
        got = rope_forward(qkv, cos, sin, heads)
        assert torch.equal(qkv, before), "the input was modified"
    assert_close_to_ref(got, rope_ref, (before, cos, sin, heads))
    hidden, patches = qkv.shape[-1] // 3, cos.shape[0]
    start = qkv.shape[1] - patches
    assert torch.equal(got[:, :, 2 * hidden:], before[:, :, 2 * hidden:]), "values were written"
    assert torch.equal(got[:, :start], before[:, :start]), "a token before the patches was written"
    assert (got[:, start:, :2 * hidden] != before[:, start:, :2 * hidden]).float().mean() > 0.99, "not rotated"
    return got


# (B, S, P, heads, head_dim)
SHAPES = [
    (1, 9, 4, 2, 16),  # 5 prefix tokens, 4 patches
    (2, 45, 36, 3, 12),  # half 6: padded lanes; 36 patches over two token blocks
    (2, 16, 16, 1, 64),  # no prefix at all (a layer before the queries with no CLS would be this)
    (3, 70, 64, 4, 8),  # 4 heads of 8: the smallest tiles
]


@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "new"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-S{s[1]}-P{s[2]}-H{s[3]}-D{s[4]}")
def test_matches_reference(shape, dtype, in_place):
    run(make_inputs(*shape, dtype=dtype), in_place)


def test_strided_qkv_and_tables():
    """qkv a slice of a wider buffer, cos/sin transposed views: strides are read, not assumed."""
    qkv, cos, sin, heads = make_inputs(2, 20, 16, 2, 16, torch.float32, seed=1)
    wide = torch.randn(2, 20, qkv.shape[-1] + 8)
    wide[..., 3:3 + qkv.shape[-1]] = qkv
    outside = torch.cat([wide[..., :3], wide[..., 3 + qkv.shape[-1]:]], dim=-1)
    view = wide[..., 3:3 + qkv.shape[-1]]
    run((view, cos.t().contiguous().t(), sin.t().contiguous().t(), heads), in_place=True)
    assert torch.equal(torch.cat([wide[..., :3], wide[..., 3 + qkv.shape[-1]:]], dim=-1), outside)


def test_into_a_separate_output():
    """out= another tensor (poisoned): qkv copied there, then rotated; qkv itself untouched."""
    qkv, cos, sin, heads = make_inputs(2, 12, 9, 2, 8, torch.float16, seed=2)
    before = qkv.clone()
    out = poison_(torch.empty_like(qkv))
    assert rope_forward(qkv, cos, sin, heads, out=out) is out
    assert torch.equal(qkv, before)
    assert_close_to_ref(out, rope_ref, (before, cos, sin, heads))


def test_reference_matches_transformers_apply_rotary_pos_emb():
    """rope_ref on the fused layout = transformers' apply_rotary_pos_emb on (B, heads, S, D) q and k, bit for bit
    in float32 (the same operations in the same order)."""
    modeling = pytest.importorskip("transformers.models.eomt_dinov3.modeling_eomt_dinov3")
    qkv, cos, sin, heads = make_inputs(2, 13, 9, 3, 12, torch.float32, seed=3)
    batch, seq, three_c = qkv.shape
    q, k, v = (t.view(batch, seq, heads, -1).transpose(1, 2) for t in qkv.split(three_c // 3, dim=-1))
    q_rot, k_rot = modeling.apply_rotary_pos_emb(q, k, cos, sin)
    expected = torch.cat([t.transpose(1, 2).reshape(batch, seq, -1) for t in (q_rot, k_rot, v)], dim=-1)
    assert torch.equal(rope_ref(qkv, cos, sin, heads), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("grid,head_dim,theta", [((4, 4), 16, 100.0), ((3, 5), 12, 1000.0), ((40, 40), 64, 100.0)])
def test_tables_match_transformers(grid, head_dim, theta, dtype):
    """Bit for bit: transformers' module as built (float32 frequencies), and after .double() (a float64
    model, whose angles are then float64)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.EomtDinov3Config(hidden_size=head_dim * 2, num_attention_heads=2, patch_size=16,
                                           rope_parameters={"rope_type": "default", "rope_theta": theta})
    rotary = transformers.models.eomt_dinov3.modeling_eomt_dinov3.EomtDinov3RotaryEmbedding(config).eval()
    cos, sin = rotary.to(dtype)(torch.zeros(1, 3, grid[0] * 16, grid[1] * 16, dtype=dtype))
    ours = rope_tables_ref(*grid, head_dim, theta, dtype=dtype)
    assert ours[0].dtype == dtype and torch.equal(ours[0], cos) and torch.equal(ours[1], sin)


def test_registered_ops():
    """torch.library.opcheck (schema, fake tensor, dispatch) of both ops, torch.compile(fullgraph), and the
    dispatch entry with out=qkv (what the model calls)."""
    from eomt_fast.dispatch import triton_ops

    assert TRITON_OPS["rope"] is rope_op and triton_ops()["rope"] is rope_op
    args = make_inputs(2, 10, 6, 2, 8, torch.float32, seed=4)
    torch.library.opcheck(rope, args)
    torch.library.opcheck(rope_into, (*args, torch.empty_like(args[0])))
    compiled = torch.compile(rope, fullgraph=True, backend="aot_eager")
    expected = rope(*args)
    torch.testing.assert_close(compiled(*args), expected, rtol=0, atol=0)
    for fn in (rope_op, rope_ref):
        qkv = args[0].clone()
        assert fn(qkv, *args[1:], out=qkv) is qkv
        torch.testing.assert_close(qkv, expected, rtol=1e-6, atol=1e-6)


def test_invalid_inputs():
    qkv, cos, sin, heads = make_inputs(1, 8, 4, 2, 8, torch.float32)
    for fn in (rope_forward, rope_ref):
        with pytest.raises(ValueError, match="num_heads"):
            fn(qkv, cos, sin, 5)
        with pytest.raises(ValueError, match="cos and sin"):
            fn(qkv, cos[:, :6], sin[:, :6], heads)
        with pytest.raises(ValueError, match="only 8 tokens"):
            fn(qkv, torch.randn(9, 8), torch.randn(9, 8), heads)
        with pytest.raises(ValueError, match="even head_dim"):
            fn(torch.randn(1, 8, 3 * 2 * 7), torch.randn(4, 7), torch.randn(4, 7), 2)
        with pytest.raises(ValueError, match="out must be"):
            fn(qkv, cos, sin, heads, out=torch.empty(1, 8, 47))
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_tables_ref(2, 2, 6, 100.0)


def test_aot_sm90_no_spills():
    reports = compile_aot_specs_sm90("rope")
    assert {r["name"] for r in reports} == {"rope_bf16_d64", "rope_fp32_d64"}


# ---- GPU: EoMT-L-DINOv3/640 (1600 patches after 200 queries + CLS + 4 registers, 16 heads of 64) -------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("batch", [1, 2], ids=lambda b: f"B{b}")
def test_real_shapes_gpu(batch, dtype):
    run(make_inputs(batch, 1805, 1600, 16, 64, dtype, device="cuda"), in_place=True)


@pytest.mark.gpu
def test_real_tables_gpu():
    """The model's tables (computed on the CPU, moved) and a rotation that keeps every pair's norm."""
    cos, sin = rope_tables_ref(40, 40, 64, 100.0, device="cuda")
    ref = rope_tables_ref(40, 40, 64, 100.0)
    assert cos.is_cuda and torch.equal(cos.cpu(), ref[0]) and torch.equal(sin.cpu(), ref[1])
    qkv, _, _, heads = make_inputs(1, 1805, 1600, 16, 64, torch.float32, device="cuda")
    got = rope_forward(qkv, cos, sin, heads)
    pairs = lambda t: t[:, -1600:, :2048].unflatten(-1, (32, 2, 32))  # noqa: E731
    norms = lambda t: pairs(t).pow(2).sum(-2)  # noqa: E731  (x_i, x_{i+D/2}) rotate together
    torch.testing.assert_close(norms(got), norms(qkv), rtol=1e-5, atol=1e-5)
