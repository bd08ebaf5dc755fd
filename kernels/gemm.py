"""GEMM building blocks shared by the fused ops (projection GEMMs with epilogues).

Holds no plain-PyTorch op of its own: every op built from these blocks has its reference in the file
of that op (``linear.py``, ``layernorm_mlp.py``, ``upscale.py``, ...).

The one GEMM, with everything around it decided at compile time::

    h   = LN(A) or A                      (optional LayerNorm over the K axis of A, see below)
    acc = h @ W^T                          W in nn.Linear layout (N, K), read through its strides; fp32 accumulation
    y   = act(acc + bias)                  ACTIVATION: none / gelu (exact erf) / silu / relu
    y   = act(acc_gate + b_g) * (acc_up + b_u)   GLU: gate rows [0, N) and up rows [N, 2N) of one W, both
                                                  tiles computed by the same program (SwiGLU = GLU + silu)
    out = residual + y * scale             HAS_SCALE (per-column vector), HAS_RESIDUAL (a tensor, any strides)

Where the LayerNorm goes (``ln_mode``):
- ``"separate"`` (the default): a row kernel writes LN(A) in the model dtype, then a plain GEMM runs.
  The GEMM main loop stays "async-copy A and W tiles into shared memory -> wgmma", which Hopper runs
  best; the cost is one write + one read of an (M, K) activation that sits in L2 at EoMT sizes, and
  the rounding is exactly that of the PyTorch reference (LN output in the model dtype).
- ``"prologue"``: a row kernel writes only mean/rstd (8 bytes a row) and the GEMM normalises each A
  tile in registers before its dot. It saves that round trip, but the normalisation is redone by
  every column tile (N / BLOCK_N times; 12x for QKV at BLOCK_N 256), it sits in the main loop between
  the shared-memory load and the wgmma (register-sourced A operand), and it adds registers to a loop
  that is tensor-core bound. Published attempts report that prologue fusion often loses to epilogue
  fusion.
  Both compile to wgmma without spills (``aot_specs()``; the prologue needs BLOCK_K 32 on its largest
  tiles); the kernel count per layer is the same either way, so the choice is a speed question to
  measure on the GPU (``ln_mode=``, ``DEFAULT_LN_MODE``). "separate" is the default until then.

Precision: fp16/bf16 operands run on the tensor cores with fp32 accumulation and an fp32 epilogue,
rounded once to the output dtype. fp32 operands use ``input_precision="ieee"`` (``FP32_DOT_PRECISION``):
full fp32 products, like PyTorch's default (``allow_tf32=False``); slow but exact, since fp32 is this
package's accuracy path, not its speed path.

Output addressing: element (m, n) of the product goes to ``out[m // Mi, m % Mi, n // Ni, n % Ni]`` of a
4-D strided view (2-D (M, N) and 3-D (Mo, Mi, N) outputs are special cases), and the residual is
read the same way (zero strides allowed). This one rule writes into a slice of a bigger buffer (the
patch tokens of ``[CLS | registers | patches]``), adds a position embedding expanded over the batch,
and scatters ConvTranspose-2x2 results to their 2x2 output pixels. Three compile-time cases keep the
common ones cheap: rows evenly strided (plain 2-D addressing; any 3-D view whose rows are, e.g. batch
1), rows split only (``SPLIT_ROWS``: a (B, S0, C) slice of the model's (B, S, C) token buffer, rows
S * C apart between batches; one division per tile row, no column division), and rows and columns
split (``VIEW_4D``, the 2x2 scatter). The A operand may be such a row-split 3-D view too
(``A_SPLIT_ROWS``), and so may the rows the LayerNorm kernel reads: the layers of the model run on
slices of its token buffer without a copy.

In place: ``residual`` may be ``out`` itself (the same view): every element is read and then written
by the same program, so the residual stream is updated in place (``out_projection``, ``layernorm_mlp``
with ``out=x``). The autotuner runs a kernel several times while it benchmarks, so an in-place call is
tuned on a scratch output of out's layout (the residual read from out, the result written to scratch:
out unchanged however often it runs), and then launched once with the winning tile. Triton's
``restore_value`` would also keep out intact, but it clones and copies out inside every timed run (three
M x N transfers: for the output projection at batch 1, M 1805, N = K = 1024, that is 5.5 M elements against
the GEMM's own 6.6 M, counted, not measured), which blurs the comparison of the tiles; it remains the
fallback for a Triton whose autotuner does not report the tile it chose (``best_config``).

Operand loads, two ways. The pointer main loop (``gemm_mainloop``) computes each thread's addresses and
copies A and W tiles into shared memory with cp.async; it reads any strides, row-split A views and the
LayerNorm prologue. The TMA main loop (``gemm_mainloop_tma``, a config's ``tma``) hands whole tiles to
Hopper's copy engine through tensor descriptors (``triton.tools.tensor_descriptor.TensorDescriptor``, made
on the host per launch and passed by value, so CUDA graphs capture them): no address registers, no masks
(blocks past the edges read zeros), the same epilogue. It needs 16-bit operands, a 2-D A with unit K stride
and 16-byte aligned rows (``_tma_ready``), as every EoMT GEMM has with the ``"separate"`` LN. The largest TMA
tiles also run persistent (a config's ``persistent``): one program per SM walks the tiles in one flattened
loop over tiles and K steps (``tl.range(..., flatten=True)``), which Triton pipelines across tile boundaries,
so the next tile's first loads overlap this tile's epilogue (K = 1024 is only 16 steps of 64: the epilogue
is a visible share). On sm_90+ such a call is tuned three times, over the pointer tiles, the TMA tiles and
the persistent ones, and the fastest by the autotuners' own median times is kept (``_tune``);
``tuned_tiles()`` says which won for each shape. Compiled
ahead of time for sm_90 (Triton 3.9, the output projection's residual epilogue) the TMA tiles need fewer
registers: 99 against 120 for 128 x 128 x 64 on 8 warps, 172 against 206 on 4; which is faster is for the
GPU to measure.

Tiles: on a GPU, autotuned (``_autotune.autotune``: Triton's autotuner, its timings kept on disk for later
processes) over a handful of tile shapes (keyed on M, N, K and the flags) with GROUP_M swizzling of the tile order for L2 reuse; under the interpreter exactly one small tile.
Rows and columns past the end of the matrix are wrapped into range for the loads (no masks, never a
padding copy) and masked at the store; K is masked per step. Row offsets are int64.
Few tiles (batch 1, N = 1024: 120 tiles of 128 x 128, 60 of 128 x 256, for 132 SMs) can be met by the
small tiles in the autotune list, by ``split_k`` (partial products to an fp32 workspace, then a reduce
kernel applies the epilogue; deterministic, no atomics; costs an M x N x 4 x split_k byte round trip),
or by a fixed ``config``: which wins must be measured on a GPU.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from ._autotune import autotune, timed_median
from ._triton import INTERPRETING, LAUNCH_OPTIONS, TensorDescriptor, cdiv, check_devices, eager_direct, gpu_arch, next_power_of_2, on_input_device, tl, triton  # Triton, or a stand-in without it


ACTIVATIONS = {"none": 0, "gelu": 1, "silu": 2, "relu": 3}
FP32_DOT_PRECISION = "ieee"  # fp32 operands: full-precision products (see the module docstring)
DEFAULT_LN_MODE = "separate"  # "separate" or "prologue": where a fused LayerNorm on A runs
LN_MODES = ("separate", "prologue")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_LAYERNORM_WIDTH = 16384


@dataclass(frozen=True)
class GemmConfig:
    """One tile configuration: an autotune entry, or passed as ``gemm(config=...)`` to bypass the
    autotuner (e.g. to measure small tiles at batch 1)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    epilogue_subtiles: int = 1  # 2: the epilogue runs on two column halves in turn (fewer live registers)
    tma: bool = False  # _gemm_kernel only: A and W tiles through TMA tensor descriptors (see gemm_mainloop_tma)
    persistent: bool = False  # _gemm_kernel only, with tma: one program per SM walking the tiles

    def meta(self) -> dict:
        """The kernel's tile constants (shared by the kernels built on gemm.py's tile lists); TMA and PERSISTENT
        only where set, for ``_gemm_kernel``, whose flags default to off."""
        meta = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "GROUP_M": self.group_m,
                "EPILOGUE_SUBTILES": self.epilogue_subtiles}
        if self.tma:
            meta["TMA"] = True
        if self.persistent:
            meta["PERSISTENT"] = True
        return meta


# Under the interpreter each program step costs milliseconds whatever the tile: one 64 x 64 x 64 tile
# (GROUP_M 4, so that tests cross group boundaries) with the split epilogue of the big GPU tiles.
INTERPRETER_CONFIG = GemmConfig(64, 64, 64, group_m=4, num_warps=4, num_stages=1, epilogue_subtiles=2)
REDUCE_BLOCK = 64  # tile of the split-K reduce kernel
# 8 warps: with GLU the reduce holds two 64 x 64 fp32 sums, which at 4 warps spill under Triton 3.6
# (255 registers and 48-56 B of stack on sm_80/sm_90; 3.9 needs 160); it is memory bound either way
REDUCE_WARPS = 8

def _accumulators_per_thread(c: GemmConfig) -> int:
    return c.block_m * c.block_n // (32 * c.num_warps)


