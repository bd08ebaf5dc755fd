"""The mask side of predict() at real EoMT shapes: ``mask_logits`` (the final einsum, 200 queries x 1024
channels x 160 x 160 pixels for EoMT-L/640) and ``grid_attention_mask`` (the boolean query->patch mask of a
masked layer, computed at grid resolution).

Implementations: each op's reference in eager mode, under torch.compile (max-autotune on a GPU), the Triton
kernel when ``eomt_fast.dispatch.triton_ops()`` has one and CUDA is present, and for the grid mask the path
transformers takes from these two inputs (full-resolution einsum, bilinear resize to the grid, a (B, S, S)
boolean mask, expanded to the heads as the dense (B, heads, S, S) float mask). The whole mask side (mask head
and upscale blocks included) is in bench_predict.py: the final predict() and a masked layer's mask.

    python bench/bench_mask_logits.py            # GPU: every shape below
    python bench/bench_mask_logits.py --quick    # CPU: small shapes (seconds)
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import harness

FULL = [("eomt-l-640", 1), ("eomt-l-640", 8), ("eomt-s-640", 1), ("eomt-b-640", 1), ("eomt-g-640", 1),
        ("eomt-l-1280", 1)]
QUICK = [("quick", 1)]
QUICK_DIMS = dict(C=256, H=4, Q=50, g=20, side=80, prefix=5, P=400, S=455)


def transformers_path(mask_embeddings, pixel_embeddings, grid_size, prefix=5, heads=16):
    """transformers' masked-layer mask from the mask and pixel embeddings: einsum at full resolution,
    bilinear resize to (g, g), > 0, written into a (B, S, S) boolean mask, expanded to (B, heads, S, S) and
    made the additive float mask (+1 / -1e9), as EomtForUniversalSegmentation.forward builds it; returns the
    query->patch block (read from the float mask) so that the result can be checked against the reference."""
    batch, queries = mask_embeddings.shape[:2]
    logits = torch.einsum("bqc,bhwc->bqhw", mask_embeddings, pixel_embeddings)
    small = F.interpolate(logits, size=(grid_size, grid_size), mode="bilinear").flatten(2) > 0
    seq = queries + prefix + grid_size * grid_size
    dense = torch.ones(batch, seq, seq, dtype=torch.bool, device=logits.device)
    dense[:, :queries, queries + prefix:] = small
    dense = dense[:, None].expand(-1, heads, -1, -1)
    additive = dense.float().masked_fill(~dense, -1e9)
    return additive[:, 0, :queries, queries + prefix:] > 0


def cases(quick: bool) -> list[harness.KernelCase]:
    out = []
    for preset, batch in QUICK if quick else FULL:
        d = QUICK_DIMS if preset == "quick" else harness.eomt_dims(preset)
        c, q, g, side = d["C"], d["Q"], d["g"], d["side"]

        def make_embeddings(device, dtype, gen, c=c, q=q, side=side, batch=batch):
            mask_embeddings = harness.randn(batch, q, c, device=device, dtype=dtype, gen=gen)
            pixel_embeddings = harness.randn(batch, side, side, c, device=device, dtype=dtype, gen=gen)
            return mask_embeddings, pixel_embeddings

        def grid_args(device, dtype, gen, g=g, make=make_embeddings):
            return (*make(device, dtype, gen), g)

        common = dict(model=preset, batch=batch, masking=False)
        out += [
            harness.KernelCase(op="mask_logits", shape=f"B{batch}-Q{q}-C{c}-{side}x{side}",
                               flops=harness.linear_flops(batch * q, c, side * side),
                               elements=batch * (q * c + side * side * c + q * side * side),
                               make_args=make_embeddings, **common),
            harness.KernelCase(op="grid_attention_mask", shape=f"B{batch}-Q{q}-C{c}-{side}x{side}->{g}x{g}",
                               flops=harness.linear_flops(batch * q, c, g * g),
                               elements=batch * (q * c + side * side * c), extra_bytes=batch * q * g * g,
                               make_args=grid_args, masking=True,
                               extra_impls={"transformers-path": lambda m, p, grid, prefix=d["prefix"], heads=d["H"]:
                                            transformers_path(m, p, grid, prefix, heads)},
                               **{k: v for k, v in common.items() if k != "masking"}),
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    args = harness.kernel_arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    return harness.run_kernel_benchmark(cases(args.quick), args)


if __name__ == "__main__":
    sys.exit(main())
