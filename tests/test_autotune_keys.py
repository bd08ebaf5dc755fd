"""Every autotuned kernel is keyed on each compile-time flag it is launched with and on what sets its grid.

Triton's autotuner benchmarks once per key and then reuses the winner for every launch with the same key.
A flag missing from the key (an aligned or unaligned operand, a mask or none) hands one variant's tile to
another that compiles to different code; a missing grid size (the batch) hands batch 1's tile, chosen for
a few programs on 132 SMs, to batch 8. Neither changes a result, only speed, so only this test sees it.
Checked on the autotuner objects the launchers use (one config each under the interpreter, the same keys).
"""

import ast
import inspect
from pathlib import Path

import pytest
import torch

import eomt_fast.kernels
from eomt_fast.kernels import attention, gemm, mask_logits, patch_embed, upscale


def autotuners():
    """(name, autotuner, constexprs fixed by the autotuner's own instance or derived from the key, the
    arguments that size the grid). Factories are called for every flag combination they are built for."""
    fixed_by_dtype = {"DOT_PRECISION"}  # tensor dtypes are part of every autotune key
    yield "attention", attention._tuned_attention_kernel(), fixed_by_dtype | {"BLOCK_D"}, {"B", "H", "S"}
    for glu in (False, True):
        for ln_prologue in (False, True):
            for fp32 in (False, True):
                for view_4d in (False, True):
                    for restore_out in (False, True):
                        yield ("gemm", gemm._tuned_kernel(glu, ln_prologue, fp32, view_4d, restore_out),
                               fixed_by_dtype | {"GLU", "LN_PROLOGUE", "VIEW_4D", "TMA", "PERSISTENT"},
                               {"M", "N", "SPLIT_K"})
                    # the TMA tiles' autotuners (persistent ones not for the 4-D output view)
                    for persistent in ([] if ln_prologue or fp32 else [False] if view_4d else [False, True]):
                        yield ("gemm", gemm._tuned_kernel(glu, ln_prologue, fp32, view_4d, tma=True,
                                                          persistent=persistent),
                               fixed_by_dtype | {"GLU", "LN_PROLOGUE", "VIEW_4D", "PERSISTENT"}, {"M", "N", "SPLIT_K"})
    for fp32 in (False, True):
        yield "grid_mask", mask_logits._tuned_grid_mask_kernel(fp32), fixed_by_dtype, {"B", "P", "Q"}
        yield "patch_embed", patch_embed._tuned_kernel(fp32), fixed_by_dtype, {"M", "N"}
    # BLOCK_C = next_power_of_2(C)
    yield "dwconv", upscale._tuned_dwconv_kernel(), {"BLOCK_C"}, {"B", "H", "W"}


def constexpr_parameters(jit_function) -> set[str]:
    raw = jit_function.fn  # JITFunction and InterpretedFunction both keep the Python function as .fn
    return {name for name, p in inspect.signature(raw).parameters.items()
            if "constexpr" in str(p.annotation)}


@pytest.mark.parametrize("name,tuner,fixed,grid", list(autotuners()), ids=lambda v: v if isinstance(v, str) else "")
def test_autotune_key_holds_every_flag_and_the_grid_size(name, tuner, fixed, grid):
    tile = set(tuner.configs[0].kwargs)  # what the autotuner itself chooses
    flags = constexpr_parameters(tuner.fn) - tile - fixed
    keys = set(tuner.keys)
    assert keys <= set(tuner.fn.arg_names), f"{name}: key names no argument: {keys - set(tuner.fn.arg_names)}"
    assert not flags - keys, f"{name}: autotune key lacks the flags {sorted(flags - keys)}"
    assert not grid - keys, f"{name}: autotune key lacks the grid sizes {sorted(grid - keys)}"


def test_every_autotuner_in_the_kernels_is_checked():
    """A new autotune(...) in kernels/ must be added to autotuners() above; and every autotuner is made by
    _autotune.autotune (its results kept on disk), none by triton.autotune directly."""
    root = Path(eomt_fast.kernels.__file__).parent
    calls, direct = [], []
    for path in sorted(root.glob("*.py")):
        if path.name == "_autotune.py":  # the one place that builds Triton's autotuner
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            if isinstance(node.func, ast.Name) and node.func.id == "autotune":
                calls.append(f"{path.name}:{node.lineno}")
            elif isinstance(node.func, ast.Attribute) and node.func.attr == "autotune":
                direct.append(f"{path.name}:{node.lineno}")
    checked = {(name, tuner.fn.fn.__name__) for name, tuner, _, _ in autotuners()}
    assert not direct, f"autotuners made without the disk cache (use _autotune.autotune): {direct}"
    assert len(calls) == len(checked) == 5, (calls, sorted(checked))
    assert all(type(tuner).__name__ == "DiskCachedAutotuner" for _, tuner, _, _ in autotuners())


FACTORIES = {"attention": attention._tuned_attention_kernel, "gemm": gemm._tuned_kernel,
             "grid_mask": mask_logits._tuned_grid_mask_kernel, "patch_embed": patch_embed._tuned_kernel,
             "dwconv": upscale._tuned_dwconv_kernel}
FLAGS = {"gemm": (False, False, False, False), "grid_mask": (False,), "patch_embed": (False,)}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_each_gpu_architecture_gets_its_own_autotuner(name):
    """Triton's Autotuner caches the winning tile on the key values and dtypes only, never the device: each
    factory builds one autotuner per compute capability, so a tile that fits an H100's shared memory is not
    reused, untimed, on another architecture in the same process."""
    factory, flags = FACTORIES[name], FLAGS.get(name, ())
    hopper, ada = factory(*flags, arch=(9, 0)), factory(*flags, arch=(8, 9))
    assert hopper is not ada and hopper is factory(*flags, arch=(9, 0))
    assert hopper.keys == ada.keys and len(hopper.configs) == len(ada.configs)  # the same tuning, separate caches


def test_launchers_pass_their_devices_architecture():
    """Every call of an autotuner factory in kernels/ names the architecture (arch=gpu_arch(tensor)), and
    gpu_arch is None off CUDA."""
    from eomt_fast.kernels._triton import gpu_arch

    assert gpu_arch(torch.zeros(1)) is None
    root = Path(eomt_fast.kernels.__file__).parent
    calls, without = 0, []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.startswith("_tuned_"):
                calls += 1
                if not any(k.arg == "arch" for k in node.keywords):
                    without.append(f"{path.name}:{node.lineno} {node.func.id}")
    assert calls >= len(FACTORIES) and not without, without
