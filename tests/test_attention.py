"""The masked query-patch attention kernel (kernels/attention.py) against attention_ref in float64.

Without CUDA the kernel runs in Triton's interpreter (fp32 and fp16 only: the interpreter's bf16 is
wrong) on small, awkward shapes; the realistic shapes and bf16 run on a GPU (marked ``gpu``).
Every launch writes into a NaN-poisoned buffer, so an output element the kernel forgets fails.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from eomt_fast.kernels.attention import (
    AOT_CONFIGS,
    attention_probabilities,
    attention_ref,
    masked_attention,
    masked_attention_fwd,
    pack_query_patch_mask,
)
from eomt_fast.testing import DTYPE_IDS, compile_aot_specs_sm90
from tests.conftest import poison_

MASK_KINDS = ("none", "rand", "true", "false", "onecol", "perbatch", "blocky")


def make_mask(kind: str, batch: int, num_queries: int, num_patches: int, gen: torch.Generator) -> torch.Tensor | None:
    """(B, Q, P) bool query->patch mask of a kind; None for "none"."""
    shape = (batch, num_queries, num_patches)
    if kind == "none":
        return None
    if kind == "rand":
        return torch.rand(shape, generator=gen) < 0.5
    if kind == "true":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "false":  # every query row sees no patch: it still attends to queries, CLS, registers
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "onecol":  # one patch column per batch, the same for every query
        mask = torch.zeros(shape, dtype=torch.bool)
        for b in range(batch):
            mask[b, :, (7 * b + 3) % max(num_patches, 1)] = True
        return mask
    if kind == "perbatch":  # all true, all false, random: each batch its own pattern
        mask = torch.rand(shape, generator=gen) < 0.3
        mask[0::3] = True
        mask[1::3] = False
        return mask
    if kind == "blocky":  # stripes of 150 patches, all false / all true / random in turn, the phase
        # changing every 64 queries and per batch: key tiles of every class occur (skipped, unmasked, mixed)
        mask = torch.rand(shape, generator=gen) < 0.5
        for b in range(batch):
            for q0 in range(0, num_queries, 64):
                for i, p0 in enumerate(range(0, num_patches, 150)):
                    choice = (i + q0 // 64 + b) % 3
                    if choice < 2:
                        mask[b, q0:q0 + 64, p0:p0 + 150] = bool(choice)
        return mask
    raise ValueError(kind)


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    seq_len: int
    heads: int
    head_dim: int
    queries: int
    registers: int
    dtype: torch.dtype
    mask: str

    @property
    def id(self) -> str:
        return (f"B{self.batch}-S{self.seq_len}-H{self.heads}-D{self.head_dim}-Q{self.queries}-R{self.registers}"
                f"-{DTYPE_IDS[self.dtype]}-{self.mask}")

    @property
    def patch_start(self) -> int:
        return self.queries + 1 + self.registers  # [Q queries | CLS | R registers | P patches]

    def inputs(self, device, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        qkv = torch.randn(self.batch, self.seq_len, 3 * self.heads * self.head_dim, generator=gen)
        mask = make_mask(self.mask, self.batch, self.queries, self.seq_len - self.patch_start, gen)
        return qkv.to(device, self.dtype), None if mask is None else mask.to(device), self.patch_start


def assert_matches_reference(out: torch.Tensor, qkv: torch.Tensor, num_heads: int, mask, patch_start: int) -> None:
    """out against attention_ref in float64 on the upcast inputs.

    fp32: within 1e-5 (the interpreter's dots are exact fp32, the GPU's tf32x3 about as good).
    fp16/bf16: no more than twice the error of PyTorch's own SDPA in that dtype, plus a tiny floor.
    """
    assert out.shape == (qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3) and out.dtype == qkv.dtype
    assert out.is_contiguous()
    assert torch.isfinite(out).all(), "NaN/inf in the output (unwritten element or empty softmax row)"
    expected = attention_ref(qkv.double(), num_heads, mask, patch_start)
    err = (out.double() - expected).abs().max().item()
    if qkv.dtype == torch.float32:
        bound = 1e-5
    else:
        sdpa_err = (attention_ref(qkv, num_heads, mask, patch_start).double() - expected).abs().max().item()
        bound = 2 * sdpa_err + 1e-5
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


def run_poisoned(qkv, num_heads, mask, patch_start, **blocks) -> torch.Tensor:
    batch, seq_len, three_c = qkv.shape
    out = poison_(torch.empty(batch, seq_len, three_c // 3, dtype=qkv.dtype, device=qkv.device))
    result = masked_attention_fwd(qkv, num_heads, mask, patch_start, out=out, **blocks)
    assert result.data_ptr() == out.data_ptr()
    return out


# ------------------------------------------------------------------------------------------------
# Interpreter (CPU) and GPU: small, awkward shapes
# ------------------------------------------------------------------------------------------------

F16, F32 = torch.float16, torch.float32
SMALL_CASES = [
    Case(1, 1, 1, 16, 0, 0, F32, "none"),  # a single token (the CLS), every block ragged
    Case(1, 17, 2, 16, 5, 0, F32, "rand"),  # S below one tile; R = 0
    Case(2, 17, 1, 40, 5, 4, F16, "rand"),  # head dim 40: BLOCK_D 64 padded with masked lanes
    Case(2, 17, 1, 40, 5, 4, F16, "false"),
    Case(2, 130, 2, 64, 5, 4, F16, "rand"),  # S = 2 tiles + 2 tokens
    Case(2, 130, 2, 64, 64, 4, F32, "rand"),  # Q = one tile exactly
    Case(1, 130, 3, 40, 64, 0, F16, "false"),  # all-false rows never NaN
    Case(2, 130, 2, 64, 0, 4, F32, "rand"),  # Q = 0: an empty (B, 0, P) mask
    Case(3, 130, 2, 64, 64, 4, F16, "perbatch"),
    Case(2, 130, 1, 16, 64, 4, F32, "onecol"),
    Case(2, 405, 2, 64, 64, 4, F16, "rand"),  # S = 405: 6 full tiles + 21
    Case(1, 405, 4, 16, 64, 4, F32, "true"),  # all true: every tile takes the unmasked path
    Case(2, 405, 1, 64, 5, 0, F16, "onecol"),  # 5 query rows share a row tile with rows that see everything
    Case(2, 405, 2, 40, 64, 4, F32, "blocky"),
    Case(1, 405, 2, 64, 64, 4, F16, "none"),  # mask None with patch_start given, as the model calls it
    Case(1, 577, 2, 64, 100, 4, F16, "blocky"),  # Q spans two row tiles, the second half queries
    Case(1, 405, 1, 64, 64, 4, F16, "false"),  # query tiles past the prefix all skipped, the last one too
    Case(1, 425, 2, 4, 5, 19, F32, "rand"),  # transformers' hf_tiny test model: head dim 4, 19 registers
]


@pytest.mark.parametrize("case", SMALL_CASES, ids=[c.id for c in SMALL_CASES])
def test_matches_reference(case: Case, device):
    qkv, mask, patch_start = case.inputs(device)
    out = run_poisoned(qkv, case.heads, mask, patch_start)
    assert_matches_reference(out, qkv, case.heads, mask, patch_start)


# Other tiles than the autotuned one(s): BLOCK_M below, at and above Q; BLOCK_N of 1, 2, 4 and 8 mask words
TILES = [(32, 32), (128, 64), (64, 128), (32, 256)]
TILE_CASES = [
    Case(2, 130, 1, 64, 64, 4, F32, "blocky"),
    Case(2, 405, 1, 40, 100, 4, F16, "rand"),
    Case(1, 405, 1, 64, 128, 4, F32, "blocky"),  # Q = 128: whole 128-row tiles of queries, skippable
]


@pytest.mark.parametrize("tile", TILES, ids=[f"M{m}-N{n}" for m, n in TILES])
@pytest.mark.parametrize("case", TILE_CASES, ids=[c.id for c in TILE_CASES])
def test_other_tiles(case: Case, tile, device):
    qkv, mask, patch_start = case.inputs(device, seed=1)
    out = run_poisoned(qkv, case.heads, mask, patch_start, block_m=tile[0], block_n=tile[1])
    assert_matches_reference(out, qkv, case.heads, mask, patch_start)


def test_strided_qkv_views(device):
    """qkv is read through its strides: slices of a wider projection buffer (16-byte aligned rows, and
    rows shifted by one element, which the launcher must not promise aligned), a batch-minor layout and a
    last dimension with stride 2 all give the result of the same values made contiguous."""
    batch, seq_len, heads, head_dim, queries = 2, 130, 2, 40, 5
    hidden = heads * head_dim
    gen = torch.Generator().manual_seed(2)
    mask = make_mask("rand", batch, queries, seq_len - queries - 5, gen).to(device)
    wide = torch.randn(batch, seq_len, 3 * hidden + 24, generator=gen).to(device, torch.float16)
    seq_major = torch.randn(seq_len, batch, 3 * hidden, generator=gen).to(device, torch.float16)
    doubled = torch.randn(batch, seq_len, 6 * hidden, generator=gen).to(device, torch.float16)
    views = (wide[..., 8:8 + 3 * hidden], wide[..., 1:1 + 3 * hidden], seq_major.transpose(0, 1), doubled[..., ::2])
    for qkv in views:
        assert not qkv.is_contiguous()
        out = run_poisoned(qkv, heads, mask, queries + 5)
        assert_matches_reference(out, qkv, heads, mask, queries + 5)
        assert torch.equal(out, run_poisoned(qkv.contiguous(), heads, mask, queries + 5))


def test_mask_views(device):
    """The mask is read through its strides too: a batch-broadcast (stride 0) and a sliced mask."""
    case = Case(3, 130, 1, 64, 5, 4, F32, "rand")
    qkv, _, patch_start = case.inputs(device)
    gen = torch.Generator().manual_seed(3)
    num_patches = case.seq_len - patch_start
    shared = (torch.rand(1, case.queries, num_patches, generator=gen) < 0.5).to(device).expand(case.batch, -1, -1)
    sliced = (torch.rand(case.batch, case.queries, num_patches + 9, generator=gen) < 0.5).to(device)[..., 9:]
    for mask in (shared, sliced):
        out = run_poisoned(qkv, case.heads, mask, patch_start)
        assert_matches_reference(out, qkv, case.heads, mask, patch_start)


def test_all_false_rows_attend_to_prefix(device):
    """A query row whose patch mask is all false attends to exactly the queries, CLS and registers."""
    case = Case(1, 130, 2, 16, 5, 4, F32, "rand")
    qkv, mask, patch_start = case.inputs(device)
    mask[0, 2] = False
    out = run_poisoned(qkv, case.heads, mask, patch_start)
    prefix_only = attention_ref(qkv[:, :patch_start].double(), case.heads)[0, 2]
    torch.testing.assert_close(out[0, 2].double(), prefix_only, rtol=0, atol=1e-5)


def test_packed_mask(device):
    """Bit j of word w of a query row = the row may attend to token 32*w + j; the prefix is allowed, the
    padding past S blocked."""
    gen = torch.Generator().manual_seed(4)
    batch, queries, patch_start, seq_len = 2, 19, 23, 100
    mask = (torch.rand(batch, queries, seq_len - patch_start, generator=gen) < 0.5).to(device)
    bits = pack_query_patch_mask(mask, seq_len, patch_start)
    assert bits.dtype == torch.int32 and bits.shape[:2] == (batch, queries) and bits.shape[2] % 16 == 0
    unpacked = (bits.cpu().long()[..., None] >> torch.arange(32)) & 1
    unpacked = unpacked.flatten(-2).bool()  # (B, Q, 32 * n_words)
    assert unpacked[..., :patch_start].all() and not unpacked[..., seq_len:].any()
    assert torch.equal(unpacked[..., patch_start:seq_len], mask.cpu())


def test_public_op_matches_launcher(device):
    """masked_attention (the custom op the model calls) gives the launcher's result."""
    case = Case(2, 130, 2, 64, 5, 4, F16, "blocky")
    qkv, mask, patch_start = case.inputs(device)
    out = masked_attention(qkv, case.heads, mask, patch_start)
    assert torch.equal(out, run_poisoned(qkv, case.heads, mask, patch_start))
    assert torch.equal(masked_attention(qkv, case.heads), run_poisoned(qkv, case.heads, None, None))


