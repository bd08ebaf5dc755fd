"""One upscale block of predict() (op ``upscale``: ConvTranspose 2x2 as a GEMM C -> 4C per pixel, GELU,
depthwise 3x3, LayerNorm) at real EoMT shapes: for EoMT-L/640, 40x40 -> 80x80 and 80x80 -> 160x160 at
1024 channels, 67 of the 79 GFLOP of predict(), run once more in every masked layer.

Implementations: the reference in eager mode, under torch.compile (max-autotune on a GPU), and the Triton
kernel when ``eomt_fast.dispatch.triton_ops()`` has one and CUDA is present.

    python bench/bench_upscale.py            # GPU: every shape below
    python bench/bench_upscale.py --quick    # CPU: a small shape (seconds)
"""

from __future__ import annotations

import sys

import harness

FULL = [("eomt-l-640", 1, 0), ("eomt-l-640", 1, 1), ("eomt-l-640", 8, 1), ("eomt-s-640", 1, 1),
        ("eomt-g-640", 1, 1)]  # (preset, batch, block index: 0 = g -> 2g, 1 = 2g -> 4g)
QUICK = [("quick", 1, 0)]
QUICK_DIMS = dict(C=128, g=20)


def cases(quick: bool) -> list[harness.KernelCase]:
    out = []
    for preset, batch, block in QUICK if quick else FULL:
        d = QUICK_DIMS if preset == "quick" else harness.eomt_dims(preset)
        c, side = d["C"], d["g"] * 2**block

        def make_args(device, dtype, gen, c=c, side=side, batch=batch):
            x = harness.randn(batch, side, side, c, device=device, dtype=dtype, gen=gen)
            convt = harness.randn(2, 2, c, c, device=device, dtype=dtype, gen=gen, std=c**-0.5)  # (2, 2, C_out, C_in)
            bias = harness.randn(c, device=device, dtype=dtype, gen=gen, std=0.02)
            dw = harness.randn(c, 1, 3, 3, device=device, dtype=dtype, gen=gen, std=1 / 3)
            ln_w = harness.randn(c, device=device, dtype=dtype, gen=gen, mean=1.0, std=0.1)
            ln_b = harness.randn(c, device=device, dtype=dtype, gen=gen, std=0.02)
            return (x, convt, bias, dw, ln_w, ln_b, 1e-6)

        pixels_out = batch * (2 * side) ** 2
        out.append(harness.KernelCase(
            op="upscale", model=preset, shape=f"B{batch}-{side}x{side}->{2 * side}x{2 * side}-C{c}", batch=batch,
            masking=False, flops=harness.linear_flops(batch * side * side, c, 4 * c) + 2.0 * 9 * c * pixels_out,
            elements=batch * side * side * c + 4 * c * c + pixels_out * c, make_args=make_args))
    return out


def main(argv: list[str] | None = None) -> int:
    args = harness.kernel_arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    return harness.run_kernel_benchmark(cases(args.quick), args)


if __name__ == "__main__":
    sys.exit(main())