# The autotune lists: GemmConfig(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages, epilogue subtiles).
# Every entry compiles for sm_80 and sm_90 (wgmma there) without spills at the flags it is listed for
# (``aot_specs()``, ``eomt-fast check-kernels``). Tiles with 128 fp32 accumulators a thread run their
# epilogue on two column halves, which keeps GELU and residual epilogues from spilling. The small tiles
# are there for batch 1, where N = 1024 gives 60 tiles of 128 x 256 for 132 SMs.
GPU_CONFIGS = (
    GemmConfig(128, 256, 64, 8, 8, 3, 2),
    GemmConfig(256, 128, 64, 8, 8, 3, 2),
    GemmConfig(128, 128, 64, 8, 8, 4, 2),
    # inductor's max-autotune pick for three of the four MLP GEMMs of EoMT-L/640 at batch 1 on an H200
    # (fc1 and fc2 at 1805 rows, fc1 at 1605; bench/results/2026-12-04_nvidia-h200_first-look.log), where
    # this list's best lost to cuBLAS: added untimed here (no GPU since), for the autotuner to weigh
    GemmConfig(128, 128, 64, 8, 4, 3, 2),
    GemmConfig(128, 64, 64, 8, 4, 4, 1),
    GemmConfig(64, 128, 64, 8, 4, 4, 2),
    GemmConfig(64, 64, 64, 8, 4, 4, 1),
)
PERSISTENT_TILES = 4  # the first four of GPU_CONFIGS (128 x 256, 256 x 128, 128 x 128 twice) also run persistent
PERSISTENT_GLU_TILES = 2  # and the first two GLU tiles
# The LayerNorm prologue holds mean, rstd, gamma and beta too: BLOCK_K 32 for the largest tiles, and no
# 128 x 128 tile on 4 warps (it spills 40-56 B there, under Triton 3.9 as well).
GPU_LN_PROLOGUE_CONFIGS = (
    GemmConfig(128, 256, 32, 8, 8, 4, 2),
    GemmConfig(256, 128, 32, 8, 8, 4, 2),
    *(c for c in GPU_CONFIGS[2:] if _accumulators_per_thread(c) <= 64 or c.num_warps == 8),
)
# GLU holds two accumulators: a 128 x 64 GLU tile does the MMA work of a 128 x 128 plain tile per A
# tile loaded. (128 x 128 GLU tiles compile without spills for sm_90 but spill on sm_80.)
GPU_GLU_CONFIGS = (
    GemmConfig(128, 64, 64, 8, 8, 4, 1),
    GemmConfig(128, 64, 32, 8, 8, 4, 1),
    GemmConfig(64, 128, 32, 8, 8, 4, 1),
    GemmConfig(64, 64, 64, 8, 4, 4, 1),
)
GPU_GLU_LN_PROLOGUE_CONFIGS = (
    GemmConfig(128, 64, 64, 8, 8, 4, 1),
    GemmConfig(128, 64, 32, 8, 8, 4, 1),
    GemmConfig(64, 128, 32, 8, 8, 4, 1),
    GemmConfig(64, 64, 32, 8, 4, 4, 1),
)
# fp32 operands run on FMA units ("ieee" dots): smaller tiles, BLOCK_K 32 (16 with GLU). 64 x 64 tiles
# take 2 stages: with 3 the residual epilogue spills 8 B on sm_90 under Triton 3.6 (not under 3.9).
GPU_FP32_CONFIGS = (
    GemmConfig(128, 128, 32, 8, 8, 3, 1),
    GemmConfig(128, 64, 32, 8, 8, 3, 1),
    GemmConfig(64, 128, 32, 8, 8, 3, 1),
    GemmConfig(64, 64, 32, 8, 8, 2, 1),
)
GPU_FP32_GLU_CONFIGS = (
    GemmConfig(64, 64, 16, 8, 8, 3, 1),
    GemmConfig(64, 32, 32, 8, 4, 3, 1),
    GemmConfig(32, 64, 32, 8, 4, 3, 1),
)


def persistent_fits(split_k: int, view_4d: bool) -> bool:
    """Whether a GEMM can run persistent tiles: one split (the loop walks output tiles only) and no 4-D output view
    (the one persistent tile that fits its epilogue spills 8 B on sm_90 under Triton 3.9)."""
    return split_k == 1 and not view_4d


def gemm_configs(glu: bool = False, ln_prologue: bool = False, fp32: bool = False,
                 view_4d: bool = False, tma: bool = False, persistent: bool = False) -> list[GemmConfig]:
    """The tile configurations the autotuner tries for these flags (exactly one under the interpreter).
    ``tma``: the same tiles with A and W read through TMA descriptors (16-bit operands, no LN prologue),
    which the launcher times against the pointer tiles on a GPU that has TMA (sm_90+); ``persistent``
    (with ``tma``): the largest of them as persistent kernels, timed too."""
    if tma and (fp32 or ln_prologue):
        raise ValueError("TMA tiles are for 16-bit operands without the LayerNorm prologue")
    if persistent and not (tma and persistent_fits(1, view_4d)):
        raise ValueError("the persistent tiles are TMA tiles without the 4-D output view")
    if INTERPRETING:  # more than one config needs a GPU to benchmark on
        return [replace(INTERPRETER_CONFIG, tma=tma, persistent=persistent)]
    if persistent:  # the big tiles, whose epilogues are long enough to be worth hiding behind the next loads
        configs = [replace(c, tma=True, persistent=True)
                   for c in (GPU_GLU_CONFIGS[:PERSISTENT_GLU_TILES] if glu else GPU_CONFIGS[:PERSISTENT_TILES])]
    elif tma:
        configs = [replace(c, tma=True) for c in (GPU_GLU_CONFIGS if glu else GPU_CONFIGS)]
    elif fp32:
        configs = list(GPU_FP32_GLU_CONFIGS if glu else GPU_FP32_CONFIGS)
    elif glu:
        configs = list(GPU_GLU_LN_PROLOGUE_CONFIGS if ln_prologue else GPU_GLU_CONFIGS)
    else:
        configs = list(GPU_LN_PROLOGUE_CONFIGS if ln_prologue else GPU_CONFIGS)
    if view_4d:  # the 4-D addressing divides row and column indices: registers the big tiles lack
        configs = [c for c in configs if _accumulators_per_thread(c) <= 64]
        if fp32:  # the fp32 64 x 64 tile with the ConvTranspose's GELU: 16 B of stack on sm_90 (Triton 3.9, at 80
            # registers: ptxas's choice, not pressure)
            configs = [c for c in configs if c.block_m * c.block_n > 64 * 64]
    return configs


# The tile chosen for each call shape, keyed on what the autotuner's key holds (flags, sizes, dtypes) and the
# GPU architecture (a tile that fits one GPU's shared memory may not fit another's); None where this Triton's
# autotuner does not report its choice. Filled on the first call of a shape (before any CUDA-graph capture,
# whose warm-up runs it), read by every later one, which then launches the kernel directly: Triton's
# Autotuner.run builds its key from every argument on every call (str() of each tensor's dtype), host time
# that an eager forward, launch-bound on an H200, pays ~80 times. The lock keeps two threads from reading
# each other's best_config.
_TILES: dict[tuple, triton.Config | None] = {}
_TILES_LOCK = threading.Lock()
_LAUNCH_KWARGS: dict[tuple, tuple] = {}  # key -> (tile, the keyword arguments of its direct launch: flags and tile)


def _scratch_like(out: torch.Tensor) -> torch.Tensor:
    """A tensor of out's shape, strides, dtype, device and address modulo 16 bytes (Triton compiles pointer
    alignment into the kernel: the trials must run the variant that then runs on out)."""
    extent = 1 + sum((size - 1) * stride for size, stride in zip(out.shape, out.stride()))
    pad = 16 // out.element_size()
    base = torch.empty(extent + pad, dtype=out.dtype, device=out.device)
    shift = (out.data_ptr() - base.data_ptr()) % 16 // out.element_size()
    return base.as_strided(out.shape, out.stride(), shift)


@on_input_device
def _tune(out: torch.Tensor, variants: list, key: tuple, grid: Callable, meta: dict, in_place: bool):
    """(the tile of ``key``, whether this call already launched the kernel with it). ``variants``: (autotuner,
    its launch arguments) pairs, the pointer tiles first, then the TMA and persistent tiles where the operands
    allow them. The first call of a key runs each autotuner, which benchmarks its configs: on ``out`` itself,
    where that call's result is then there, or for an ``in_place`` call on a scratch output of out's shape and
    strides (``args`` with Out replaced; the residual still reads out), so that out is written once, by the
    chosen tile. The fastest tile by the autotuners' own median times wins; a variant that did not time its
    tiles (one config, the interpreter) never displaces the first. A later variant that fails (every tile
    out of resources on a GPU with less shared memory, a descriptor the driver refuses) is skipped and
    reported by ``tuned_tiles``; the pointer tiles' errors propagate."""
    with _TILES_LOCK:
        if key in _TILES:  # another thread tuned it while this one waited
            return _TILES[key], False
        best = best_time = last_run = None
        times = _VARIANT_TIMES[key] = {}
        _FROM_DISK.discard(key)
        for index, (tuned, args) in enumerate(variants):
            name = _variant(tuned.configs[0])
            if len(tuned.configs) == 1:  # nothing to benchmark (the interpreter)
                tile, time = tuned.configs[0], None
            else:
                run_args = (*args[:2], _scratch_like(out), *args[3:]) if in_place else args
                # Benchmarked afresh: Triton's autotuner skips a key it has seen (several of these keys share one
                # of its keys: in place or not, TMA-ready or not) and would leave the last shape's timings.
                getattr(tuned, "cache", {}).clear()
                tuned.configs_timings = None
                tuned.from_disk = None  # set by the autotune cache when it reads or benchmarks (_autotune)
                last_run = None  # out is being written by this variant (or, in place, untouched)
                try:
                    tuned[grid](*run_args, **meta, **LAUNCH_OPTIONS)
                except Exception as error:  # noqa: BLE001 - any failure of an optional variant
                    if index == 0:
                        raise
                    times[name] = f"failed ({type(error).__name__})"
                    continue
                tile = getattr(tuned, "best_config", None)  # None (remembered too): the restoring autotuner
                if tile is None:
                    break
                time = times[name] = timed_median((getattr(tuned, "configs_timings", None) or {}).get(tile))
                if getattr(tuned, "from_disk", None):
                    _FROM_DISK.add(key)
                last_run = None if in_place else tile  # what out now holds
            if best is None or (time is not None and best_time is not None and time < best_time):
                best, best_time = tile, time
        else:
            _TILES[key] = best
            return best, best is last_run
        _TILES[key] = None
    return None, False


