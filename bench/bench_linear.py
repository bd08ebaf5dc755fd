"""The projection GEMMs with their prologues/epilogues at real EoMT shapes: ``layernorm_qkv`` (LN1 + fused
QKV, 1805 x 1024 -> 3072 for EoMT-L/640), ``out_projection`` (GEMM + bias + LayerScale + residual),
``mask_head`` (three 1024 x 1024 layers on the 200 queries) and ``patch_embed`` (the patch GEMM + bias +
position embedding).

Implementations: each op's reference in eager mode, under torch.compile (max-autotune on a GPU), and its
Triton kernel when ``eomt_fast.dispatch.triton_ops()`` has one and CUDA is present.

    python bench/bench_linear.py            # GPU: every shape below
    python bench/bench_linear.py --quick    # CPU: small shapes (seconds)
"""

from __future__ import annotations

import sys

import harness

FULL = [("eomt-l-640", 1), ("eomt-l-640", 8), ("eomt-s-640", 1), ("eomt-b-640", 1), ("eomt-g-640", 1),
        ("eomt-l-1280", 1)]
QUICK = [("quick", 1)]
QUICK_DIMS = dict(C=256, S=455, Q=50, g=20, P=400, eps=1e-6)
PATCH = 16  # every released EoMT


def cases(quick: bool) -> list[harness.KernelCase]:
    out = []
    for preset, batch in QUICK if quick else FULL:
        d = QUICK_DIMS if preset == "quick" else harness.eomt_dims(preset)
        c, seq, q, g = d["C"], d["S"], d["Q"], d["g"]

        def layernorm_qkv(device, dtype, gen, c=c, seq=seq, batch=batch, eps=d["eps"]):
            x = harness.randn(batch, seq, c, device=device, dtype=dtype, gen=gen)
            ln_w = harness.randn(c, device=device, dtype=dtype, gen=gen, mean=1.0, std=0.1)
            ln_b = harness.randn(c, device=device, dtype=dtype, gen=gen, std=0.02)
            return (x, ln_w, ln_b, eps, *harness.linear_weights(3 * c, c, device, dtype, gen))

        def out_projection(device, dtype, gen, c=c, seq=seq, batch=batch):
            x = harness.randn(batch, seq, c, device=device, dtype=dtype, gen=gen)
            w, b = harness.linear_weights(c, c, device, dtype, gen)
            scale = harness.randn(c, device=device, dtype=dtype, gen=gen, mean=1.0, std=0.1)
            return (x, w, b, scale, harness.randn(batch, seq, c, device=device, dtype=dtype, gen=gen))

        def mask_head(device, dtype, gen, c=c, q=q, batch=batch):
            x = harness.randn(batch, q, c, device=device, dtype=dtype, gen=gen)
            return (x, *[t for _ in range(3) for t in harness.linear_weights(c, c, device, dtype, gen)])

        def patch_embed(device, dtype, gen, c=c, g=g, batch=batch):
            pixels = harness.randn(batch, 3, g * PATCH, g * PATCH, device=device, dtype=dtype, gen=gen)
            w, b = harness.linear_weights(c, 3 * PATCH * PATCH, device, dtype, gen)
            return (pixels, w, b, harness.randn(g * g, c, device=device, dtype=dtype, gen=gen), PATCH)

        rows, k_patch = batch * seq, 3 * PATCH * PATCH
        common = dict(model=preset, batch=batch, masking=False)
        out += [
            harness.KernelCase(op="layernorm_qkv", shape=f"B{batch}-S{seq}-C{c}-N{3 * c}",
                               flops=harness.linear_flops(rows, c, 3 * c), elements=rows * 4 * c + 3 * c * c,
                               make_args=layernorm_qkv, **common),
            harness.KernelCase(op="out_projection", shape=f"B{batch}-S{seq}-C{c}-N{c}",
                               flops=harness.linear_flops(rows, c, c), elements=3 * rows * c + c * c,
                               make_args=out_projection, **common),
            harness.KernelCase(op="mask_head", shape=f"B{batch}-Q{q}-C{c}x3",
                               flops=3 * harness.linear_flops(batch * q, c, c), elements=2 * batch * q * c + 3 * c * c,
                               make_args=mask_head, **common),
            harness.KernelCase(op="patch_embed", shape=f"B{batch}-P{g * g}-K{k_patch}-C{c}",
                               flops=harness.linear_flops(batch * g * g, k_patch, c),
                               elements=batch * g * g * (k_patch + c) + k_patch * c + g * g * c,
                               make_args=patch_embed, **common),
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    args = harness.kernel_arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    return harness.run_kernel_benchmark(cases(args.quick), args)


if __name__ == "__main__":
    sys.exit(main())
