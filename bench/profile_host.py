"""Where an eager eomt_fast forward spends its host (CPU) time: the launch overhead that CUDA graphs remove.

On an H200 (2026-12-04, commit dfc4c2b) an eager EoMT-L/640 forward at batch 1 took 37 ms and the same
forward replayed as a CUDA graph 5.1 ms: ~32 ms of host time per forward, where transformers' sdpa model
takes 13.9 ms in all. This script measures it and says where it goes:

- per forward: GPU-synchronised wall time, the host time alone (the call returning, no sync: with the GPU
  behind, that is what the Python launches cost) and, on CUDA, a CUDA graph replay;
- cProfile of a few eager forwards: the functions with the most own time, and the most time inclusive;
- on CUDA, torch.profiler's table of the ops and kernels (CPU time per op, kernel launches per forward).

    python bench/profile_host.py --model eomt-l-640 --batch 1     # GPU
    python bench/profile_host.py --model tiny --device cpu        # a CPU: the plain-PyTorch path (seconds)
    TRITON_INTERPRET=1 python bench/profile_host.py --device cpu --backend triton --stub-launches
        # a CPU: the Triton path's own Python, every kernel launch replaced by nothing (outputs garbage):
        # what eomt_fast adds around the launches, without Triton's launcher (which needs a GPU)

Prints only (and writes its report to --out when given); timings on a CPU say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="eomt-l-640", help="a preset of eomt_fast.bench (eomt-l-640, tiny, ...)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default=None, help="bfloat16, float16, float32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--calls", type=int, default=10, help="forwards timed and profiled")
    p.add_argument("--top", type=int, default=35, help="rows of each table")
    p.add_argument("--backend", default="auto", help="auto, torch or triton (the model's backend)")
    p.add_argument("--stub-launches", action="store_true",
                   help="under TRITON_INTERPRET=1: every Triton kernel launch does nothing (times the Python "
                        "around the launches; the outputs are garbage)")
    p.add_argument("--out", default=None, help="also write the report to this file")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, calls: int, device: torch.device, synchronised: bool) -> float:
    times = []
    for _ in range(calls):
        sync(device)
        t0 = time.perf_counter()
        fn()
        if synchronised:
            sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    sync(device)
    return statistics.median(times)


def stub_interpreted_launches() -> None:
    """Under Triton's interpreter, make every kernel launch (``kernel[grid](...)``, through an autotuner too)
    return at once: what is left of a forward is the Python around the launches."""
    from eomt_fast.kernels._triton import INTERPRETING

    if not INTERPRETING:
        raise SystemExit("--stub-launches needs TRITON_INTERPRET=1 (set before the start)")
    from triton.runtime.interpreter import InterpretedFunction

    InterpretedFunction.run = lambda self, *args, **kwargs: None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import harness  # bench/harness.py, beside this file

    from eomt_fast import bench
    from eomt_fast.kernels import _autotune

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    report = io.StringIO()

    def say(line: str = "") -> None:
        print(line, flush=True)
        report.write(line + "\n")

    env = harness.environment(device)
    say(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | transformers {env['transformers']} | "
        f"commit {env['commit'][:12]}{' (dirty)' if env['dirty'] else ''} | {env['timestamp']}")
    if args.stub_launches:
        stub_interpreted_launches()
    config = bench.preset_config(args.model)
    hf, model = bench.build_models(config, dtype, device, seed=0, backend=args.backend)
    del hf
    bench.set_masking([model], False)
    x = torch.randn(args.batch, 3, config.image_size, config.image_size, device=device, dtype=dtype)
    say(f"{args.model}, batch {args.batch}, {dtype}, {device}, backend {model.backend}, masking off"
        + (", Triton launches stubbed (outputs garbage)" if args.stub_launches else ""))

    with torch.inference_mode():
        forward = lambda: model(x)  # noqa: E731
        t0 = time.perf_counter()
        forward()
        sync(device)
        tuned = _autotune.TUNINGS
        say(f"first call {time.perf_counter() - t0:.2f} s (compiles and autotunes: {tuned['benchmarked']} keys "
            f"benchmarked, {tuned['disk']} read from the autotune cache; {_autotune.describe_cache()})")
        for _ in range(3):
            forward()
        wall = median_ms(forward, args.calls, device, synchronised=True)
        host = median_ms(forward, args.calls, device, synchronised=False)
        say(f"eager forward: {wall:.3f} ms synchronised, {host:.3f} ms host time to return (median of {args.calls})")
        if device.type == "cuda":
            from eomt_fast.cuda_graphs import CudaGraphs

            graphed = CudaGraphs(model)
            graphed(x)
            replay = median_ms(lambda: graphed(x), args.calls, device, synchronised=True)
            say(f"CUDA graph replay (input copy, replay, output clones): {replay:.3f} ms; "
                f"host overhead of the eager forward ~{wall - replay:.3f} ms")
            graphed.clear()

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            forward()
        sync(device)
        profiler.disable()
        for key, title in (("tottime", "own time"), ("cumulative", "inclusive time")):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(args.top)
            say(f"\n=== cProfile, {args.calls} forwards, by {title} ===")
            say(text.getvalue().strip())

        if device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    forward()
                sync(device)
            say("\n=== torch.profiler, 3 forwards, by CPU time (self) ===")
            say(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
            say("\n=== torch.profiler, 3 forwards, by CUDA time ===")
            say(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=60))
    if args.out:
        Path(args.out).write_text(report.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
