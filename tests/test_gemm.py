"""The GEMM building block of kernels/gemm.py against float64 PyTorch.

Without CUDA these run in Triton's interpreter (fp32 and fp16; its bf16 is broken) at small, awkward
shapes; the ``gpu`` tests run every autotune configuration at EoMT-L shapes. Errors are held against
PyTorch's own error in the same dtype: ours <= 2 x torch's + a tiny floor, both against float64.
"""

import os
import subprocess
import sys

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from eomt_fast.kernels import gemm as G

from eomt_fast.testing import DTYPE_IDS, assert_close, normal_sampler
from tests.conftest import poison_

GPU = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16]


def gemm_ref(a, w, bias=None, activation="none", glu=False, scale=None, residual=None, ln=None):
    """The same computation in plain PyTorch, rounding where a PyTorch model would (per op)."""
    if ln is not None:
        a = F.layer_norm(a, (a.shape[-1],), ln[0], ln[1], ln[2])
    y = F.linear(a, w, bias)
    act = {"none": lambda t: t, "gelu": F.gelu, "silu": F.silu, "relu": F.relu}[activation]
    if glu:
        gate, up = y.chunk(2, dim=-1)
        y = act(gate) * up
    else:
        y = act(y)
    if scale is not None:
        y = y * scale
    if residual is not None:
        y = y + residual
    return y


def make(m, k, n, dtype, *, glu=False, bias=True, scale=False, residual=False, ln=False, seed=0, device="cpu"):
    rnd = normal_sampler(torch.Generator().manual_seed(seed), dtype, device)
    rows = 2 * n if glu else n
    kw = dict(bias=rnd(rows, std=0.1) if bias else None, scale=rnd(n, std=0.5, mean=0.2) if scale else None,
              residual=rnd(m, n) if residual else None,
              ln=(rnd(k, std=0.1, mean=1.0), rnd(k, std=0.1), 1e-6) if ln else None)
    return rnd(m, k, mean=0.3), rnd(rows, k, std=k**-0.5), kw


def upcast(kw):
    return {name: (tuple(t.double() if torch.is_tensor(t) else t for t in v) if isinstance(v, tuple)
                   else v.double() if torch.is_tensor(v) else v) for name, v in kw.items()}


def check_gemm(m, k, n, dtype, flags, device="cpu", **launch):
    """flags: bias, activation, glu, scale, residual, ln (False or an ln_mode)."""
    glu, activation = flags.get("glu", False), flags.get("activation", "none")
    shape_flags = {f: bool(flags[f]) for f in ("bias", "scale", "residual", "ln") if f in flags}
    a, w, kw = make(m, k, n, dtype, glu=glu, device=device, **shape_flags)
    out = poison_(torch.empty(m, n, dtype=dtype, device=device))
    ln_mode = flags["ln"] if flags.get("ln") else None
    ours = G.gemm(a, w, kw["bias"], activation=activation, glu=glu, scale=kw["scale"], residual=kw["residual"],
                  ln=kw["ln"], ln_mode=ln_mode, out=out, **launch)
    assert ours is out
    exact = gemm_ref(a.double(), w.double(), activation=activation, glu=glu, **upcast(kw))
    theirs = gemm_ref(a, w, activation=activation, glu=glu, **kw)
    assert_close(ours, theirs, exact)


# (M, K, N, flags): every flag, M = 1 .. 600 and K, N off the 64-wide interpreter tile.
CASES = [
    (1, 48, 40, dict(bias=True)),                                   # one row: a single, mostly wrapped tile
    (7, 100, 96, dict(activation="gelu")),                          # K = 64 + 36: a masked second step
    (130, 64, 33, dict(scale=True, residual=True)),                 # the LayerScale + residual epilogue, odd N
    (600, 40, 64, dict(bias=False, activation="relu")),             # 10 row tiles: GROUP_M boundaries
    (130, 80, 48, dict(glu=True, activation="silu")),               # SwiGLU: gate and up tiles in one program
    (7, 48, 96, dict(glu=True, activation="gelu", residual=True)),  # GeGLU + residual
    (130, 96, 72, dict(ln="separate", activation="gelu")),          # LayerNorm on A: a row kernel first
    (130, 96, 72, dict(ln="prologue", activation="gelu")),          # ... or normalised in the GEMM prologue
    (600, 48, 40, dict(ln="separate", glu=True, activation="silu", scale=True, residual=True)),
    (600, 48, 40, dict(ln="prologue", glu=True, activation="silu", scale=True, residual=True)),
]


def case_id(case):
    m, k, n, flags = case
    parts = [f"M{m}-K{k}-N{n}"]
    if flags.get("ln"):
        parts.append(f"ln_{flags['ln']}")
    if flags.get("glu"):
        parts.append("glu")
    if flags.get("activation", "none") != "none":
        parts.append(flags["activation"])
    if flags.get("bias", True) is False:
        parts.append("nobias")
    if flags.get("residual"):
        parts.append("scale-residual" if flags.get("scale") else "residual")
    return "-".join(parts)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gemm_epilogues(case, dtype):
    m, k, n, flags = case
    check_gemm(m, k, n, dtype, {"bias": True, **flags})


# split_k 3 over K = 100 gives splits of 64, 36 and nothing: an empty split must add zeros.
@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("case", [(130, 100, 48, dict(scale=True, residual=True)),
                                  (7, 160, 40, dict(glu=True, activation="silu"))], ids=case_id)