@pytest.mark.parametrize(("tile", "match"), [((64, 96), "block_n must be a power of two"), ((64, 16), "block_n"),
                                            ((48, 64), "block_m must be a power of two")])
def test_rejects_bad_tiles(tile, match, device):
    """tl.arange needs power-of-two tiles: a fixed tile that is not one is refused before any launch."""
    qkv, mask, patch_start = Case(1, 130, 1, 64, 5, 4, F32, "blocky").inputs(device)
    with pytest.raises(ValueError, match=match):
        masked_attention_fwd(qkv, 1, mask, patch_start, block_m=tile[0], block_n=tile[1])


# (qkv shape, heads, qkv dtype, mask shape or None, mask dtype, patch_start) -> the error attention_ref's
# contract implies; S = 17 throughout
BAD_INPUTS = {
    "heads": ((2, 17, 96), 3, F32, None, torch.bool, None, ValueError),  # 96 is not 3 * 3 * head_dim
    "head_dim": ((2, 17, 3 * 2 * 136), 2, F32, None, torch.bool, None, NotImplementedError),  # 136 > 128
    "dtype": ((2, 17, 96), 2, torch.float64, None, torch.bool, None, TypeError),
    "rank": ((17, 96), 2, F32, None, torch.bool, None, ValueError),
    "patches": ((2, 17, 96), 2, F32, (2, 5, 11), torch.bool, 5, ValueError),  # patch_start + P != S
    "batch": ((2, 17, 96), 2, F32, (1, 5, 12), torch.bool, 5, ValueError),
    "mask_dtype": ((2, 17, 96), 2, F32, (2, 5, 12), torch.uint8, 5, TypeError),
    "no_patch_start": ((2, 17, 96), 2, F32, (2, 5, 12), torch.bool, None, ValueError),
    "queries": ((2, 17, 96), 2, F32, (2, 6, 13), torch.bool, 4, ValueError),  # Q > patch_start
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_rejects_bad_inputs(name, device):
    shape, heads, dtype, mask_shape, mask_dtype, patch_start, error = BAD_INPUTS[name]
    qkv = torch.randn(shape, device=device).to(dtype)
    mask = None if mask_shape is None else torch.ones(mask_shape, device=device, dtype=mask_dtype)
    with pytest.raises(error):
        masked_attention(qkv, heads, mask, patch_start)


# ------------------------------------------------------------------------------------------------
# torch.library: custom op, fake implementation, torch.compile
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "nomask"])
def test_opcheck(with_mask, device):
    case = Case(2, 17, 2, 16, 5, 4, F32, "rand" if with_mask else "none")
    qkv, mask, patch_start = case.inputs(device)
    torch.library.opcheck(torch.ops.eomt_fast.masked_attention.default, (qkv, case.heads, mask, patch_start))