_VARIANT_TIMES: dict[tuple, dict[str, float | str | None]] = {}  # key -> {variant: best tile's median ms, or why not}
_FROM_DISK: set[tuple] = set()  # keys whose timings (some variant's at least) were read from the autotune cache


def _variant(tile) -> str:
    return "persistent" if tile.kwargs.get("PERSISTENT") else "TMA" if tile.kwargs.get("TMA") else "pointer"


def tuned_tiles() -> list[str]:
    """The tile chosen for each GEMM call shape tuned so far in this process, a line each, with the median time
    of each variant's best tile as its autotuner measured it (``bench/`` prints them under each kernel's
    timings: which tile, pointer, TMA or persistent, won where, and by how much)."""
    lines = []
    for key, tile in list(_TILES.items()):
        glu, prologue, _, view_4d, arch, tma, in_place, m, n, k, dtype = key[:11]
        flags = [name for name, on in (("glu", glu), ("ln-prologue", prologue), ("view4d", view_4d),
                                       ("in-place", in_place), ("tma-ready", tma)) if on]
        chosen = "?" if tile is None else (
            f"{tile.kwargs['BLOCK_M']}x{tile.kwargs['BLOCK_N']}x{tile.kwargs['BLOCK_K']} w{tile.num_warps}"
            f"s{tile.num_stages}{' TMA' if tile.kwargs.get('TMA') else ''}"
            f"{' persistent' if tile.kwargs.get('PERSISTENT') else ''}")
        times = ", ".join(f"{name} {ms:.4g} ms" if isinstance(ms, float) else f"{name} {ms}"
                          for name, ms in _VARIANT_TIMES.get(key, {}).items() if ms is not None)
        cached = ", timed by an earlier process: autotune cache" if key in _FROM_DISK and times else ""
        lines.append(f"gemm M{m} N{n} K{k} {str(dtype).removeprefix('torch.')} sm{''.join(map(str, arch or ()))} "
                     f"{' '.join(flags)} -> {chosen}" + (f" ({times}{cached})" if times else ""))
    return lines


