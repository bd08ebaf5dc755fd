"""The benchmark harness shared by ``eomt-fast bench`` and the kernel scripts in this directory.

What it does, top to bottom:
- timing: on a GPU ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])`` (CUDA events around every
  call, L2 cleared before each) or ``do_bench_cudagraph`` for microsecond-scale work, with inputs rotated
  so that they do not sit in L2; on a CPU, medians and 20/80 percentiles of wall-clock runs after warm-up;
- counting: FLOP of the whole EoMT network for any config (``model_flops``) and small FLOP/byte helpers;
- ceilings: a large matmul (bf16 on a GPU, fp32 on a CPU) and a large copy, measured in every run, so
  that achieved numbers can be read against what this very device did today;
- environment: device, versions, commit, date, clocks;
- results: ``results/<date>_<device-slug>.json`` (merged with what is already there, by key), a markdown
  table and a PNG chart beside it; ``kernel_arg_parser`` + ``run_kernel_benchmark`` for the kernel scripts.

Also a small command line: ``python bench/harness.py slug`` (the file-name stem of this device's results),
``python bench/harness.py render FILE.json`` (rewrite the markdown and the chart from a JSON),
``python bench/harness.py validate FILE.json``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
QUANTILES = [0.5, 0.2, 0.8]  # median, p20, p80: the order triton.testing returns them in
DEFAULT_L2_BYTES = 50 * 2**20  # H100: 50 MB; read from the device when torch exposes it


# ================================================================================================
# Timing
# ================================================================================================
@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20th / 80th percentiles, and how they were obtained."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int
    method: str  # "wallclock", "do_bench", "do_bench_cudagraph", "cuda-events"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation between the sorted values (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(times_ms: Sequence[float], method: str) -> Timing:
    return Timing(percentile(times_ms, 0.5), percentile(times_ms, 0.2), percentile(times_ms, 0.8),
                  len(times_ms), method)


def time_cpu(fn: Callable[[], Any], *, warmup: int = 1, min_repeats: int = 5, max_repeats: int = 100,
             budget_s: float = 5.0, min_sample_ms: float = 1.0) -> Timing:
    """Wall-clock time of ``fn()`` on a CPU: ``warmup`` untimed calls, then samples until at least
    ``min_repeats`` were taken and ``budget_s`` is spent (or ``max_repeats`` reached). Calls much
    shorter than ``min_sample_ms`` are grouped so that each sample lasts about that long."""
    start = time.perf_counter()
    for _ in range(max(1, warmup)):
        fn()
    estimate_ms = (time.perf_counter() - start) * 1e3 / max(1, warmup)
    inner = max(1, math.ceil(min_sample_ms / max(estimate_ms, 1e-6)))
    times: list[float] = []
    spent = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - spent < budget_s):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) * 1e3 / inner)
    return summarize(times, "wallclock")


def time_interleaved(setups: dict[str, Callable[[], Callable[[], Any]]], *, warmup: int = 1, min_repeats: int = 5,
                     max_repeats: int = 100, budget_s: float = 5.0) -> dict[str, Timing | Exception]:
    """Wall-clock times of several implementations on a CPU, taken in rounds: every round calls each once
    (in a rotating order), so that load from other processes on a shared machine falls on all of them
    alike instead of on whichever happened to run at the wrong moment. ``setups[name]()`` (untimed, before
    each call) returns the zero-argument call to time. Rounds continue until ``min_repeats`` were taken and
    ``budget_s`` per implementation is spent, or ``max_repeats``. An implementation that raises is dropped
    and its exception returned in its place."""
    failures: dict[str, Exception] = {}
    live = list(setups)
    for name in list(live):
        try:
            for _ in range(warmup):
                setups[name]()()
        except Exception as exc:  # noqa: BLE001  (reported to the caller)
            failures[name] = exc
            live.remove(name)
    times: dict[str, list[float]] = {name: [] for name in live}
    start, rounds = time.perf_counter(), 0
    while live and rounds < max_repeats and (rounds < min_repeats or
                                              time.perf_counter() - start < budget_s * len(setups)):
        for name in live[rounds % len(live):] + live[:rounds % len(live)]:
            call = setups[name]()
            t0 = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    result: dict[str, Timing | Exception] = {name: summarize(t, "wallclock-interleaved") for name, t in times.items()}
    result.update(failures)
    return result


def l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES)
    return DEFAULT_L2_BYTES


def rotation_count(bytes_per_set: int, cache_bytes: int, limit: int = 64) -> int:
    """How many copies of an input set to cycle through so that, by the time a set is used again, the
    others have pushed it out of a cache of ``cache_bytes`` (their total is at least twice the cache).
    1 when one set alone is larger than the cache."""
    if bytes_per_set <= 0 or bytes_per_set >= cache_bytes:
        return 1
    return min(limit, math.ceil(2 * cache_bytes / bytes_per_set))


def tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o) for o in obj.values())
    return 0


def _triton_testing():
    try:
        import triton.testing

        return triton.testing
    except ImportError:
        return None


def time_cuda(fn: Callable[[], Any], *, cudagraph: bool = False, calls_per_fn: int = 1,
              rep_ms: float | None = None, warmup_ms: float = 25.0) -> Timing:
    """GPU time of one call: ``do_bench`` (events around each call, L2 cleared before each) or, for
    microsecond work, ``do_bench_cudagraph`` (``calls_per_fn`` calls unrolled in one graph replay: the
    result is divided by it). Falls back to plain CUDA events when triton is missing."""
    testing = _triton_testing()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    estimate_ms = (time.perf_counter() - t0) * 1e3
    if rep_ms is None:  # at least ~25 timed calls, at most a few seconds
        rep_ms = min(5000.0, max(100.0, 25 * estimate_ms))
    if testing is not None and cudagraph:
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a Triton kernel finalised by the GC during capture would invalidate the graph
        try:
            med, p20, p80 = testing.do_bench_cudagraph(fn, rep=rep_ms, quantiles=QUANTILES)
            return Timing(med / calls_per_fn, p20 / calls_per_fn, p80 / calls_per_fn, 10, "do_bench_cudagraph")
        except Exception as exc:  # an op that cannot be captured (host sync, ...): time it without graphs
            print(f"  (CUDA graph capture failed, timing without: {type(exc).__name__}: {exc})", file=sys.stderr)
        finally:
            if gc_was_enabled:
                gc.enable()
    if testing is not None:
        med, p20, p80 = testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=QUANTILES)
        samples = max(1, int(rep_ms / max(estimate_ms, 1e-3)))
        return Timing(med / calls_per_fn, p20 / calls_per_fn, p80 / calls_per_fn, samples, "do_bench")
    times = []
    for _ in range(max(5, int(rep_ms / max(estimate_ms, 1e-3)))):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls_per_fn)
    return summarize(times, "cuda-events")


def time_call(fn: Callable[..., Any], arg_sets: Sequence[tuple], device: torch.device, *,
              cudagraph: bool | None = None, budget_s: float = 5.0, min_repeats: int = 5,
              max_repeats: int = 100, warmup: int = 1) -> Timing:
    """Time ``fn(*args)`` cycling through ``arg_sets`` (fresh random copies of the same inputs).

    On CUDA, ``cudagraph=None`` picks CUDA graphs for calls under a millisecond (launch overhead would
    otherwise dominate), judged on a second call: the first may compile and autotune (seconds), which once
    sent microsecond kernels to ``do_bench`` and timed their host launch instead of the GPU (H200,
    2026-12-04). Inside a graph every set is called once per replay. On a CPU the sets are simply cycled."""
    if device.type == "cuda":
        if cudagraph is None:
            fn(*arg_sets[0])  # compiles, autotunes
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(*arg_sets[0])
            torch.cuda.synchronize()
            cudagraph = (time.perf_counter() - t0) < 1e-3
        if cudagraph:
            def all_sets() -> None:
                for args in arg_sets:
                    fn(*args)

            return time_cuda(all_sets, cudagraph=True, calls_per_fn=len(arg_sets))
        cycle = itertools.cycle(arg_sets)
        return time_cuda(lambda: fn(*next(cycle)))
    cycle = itertools.cycle(arg_sets)
    return time_cpu(lambda: fn(*next(cycle)), warmup=warmup, min_repeats=min_repeats, max_repeats=max_repeats,
                    budget_s=budget_s)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ================================================================================================
# Counting
# ================================================================================================
def linear_flops(rows: int, in_features: int, out_features: int) -> float:
    """A GEMM (rows x in) @ (in x out): 2 FLOP per multiply-add."""
    return 2.0 * rows * in_features * out_features


def attention_flops(batch: int, seq_q: int, seq_k: int, hidden: int) -> float:
    """softmax(Q K^T) V over all heads: two GEMMs, 2 * 2 * Sq * Sk * C (softmax not counted)."""
    return 4.0 * batch * seq_q * seq_k * hidden


def predict_flops(cfg: Any, batch: int, einsum_side: int | None = None,
                  with_class_head: bool = True) -> dict[str, float]:
    """FLOP of predict(): mask head, upscale blocks (ConvT 2x2 as a GEMM C -> 4C per input pixel and the
    depthwise 3x3), the mask-logit einsum at ``einsum_side`` x ``einsum_side`` (default: full mask
    resolution), and the class head."""
    c, q, g = cfg.hidden_size, cfg.num_queries, cfg.image_size // cfg.patch_size
    parts = {"mask_head": 3 * linear_flops(batch * q, c, c), "convt": 0.0, "depthwise": 0.0}
    side = g
    for _ in range(cfg.num_upscale_blocks):
        parts["convt"] += linear_flops(batch * side * side, c, 4 * c)
        side *= 2
        parts["depthwise"] += 2.0 * 9 * c * batch * side * side
    einsum_side = side if einsum_side is None else einsum_side
    parts["einsum"] = linear_flops(batch * q, c, einsum_side * einsum_side)
    parts["class_head"] = linear_flops(batch * q, c, cfg_num_labels(cfg) + 1) if with_class_head else 0.0
    return parts


def cfg_num_labels(cfg: Any) -> int:
    return int(getattr(cfg, "num_labels", None) or len(getattr(cfg, "id2label", {}) or {}) or 2)


def layer_flops(cfg: Any, batch: int, seq: int) -> dict[str, float]:
    """One encoder layer at ``seq`` tokens: QKV, output projection, MLP (GELU or SwiGLU) and attention."""
    c, hidden, gated = cfg.hidden_size, cfg.mlp_hidden_size, cfg.gated_mlp  # rotary (DINOv3): not counted
    if gated:
        mlp = linear_flops(batch * seq, c, 2 * hidden) + linear_flops(batch * seq, hidden, c)
    else:
        mlp = linear_flops(batch * seq, c, hidden) + linear_flops(batch * seq, hidden, c)
    linear = linear_flops(batch * seq, c, 3 * c) + linear_flops(batch * seq, c, c) + mlp
    return {"linear": linear, "attention": attention_flops(batch, seq, seq, c)}


def model_flops(cfg: Any, batch: int = 1, masked_blocks: int = 0) -> dict[str, float]:
    """FLOP of one forward of the EoMT network (2 per multiply-add; LayerNorm, GELU, softmax and adds are
    not counted), for an ``EomtFastConfig`` (or anything with its attribute and property names).

    ``masked_blocks``: how many of the query layers run a masked-attention predict() (attn_mask_probs > 0);
    each costs one more predict() with the einsum at grid resolution (what eomt_fast computes; transformers
    computes it at full resolution and then interpolates: more work, same result) and no class head.
    Returns the parts and their ``total``.
    """
    g = cfg.image_size // cfg.patch_size
    prefix = 1 + cfg.num_register_tokens
    s0 = prefix + g * g
    s = s0 + cfg.num_queries
    nb = cfg.num_blocks
    early, late = layer_flops(cfg, batch, s0), layer_flops(cfg, batch, s)
    parts = {
        "patch_embed": linear_flops(batch * g * g, cfg.num_channels * cfg.patch_size**2, cfg.hidden_size),
        "layers_linear": (cfg.num_hidden_layers - nb) * early["linear"] + nb * late["linear"],
        "layers_attention": (cfg.num_hidden_layers - nb) * early["attention"] + nb * late["attention"],
        "predict": sum(predict_flops(cfg, batch).values()),
        "masked_predicts": masked_blocks * sum(predict_flops(cfg, batch, einsum_side=g,
                                                             with_class_head=False).values()),
    }
    parts["total"] = sum(parts.values())
    return parts


# ================================================================================================
# Ceilings and environment
# ================================================================================================
def measure_ceilings(device: torch.device, quick: bool = False) -> dict[str, Any]:
    """What this device does today: a large matmul (bf16 on a GPU, fp32 on a CPU) in TFLOP/s and a large
    copy in TB/s (bytes read + bytes written)."""
    gen = torch.Generator(device=device).manual_seed(1234)
    if device.type == "cuda":
        n, dtype, copy_bytes = 8192, torch.bfloat16, 2**30
    else:
        n, dtype, copy_bytes = (1024 if quick else 2048), torch.float32, (2**26 if quick else 2**28)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    mm = time_call(torch.matmul, [(a, b)], device, cudagraph=False, budget_s=0.3 if quick else 2.0, min_repeats=3)
    del a, b
    src = torch.randn(copy_bytes // 4, device=device, generator=gen)
    dst = torch.empty_like(src)
    cp = time_call(lambda: dst.copy_(src), [()], device, cudagraph=False, budget_s=0.3 if quick else 1.0,
                   min_repeats=3)
    del src, dst
    return {
        "matmul_tflops": linear_flops(n, n, n) / (mm.median_ms * 1e-3) / 1e12,
        "copy_tbps": 2 * copy_bytes / (cp.median_ms * 1e-3) / 1e12,
        "matmul": f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')} torch.matmul, median {mm.median_ms:.3f} ms",
        "copy": f"{copy_bytes / 2**20:.0f} MiB tensor copy_, median {cp.median_ms:.3f} ms (read + write counted)",
    }


def best_ceilings(*measurements: dict[str, Any]) -> dict[str, Any]:
    """The highest of several ceiling measurements of one run (on a shared CPU the load varies)."""
    best = dict(measurements[0])
    for key in ("matmul_tflops", "copy_tbps"):
        values = [m[key] for m in measurements]
        best[key] = max(values)
        if len(values) > 1:
            best[f"{key}_measured"] = values
    return best


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_description() -> str:
    """'AMD EPYC (family 25 model 17), 2 CPUs' from /proc/cpuinfo, or platform's description."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if ":" in line:
                    key, _, value = line.partition(":")
                    info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    details = [f"family {info['cpu family']} model {info['model']}"] if "cpu family" in info and "model" in info else []
    if "hypervisor" in info.get("flags", "").split():
        details.append("virtual machine")
    return f"{name}{' (' + ', '.join(details) + ')' if details else ''}, {cpus} CPUs"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_description()


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: torch.device) -> str:
    """File-name stem for a device: 'nvidia-h100-80gb-hbm3', 'cpu-amd-epyc-2cpus'."""
    if device.type == "cuda":
        return slugify(torch.cuda.get_device_name(device))
    name = cpu_description()
    name = re.sub(r"\s*\(family [^)]*\)", "", name)
    return "cpu-" + slugify(name)


