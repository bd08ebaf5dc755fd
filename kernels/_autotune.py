"""Autotuning whose results outlive the process: ``autotune`` is ``triton.autotune`` with each benchmark's
timings kept on disk, so that a later process launching the same kernel at the same key on the same GPU
reuses them instead of benchmarking every config again.

Triton's autotuner benchmarks all configs of a kernel the first time a process launches it with a new key
(shapes, flags, dtypes). Triton keeps the compiled binaries on disk, but not that choice: every new process
(each ``eomt-fast segment`` run, each server start) paid the benchmarks again, about 15 GEMM, attention,
upscale and embedding keys for one EoMT model and batch size, with up to 18 tiles each on an H100 or H200
(the pointer, TMA and persistent GEMM tiles: ``gemm._tune``).

Where and what: one small JSON file per kernel, key and GPU, under Triton's cache directory
(``TRITON_CACHE_DIR``, default ``~/.triton/cache``), beside the compiled kernels. It holds every config's
timings as the autotuner measured them (median, p20, p80 in ms; inf for a config that did not fit), by the
config's position in the list tried: read back, they give the same winner, and ``gemm._tune`` compares its
pointer / TMA / persistent variants on the same medians. The file's name is a hash of everything the
choice depends on: the kernel's source (Triton's ``JITFunction.cache_key``, which covers the @triton.jit
functions it calls), each config tried (its values and pre-hook), the autotune key's values and dtypes, the
launch flags the autotuner was built for that its key does not hold (``variant``: the GEMM's GLU, ...),
the GPU's name and compute capability (an H100 and an H200 are both sm_90 and are tuned apart), Triton's
own key (its version and installation) and the environment variables its compiler reads. Changing any of
them tunes afresh; nothing is ever launched with a config the kernel does not list now.

Triton's own ``cache_results`` is the model: this differs in caching configs with pre-hooks too (the GEMM's
TMA tiles set their descriptors' block shapes in one; the position identifies them) and in keying on the GPU.

``EOMT_FAST_AUTOTUNE_CACHE=0`` (also false/off/no; read at every tuning) benchmarks each time, as plain Triton
does, and writes nothing. A file that cannot be read is ignored and rewritten; a directory that cannot be
written is warned about once and the kernels are tuned in every process. Under the interpreter there is one
config per kernel and nothing to benchmark: no cache.
"""

from __future__ import annotations

import builtins
import collections
import functools
import hashlib
import inspect
import json
import math
import os
import warnings

import torch

from ._triton import HAS_TRITON, triton

ENV = "EOMT_FAST_AUTOTUNE_CACHE"
FORMAT = 1  # of the files written; another value is not read


# How many keys this process tuned, by where their timings came from ("disk", "this process",
# "benchmarked": load_or_benchmark): what bench/profile_host.py reports beside the first call's time.
TUNINGS: collections.Counter = collections.Counter()


def cache_enabled() -> bool:
    """Whether tuning results are read from and written to disk (``EOMT_FAST_AUTOTUNE_CACHE``, default on)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def cache_dir() -> str:
    """Triton's cache directory, where the tuning files go (``TRITON_CACHE_DIR``, default ~/.triton/cache)."""
    try:
        from triton import knobs

        return str(knobs.cache.dir)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")


def describe_cache() -> str:
    """One line for ``eomt-fast info``: whether the tuning results are kept, and where."""
    if not HAS_TRITON:
        return "off (no Triton)"
    if not cache_enabled():
        return f"off ({ENV}={os.environ.get(ENV)}): every process benchmarks the configs again"
    return f"on, in {cache_dir()} (*.eomt_fast_autotune.json; {ENV}=0 turns it off)"


def autotune(fn, configs: list, key: list[str], *, variant: tuple = (), prune_configs_by: dict | None = None,
             restore_value: list[str] | None = None, report: bool = True):
    """``triton.autotune(configs=configs, key=key, ...)(fn)`` with its results kept on disk (module docstring).
    Every autotuned kernel of the package is made here (tests/test_autotune_keys.py checks that).
    ``variant``: the flags a factory built this autotuner for that its key does not hold (the constexprs it
    is launched with, e.g. the GEMM's GLU or 4-D output view): part of the file name, so that two autotuners
    of one kernel with the same configs and key values never read each other's timings. ``report``: list
    its choices in ``tuned_configs()`` (gemm.py's tuners do not: ``gemm.tuned_tiles`` says more). No
    ``reset_to_zero``: a choice read from disk runs no benchmark, so nothing would reset."""
    if not HAS_TRITON:  # the stand-in: importing works, launching says Triton is missing
        return triton.autotune(configs=configs, key=key)(fn)
    tuner = _tuner_class()(fn, fn.arg_names, configs, key, reset_to_zero=None, restore_value=restore_value,
                           prune_configs_by=prune_configs_by, cache_results=True)
    tuner.report, tuner.variant = report, tuple(variant)
    return tuner


