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

# (config, attn_mask_probs, batch): masking off and on, the reuse quirk, SwiGLU, registers 0, 1 upscale block
CASES = [
    ("hf_tiny", [0.0], 2),
    ("hf_tiny", [1.0], 1),
    ("r0_swiglu", [1.0, 0.0, 1.0], 1),
    ("hd64_up1", [1.0], 2),
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
    expected, got = plain(x), kernels(x)
    for field in OUTPUTS:
        a, b = getattr(got, field), getattr(expected, field)
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