def test_gemm_split_k(case, split_k):
    m, k, n, flags = case
    check_gemm(m, k, n, torch.float16, {"bias": True, **flags}, split_k=split_k)


# A fixed config instead of the autotuner: the unsplit epilogue, a small tile, a 2-stage pipeline.
@pytest.mark.parametrize("config", [G.GemmConfig(32, 32, 32, 2, 4, 2, 1), G.GemmConfig(16, 64, 16, 1, 4, 1, 2)],
                         ids=["32x32x32-sub1", "16x64x16-sub2"])
def test_gemm_fixed_config(config):
    check_gemm(70, 40, 72, torch.float16, dict(bias=True, activation="gelu", scale=True, residual=True),
               config=config)


# The TMA tiles (A and W through tensor descriptors), forced by a config; on a GPU with TMA the launcher times
# them against the pointer tiles. Rows must be 16-byte aligned: K a multiple of 8 in fp16.
TMA_CONFIG = G.GemmConfig(64, 64, 32, 4, 4, 1, 2, tma=True)
TMA_CASES = [
    (1, 48, 40, dict(bias=True)),                                   # one row: the rest of the block reads zeros
    (7, 104, 96, dict(activation="gelu")),                          # K = 3 x 32 + 8: a zero-filled last block
    (130, 64, 33, dict(scale=True, residual=True)),                 # odd N: W rows past N read zeros
    (600, 40, 64, dict(bias=False, activation="relu")),             # 10 row tiles: GROUP_M boundaries
    (130, 80, 48, dict(glu=True, activation="silu")),               # gate rows past N read the up half
    (7, 48, 96, dict(glu=True, activation="gelu", residual=True)),
    (130, 96, 72, dict(ln="separate", activation="gelu")),          # A = the LayerNorm row kernel's output
]


# Persistent: G.INTERPRETER_PERSISTENT_PROGRAMS (3) programs walk the tiles, 2 to 10 each here.
PERSISTENT_CONFIG = replace(TMA_CONFIG, persistent=True)


@pytest.mark.parametrize("config", [TMA_CONFIG, PERSISTENT_CONFIG], ids=["tma", "tma_persistent"])
@pytest.mark.parametrize("case", TMA_CASES, ids=case_id)
def test_gemm_tma_tiles(case, config):
    m, k, n, flags = case
    check_gemm(m, k, n, torch.float16, {"bias": True, **flags}, config=config)


def test_gemm_persistent_tiles_cover_more_tiles_than_programs():
    """600 x 200 in 64 x 64 tiles: 40 tiles for 3 programs, the last ones partial in both directions."""
    assert G.INTERPRETER_PERSISTENT_PROGRAMS < 40
    check_gemm(600, 48, 200, torch.float16, dict(bias=True, scale=True, residual=True), config=PERSISTENT_CONFIG)
    with pytest.raises(ValueError, match="persistent config needs"):
        check_gemm(70, 48, 40, torch.float16, dict(bias=True), config=PERSISTENT_CONFIG, split_k=2)
    with pytest.raises(ValueError, match="persistent config needs"):
        check_gemm(70, 48, 40, torch.float16, dict(bias=True), config=replace(PERSISTENT_CONFIG, tma=False))


@pytest.mark.parametrize("split_k", [2, 3])  # 3 over K = 160: splits of 64, 64 and 32
def test_gemm_tma_split_k(split_k):
    check_gemm(130, 160, 48, torch.float16, dict(bias=True, scale=True, residual=True), split_k=split_k,
               config=TMA_CONFIG)


def test_gemm_tma_in_place_on_a_token_buffer_slice():
    """A TMA tile updating a row-split slice in place: the descriptors read A and W, the epilogue's pointers
    address the slice."""
    tokens, body, rnd = token_layer_case(torch.float16)
    a, w, bias, scale = rnd(3 * 37, 64, mean=0.3), rnd(48, 64, std=64**-0.5), rnd(48, std=0.1), rnd(48, std=0.5)
    flat = body.reshape(-1, 48).clone()
    G.gemm(a, w, bias, scale=scale, residual=body, out=body, config=TMA_CONFIG)
    assert torch.isnan(tokens[:, :5]).all(), "wrote outside the slice"
    exact = gemm_ref(a.double(), w.double(), bias.double(), scale=scale.double(), residual=flat.double())
    assert_close(body.reshape(-1, 48), gemm_ref(a, w, bias, scale=scale, residual=flat), exact)


def test_gemm_tma_refuses_what_descriptors_cannot_read():
    g = torch.Generator().manual_seed(12)
    w = torch.randn(16, 32, generator=g).half()
    ln = (torch.ones(32).half(), torch.zeros(32).half(), 1e-6)
    tokens = torch.randn(3, 9, 32, generator=g).half()
    cases = {
        "fp32": dict(a=torch.randn(4, 32, generator=g), weight=w.float()),
        "rows of 100 bytes": dict(a=torch.randn(4, 50, generator=g).half(), weight=torch.randn(16, 50).half()),
        "the LN prologue": dict(a=torch.randn(4, 32, generator=g).half(), weight=w, ln=ln, ln_mode="prologue"),
        "a row-split A": dict(a=tokens[:, 2:], weight=w),
        "a transposed weight": dict(a=torch.randn(4, 32, generator=g).half(), weight=torch.randn(32, 16).half().t()),
        "an expanded A (row stride 0)": dict(a=torch.randn(1, 32, generator=g).half().expand(4, 32), weight=w),
    }
    for name, kwargs in cases.items():
        with pytest.raises(ValueError, match="a TMA config needs"):
            G.gemm(**kwargs, config=TMA_CONFIG)
    assert G.gemm(torch.randn(4, 32, generator=g).half(), w, ln=ln, config=TMA_CONFIG).shape == (4, 16)  # separate LN


