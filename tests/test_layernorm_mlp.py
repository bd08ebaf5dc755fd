"""The Triton LayerNorm-MLP sublayers (MLP and gated MLP, every activation) against their references in float64.

Without CUDA the kernels run in Triton's interpreter (fp32 and fp16) at small hidden sizes and awkward
token counts; the ``gpu`` tests use EoMT-L/g shapes in bf16, fp16 and fp32. Every launch writes into a
NaN-poisoned output. Error bound: ours <= 2 x PyTorch's own error in the same dtype + a tiny floor.
"""

import pytest
import torch

from eomt_fast.kernels import gemm
from eomt_fast.kernels.layernorm_mlp import (
    TRITON_OPS,
    layernorm_mlp,
    layernorm_mlp_forward,
    layernorm_mlp_into,
    layernorm_mlp_op,
    layernorm_mlp_ref,
    layernorm_swiglu,
    layernorm_swiglu_forward,
    layernorm_swiglu_into,
    layernorm_swiglu_op,
    layernorm_swiglu_ref,
)
from eomt_fast.testing import DTYPE_IDS, assert_close_to_ref, normal_sampler
from tests.conftest import poison_


def swiglu_hidden(c: int, mlp_ratio: float = 4.0) -> int:
    return (int(int(c * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def make_inputs(tokens: int, c: int, swiglu: bool, dtype, device="cpu", seed=0, batch=None):
    """Arguments of the op: x (batch, tokens, C) or (tokens, C), LN, fc1, fc2 and LayerScale parameters."""
    rnd = normal_sampler(torch.Generator().manual_seed(seed), dtype, device)
    hidden = swiglu_hidden(c) if swiglu else 4 * c
    rows = 2 * hidden if swiglu else hidden
    x = rnd(*((batch,) if batch else ()), tokens, c, mean=0.5)
    return (x, rnd(c, std=0.1, mean=1.0), rnd(c, std=0.1), 1e-6,
            rnd(rows, c, std=c**-0.5), rnd(rows, std=0.1), rnd(c, hidden, std=hidden**-0.5), rnd(c, std=0.1),
            rnd(c, std=0.1, mean=0.5))


OPS = {"mlp": (layernorm_mlp_forward, layernorm_mlp_ref), "swiglu": (layernorm_swiglu_forward, layernorm_swiglu_ref)}

# (tokens, C): 1 token; 7; 130 and 600 (not multiples of the tile; 600 crosses GROUP_M groups); the
# SwiGLU widths 88 / 128 / 176 / 1024 for C 32 / 48 / 64 / 384 are not multiples of the tile either.
SHAPES = [(1, 32), (7, 48), (130, 64), (600, 48), (7, 384)]


@pytest.mark.parametrize("ln_mode", gemm.LN_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}-C{s[1]}")
@pytest.mark.parametrize("op", OPS)
def test_layernorm_mlp_matches_reference(op, shape, dtype, ln_mode):
    forward, ref = OPS[op]
    args = make_inputs(*shape, swiglu=op == "swiglu", dtype=dtype)
    out = poison_(torch.empty_like(args[0]))
    assert forward(*args, out=out, ln_mode=ln_mode) is out
    assert_close_to_ref(out, ref, args)


DEFAULT_ACTIVATION = {"mlp": "gelu", "swiglu": "silu"}  # of the reference and the ops (EoMT's GELU MLP, SwiGLU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("activation", ["gelu", "silu", "relu"])
@pytest.mark.parametrize("op", OPS)
def test_every_activation_matches_reference(op, activation, dtype):
    """hidden_act of the MLP, or of the gate (EoMT-DINOv3's gated MLP applies hidden_act: GeGLU with GELU)."""
    forward, ref = OPS[op]
    args = (*make_inputs(130, 48, swiglu=op == "swiglu", dtype=dtype, seed=8), activation)
    out = poison_(torch.empty_like(args[0]))
    assert forward(*args, out=out) is out
    assert_close_to_ref(out, ref, args)
    if activation != DEFAULT_ACTIVATION[op]:  # the activation is applied: not the default's result
        assert not torch.allclose(out, ref(*args[:-1]), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("op", OPS)
def test_unknown_activation_is_refused_by_name(op):
    forward, ref = OPS[op]
    args = (*make_inputs(3, 32, swiglu=op == "swiglu", dtype=torch.float32), "gelu_new")
    for fn in (forward, ref):
        with pytest.raises(ValueError, match="activation must be one of gelu, silu, relu, got 'gelu_new'"):
            fn(*args)


@pytest.mark.parametrize("op", OPS)
def test_layernorm_mlp_batched_split_k(op):
    """(batch, tokens, C) input, fc2 split over K in two, and the fixed-tile path."""
    forward, ref = OPS[op]
    args = make_inputs(37, 48, swiglu=op == "swiglu", dtype=torch.float16, batch=3, seed=5)
    out = poison_(torch.empty_like(args[0]))
    forward(*args, out=out, split_k=2)
    assert_close_to_ref(out, ref, args)
    out = poison_(torch.empty_like(args[0]))
    forward(*args, out=out, config=gemm.GemmConfig(32, 32, 32, 2, 4, 1, 1))
    assert_close_to_ref(out, ref, args)


REGISTERED = {"layernorm_mlp": (layernorm_mlp, layernorm_mlp_into, layernorm_mlp_op),
              "layernorm_swiglu": (layernorm_swiglu, layernorm_swiglu_into, layernorm_swiglu_op)}


@pytest.mark.parametrize("name", ["layernorm_mlp", "layernorm_swiglu"])
def test_registered_op(name):
    """torch.library.opcheck (schema, fake tensor, dispatch) of the functional and the mutating op, and the
    TRITON_OPS entry (dispatch's function over both)."""
    op, op_into, entry = REGISTERED[name]
    assert TRITON_OPS[name] is entry
    args = make_inputs(5, 32, swiglu=name == "layernorm_swiglu", dtype=torch.float32, batch=2)
    default = "silu" if name == "layernorm_swiglu" else "gelu"
    torch.library.opcheck(op, args)
    torch.library.opcheck(op, (*args, "relu"))
    torch.library.opcheck(op_into, (*args, default, poison_(torch.empty_like(args[0]))))
    ref = layernorm_swiglu_ref if name == "layernorm_swiglu" else layernorm_mlp_ref
    assert_close_to_ref(op(*args), ref, args)
    assert torch.equal(entry(*args), op(*args))
    assert torch.equal(entry(*args, activation="relu"), op(*args, "relu"))


@pytest.mark.parametrize("ln_mode", gemm.LN_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("op", OPS)
def test_in_place_on_a_token_buffer_slice(op, dtype, ln_mode):
    """x = out = the (B, S0, C) slice tokens[:, Q:] of a token buffer with poisoned query rows (rows
    (Q + S0) * C apart between images): read (LN, also in the GEMM prologue) and updated in place through its
    strides, the query rows neither read nor written; equal to the functional op on a copy."""
    forward, ref = OPS[op]
    batch, queries, seq0, c = 3, 5, 37, 48
    args = make_inputs(seq0, c, swiglu=op == "swiglu", dtype=dtype, batch=batch, seed=4)
    tokens = poison_(torch.empty(batch, queries + seq0, c, dtype=dtype))
    body = tokens[:, queries:]
    body.copy_(args[0])
    assert forward(body, *args[1:], out=body, ln_mode=ln_mode) is body
    assert torch.isnan(tokens[:, :queries]).all(), "wrote outside the slice"
    assert_close_to_ref(body, ref, args)
    assert torch.equal(body, forward(*args, ln_mode=ln_mode))


@pytest.mark.parametrize("name", ["layernorm_mlp", "layernorm_swiglu"])
def test_out_in_the_reference_and_the_dispatch_entry(name):
    """out=x in the reference: in place, bit for bit its functional result; the dispatch entry with out=x
    updates x, also inside a torch.compile(fullgraph) graph (functionalised mutating op)."""
    _, _, entry = REGISTERED[name]
    ref = layernorm_swiglu_ref if name == "layernorm_swiglu" else layernorm_mlp_ref
    args = make_inputs(7, 32, swiglu=name == "layernorm_swiglu", dtype=torch.float32, batch=2, seed=6)
    x = args[0].clone()
    assert ref(x, *args[1:], out=x) is x
    assert torch.equal(x, ref(*args))
    y = args[0].clone()
    assert entry(y, *args[1:], out=y) is y
    assert torch.equal(y, entry(*args))
    for activation in ("relu", "gelu"):  # by position and by name, into out: the reference's result
        y = args[0].clone()
        assert entry(y, *args[1:], activation, out=y) is y
        assert torch.equal(y, entry(*args, activation=activation))
        torch.testing.assert_close(y, ref(*args, activation), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="unexpected arguments"):
        entry(*args, act="relu")
    with pytest.raises(TypeError, match="missing the argument 'scale'"):
        entry(*args[:-1])

    def sublayer(tokens, *weights):
        body = tokens[:, 3:]
        entry(body, *weights, out=body)
        return tokens + 1

    tokens = torch.randn(2, 10, 32)
    compiled = torch.compile(sublayer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(tokens.clone(), *args[1:]), sublayer(tokens.clone(), *args[1:]), rtol=0,
                               atol=0)


def test_compiles_fullgraph():
    """The ops trace into one torch.compile graph (their fake implementations give the shapes)."""
    args = make_inputs(7, 32, swiglu=False, dtype=torch.float32, batch=2)
    swiglu_args = make_inputs(7, 32, swiglu=True, dtype=torch.float32, batch=2, seed=1)

    def sublayers(mlp_args, swiglu_args):
        return layernorm_mlp(*mlp_args) + layernorm_swiglu(*swiglu_args)

    compiled = torch.compile(sublayers, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(args, swiglu_args), sublayers(args, swiglu_args), rtol=0, atol=0)


def test_rejects_mismatched_dtypes():
    args = list(make_inputs(3, 32, swiglu=False, dtype=torch.float16))
    args[4] = args[4].float()
    with pytest.raises(TypeError):
        layernorm_mlp_forward(*args)


# ---- GPU: EoMT-L (C 1024, MLP 4096) and EoMT-g SwiGLU (C 1536, hidden 4096) ----------------------------

GPU_SHAPES = [(1, 1805, 1024), (8, 1805, 1024), (1, 1805, 1536), (2, 1605, 1536)]


@pytest.mark.gpu
@pytest.mark.parametrize("ln_mode", gemm.LN_MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"B{s[0]}-S{s[1]}-C{s[2]}")
@pytest.mark.parametrize("op", OPS)
def test_layernorm_mlp_real_shapes_gpu(op, shape, dtype, ln_mode):
    batch, tokens, c = shape
    if (op == "swiglu") != (c == 1536):
        pytest.skip("GELU MLP at C 1024 (EoMT-L), SwiGLU at C 1536 (EoMT-g)")
    forward, ref = OPS[op]
    args = make_inputs(tokens, c, swiglu=op == "swiglu", dtype=dtype, device="cuda", batch=batch)
    out = poison_(torch.empty_like(args[0]))
    forward(*args, out=out, ln_mode=ln_mode)
    assert_close_to_ref(out, ref, args)


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_cuda_graph_and_inductor_gpu(op):
    """torch.compile(fullgraph, inductor) around the op, then the op replayed from a CUDA graph."""
    forward, ref = OPS[op]
    name = "layernorm_swiglu" if op == "swiglu" else "layernorm_mlp"
    args = make_inputs(1805, 1024, swiglu=op == "swiglu", dtype=torch.bfloat16, device="cuda")
    compiled = torch.compile(TRITON_OPS[name], fullgraph=True)
    expected = TRITON_OPS[name](*args)  # warms up the autotuner before any capture
    torch.testing.assert_close(compiled(*args), expected, rtol=0, atol=0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = TRITON_OPS[name](*args)
    args[0].copy_(torch.randn_like(args[0]))
    graph.replay()
    assert_close_to_ref(captured, ref, args)