def git_commit() -> tuple[str, bool | None]:
    """(commit, tree has uncommitted changes). EOMT_FAST_COMMIT overrides (a copy without .git)."""
    override = os.environ.get("EOMT_FAST_COMMIT")
    if override:
        return override, None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                capture_output=True, text=True, check=True, timeout=10).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def gpu_clocks(device: torch.device) -> dict[str, Any]:
    """Clocks as torch (through NVML) or nvidia-smi report them; empty when neither can."""
    clocks: dict[str, Any] = {}
    try:
        clocks["sm_clock_mhz_now"] = int(torch.cuda.clock_rate(device))
    except Exception:  # needs pynvml
        pass
    try:
        fields = "clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,driver_version"
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits",
                              f"--id={device.index or 0}"], capture_output=True, text=True, timeout=20, check=True)
        values = [v.strip() for v in out.stdout.strip().split(",")]
        clocks.update(dict(zip(("sm_clock_mhz", "sm_clock_max_mhz", "mem_clock_mhz", "mem_clock_max_mhz",
                                "power_limit_w", "driver"), values)))
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return clocks


def environment(device: torch.device) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.timezone.utc)
    commit, dirty = git_commit()
    env: dict[str, Any] = {
        "device": device_name(device),
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "commit": commit,
        "dirty": dirty,
        "date": now.strftime("%Y-%m-%d"),
        "timestamp": now.isoformat(timespec="seconds"),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                   memory_gb=round(props.total_memory / 2**30, 1), l2_mb=round(l2_bytes(device) / 2**20, 1),
                   clocks=gpu_clocks(device))
    else:
        env.update(threads=torch.get_num_threads(), cpu=cpu_description())
        if hasattr(os, "getloadavg"):  # other work on a shared CPU shows here, and in the p20-p80 spread
            env["load_avg_1m_at_start"] = round(os.getloadavg()[0], 2)
    return env


