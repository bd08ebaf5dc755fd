"""The LayerNorm-MLP sublayer (ops ``layernorm_mlp`` and, for ViT-g, ``layernorm_swiglu``) at real EoMT shapes:
x + fc2(GELU(fc1(LN(x)))) * ls, e.g. 1805 x 1024 -> 4096 -> 1024 for EoMT-L/640.

Implementations: the reference in eager mode, under torch.compile (max-autotune on a GPU), and the Triton
kernel when ``eomt_fast.dispatch.triton_ops()`` has one and CUDA is present.

    python bench/bench_layernorm_mlp.py            # GPU: every shape below
    python bench/bench_layernorm_mlp.py --quick    # CPU: a small shape (seconds)
"""

from __future__ import annotations

import sys

import harness

# (preset, batch, tokens): "S" = the query layers' sequence, "S0" = the layers before the queries
FULL = [("eomt-l-640", 1, "S"), ("eomt-l-640", 1, "S0"), ("eomt-l-640", 8, "S"), ("eomt-s-640", 1, "S"),
        ("eomt-b-640", 1, "S"), ("eomt-g-640", 1, "S"), ("eomt-l-1280", 1, "S")]
QUICK = [("quick", 1, "S")]
QUICK_DIMS = dict(C=256, hidden=1024, S=455, S0=405, swiglu=0, eps=1e-6)


def cases(quick: bool) -> list[harness.KernelCase]:
    out = []
    for preset, batch, tokens in QUICK if quick else FULL:
        d = QUICK_DIMS if preset == "quick" else harness.eomt_dims(preset)
        seq, c, hidden, swiglu = d[tokens], d["C"], d["hidden"], bool(d["swiglu"])
        fc1_rows = 2 * hidden if swiglu else hidden

        def make_args(device, dtype, gen, seq=seq, c=c, hidden=hidden, fc1_rows=fc1_rows, batch=batch, eps=d["eps"]):
            x = harness.randn(batch, seq, c, device=device, dtype=dtype, gen=gen)
            ln_w = harness.randn(c, device=device, dtype=dtype, gen=gen, mean=1.0, std=0.1)
            ln_b = harness.randn(c, device=device, dtype=dtype, gen=gen, std=0.02)
            fc1_w, fc1_b = harness.linear_weights(fc1_rows, c, device, dtype, gen)
            fc2_w, fc2_b = harness.linear_weights(c, hidden, device, dtype, gen)
            scale = harness.randn(c, device=device, dtype=dtype, gen=gen, mean=1.0, std=0.1)
            return (x, ln_w, ln_b, eps, fc1_w, fc1_b, fc2_w, fc2_b, scale)

        rows = batch * seq
        out.append(harness.KernelCase(
            op="layernorm_swiglu" if swiglu else "layernorm_mlp", model=preset,
            shape=f"B{batch}-S{seq}-C{c}-{'2x' if swiglu else ''}{hidden}", batch=batch, masking=False,
            flops=harness.linear_flops(rows, c, fc1_rows) + harness.linear_flops(rows, hidden, c),
            elements=2 * rows * c + fc1_rows * c + hidden * c, make_args=make_args))
    return out


def main(argv: list[str] | None = None) -> int:
    args = harness.kernel_arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    return harness.run_kernel_benchmark(cases(args.quick), args)


if __name__ == "__main__":
    sys.exit(main())
