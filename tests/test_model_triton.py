"""The whole model on the Triton kernels (the interpreter on a CPU) against its plain-PyTorch path."""

import pytest
import torch

from eomt_fast import EomtFastConfig, EomtFastForUniversalSegmentation, dispatch
from eomt_fast.testing import TEST_CONFIGS

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or dispatch.triton_interpreting()),
    reason="needs CUDA or TRITON_INTERPRET=1",
)

OUTPUTS = ("masks_queries_logits", "class_queries_logits", "last_hidden_state")

# (config, attn_mask_probs, batch): masking off and on, the reuse quirk, SwiGLU, registers 0, 1 upscale block,
# hidden_act SiLU
CASES = [
    ("hf_tiny", [0.0], 2),
    ("hf_tiny", [1.0], 1),
    ("r0_swiglu", [1.0, 0.0, 1.0], 1),
    ("hd64_up1", [1.0], 2),
    ("silu_r2", [1.0, 0.0], 1),
]


def model_pair(name, probs, dtype):
    config = EomtFastConfig.from_dict(dict(TEST_CONFIGS[name], model_type="eomt"))
    torch.manual_seed(len(name))
    plain = EomtFastForUniversalSegmentation(config, backend="torch").to(dtype)
    plain.attn_mask_probs.copy_(torch.tensor(probs))
    kernels = EomtFastForUniversalSegmentation(config, backend="triton").to(dtype)
    kernels.load_state_dict(plain.state_dict())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return plain.to(device), kernels.to(device)


@pytest.mark.parametrize(("name", "probs", "batch"), CASES, ids=[f"{n}-p{'_'.join(map(str, p))}-B{b}" for n, p, b in CASES])
def test_triton_backend_matches_plain_path_fp32(name, probs, batch):
    plain, kernels = model_pair(name, probs, torch.float32)
    assert all(p.impl == "triton" for p in kernels.op_paths())
    x = torch.randn(batch, 3, plain.config.image_size, plain.config.image_size, device=plain.device)
    expected = plain(x, output_hidden_states=True, output_attentions=True)
    got = kernels(x, output_hidden_states=True, output_attentions=True)
    pairs = [(field, getattr(got, field), getattr(expected, field)) for field in OUTPUTS]
    pairs += [(f"hidden_states[{i}]", a, b) for i, (a, b) in enumerate(zip(got.hidden_states, expected.hidden_states))]
    pairs += [(f"attentions[{i}]", a, b) for i, (a, b) in enumerate(zip(got.attentions, expected.attentions))]
    assert len(pairs) == len(OUTPUTS) + 2 * plain.config.num_hidden_layers + 1
    for field, a, b in pairs:
        assert a.shape == b.shape and a.dtype == b.dtype
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < 1e-4, f"{field}: relative error {err:.3g}"


def test_triton_backend_fp16_within_twice_the_plain_path_error():
    """fp16 on the kernels against an fp64 plain model: at most twice the fp16 plain path's own error."""
    plain64, _ = model_pair("hf_tiny", [1.0], torch.float64)
    plain16, kernels16 = model_pair("hf_tiny", [1.0], torch.float16)
    x = torch.randn(2, 3, 40, 40, device=plain64.device)
    truth = plain64(x.double())
    ours, theirs = kernels16(x.half()), plain16(x.half())
    for field in OUTPUTS:
        ref = getattr(truth, field)
        our_err = (getattr(ours, field).double() - ref).abs().mean().item()
        their_err = (getattr(theirs, field).double() - ref).abs().mean().item()
        assert our_err <= 2 * their_err + 1e-4, f"{field}: {our_err:.3g} vs {their_err:.3g}"


# ---- the token buffer: one per forward, every row written before it is read, nothing else copied -----------