# ================================================================================================
# Results: JSON (merged by key), markdown, chart
# ================================================================================================
TOP_LEVEL = {"device": str, "torch": str, "triton": str, "commit": str, "date": str, "ceilings": dict,
             "results": list}
ROW_FIELDS = {"benchmark": str, "model": str, "batch": int, "dtype": str, "masking": bool, "impl": str,
              "median_ms": float, "p20_ms": float, "p80_ms": float}
# CUDA memory of model rows (eomt_fast/bench.py peak_memory), MiB; absent (or null) on CPU rows
MEMORY_FIELDS = ("peak_mem_mb", "forward_mem_mb", "weights_mb")
KEY_FIELDS = ("benchmark", "model", "shape", "batch", "dtype", "masking", "impl")
MODEL_BASELINES = ("transformers-eager", "transformers-sdpa", "transformers-compile",
                   "transformers-compile-max-autotune")


class SchemaError(ValueError):
    """A results document that does not follow the schema."""


def validate(doc: Any) -> None:
    """Raise SchemaError unless ``doc`` follows the results schema (extra keys are allowed)."""
    if not isinstance(doc, dict):
        raise SchemaError(f"results must be a JSON object, got {type(doc).__name__}")
    for key, kind in TOP_LEVEL.items():
        if not isinstance(doc.get(key), kind):
            raise SchemaError(f"{key!r} must be {kind.__name__}, got {doc.get(key)!r}")
    for key in ("matmul_tflops", "copy_tbps"):
        value = doc["ceilings"].get(key)
        if not isinstance(value, float) or not math.isfinite(value):
            raise SchemaError(f"ceilings.{key} must be a finite float, got {value!r}")
    for i, row in enumerate(doc["results"]):
        if not isinstance(row, dict):
            raise SchemaError(f"results[{i}] must be an object")
        for key, kind in ROW_FIELDS.items():
            value = row.get(key)
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            if ok and kind is float:
                ok = math.isfinite(value) and value >= 0
            if not ok:
                raise SchemaError(f"results[{i}].{key} must be {kind.__name__}, got {value!r}")
        for key in MEMORY_FIELDS:
            value = row.get(key)
            if value is not None and not (isinstance(value, float) and math.isfinite(value) and value >= 0):
                raise SchemaError(f"results[{i}].{key} must be a finite float >= 0 (MiB) or absent, got {value!r}")
        if not row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]:
            raise SchemaError(f"results[{i}]: expected p20 <= median <= p80, got {row['p20_ms']}, "
                              f"{row['median_ms']}, {row['p80_ms']}")