# (kernel name, tuning key) -> one line saying which config won, in the order tuned: ``tuned_configs``
_CHOICES: dict[tuple, str] = {}


def tuned_configs() -> list[str]:
    """The config each reporting autotuner chose for each key tuned so far in this process, a line each: the
    kernel, its key's values, the winner, its median time and the runner-up's as the autotuner measured them
    (the kernel benchmarks in bench/ print these under each case), how many configs ran and whether the times
    came from the disk cache."""
    return list(_CHOICES.values())


def _describe_choice(tuner, tuning_key: tuple, from_disk: bool) -> str:
    chosen = tuner.cache.get(tuning_key)
    medians = sorted(m for m in map(timed_median, (tuner.configs_timings or {}).values())
                     if m is not None and math.isfinite(m))
    key = " ".join(f"{name}={value}" for name, value in zip(tuner.keys, tuning_key))
    times = ""
    if medians:
        times = f" ({medians[0]:.4g} ms" + (f", next best {medians[1]:.4g} ms" if len(medians) > 1 else "")
        times += f"; {len(tuner.configs_timings)} configs timed{', by an earlier process: autotune cache' if from_disk else ''})"
    return f"{_kernel_name(tuner)} {key} -> {chosen}{times}"


def timed_median(timing) -> float | None:
    """The median time (ms) in one of an Autotuner's ``configs_timings`` values (Triton keeps [median, p20,
    p80] there, or a bare number), None where there is none."""
    value = timing[0] if isinstance(timing, (list, tuple)) else timing
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@functools.cache
def _tuner_class() -> type:
    from triton.runtime.autotuner import Autotuner

    class DiskCachedAutotuner(Autotuner):
        """Triton's Autotuner whose ``check_disk_cache`` (called by ``run`` for a key it has not tuned in this
        process, when ``cache_results`` is on: never under the interpreter) is this module's."""

        from_disk: bool | None = None  # whether the last key tuned came from disk (None: none tuned yet)

        report: bool = True  # whether tuned_configs() lists this tuner's choices
        variant: tuple = ()  # autotune()'s variant: in the file name

        def check_disk_cache(self, tuning_key, configs, bench_fn) -> bool:
            source = load_or_benchmark(self, tuning_key, configs, bench_fn)
            self.from_disk = source == "disk"
            if self.report:
                _CHOICES[_kernel_name(self), tuning_key] = _describe_choice(self, tuning_key, self.from_disk)
            return source != "benchmarked"  # Triton's "used a cached result"

    return DiskCachedAutotuner


def load_or_benchmark(tuner, tuning_key: tuple, configs: list, bench_fn) -> str:
    """What the autotuner's ``check_disk_cache`` does: fill ``tuner.cache[tuning_key]`` and
    ``tuner.configs_timings`` from a file, or run ``bench_fn`` (which fills them) and write them. Returns
    where the timings came from: "disk" (an earlier process), "this process" (a file this process wrote:
    gemm._tune's launcher keys share Triton keys) or "benchmarked"; counted in TUNINGS."""
    path = None
    if cache_enabled() and tuning_key:
        try:
            digest = _digest(tuner, tuning_key, configs)
            cache, name = _cache_manager(digest), f"{_kernel_name(tuner)[:120]}.eomt_fast_autotune.json"
            path = cache.get_file(name)
        except Exception as error:  # noqa: BLE001 - a cache that cannot be used is no reason to fail the launch
            _warn_once(f"the autotune cache cannot be used ({type(error).__name__}: {error})")
            cache = None
        timings = _read(path, configs) if path else None
        if timings is not None:
            tuner.cache[tuning_key] = builtins.min(timings, key=timings.get)  # as Triton picks after benchmarking
            tuner.configs_timings = timings
            source = "this process" if digest in _WRITTEN else "disk"
            TUNINGS[source] += 1
            return source
        bench_fn()
        TUNINGS["benchmarked"] += 1
        if cache is not None and _write(cache, name, tuning_key, configs, tuner.configs_timings):
            _WRITTEN.add(digest)
        return "benchmarked"
    bench_fn()
    TUNINGS["benchmarked"] += 1
    return "benchmarked"


