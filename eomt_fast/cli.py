"""The ``eomt-fast`` command line."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys

import torch


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    from . import __version__, dispatch

    print(f"eomt_fast {__version__}")
    print(f"python {platform.python_version()} on {platform.platform()}")
    for package in ("torch", "triton", "transformers", "safetensors", "numpy", "huggingface_hub"):
        print(f"  {package:<16} {_version(package)}")
    cuda = torch.cuda.is_available()
    print(f"CUDA available: {cuda}" + (f" ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})" if cuda else ""))
    print(f"TRITON_INTERPRET: {os.environ.get('TRITON_INTERPRET', 'unset')}")
    from .kernels import _autotune

    print(f"autotune cache: {_autotune.describe_cache()}")
    if args.model:
        from .model import EomtFastForUniversalSegmentation

        model = EomtFastForUniversalSegmentation.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                                                 backend=args.backend, revision=args.revision)
        cfg = model.config
        kind = "EoMT-DINOv3 (rotary embeddings)" if cfg.rope else "EoMT"
        print(f"model {args.model}: {kind}, {cfg.hidden_size}d x {cfg.num_hidden_layers} layers, "
              f"{cfg.num_attention_heads} heads, {cfg.num_queries} queries, {cfg.image_size}px, {cfg.num_labels} labels, "
              f"attn_mask_probs {list(model.masking_probs())}")
        graphs = model.cuda_graphs
        print(f"forward: {'eager' if graphs is None else graphs.describe()}"
              + (" (on this device: eager)" if graphs is not None and model.device.type != "cuda" else ""))
        targets = [(model.device, model.dtype, model.backend, model.config)]
    else:
        dtype = args.dtype or "bfloat16"
        devices = [args.device] if args.device else ["cpu"] + (["cuda"] if cuda else [])
        from .model import parse_dtype

        targets = [(torch.device(d), parse_dtype(dtype), args.backend, None) for d in devices]
    for device, dtype, backend, config in targets:
        print(f"ops on {device}, {str(dtype).removeprefix('torch.')}, backend={backend!r}:")
        try:
            paths = dispatch.plan(backend, device, dtype, config)
        except (RuntimeError, NotImplementedError) as exc:
            print(f"  unavailable: {exc}")
            continue
        for path in paths:
            unused = dispatch.unused_reason(path.op, config)
            impl, reason = ("-", unused) if unused else (path.impl, path.reason)
            print(f"  {path.op:<20} {impl:<7} {reason}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(device=args.device or "cpu", dtype=args.dtype, batch_size=args.batch_size, repeats=args.repeats)
    return 0


def cmd_check_kernels(args: argparse.Namespace) -> int:
    from .aot import all_specs, check_kernels

    if not all_specs():
        print("no Triton kernels to check yet")
        return 0
    reports = check_kernels(tuple(args.arch), args.filter)
    for report in reports:
        print(report.line())
    failed = [r for r in reports if not r.ok]
    print(f"{len(reports) - len(failed)}/{len(reports)} compiled cleanly")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eomt-fast", description="Fast EoMT image segmentation")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, CUDA, and which implementation each op uses")
    info.add_argument("--model", help="a model directory or Hub id to load and describe")
    info.add_argument("--revision", help="with a Hub id: the branch, tag or commit (default: main)")
    info.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: every device present)")
    info.add_argument("--dtype", help="float32, bfloat16, float16, float64")
    info.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="build a small random EoMT, run it on a generated image, time it")
    demo.add_argument("--device", default=None)
    demo.add_argument("--dtype", default=None)
    demo.add_argument("--batch-size", type=int, default=1)
    demo.add_argument("--repeats", type=int, default=5)
    demo.set_defaults(func=cmd_demo)

    check = sub.add_parser("check-kernels", help="compile every Triton kernel for sm_80/sm_90 (no GPU needed)")
    check.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    check.add_argument("--filter", default=None, help="only kernels whose name contains this")
    check.set_defaults(func=cmd_check_kernels)

    from . import bench  # the bench subcommand: eomt_fast/bench.py

    bench_parser = sub.add_parser("bench", help="time the network forward against transformers")
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(func=bench.run)

    from . import segment  # the segment subcommand: eomt_fast/segment.py

    segment_parser = sub.add_parser("segment", help="segment image files: label PNG, overlay PNG and JSON per image")
    segment.add_arguments(segment_parser)
    segment_parser.set_defaults(func=segment.run)

    from . import evaluate  # the evaluate subcommand: eomt_fast/evaluate.py

    evaluate_parser = sub.add_parser("evaluate", help="panoptic quality (PQ) on held-out generated scenes")
    evaluate.add_arguments(evaluate_parser)
    evaluate_parser.set_defaults(func=evaluate.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, RuntimeError, NotImplementedError) as exc:
        print(f"eomt-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