def _tma_block_shapes(nargs: dict) -> None:
    """pre_hook of the TMA tiles: the descriptors' blocks follow the tile the autotuner is about to run."""
    nargs["ADesc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["WDesc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


@functools.lru_cache(maxsize=None)
def _tuned_kernel(glu: bool, ln_prologue: bool, fp32: bool, view_4d: bool, restore_out: bool = False,
                  arch: tuple[int, int] | None = None, tma: bool = False, persistent: bool = False):
    """The autotuned GEMM for these flags; ``restore_out``: put Out back after each benchmark run (an
    in-place residual update would otherwise be applied once per run); one per ``arch`` (_triton.gpu_arch);
    ``tma``: the TMA tiles (launched with descriptors, whose blocks a pre_hook sets per tile), ``persistent``
    their persistent form."""
    configs = [triton.Config(c.meta(), num_warps=c.num_warps, num_stages=c.num_stages,
                             pre_hook=_tma_block_shapes if tma else None)
               for c in gemm_configs(glu, ln_prologue, fp32, view_4d, tma, persistent)]
    # every flag that changes the compiled code is in the key: variants (a bias or not, row-split or aligned
    # operands) differ in registers and memory traffic, so each gets its own tuned tile
    key = ["M", "N", "K", "SPLIT_K", "ACTIVATION", "HAS_RESIDUAL", "HAS_BIAS", "HAS_SCALE", "SPLIT_ROWS",
           "A_SPLIT_ROWS", "ALIGNED", "OUT_ALIGNED"]
    return autotune(_gemm_kernel, configs, key, variant=(glu, ln_prologue, fp32, view_4d, restore_out, tma, persistent),
                    restore_value=["Out"] if restore_out else None,
                    report=False)  # tuned_tiles() reports them, with the variants


# ---- building blocks (@triton.jit functions other kernels can call) ----------------------------------

@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile (pid_m, pid_n) of program ``pid``, GROUP_M row tiles swept together so that the W column
    tiles they share stay in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    return pid_m, pid_n


@triton.jit
def apply_activation(x, ACTIVATION: tl.constexpr):
    """0 none, 1 exact GELU x * Phi(x) (erf, not tanh), 2 SiLU x * sigmoid(x), 3 ReLU; x fp32."""
    if ACTIVATION == 1:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == 2:
        x = x * tl.sigmoid(x)
    elif ACTIVATION == 3:
        x = tl.maximum(x, 0.0)
    return x


@triton.jit
def tile_ptrs(Base, offs_m, offs_n, rows_inner, cols_inner, stride_0, stride_1, stride_2, stride_3,
              VIEW_4D: tl.constexpr, SPLIT_ROWS: tl.constexpr, ALIGNED_ROWS: tl.constexpr):
    """Pointers to the (m, n) elements of a tile: Base[m, n] through (stride_1, stride_3); with SPLIT_ROWS
    Base[m // Mi, m % Mi, n] (a 3-D view whose rows are not evenly strided); with VIEW_4D
    Base[m // Mi, m % Mi, n // Ni, n % Ni] of a 4-D strided view. Row offsets are int64; the column
    division of VIEW_4D costs registers that the other cases do not pay. ALIGNED_ROWS promises 16-byte aligned
    row starts, as the JIT infers from divisible arguments (without it, an ahead-of-time compile stores element
    by element and spills); with VIEW_4D also columns in contiguous 16-element runs (``_columns_aligned``),
    which no argument would tell the JIT through the divisions, so that the 2x2 scatter of the ConvTranspose
    stores vectors."""
    if VIEW_4D:
        rows = (offs_m // rows_inner).to(tl.int64) * stride_0 + (offs_m % rows_inner).to(tl.int64) * stride_1
        cols = (offs_n // cols_inner) * stride_2 + (offs_n % cols_inner) * stride_3
        row_ptrs = Base + rows
        if ALIGNED_ROWS:  # _columns_aligned: runs of 16 columns are 16 contiguous elements, 16-element aligned
            row_ptrs = tl.multiple_of(row_ptrs, [16])
            cols = tl.max_contiguous(tl.multiple_of(cols, [16]), [16])
    else:
        if SPLIT_ROWS:
            row_ptrs = Base + ((offs_m // rows_inner).to(tl.int64) * stride_0
                               + (offs_m % rows_inner).to(tl.int64) * stride_1)
        else:
            row_ptrs = Base + offs_m.to(tl.int64) * stride_1
        if ALIGNED_ROWS:
            row_ptrs = tl.multiple_of(row_ptrs, [16])
        cols = offs_n * stride_3
    return row_ptrs[:, None] + cols[None, :]


@triton.jit
def gemm_mainloop(
    A, W, rows, cols, k_lo, k_hi,
    a_rows_inner, stride_a0, stride_am, stride_ak, stride_wn, stride_wk, glu_offset,
    Mean, Rstd, LnW, LnB,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LN_PROLOGUE: tl.constexpr, GLU: tl.constexpr, A_SPLIT_ROWS: tl.constexpr, ALIGNED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """fp32 (acc, acc_up) = LN?(A[rows, k_lo:k_hi]) @ W[cols (+ glu_offset), k_lo:k_hi]^T.

    ``rows``/``cols`` must be in range (wrap them); K is masked here. Row m of A starts at
    m * stride_am, or with A_SPLIT_ROWS (a 3-D view) at (m // a_rows_inner) * stride_a0 +
    (m % a_rows_inner) * stride_am: computed once per tile, outside the K loop. Without GLU the second
    accumulator is never touched and the compiler drops it. ALIGNED promises 16-byte aligned rows of A
    and W and k_lo, k_hi multiples of 16: what the JIT would infer from arguments divisible by 16, said
    explicitly so that an ahead-of-time compile (which gets no such facts) builds the same pipelined
    16-byte async copies."""
    if A_SPLIT_ROWS:  # [BLOCK_M] row starts
        a_rows = A + ((rows // a_rows_inner).to(tl.int64) * stride_a0
                      + (rows % a_rows_inner).to(tl.int64) * stride_am)
    else:
        a_rows = A + rows.to(tl.int64) * stride_am
    w_rows = W + cols.to(tl.int64) * stride_wn  # [BLOCK_N] row starts (nn.Linear layout: a row per output)
    if ALIGNED:
        a_rows = tl.multiple_of(a_rows, [16])
        w_rows = tl.multiple_of(w_rows, [16])
        k_hi = k_hi // 16 * 16  # a no-op when K % 16 == 0, and one the compiler's alignment analysis reads
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    a_ptrs = a_rows[:, None] + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_rows[None, :] + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
    if GLU:
        w_up_ptrs = w_ptrs + glu_offset * stride_wn
    if LN_PROLOGUE:
        mean = tl.load(Mean + rows)
        rstd = tl.load(Rstd + rows)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(k_lo, k_hi, BLOCK_K):
        mask_k = offs_k < k_hi
        a = tl.load(a_ptrs, mask=mask_k[None, :], other=0.0)
        if LN_PROLOGUE:  # masked columns become 0: gamma and beta load as 0 there
            gamma = tl.load(LnW + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            beta = tl.load(LnB + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
            a = a.to(A.dtype.element_ty)
        w = tl.load(w_ptrs, mask=mask_k[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if GLU:
            w_up = tl.load(w_up_ptrs, mask=mask_k[:, None], other=0.0)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=DOT_PRECISION)
            w_up_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
        offs_k += BLOCK_K
    return acc, acc_up


@triton.jit
def gemm_mainloop_tma(
    ADesc, WDesc, off_m, off_n, k_lo, k_hi, glu_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GLU: tl.constexpr,
):
    """fp32 (acc, acc_up) of gemm_mainloop for 16-bit operands read through TMA tensor descriptors: ADesc over
    A (M, K) with [BLOCK_M, BLOCK_K] blocks, WDesc over W (N or 2N, K) with [BLOCK_N, BLOCK_K] blocks. The
    copy engine moves each tile straight into shared memory (no per-thread addresses, no masks: rows and K
    columns past the end read as zeros), where wgmma reads both operands. Rows of the gate half past N read
    the up half's first rows: their columns are never stored."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        a = ADesc.load([off_m, k])
        acc = tl.dot(a, WDesc.load([off_n, k]).T, acc)
        if GLU:
            acc_up = tl.dot(a, WDesc.load([off_n + glu_offset, k]).T, acc_up)
    return acc, acc_up


@triton.jit
def gemm_epilogue(
    acc, acc_up, offs_n, mask_n, mask, res_ptrs, glu_offset, Bias, Scale, Res,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    GLU: tl.constexpr,
):
    """fp32 residual + act(acc + bias) [* (acc_up + bias_up)] * scale, on one tile."""
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GLU:
            acc_up += tl.load(Bias + glu_offset + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = apply_activation(acc, ACTIVATION)
    if GLU:
        y = y * acc_up
    if HAS_SCALE:
        y = y * tl.load(Scale + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        y += tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def store_tile(
    acc, acc_up, offs_m, offs_n, M, N, glu_offset, Out, Bias, Scale, Res,
    out_rows_inner, out_cols_inner, stride_o0, stride_o1, stride_o2, stride_o3,
    stride_r0, stride_r1, stride_r2, stride_r3,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    GLU: tl.constexpr, VIEW_4D: tl.constexpr, SPLIT_ROWS: tl.constexpr, OUT_ALIGNED: tl.constexpr,
):
    """Epilogue of one fp32 tile (rows offs_m, columns offs_n) and its masked store to Out. Res may be Out
    itself (in place): each element is loaded before this program stores it, and no other program
    touches it."""
    if OUT_ALIGNED:  # N % 16 == 0, said in a form the alignment analysis reads (vectorised masks)
        mask_n = offs_n < N // 16 * 16
    else:
        mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    res_ptrs = tile_ptrs(Res, offs_m, offs_n, out_rows_inner, out_cols_inner,
                         stride_r0, stride_r1, stride_r2, stride_r3, VIEW_4D, SPLIT_ROWS, OUT_ALIGNED)
    y = gemm_epilogue(acc, acc_up, offs_n, mask_n, mask, res_ptrs, glu_offset, Bias, Scale, Res,
                      ACTIVATION, HAS_BIAS, HAS_SCALE, HAS_RESIDUAL, GLU)
    out_ptrs = tile_ptrs(Out, offs_m, offs_n, out_rows_inner, out_cols_inner,
                         stride_o0, stride_o1, stride_o2, stride_o3, VIEW_4D, SPLIT_ROWS, OUT_ALIGNED)
    tl.store(out_ptrs, y.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def split_columns(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The left and right column halves of a [BLOCK_M, BLOCK_N] tile."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


# ---- kernels -----------------------------------------------------------------------------------------

@triton.jit
def gemm_tile(
    tile_id, pid_k, A, W, Out, Bias, Scale, Res, Mean, Rstd, LnW, LnB, Ws, WsUp, ADesc, WDesc, M, N, K,
    a_rows_inner, stride_a0, stride_am, stride_ak, stride_wn, stride_wk,
    out_rows_inner, out_cols_inner, stride_o0, stride_o1, stride_o2, stride_o3,
    stride_r0, stride_r1, stride_r2, stride_r3, glu_offset,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    LN_PROLOGUE: tl.constexpr, GLU: tl.constexpr, SPLIT_K: tl.constexpr, VIEW_4D: tl.constexpr,
    SPLIT_ROWS: tl.constexpr, A_SPLIT_ROWS: tl.constexpr,
    ALIGNED: tl.constexpr, OUT_ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SUBTILES: tl.constexpr, TMA: tl.constexpr,
):
    """Output tile ``tile_id`` (GROUP_M-swizzled) of split ``pid_k``: the main loop and the epilogue, or the
    raw partial sums with SPLIT_K > 1. _gemm_kernel's arguments, as documented there."""
    pid_m, pid_n = grouped_tile(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if TMA:
        acc, acc_up = gemm_mainloop_tma(ADesc, WDesc, pid_m * BLOCK_M, pid_n * BLOCK_N, k_lo, k_hi, glu_offset,
                                        BLOCK_M, BLOCK_N, BLOCK_K, GLU)
    else:
        # Rows/columns past the end are wrapped into range: their loads need no mask, their results are
        # never stored.
        acc, acc_up = gemm_mainloop(
            A, W, offs_m % M, offs_n % N, k_lo, k_hi, a_rows_inner, stride_a0, stride_am, stride_ak, stride_wn,
            stride_wk, glu_offset, Mean, Rstd, LnW, LnB, BLOCK_M, BLOCK_N, BLOCK_K, LN_PROLOGUE, GLU, A_SPLIT_ROWS,
            ALIGNED, DOT_PRECISION)
    if SPLIT_K > 1:  # raw partial sums; _splitk_reduce_kernel adds them up and applies the epilogue
        if OUT_ALIGNED:
            mask = (offs_m < M)[:, None] & (offs_n < N // 16 * 16)[None, :]
        else:
            mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        split = pid_k.to(tl.int64) * M * N
        ws_ptrs = tile_ptrs(Ws + split, offs_m, offs_n, M, N, 0, N, 0, 1, False, False, OUT_ALIGNED)
        tl.store(ws_ptrs, acc, mask=mask)
        if GLU:
            ws_up_ptrs = tile_ptrs(WsUp + split, offs_m, offs_n, M, N, 0, N, 0, 1, False, False, OUT_ALIGNED)
            tl.store(ws_up_ptrs, acc_up, mask=mask)
    elif EPILOGUE_SUBTILES == 2:  # two column halves, one after the other: fewer live registers
        acc_left, acc_right = split_columns(acc, BLOCK_M, BLOCK_N)
        up_left, up_right = acc_left, acc_right
        if GLU:
            up_left, up_right = split_columns(acc_up, BLOCK_M, BLOCK_N)
        offs_left = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
        store_tile(acc_left, up_left, offs_m, offs_left, M, N, glu_offset, Out, Bias, Scale, Res,
                   out_rows_inner, out_cols_inner, stride_o0, stride_o1, stride_o2, stride_o3,
                   stride_r0, stride_r1, stride_r2, stride_r3,
                   ACTIVATION, HAS_BIAS, HAS_SCALE, HAS_RESIDUAL, GLU, VIEW_4D, SPLIT_ROWS, OUT_ALIGNED)
        store_tile(acc_right, up_right, offs_m, offs_left + BLOCK_N // 2, M, N, glu_offset, Out, Bias, Scale, Res,
                   out_rows_inner, out_cols_inner, stride_o0, stride_o1, stride_o2, stride_o3,
                   stride_r0, stride_r1, stride_r2, stride_r3,
                   ACTIVATION, HAS_BIAS, HAS_SCALE, HAS_RESIDUAL, GLU, VIEW_4D, SPLIT_ROWS, OUT_ALIGNED)
    else:
        store_tile(acc, acc_up, offs_m, offs_n, M, N, glu_offset, Out, Bias, Scale, Res,
                   out_rows_inner, out_cols_inner, stride_o0, stride_o1, stride_o2, stride_o3,
                   stride_r0, stride_r1, stride_r2, stride_r3,
                   ACTIVATION, HAS_BIAS, HAS_SCALE, HAS_RESIDUAL, GLU, VIEW_4D, SPLIT_ROWS, OUT_ALIGNED)


@triton.jit
def _gemm_kernel(
    A,  # (M, K) activations, or a (Mo, Mi, K) view with A_SPLIT_ROWS; any strides
    W,  # (N, K) weight, or (2N, K) [gate | up] with GLU; nn.Linear layout, any strides
    Out,  # output, addressed through the 4-D view (out_rows_inner, out_cols_inner, stride_o*)
    Bias,  # (N,) or (2N,) with GLU; unused without HAS_BIAS
    Scale,  # (N,) per-column scale (LayerScale); unused without HAS_SCALE
    Res,  # residual, addressed like Out through its own strides; unused without HAS_RESIDUAL
    Mean, Rstd,  # (M,) fp32 row statistics of A; unused without LN_PROLOGUE
    LnW, LnB,  # (K,) LayerNorm weight and bias; unused without LN_PROLOGUE
    Ws, WsUp,  # (SPLIT_K, M, N) fp32 partial sums (of the up half with GLU); unused when SPLIT_K == 1
    ADesc, WDesc,  # with TMA: tensor descriptors of A (2-D) and W, blocks [BLOCK_M or BLOCK_N, BLOCK_K]; else unused
    M, N, K,
    a_rows_inner, stride_a0,  # A_SPLIT_ROWS: rows per batch of A and the batch stride
    stride_am, stride_ak, stride_wn, stride_wk,
    out_rows_inner, out_cols_inner, stride_o0, stride_o1, stride_o2, stride_o3,
    stride_r0, stride_r1, stride_r2, stride_r3,
    glu_offset,  # row offset of the up half of W (= N) with GLU
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    LN_PROLOGUE: tl.constexpr, GLU: tl.constexpr, SPLIT_K: tl.constexpr, VIEW_4D: tl.constexpr,
    SPLIT_ROWS: tl.constexpr, A_SPLIT_ROWS: tl.constexpr,
    ALIGNED: tl.constexpr, OUT_ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SUBTILES: tl.constexpr, TMA: tl.constexpr = False, PERSISTENT: tl.constexpr = False,
):
    """One output tile a program, or with PERSISTENT (TMA tiles, SPLIT_K 1) as many programs as the GPU has SMs,
    each walking the tiles pid, pid + programs, ...: one flattened loop over tiles and K steps, which the
    compiler pipelines across tile boundaries, so the next tile's first loads overlap this tile's epilogue."""
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
            gemm_tile(tile_id, 0, A, W, Out, Bias, Scale, Res, Mean, Rstd, LnW, LnB, Ws, WsUp, ADesc, WDesc, M, N, K,
                a_rows_inner, stride_a0, stride_am, stride_ak, stride_wn, stride_wk, out_rows_inner, out_cols_inner,
                stride_o0, stride_o1, stride_o2, stride_o3, stride_r0, stride_r1, stride_r2, stride_r3, glu_offset,
                ACTIVATION, HAS_BIAS, HAS_SCALE, HAS_RESIDUAL, LN_PROLOGUE, GLU, SPLIT_K, VIEW_4D, SPLIT_ROWS,
                A_SPLIT_ROWS, ALIGNED, OUT_ALIGNED, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                EPILOGUE_SUBTILES, TMA)
    else:
        gemm_tile(tl.program_id(0), tl.program_id(1), A, W, Out, Bias, Scale, Res, Mean, Rstd, LnW, LnB, Ws, WsUp,
            ADesc, WDesc, M, N, K, a_rows_inner, stride_a0, stride_am, stride_ak, stride_wn, stride_wk,
            out_rows_inner, out_cols_inner, stride_o0, stride_o1, stride_o2, stride_o3, stride_r0, stride_r1,
            stride_r2, stride_r3, glu_offset, ACTIVATION, HAS_BIAS, HAS_SCALE, HAS_RESIDUAL, LN_PROLOGUE, GLU,
            SPLIT_K, VIEW_4D, SPLIT_ROWS, A_SPLIT_ROWS, ALIGNED, OUT_ALIGNED, DOT_PRECISION, BLOCK_M, BLOCK_N,
            BLOCK_K, GROUP_M, EPILOGUE_SUBTILES, TMA)


@triton.jit
def _splitk_reduce_kernel(
    Ws, WsUp,  # (SPLIT_K, M, N) fp32 partial sums from _gemm_kernel (of the up half with GLU)
    Out, Bias, Scale, Res,  # as in _gemm_kernel
    M, N,
    out_rows_inner, out_cols_inner, stride_o0, stride_o1, stride_o2, stride_o3,
    stride_r0, stride_r1, stride_r2, stride_r3,
    glu_offset,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    GLU: tl.constexpr, SPLIT_K: tl.constexpr, VIEW_4D: tl.constexpr, SPLIT_ROWS: tl.constexpr,
    OUT_ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    offsets = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    plane = (tl.zeros((1, 1), dtype=tl.int64) + M) * N  # one split's M * N partial sums, in int64
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(SPLIT_K):  # a fixed order: deterministic
        acc += tl.load(Ws + offsets, mask=mask, other=0.0)
        if GLU:
            acc_up += tl.load(WsUp + offsets, mask=mask, other=0.0)
        offsets += plane
    store_tile(acc, acc_up, offs_m, offs_n, M, N, glu_offset, Out, Bias, Scale, Res,
               out_rows_inner, out_cols_inner, stride_o0, stride_o1, stride_o2, stride_o3,
               stride_r0, stride_r1, stride_r2, stride_r3,
               ACTIVATION, HAS_BIAS, HAS_SCALE, HAS_RESIDUAL, GLU, VIEW_4D, SPLIT_ROWS, OUT_ALIGNED)


@triton.jit
def _layernorm_rows_kernel(
    X,  # (M, C) input rows, or a (Mo, Mi, C) view with SPLIT_ROWS; unit column stride
    Y,  # (M, C) normalised rows in Y's dtype; unused without WRITE_Y
    Mean, Rstd,  # (M,) fp32 statistics; unused without WRITE_STATS
    LnW, LnB,  # (C,) LayerNorm weight and bias; unused without WRITE_Y
    M, C, x_rows_inner, stride_xb, stride_xm, stride_ym, eps,
    WRITE_Y: tl.constexpr, WRITE_STATS: tl.constexpr, SPLIT_ROWS: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """LayerNorm of ROWS rows per program, two-pass statistics in fp32 over the whole row in registers.
    Row m of X starts at m * stride_xm, or with SPLIT_ROWS at (m // x_rows_inner) * stride_xb +
    (m % x_rows_inner) * stride_xm (a slice of the model's token buffer)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    mask_c = cols < C
    mask = (rows < M)[:, None] & mask_c[None, :]
    if SPLIT_ROWS:
        x_rows = X + (rows // x_rows_inner) * stride_xb + (rows % x_rows_inner) * stride_xm
    else:
        x_rows = X + rows * stride_xm
    x = tl.load(x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    if WRITE_STATS:
        tl.store(Mean + rows, mean, mask=rows < M)
        tl.store(Rstd + rows, rstd, mask=rows < M)
    if WRITE_Y:
        gamma = tl.load(LnW + cols, mask=mask_c, other=0.0).to(tl.float32)
        beta = tl.load(LnB + cols, mask=mask_c, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * gamma[None, :] + beta[None, :]
        tl.store(Y + rows[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


# ---- launchers ---------------------------------------------------------------------------------------

@on_input_device
def _layernorm_launch(x: torch.Tensor, y, mean, rstd, ln_weight, ln_bias, eps: float) -> None:
    """x: (M, C) or a row-split (Mo, Mi, C) view (``as_rows``), unit column stride."""
    c = x.shape[-1]
    m = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
    rows_inner, stride_b = (x.shape[1], x.stride(0)) if x.dim() == 3 else (m, 0)
    block_c = next_power_of_2(c)
    if block_c > MAX_LAYERNORM_WIDTH:
        raise ValueError(f"the LayerNorm row kernel holds a row in registers: at most {MAX_LAYERNORM_WIDTH} "
                         f"columns, got {c}")
    rows = 16 if INTERPRETING else max(1, min(16, 4096 // block_c))
    num_warps = 4 if block_c <= 1024 else 8
    dummy = x  # stands for the pointers a flag leaves unused
    _layernorm_rows_kernel[(cdiv(m, rows),)](
        x, y if y is not None else dummy, mean if mean is not None else dummy, rstd if rstd is not None else dummy,
        ln_weight if ln_weight is not None else dummy, ln_bias if ln_bias is not None else dummy,
        m, c, rows_inner, stride_b, x.stride(-2), y.stride(0) if y is not None else 0, eps,
        WRITE_Y=y is not None, WRITE_STATS=mean is not None, SPLIT_ROWS=x.dim() == 3, ROWS=rows,
        BLOCK_C=block_c, num_warps=num_warps, **LAUNCH_OPTIONS)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., K) as a 2-D (M, K) view when its rows are evenly strided (a contiguous tensor, a batch of one,
    a row slice), else as a 3-D (Mo, Mi, K) view whose rows the kernels address as (m // Mi, m % Mi).
    Never a copy: a (B, S0, C) slice of the model's (B, S, C) token buffer, rows S * C apart between
    batches, stays where it is. More than 3 dims: the leading ones must merge into one without a copy."""
    if t.dim() < 2:
        raise ValueError(f"expected rows of a matrix (..., K), got shape {tuple(t.shape)}")
    if t.dim() > 3:
        t = t.view(-1, *t.shape[-2:])
    if t.dim() == 2:
        return t
    stride = _row_stride(tuple(t.shape[:2]), tuple(t.stride()[:2]))
    if stride is None:
        return t
    return t.as_strided((t.shape[0] * t.shape[1], t.shape[2]), (stride, t.stride(2)), t.storage_offset())


def _row_stride(shape: tuple[int, int], strides: tuple[int, int]) -> int | None:
    """The one stride of rows (i, j) of an (Mo, Mi) grid when row i * Mi + j sits at (i * Mi + j) * stride,
    else None."""
    (mo, mi), (s0, s1) = shape, strides
    if mo == 1:
        return s1
    if mi == 1:
        return s0
    return s1 if s0 == mi * s1 else None


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """x as rows for the LayerNorm kernel (``as_rows``); a copy only when its columns are not contiguous."""
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must be 2-D (M, K) or 3-D (Mo, Mi, K), got shape {tuple(x.shape)}")
    return as_rows(x if x.stride(-1) == 1 else x.contiguous())


def _num_rows(x: torch.Tensor) -> int:
    return x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]


def layernorm(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm of the rows of x, in x's dtype (fp32 statistics): the ``"separate"`` LN. x: (M, C), or a
    (Mo, Mi, C) view (read in place); the result is (M, C)."""
    x = _rows(x, "x")
    m, c = _num_rows(x), x.shape[-1]
    if out is None:
        out = torch.empty((m, c), dtype=x.dtype, device=x.device)
    if tuple(out.shape) != (m, c) or out.stride(1) != 1:
        raise ValueError(f"out must be {(m, c)} with unit column stride, got {tuple(out.shape)}")
    ln_weight, ln_bias = _vector(ln_weight), _vector(ln_bias)
    if m:
        _layernorm_launch(x, out, None, None, ln_weight, ln_bias, eps)
    return out


def row_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd) in fp32 of the rows of x ((M, C) or (Mo, Mi, C)): what the ``"prologue"`` LN reads."""
    x = _rows(x, "x")
    mean = torch.empty(_num_rows(x), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if mean.numel():
        _layernorm_launch(x, None, mean, rstd, None, None, eps)
    return mean, rstd


def _view_geometry(shape: tuple, strides: tuple, m: int, n: int, name: str) -> tuple[int, int, int, int, int, int]:
    """(Mi, Ni, s0, s1, s2, s3) of a (M, N), (Mo, Mi, N) or (Mo, Mi, No, Ni) view of an M x N result, from the
    view's shape and strides."""
    if len(shape) == 2:
        shape4, strides4 = (1, shape[0], 1, shape[1]), (0, strides[0], 0, strides[1])
    elif len(shape) == 3:
        shape4, strides4 = (shape[0], shape[1], 1, shape[2]), (strides[0], strides[1], 0, strides[2])
    elif len(shape) == 4:
        shape4, strides4 = shape, strides
    else:
        raise ValueError(f"{name} must be 2-D, 3-D or 4-D, got shape {shape}")
    if shape4[0] * shape4[1] != m or shape4[2] * shape4[3] != n:
        raise ValueError(f"{name} of shape {shape} does not hold an {m} x {n} result")
    return (shape4[1], shape4[3], *strides4)


def _output_geometry(out: torch.Tensor, residual: torch.Tensor | None, m: int, n: int):
    """How the kernel addresses out and the residual: (out geometry, residual strides, VIEW_4D, SPLIT_ROWS).
    A function of their shapes and strides only, computed once per layout (``_geometry``): an eager forward
    asks ~100 times with the same few."""
    res = (tuple(residual.shape), residual.stride()) if residual is not None else (None, None)
    return _geometry(tuple(out.shape), out.stride(), *res, m, n)


@functools.lru_cache(maxsize=1024)
def _geometry(out_shape: tuple, out_strides: tuple, res_shape: tuple | None, res_strides: tuple | None, m: int,
              n: int):
    """``_output_geometry`` from shapes and strides.

    Columns split (a 4-D view): both use the 4-D rule and must split M and N alike. Otherwise a tensor whose
    rows are evenly strided is addressed as 2-D, and when one of the two is not (a row slice of a bigger
    buffer), both are addressed as (m // Mi, m % Mi): the evenly strided one with batch stride Mi * row stride.
    """
    out_geom = _view_geometry(out_shape, out_strides, m, n, "out")
    res_geom = _view_geometry(res_shape, res_strides, m, n, "residual") if res_shape is not None else None
    geoms = [g for g in (out_geom, res_geom) if g is not None]
    if any(g[1] != n for g in geoms):  # columns split: the 4-D rule for both
        if res_geom is not None and res_geom[:2] != out_geom[:2]:
            raise ValueError(f"residual {res_shape} and out {out_shape} must split M and N alike")
        return out_geom, res_geom[2:] if res_geom is not None else (0, 0, 0, 0), True, False
    even = [_row_stride((m // g[0] if g[0] else 0, g[0]), (g[2], g[3])) for g in geoms]
    if all(stride is not None for stride in even):
        geoms = [(m, n, 0, stride, 0, g[5]) for g, stride in zip(geoms, even)]
        split_rows = False
    else:
        inner = {g[0] for g, stride in zip(geoms, even) if stride is None}
        if len(inner) > 1:
            raise ValueError(f"residual {res_shape} and out {out_shape} split their rows "
                             "differently and neither has evenly strided rows")
        mi = inner.pop()
        geoms = [g if stride is None else (mi, n, mi * stride, stride, 0, g[5]) for g, stride in zip(geoms, even)]
        split_rows = True
    return geoms[0], geoms[1][2:] if res_shape is not None else (0, 0, 0, 0), False, split_rows


@on_input_device
def gemm(
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str = "none",
    glu: bool = False,
    scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    ln: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    ln_mode: str | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    split_k: int = 1,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """out = residual + act(LN?(a) @ weight^T + bias) * scale, one kernel (plus the LN row kernel).

    a: (M, K) fp16/bf16/fp32, or an (Mo, Mi, K) view (rows M = Mo * Mi, e.g. a slice of a token buffer),
    any strides (unit K stride is fastest; never copied). weight: (N, K) in a's dtype, nn.Linear
    layout, any strides (a (K, N) tensor passed as ``w.t()`` works without a copy). With ``glu`` weight is
    (2N, K) = [gate | up] and the result is act(gate) * up (``activation="silu"``: SwiGLU); bias then has 2N
    entries. bias (N,), scale (N,): any float dtype, applied in fp32. residual and out: (M, N), (Mo, Mi, N) or
    (Mo, Mi, No, Ni) views, any strides (residual may use zero strides); out defaults to a new contiguous (M, N)
    tensor of ``out_dtype`` (default a's dtype); it must not share memory with a or weight, nor with the
    residual unless the residual is out itself (the same view: an in-place residual update). ln =
    (ln_weight, ln_bias, eps): LayerNorm a's rows first, where ``ln_mode`` says ("separate" / "prologue",
    default ``DEFAULT_LN_MODE``). ``split_k`` > 1 splits K over that many programs per tile (fp32 workspace +
    a reduce kernel with the epilogue); ``config`` fixes the tile instead of autotuning.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if a.dim() not in (2, 3) or weight.dim() != 2:
        raise ValueError(f"a must be 2-D or 3-D and weight 2-D, got {tuple(a.shape)} and {tuple(weight.shape)}")
    if a.dtype not in _DTYPES or weight.dtype != a.dtype:
        raise TypeError(f"a and weight must share one of fp16/bf16/fp32, got {a.dtype} and {weight.dtype}")
    check_devices("a", a, weight=weight, bias=bias, scale=scale, residual=residual, out=out,
                  ln_weight=ln[0] if ln is not None else None, ln_bias=ln[1] if ln is not None else None)
    a = as_rows(a)  # 2-D when its rows are evenly strided, else a row-split 3-D view (never a copy)
    m, k = _num_rows(a), a.shape[-1]
    rows_w = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"a is {m} x {k} but weight is {tuple(weight.shape)} (expected (N, {k}))")
    if glu and rows_w % 2:
        raise ValueError(f"glu needs an even number of weight rows ([gate | up]), got {rows_w}")
    n = rows_w // 2 if glu else rows_w
    for name, vec, length in (("bias", bias, rows_w), ("scale", scale, n)):
        if vec is not None and tuple(vec.shape) != (length,):
            raise ValueError(f"{name} must have shape ({length},), got {tuple(vec.shape)}")
    if split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    bias, scale = _vector(bias), _vector(scale)  # the kernels index vectors with unit stride
    if ln is not None:
        ln = (_vector(ln[0]), _vector(ln[1]), ln[2])
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype or a.dtype, device=a.device)
    out_geom, res_strides, view_4d, split_rows = _output_geometry(out, residual, m, n)
    if ln is not None and (ln[0].shape != (k,) or ln[1].shape != (k,)):
        raise ValueError(f"LayerNorm weight and bias must have shape ({k},), got {tuple(ln[0].shape)} "
                         f"and {tuple(ln[1].shape)}")
    if m == 0 or n == 0:
        return out
    if k == 0 and ln is not None:
        raise ValueError("a LayerNorm over K = 0 columns is undefined")
    # in place: every (m, n) of the residual is the same element of out (read, then written, by one program)
    in_place = residual is not None and residual.data_ptr() == out.data_ptr() and res_strides == out_geom[2:]
    for name, t in (("a", a), ("weight", weight), ("residual", residual)):
        if t is not None and t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
            if name == "residual" and in_place:
                continue
            raise ValueError(f"out must not share memory with {name} (other tiles still read it; the autotuner "
                             "runs the kernel more than once), except the residual when it is out itself")

    mean = rstd = ln_weight = ln_bias = None
    if ln is not None:
        ln_weight, ln_bias, eps = ln
        mode = ln_mode or DEFAULT_LN_MODE
        if mode == "separate":
            a = layernorm(a, ln_weight, ln_bias, eps)
            ln_weight = ln_bias = None
        elif mode == "prologue":
            mean, rstd = row_stats(a, eps)
        else:
            raise ValueError(f"ln_mode must be one of {LN_MODES}, got {mode!r}")

    workspace = None
    if split_k > 1:
        workspace = torch.empty((1 + glu, split_k, m, n), dtype=torch.float32, device=a.device)
    # The alignment facts the JIT would derive from divisible arguments, passed explicitly (see
    # gemm_mainloop): then an ahead-of-time compile sees the same kernel as the GPU.
    operands_aligned = _rows_aligned(a) and _rows_aligned(weight)
    aligned = k % 16 == 0 and operands_aligned
    if view_4d:
        out_aligned = n % 16 == 0 and _columns_aligned(out, out_geom) and (
            residual is None or _columns_aligned(residual, (*out_geom[:2], *res_strides)))
    else:
        out_aligned = n % 16 == 0 and _rows_aligned(out) and (residual is None or _rows_aligned(residual))
    epilogue = dict(
        ACTIVATION=ACTIVATIONS[activation], HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        HAS_RESIDUAL=residual is not None, GLU=glu, SPLIT_K=split_k, VIEW_4D=view_4d, SPLIT_ROWS=split_rows,
        OUT_ALIGNED=out_aligned,
    )
    dummy = a  # stands for the pointers a flag leaves unused
    bias_, scale_, residual_ = (t if t is not None else dummy for t in (bias, scale, residual))
    args = (
        a, weight, out, bias_, scale_, residual_,
        mean if mean is not None else dummy, rstd if rstd is not None else dummy,
        ln_weight if ln_weight is not None else dummy, ln_bias if ln_bias is not None else dummy,
        workspace[0] if workspace is not None else dummy, workspace[-1] if workspace is not None else dummy,
        dummy, dummy,  # ADesc, WDesc: the TMA tiles get descriptors instead (_with_descriptors)
        m, n, k, a.shape[1] if a.dim() == 3 else m, a.stride(0) if a.dim() == 3 else 0, a.stride(-2), a.stride(-1),
        weight.stride(0), weight.stride(1), *out_geom, *res_strides, n,
    )
    mainloop = dict(LN_PROLOGUE=mean is not None, A_SPLIT_ROWS=a.dim() == 3, ALIGNED=aligned,
                    DOT_PRECISION=FP32_DOT_PRECISION if a.dtype == torch.float32 else "tf32")  # 16-bit: ignored
    tma_ready = _tma_ready(a, weight, ln_prologue=mean is not None, rows_aligned=operands_aligned)

    def grid(meta: dict) -> tuple[int, int]:  # a program per tile and split, or per SM (PERSISTENT)
        tiles = cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"])
        return (min(tiles, _persistent_programs(out)) if meta.get("PERSISTENT") else tiles), split_k

    if config is not None:
        if config.tma and not tma_ready:
            raise ValueError("a TMA config needs 16-bit a and weight with unit K stride and 16-byte aligned rows, "
                             "a 2-D (evenly strided) a, K > 0 and no LayerNorm prologue")
        if config.persistent and not (config.tma and persistent_fits(split_k, view_4d)):
            raise ValueError("a persistent config needs tma=True, split_k=1 and no 4-D output view")
        _gemm_kernel[grid(config.meta())](*_with_descriptors(args, config.meta()), **epilogue, **mainloop,
                                          **config.meta(), num_warps=config.num_warps,
                                          num_stages=config.num_stages, **LAUNCH_OPTIONS)
    else:
        flags = (glu, mean is not None, a.dtype == torch.float32, view_4d)
        arch = gpu_arch(out)
        tma = TMA_TILES and tma_ready and arch is not None and arch >= TMA_MIN_ARCH  # timed against the others
        meta = {**epilogue, **mainloop}
        in_place = in_place and split_k == 1  # (with split-K the GEMM writes the workspace, not out)
        key = (*flags, arch, tma, in_place, m, n, k, a.dtype, weight.dtype, out.dtype, bias_.dtype, scale_.dtype,
               residual_.dtype, *meta.values())  # meta's entries in the order written above
        launched = False
        if key in _TILES:
            tile = _TILES[key]
        else:
            variants = [(_tuned_kernel(*flags, arch=arch), args)]
            if tma:  # placeholder blocks: each TMA config's pre_hook sets its own
                tma_args = _with_descriptors(args, {"TMA": True, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64})
                variants.append((_tuned_kernel(*flags, arch=arch, tma=True), tma_args))
                if persistent_fits(split_k, view_4d):
                    variants.append((_tuned_kernel(*flags, arch=arch, tma=True, persistent=True), tma_args))
            tile, launched = _tune(out, variants, key, grid, meta, in_place)
        if launched:
            pass
        elif tile is not None:
            made_for, launch = _LAUNCH_KWARGS.get(key, (None, None))
            if made_for is not tile:  # the same for every call of the key and tile (meta's values are in the key)
                launch = {**meta, **tile.all_kwargs()}
                _LAUNCH_KWARGS[key] = (tile, launch)
            _gemm_kernel[grid(tile.kwargs)](*_with_descriptors(args, tile.kwargs), **launch, **LAUNCH_OPTIONS)
        else:  # a Triton that does not say which tile won: its autotuner, restoring out after each trial
            _tuned_kernel(*flags, restore_out=in_place, arch=arch)[grid](*args, **meta, **LAUNCH_OPTIONS)
    if split_k > 1:
        _splitk_reduce_kernel[(cdiv(m, REDUCE_BLOCK), cdiv(n, REDUCE_BLOCK))](
            workspace[0], workspace[-1], out, bias_, scale_, residual_, m, n, *out_geom, *res_strides, n,
            **epilogue, BLOCK_M=REDUCE_BLOCK, BLOCK_N=REDUCE_BLOCK, num_warps=REDUCE_WARPS, **LAUNCH_OPTIONS)
    return out


def with_out(functional: Callable, into: Callable, reference: Callable) -> Callable:
    """dispatch's form of an op that can write the residual stream in place: ``op(*args, out=None)`` calls
    the registered ``functional`` op, or with ``out`` its mutating ``into`` form (``into(*args, out)``,
    declared to mutate ``out``) and returns ``out``. It carries ``reference``'s signature (dispatch gives
    the model either this or the reference): arguments may be given by name, and the ones left out get the
    reference's defaults, so that ``into`` always receives every argument before ``out``. A plain Python
    function: torch.compile traces through it to the ops; in eager mode they are called directly (``eager_direct``)."""
    params = [p for p in inspect.signature(reference).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    names = tuple(p.name for p in params)
    defaults = tuple(None if p.default is p.empty else p.default for p in params)
    required = tuple(p.default is p.empty for p in params)

    def complete(args: tuple, kwargs: dict) -> tuple:
        if len(args) > len(names):
            raise TypeError(f"{op.__name__}() takes {len(names)} positional arguments, got {len(args)}")
        rest = []
        for i in range(len(args), len(names)):
            if names[i] in kwargs:
                rest.append(kwargs.pop(names[i]))
            elif required[i]:
                raise TypeError(f"{op.__name__}() missing the argument {names[i]!r}")
            else:
                rest.append(defaults[i])
        if kwargs:
            raise TypeError(f"{op.__name__}() got unexpected arguments {sorted(kwargs)}")
        return (*args, *rest)

    call_functional, call_into = eager_direct(functional), eager_direct(into, mutated="out")

    def op(*args, out: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        args = complete(args, kwargs)
        if out is None:
            return call_functional(*args)
        call_into(*args, out)
        return out

    def qualname(f: Callable) -> str:  # a torch.library custom op's "namespace::name"
        return getattr(f, "_qualname", getattr(f, "__name__", repr(f)))

    op.__name__ = op.__qualname__ = f"{qualname(functional).rpartition('::')[2]}_op"
    op.__doc__ = (f"Triton ``{reference.__name__}``: the op ``{qualname(functional)}``, or ``{qualname(into)}`` "
                  "writing into ``out=`` (returned then).")
    op.__signature__ = inspect.signature(reference)
    return op


def _tma_ready(a: torch.Tensor, weight: torch.Tensor, ln_prologue: bool, rows_aligned: bool) -> bool:
    """Whether TMA descriptors can read a and weight: 16-bit, a 2-D (rows evenly strided), unit K stride, rows
    that do not overlap (no zero row stride of an expanded tensor), 16-byte aligned bases and row strides (the
    copy engine's rules; ``rows_aligned``: _rows_aligned of both), K > 0; the LN prologue normalises A in
    registers and keeps the pointer loads."""
    return (rows_aligned and a.dtype in (torch.float16, torch.bfloat16) and a.dim() == 2 and not ln_prologue
            and a.shape[1] > 0 and a.stride(1) == 1 and weight.stride(1) == 1
            and a.stride(0) >= a.shape[1] and weight.stride(0) >= weight.shape[1])


def _persistent_programs(out: torch.Tensor) -> int:
    """Programs of a persistent GEMM: one per SM of out's GPU; under the interpreter a few, so that each walks
    several tiles."""
    return _sm_count(out.get_device()) if out.is_cuda else INTERPRETER_PERSISTENT_PROGRAMS


INTERPRETER_PERSISTENT_PROGRAMS = 3


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# The first GPU architecture with TMA (Hopper, sm_90); Triton lowers descriptor loads to pointers before it.
TMA_MIN_ARCH = (9, 0)
# EOMT_FAST_GEMM_TMA=0 in the environment (read at import) keeps the autotuned GEMMs on the pointer tiles: the
# TMA and persistent tiles are new and were compiled and interpreted, not yet run, before their first GPU run.
TMA_TILES = os.environ.get("EOMT_FAST_GEMM_TMA", "1").strip().lower() not in ("0", "false", "off", "no")
_DESCRIPTORS = slice(12, 14)  # where ADesc and WDesc sit in _gemm_kernel's arguments (M, N, K next)


def _with_descriptors(args: tuple, meta: dict) -> tuple:
    """``args`` with TMA descriptors of A and W for a tile ``meta`` with TMA set (as they are otherwise)."""
    if not meta.get("TMA"):
        return args
    a, weight, (m, n, k) = args[0], args[1], args[_DESCRIPTORS.stop:_DESCRIPTORS.stop + 3]  # M, N, K follow
    a_desc = TensorDescriptor(a, [m, k], [a.stride(0), 1], [meta["BLOCK_M"], meta["BLOCK_K"]])
    w_desc = TensorDescriptor(weight, [weight.shape[0], k], [weight.stride(0), 1], [meta["BLOCK_N"], meta["BLOCK_K"]])
    return (*args[:_DESCRIPTORS.start], a_desc, w_desc, *args[_DESCRIPTORS.stop:])


def _vector(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _columns_aligned(t: torch.Tensor, geometry: tuple) -> bool:
    """A 4-D output view (geometry: rows_inner, cols_inner and its four strides, in elements) whose columns
    come in runs of 16 contiguous elements starting 16 elements apart, in rows that start 16 elements apart:
    what VIEW_4D's OUT_ALIGNED promises the compiler (vector stores)."""
    _, cols_inner, *strides = geometry
    return (t.data_ptr() % 16 == 0 and strides[3] == 1 and cols_inner % 16 == 0
            and all(stride % 16 == 0 for stride in strides[:3]))


def _rows_aligned(t: torch.Tensor) -> bool:
    """Every row of a 2-D (or last-two-dims) tensor starts on a 16-byte boundary."""
    if t.data_ptr() % 16:
        return False
    size = t.element_size()
    for stride in t.stride()[:-1]:
        if stride * size % 16:
            return False
    return True


# ---- ahead-of-time compile checks (eomt-fast check-kernels) ------------------------------------------

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def gemm_aot_spec(name: str, dtype: torch.dtype, config: GemmConfig, *, activation: str = "none",
                  has_bias: bool = True, has_scale: bool = False, has_residual: bool = False,
                  ln_prologue: bool = False, glu: bool = False, split_k: int = 1, view_4d: bool = False,
                  split_rows: bool = False, a_split_rows: bool = False):
    """A KernelSpec of ``_gemm_kernel`` as the launcher compiles it on a GPU for contiguous, 16-byte aligned
    operands with K and N multiples of 16 (every EoMT GEMM): unit strides are constants, as the JIT
    specialises arguments equal to 1, and ALIGNED / OUT_ALIGNED are set, as the launcher sets them.
    ``split_rows`` / ``a_split_rows``: out and residual / A are row slices of the model's token buffer."""
    from eomt_fast.aot import KernelSpec

    t = _TRITON_DTYPE[dtype]
    ptr = f"*{t}"
    signature = {
        "A": ptr, "W": ptr, "Out": ptr, "Bias": ptr, "Scale": ptr, "Res": ptr, "Mean": "*fp32", "Rstd": "*fp32",
        "LnW": ptr, "LnB": ptr, "Ws": "*fp32", "WsUp": "*fp32", "ADesc": ptr, "WDesc": ptr,
        "M": "i32", "N": "i32", "K": "i32", "a_rows_inner": "i32", "stride_a0": "i32",
        "stride_am": "i32", "stride_ak": "i32", "stride_wn": "i32", "stride_wk": "i32",
        "out_rows_inner": "i32", "out_cols_inner": "i32",
        "stride_o0": "i32", "stride_o1": "i32", "stride_o2": "i32", "stride_o3": "i32",
        "stride_r0": "i32", "stride_r1": "i32", "stride_r2": "i32", "stride_r3": "i32",
        "glu_offset": "i32",
    }
    constexprs = {
        "stride_ak": 1, "stride_wk": 1, "stride_o3": 1, "stride_r3": 1,
        "ACTIVATION": ACTIVATIONS[activation], "HAS_BIAS": has_bias, "HAS_SCALE": has_scale,
        "HAS_RESIDUAL": has_residual, "LN_PROLOGUE": ln_prologue, "GLU": glu, "SPLIT_K": split_k,
        "VIEW_4D": view_4d, "SPLIT_ROWS": split_rows, "A_SPLIT_ROWS": a_split_rows, "ALIGNED": True,
        "OUT_ALIGNED": True,
        "DOT_PRECISION": FP32_DOT_PRECISION if dtype == torch.float32 else "tf32", "TMA": False, "PERSISTENT": False,
        **config.meta(),
    }
    signature.update({key: "constexpr" for key in constexprs})
    c = config
    if c.tma:  # A and W through descriptors: rows aligned (the launcher's _tma_ready), A 2-D
        if a_split_rows or ln_prologue or dtype == torch.float32:
            raise ValueError("TMA tiles read a 2-D 16-bit A without the LayerNorm prologue")
        signature.update({"ADesc": f"tensordesc<{t}[{c.block_m}, {c.block_k}]>",
                          "WDesc": f"tensordesc<{t}[{c.block_n}, {c.block_k}]>"})
    label = f"{name}_{t}_{c.block_m}x{c.block_n}x{c.block_k}_w{c.num_warps}s{c.num_stages}"
    label += (f"_sub{c.epilogue_subtiles}" if c.epilogue_subtiles > 1 else "") + ("_tma" if c.tma else "")
    label += "_persistent" if c.persistent else ""
    return KernelSpec(name=label, fn=_gemm_kernel, signature=signature, constexprs=constexprs, num_warps=c.num_warps,
                      num_stages=c.num_stages, needs_wgmma=dtype != torch.float32, needs_tma=c.tma,
                      min_arch=90 if c.tma else 0)


def gemm_aot_specs(name: str, **flags) -> list:
    """Specs of one GEMM of an op: every bf16 autotune config for its flags, and the first in fp16
    (fp16 and bf16 compile to the same registers and shared memory)."""
    glu, prologue, view_4d = flags.get("glu", False), flags.get("ln_prologue", False), flags.get("view_4d", False)
    configs = gemm_configs(glu, prologue, False, view_4d)
    if not (prologue or flags.get("a_split_rows", False)):  # the TMA tiles too, where A can have descriptors
        configs += gemm_configs(glu, False, False, view_4d, tma=True)
        if persistent_fits(flags.get("split_k", 1), view_4d):
            configs += gemm_configs(glu, False, False, view_4d, tma=True, persistent=True)
    return ([gemm_aot_spec(name, torch.bfloat16, c, **flags) for c in configs]
            + [gemm_aot_spec(name, torch.float16, configs[0], **flags)])


def layernorm_aot_spec(name: str, dtype: torch.dtype, hidden: int, *, write_y: bool = True, write_stats: bool = False,
                       split_rows: bool = False):
    from eomt_fast.aot import KernelSpec

    t = _TRITON_DTYPE[dtype]
    block_c = next_power_of_2(hidden)
    signature = {"X": f"*{t}", "Y": f"*{t}", "Mean": "*fp32", "Rstd": "*fp32", "LnW": f"*{t}", "LnB": f"*{t}",
                 "M": "i32", "C": "i32", "x_rows_inner": "i32", "stride_xb": "i32", "stride_xm": "i32",
                 "stride_ym": "i32", "eps": "fp32", "WRITE_Y": "constexpr", "WRITE_STATS": "constexpr",
                 "SPLIT_ROWS": "constexpr", "ROWS": "constexpr", "BLOCK_C": "constexpr"}
    constexprs = {"WRITE_Y": write_y, "WRITE_STATS": write_stats, "SPLIT_ROWS": split_rows,
                  "ROWS": max(1, min(16, 4096 // block_c)), "BLOCK_C": block_c}
    return KernelSpec(name=f"{name}_{t}_C{hidden}", fn=_layernorm_rows_kernel, signature=signature,
                      constexprs=constexprs, num_warps=4 if block_c <= 1024 else 8)


def splitk_reduce_aot_spec(name: str, dtype: torch.dtype, split_k: int, *, activation: str = "none",
                           has_scale: bool = True, has_residual: bool = True, glu: bool = False,
                           split_rows: bool = False):
    from eomt_fast.aot import KernelSpec

    t = _TRITON_DTYPE[dtype]
    ptr = f"*{t}"
    signature = {"Ws": "*fp32", "WsUp": "*fp32", "Out": ptr, "Bias": ptr, "Scale": ptr, "Res": ptr,
                 "M": "i32", "N": "i32", "out_rows_inner": "i32", "out_cols_inner": "i32",
                 "stride_o0": "i32", "stride_o1": "i32", "stride_o2": "i32", "stride_o3": "i32",
                 "stride_r0": "i32", "stride_r1": "i32", "stride_r2": "i32", "stride_r3": "i32",
                 "glu_offset": "i32"}
    constexprs = {"stride_o3": 1, "stride_r3": 1, "ACTIVATION": ACTIVATIONS[activation], "HAS_BIAS": True,
                  "HAS_SCALE": has_scale, "HAS_RESIDUAL": has_residual, "GLU": glu, "SPLIT_K": split_k,
                  "VIEW_4D": False, "SPLIT_ROWS": split_rows, "OUT_ALIGNED": True, "BLOCK_M": REDUCE_BLOCK,
                  "BLOCK_N": REDUCE_BLOCK}
    signature.update({key: "constexpr" for key in constexprs})
    return KernelSpec(name=f"{name}_{t}_splitk{split_k}", fn=_splitk_reduce_kernel, signature=signature,
                      constexprs=constexprs, num_warps=REDUCE_WARPS)


# The building blocks at the configurations the ops do not list themselves (each op file lists its
# GEMMs): split-K partial products and their reduce, the LayerNorm row kernel, a 4-D (scattered) output.
def aot_specs() -> list:
    return [
        gemm_aot_spec("gemm_splitk2", torch.bfloat16, GPU_CONFIGS[0], split_k=2),
        gemm_aot_spec("gemm_splitk2", torch.bfloat16, GPU_CONFIGS[2], split_k=2),
        gemm_aot_spec("gemm_splitk2_glu", torch.bfloat16, GPU_GLU_CONFIGS[0], split_k=2, glu=True, activation="silu"),
        *gemm_aot_specs("gemm_view4d_residual", view_4d=True, has_residual=True),
        # fp32 ("ieee" dots on FMA units: no wgmma), at the heaviest flags
        *(gemm_aot_spec("gemm_fp32_residual", torch.float32, c, has_scale=True, has_residual=True)
          for c in gemm_configs(fp32=True)),
        *(gemm_aot_spec("gemm_fp32_glu" + ("_prologue" if prologue else ""), torch.float32, c, glu=True,
                        activation="silu", ln_prologue=prologue)
          for c in gemm_configs(glu=True, fp32=True) for prologue in (False, True)),
        *(gemm_aot_spec("gemm_fp32_gelu_prologue", torch.float32, c, activation="gelu", ln_prologue=True)
          for c in gemm_configs(ln_prologue=True, fp32=True)),
        splitk_reduce_aot_spec("gemm_splitk_reduce", torch.bfloat16, 2),
        splitk_reduce_aot_spec("gemm_splitk_reduce_rows3d", torch.bfloat16, 2, split_rows=True),
        splitk_reduce_aot_spec("gemm_splitk_reduce_glu", torch.bfloat16, 4, glu=True, activation="silu",
                               has_scale=False, has_residual=False),
        layernorm_aot_spec("layernorm_rows", torch.bfloat16, 1024),
        layernorm_aot_spec("layernorm_rows", torch.float16, 1536),
        layernorm_aot_spec("layernorm_rows_stats", torch.bfloat16, 1024, write_y=False, write_stats=True),
        # the layers before the queries read and write a (B, S0, C) slice of the (B, S, C) token buffer
        layernorm_aot_spec("layernorm_rows_rows3d", torch.bfloat16, 1024, split_rows=True),
        layernorm_aot_spec("layernorm_rows_stats_rows3d", torch.bfloat16, 1024, write_y=False, write_stats=True,
                           split_rows=True),
        *gemm_aot_specs("gemm_rows3d_residual", has_scale=True, has_residual=True, split_rows=True),
        *gemm_aot_specs("gemm_rows3d_a_prologue", activation="gelu", ln_prologue=True, a_split_rows=True),
        *gemm_aot_specs("gemm_rows3d_a_prologue_glu", glu=True, activation="silu", ln_prologue=True,
                        a_split_rows=True),
    ]