def test_gemm_strided_operands():
    """W stored as (K, N) and passed as w.t(), A a column slice of a wider buffer: no copies needed."""
    m, k, n = 70, 48, 40
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(m, k + 16, generator=g, dtype=torch.float32).half()
    a = wide[:, 8:8 + k]
    w_kn = (torch.randn(k, n, generator=g) * k**-0.5).half()
    out = G.gemm(a, w_kn.t())
    assert_close(out, F.linear(a, w_kn.t()), F.linear(a.double(), w_kn.t().double()))


def test_gemm_position_embedding_into_token_buffer():
    """The patch-embedding pattern: write B x P rows into the patch slice of [CLS | registers | patches]
    and add a (P, C) position embedding expanded over the batch (zero batch stride)."""
    batch, prefix, patches, k, c = 3, 5, 21, 48, 40
    g = torch.Generator().manual_seed(2)
    a = torch.randn(batch * patches, k, generator=g).half()
    w = (torch.randn(c, k, generator=g) * k**-0.5).half()
    bias = (torch.randn(c, generator=g) * 0.1).half()
    pos = torch.randn(patches, c, generator=g).half()
    tokens = poison_(torch.empty(batch, prefix + patches, c, dtype=torch.float16))
    G.gemm(a, w, bias, residual=pos.expand(batch, patches, c), out=tokens[:, prefix:])
    assert torch.isnan(tokens[:, :prefix]).all(), "wrote outside the patch slice"
    exact = (F.linear(a.double(), w.double(), bias.double()).view(batch, patches, c) + pos.double())
    theirs = F.linear(a, w, bias).view(batch, patches, c) + pos
    assert_close(tokens[:, prefix:], theirs, exact)


def test_gemm_convtranspose_pixel_scatter():
    """ConvTranspose2d(k=2, s=2) as a GEMM C_in -> (kh, kw, C_out) whose epilogue scatters each row's four
    results to its 2 x 2 output pixels, through a 4-D view of the (B, 2H, 2W, C_out) output."""
    batch, h, w_, cin, cout = 2, 5, 7, 32, 24
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, cin, h, w_, generator=g).half()
    weight = (torch.randn(cin, cout, 2, 2, generator=g) * cin**-0.5).half()
    bias = (torch.randn(cout, generator=g) * 0.1).half()
    w_nk = weight.permute(2, 3, 1, 0).reshape(4 * cout, cin)  # rows (kh, kw, c_out); prepared once at load
    a = x.permute(0, 2, 3, 1).reshape(batch * h * w_, cin)  # rows (b, i, j), channels last
    out = poison_(torch.empty(batch, 2 * h, 2 * w_, cout, dtype=torch.float16))
    # out[b, 2i + kh, 2j + kw, c] = view[(b, i), j, kh, (kw, c)]
    view = out.view(batch, h, 2, w_, 2 * cout).permute(0, 1, 3, 2, 4).reshape(batch * h, w_, 2, 2 * cout)
    assert view.data_ptr() == out.data_ptr() and view._base is not None
    G.gemm(a, w_nk, bias.repeat(4), out=view)
    exact = F.conv_transpose2d(x.double(), weight.double(), bias.double(), stride=2).permute(0, 2, 3, 1)
    theirs = F.conv_transpose2d(x.float(), weight.float(), bias.float(), stride=2).half().permute(0, 2, 3, 1)
    assert_close(out, theirs, exact)


def test_4d_view_alignment_promise():
    """OUT_ALIGNED on a 4-D view promises the compiler 16-element column runs in 16-element aligned rows (vector
    stores through the divisions, which the JIT cannot see through): given only where it holds."""
    def geometry(t, m, n):
        return G._output_geometry(t, None, m, n)[0]

    for c_out, expected in ((24, True), (20, False), (8, True), (4, False)):  # columns (c, o): 2 * C_out wide
        out = torch.empty(2, 6, 10, c_out, dtype=torch.float16)
        view = out.view(6, 2, 5, 2 * c_out).transpose(1, 2)
        assert G._columns_aligned(view, geometry(view, 30, 4 * c_out)) is expected, c_out
    out = torch.empty(2, 6, 10, 24, dtype=torch.float16)
    view = out.view(6, 2, 5, 48).transpose(1, 2)
    broadcast = torch.empty(48, dtype=torch.float16).expand(6, 5, 2, 48)  # a residual of stride-0 rows is fine,
    assert G._columns_aligned(broadcast, (5, 48, *broadcast.stride()))  # a column stride other than 1 is not
    assert not G._columns_aligned(view, (5, 48, *view.stride()[:3], 2))
    offset = torch.empty(2 * 6 * 10 * 24 + 1, dtype=torch.float16)[1:].view(2, 6, 10, 24)  # 2-byte aligned base
    shifted = offset.view(6, 2, 5, 48).transpose(1, 2)
    assert not G._columns_aligned(shifted, geometry(shifted, 30, 96))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(1, 32), (37, 48), (130, 100)], ids=lambda s: f"M{s[0]}-C{s[1]}")