def token_buffer_calls(model, x):
    """The ATen and eomt_fast ops the forward calls itself (the Triton ops are opaque custom ops here)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append((str(func), args))
            return func(*args, **(kwargs or {}))

    with Log() as log:
        model(x)
    return log.calls


@pytest.mark.parametrize("probs", [[0.0, 0.0], [1.0, 0.0]], ids=["unmasked", "masked"])
def test_forward_runs_the_ops_in_one_token_buffer(probs):
    """Issue #7: on the kernels, the forward allocates one (B, S, C) token buffer, writes CLS, registers and
    queries into it (three broadcast copies), never concatenates, and updates the residual stream with the
    mutating ops (patch_embed_into, out_projection_into, layernorm_mlp_into)."""
    _, model = model_pair("small_r4", probs, torch.float32)
    cfg = model.config
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size, device=model.device)
    model(x)
    calls = token_buffer_calls(model, x)
    names = [name for name, _ in calls]
    seq = cfg.num_queries + cfg.num_prefix_tokens + cfg.num_patches
    assert not [n for n in names if "cat" in n.split(".")[1]]
    buffers = [args for name, args in calls if name == "aten.empty.memory_format"]
    assert [list(args[0]) for args in buffers] == [[2, seq, cfg.hidden_size]]
    copies = [args for name, args in calls if name == "aten.copy_.default"]
    c = cfg.hidden_size  # CLS, registers, queries
    assert [tuple(dst.shape) for dst, _ in copies] == [(2, c), (2, cfg.num_register_tokens, c), (2, cfg.num_queries, c)]
    for op, count in (("patch_embed_into", 1), ("out_projection_into", cfg.num_hidden_layers),
                      ("layernorm_mlp_into", cfg.num_hidden_layers)):
        assert names.count(f"eomt_fast.{op}.default") == count, op


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("name", "probs"), [("small_r4", [1.0, 0.0]), ("r0_swiglu", [1.0, 0.0, 1.0])],
                         ids=["small_r4", "r0_swiglu-all_query_layers"])
def test_token_buffer_rows_are_written_before_they_are_read(monkeypatch, backend, name, probs):
    """The token buffer poisoned with NaN: the outputs are finite and bit for bit those of an unpoisoned run, so
    no row is read before it is written (r0_swiglu: no registers, queries from the first layer on). The
    caller's pixel_values are left alone."""
    plain, kernels = model_pair(name, probs, torch.float32)
    model = kernels if backend == "triton" else plain
    x = torch.randn(2, 3, model.config.image_size, model.config.image_size, device=model.device)
    before = x.clone()
    expected = model(x)
    allocate = EomtFastForUniversalSegmentation._token_buffer
    monkeypatch.setattr(EomtFastForUniversalSegmentation, "_token_buffer",
                        lambda self, batch: allocate(self, batch).fill_(float("nan")))
    got = model(x)
    assert torch.equal(x, before)
    for field in OUTPUTS:
        assert torch.isfinite(getattr(got, field)).all(), field
        assert torch.equal(getattr(got, field), getattr(expected, field)), field


# (backend, two image sizes): the plain path at sizes where PyTorch's CPU flash attention has reached its
# fixed blocks (below about 768 tokens its per-thread buffers grow with its block size); the kernels
# under the interpreter at small sizes (73 and 265 tokens)
@pytest.mark.parametrize(("backend", "sizes"), [("triton", (32, 64)), ("torch", (128, 256))],
                         ids=["triton-S73-S265", "torch-S1033-S4105"])
def test_no_intermediate_grows_with_the_square_of_the_sequence(backend, sizes):
    """Issue #7, memory: the largest single allocation of a masked forward (the torch profiler sees every one,
    inside the ops too) grows like the sequence, and stays well under one head's S x S attention matrix."""
    def largest(image: int) -> tuple[int, int]:
        config = EomtFastConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=2, num_blocks=1,
                                image_size=image, patch_size=4, num_queries=6, num_register_tokens=2,
                                num_upscale_blocks=1)
        model = EomtFastForUniversalSegmentation(config, backend=backend)  # attn_mask_probs ones: masking on
        x = torch.randn(1, 3, image, image)
        with torch.profiler.profile(profile_memory=True) as prof:
            model(x)
        seq = config.num_queries + config.num_prefix_tokens + config.num_patches
        return seq, max(e.self_cpu_memory_usage for e in prof.events())

    small_seq, small = largest(sizes[0])
    seq, big = largest(sizes[1])
    assert big / small < 1.5 * seq / small_seq, (small, big)  # S^2 would be about 4x more
    assert big < seq * seq * 4 / 2, (big, seq)  # half of one head's fp32 S x S scores
