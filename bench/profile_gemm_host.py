"""Host time of one ``kernels.gemm.gemm`` call once its tile is chosen, the kernel launch itself stubbed out:
what the launcher's Python costs around Triton's own launch, which an eager forward pays ~100 times.

    TRITON_INTERPRET=1 python bench/profile_gemm_host.py [--profile]

EoMT-L/640 shapes at batch 1 (fp32 on the CPU: the dtype does not change the host work): the output projection
updating the residual stream in place, and the QKV GEMM. Prints the median and minimum of 7 rounds of 2000
calls; ``--profile`` adds cProfile's table for the first. Timings on a CPU say nothing about a GPU, and under
the interpreter Triton's launcher (its argument packing, the driver call) is not part of them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

ROUNDS, CALLS = 7, 2000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="cProfile the output projection's calls")
    args = parser.parse_args(argv)
    from eomt_fast.kernels._triton import INTERPRETING

    if not INTERPRETING:
        raise SystemExit("run under TRITON_INTERPRET=1 (the launches are stubbed out through the interpreter)")
    from triton.runtime.interpreter import InterpretedFunction

    from eomt_fast.kernels import gemm as G

    InterpretedFunction.run = lambda self, *a, **k: None  # every launch: nothing
    gen = torch.Generator().manual_seed(0)
    tokens, a = torch.randn(1805, 1024, generator=gen), torch.randn(1805, 1024, generator=gen)
    w, b, scale = torch.randn(1024, 1024, generator=gen), torch.randn(1024, generator=gen), torch.randn(1024)
    w_qkv, b_qkv = torch.randn(3072, 1024, generator=gen), torch.randn(3072, generator=gen)
    cases = {
        "out_projection (in place)": lambda: G.gemm(a, w, b, scale=scale, residual=tokens, out=tokens),
        "qkv": lambda: G.gemm(a, w_qkv, b_qkv),
    }
    for name, call in cases.items():
        call()  # the first call chooses the tile
        per_call = []
        for _ in range(ROUNDS):
            start = time.perf_counter()
            for _ in range(CALLS):
                call()
            per_call.append((time.perf_counter() - start) / CALLS * 1e6)
        print(f"{name}: median {statistics.median(per_call):.1f} us a call, min {min(per_call):.1f} "
              f"({ROUNDS} rounds of {CALLS})")
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(CALLS):
            cases["out_projection (in place)"]()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
