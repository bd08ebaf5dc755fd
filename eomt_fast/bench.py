"""``eomt-fast bench``: time the network forward of eomt_fast against transformers, same random weights.

For a model shape (a preset with the real dimensions of a released EoMT, ``tiny`` for quick CPU runs, or
``--config config.json``), batch sizes, a dtype and masking off/on (``attn_mask_probs`` zeros / ones), it
times the forward of

- ``eomt_fast``: ``EomtFastForUniversalSegmentation.from_hf`` of the transformers model (backend auto);
- ``transformers-eager`` / ``transformers-sdpa``: ``EomtForUniversalSegmentation`` with that attention;
- ``transformers-compile``: the sdpa model under ``torch.compile`` (default mode), and on a GPU
  ``transformers-compile-max-autotune`` (``mode="max-autotune"``).

Every output is checked first (``check_outputs``) against transformers' sdpa model (in fp32 when the
benchmark dtype is bf16/fp16); an implementation that disagrees is reported and not timed. Everything runs
under ``torch.inference_mode``. Results go through the harness of ``bench/harness.py`` (timing,
FLOP count, ceilings, ``bench/results/<date>_<device>.json`` + .md + .png); this needs a checkout of the
repository (an editable install), where ``bench/`` sits next to this package.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .config import EomtFastConfig
from .model import EomtFastForUniversalSegmentation, parse_dtype

# ---- model shapes ----------------------------------------------------------------------------------
# The released EoMT models (eomt-reference.md): DINOv2 ViT with 4 registers, patch 16, 200 queries,
# COCO panoptic's 133 classes. num_blocks: 3 for ViT-S (the reference), 4 for ViT-L; the reference gives
# no value for B and g, which take those of S and L respectively.
_BACKBONES = {
    "eomt-s": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, num_blocks=3),
    "eomt-b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_blocks=3),
    "eomt-l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_blocks=4),
    "eomt-g": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, num_blocks=4,
                   use_swiglu_ffn=True),
}
_COMMON = dict(patch_size=16, num_queries=200, num_register_tokens=4, num_labels=133, num_upscale_blocks=2)
PRESETS: dict[str, dict[str, Any]] = {
    f"{name}-{size}": dict(_COMMON, **dims, image_size=size)
    for name, dims in _BACKBONES.items() for size in (640, 1280)
}
# A few seconds on any CPU; head_dim 64 like the real models.
PRESETS["tiny"] = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, num_blocks=2, image_size=128,
                       patch_size=16, num_queries=20, num_register_tokens=4, num_labels=10, num_upscale_blocks=2)

IMPLS = ("eomt_fast", "transformers-eager", "transformers-sdpa", "transformers-compile",
         "transformers-compile-max-autotune")
OUTPUTS = ("masks_queries_logits", "class_queries_logits", "last_hidden_state")


def preset_config(name: str) -> EomtFastConfig:
    """The EomtFastConfig of a preset (``eomt-l-640``, ``tiny``, ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    kwargs = dict(PRESETS[name])
    labels = kwargs.pop("num_labels")
    return EomtFastConfig(**kwargs, id2label={i: f"LABEL_{i}" for i in range(labels)})


def hf_config_kwargs(config: EomtFastConfig) -> dict[str, Any]:
    """Keyword arguments for transformers' EomtConfig describing the same architecture."""
    kwargs = {name: getattr(config, name) for name in EomtFastConfig.field_names() if name != "id2label"}
    kwargs["num_labels"] = config.num_labels
    return kwargs


# ---- the harness (bench/harness.py in the checkout) ------------------------------------------------
def harness_path() -> Path:
    return Path(__file__).resolve().parent.parent / "bench" / "harness.py"


def load_harness() -> ModuleType:
    """bench/harness.py as a module (the one already imported by a bench script, if any)."""
    path = harness_path()
    for name in ("harness", "eomt_fast_bench_harness"):
        module = sys.modules.get(name)
        if module is not None and Path(getattr(module, "__file__", "") or "").resolve() == path:
            return module
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: `eomt-fast bench` runs from a checkout of the repository "
                                "(pip install -e .)")
    spec = importlib.util.spec_from_file_location("eomt_fast_bench_harness", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ---- output checks ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    ok: bool
    error: float  # max over the outputs of max |got - expected| / max |expected|
    tolerance: float
    worst: str  # the output with that error

    def line(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        return f"{verdict}: {self.worst} error {self.error:.3g} (tolerance {self.tolerance:.3g})"


def output_error(got: Any, expected: Any) -> tuple[float, str]:
    harness = load_harness()
    errors = {name: harness.relative_error(getattr(got, name), getattr(expected, name)) for name in OUTPUTS}
    worst = max(errors, key=lambda k: errors[k])
    return errors[worst], worst


def check_outputs(got: Any, expected: Any, dtype: torch.dtype, oracle_error: float = 0.0,
                  masking: bool = False) -> Check:
    """Does ``got`` agree with ``expected`` (computed by transformers, in fp32 for bf16/fp16)? The tolerance
    is the harness's per-dtype one (looser with masking on: ``harness.MASKED_TOLERANCE``), or twice
    transformers' own error in this dtype when that is larger."""
    harness = load_harness()
    error, worst = output_error(got, expected)
    tol = max(harness.tolerance(dtype, masking=masking), 2 * oracle_error)
    return Check(error <= tol, error, tol, worst)


# ---- models -----------------------------------------------------------------------------------------
def build_models(config: EomtFastConfig, dtype: torch.dtype, device: torch.device, seed: int, backend: str):
    """(transformers model with sdpa attention, eomt_fast copy of it), random weights, eval mode."""
    from .testing import random_hf_model

    hf = random_hf_model(seed=seed, dtype=dtype, attn_implementation="sdpa", **hf_config_kwargs(config))
    hf = hf.to(device)
    return hf, EomtFastForUniversalSegmentation.from_hf(hf, backend=backend)


def set_masking(models: list[torch.nn.Module], on: bool) -> None:
    for model in models:
        with torch.no_grad():
            model.attn_mask_probs.fill_(1.0 if on else 0.0)


@dataclass
class Impl:
    name: str
    prepare: Callable[[], Callable[[torch.Tensor], Any]]  # called before each use: returns forward(x)
    model: torch.nn.Module


def make_impls(names: list[str], hf: torch.nn.Module, ours: EomtFastForUniversalSegmentation) -> list[Impl]:
    compiled: dict[str, Callable] = {}

    def attention(kind: str) -> Callable[[], Callable]:
        def prepare() -> Callable:
            hf.set_attn_implementation(kind)
            return hf

        return prepare

    def compiled_model(mode: str | None) -> Callable[[], Callable]:
        def prepare() -> Callable:
            hf.set_attn_implementation("sdpa")
            if mode not in compiled:
                # every batch x masking x mode is a new graph (dynamic=False): stay under dynamo's limit, past
                # which it would silently run eager code and the "compile" rows would time that
                for limit in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                              "accumulated_recompile_limit"):
                    if hasattr(torch._dynamo.config, limit):
                        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
                compiled[mode] = torch.compile(hf, mode=mode, dynamic=False)
            return compiled[mode]

        return prepare

    makers = {
        "eomt_fast": (lambda: ours, ours),
        "transformers-eager": (attention("eager"), hf),
        "transformers-sdpa": (attention("sdpa"), hf),
        "transformers-compile": (compiled_model(None), hf),
        "transformers-compile-max-autotune": (compiled_model("max-autotune"), hf),
    }
    return [Impl(name, *makers[name]) for name in names]


def _param_mb(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def peak_memory(forward: Callable, x: torch.Tensor, model: torch.nn.Module) -> dict[str, float]:
    """CUDA memory of one forward: the most allocated above what was allocated before the call
    (torch.cuda.max_memory_allocated), plus the model's weights."""
    device = x.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    forward(x)
    torch.cuda.synchronize(device)
    extra = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    weights = _param_mb(model)
    return {"forward_mem_mb": extra, "weights_mb": weights, "peak_mem_mb": extra + weights}


# ---- the command ------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="eomt-l-640", choices=list(PRESETS),
                        help="a model shape: a released EoMT's dimensions, or tiny (default eomt-l-640)")
    parser.add_argument("--config", default=None, help="a config.json (transformers' EoMT format) instead of --model")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    parser.add_argument("--dtype", default=None, help="bfloat16, float16, float32 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--masking", choices=["off", "on", "both"], default="both",
                        help="attn_mask_probs zeros (off), ones (on), or both (default)")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=None, help="only these implementations")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines (slow on a CPU)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"], help="eomt_fast backend")
    parser.add_argument("--budget", type=float, default=10.0, help="CPU seconds of timing per implementation")
    parser.add_argument("--min-repeats", type=int, default=5, help="CPU: at least this many timed runs")
    parser.add_argument("--quick", action="store_true",
                        help="short ceilings, at most 0.5 s and 3 runs of timing per row (smoke tests)")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", default=None, help="where to write results (default: bench/results)")
    parser.add_argument("--no-write", action="store_true", help="print only")