def test_layernorm_rows(shape, dtype):
    m, c = shape
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(m, c, generator=g) * 3 + 5).to(dtype)  # a large mean: two-pass statistics
    w, b = (torch.randn(c, generator=g) * 0.1 + 1).to(dtype), (torch.randn(c, generator=g) * 0.1).to(dtype)
    out = poison_(torch.empty_like(x))
    G.layernorm(x, w, b, 1e-6, out=out)
    exact = F.layer_norm(x.double(), (c,), w.double(), b.double(), 1e-6)
    assert_close(out, F.layer_norm(x, (c,), w, b, 1e-6), exact)
    mean, rstd = G.row_stats(x, 1e-6)
    xd = x.double()
    torch.testing.assert_close(mean.double(), xd.mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), (xd.var(1, unbiased=False) + 1e-6).rsqrt(), rtol=1e-5, atol=1e-5)


def test_as_rows_is_a_view_and_splits_only_uneven_rows():
    tokens = torch.randn(3, 12, 8)
    flat = G.as_rows(tokens)  # contiguous: one (M, K) view
    assert flat.shape == (36, 8) and flat.data_ptr() == tokens.data_ptr() and torch.equal(flat, tokens.view(36, 8))
    one = G.as_rows(tokens[:1, 5:])  # a batch of one: rows evenly strided
    assert one.shape == (7, 8) and one.data_ptr() == tokens[:1, 5:].data_ptr() and torch.equal(one, tokens[0, 5:])
    body = tokens[:, 5:]  # rows 12 * 8 apart between images: stays 3-D, the same view
    assert G.as_rows(body) is body
    wide = torch.randn(2, 3, 4, 8)
    assert G.as_rows(wide).shape == (24, 8)
    with pytest.raises(RuntimeError):  # leading dims that do not merge without a copy
        G.as_rows(wide.transpose(0, 1))


def token_layer_case(dtype, batch=3, queries=5, seq0=37, k=48, seed=5):
    """The layers before the queries: a (B, S0, K) slice tokens[:, Q:] of a (B, Q + S0, K) token buffer whose
    query rows are poisoned (rows (Q + S0) * K apart between images)."""
    rnd = normal_sampler(torch.Generator().manual_seed(seed), dtype)
    tokens = poison_(torch.empty(batch, queries + seq0, k, dtype=dtype))
    tokens[:, queries:] = rnd(batch, seq0, k, mean=0.3)
    return tokens, tokens[:, queries:], rnd