def _read(path: str, configs: list) -> dict | None:
    """{config: timings} from a file written for exactly these configs, else None (unreadable, another format,
    another number of configs: benchmarked again and rewritten)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        timings = data["timings"]
        if data.get("format") != FORMAT or len(timings) != len(configs):
            return None
        values = [[float(t) for t in entry] for entry in timings]
        if any(not entry or any(math.isnan(t) for t in entry) for entry in values):
            return None
        return dict(zip(configs, values))
    except (OSError, ValueError, KeyError, TypeError):
        return None


_WRITTEN: set[str] = set()  # the digests of the files this process wrote


def _write(cache, name: str, tuning_key: tuple, configs: list, configs_timings: dict | None) -> bool:
    """Write the timings; whether a file was written."""
    if not configs_timings or any(c not in configs_timings for c in configs):
        return False  # a Triton that keeps other timings: nothing to write
    timings = []
    for config in configs:
        value = configs_timings[config]
        timings.append([float(t) for t in (value if isinstance(value, (list, tuple)) else [value])])
    data = {"format": FORMAT, "key": repr(tuning_key), "configs": [_describe(c) for c in configs],
            "timings": timings}
    try:
        cache.put(json.dumps(data), name, binary=False)  # Triton's put: a temporary file, then os.replace
    except Exception as error:  # noqa: BLE001 - an OSError, or whatever a TRITON_CACHE_MANAGER raises
        _warn_once(f"could not write the autotune cache ({type(error).__name__}: {error}); kernels are "
                   "benchmarked in every process")
        return False
    return True


def _digest(tuner, tuning_key: tuple, configs: list) -> str:
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.runtime.cache import triton_key

    parts = [f"eomt_fast-autotune-{FORMAT}", triton_key(), _kernel_identity(tuner.fn), _device_identity(),
             str(sorted(get_cache_invalidating_env_vars().items())), repr(tuning_key),
             f"variant={getattr(tuner, 'variant', ())!r}"]
    parts += [_describe(c) for c in configs]
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()


def _describe(config) -> str:
    """A config as the cache key sees it: Triton's str (values, warps, stages, ...) and its pre-hook."""
    hook = config.pre_hook
    return f"{config} pre_hook={getattr(hook, '__module__', '')}.{getattr(hook, '__qualname__', hook)}"


def _kernel_identity(fn) -> str:
    """The kernel's source hash: Triton's ``cache_key`` of the JITFunction (its source and the jit functions and
    constexpr globals it uses); for an interpreted kernel, the hash of its Python source."""
    while not hasattr(fn, "cache_key") and hasattr(fn, "fn"):
        fn = fn.fn
    if hasattr(fn, "cache_key"):
        return str(fn.cache_key)
    source = inspect.getsource(getattr(fn, "fn", fn))
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def _kernel_name(tuner) -> str:
    fn = tuner.fn
    while hasattr(fn, "fn"):
        fn = fn.fn
    return getattr(fn, "__name__", "kernel")


def _device_identity() -> str:
    """The GPU a launch runs on (the current CUDA device, which the launchers set: ``on_input_device``)."""
    if not torch.cuda.is_available():
        return "no-cuda"
    return _device_name(torch.cuda.current_device())


@functools.cache
def _device_name(index: int) -> str:
    props = torch.cuda.get_device_properties(index)
    return f"{props.name} sm{props.major}{props.minor} {props.multi_processor_count} SMs"


def _cache_manager(digest: str):
    from triton.runtime.cache import get_cache_manager

    return get_cache_manager(digest)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"eomt_fast: {message} (set {ENV}=0 to turn it off)", RuntimeWarning, stacklevel=3)


__all__ = ["ENV", "TUNINGS", "autotune", "cache_dir", "cache_enabled", "describe_cache", "load_or_benchmark", "tuned_configs"]