def _selected_impls(args: argparse.Namespace, device: torch.device) -> tuple[list[str], list[str]]:
    names = list(args.impls or IMPLS)
    notes = []
    if args.no_compile:
        names = [n for n in names if "compile" not in n]
    if device.type != "cuda" and "transformers-compile-max-autotune" in names:
        names.remove("transformers-compile-max-autotune")
        notes.append("transformers-compile-max-autotune runs on a GPU only (mode='max-autotune' tunes GPU kernels)")
    return names, notes


def run(args: argparse.Namespace) -> int:
    harness = load_harness()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.config:
        config = EomtFastConfig.from_json_file(args.config)
        model_name = f"config:{Path(args.config).resolve().parent.name}/{Path(args.config).name}"
    else:
        config = preset_config(args.model)
        model_name = args.model
    if any(b < 1 for b in args.batch):
        raise ValueError(f"batch sizes must be >= 1, got {args.batch}")
    names, notes = _selected_impls(args, device)
    for note in notes:
        print(f"note: {note}")
    maskings = {"off": [False], "on": [True], "both": [False, True]}[args.masking]
    budget = min(args.budget, 0.5) if args.quick else args.budget
    min_repeats = min(args.min_repeats, 3) if args.quick else args.min_repeats

    env = harness.environment(device)
    ceilings = harness.measure_ceilings(device, quick=args.quick)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | transformers {env['transformers']} | "
          f"commit {env['commit'][:12]}")
    print(f"ceilings: matmul {ceilings['matmul_tflops']:.3g} TFLOP/s ({ceilings['matmul']}), "
          f"copy {ceilings['copy_tbps']:.3g} TB/s")
    print(f"model {model_name}: {config.hidden_size}d x {config.num_hidden_layers} layers, "
          f"{config.num_attention_heads} heads, {config.num_queries} queries, {config.image_size}px, "
          f"{harness.dtype_name(dtype)}, eomt_fast backend={args.backend}")

    t0 = time.perf_counter()
    hf, ours = build_models(config, dtype, device, args.seed, args.backend)
    low_precision = dtype in (torch.float16, torch.bfloat16)
    reference = copy.deepcopy(hf).float() if low_precision else None  # same (rounded) weights, in fp32
    print(f"built random-weight models in {time.perf_counter() - t0:.1f} s")
    impls = make_impls(names, hf, ours)
    models = [hf, ours] + ([reference] if reference is not None else [])

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    failed, path = False, None

    def write() -> Path:
        for r in rows:  # against the best ceiling of the run so far
            r["pct_matmul_ceiling"] = 100 * r["tflops"] / ceilings["matmul_tflops"]
        return harness.write_results(rows, env, ceilings, args.results_dir, skipped=skipped,
                                     notes=result_notes(notes, device))

    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    with torch.inference_mode():
        for batch in args.batch:
            for masking in maskings:
                set_masking(models, masking)
                flops = harness.model_flops(config, batch, config.num_blocks if masking else 0)["total"]
                x = torch.randn(batch, config.num_channels, config.image_size, config.image_size, device=device,
                                generator=gen).to(dtype)
                # the oracle: transformers' sdpa model (its fp32 copy for bf16/fp16)
                hf.set_attn_implementation("sdpa")
                expected = reference(x.float()) if low_precision else hf(x)
                oracle_error = output_error(hf(x), expected)[0] if low_precision else 0.0
                group = dict(benchmark="model", model=model_name, batch=batch, dtype=harness.dtype_name(dtype),
                             masking=masking)
                print(f"\n{model_name} batch {batch} {harness.dtype_name(dtype)} masking {'on' if masking else 'off'}:"
                      f" {flops / 1e12:.4g} TFLOP per forward"
                      + (f"; transformers' own {harness.dtype_name(dtype)} error {oracle_error:.3g}"
                         if low_precision else ""))
                checked: dict[str, tuple[Impl, Check, float]] = {}
                for impl in impls:  # 1. run once (compiles) and check; a wrong result is not timed
                    try:
                        forward = impl.prepare()
                        harness.synchronize(device)
                        start = time.perf_counter()
                        out = forward(x)
                        harness.synchronize(device)
                        first_s = time.perf_counter() - start
                        check = check_outputs(out, expected, dtype, oracle_error, masking)
                        del out
                    except Exception as exc:  # a baseline that cannot run this config (or out of memory)
                        failed = True
                        skipped.append(dict(group, impl=impl.name, reason=_reason(exc)))
                        print(f"  {impl.name:<34} failed: {skipped[-1]['reason']}")
                        _free(device)
                        continue
                    if check.ok:
                        print(f"  {impl.name:<34} first call {first_s:8.3g} s, output {check.line()}", flush=True)
                    else:
                        print(f"  {impl.name:<34} NOT TIMED, output {check.line()}", flush=True)
                        failed = True
                        skipped.append(dict(group, impl=impl.name, reason=f"output {check.line()}",
                                            max_rel_err=check.error))
                        continue
                    checked[impl.name] = (impl, check, first_s)
                timings, extras = time_impls(harness, checked, x, device, budget, min_repeats)  # 2. time
                group_rows = []
                for name, (impl, check, first_s) in checked.items():
                    timing = timings[name]
                    if isinstance(timing, Exception):
                        failed = True
                        skipped.append(dict(group, impl=name, reason=_reason(timing)))
                        print(f"  {name:<34} failed while timed: {skipped[-1]['reason']}")
                        continue
                    sec = timing.median_ms * 1e-3
                    row = dict(group, impl=name, median_ms=timing.median_ms, p20_ms=timing.p20_ms,
                               p80_ms=timing.p80_ms, samples=timing.samples, method=timing.method, flops=flops,
                               images_per_s=batch / sec, tflops=flops / sec / 1e12,
                               pct_matmul_ceiling=100 * flops / sec / 1e12 / ceilings["matmul_tflops"],
                               max_rel_err=check.error, tolerance=check.tolerance, **extras.get(name, {}))
                    if "compile" in name:
                        row["first_call_s"] = first_s
                    group_rows.append(row)
                rows.extend(group_rows)
                print_table(group_rows, device)
                if not args.no_write and (rows or skipped):  # after every group: a run cut short keeps its rows
                    path = write()
    del reference, models
    if device.type == "cpu":  # the load of a shared CPU varies: measure again, keep the best
        ceilings = harness.best_ceilings(ceilings, harness.measure_ceilings(device, quick=args.quick))
        if hasattr(os, "getloadavg"):
            env["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
        print(f"\nceilings measured again: matmul {ceilings['matmul_tflops']:.3g} TFLOP/s, "
              f"copy {ceilings['copy_tbps']:.3g} TB/s (best of the run)")
        if path is not None:
            path = write()
    if path is not None:
        print(f"\nwrote {path} (+ .md, .png)")
    return 1 if failed else 0


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_impls(harness: ModuleType, checked: dict[str, tuple[Impl, Check, float]], x: torch.Tensor,
               device: torch.device, budget: float, min_repeats: int) -> tuple[dict[str, Any], dict[str, dict]]:
    """name -> Timing (or the exception it raised), and name -> extra fields (CUDA memory).

    On a GPU each implementation is timed on its own with do_bench (and its peak memory read); on a CPU
    they are timed in rounds (``harness.time_interleaved``), so that other processes' load falls on all."""
    timings: dict[str, Any] = {}
    extras: dict[str, dict] = {}
    if device.type == "cuda":
        for name, (impl, _, _) in checked.items():
            try:
                forward = impl.prepare()
                extras[name] = peak_memory(forward, x, impl.model)
                timings[name] = harness.time_call(forward, [(x,)], device, cudagraph=False)
            except Exception as exc:  # out of memory, ...
                timings[name] = exc
                _free(device)
        return timings, extras

    def setup(impl: Impl) -> Callable[[], Callable[[], Any]]:
        def prepare() -> Callable[[], Any]:
            forward = impl.prepare()
            return lambda: forward(x)

        return prepare

    setups = {name: setup(impl) for name, (impl, _, _) in checked.items()}
    return harness.time_interleaved(setups, budget_s=budget, min_repeats=min_repeats, max_repeats=200), extras


def result_notes(notes: list[str], device: torch.device) -> list[str]:
    """What a reader of the results files needs to know about the model rows."""
    notes = list(notes) + [
        "model rows: TFLOP/s = model FLOP / median time, the same FLOP count for every impl (bench/harness.py "
        "model_flops: 2 per multiply-add; with masking, each masked layer adds one predict() with its einsum at "
        "grid resolution)",
        "model rows: outputs checked before timing against transformers' sdpa model (in fp32 for bf16/fp16); "
        "random weights, random normal pixel values",
    ]
    if device.type == "cpu":
        notes.append("CPU: the eomt_fast rows run the plain-PyTorch fallback of every op; these numbers say nothing "
                     "about GPU speed")
    return notes


def print_table(rows: list[dict[str, Any]], device: torch.device) -> None:
    if not rows:
        return
    ours = next((r["median_ms"] for r in rows if r["impl"] == "eomt_fast"), None)
    mem = device.type == "cuda"
    print(f"  {'impl':<34} {'ms median [p20-p80]':<28} {'img/s':>8} {'TFLOP/s':>8} {'% ceil':>7} "
          f"{'eomt_fast speedup':>18} {'err':>8}" + (f" {'peak MB':>8}" if mem else ""))
    for r in rows:
        speedup = "" if ours is None or r["impl"] == "eomt_fast" else f"{r['median_ms'] / ours:.2f}x"
        timing = f"{r['median_ms']:.4g} [{r['p20_ms']:.4g}-{r['p80_ms']:.4g}]"
        print(f"  {r['impl']:<34} {timing:<28} {r['images_per_s']:8.3g} {r['tflops']:8.3g} "
              f"{r['pct_matmul_ceiling']:6.1f}% {speedup:>18} {r['max_rel_err']:8.2g}"
              + (f" {r.get('peak_mem_mb', 0):8.0f}" if mem else ""))