@pytest.mark.parametrize("ln_mode", G.LN_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_gemm_reads_a_token_buffer_slice_in_place(dtype, ln_mode):
    """A = a row-split slice (LayerNorm'd by the row kernel or in the prologue), read through its strides:
    the poisoned query rows would turn the result to NaN."""
    tokens, body, rnd = token_layer_case(dtype)
    w, bias, ln = rnd(64, 48, std=48**-0.5), rnd(64, std=0.1), (rnd(48, std=0.1, mean=1.0), rnd(48, std=0.1), 1e-6)
    ours = G.gemm(body, w, bias, activation="gelu", ln=ln, ln_mode=ln_mode)
    assert ours.shape == (3 * 37, 64)
    flat = body.reshape(-1, 48)  # a copy, for the references only
    exact = gemm_ref(flat.double(), w.double(), bias.double(), "gelu", ln=upcast({"ln": ln})["ln"])
    assert_close(ours, gemm_ref(flat, w, bias, "gelu", ln=ln), exact)


@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_gemm_in_place_residual_on_a_token_buffer_slice(dtype, split_k):
    """out = residual = the row-split slice: residual + (a @ W^T + b) * scale written back in place, nothing
    outside the slice touched; a 2-D out with that residual (split alike) gives the same result."""
    tokens, body, rnd = token_layer_case(dtype)
    a, w, bias, scale = rnd(3 * 37, 64, mean=0.3), rnd(48, 64, std=64**-0.5), rnd(48, std=0.1), rnd(48, std=0.5)
    residual = body.clone()
    assert G.gemm(a, w, bias, scale=scale, residual=body, out=body, split_k=split_k) is body
    assert torch.isnan(tokens[:, :5]).all(), "wrote outside the slice"
    flat = residual.reshape(-1, 48)
    exact = gemm_ref(a.double(), w.double(), bias.double(), scale=scale.double(), residual=flat.double())
    theirs = gemm_ref(a, w, bias, scale=scale, residual=flat)
    assert_close(body.reshape(-1, 48), theirs, exact)
    out = poison_(torch.empty(3 * 37, 48, dtype=dtype))
    G.gemm(a, w, bias, scale=scale, residual=residual, out=out, split_k=split_k)  # residual 3-D, out 2-D
    assert torch.equal(out, body.reshape(-1, 48))


def test_gemm_in_place_needs_the_same_view():
    """out may be the residual itself, not a view that overlaps it shifted by a row."""
    tokens, body, rnd = token_layer_case(torch.float32)
    a, w = rnd(3 * 36, 64), rnd(48, 64, std=64**-0.5)
    with pytest.raises(ValueError, match="share memory"):
        G.gemm(a, w, residual=tokens[:, 5:-1], out=tokens[:, 6:])
    # the fallback for an in-place call (a Triton that does not report its choice): out restored after each run
    assert G._tuned_kernel(False, False, False, False, True).restore_value == ["Out"]
    assert not G._tuned_kernel(False, False, False, False).restore_value


class FakeTuner:
    """Stands for a multi-config autotuner: records what its benchmark launch was given, runs the real kernel
    with ``chosen`` (so that a scratch output really is written), and reports ``chosen`` as best_config."""

    def __init__(self, chosen, report: bool = True):
        self.configs = [chosen, chosen]
        self.chosen, self.report, self.launches = chosen, report, []
        self.kernel = G._gemm_kernel  # the real one, also where a test counts the launcher's direct launches

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches.append(args)
            self.kernel[grid(self.chosen.kwargs)](*args, **meta, **self.chosen.all_kwargs())
            if self.report:
                self.best_config = self.chosen
        return launch


@pytest.mark.parametrize("offset", [0, 1, 3])
def test_scratch_output_keeps_the_layout_and_alignment(offset):
    buffer = torch.empty(2 * 7 * 12 + 8, dtype=torch.float32)
    out = buffer[offset:offset + 2 * 7 * 12].view(2, 7, 12)[:, 2:]  # a row-split slice at an odd address
    scratch = G._scratch_like(out)
    assert scratch.shape == out.shape and scratch.stride() == out.stride() and scratch.dtype == out.dtype
    assert scratch.data_ptr() % 16 == out.data_ptr() % 16
    assert scratch.untyped_storage().data_ptr() != out.untyped_storage().data_ptr()
    scratch.fill_(1.0)  # every offset the view reaches is inside its storage


@pytest.mark.parametrize("report", [True, False], ids=["best_config", "no_best_config"])
def test_in_place_calls_are_tuned_on_a_scratch_output(monkeypatch, report):
    """An in-place call with several tiles to choose from: the benchmark launch writes a scratch tensor of out's
    layout while its residual reads out (out is unchanged by it), then the chosen tile runs once on out; a
    second call of the shape reuses the choice. A Triton without best_config gets the restoring autotuner."""
    interpreter_tile = G.triton.Config(G.INTERPRETER_CONFIG.meta(), num_warps=4, num_stages=1)
    tuner, asked, real = FakeTuner(interpreter_tile, report), [], G._tuned_kernel

    def tuned_kernel(*flags, restore_out=False, arch=None):
        asked.append(restore_out)
        return tuner if not restore_out else real(*flags, restore_out=True, arch=arch)

    monkeypatch.setattr(G, "_tuned_kernel", tuned_kernel)
    monkeypatch.setattr(G, "_TILES", {})
    tokens, body, rnd = token_layer_case(torch.float32)
    a, w, bias, scale = rnd(3 * 37, 64), rnd(48, 64, std=64**-0.5), rnd(48, std=0.1), rnd(48, std=0.5)
    residual = body.clone()
    for call in range(2):
        expected = gemm_ref(a, w, bias, scale=scale, residual=body.reshape(-1, 48))
        G.gemm(a, w, bias, scale=scale, residual=body, out=body)
        torch.testing.assert_close(body.reshape(-1, 48), expected, rtol=1e-5, atol=1e-5)
    assert len(tuner.launches) == 1, "tuned once per shape"
    (launch,) = tuner.launches
    assert launch[2] is not body and launch[2].shape == body.shape and launch[2].stride() == body.stride()
    assert launch[2].data_ptr() % 16 == body.data_ptr() % 16  # the same alignment: the same compiled variant
    assert launch[5] is body  # the residual: read from out
    # the second call launches the chosen tile directly; without a report, the restoring autotuner every time
    assert asked == ([False] if report else [False, True, True])
    assert list(G._TILES.values()) == [interpreter_tile if report else None]
    assert not torch.equal(body, residual) and torch.isnan(tokens[:, :5]).all()


def test_functional_calls_are_tuned_once_then_launched_directly(monkeypatch):
    """A call that does not write its residual: the first call of a shape is the autotuner's (its result is the
    call's), every later one launches the chosen tile without the autotuner; another shape tunes again."""
    interpreter_tile = G.triton.Config(G.INTERPRETER_CONFIG.meta(), num_warps=4, num_stages=1)
    tuner = FakeTuner(interpreter_tile)
    monkeypatch.setattr(G, "_tuned_kernel", lambda *flags, restore_out=False, arch=None: tuner)
    monkeypatch.setattr(G, "_TILES", {})
    gen = torch.Generator().manual_seed(11)
    for rows, calls in ((37, 3), (70, 2)):
        for _ in range(calls):
            a, w = torch.randn(rows, 64, generator=gen), torch.randn(48, 64, generator=gen) * 64**-0.5
            bias = torch.randn(48, generator=gen)
            out = torch.full((rows, 48), float("nan"))
            G.gemm(a, w, bias, activation="gelu", out=out)
            torch.testing.assert_close(out, gemm_ref(a, w, bias, activation="gelu"), rtol=1e-5, atol=1e-5)
    assert len(tuner.launches) == 2 and len(G._TILES) == 2  # one tuning launch per shape


def test_tma_tiles_can_be_switched_off(monkeypatch):
    """EOMT_FAST_GEMM_TMA=0 (G.TMA_TILES False): on a GPU with TMA (faked) only the pointer tiles are tuned."""
    asked = []

    def tuned_kernel(*flags, restore_out=False, arch=None, tma=False, persistent=False):
        asked.append((tma, persistent))
        return FakeTuner(G.triton.Config(G.INTERPRETER_CONFIG.meta(), num_warps=4, num_stages=1))

    monkeypatch.setattr(G, "_tuned_kernel", tuned_kernel)
    monkeypatch.setattr(G, "gpu_arch", lambda t: G.TMA_MIN_ARCH)
    monkeypatch.setattr(G, "_TILES", {})
    monkeypatch.setattr(G, "TMA_TILES", False)
    a, w = torch.randn(70, 64).half(), (torch.randn(48, 64) * 0.1).half()
    torch.testing.assert_close(G.gemm(a, w), F.linear(a.float(), w.float()).half(), rtol=2e-3, atol=2e-3)
    assert asked == [(False, False)]
    env = {**os.environ, "EOMT_FAST_GEMM_TMA": "0"}
    code = "from eomt_fast.kernels import gemm; print(gemm.TMA_TILES)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.stdout.strip() == "False", result.stderr[-2000:]


class TimedFakeTuner(FakeTuner):
    """A FakeTuner that also reports the median time it measured for its choice, as Triton's configs_timings (set
    by each benchmarking run), and keeps a cache that the launcher must clear; ``error``: its launch raises."""

    def __init__(self, chosen, median_ms, error=None):
        super().__init__(chosen)
        self.median_ms, self.error, self.cache = median_ms, error, {}

    def __getitem__(self, grid):
        launch = super().__getitem__(grid)

        def timed(*args, **meta):
            assert not self.cache, "benchmarked afresh: the autotuner's own cache cleared first"
            if self.error is not None:
                raise self.error
            launch(*args, **meta)
            self.cache["key"] = self.chosen
            self.configs_timings = {self.chosen: [self.median_ms] * 3}
        return timed


@pytest.mark.parametrize("in_place", [False, True], ids=["functional", "in_place"])
@pytest.mark.parametrize("winner", ["pointer", "tma", "persistent"])
def test_tma_tiles_are_timed_against_the_pointer_tiles(monkeypatch, winner, in_place):
    """On a GPU with TMA (faked: sm_90) the launcher runs the three autotuners (pointer tiles, TMA tiles, persistent
    TMA tiles; the last two with descriptors) and keeps the fastest tile by their median times; a later call
    launches it directly (descriptors only for a TMA tile). The result is the chosen tile's either way: when
    another variant ran last on out, the choice runs again."""
    base = G.INTERPRETER_CONFIG.meta()
    tiles = {"pointer": G.triton.Config(base, num_warps=4, num_stages=1),
             "tma": G.triton.Config({**base, "TMA": True}, num_warps=4, num_stages=1),
             "persistent": G.triton.Config({**base, "TMA": True, "PERSISTENT": True}, num_warps=4, num_stages=1)}
    tuners = {(name != "pointer", name == "persistent"): TimedFakeTuner(tile, 0.5 if name == winner else 1.0)
              for name, tile in tiles.items()}
    monkeypatch.setattr(G, "_tuned_kernel", lambda *flags, restore_out=False, arch=None, tma=False, persistent=False:
                        tuners[tma, persistent])
    monkeypatch.setattr(G, "gpu_arch", lambda t: G.TMA_MIN_ARCH)
    monkeypatch.setattr(G, "_TILES", {})
    monkeypatch.setattr(G, "_VARIANT_TIMES", {})
    launched = []
    real_kernel = G._gemm_kernel

    class CountingKernel:  # the direct launches of a chosen tile
        def __getitem__(self, grid):
            def launch(*args, **meta):
                launched.append((meta.get("TMA", False), meta.get("PERSISTENT", False)))
                assert isinstance(args[12], G.TensorDescriptor) == bool(meta.get("TMA"))
                return real_kernel[grid](*args, **meta)
            return launch

    rnd = normal_sampler(torch.Generator().manual_seed(13), torch.float16)
    a, w, bias, scale = rnd(70, 64, mean=0.3), rnd(48, 64, std=64**-0.5), rnd(48, std=0.1), rnd(48, std=0.5)
    residual = rnd(70, 48)
    monkeypatch.setattr(G, "_gemm_kernel", CountingKernel())
    for call in range(2):
        out = residual.clone() if in_place else poison_(torch.empty(70, 48, dtype=torch.float16))
        G.gemm(a, w, bias, scale=scale, residual=out if in_place else residual, out=out)
        exact = gemm_ref(a.double(), w.double(), bias.double(), scale=scale.double(), residual=residual.double())
        assert_close(out, gemm_ref(a, w, bias, scale=scale, residual=residual), exact)
    assert [len(t.launches) for t in tuners.values()] == [1, 1, 1], "each variant tuned once"
    assert [isinstance(t.launches[0][12], G.TensorDescriptor) for t in tuners.values()] == [False, True, True]
    if in_place:  # tuned on scratch outputs, then the winner launched on out
        assert all(t.launches[0][2] is not out for t in tuners.values())
    assert list(G._TILES.values()) == [tiles[winner]]
    # the first call launches the choice again unless out already holds it (the persistent tuner ran last, on out)
    flags = (winner != "pointer", winner == "persistent")
    assert launched == ([] if winner == "persistent" and not in_place else [flags]) + [flags]
    (line,) = G.tuned_tiles()  # what bench/ prints under the timings
    assert line.startswith("gemm M70 N48 K64 float16 sm90") and "tma-ready" in line
    suffix = {"pointer": "", "tma": " TMA", "persistent": " TMA persistent"}[winner]
    times = {name: "0.5" if name.lower() == winner else "1" for name in ("pointer", "TMA", "persistent")}
    suffix += f" (pointer {times['pointer']} ms, TMA {times['TMA']} ms, persistent {times['persistent']} ms)"
    assert line.endswith("-> 64x64x64 w4s1" + suffix) and ("in-place" in line) == in_place


def test_a_failing_tma_variant_is_skipped(monkeypatch):
    """A TMA variant whose tuning raises (on a GPU: every tile out of shared memory, a refused descriptor) is left
    out of the choice and named in tuned_tiles; the pointer tiles' own failure is not hidden."""
    base = G.INTERPRETER_CONFIG.meta()
    pointer = G.triton.Config(base, num_warps=4, num_stages=1)
    tma = G.triton.Config({**base, "TMA": True}, num_warps=4, num_stages=1)
    persistent = G.triton.Config({**base, "TMA": True, "PERSISTENT": True}, num_warps=4, num_stages=1)
    tuners = {(False, False): TimedFakeTuner(pointer, 1.0),
              (True, False): TimedFakeTuner(tma, 0.1, error=RuntimeError("out of resources")),
              (True, True): TimedFakeTuner(persistent, 2.0)}
    monkeypatch.setattr(G, "_tuned_kernel", lambda *flags, restore_out=False, arch=None, tma=False, persistent=False:
                        tuners[tma, persistent])
    monkeypatch.setattr(G, "gpu_arch", lambda t: G.TMA_MIN_ARCH)
    monkeypatch.setattr(G, "_TILES", {})
    monkeypatch.setattr(G, "_VARIANT_TIMES", {})
    a, w = torch.randn(70, 64).half(), (torch.randn(48, 64) * 0.1).half()
    out = poison_(torch.empty(70, 48, dtype=torch.float16))
    G.gemm(a, w, out=out)
    torch.testing.assert_close(out, F.linear(a.float(), w.float()).half(), rtol=2e-3, atol=2e-3)
    assert list(G._TILES.values()) == [pointer]
    (line,) = G.tuned_tiles()
    assert line.endswith("-> 64x64x64 w4s1 (pointer 1 ms, TMA failed (RuntimeError), persistent 2 ms)")
    tuners[False, False] = TimedFakeTuner(pointer, 1.0, error=ValueError("pointer tiles broken"))
    with pytest.raises(ValueError, match="pointer tiles broken"):
        G.gemm(torch.randn(30, 64).half(), w)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_layernorm_rows_of_a_token_buffer_slice(dtype):
    _, body, _ = token_layer_case(dtype, seed=6)
    w, b = torch.randn(48).to(dtype), torch.randn(48).to(dtype)
    out = G.layernorm(body, w, b, 1e-6)
    assert out.shape == (3 * 37, 48)
    flat = body.reshape(-1, 48)
    assert_close(out, F.layer_norm(flat, (48,), w, b, 1e-6), F.layer_norm(flat.double(), (48,), w.double(), b.double(),
                                                                            1e-6))
    mean, rstd = G.row_stats(body, 1e-6)
    torch.testing.assert_close(mean.double(), flat.double().mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), (flat.double().var(1, unbiased=False) + 1e-6).rsqrt(), rtol=1e-4,
                               atol=1e-4)