def test_compile_fullgraph(device):
    """The op is one node in a full graph (the fake gives the output's shape and dtype)."""
    case = Case(1, 17, 2, 16, 5, 4, F32, "rand")
    qkv, mask, patch_start = case.inputs(device)

    def layer(x, m):
        return masked_attention(x * 1.0, case.heads, m, patch_start) + 1.0

    backend = "inductor" if device.type == "cuda" else "aot_eager"  # inductor on CPU would need a C++ compiler
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(qkv, mask), layer(qkv, mask), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Dispatch and ahead-of-time compilation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["none", "rand", "false", "perbatch"])
def test_attention_probabilities_are_the_weights_of_attention_ref(kind):
    """The weights model(output_attentions=True) returns: rows sum to 1, masked pairs are exactly 0, and
    weights @ v is attention_ref's output (float64)."""
    gen = torch.Generator().manual_seed(3)
    batch, heads, head_dim, num_queries, patch_start, seq_len = 3, 2, 8, 5, 7, 31
    qkv = torch.randn(batch, seq_len, 3 * heads * head_dim, generator=gen, dtype=torch.float64)
    mask = make_mask(kind, batch, num_queries, seq_len - patch_start, gen)
    probs = attention_probabilities(qkv, heads, mask, patch_start)
    assert probs.shape == (batch, heads, seq_len, seq_len) and probs.dtype == torch.float64
    torch.testing.assert_close(probs.sum(-1), torch.ones(batch, heads, seq_len, dtype=torch.float64))
    if mask is not None:
        masked = ~mask[:, None].expand(-1, heads, -1, -1)
        assert torch.equal(probs[:, :, :num_queries, patch_start:] == 0, masked)
    v = qkv[..., 2 * heads * head_dim:].unflatten(-1, (heads, head_dim)).transpose(1, 2)  # (B, H, S, D)
    out = (probs @ v).transpose(1, 2).reshape(batch, seq_len, heads * head_dim)
    torch.testing.assert_close(out, attention_ref(qkv, heads, mask, patch_start), rtol=1e-12, atol=1e-12)
    assert attention_probabilities(qkv.float(), heads, mask, patch_start).dtype == torch.float32


