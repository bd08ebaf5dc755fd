"""``eomt-fast bench``: time the network forward of eomt_fast against transformers, same random weights.

For a model shape (a preset with the real dimensions of a released EoMT, ``tiny`` for quick CPU runs, or
``--config config.json``), batch sizes, a dtype and masking off/on (``attn_mask_probs`` zeros / ones), it
times the forward of

- ``eomt_fast``: ``EomtFastForUniversalSegmentation.from_hf`` of the transformers model (backend auto), its
  eager forward (``cuda_graphs=False``);
- ``eomt_fast-cuda-graphs`` (CUDA only): the same model through ``eomt_fast.cuda_graphs.CudaGraphs`` (one graph
  captured per shape and masking setting, replayed; input copied in, outputs cloned out, both timed): what a
  model loaded with the default ``cuda_graphs="auto"`` runs from the second call of a shape on;
- ``transformers-eager`` / ``transformers-sdpa``: ``EomtForUniversalSegmentation`` with that attention;
- ``transformers-compile``: the sdpa model under ``torch.compile`` (default mode), and on a GPU
  ``transformers-compile-max-autotune`` (``mode="max-autotune"``).

Every output is checked first (``check_outputs``) against transformers' sdpa model (in fp32 when the
benchmark dtype is bf16/fp16); an implementation that disagrees is reported and not timed. Everything runs
under ``torch.inference_mode``. On CUDA each row also holds the peak memory of one forward (``peak_memory``:
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, above what was allocated before the
call, plus the implementation's weights, in MiB); CPU rows have none.

``eomt-fast bench --e2e`` times the whole pipeline instead, decoded images in, segments out (``run_e2e``):
``eomt_fast`` (EomtFastImageProcessor.preprocess on the model's device -> EomtFastForUniversalSegmentation as
loaded by default, ``cuda_graphs="auto"`` -> its post_process_<task>_segmentation) against ``transformers`` (EomtImageProcessor -> EomtForUniversalSegmentation
-> its post_process_<task>_segmentation), same random weights, results compared first (``compare_e2e``).

Results go through the harness of ``bench/harness.py`` (timing, FLOP count, ceilings,
``bench/results/<date>_<device>.json`` + .md + .png); this needs a checkout of the repository (an editable
install), where ``bench/`` sits next to this package.
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
from .model import EomtFastForUniversalSegmentation, indexed_device, parse_dtype

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
# EoMT-DINOv3 (transformers' EomtDinov3ForUniversalSegmentation: rotary embeddings, no key bias), the same
# shapes with DINOv3's MLP width 4C.
for _name, _dims in list(_BACKBONES.items())[:3]:
    PRESETS[f"eomt-dinov3-{_name[5:]}-640"] = dict(
        _COMMON, **{k: v for k, v in _dims.items() if k != "use_swiglu_ffn"}, image_size=640, model_type="eomt_dinov3",
        intermediate_size=4 * _dims["hidden_size"])
# A few seconds on any CPU; head_dim 64 like the real models.
PRESETS["tiny"] = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, num_blocks=2, image_size=128,
                       patch_size=16, num_queries=20, num_register_tokens=4, num_labels=10, num_upscale_blocks=2)

IMPLS = ("eomt_fast", "eomt_fast-cuda-graphs", "transformers-eager", "transformers-sdpa", "transformers-compile",
         "transformers-compile-max-autotune")
CUDA_ONLY = {"eomt_fast-cuda-graphs": "eomt_fast-cuda-graphs runs on CUDA only (CUDA graphs)",
             "transformers-compile-max-autotune": "transformers-compile-max-autotune runs on a GPU only "
                                                  "(mode='max-autotune' tunes GPU kernels)"}
OUTPUTS = ("masks_queries_logits", "class_queries_logits", "last_hidden_state")


def preset_config(name: str) -> EomtFastConfig:
    """The EomtFastConfig of a preset (``eomt-l-640``, ``tiny``, ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    kwargs = dict(PRESETS[name])
    labels = kwargs.pop("num_labels")
    return EomtFastConfig(**kwargs, id2label={i: f"LABEL_{i}" for i in range(labels)})


def hf_config_kwargs(config: EomtFastConfig) -> dict[str, Any]:
    """Keyword arguments for transformers' EomtConfig (EomtDinov3Config for ``model_type`` eomt_dinov3: pass
    ``model_type`` to ``random_hf_model`` too) describing the same architecture."""
    kwargs = {name: getattr(config, name) for name in EomtFastConfig.field_names(config.model_type)
              if name != "id2label"}
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

    hf = random_hf_model(seed=seed, dtype=dtype, attn_implementation="sdpa", model_type=config.model_type,
                         **hf_config_kwargs(config))
    hf = hf.to(device)
    return hf, EomtFastForUniversalSegmentation.from_hf(hf, backend=backend, cuda_graphs=False)  # the eager row


def set_masking(models: list[torch.nn.Module], on: bool) -> None:
    for model in models:
        with torch.no_grad():
            model.attn_mask_probs.fill_(1.0 if on else 0.0)


@dataclass
class Impl:
    name: str
    prepare: Callable[[], Callable[[torch.Tensor], Any]]  # called before each use: returns forward(x)
    model: torch.nn.Module
    # called before the peak-memory call: e.g. drops captured CUDA graphs, so that the peak includes a capture
    fresh: Callable[[], None] | None = None


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

    graphs: list = []  # the CudaGraphs runner, built on first use (it refuses a CPU model)

    def graphed() -> Callable:
        if not graphs:
            from .cuda_graphs import CudaGraphs

            graphs.append(CudaGraphs(ours))
        return graphs[0]

    makers = {
        "eomt_fast": (lambda: ours, ours),
        "eomt_fast-cuda-graphs": (graphed, ours, lambda: graphed().clear()),
        "transformers-eager": (attention("eager"), hf),
        "transformers-sdpa": (attention("sdpa"), hf),
        "transformers-compile": (compiled_model(None), hf),
        "transformers-compile-max-autotune": (compiled_model("max-autotune"), hf),
    }
    return [Impl(name, *makers[name]) for name in names]


def _param_mb(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def peak_memory(forward: Callable, x: torch.Tensor, model: torch.nn.Module) -> dict[str, float]:
    """CUDA memory of one forward, MiB: the most allocated during the call above what was allocated before it
    (torch.cuda.max_memory_allocated after reset_peak_memory_stats; activations, outputs, workspaces), plus
    the model's weights: the peak of a process that holds this model and the input only (the benchmark keeps
    other models on the device, which a plain max_memory_allocated would count)."""
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
    parser.add_argument("--masking", choices=["off", "on", "both"], default=None,
                        help="attn_mask_probs zeros (off), ones (on), or both (default; --e2e: off, as released "
                             "checkpoints run)")
    parser.add_argument("--impls", nargs="+", choices=IMPLS + ("transformers",), default=None,
                        help="only these implementations (--e2e: eomt_fast, transformers)")
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
    e2e = parser.add_argument_group("end to end (--e2e)")
    e2e.add_argument("--e2e", action="store_true",
                     help="time decoded image(s) -> segments: eomt_fast's processor + model against transformers' "
                          "EomtImageProcessor + EomtForUniversalSegmentation")
    e2e.add_argument("--task", choices=["panoptic", "instance", "semantic"], default="panoptic",
                     help="which segmentation (default panoptic)")
    e2e.add_argument("--image-size", default="640x480", help="WIDTHxHEIGHT of the generated images (default 640x480)")
    e2e.add_argument("--kept-fraction", type=float, default=KEPT_FRACTION,
                     help=f"panoptic/instance: the threshold is placed so that about this fraction of the queries "
                          f"of an image makes a segment (default {KEPT_FRACTION})")


def _selected_impls(args: argparse.Namespace, device: torch.device) -> tuple[list[str], list[str]]:
    names = [n for n in (args.impls or IMPLS) if n in IMPLS]  # "transformers" names the --e2e pipeline
    if not names:
        raise ValueError(f"--impls names no implementation of the model benchmark ({', '.join(IMPLS)})")
    notes = []
    if args.no_compile:
        names = [n for n in names if "compile" not in n]
    if device.type != "cuda":
        for name, why in CUDA_ONLY.items():
            if name in names:
                names.remove(name)
                notes.append(why)
    return names, notes


def benchmark_device(requested: str | None) -> torch.device:
    """--device (default: CUDA when present, else the CPU), with its index, made the current CUDA device: the
    timers (events, do_bench) and synchronize work on the current device. For `eomt-fast bench` and the
    kernel scripts alike."""
    device = indexed_device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _setup(args: argparse.Namespace):
    """What both modes start from: the harness, device, dtype (bf16 on CUDA, fp32 on a CPU), thread count,
    and the model config with its name in the results."""
    harness = load_harness()
    device = benchmark_device(args.device)
    dtype = parse_dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.config:
        config = EomtFastConfig.from_json_file(args.config)
        model_name = f"config:{Path(args.config).resolve().parent.name}/{Path(args.config).name}"
    else:
        config = preset_config(args.model)
        model_name = args.model
    return harness, device, dtype, config, model_name


def run(args: argparse.Namespace) -> int:
    if getattr(args, "e2e", False):
        return run_e2e(args)
    if args.masking is None:
        args.masking = "both"
    harness, device, dtype, config, model_name = _setup(args)
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
                if impl.fresh is not None:
                    impl.fresh()
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
    else:
        notes.append("model rows: peak MiB = torch.cuda.max_memory_allocated during one forward (after "
                     "reset_peak_memory_stats) minus what was allocated before it, plus the implementation's weights; "
                     "for eomt_fast-cuda-graphs the measured call is a first one (warm-up, capture, replay), so it "
                     "includes what the captured graph's memory pool keeps")
        notes.append("eomt_fast-cuda-graphs rows: each timed call copies the input into the graph's static input, "
                     "replays and clones the outputs (what model(x) costs with cuda_graphs=True)")
    return notes


def print_table(rows: list[dict[str, Any]], device: torch.device) -> None:
    if not rows:
        return
    ours = next((r["median_ms"] for r in rows if r["impl"] == "eomt_fast"), None)
    mem = device.type == "cuda"
    print(f"  {'impl':<34} {'ms median [p20-p80]':<28} {'img/s':>8} {'TFLOP/s':>8} {'% ceil':>7} "
          f"{'eomt_fast speedup':>18} {'err':>8}" + (f" {'peak MiB':>8}" if mem else ""))
    for r in rows:
        speedup = "" if ours is None or r["impl"] == "eomt_fast" else f"{r['median_ms'] / ours:.2f}x"
        timing = f"{r['median_ms']:.4g} [{r['p20_ms']:.4g}-{r['p80_ms']:.4g}]"
        print(f"  {r['impl']:<34} {timing:<28} {r['images_per_s']:8.3g} {r['tflops']:8.3g} "
              f"{r['pct_matmul_ceiling']:6.1f}% {speedup:>18} {r['max_rel_err']:8.2g}"
              + (f" {r['peak_mem_mb']:8.0f}" if mem and r.get("peak_mem_mb") is not None else ""))


# ---- end to end: decoded images in, segments out (--e2e) --------------------------------------------------
E2E_IMPLS = ("eomt_fast", "transformers")
KEPT_FRACTION = 0.1  # about 20 of 200 queries make a segment: a busy COCO image
NO_OBJECT_BIAS = -10.0  # added to the class head's "no object" bias: random weights otherwise pick it often
CLASS_SHARPEN = 5.0  # class head weights and biases scaled: random class scores spread over (0, 1)
OVERLAP_THRESHOLD = 0.0  # random masks overlap heavily: at transformers' default 0.8 no segment survives
# The check rule (E2E_RULE says it in words): preprocessing may differ by one 8-bit level (Pillow / torch /
# torchvision resize their uint8 images with different fixed-point or float arithmetic) on a small fraction of
# the values; segments must agree in number and labels; maps may differ only at a few boundary pixels.
ONE_LEVEL = 1 / 255 / 0.224 + 1e-5  # one uint8 step after normalisation by the smallest ImageNet std (0.224)
PIXEL_VALUE_FRACTION = 0.02
MAP_MISMATCH = {torch.float64: 0.005, torch.float32: 0.005, torch.float16: 0.05, torch.bfloat16: 0.05}
SCORE_TOLERANCE = {torch.float64: 1e-3, torch.float32: 1e-3, torch.float16: 0.05, torch.bfloat16: 0.05}
SEMANTIC_MIN_AREA = 0.005  # semantic: classes covering at least this fraction of an image must agree
E2E_RULE = ("e2e check rule (before timing, on the timed images): pixel_values of the two processors differ by "
            "at most one 8-bit level after normalisation (1/255/std) on at most 2% of the values (resize "
            "rounding: Pillow, torch and torchvision round uint8 resizes differently; with no resize, as 640x480 "
            "into a 640 model, they are equal); per image the same number of segments with the same label_id in "
            "id order (semantic: the same classes among those covering >= 0.5% of the image), scores within "
            "1e-3 (fp32) / 0.05 (bf16, fp16), and segment maps equal on >= 99.5% (fp32) / 95% (bf16, fp16) of "
            "the pixels")


def generated_images(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """Photo-like decoded RGB images, (height, width, 3) uint8 numpy arrays: smooth gradients, a few flat
    shapes with sharp edges, mild sensor noise (no file decoding is timed: these are the decoded arrays)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(height, width)
    images = []
    for _ in range(count):
        phase = rng.uniform(0, 6, 3)
        img = np.stack([np.sin(x * 7 + phase[0]), np.cos(y * 5 + phase[1]), np.sin((x + y) * 4 + phase[2])], -1)
        img = (img + 1) * 100 + 20
        for _ in range(6):  # rectangles and discs of one colour
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            r = rng.uniform(0.05, 0.2) * max(height, width)
            inside = ((y * max(height, width) - cy) ** 2 + (x * max(height, width) - cx) ** 2 < r * r
                      if rng.random() < 0.5 else
                      (abs(y * max(height, width) - cy) < r) & (abs(x * max(height, width) - cx) < r / 2))
            img[inside] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 3, img.shape)
        images.append(np.clip(img, 0, 255).round().astype(np.uint8))
    return images


def transformers_image_processor(config: EomtFastConfig, task: str):
    """transformers' EomtImageProcessor configured as the released checkpoints of ``task`` are: the torchvision
    backend where torchvision is installed (it then runs on the model's device), else the PIL backend (CPU)."""
    import transformers

    try:
        import torchvision  # noqa: F401

        cls, on_device = transformers.EomtImageProcessor, True
    except ImportError:
        cls, on_device = getattr(transformers, "EomtImageProcessorPil", None) or transformers.EomtImageProcessor, False
    if task == "semantic":
        kwargs = dict(size={"shortest_edge": config.image_size, "longest_edge": None}, do_split_image=True,
                      do_pad=False)
    else:
        kwargs = dict(size={"shortest_edge": config.image_size, "longest_edge": config.image_size},
                      do_split_image=False, do_pad=True)
    return cls(**kwargs), on_device


def boost_class_head(hf: torch.nn.Module) -> None:
    """Random class heads give "no object" or flat scores: push them to real classes and spread the scores."""
    with torch.no_grad():
        hf.class_predictor.bias[-1] += NO_OBJECT_BIAS
        hf.class_predictor.weight.mul_(CLASS_SHARPEN)
        hf.class_predictor.bias.mul_(CLASS_SHARPEN)


@dataclass
class Pipeline:
    """One implementation of decoded images -> segments, in three stages (timed together, and apart)."""

    name: str
    preprocess: Callable[[list], tuple[torch.Tensor, Any, list]]  # -> fp32 pixel_values, patch_offsets, sizes
    forward: Callable[[torch.Tensor, Any], Any]  # -> model outputs (the cast to the model dtype included)
    postprocess: Callable[[Any, list, dict], Any]  # (outputs, target sizes, thresholds) -> segments
    device: torch.device
    params: dict = None  # post-processing thresholds

    def __call__(self, images: list) -> Any:
        pixel_values, offsets, sizes = self.preprocess(images)
        results = self.postprocess(self.forward(pixel_values, offsets), sizes, self.params or {})
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return results


def _forward_mode(model: EomtFastForUniversalSegmentation) -> str:
    graphs = model.cuda_graphs
    return "eager (cuda_graphs=False)" if graphs is None else f"cuda_graphs={'auto' if graphs.auto else True}"


def make_pipelines(task: str, config: EomtFastConfig, hf: torch.nn.Module, ours: EomtFastForUniversalSegmentation,
                   device: torch.device, dtype: torch.dtype) -> tuple[dict[str, Pipeline], str]:
    import numpy as np

    from .processing import EomtFastImageProcessor

    theirs_proc, on_device = transformers_image_processor(config, task)
    our_proc = EomtFastImageProcessor.from_config(config, task)
    post = f"post_process_{task}_segmentation"

    def their_pre(images):
        nonlocal on_device
        if on_device:
            try:
                inputs = theirs_proc(images=images, return_tensors="pt", device=device)
            except (TypeError, ValueError):  # a transformers whose processor takes no device: on the CPU
                on_device = False
        if not on_device:
            inputs = theirs_proc(images=images, return_tensors="pt")
        offsets = inputs.get("patch_offsets") or None
        return inputs["pixel_values"].to(device), offsets, [tuple(i.shape[:2]) for i in images]

    def our_pre(images):
        out = our_proc.preprocess(images, device=device)
        return out.pixel_values, out.patch_offsets, out.target_sizes

    def their_post(outputs, sizes, params):
        return getattr(theirs_proc, post)(outputs, target_sizes=sizes, **params)

    def our_post(outputs, sizes, params):
        return getattr(our_proc, post)(outputs, target_sizes=sizes, **params)

    hf.set_attn_implementation("sdpa")
    pipelines = {
        "eomt_fast": Pipeline("eomt_fast", our_pre, lambda x, offsets: ours(x.to(dtype), patch_offsets=offsets),
                              our_post, device),
        "transformers": Pipeline("transformers", their_pre, lambda x, offsets: hf(x.to(dtype), patch_offsets=offsets),
                                 their_post, device),
    }
    their_pre([np.zeros((8, 8, 3), dtype=np.uint8)])  # settles on_device
    where = device.type if on_device else "cpu"
    return pipelines, f"{type(theirs_proc).__name__} (preprocessing on {where})"


def gap_threshold(scores: list[float], target: int, dtype: torch.dtype = torch.float64) -> tuple[float, float]:
    """(threshold, margin): the midpoint of the widest gap between consecutive sorted scores when keeping
    between target/2 and 2*target of them, rounded to ``dtype`` (where post-processing compares it: a tensor
    compared with a Python float rounds the float to the tensor's dtype); margin: how far a score must move
    to change which pass. With fewer than two scores, a threshold that keeps them all."""
    ordered = sorted(scores, reverse=True)
    if len(ordered) < 2:
        return (ordered[0] / 2 if ordered else 0.0), 0.0
    lo, hi = max(1, target // 2), max(1, min(len(ordered) - 1, 2 * target))
    keep = max(range(lo, hi + 1), key=lambda r: ordered[r - 1] - ordered[r])
    upper, lower = ordered[keep - 1], ordered[keep]
    threshold = torch.tensor((upper + lower) / 2, dtype=torch.float64).to(dtype).item()
    return threshold, max(0.0, min(upper - threshold, threshold - lower))


def choose_thresholds(task: str, reference: Pipeline, images: list, num_queries: int,
                      kept_fraction: float) -> dict[str, Any]:
    """Post-processing parameters under which random weights give segments (see the constants above), from the
    reference pipeline's scores on the timed images. Returns the parameters and a description of the choice."""
    if task == "semantic":
        return {"params": {}, "threshold": None, "margin": None}
    pixel_values, offsets, sizes = reference.preprocess(images)
    outputs = reference.forward(pixel_values, offsets)
    target = max(1, round(kept_fraction * num_queries)) * len(images)
    if task == "panoptic":  # as post-processing computes them: softmax in the logits' dtype, compared there
        logits = outputs.class_queries_logits
        scores, labels = logits.softmax(-1).max(-1)
        scores = scores[labels != logits.shape[-1] - 1].flatten().float().tolist()
        threshold, margin = gap_threshold(scores, target, logits.dtype)
        params = {"threshold": threshold, "overlap_mask_area_threshold": OVERLAP_THRESHOLD}
    else:  # instance: class score x mean mask probability, as transformers computes it: read at threshold 0
        results = reference.postprocess(outputs, sizes, {"threshold": 0.0})
        scores = [s["score"] for r in results for s in r["segments_info"]]
        threshold, margin = gap_threshold(scores, target)
        params = {"threshold": threshold}
    return {"params": params, "threshold": threshold, "margin": margin}


def _as_cpu(t: Any) -> torch.Tensor:
    return torch.as_tensor(t).detach().cpu()


def _label_map(result: Any) -> torch.Tensor:
    """A semantic result: the (H, W) label map itself, or a result with ``segmentation``."""
    return _as_cpu(result if isinstance(result, torch.Tensor) else result["segmentation"])


def compare_e2e(task: str, got: list, expected: list, got_pixels: torch.Tensor, expected_pixels: torch.Tensor,
                dtype: torch.dtype) -> tuple[bool, str, dict[str, Any]]:
    """Does eomt_fast's pipeline agree with transformers' under E2E_RULE? (ok, one line, measured values)."""
    problems: list[str] = []
    got_pixels, expected_pixels = _as_cpu(got_pixels).float(), _as_cpu(expected_pixels).float()
    if got_pixels.shape != expected_pixels.shape:
        return False, f"pixel_values shapes differ: {tuple(got_pixels.shape)} vs {tuple(expected_pixels.shape)}", {}
    diff = (got_pixels - expected_pixels).abs()
    measured: dict[str, Any] = {"pixel_values_max_diff": diff.max().item() if diff.numel() else 0.0,
                                "pixel_values_differing": (diff > 1e-5).float().mean().item() if diff.numel() else 0.0}
    if measured["pixel_values_max_diff"] > ONE_LEVEL or measured["pixel_values_differing"] > PIXEL_VALUE_FRACTION:
        problems.append(f"pixel_values differ by up to {measured['pixel_values_max_diff']:.3g} on "
                        f"{100 * measured['pixel_values_differing']:.2f}% of the values")
    if len(got) != len(expected):
        return False, f"{len(got)} results for {len(expected)} images", measured
    mismatch, score_diff, segments = 0.0, 0.0, []
    for i, (ours, theirs) in enumerate(zip(got, expected)):
        if task == "semantic":
            ours_map, theirs_map = _label_map(ours), _label_map(theirs)
            if ours_map.shape != theirs_map.shape:
                problems.append(f"image {i}: label maps of shapes {tuple(ours_map.shape)} and "
                                f"{tuple(theirs_map.shape)}")
                continue
            mismatch = max(mismatch, (ours_map != theirs_map).float().mean().item())
            big = [set((torch.bincount(m.flatten()) >= SEMANTIC_MIN_AREA * m.numel()).nonzero().flatten().tolist())
                   for m in (ours_map, theirs_map)]
            segments.append(len(big[1]))
            if big[0] != big[1]:
                problems.append(f"image {i}: classes {sorted(big[0] ^ big[1])} cover >= {SEMANTIC_MIN_AREA:.1%} "
                                "of the image in one result only")
            continue
        ours_info, theirs_info = ours["segments_info"], theirs["segments_info"]
        segments.append(len(theirs_info))
        ours_labels = [s["label_id"] for s in sorted(ours_info, key=lambda s: s["id"])]
        theirs_labels = [s["label_id"] for s in sorted(theirs_info, key=lambda s: s["id"])]
        if ours_labels != theirs_labels:
            problems.append(f"image {i}: {len(ours_labels)} segments labelled {ours_labels[:8]}... vs "
                            f"{len(theirs_labels)} labelled {theirs_labels[:8]}...")
            continue
        for a, b in zip(sorted(ours_info, key=lambda s: s["id"]), sorted(theirs_info, key=lambda s: s["id"])):
            score_diff = max(score_diff, abs(a["score"] - b["score"]))
        ours_map, theirs_map = _as_cpu(ours["segmentation"]), _as_cpu(theirs["segmentation"])
        if ours_map.shape != theirs_map.shape:
            problems.append(f"image {i}: segment maps of shapes {tuple(ours_map.shape)} and {tuple(theirs_map.shape)}")
            continue
        mismatch = max(mismatch, (ours_map != theirs_map).float().mean().item())
    measured.update(map_mismatch=mismatch, score_max_diff=score_diff,
                    segments_per_image=sum(segments) / max(1, len(segments)))
    if mismatch > MAP_MISMATCH[dtype]:
        problems.append(f"segment maps differ on {100 * mismatch:.2f}% of the pixels "
                        f"(> {100 * MAP_MISMATCH[dtype]:.1f}%)")
    if score_diff > SCORE_TOLERANCE[dtype]:
        problems.append(f"segment scores differ by {score_diff:.3g} (> {SCORE_TOLERANCE[dtype]:.3g})")
    line = (f"{measured['segments_per_image']:.3g} segments/image, maps differ on {100 * mismatch:.3f}% of the "
            f"pixels, scores by {score_diff:.2g}, pixel_values by <= {measured['pixel_values_max_diff']:.3g} on "
            f"{100 * measured['pixel_values_differing']:.3f}% of the values")
    return not problems, ("ok: " + line) if not problems else ("MISMATCH: " + "; ".join(problems)), measured


def stage_times(pipeline: Pipeline, images: list, repeats: int) -> dict[str, float]:
    """Median ms of each stage, measured apart (a device synchronize after each: unlike the whole-pipeline
    timing, no stage overlaps the next, so the parts may add up to more than the whole)."""
    times: dict[str, list[float]] = {"preprocess_ms": [], "model_ms": [], "postprocess_ms": []}
    harness = load_harness()
    for _ in range(repeats):
        t0 = time.perf_counter()
        pixel_values, offsets, sizes = pipeline.preprocess(images)
        harness.synchronize(pipeline.device)
        t1 = time.perf_counter()
        outputs = pipeline.forward(pixel_values, offsets)
        harness.synchronize(pipeline.device)
        t2 = time.perf_counter()
        pipeline.postprocess(outputs, sizes, pipeline.params or {})
        harness.synchronize(pipeline.device)
        t3 = time.perf_counter()
        for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[key].append(value * 1e3)
    return {key: harness.percentile(values, 0.5) for key, values in times.items()}


def e2e_notes(device: torch.device) -> list[str]:
    notes = [
        "e2e rows: generated photo-like decoded images (numpy HWC uint8 RGB; no file decoding) in, segments out: "
        "eomt_fast = EomtFastImageProcessor.preprocess on the model's device -> EomtFastForUniversalSegmentation "
        "as loaded by default (cuda_graphs='auto': on CUDA the timed calls replay a graph per batch size) -> "
        "its post_process_<task>_segmentation; transformers = EomtImageProcessor (its class and where it "
        "preprocesses: transformers_processor in the row) -> EomtForUniversalSegmentation (sdpa) -> its "
        "post_process_<task>_segmentation; the same random weights; wall clock per call, every call ending "
        "with a device synchronize; preprocess/model/postprocess ms: medians of the stages timed apart",
        "e2e rows: random weights give no segment at transformers' defaults (threshold 0.8, "
        "overlap_mask_area_threshold 0.8), so: the class head's 'no object' bias -10 and class weights and biases "
        "x5 (both models), the panoptic/instance threshold set per run at the midpoint of the widest gap in "
        "transformers' scores around 10% of the queries per image (threshold and margin in the row), "
        "overlap_mask_area_threshold 0 (random masks overlap: at 0.8 none survives); semantic has no threshold",
        E2E_RULE,
    ]
    if device.type == "cpu":
        notes.append("CPU: the eomt_fast rows run the plain-PyTorch fallback of every op; these numbers say nothing "
                     "about GPU speed")
    return notes


def run_e2e(args: argparse.Namespace) -> int:
    """``eomt-fast bench --e2e``: decoded images -> segments, eomt_fast against transformers."""
    harness, device, dtype, config, model_name = _setup(args)
    try:
        width, height = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--image-size must be WIDTHxHEIGHT, e.g. 640x480, got {args.image_size!r}") from None
    if any(b < 1 for b in args.batch):
        raise ValueError(f"batch sizes must be >= 1, got {args.batch}")
    names = [n for n in (args.impls or E2E_IMPLS) if n in E2E_IMPLS]
    if not names:
        raise ValueError(f"--e2e times {', '.join(E2E_IMPLS)}; --impls names none of them")
    maskings = {"off": [False], "on": [True], "both": [False, True]}[args.masking or "off"]
    budget = min(args.budget, 0.5) if args.quick else args.budget
    min_repeats = min(args.min_repeats, 3) if args.quick else args.min_repeats

    def stage_repeats(first_call_s: float) -> int:  # the stages timed apart: about one budget's worth, 2 to 10 runs
        return max(2, min(3 if args.quick else 10, int(budget / max(first_call_s, 1e-3))))

    env = harness.environment(device)
    ceilings = harness.measure_ceilings(device, quick=args.quick)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | transformers {env['transformers']} | "
          f"commit {env['commit'][:12]}")
    from .testing import random_hf_model

    t0 = time.perf_counter()
    hf = random_hf_model(seed=args.seed, dtype=dtype, attn_implementation="sdpa", **hf_config_kwargs(config)).to(device)
    boost_class_head(hf)
    ours = EomtFastForUniversalSegmentation.from_hf(hf, backend=args.backend)
    pipelines, their_processor = make_pipelines(args.task, config, hf, ours, device, dtype)
    print(f"e2e {args.task}: {model_name} ({config.image_size}px model), {width}x{height} uint8 images, "
          f"{harness.dtype_name(dtype)}, eomt_fast backend={args.backend}, forward {_forward_mode(ours)}; "
          f"transformers: {their_processor}; "
          f"built in {time.perf_counter() - t0:.1f} s")
    shape = f"{args.task}-{width}x{height}"
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    failed, path = False, None
    with torch.inference_mode():
        for batch in args.batch:
            images = generated_images(batch, height, width, seed=args.seed + batch)
            for masking in maskings:
                set_masking([hf, ours], masking)
                group = dict(benchmark="e2e", model=model_name, shape=shape, batch=batch,
                             dtype=harness.dtype_name(dtype), masking=masking)
                choice = choose_thresholds(args.task, pipelines["transformers"], images, config.num_queries,
                                           args.kept_fraction)
                for p in pipelines.values():
                    p.params = choice["params"]
                print(f"\n{model_name} {shape} batch {batch} masking {'on' if masking else 'off'}: post-processing "
                      f"{choice['params'] or 'defaults'}" + (f" (margin {choice['margin']:.3g})"
                                                             if choice["margin"] is not None else ""))
                # 1. check: both pipelines once (the first call also warms up), eomt_fast's against transformers'
                first: dict[str, float] = {}
                results: dict[str, Any] = {}
                for name in E2E_IMPLS:
                    start = time.perf_counter()
                    try:
                        results[name] = pipelines[name](images)
                    except Exception as exc:  # noqa: BLE001
                        results[name] = exc
                    first[name] = time.perf_counter() - start
                broken = [n for n in E2E_IMPLS if isinstance(results[n], Exception)]
                ok, line, measured = False, "", {}
                if not broken:
                    got_pixels = pipelines["eomt_fast"].preprocess(images)[0]
                    expected_pixels = pipelines["transformers"].preprocess(images)[0]
                    ok, line, measured = compare_e2e(args.task, results["eomt_fast"], results["transformers"],
                                                     got_pixels, expected_pixels, dtype)
                    print(f"  check: {line}")
                else:
                    line = "; ".join(f"{n} failed: {_reason(results[n])}" for n in broken)
                    print(f"  {line}")
                checked = [n for n in names if n not in broken and (ok or n == "transformers")]
                for n in names:
                    if n not in checked:
                        failed = True
                        reason = _reason(results[n]) if n in broken else f"output {line}"
                        skipped.append(dict(group, impl=n, reason=reason))
                        print(f"  {n:<14} NOT TIMED: {reason}")
                # 2. time: whole pipelines in rounds (wall clock), then the stages apart
                setups = {n: (lambda p=pipelines[n]: lambda: p(images)) for n in checked}
                timings = harness.time_interleaved(setups, warmup=3 if device.type == "cuda" else 1,
                                                   budget_s=budget, min_repeats=min_repeats, max_repeats=200)
                group_rows = []
                for n in checked:
                    timing = timings[n]
                    if isinstance(timing, Exception):
                        failed = True
                        skipped.append(dict(group, impl=n, reason=_reason(timing)))
                        continue
                    row = dict(group, impl=n, median_ms=timing.median_ms, p20_ms=timing.p20_ms,
                               p80_ms=timing.p80_ms, samples=timing.samples, method=timing.method,
                               images_per_s=batch / (timing.median_ms * 1e-3), first_call_s=first[n],
                               task=args.task, image_size=f"{width}x{height}", model_image_size=config.image_size,
                               transformers_processor=their_processor, threshold=choice["threshold"],
                               threshold_margin=choice["margin"], post_params=choice["params"], check=line,
                               **({"threads": torch.get_num_threads()} if device.type == "cpu" else {}),
                               **measured, **stage_times(pipelines[n], images, stage_repeats(first[n])))
                    group_rows.append(row)
                rows.extend(group_rows)
                print_e2e_table(group_rows)
                if not args.no_write and (rows or skipped):
                    path = harness.write_results(rows, env, ceilings, args.results_dir, skipped=skipped,
                                                 notes=e2e_notes(device))
    if path is not None:
        print(f"\nwrote {path} (+ .md, .png)")
    return 1 if failed else 0


def print_e2e_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    ours = next((r["median_ms"] for r in rows if r["impl"] == "eomt_fast"), None)
    print(f"  {'impl':<14} {'ms median [p20-p80]':<28} {'img/s':>8} {'pre ms':>8} {'model ms':>9} {'post ms':>8} "
          f"{'eomt_fast speedup':>18}")
    for r in rows:
        speedup = "" if ours is None or r["impl"] == "eomt_fast" else f"{r['median_ms'] / ours:.2f}x"
        timing = f"{r['median_ms']:.4g} [{r['p20_ms']:.4g}-{r['p80_ms']:.4g}]"
        print(f"  {r['impl']:<14} {timing:<28} {r['images_per_s']:8.3g} {r['preprocess_ms']:8.3g} "
              f"{r['model_ms']:9.3g} {r['postprocess_ms']:8.3g} {speedup:>18}")