def row_key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in KEY_FIELDS)


def merge(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Merge a new run into an existing document of the same day and device: rows with the same key
    (benchmark, model, shape, batch, dtype, masking, impl) are replaced by the new ones, others kept in
    their order, new keys appended. Top-level fields describe the latest run; ``runs`` lists all runs."""
    if old is None:
        merged = dict(new)
        merged["runs"] = list(new.get("runs", []))
        return merged
    # a key the new run timed or refused replaces what the old runs said about it
    new_keys = {row_key(r) for r in new["results"]} | {row_key(s) for s in new.get("skipped", [])}
    rows = [r for r in old["results"] if row_key(r) not in new_keys] + list(new["results"])
    skipped = [s for s in old.get("skipped", []) if row_key(s) not in new_keys] + list(new.get("skipped", []))
    notes = list(dict.fromkeys(list(old.get("notes", [])) + list(new.get("notes", []))))
    merged = {**old, **{k: v for k, v in new.items() if k not in ("results", "skipped", "notes", "runs")}}
    merged.update(results=rows, skipped=skipped, notes=notes,
                  runs=_merge_runs(old.get("runs", []), new.get("runs", [])))
    return merged


def _merge_runs(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per run: a run that writes after every case updates its own entry."""
    key = lambda r: (r.get("timestamp"), r.get("command"))  # noqa: E731
    new_keys = {key(r) for r in new}
    return [r for r in old if key(r) not in new_keys] + list(new)


def results_path(env: dict[str, Any], results_dir: str | os.PathLike | None = None) -> Path:
    return Path(results_dir or RESULTS_DIR) / f"{env['date']}_{env['device_slug']}.json"


def load(path: str | os.PathLike) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    validate(doc)
    return doc


def write_results(rows: list[dict[str, Any]], env: dict[str, Any], ceilings: dict[str, Any],
                  results_dir: str | os.PathLike | None = None, *, skipped: Iterable[dict[str, Any]] = (),
                  notes: Iterable[str] = (), command: str | None = None, chart: bool = True) -> Path:
    """Write (or merge into) ``<results_dir>/<date>_<device-slug>.json`` and rewrite the .md and .png."""
    stamp = {"commit": env["commit"], "timestamp": env["timestamp"]}
    rows = [{**row, **{k: v for k, v in stamp.items() if k not in row}} for row in rows]
    run = {k: env[k] for k in ("timestamp", "commit", "dirty", "torch", "triton", "transformers") if k in env}
    run.update(ceilings=ceilings, command=command or " ".join(sys.argv))
    new = {
        "device": env["device"], "torch": env["torch"], "triton": env["triton"], "commit": env["commit"],
        "date": env["date"], "ceilings": ceilings, "results": rows,
        "environment": env, "skipped": [dict(s, **stamp) for s in skipped], "notes": list(notes), "runs": [run],
    }
    validate(new)
    path = results_path(env, results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = load(path) if path.exists() else None
    doc = merge(old, new)
    validate(doc)
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    path.with_suffix(".md").write_text(render_markdown(doc), encoding="utf-8")
    if chart:
        try:
            render_chart(doc, path.with_suffix(".png"))
        except ImportError:  # e.g. the GPU machine: no matplotlib, no network to install it
            print(f"matplotlib is not installed: no chart; draw it elsewhere with "
                  f"`python bench/harness.py render {path}`", file=sys.stderr)
    return path


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _ms(value: float) -> str:
    """4 significant digits without an exponent: 0.01234, 12.34, 11930."""
    return f"{value:.0f}" if value >= 1e4 else f"{value:.4g}"


def _timing(row: dict[str, Any]) -> str:
    return f"{_ms(row['median_ms'])} [{_ms(row['p20_ms'])}-{_ms(row['p80_ms'])}]"


def _group_key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in ("benchmark", "model", "shape", "batch", "dtype", "masking"))


def speedups(rows: list[dict[str, Any]], ours: str | None = None,
             against: str | None = None) -> dict[tuple, float]:
    """Speedups within each group (same benchmark, model, shape, batch, dtype, masking), by row key:
    with ``ours``, how many times faster ``ours`` is than the row's impl (row ms / ours ms; model rows:
    ours = eomt_fast); with ``against``, how many times faster the row's impl is than ``against``."""
    by_group: dict[tuple, dict[str, float]] = {}
    for r in rows:
        by_group.setdefault(_group_key(r), {})[r["impl"]] = r["median_ms"]
    out = {}
    for r in rows:
        group = by_group[_group_key(r)]
        if ours is not None and ours in group and r["impl"] != ours:
            out[row_key(r)] = r["median_ms"] / group[ours]
        elif against is not None and against in group and r["impl"] != against:
            out[row_key(r)] = group[against] / r["median_ms"]
    return out


STAGES = ("preprocess_ms", "model_ms", "postprocess_ms")  # e2e rows: the stages timed apart


def render_markdown(doc: dict[str, Any]) -> str:
    env = doc.get("environment", {})
    ceil = doc["ceilings"]
    commits = sorted({r.get("commit", doc["commit"]) for r in doc["results"]})
    is_cpu = str(env.get("device_slug", "")).startswith("cpu") or "cpu" in str(doc["device"]).lower()
    lines = [f"# eomt_fast benchmarks: {doc['device']}, {doc['date']}", ""]
    if is_cpu:
        lines += ["> **CPU numbers.** They measure the CPU fallback (plain PyTorch) against transformers on this "
                  "machine and say nothing about GPU speed.", ""]
    lines += [
        f"- device: {doc['device']}" + (f", {env['threads']} torch threads" if "threads" in env else "")
        + (f"; 1-minute load average {env['load_avg_1m_at_start']} when the last run started" if
           "load_avg_1m_at_start" in env else "")
        + (f", {env['load_avg_1m_at_end']} when it ended" if "load_avg_1m_at_end" in env else "")
        + (f", CUDA {env['cuda']}, {env.get('sm_count')} SMs, L2 {env.get('l2_mb')} MB" if "cuda" in env else ""),
        f"- versions: torch {doc['torch']}, triton {doc['triton']}, transformers {env.get('transformers', '?')}, "
        f"python {env.get('python', '?')}",
        f"- commit: {', '.join(commits)}" + (" (working tree had uncommitted changes)" if env.get("dirty") else ""),
        f"- ceilings measured in the run: matmul {ceil['matmul_tflops']:.3g} TFLOP/s ({ceil.get('matmul', '')}); "
        f"copy {ceil['copy_tbps']:.3g} TB/s ({ceil.get('copy', '')})",
    ]
    if env.get("clocks"):
        lines.append("- clocks: " + ", ".join(f"{k} {v}" for k, v in env["clocks"].items()))
    methods = sorted({r.get("method", "?") for r in doc["results"]})
    lines.append("- timing: " + "; ".join(METHOD_TEXT.get(m, m) for m in methods)
                 + ". Times are ms per call: median [p20-p80].")
    for note in doc.get("notes", []):
        lines.append(f"- {note}")
    lines.append("")

    def masking(r: dict[str, Any]) -> str:
        return "on" if r.get("masking") else "off"

    def speedup(table: dict[tuple, float]) -> Callable[[dict[str, Any]], str]:
        return lambda r: "" if table.get(row_key(r)) is None else f"{table[row_key(r)]:.2f}x"

    model_rows = [r for r in doc["results"] if r["benchmark"] == "model"]
    if model_rows:
        lines += _table("Whole network (forward)", model_rows, [
            ("model", "l", lambda r: r["model"]), ("batch", "r", lambda r: r["batch"]),
            ("dtype", "l", lambda r: r["dtype"]), ("masking", "l", masking), ("impl", "l", lambda r: r["impl"]),
            ("ms median [p20-p80]", "l", _timing),
            ("images/s", "r", lambda r: _fmt(r.get("images_per_s"), ".3g")),
            ("TFLOP/s", "r", lambda r: _fmt(r.get("tflops"), ".3g")),
            ("% of matmul ceiling", "r", lambda r: _fmt(r.get("pct_matmul_ceiling"), ".1f")),
            ("eomt_fast speedup (its ms / eomt_fast's)", "r", speedup(speedups(model_rows, "eomt_fast"))),
            ("peak MiB (CUDA)", "r", lambda r: _fmt(r.get("peak_mem_mb"), ".0f"))])
    e2e_rows = [r for r in doc["results"] if r["benchmark"] == "e2e"]
    if e2e_rows:
        lines += _table("End to end (decoded images -> segments)", e2e_rows, [
            ("model", "l", lambda r: r["model"]), ("task, image", "l", lambda r: r.get("shape", "")),
            ("batch", "r", lambda r: r["batch"]), ("dtype", "l", lambda r: r["dtype"]), ("masking", "l", masking),
            ("impl", "l", lambda r: r["impl"]), ("ms median [p20-p80]", "l", _timing),
            ("images/s", "r", lambda r: _fmt(r.get("images_per_s"), ".3g")),
            *((f"{stage.removesuffix('_ms')} ms", "r", lambda r, k=stage: "" if r.get(k) is None else _ms(r[k]))
              for stage in STAGES),
            ("eomt_fast speedup (its ms / eomt_fast's)", "r", speedup(speedups(e2e_rows, "eomt_fast"))),
            ("segments/image", "r", lambda r: _fmt(r.get("segments_per_image"), ".3g"))])
        processors = sorted({str(r["transformers_processor"]) for r in e2e_rows if r.get("transformers_processor")})
        if processors:
            lines[-1:-1] = ["", f"transformers' image processor: {'; '.join(processors)}."]
    kernel_rows = [r for r in doc["results"] if r["benchmark"] not in ("model", "e2e")]
    if kernel_rows:
        lines += _table("Kernels", kernel_rows, [
            ("kernel", "l", lambda r: r["benchmark"]), ("model", "l", lambda r: r["model"]),
            ("shape", "l", lambda r: r.get("shape", "")), ("dtype", "l", lambda r: r["dtype"]),
            ("masking", "l", masking), ("impl", "l", lambda r: r["impl"]), ("ms median [p20-p80]", "l", _timing),
            ("TFLOP/s", "r", lambda r: _fmt(r.get("tflops"), ".3g")),
            ("GB/s", "r", lambda r: _fmt(r.get("gbps"), ".3g")),
            ("speedup over eager", "r", speedup(speedups(kernel_rows, against="eager")))])
    if doc.get("skipped"):
        lines += _table("Not timed", doc["skipped"], [
            ("benchmark", "l", lambda s: s.get("benchmark")), ("model", "l", lambda s: s.get("model")),
            ("shape", "l", lambda s: s.get("shape", "")), ("batch", "r", lambda s: s.get("batch")),
            ("dtype", "l", lambda s: s.get("dtype")), ("masking", "l", masking),
            ("impl", "l", lambda s: s.get("impl")), ("why", "l", lambda s: str(s.get("reason", "")))],
            sort=False)
    runs = doc.get("runs", [])
    if runs:
        lines += ["## Runs merged into this file", ""]
        for r in runs:
            ceil_run = r.get("ceilings", {})
            measured = (f" (matmul {ceil_run['matmul_tflops']:.3g} TFLOP/s, copy {ceil_run['copy_tbps']:.3g} TB/s)"
                        if "matmul_tflops" in ceil_run and "copy_tbps" in ceil_run else "")
            lines.append(f"- {r.get('timestamp')} commit {str(r.get('commit'))[:12]}{measured}: `{r.get('command')}`")
        lines.append("")
    return "\n".join(lines)


def _table(title: str, rows: list[dict[str, Any]],
           columns: list[tuple[str, str, Callable[[dict[str, Any]], Any]]], sort: bool = True) -> list[str]:
    """A markdown section: ``## title``, then one line per row; ``columns`` are (header, "l" or "r", cell).
    Rows are grouped and ordered as everywhere else here unless ``sort`` is false; a "|" inside a cell is
    written "/" so that it cannot split the cell."""
    if sort:
        rows = sorted(rows, key=lambda r: (_sort_group(r), _impl_order(r["impl"])))
    lines = [f"## {title}", "", "| " + " | ".join(h for h, _, _ in columns) + " |",
             "| " + " | ".join("---:" if align == "r" else "---" for _, align, _ in columns) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(str(cell(r)).replace("|", "/") for _, _, cell in columns) + " |")
    return lines + [""]


METHOD_TEXT = {
    "wallclock": "wall clock (time.perf_counter) of repeated calls after warm-up",
    "wallclock-interleaved": "wall clock (time.perf_counter) after warm-up, the implementations of a row group "
                             "called in turn, round after round (so that load from other processes falls on all)",
    "do_bench": "triton.testing.do_bench (CUDA events per call, L2 cleared before each)",
    "do_bench_cudagraph": "triton.testing.do_bench_cudagraph (calls unrolled in a CUDA graph, inputs rotated "
                          "past L2)",
    "cuda-events": "CUDA events around each call",
}


def _impl_order(impl: str) -> tuple:
    order = ["eomt_fast", "eomt_fast-cuda-graphs", "triton", *MODEL_BASELINES, "eager", "compile",
             "compile-max-autotune", "transformers"]
    return (order.index(impl) if impl in order else len(order), impl)


def _sort_group(r: dict[str, Any]) -> tuple:
    return (r["benchmark"], r["model"], str(r.get("shape", "")), r["batch"], r["dtype"], r["masking"])


def render_chart(doc: dict[str, Any], path: str | os.PathLike) -> None:
    """Horizontal bars of the median (whiskers p20-p80), one panel per benchmark, one bar per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(doc["results"], key=lambda r: (_sort_group(r), _impl_order(r["impl"])))
    panels: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        panels.setdefault(r["benchmark"], []).append(r)
    if not panels:
        return
    impls = sorted({r["impl"] for r in rows}, key=_impl_order)
    colors = {impl: plt.get_cmap("tab10")(i % 10) for i, impl in enumerate(impls)}
    heights = [max(1.5, 0.28 * len(p) + 0.8) for p in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights) + 0.6),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (bench, prow) in zip(axes[:, 0], panels.items()):
        labels = []
        for i, r in enumerate(prow):
            ax.barh(i, r["median_ms"], color=colors[r["impl"]],
                    xerr=[[r["median_ms"] - r["p20_ms"]], [r["p80_ms"] - r["median_ms"]]], capsize=2)
            group = (f"{r['model']} {r.get('shape', '')} b{r['batch']} {r['dtype']} "
                     f"mask {'on' if r['masking'] else 'off'}")
            labels.append(f"{group.replace('  ', ' ')} | {r['impl']}")
        ax.set_yticks(range(len(prow)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("ms per call (median, whiskers p20-p80; lower is better)")
        ax.set_title({"model": "whole network forward", "e2e": "end to end: decoded images -> segments"}.get(
            bench, bench), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    cpu = "cpu" in str(doc.get("environment", {}).get("device_slug", ""))
    fig.suptitle(f"eomt_fast benchmarks: {doc['device']}, {doc['date']}"
                 + ("\nCPU numbers: the plain-PyTorch fallback; they say nothing about GPU speed" if cpu else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ================================================================================================
# Output checks
# ================================================================================================
# max |got - expected| / max |expected|, against a reference computed in a higher precision where the
# benchmark dtype is low (bf16/fp16 -> fp32), else in the same dtype.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}
# With masking on, a query->patch mask entry whose logit lies within rounding of 0 can come out either way
# in two correct implementations (the order of the sums differs), and each such flip moves that query's
# outputs by about 1e-3 of their range: fp32 needs a looser bound there (observed: 1.3e-3 for
# transformers under torch.compile against transformers eager, EoMT-S/640). A wrong op is off by > 1e-1.
MASKED_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-2, torch.float16: 2e-2, torch.bfloat16: 6e-2}
BOOL_MISMATCH = {torch.float64: 0.0, torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def relative_error(got: Any, expected: Any) -> float:
    """max |got - expected| / max |expected| for floats; the fraction of differing elements for booleans.
    inf when the shapes differ or ``got`` is not finite. Tuples (an op with several outputs): the largest
    error of the outputs."""
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return math.inf
        return max((relative_error(g, e) for g, e in zip(got, expected)), default=0.0)
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return math.inf
    if expected.dtype == torch.bool:
        return (got != expected).float().mean().item() if got.numel() else 0.0
    got, expected = got.float(), expected.float()
    if not torch.isfinite(got).all():
        return math.inf
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return (got - expected).abs().max().item() / max(scale, 1e-30) if got.numel() else 0.0


def tolerance(dtype: torch.dtype, boolean: bool = False, masking: bool = False) -> float:
    return (BOOL_MISMATCH if boolean else MASKED_TOLERANCE if masking else TOLERANCE)[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ================================================================================================
# Kernel benchmarks: the shared runner of bench_*.py
# ================================================================================================
@dataclass
class KernelCase:
    """One op at one shape. ``make_args(device, dtype, generator)`` returns fresh random arguments of the
    op's reference (never zeros); ``extra_impls`` are further implementations with the same signature
    (e.g. SDPA backends), name -> function. Minimum memory traffic: ``elements`` values of the benchmark
    dtype (inputs read once, outputs written once) plus ``extra_bytes`` (boolean masks, ...)."""

    op: str
    model: str
    shape: str
    batch: int
    masking: bool
    flops: float
    elements: float
    make_args: Callable[[torch.device, torch.dtype, torch.Generator], tuple]
    extra_impls: dict[str, Callable[..., Any]] = field(default_factory=dict)
    extra_bytes: float = 0.0
    # a composite op (several ops of eomt_fast in sequence, not one op of dispatch.OPS): its reference
    reference: Callable[..., Any] | None = None
    notes: list[str] = field(default_factory=list)  # added to the results' notes when the case runs

    def bytes(self, dtype: torch.dtype) -> float:
        return self.elements * torch.empty((), dtype=dtype).element_size() + self.extra_bytes


def randn(*shape: int, device: torch.device, dtype: torch.dtype, gen: torch.Generator, std: float = 1.0,
          mean: float = 0.0) -> torch.Tensor:
    """Fresh normal data (never zeros), drawn in fp32 and cast."""
    return (torch.randn(*shape, device=device, generator=gen) * std + mean).to(dtype)


def linear_weights(out_features: int, in_features: int, device: torch.device, dtype: torch.dtype,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a linear layer at the scale of a trained one (std 1/sqrt(fan_in), small biases)."""
    weight = randn(out_features, in_features, device=device, dtype=dtype, gen=gen, std=in_features**-0.5)
    return weight, randn(out_features, device=device, dtype=dtype, gen=gen, std=0.02)


def random_query_patch_mask(batch: int, queries: int, grid: int, device: torch.device,
                            gen: torch.Generator) -> torch.Tensor:
    """A boolean (B, Q, grid*grid) mask shaped like a real one: each query sees one random rectangle of
    patches (sides 1 .. grid/2), so most of a row is False, as for the objects a query segments."""
    lo = torch.randint(0, grid, (2, batch, queries, 1), device=device, generator=gen)
    size = torch.randint(1, max(2, grid // 2 + 1), (2, batch, queries, 1), device=device, generator=gen)
    rows = torch.arange(grid, device=device).repeat_interleave(grid)
    cols = torch.arange(grid, device=device).repeat(grid)
    return (rows >= lo[0]) & (rows < lo[0] + size[0]) & (cols >= lo[1]) & (cols < lo[1] + size[1])


def eomt_dims(preset: str) -> dict[str, Any]:
    """The token counts of a model preset (``eomt_fast.bench.PRESETS``): C, heads, D, mlp hidden, queries Q,
    prefix tokens, grid g, patches P, S0 (before the queries), S (with them), mask side 4g, swiglu."""
    from eomt_fast.bench import preset_config

    cfg = preset_config(preset)
    g = cfg.grid_size
    return dict(C=cfg.hidden_size, H=cfg.num_attention_heads, D=cfg.head_dim, hidden=cfg.mlp_hidden_size,
                Q=cfg.num_queries, prefix=cfg.num_prefix_tokens, g=g, P=g * g, S0=cfg.num_prefix_tokens + g * g,
                S=cfg.num_queries + cfg.num_prefix_tokens + g * g, side=g * 2**cfg.num_upscale_blocks,
                swiglu=int(cfg.gated_mlp), eps=cfg.layer_norm_eps)


def kernel_arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small shapes only (for a CPU; seconds, not minutes)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="bfloat16, float16, float32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--impls", nargs="+", default=None, help="only these implementations (names as printed)")
    p.add_argument("--filter", default=None, help="only cases whose op, model or shape contains this")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile on a CPU)")
    p.add_argument("--budget", type=float, default=2.0, help="CPU seconds of timing per implementation")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's choice)")
    p.add_argument("--results-dir", default=None, help=f"where to write results (default {RESULTS_DIR})")
    p.add_argument("--no-write", action="store_true", help="print only, write no results")
    return p


def _compile(fn: Callable, device: torch.device) -> tuple[str, Callable]:
    if device.type == "cuda":  # timed inside a CUDA graph: inductor's own cudagraphs would nest
        return "compile-max-autotune", torch.compile(fn, mode="max-autotune-no-cudagraphs", dynamic=False)
    return "compile", torch.compile(fn, dynamic=False)


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def _clone_output(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone_output(o) for o in out)
    return out


def _is_bool(out: Any) -> bool:
    if isinstance(out, (tuple, list)):
        return bool(out) and all(_is_bool(o) for o in out)
    return isinstance(out, torch.Tensor) and out.dtype == torch.bool


MUST_RUN = ("eager", "triton", "eomt_fast")  # implementations whose failure fails the run (baselines may not apply)


def _new_tuned_configs(printed: set[str]) -> list[str]:
    """The configs the autotuners chose since the last call, added to ``printed``: the GEMM tiles
    (``kernels.gemm.tuned_tiles``) and every other kernel's (``kernels._autotune.tuned_configs``)."""
    from eomt_fast.kernels import _autotune, gemm

    new = [line for line in gemm.tuned_tiles() + _autotune.tuned_configs() if line not in printed]
    printed.update(new)
    return new


def run_kernel_benchmark(cases: list[KernelCase], args: argparse.Namespace) -> int:
    """For every case: the op's reference in eager mode, under torch.compile, the extra implementations,
    and its Triton implementation when ``eomt_fast.dispatch.triton_ops()`` has one and CUDA is present.
    Each output is checked against the reference (in fp32 for bf16/fp16) before it is timed.
    Returns 1 when an implementation gave a wrong result, else 0."""
    from eomt_fast import dispatch, kernels
    from eomt_fast.bench import benchmark_device
    from eomt_fast.model import parse_dtype

    device = benchmark_device(args.device)
    dtype = parse_dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.filter:
        cases = [c for c in cases if args.filter in f"{c.op} {c.model} {c.shape}"]
    env = environment(device)
    ceilings = measure_ceilings(device, quick=args.quick)
    print(f"{env['device']} | torch {env['torch']} triton {env['triton']} | commit {env['commit'][:12]} | "
          f"matmul {ceilings['matmul_tflops']:.3g} TFLOP/s, copy {ceilings['copy_tbps'] * 1e3:.3g} GB/s")
    triton = dispatch.triton_ops() if device.type == "cuda" else {}
    rows, skipped, failed, path = [], [], False, None
    printed_tiles: set[str] = set()
    ref_dtype = reference_dtype(dtype)
    notes = ["kernel rows: FLOP counts 2 per multiply-add of the op's GEMMs; bytes are the minimum traffic "
             "(inputs read once, output written once)"]
    if device.type == "cuda":
        notes.append("kernel timings on CUDA: torch.compile as mode='max-autotune-no-cudagraphs' because the "
                     "calls are timed inside a CUDA graph")
    for case in cases:
        reference = case.reference or getattr(kernels, dispatch.OPS[case.op][0])
        for note in case.notes:
            if note not in notes:
                notes.append(note)
        gen = torch.Generator(device=device).manual_seed(zlib.crc32(f"{case.op} {case.shape}".encode()))
        args0 = case.make_args(device, dtype, gen)
        n_sets = rotation_count(tensor_bytes(args0), l2_bytes(device)) if device.type == "cuda" else 1
        arg_sets = [args0] + [case.make_args(device, dtype, gen) for _ in range(n_sets - 1)]
        upcast = tuple(a.to(ref_dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                       for a in args0)
        with torch.inference_mode():
            expected = reference(*upcast)
        impls: dict[str, Callable] = {"eager": reference}
        if device.type == "cuda" and case.op in triton:
            impls["triton"] = triton[case.op]
        impls.update(case.extra_impls)
        if not args.no_compile:
            torch._dynamo.reset()
            name, compiled = _compile(reference, device)
            impls[name] = compiled
        if args.impls:
            impls = {k: v for k, v in impls.items() if k in args.impls}
        print(f"\n{case.op} {case.model} {case.shape} {dtype_name(dtype)} masking {'on' if case.masking else 'off'}"
              f" ({case.flops / 1e9:.3g} GFLOP, {case.bytes(dtype) / 1e6:.3g} MB; {n_sets} input set(s))")
        print(f"  {'impl':<32} {'ms median [p20-p80]':<28} {'TFLOP/s':>9} {'GB/s':>9} {'vs eager':>9} {'err':>9}")
        checked: dict[str, tuple[float, float]] = {}  # name -> (error, first call s)
        for name, fn in impls.items():  # 1. run once (compiles) and check; a wrong result is not timed
            base = {"benchmark": case.op, "model": case.model, "shape": case.shape, "batch": case.batch,
                    "dtype": dtype_name(dtype), "masking": case.masking, "impl": name}
            try:
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    out = _clone_output(fn(*args0))
                    synchronize(device)
                    first_s = time.perf_counter() - t0
            except Exception as exc:  # e.g. an SDPA backend that does not take this input
                failed |= name in MUST_RUN  # those must run; a baseline may not apply
                skipped.append({**base, "reason": _reason(exc)})
                print(f"  {name:<32} not available: {skipped[-1]['reason']}")
                continue
            err = relative_error(out, expected)
            tol = tolerance(dtype, _is_bool(expected))
            if not err <= tol:
                failed = True
                skipped.append({**base, "reason": f"wrong result: error {err:.3g} > tolerance {tol:.3g}"})
                print(f"  {name:<32} NOT TIMED: {skipped[-1]['reason']}")
                continue
            checked[name] = (err, first_s)
        prepared: dict[str, dict[str, Any]] = {}  # row fields of implementations with work done before timing
        for name in checked:  # e.g. FlexAttention's block masks: made for every input set, outside the timed region
            prepare = getattr(impls[name], "prepare", None)
            if prepare is not None:
                with torch.inference_mode():
                    prepared[name] = prepare(arg_sets if device.type == "cuda" else [args0]) or {}
        with torch.inference_mode():  # 2. time
            if device.type == "cuda":
                timings = {}
                for name in checked:
                    try:
                        timings[name] = time_call(impls[name], arg_sets, device)
                    except Exception as exc:  # noqa: BLE001
                        timings[name] = exc
            else:  # in rounds: a shared CPU's load falls on every implementation alike
                timings = time_interleaved({name: (lambda fn=impls[name]: lambda: fn(*args0)) for name in checked},
                                           budget_s=args.budget, min_repeats=5, max_repeats=1000)
        eager_ms = timings["eager"].median_ms if isinstance(timings.get("eager"), Timing) else None
        for name, (err, first_s) in checked.items():
            base = {"benchmark": case.op, "model": case.model, "shape": case.shape, "batch": case.batch,
                    "dtype": dtype_name(dtype), "masking": case.masking, "impl": name}
            timing = timings[name]
            if isinstance(timing, Exception):
                failed |= name in MUST_RUN
                skipped.append({**base, "reason": _reason(timing)})
                print(f"  {name:<32} failed while timed: {skipped[-1]['reason']}")
                continue
            sec = timing.median_ms * 1e-3
            row = {**base, "median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms,
                   "samples": timing.samples, "method": timing.method, "flops": case.flops,
                   "bytes": case.bytes(dtype), "tflops": case.flops / sec / 1e12,
                   "gbps": case.bytes(dtype) / sec / 1e9,
                   "pct_matmul_ceiling": 100 * case.flops / sec / 1e12 / ceilings["matmul_tflops"],
                   "max_rel_err": err}
            if device.type == "cpu":  # runs of one file may use different thread counts
                row["threads"] = torch.get_num_threads()
            if name.startswith("compile") or name in prepared:
                row["first_call_s"] = first_s
            row.update(prepared.get(name, {}))
            rows.append(row)
            vs = "" if eager_ms is None or name == "eager" else f"{eager_ms / timing.median_ms:.2f}x"
            timed = f"{timing.median_ms:.4g} [{timing.p20_ms:.4g}-{timing.p80_ms:.4g}]"
            print(f"  {name:<32} {timed:<28} {row['tflops']:>9.3g} {row['gbps']:>9.3g} {vs:>9} {err:>9.2g}")
        for line in _new_tuned_configs(printed_tiles):  # which tile / config each autotuner chose
            print(f"  {line}")
        if not args.no_write and (rows or skipped):  # after every case: a run cut short keeps what it timed
            path = write_results(rows, env, ceilings, args.results_dir, skipped=skipped, notes=notes)
    if path is not None:
        print(f"\nwrote {path} (+ .md, .png)")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("slug", help="print <date>_<device-slug> for this machine's default device")
    s.add_argument("--device", default=None)
    r = sub.add_parser("render", help="rewrite the markdown and the chart of a results JSON")
    r.add_argument("json")
    v = sub.add_parser("validate", help="check a results JSON against the schema")
    v.add_argument("json")
    a = p.parse_args(argv)
    if a.cmd == "slug":
        device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}_{device_slug(device)}")
    elif a.cmd == "render":
        doc = load(a.json)
        Path(a.json).with_suffix(".md").write_text(render_markdown(doc), encoding="utf-8")
        render_chart(doc, Path(a.json).with_suffix(".png"))
    else:
        load(a.json)
        print(f"{a.json}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