def test_dispatch_routes_attention_here():
    from eomt_fast.dispatch import triton_ops

    assert triton_ops()["attention"] is masked_attention


def test_aot_sm90_no_spills_and_wgmma():
    """Every bf16 AOT spec compiles for sm_90 without spills, in a subprocess without the interpreter (fp16
    compiles to the same code as bf16 with another element type, so bf16 stands for both here)."""
    reports = compile_aot_specs_sm90("attention")
    assert len(reports) == 2 * len(AOT_CONFIGS) + 1
    for r in reports:
        if r["name"] != "attention_pack_mask":
            assert r["needs_wgmma"] and r["wgmma"], r["line"]  # every main configuration: 64 rows a warpgroup


def test_aot_specs_cover_main_configs():
    from eomt_fast.kernels import attention

    names = {s.name for s in attention.aot_specs()}
    for dtype in ("bf16", "fp16"):
        for kind in ("plain", "masked"):
            for bm, bn, warps, stages in AOT_CONFIGS:
                assert f"attention_{dtype}_d64_{kind}_m{bm}n{bn}w{warps}s{stages}" in names


# ------------------------------------------------------------------------------------------------
# GPU: real EoMT shapes, bf16, the autotuner, CUDA graphs
# ------------------------------------------------------------------------------------------------

