"""Masked query-patch attention (op ``attention``) at real EoMT shapes.

Implementations: the reference (``attention_ref``, SDPA with the compact (B, Q, P) mask) in eager mode and
under torch.compile; the reference forced onto each ``F.scaled_dot_product_attention`` backend; the
dense-mask path transformers takes (a (B, 1, S, S) float mask, +1 allowed / -1e9 blocked); and the Triton
kernel when ``eomt_fast.dispatch.triton_ops()`` has one and CUDA is present.

    python bench/bench_attention.py            # GPU: every shape below
    python bench/bench_attention.py --quick    # CPU: small shapes (seconds)
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import harness
from eomt_fast.kernels import attention_ref

# (preset, batch, layer kind): "query" layers carry the queries (S tokens, maskable), "early" ones do not (S0)
FULL = [("eomt-l-640", 1, "query"), ("eomt-l-640", 1, "early"), ("eomt-l-640", 8, "query"),
        ("eomt-s-640", 1, "query"), ("eomt-b-640", 1, "query"), ("eomt-g-640", 1, "query"),
        ("eomt-l-1280", 1, "query")]
QUICK = [("quick", 1, "query")]  # 1 x 4 heads x 455 tokens x 64: small enough for a CPU
QUICK_DIMS = dict(C=256, H=4, D=64, Q=50, prefix=5, g=20, P=400, S0=405, S=455)


def sdpa_backend(backend: SDPBackend):
    def attention(qkv, num_heads, query_patch_mask=None, patch_start=None):
        with sdpa_kernel([backend]):
            return attention_ref(qkv, num_heads, query_patch_mask, patch_start)

    return attention


def dense_mask_attention(qkv, num_heads, query_patch_mask=None, patch_start=None):
    """What transformers does in a masked layer: an (S, S) float mask per image, every row through one SDPA."""
    batch, seq, three_c = qkv.shape
    head_dim = three_c // 3 // num_heads
    q, k, v = qkv.unflatten(-1, (3, num_heads, head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
    mask = None
    if query_patch_mask is not None:
        allowed = torch.ones(batch, seq, seq, dtype=torch.bool, device=qkv.device)
        allowed[:, : query_patch_mask.shape[1], patch_start:] = query_patch_mask
        mask = allowed[:, None].float().masked_fill(~allowed[:, None], -1e9).to(qkv.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=head_dim**-0.5)
    return out.transpose(1, 2).reshape(batch, seq, three_c // 3)


def cases(quick: bool, device: torch.device) -> list[harness.KernelCase]:
    backends = [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]
    if device.type == "cuda":
        backends += [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    out = []
    for preset, batch, kind in QUICK if quick else FULL:
        d = QUICK_DIMS if preset == "quick" else harness.eomt_dims(preset)
        seq = d["S"] if kind == "query" else d["S0"]
        for masking in ((False, True) if kind == "query" else (False,)):
            def make_args(device, dtype, gen, d=d, seq=seq, masking=masking, batch=batch, kind=kind):
                qkv = harness.randn(batch, seq, 3 * d["C"], device=device, dtype=dtype, gen=gen)
                if not masking:
                    return (qkv, d["H"], None, None)
                mask = harness.random_query_patch_mask(batch, d["Q"], d["g"], device, gen)
                return (qkv, d["H"], mask, d["Q"] + d["prefix"])

            extra = {f"sdpa-{b.name.lower().replace('_attention', '')}": sdpa_backend(b) for b in backends}
            if masking:
                extra["sdpa-dense-mask (transformers)"] = dense_mask_attention
            out.append(harness.KernelCase(
                op="attention", model=preset, shape=f"B{batch}-H{d['H']}-S{seq}-D{d['D']}", batch=batch,
                masking=masking, flops=harness.attention_flops(batch, seq, seq, d["C"]),
                elements=batch * seq * 4 * d["C"], extra_bytes=batch * d["Q"] * d["P"] if masking else 0,
                make_args=make_args, extra_impls=extra))
    return out


def main(argv: list[str] | None = None) -> int:
    args = harness.kernel_arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return harness.run_kernel_benchmark(cases(args.quick, device), args)


if __name__ == "__main__":
    sys.exit(main())