def test_gemm_empty_and_invalid():
    a, w = torch.randn(0, 32).half(), torch.randn(16, 32).half()
    assert G.gemm(a, w).shape == (0, 16)
    with pytest.raises(TypeError):
        G.gemm(torch.randn(4, 32), w)  # dtypes differ
    with pytest.raises(ValueError):
        G.gemm(torch.randn(4, 31).half(), w)  # K differs
    with pytest.raises(ValueError):
        G.gemm(torch.randn(4, 32).half(), torch.randn(15, 32).half(), glu=True)  # odd [gate | up]
    with pytest.raises(ValueError):
        G.gemm(torch.randn(4, 32).half(), w, out=torch.empty(4, 15).half())
    x = torch.randn(4, 16).half()
    with pytest.raises(ValueError):
        G.gemm(x, torch.randn(16, 16).half(), residual=x, out=x)  # out aliases an input
    meta = dict(device="meta", dtype=torch.float16)
    for name, kwargs in [("weight", {}), ("bias", {"bias": torch.empty(16, **meta)}),
                         ("scale", {"scale": torch.empty(16, **meta)}),
                         ("residual", {"residual": torch.empty(4, 16, **meta)}),
                         ("out", {"out": torch.empty(4, 16, **meta)}),
                         ("ln_weight", {"ln": (torch.empty(32, **meta), torch.ones(32).half(), 1e-6)})]:
        weight = torch.empty(16, 32, **meta) if name == "weight" else w
        with pytest.raises(ValueError, match=f"a is on cpu but {name} on meta"):  # before any launch
            G.gemm(torch.randn(4, 32).half(), weight, **kwargs)


