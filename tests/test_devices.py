"""Every Triton launcher refuses a tensor on another device than its first input, naming it, before any
launch: a kernel handed another GPU's pointer reads it across the bus, or faults and loses the CUDA context.
Here a ``meta`` tensor stands for the other device (the checks compare devices only); the rest are on the
test device (CUDA where there is one, else the CPU with Triton's interpreter)."""

import pytest
import torch

from eomt_fast.kernels.attention import masked_attention_fwd
from eomt_fast.kernels.mask_logits import grid_attention_mask_forward
from eomt_fast.kernels.patch_embed import patch_embed_forward
from eomt_fast.kernels.upscale import upscale_block_forward

F16 = torch.float16


def on_meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


def moved(args: dict, device) -> dict:
    """The arguments (built on the CPU) on ``device``: the test device, CUDA where there is one."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def patch_embed_args(device):
    return moved(dict(pixel_values=torch.randn(1, 3, 32, 32).to(F16), weight=torch.randn(32, 3 * 16 * 16).to(F16),
                      bias=torch.randn(32).to(F16), position_embeddings=torch.randn(4, 32).to(F16), patch_size=16,
                      out=torch.empty(1, 4, 32, dtype=F16)), device)


def upscale_args(device):
    c = 16
    return moved(dict(x=torch.randn(1, 2, 2, c).to(F16), convt_weight=torch.randn(2, 2, c, c).to(F16),
                      convt_bias=torch.randn(c).to(F16), dw_weight=torch.randn(c, 1, 3, 3).to(F16),
                      ln_weight=torch.randn(c).to(F16), ln_bias=torch.randn(c).to(F16), eps=1e-6,
                      out=torch.empty(1, 4, 4, c, dtype=F16)), device)


def grid_mask_args(device):
    return moved(dict(mask_embeddings=torch.randn(1, 3, 16).to(F16), pixel_embeddings=torch.randn(1, 8, 8, 16).to(F16),
                      grid_size=2, out=torch.empty(1, 3, 4, dtype=torch.bool)), device)


def attention_args(device):
    return moved(dict(qkv=torch.randn(1, 8, 3 * 32).to(F16), num_heads=2, out=torch.empty(1, 8, 32, dtype=F16)),
                 device)


CASES = {
    "patch_embed": (patch_embed_forward, patch_embed_args, "pixel_values",
                    ["weight", "bias", "position_embeddings", "out"]),
    "upscale": (upscale_block_forward, upscale_args, "x",
                ["convt_weight", "convt_bias", "dw_weight", "ln_weight", "ln_bias", "out"]),
    "grid_mask": (grid_attention_mask_forward, grid_mask_args, "mask_embeddings", ["pixel_embeddings", "out"]),
    "attention": (masked_attention_fwd, attention_args, "qkv", ["out"]),
}
PAIRS = [(op, other) for op, (_, _, _, others) in CASES.items() for other in others]


@pytest.mark.parametrize(("op", "other"), PAIRS, ids=[f"{op}-{other}" for op, other in PAIRS])
def test_a_tensor_on_another_device_is_refused(op, other, device):
    launcher, make_args, first, _ = CASES[op]
    args = make_args(device)
    args[other] = on_meta(args[other])
    with pytest.raises(ValueError, match=f"{first} is on {args[first].device} but {other} on meta"):
        launcher(**args)


@pytest.mark.parametrize("op", list(CASES))
def test_the_same_arguments_on_one_device_run(op, device):
    """The arguments above are valid: only the moved tensor makes a case fail (interpreter on the CPU)."""
    launcher, make_args, _, _ = CASES[op]
    args = make_args(device)
    out = args["out"].fill_(True) if args["out"].dtype == torch.bool else args["out"].fill_(float("nan"))
    result = launcher(**args)
    assert result is out or result.data_ptr() == out.data_ptr()
    if out.is_floating_point():
        assert not out.isnan().any()