BF16 = torch.bfloat16
GPU_CASES = [
    Case(1, 1805, 16, 64, 200, 4, BF16, "rand"),  # EoMT-L/640, masked layers
    Case(1, 1805, 16, 64, 200, 4, BF16, "blocky"),
    Case(1, 1805, 16, 64, 200, 4, F16, "false"),
    Case(1, 1605, 16, 64, 0, 4, BF16, "none"),  # the first 20 layers: no queries yet
    Case(8, 1805, 16, 64, 200, 4, BF16, "perbatch"),
    Case(8, 1805, 16, 64, 200, 4, F16, "rand"),
    Case(2, 1805, 16, 64, 200, 4, F32, "blocky"),
    Case(2, 1029, 12, 64, 100, 4, BF16, "rand"),  # ViT-B/448-ish
    Case(2, 1029, 6, 64, 100, 0, F16, "onecol"),  # ViT-S, R = 0
    Case(1, 1805, 8, 128, 200, 4, BF16, "rand"),  # head dim 128
    Case(1, 1805, 16, 40, 200, 4, F16, "blocky"),  # head dim 40
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[c.id for c in GPU_CASES])
def test_gpu_real_shapes(case: Case):
    device = torch.device("cuda")
    qkv, mask, patch_start = case.inputs(device)
    out = run_poisoned(qkv, case.heads, mask, patch_start)  # the autotuned configuration
    assert_matches_reference(out, qkv, case.heads, mask, patch_start)
    assert torch.equal(masked_attention(qkv, case.heads, mask, patch_start), out)


@pytest.mark.gpu
def test_gpu_cuda_graph_and_compile():
    device = torch.device("cuda")
    case = Case(1, 1805, 16, 64, 200, 4, BF16, "rand")
    qkv, mask, patch_start = case.inputs(device)
    expected = masked_attention(qkv, case.heads, mask, patch_start)  # also autotunes before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = masked_attention(qkv, case.heads, mask, patch_start)
    qkv.copy_(torch.randn_like(qkv))
    graph.replay()
    assert torch.equal(captured, masked_attention(qkv, case.heads, mask, patch_start))
    compiled = torch.compile(lambda x, m: masked_attention(x, case.heads, m, patch_start), fullgraph=True,
                             mode="reduce-overhead")
    for _ in range(3):
        got = compiled(qkv, mask)
    assert torch.equal(got, masked_attention(qkv, case.heads, mask, patch_start))
    del expected