AOT_SCRIPT = """
import sys
from concurrent.futures import ProcessPoolExecutor
from eomt_fast.aot import all_specs, compile_spec

NAMES = ("gemm", "layernorm", "out_projection", "mask_head")


def compile_one(index):
    return compile_spec(all_specs()[index], 90).line()


if __name__ == "__main__":
    indices = [i for i, spec in enumerate(all_specs()) if spec.name.startswith(NAMES)]
    assert indices
    with ProcessPoolExecutor(max_workers=int(sys.argv[1])) as pool:
        for line in pool.map(compile_one, indices):
            print(line)
"""


def test_aot_specs_compile_for_sm90(tmp_path):
    """Every AOT spec of the GEMM ops compiles for sm_90: wgmma where needed, no spills. In a subprocess:
    under TRITON_INTERPRET the kernels are interpreter functions, not compilable ones."""
    script = tmp_path / "aot_sm90.py"
    script.write_text(AOT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    result = subprocess.run([sys.executable, str(script), workers], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    bad = [line for line in lines if not line.rstrip().endswith(" ok")]
    assert not bad, "\n".join(bad)
    assert sum("wgmma yes" in line for line in lines) >= 40, "the 16-bit GEMMs must use wgmma"
    assert sum("_tma " in line and "tma yes" in line for line in lines) >= 30, "the TMA tiles must use TMA copies"


# ---- GPU: EoMT-L shapes, every autotune configuration ---------------------------------------------

GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
REAL_CASES = [  # (M, K, N, flags): QKV, out-projection, fc1, fc2, SwiGLU fc1 of EoMT-L/g at batch 1 and 8
    *((1805, 1024, 3072, dict(ln=mode)) for mode in G.LN_MODES),
    (1805, 1024, 1024, dict(scale=True, residual=True)),
    *((8 * 1805, 1024, 4096, dict(activation="gelu", ln=mode)) for mode in G.LN_MODES),
    (8 * 1805, 4096, 1024, dict(scale=True, residual=True)),
    *((1805, 1536, 4096, dict(glu=True, activation="silu", ln=mode)) for mode in G.LN_MODES),
    (200, 1024, 1024, dict(activation="gelu")),  # the mask head at batch 1
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", REAL_CASES, ids=case_id)
def test_gemm_real_shapes_gpu(case, dtype):
    m, k, n, flags = case
    check_gemm(m, k, n, dtype, {"bias": True, **flags}, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_gemm_in_place_token_buffer_gpu(dtype):
    """EoMT-L's first layers at batch 2: fc2 (K 4096) adds into the (2, 1605, 1024) slice of the (2, 1805, 1024)
    token buffer in place, at an M the autotuner has not seen (it benchmarks every config on a scratch output,
    then the winner runs once on out: a benchmark run on out would add the residual once per run)."""
    g = torch.Generator().manual_seed(7)
    rnd = normal_sampler(g, dtype, "cuda")
    tokens = poison_(torch.empty(2, 1805, 1024, dtype=dtype, device="cuda"))
    body = tokens[:, 200:]
    body.copy_(rnd(2, 1605, 1024))
    a, w, bias, scale = rnd(2 * 1605, 4096), rnd(1024, 4096, std=4096**-0.5), rnd(1024, std=0.1), rnd(1024, std=0.5)
    residual = body.clone()
    G.gemm(a, w, bias, scale=scale, residual=body, out=body)
    assert torch.isnan(tokens[:, :200]).all()
    flat = residual.reshape(-1, 1024)
    exact = gemm_ref(a.double(), w.double(), bias.double(), scale=scale.double(), residual=flat.double())
    assert_close(body.reshape(-1, 1024), gemm_ref(a, w, bias, scale=scale, residual=flat), exact)


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_gemm_split_k_gpu(dtype, split_k):
    check_gemm(1805, 4096, 1024, dtype, dict(bias=True, scale=True, residual=True), device="cuda", split_k=split_k)
    check_gemm(200, 1024, 1024, dtype, dict(bias=True, glu=True, activation="silu"), device="cuda", split_k=split_k)


def _config_cases():
    cases = []
    for glu in (False, True):
        for prologue in (False, True):
            for fp32 in (False, True):
                tma = [] if prologue or fp32 else [*G.gemm_configs(glu, tma=True),  # the TMA tiles (sm_90+)
                                                   *G.gemm_configs(glu, tma=True, persistent=True)]
                for c in [*G.gemm_configs(glu, prologue, fp32), *tma]:
                    flags = f"{'fp32' if fp32 else 'bf16'}{'-glu' if glu else ''}{'-prologue' if prologue else ''}"
                    tile = f"{c.block_m}x{c.block_n}x{c.block_k}-w{c.num_warps}s{c.num_stages}-sub{c.epilogue_subtiles}"
                    tile += ("-tma" if c.tma else "") + ("-persistent" if c.persistent else "")
                    label = f"{flags}-{tile}"
                    cases.append(pytest.param(glu, prologue, fp32, c, id=label))
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("glu,prologue,fp32,config", _config_cases())
def test_every_autotune_config_gpu(glu, prologue, fp32, config):
    """Each entry of the autotune lists computes the right thing (the autotuner may pick any), at N not a
    multiple of the tile and an M of EoMT-L at batch 1 (the TMA tiles on a GPU with TMA)."""
    if config.tma and torch.cuda.get_device_capability() < G.TMA_MIN_ARCH:
        pytest.skip("TMA tiles run from sm_90")
    flags = dict(bias=True, ln="prologue" if prologue else False, scale=True, residual=True)
    if glu:
        flags.update(glu=True, activation="silu")
    dtype = torch.float32 if fp32 else torch.bfloat16
    check_gemm(1805, 1024, 1000 if glu else 1040, dtype, flags, device="cuda", config=config)
